package raftkv

import (
	"context"
	"encoding/binary"
	"slices"
	"time"

	"go.etcd.io/raft/v3"
	"go.etcd.io/raft/v3/raftpb"
	"go.uber.org/zap"
)

// readRetry is how long a ReadIndex request may go unanswered before it is
// asked again with a new context (etcd's readIndexRetryTime).
const readRetry = 500 * time.Millisecond

// readRound is one ReadIndex round shared by every quorum read that arrived
// before it started, as etcd's linearizableReadLoop shares one.
type readRound struct {
	done  chan struct{} // closed once index is applied here, or on failure
	index uint64
	err   error
}

// readLoop is the loop's side of quorum reads.
type readLoop struct {
	inflight *readRound   // asked of Raft, no answer yet
	rctxs    []uint64     // the request contexts of inflight's attempts
	retryAt  time.Time    // when to ask again
	waiting  []*readRound // answered, waiting for their index to be applied
}

// linearizableRead returns once this member has applied everything
// committed before the call: a read of local state afterwards is
// linearizable.
func (n *Node) linearizableRead(ctx context.Context) error {
	select {
	case <-n.endc:
		return ErrStopped
	default:
	}
	n.readMu.Lock()
	r := n.nextRead
	if r == nil {
		r = &readRound{done: make(chan struct{})}
		n.nextRead = r
	}
	n.readMu.Unlock()
	select {
	case n.readc <- struct{}{}:
	default: // the loop already has a wake-up pending
	}
	select {
	case <-r.done:
		return r.err
	case <-ctx.Done():
		return ErrTimeout
	case <-n.donec:
		return ErrStopped
	case <-n.endc:
		return ErrStopped
	}
}

// startRead starts the next round when none is in flight. A reader that
// arrives while a round is in flight joins the next one: the read index
// must be taken after the read began.
func (n *Node) startRead() {
	rl := &n.loop.read
	if rl.inflight != nil {
		return
	}
	n.readMu.Lock()
	r := n.nextRead
	n.nextRead = nil
	n.readMu.Unlock()
	if r == nil {
		return
	}
	rl.inflight = r
	rl.rctxs = rl.rctxs[:0]
	n.requestReadIndex()
}

// requestReadIndex asks Raft for a read index with a fresh request context.
// Never reuse one across rounds: an answer to an attempt of an earlier
// round can arrive late and carry an index from before a read of this
// round began, a stale read (etcd-io/etcd#20418). An answer to any attempt
// of the round in flight counts: every attempt went out after each of the
// round's reads began, and a leader answers with an index it confirmed
// after it received the request. Only the newest would never come in time
// where a round trip to the leader and its heartbeat round take longer
// than readRetry (members far apart). The context comes from the request
// ID generator, so it is unique across restarts too.
func (n *Node) requestReadIndex() {
	rl := &n.loop.read
	rctx := n.ids.id()
	rl.rctxs = append(rl.rctxs, rctx)
	n.readRounds.Add(1)
	rl.retryAt = time.Now().Add(readRetry)
	// Step, not RawNode.ReadIndex, to learn at once that there is no leader
	// to ask; the attempt is then repeated when one appears.
	err := n.rn.Step(&raftpb.Message{
		Type:    raftpb.MsgReadIndex.Enum(),
		Entries: []*raftpb.Entry{{Data: binary.BigEndian.AppendUint64(nil, rctx)}},
	})
	if err != nil {
		n.lg.Debug("read index request dropped", zap.Error(err))
	}
}

// readStates takes Raft's answers to read index requests, then releases the
// rounds whose index is applied and starts the next round.
func (n *Node) readStates(states []raft.ReadState) {
	rl := &n.loop.read
	for _, rs := range states {
		if rl.inflight == nil || len(rs.RequestCtx) != 8 || !slices.Contains(rl.rctxs, binary.BigEndian.Uint64(rs.RequestCtx)) {
			continue // an answer to an attempt of an earlier round
		}
		rl.inflight.index = rs.Index
		rl.waiting = append(rl.waiting, rl.inflight)
		rl.inflight = nil
	}
	if len(rl.waiting) > 0 {
		n.releaseReads()
	}
	if rl.inflight == nil {
		n.startRead()
	}
}

// releaseReads ends the rounds whose read index this member has applied.
func (n *Node) releaseReads() {
	rl := &n.loop.read
	keep := rl.waiting[:0]
	for _, r := range rl.waiting {
		if r.index <= n.loop.applied {
			close(r.done)
		} else {
			keep = append(keep, r)
		}
	}
	clear(rl.waiting[len(keep):])
	rl.waiting = keep
}

// retryReadIfLate asks again when an answer is overdue (the request or its
// answer was lost, or the leader that took it is gone).
func (n *Node) retryReadIfLate(now time.Time) {
	rl := &n.loop.read
	if rl.inflight != nil && now.After(rl.retryAt) {
		n.requestReadIndex()
	}
}

// retryReadOnLeaderChange asks the new leader at once.
func (n *Node) retryReadOnLeaderChange() {
	if n.loop.read.inflight != nil && n.loop.lead != 0 {
		n.requestReadIndex()
	}
}

// failReads ends every round with err; the loop is stopping.
func (n *Node) failReads(err error) {
	rl := &n.loop.read
	fail := func(r *readRound) {
		r.err = err
		close(r.done)
	}
	if rl.inflight != nil {
		fail(rl.inflight)
		rl.inflight = nil
	}
	for _, r := range rl.waiting {
		fail(r)
	}
	rl.waiting = nil
	n.readMu.Lock()
	if n.nextRead != nil {
		fail(n.nextRead)
		n.nextRead = nil
	}
	n.readMu.Unlock()
}
