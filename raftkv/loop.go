package raftkv

import (
	"errors"
	"math"
	"slices"
	"time"

	"github.com/etcaddy/etcaddy/storage"
	"go.etcd.io/raft/v3"
	"go.etcd.io/raft/v3/raftpb"
	"go.uber.org/zap"
	"google.golang.org/protobuf/proto"
)

// The node is a raft.RawNode driven by one goroutine, not a raft.Node:
// raft.Node is itself a goroutine wrapped around a RawNode, so every
// proposal would cross two channels and Propose could not report a drop
// without a round trip. Owning the RawNode lets the loop drain every pending
// proposal into Raft before asking for the next Ready (the batching that
// gives one bbolt commit per Ready) and see ErrProposalDropped at once.

// maxDrain bounds the events taken between two Readies, so that a flood of
// proposals cannot starve ticks and Ready handling.
const maxDrain = 4096

// loopState is owned by the loop goroutine (and by boot, before it starts).
type loopState struct {
	applied        uint64            // last index applied to the store
	raftApplied    uint64            // last index Raft handed out as committed
	hardState      *raftpb.HardState // the last hard state saved
	scratch        []*raftpb.Entry   // commitOnAppend's committed entries
	snapIndex      uint64            // index of the last snapshot
	steppedSnaps   []string          // files of snapshots stepped since the last Ready (dropUntakenSnapshots)
	droppedAt      uint64            // applied index of the last drop of mapped pages (memory.go)
	confState      *raftpb.ConfState // the latest applied conf state
	lead           uint64            // the leader as of the last SoftState
	campaignAt     uint64            // campaign once Raft has handed out this index (0: no)
	ticks          int
	tickAt         time.Time  // when the last tick counted was due (ticksDue)
	batch          []proposal // proposals taken since the last flush
	beforeSave     func()     // tests only: runs before each Save
	afterTick      func()     // tests only: runs after each ticker event
	flushErr       error      // the first failure of flushStore: the loop stops
	noFastCampaign bool       // tests only: a fresh single voter waits for its election timeout
	read           readLoop
	reap           reaper
	confApplied    []result                   // conf changes applied in this Ready, for their proposers
	verdicts       confVerdicts               // what became of the last conf changes applied (see judgeConf)
	confPending    uint64                     // leader: the index Raft checks conf changes against (see confBusy)
	confHeld       []heldConf                 // leader: conf changes waiting for the pending one to apply
	termStart      uint64                     // leader: index of the first entry of its term (0: not known)
	removedSelf    bool                       // this member's removal was applied
	handoff        uint64                     // leader just removed: the member to hand leadership to (handOver)
	farewells      map[uint64]*raftpb.Message // leader: last heartbeats to members it just removed (applyToRaft), sent by syncPeers
	timeoutNow     *waitingTimeoutNow         // a MsgTimeoutNow waiting for committed entries to apply
	stopAt         time.Time                  // non-zero: the loop ends then (removed member)
}

// report is a transport's feedback about a peer.
type report struct {
	to          uint64
	unreachable bool                // the last send to this peer failed
	snapshot    raft.SnapshotStatus // non-zero: the outcome of a MsgSnap
}

// run is the loop: it owns the RawNode. Each turn takes in everything that
// happened (ticks, proposals, read requests, peer messages), then handles
// one Ready.
func (n *Node) run() {
	defer close(n.donec)
	defer n.dropPendingSnapshots()
	defer n.quietTransport()
	defer n.halt()
	defer n.failReads(ErrStopped)
	// Watches end with the loop (a removal, a storage failure, Stop): no
	// event would reach them any more, and their clients should move on
	// to another member, as from an etcd member that exits.
	defer n.store.EndWatches()
	defer func() {
		if err := n.store.Flush(); err != nil {
			n.lg.Error("committing applied entries failed", zap.Error(err))
		}
	}()
	// Raft panics on a state it cannot go on from (a log that lost entries
	// a peer's commit index counts on, say). The member stops, as etcd's
	// process would, but Caddy and every other site in it go on; the
	// log says why. The store rolled back a write a panic cut short
	// (rollbackOnPanic), so what flushStore commits is whole.
	defer func() {
		if r := recover(); r != nil {
			n.running.Store(false)
			n.lg.Error("raftkv loop stopped by a panic; the member no longer serves (caddy reload --force, or a restart of Caddy, starts it again)",
				zap.Any("panic", r), zap.Stack("stack"))
		}
	}()
	ticker := time.NewTicker(n.cfg.HeartbeatInterval / ticksPerHeartbeat)
	defer ticker.Stop()
	linger := time.NewTimer(time.Hour)
	linger.Stop()
	defer linger.Stop()
	lingering := false
	n.loop.reap.init()
	defer n.loop.reap.stop()
	for {
		if !n.loop.stopAt.IsZero() && time.Now().After(n.loop.stopAt) {
			n.lg.Warn("the member has been permanently removed from the cluster; stopping", zap.String("member-id", idString(n.id)))
			return
		}
		// Block only when Raft has nothing to hand out: after Advance a
		// leader often has new committed entries ready at once.
		if !n.rn.HasReady() {
			// A deferred apply commits with the next Save, or after
			// applyLinger when none comes.
			if n.store.Deferred() && !lingering {
				linger.Reset(applyLinger)
				lingering = true
			}
			select {
			case <-linger.C:
				lingering = false
				n.flushStore()
			case <-n.store.FlushRequests():
				n.flushStore()
			case <-ticker.C:
				n.tick()
			case f := <-n.ctrlc:
				f()
			case <-n.selfc:
				n.removedBy("a peer answered 410 Gone", 0)
			case p := <-n.propc:
				n.propose(p)
			case <-n.readc:
				n.startRead()
			case m := <-n.recvc:
				n.step(m)
			case r := <-n.reportc:
				n.applyReport(r)
			case <-n.loop.reap.timer.C:
				n.reapCheck(time.Now())
			case <-n.stopc:
				return
			}
		}
		if !n.drain(ticker.C) {
			return
		}
		if n.snapReported.Load() {
			n.takeSnapshotReports()
		}
		if err := n.loop.flushErr; err != nil {
			n.storageFailed(err)
			return
		}
		n.flushProposals()
		if n.rn.HasReady() {
			if err := n.handleReady(); err != nil {
				n.storageFailed(err)
				return
			}
			if n.loop.removedSelf {
				n.removedBy("its removal was applied", n.cfg.ElectionTimeout)
			}
			n.releaseConf()
			n.stepTimeoutNow()
		} else if len(n.loop.steppedSnaps) > 0 {
			n.dropUntakenSnapshots("")
		}
	}
}

// applyLinger bounds how long a deferred apply waits for the next Save to
// commit with (see storage.Ready.Defer). In a cluster the next write's
// entries arrive within a client's round trip, so a serial writer's
// applies ride with its next append; a reader never waits for it, since a
// read asks for the commit at once.
const applyLinger = 2 * time.Millisecond

// quietTransport stops the transport a while after the loop ended on its
// own (the member was removed, or a failure stopped it): the last messages
// it queued (a removed leader's hand-over, its farewells) still go, then
// nothing more probes the peers, and the peer endpoint answers 503 instead
// of taking messages and snapshots nobody handles. Stop does the same at
// once when it comes first.
func (n *Node) quietTransport() {
	select {
	case <-n.stopc:
		return
	default:
	}
	n.bg.Add(1)
	go func() {
		defer n.bg.Done()
		t := time.NewTimer(peerRequestTimeout)
		defer t.Stop()
		select {
		case <-t.C:
			n.peerH.Store(nil)
			n.tr.Stop()
		case <-n.stopc:
		}
	}()
}

// storageFailed ends the loop's service: the store refused a write, so
// Raft's state and the disk may disagree, and the member stops rather than
// guess.
func (n *Node) storageFailed(err error) {
	n.lg.Error("raftkv loop stopped by a storage failure; the member no longer serves (caddy reload --force, or a restart of Caddy, starts it again)", zap.Error(err))
	n.running.Store(false)
}

// flushStore commits a deferred apply. A failure leaves the applied
// entries to be applied again at the next start; the store refuses reads
// and writes from then on, and the loop stops (flushErr).
func (n *Node) flushStore() {
	if err := n.store.Flush(); err != nil && n.loop.flushErr == nil {
		n.loop.flushErr = err
	}
}

// removedBy starts the end of a member the cluster removed: it refuses
// requests at once, and its loop runs for linger more, then ends. A member
// that applied its removal lingers an election timeout, so that the
// commit of its own removal (when it led) reaches the others; etcd stops
// such a member after a similar delay. A peer's 410 ends it at once: that
// peer has applied the removal, and the member has nothing left to tell
// (a client waiting on its own removal then hears that it is done). The
// messages it queued last still go: the transport runs until Stop.
func (n *Node) removedBy(why string, linger time.Duration) {
	if !n.loop.stopAt.IsZero() {
		if linger == 0 {
			n.loop.stopAt = time.Now()
		}
		return
	}
	n.loop.removedSelf = true
	n.gone.Store(true)
	n.running.Store(false)
	n.store.EndWatches() // now, not when the loop ends: it may linger
	n.loop.stopAt = time.Now().Add(linger)
	n.lg.Warn("this member was removed from the cluster", zap.String("member-id", idString(n.id)), zap.String("how", why))
}

// peerSaysRemoved is the transport's Removed hook.
func (n *Node) peerSaysRemoved() {
	select {
	case n.selfc <- struct{}{}:
	default:
	}
}

// drain takes every event already waiting, without blocking. It reports
// false when the node is stopping.
func (n *Node) drain(tick <-chan time.Time) bool {
	for range maxDrain {
		// Proposals are most of the traffic under load, and a receive on
		// one channel costs a fraction of a select that locks them all.
		select {
		case p := <-n.propc:
			n.propose(p)
			continue
		default:
		}
		select {
		case p := <-n.propc:
			n.propose(p)
		case <-n.store.FlushRequests():
			n.flushStore()
		case <-n.readc:
			n.startRead()
		case m := <-n.recvc:
			n.step(m)
		case r := <-n.reportc:
			n.applyReport(r)
		case f := <-n.ctrlc:
			f()
		case <-n.selfc:
			n.removedBy("a peer answered 410 Gone", 0)
		case <-tick:
			n.tick()
		case <-n.stopc:
			return false
		default:
			return true
		}
	}
	return true
}

// handleReady handles one Ready, in the order Raft requires.
func (n *Node) handleReady() error {
	rd := n.rn.Ready()
	if len(n.loop.steppedSnaps) > 0 {
		n.dropUntakenSnapshots(string(rd.Snapshot.GetData()))
	}
	if rd.SoftState != nil {
		n.softStateChanged(rd.SoftState)
	}
	n.trackConf(rd.Entries)

	// Apply committed conf changes to Raft first, so that the conf state
	// they produce is saved in the same transaction as their applied index.
	cs, membersChanged, err := n.applyConfChanges(rd.CommittedEntries)
	if err != nil {
		return err
	}
	// Before this Ready sends anything: a voter just added hears from this
	// member only after quorum reads can tell it is no longer alone, and
	// the commit index they compare with covers what it sends.
	n.updateSole(false)
	if hs := rd.HardState; hs != nil {
		n.commitSeen.Store(max(n.commitSeen.Load(), hs.GetCommit()))
	}

	// Save: entries, hard state, a received snapshot and the application of
	// committed entries, in one bbolt transaction — one commit per Ready,
	// however many proposals it carries. It precedes every send: a
	// follower's MsgAppResp or vote must describe durable state.
	var snap *raftpb.Snapshot
	var snapMembers []memberRecord
	var snapRemoved map[uint64]bool
	if !raft.IsEmptySnap(rd.Snapshot) {
		snap = rd.Snapshot
		// A follower never sees the conf changes below the snapshot: the
		// member list comes from the leader's file, read before Save
		// installs it with this member's own values.
		fileApplied, meta, err := storage.SnapshotMeta(string(snap.GetData()), metaMembers, metaRemoved, metaVerdicts, metaConfIndex)
		if err != nil {
			return err
		}
		snapMembers, snapRemoved, err = decodeSnapshotMembers(meta[0], meta[1])
		if err != nil {
			return err
		}
		// A file behind what this member applied leaves its state, the
		// member list with it, as it is (storage keeps it too).
		if snapMembers != nil && fileApplied >= n.loop.applied {
			n.replaceMembers(snapMembers, snapRemoved)
			// The file's list and conf index were saved together (a file
			// without one, or with one of another list, leaves it unknown).
			n.confIndex.Store(decodeConfIndex(meta[3], meta[0]))
			membersChanged = true
		}
		if err := n.mergeSnapshotVerdicts(meta[2]); err != nil {
			return err
		}
	}
	if len(n.loop.farewells) > 0 && !n.termAndVoteSaved(rd.HardState) {
		// A heartbeat claims nothing of this member's log, only its term,
		// which must be durable: without it, no farewell.
		clear(n.loop.farewells)
	}
	if membersChanged {
		// Before Save: the list may then be ahead of the applied index, by
		// committed changes whose replay is harmless; never behind it, so
		// that a snapshot copy of this file always carries a member list
		// that covers its applied index.
		if err := n.saveMembers(); err != nil {
			return err
		}
		n.syncPeers()
	}
	hs, committed := rd.HardState, rd.CommittedEntries
	if n.soleVoterLeader() {
		hs, committed = n.commitOnAppend(rd)
	}
	// A leader sends before it saves (Raft thesis §10.2.1; etcd does the
	// same): the followers write the new entries while the leader does,
	// and Raft counts the leader's own copy only at Advance, once it is
	// durable. Not when its term or vote is new in this Ready: a message
	// of a term the leader could forget in a crash would let it vote again
	// in that term. A follower's replies must describe durable state, so
	// it sends after Save, except what it forwards to the leader (a
	// proposal, a read index request), which claims nothing about its own
	// state: the forward then overlaps the Save instead of waiting for it.
	// A leader's snapshot goes after Save too: it is relabelled with what
	// this Ready applies.
	msgs := rd.Messages
	if len(msgs) > 0 {
		if n.loop.lead == n.id {
			if n.termAndVoteSaved(rd.HardState) {
				msgs = n.sendEarly(msgs, notSnapshot)
			}
		} else {
			msgs = n.sendEarly(msgs, isForward)
		}
	}
	if n.loop.beforeSave != nil {
		n.loop.beforeSave()
	}
	var applied []storage.Applied
	var installStart time.Time // for the install's log line
	if snap != nil {
		installStart = time.Now()
	}
	if n.needSave(hs, rd.Entries, snap, committed, cs) {
		applied, err = n.store.Save(storage.Ready{
			HardState: hs,
			Entries:   rd.Entries,
			Snapshot:  snap,
			Committed: committed,
			ConfState: cs,
			// Applying alone may wait for the next Save's commit: the log
			// holds the entries, and Raft needs only a new term or vote
			// durable before it sends.
			Defer: n.termAndVoteSaved(hs),
		})
		if err != nil {
			return err
		}
		n.saves.Add(1)
		if hs != nil {
			n.loop.hardState = hs
			n.term.Store(hs.GetTerm())
			n.committed.Store(hs.GetCommit())
		}
		if k := len(committed); k > 0 {
			n.loop.applied = max(n.loop.applied, committed[k-1].GetIndex())
		}
	}

	// Raft reads its log back from MemoryStorage: it must hold what was
	// just saved before Advance.
	if snap != nil {
		if err := n.ms.ApplySnapshot(snap); err != nil {
			return err
		}
		n.loop.snapIndex = snap.GetMetadata().GetIndex()
		n.loop.confState = snap.GetMetadata().GetConfState()
		// The leader's file may be ahead of the snapshot index: the store's
		// applied index is the truth; Raft's is the snapshot's, and the
		// entries in between come again, for conf changes only.
		n.loop.applied = max(n.store.AppliedIndex(), n.loop.snapIndex)
		n.loop.raftApplied = max(n.loop.raftApplied, n.loop.snapIndex)
		n.installs.Add(1)
		n.lg.Info("snapshot installed",
			zap.Uint64("index", n.loop.snapIndex),
			zap.Uint64("term", snap.GetMetadata().GetTerm()),
			zap.Uint64("applied-index", n.loop.applied),
			zap.Duration("took", time.Since(installStart)))
		if n.isRemoved(n.id) {
			n.loop.removedSelf = true
		}
	}
	if err := n.ms.Append(rd.Entries); err != nil {
		return err
	}
	if rd.HardState != nil {
		if err := n.ms.SetHardState(rd.HardState); err != nil {
			return err
		}
	}
	if k := len(rd.CommittedEntries); k > 0 {
		n.loop.raftApplied = rd.CommittedEntries[k-1].GetIndex()
	}

	// Send: everything the messages speak of is durable now. A snapshot
	// is labelled with the applied index, so the file must hold it.
	if hasSnapshot(msgs) {
		if err := n.store.Flush(); err != nil {
			return err
		}
	}
	n.send(msgs)
	if to := n.loop.handoff; to != 0 {
		n.loop.handoff = 0
		n.handOver(to)
	}

	// Signal: waiting proposers, then quorum reads whose index is applied.
	n.applied.Store(n.loop.applied)
	n.w.trigger(applied)
	if len(n.loop.confApplied) > 0 {
		n.w.finish(n.loop.confApplied)
		clear(n.loop.confApplied)
		n.loop.confApplied = n.loop.confApplied[:0]
	}
	n.reapApplied(applied)
	n.readStates(rd.ReadStates)

	if err := n.maybeSnapshot(); err != nil {
		return err
	}
	n.maybeDropMappedPages()

	// Advance: Raft may now hand out the next Ready (for a leader, the
	// commit of what was just saved).
	n.rn.Advance(rd)

	if at := n.loop.campaignAt; at > 0 && n.loop.raftApplied >= at {
		// The conf changes that leave a single voter are applied (a fresh
		// member's bootstrap, a forced member's removals): it elects itself
		// now instead of after an election timeout.
		n.loop.campaignAt = 0
		if err := n.rn.Campaign(); err != nil {
			n.lg.Warn("campaign failed", zap.Error(err))
		}
	}
	if len(applied) > 0 {
		// New keys may carry an earlier expiration; due ones may be gone.
		n.reapCheck(time.Now())
	}
	n.updateSole(true)
	return nil
}

// updateSole publishes, for quorum reads (Node.Get), whether this member
// leads as the only voter: Node.sole is odd while it does. Mid-Ready
// (before anything is sent) it only turns the path off; at the end of a
// Ready it may turn it on, once this leader has applied the first entry of
// its term: entries a previous configuration committed are then applied.
func (n *Node) updateSole(endOfReady bool) {
	on := n.sole.Load()%2 == 1
	want := n.soleVoterLeader()
	if !endOfReady {
		want = want && on
	} else {
		want = want && n.loop.termStart != 0 && n.loop.applied >= n.loop.termStart
	}
	if want != on {
		n.sole.Add(1)
	}
}

// soleVoterLeader reports whether this member leads a cluster in which it
// is the only voter.
func (n *Node) soleVoterLeader() bool {
	cs := n.loop.confState
	return n.loop.lead == n.id &&
		len(cs.GetVoters()) == 1 && cs.GetVoters()[0] == n.id && len(cs.GetVotersOutgoing()) == 0
}

// commitOnAppend is the sole voter's fast path. Its own durable append is a
// quorum, so the entries of this Ready are committed the moment they are
// saved: they are applied in the same transaction, with a hard state whose
// commit index covers them, instead of in a second transaction after Raft
// has counted its own acknowledgement on Advance. A serial write then costs
// one bbolt commit, not two. Raft later hands the same entries out as
// committed; the store skips them (they are at or below its applied index)
// and needSave spares that Ready its commit.
//
// Only plain entries that directly follow what is applied qualify: conf
// changes must reach Raft's ApplyConfChange in Raft's own order.
func (n *Node) commitOnAppend(rd raft.Ready) (*raftpb.HardState, []*raftpb.Entry) {
	hs, committed := rd.HardState, rd.CommittedEntries
	if len(rd.Entries) == 0 {
		return hs, committed
	}
	last := n.loop.applied
	if k := len(committed); k > 0 {
		last = max(last, committed[k-1].GetIndex())
	}
	if rd.Entries[0].GetIndex() != last+1 {
		return hs, committed
	}
	for _, e := range rd.Entries {
		if e.GetType() != raftpb.EntryNormal {
			return hs, committed
		}
	}
	base := hs
	if base == nil {
		base = n.loop.hardState
	}
	lastIndex := rd.Entries[len(rd.Entries)-1].GetIndex()
	hs = &raftpb.HardState{
		Term:   new(base.GetTerm()),
		Vote:   new(base.GetVote()),
		Commit: new(max(base.GetCommit(), lastIndex)),
	}
	// A scratch slice of the loop's: rd.CommittedEntries belongs to Raft.
	n.loop.scratch = append(append(n.loop.scratch[:0], committed...), rd.Entries...)
	return hs, n.loop.scratch
}

// needSave reports whether a Ready holds anything the store lacks. A Ready
// whose entries the fast path already applied, and whose hard state only
// moves the commit index up to what is saved, needs no commit (Raft itself
// does not require a commit-index change to be durable: raft.MustSync).
func (n *Node) needSave(hs *raftpb.HardState, ents []*raftpb.Entry, snap *raftpb.Snapshot, committed []*raftpb.Entry, cs *raftpb.ConfState) bool {
	if len(ents) > 0 || snap != nil || cs != nil {
		return true
	}
	if k := len(committed); k > 0 && committed[k-1].GetIndex() > n.loop.applied {
		return true
	}
	if hs == nil {
		return false
	}
	saved := n.loop.hardState
	return hs.GetTerm() != saved.GetTerm() || hs.GetVote() != saved.GetVote() || hs.GetCommit() > saved.GetCommit()
}

// softStateChanged publishes a change of leader or role.
func (n *Node) softStateChanged(ss *raft.SoftState) {
	if ss.Lead != n.loop.lead {
		prev := n.loop.lead
		n.loop.lead = ss.Lead
		n.leader.Store(ss.Lead)
		n.leaderSince.Store(time.Now().UnixNano())
		if ss.Lead != 0 {
			n.leaderNews.Add(1)
		}
		if ss.Lead == 0 {
			n.lg.Info("leader lost", zap.String("member-id", idString(n.id)), zap.String("previous-leader", idString(prev)))
		} else {
			n.lg.Info("leader changed",
				zap.String("member-id", idString(n.id)),
				zap.String("leader", idString(ss.Lead)),
				zap.String("previous-leader", idString(prev)),
				zap.Uint64("term", n.rn.BasicStatus().GetTerm()))
		}
		n.leaderChanged.notify()
		n.retryReadOnLeaderChange()
		if ss.Lead == n.id {
			n.loop.confPending = confElected
		}
	}
	n.setReaperLeader(ss.RaftState == raft.StateLeader)
}

// propose queues one attempt for the next flushProposals; a conf change
// goes to Raft at once.
func (n *Node) propose(p proposal) {
	if p.cc != nil {
		n.proposeConf(heldConf{p: p})
		return
	}
	n.loop.batch = append(n.loop.batch, p)
}

// Raft keeps one conf change pending at a time: a leader turns a conf
// change proposed while another sits unapplied in its log (or before it
// has applied what its log held when it was elected) into an empty entry,
// and tells nobody, so the proposer would wait out two election timeouts
// before trying again. The leader holds such a change instead, and
// proposes it as soon as Raft would take it: changes from this member's
// clients and those followers forward alike, in the order they came.

// heldConf is a conf change waiting on the leader: this member's proposal
// (p), or a follower's forwarded MsgProp (m).
type heldConf struct {
	p proposal
	m *raftpb.Message
}

// maxConfHeld bounds the conf changes a leader holds; beyond it they are
// dropped (their proposers try again).
const maxConfHeld = 1024

// Values of loopState.confPending that stand for an index not known yet.
const (
	confElected  = math.MaxUint64     // elected in this Ready: Raft took its last index
	confProposed = math.MaxUint64 - 1 // a conf change was stepped: its index comes in the next Ready
)

// confBusy reports whether Raft would turn a conf change proposed now into
// an empty entry, or drop it because leadership is being handed over (the
// held changes then go to the new leader).
func (n *Node) confBusy() bool {
	st := n.rn.BasicStatus()
	if st.RaftState != raft.StateLeader {
		return false
	}
	if n.loop.lead != n.id {
		// Elected while the loop took in messages or at Advance: the Ready
		// that reports it (and trackConf's confElected) has not come yet.
		return true
	}
	return n.loop.confPending > n.loop.raftApplied || st.LeadTransferee != 0
}

// raftLeads reports whether Raft leads now; loop.lead learns it only at the
// next Ready.
func (n *Node) raftLeads() bool {
	return n.rn.BasicStatus().RaftState == raft.StateLeader
}

// proposeConf steps a conf change, or holds it while the leader is busy
// with another (and behind those held before it).
func (n *Node) proposeConf(h heldConf) {
	if n.raftLeads() && (n.confBusy() || len(n.loop.confHeld) > 0) {
		if h.m == nil && slices.ContainsFunc(n.loop.confHeld, func(o heldConf) bool {
			return o.m == nil && o.p.cc.GetId() == h.p.cc.GetId()
		}) {
			return // its proposer tried again: the attempt held answers it
		}
		if len(n.loop.confHeld) < maxConfHeld {
			n.loop.confHeld = append(n.loop.confHeld, h)
			return
		}
		n.lg.Warn("too many conf changes waiting; dropping one", zap.Int("waiting", len(n.loop.confHeld)))
		n.dropConf(h, errors.New("too many conf changes waiting"))
		return
	}
	n.stepConf(h)
}

// stepConf hands a conf change to Raft; a leader judges it first (see
// judgeConf).
func (n *Node) stepConf(h heldConf) {
	leads := n.raftLeads()
	if leads {
		var ok bool
		if h, ok = n.judged(h); !ok {
			n.dropConf(h, errors.New("undecodable conf change"))
			return
		}
	}
	var err error
	if h.m != nil {
		err = n.rn.Step(h.m)
	} else {
		err = n.rn.ProposeConfChange(h.p.cc)
	}
	if err != nil {
		n.dropConf(h, err)
		return
	}
	if leads {
		n.loop.confPending = confProposed
	}
}

// dropConf gives up a conf change; its proposer, if local, retries.
func (n *Node) dropConf(h heldConf, err error) {
	n.lg.Debug("conf change dropped", zap.Error(err))
	if h.m == nil {
		n.drops.Add(1)
		signalDropped(h.p.c)
	}
}

// releaseConf proposes the first held conf change once Raft would take it.
// A member that no longer leads hands them all to Raft at once, which
// forwards them to the new leader or drops them (their proposers retry).
func (n *Node) releaseConf() {
	for len(n.loop.confHeld) > 0 && !n.confBusy() {
		h := n.loop.confHeld[0]
		n.loop.confHeld[0] = heldConf{}
		n.loop.confHeld = n.loop.confHeld[1:]
		n.stepConf(h)
	}
	if len(n.loop.confHeld) == 0 {
		n.loop.confHeld = nil
	}
}

// trackConf follows, on the leader, the index Raft checks conf changes
// against (its pendingConfIndex): its last index when elected, then the
// index of each conf change it appends. ents are the Ready's new entries.
func (n *Node) trackConf(ents []*raftpb.Entry) {
	if n.loop.lead != n.id {
		n.loop.confPending, n.loop.termStart = 0, 0
		return
	}
	switch n.loop.confPending {
	case confElected:
		// At or past Raft's: the leader's own empty entry comes after it.
		if k := len(ents); k > 0 {
			n.loop.confPending = ents[k-1].GetIndex()
		} else if last, err := n.ms.LastIndex(); err == nil {
			n.loop.confPending = last
		}
		n.loop.termStart = n.loop.confPending
	case confProposed:
		// Its entry is below, unless Raft refused it after all.
		n.loop.confPending = 0
	}
	for _, e := range ents {
		if isConfEntry(e) {
			n.loop.confPending = max(n.loop.confPending, e.GetIndex())
		}
	}
}

// flushProposals hands every queued attempt to Raft in one MsgProp: one
// step, and for a leader one MsgApp per follower, for the whole batch. A
// refusal goes back to each waiter, which retries after a leader appears or
// a short backoff.
func (n *Node) flushProposals() {
	batch := n.loop.batch
	if len(batch) == 0 {
		return
	}
	// New Entries per attempt (a follower forwards them as they are), in
	// one allocation for the batch.
	ents := make([]*raftpb.Entry, len(batch))
	backing := make([]raftpb.Entry, len(batch))
	for i, p := range batch {
		backing[i].Data = p.data
		ents[i] = &backing[i]
	}
	err := n.rn.Step(&raftpb.Message{Type: raftpb.MsgProp.Enum(), From: new(n.id), Entries: ents})
	if err != nil {
		n.lg.Debug("proposals dropped", zap.Error(err), zap.Int("count", len(batch)))
		n.drops.Add(uint64(len(batch)))
		for _, p := range batch {
			signalDropped(p.c)
		}
	}
	clear(batch)
	n.loop.batch = batch[:0]
}

// ticksPerHeartbeat divides a heartbeat interval into Raft ticks. Raft
// draws a follower's election timeout in whole ticks, from one to two
// election timeouts: at one tick per heartbeat that is ten values (by
// default), and two followers whose tickers started together (members
// started at once) draw the same one a tenth of the time, campaign in the
// same millisecond and split the vote, which costs another election
// timeout. A hundred values make that rare.
const ticksPerHeartbeat = 10

// electionTicks is the election timeout in Raft ticks.
func (c Config) electionTicks() int {
	return int(c.ElectionTimeout/c.HeartbeatInterval) * ticksPerHeartbeat
}

// maxTickCatchUp is the most ticks one ticker event counts for: a
// heartbeat interval's worth.
const maxTickCatchUp = ticksPerHeartbeat

// tick advances Raft's clock by the tick periods that have passed since the
// last one counted. A time.Ticker keeps one tick and drops the rest while
// the loop is busy (a Save's syncs on a loaded disk) or waits for a CPU, and
// every tick dropped would stretch election timeouts and heartbeats in wall
// time: a follower whose loop spent a tenth of its time in Saves would wait
// a tenth longer for a dead leader, past two election timeouts for the
// longest timeouts Raft draws. Up to maxTickCatchUp are made up at once: a
// longer stall is not (a leader's CheckQuorum must not count a stall of its
// own against followers whose answers wait in its queue).
func (n *Node) tick() {
	now := time.Now()
	for range n.loop.ticksDue(now, n.cfg.HeartbeatInterval/ticksPerHeartbeat) {
		n.rn.Tick()
		n.loop.ticks++
		if n.loop.ticks%n.cfg.electionTicks() == 0 {
			n.retryEpoch.notify()
		}
	}
	n.retryReadIfLate(now)
	if n.loop.afterTick != nil {
		n.loop.afterTick()
	}
}

// ticksDue is how many ticks of period a ticker event at now stands for:
// the whole periods since the last tick counted was due, at least one (the
// event itself), at most maxTickCatchUp. After a longer stall counting
// starts again from now.
func (l *loopState) ticksDue(now time.Time, period time.Duration) int {
	if l.tickAt.IsZero() {
		l.tickAt = now
		return 1
	}
	k := min(max(int(now.Sub(l.tickAt)/period), 1), maxTickCatchUp)
	l.tickAt = l.tickAt.Add(time.Duration(k) * period)
	if now.Sub(l.tickAt) >= period {
		l.tickAt = now
	}
	return k
}

// step hands Raft a message from a peer.
func (n *Node) step(m *raftpb.Message) {
	switch m.GetType() {
	case raftpb.MsgApp:
		n.recvAppends.Add(1)
	case raftpb.MsgProp:
		if slices.ContainsFunc(m.GetEntries(), isConfEntry) && n.raftLeads() {
			n.proposeConf(heldConf{m: m})
			return
		}
	case raftpb.MsgTimeoutNow:
		n.loop.timeoutNow = &waitingTimeoutNow{m: m,
			until: time.Now().Add(n.cfg.ElectionTimeout), commit: n.rn.BasicStatus().GetCommit()}
		n.stepTimeoutNow()
		return
	case raftpb.MsgSnap:
		// Raft ignores a snapshot at or below its commit index (another
		// copy of one it installed, say) or of an older term: its file
		// goes now, not at the next local snapshot. Only its own: a file
		// Raft took may still wait for its Ready. What else Raft ignores
		// goes at the next Ready (dropUntakenSnapshots).
		st := n.rn.BasicStatus()
		n.stepRaft(m)
		if m.GetSnapshot().GetMetadata().GetIndex() <= st.GetCommit() || m.GetTerm() < st.GetTerm() {
			n.dropSnapshotFile(m)
		} else {
			n.loop.steppedSnaps = append(n.loop.steppedSnaps, string(m.GetSnapshot().GetData()))
		}
		return
	}
	n.stepRaft(m)
}

// dropPendingSnapshots removes, as the loop ends, the files of snapshots it
// stepped whose Ready never came and of those still queued for it.
func (n *Node) dropPendingSnapshots() {
	n.dropUntakenSnapshots("")
	for {
		select {
		case m := <-n.recvc:
			if m.GetType() == raftpb.MsgSnap {
				n.dropSnapshotFile(m)
			}
		default:
			return
		}
	}
}

// dropSnapshotFile removes the received file of MsgSnap m.
func (n *Node) dropSnapshotFile(m *raftpb.Message) {
	n.store.DropReceivedSnapshot(string(m.GetSnapshot().GetData()))
}

// dropUntakenSnapshots removes the files of the snapshots stepped since the
// last Ready that Raft did not take; taken names the file of the one the
// Ready holds ("" for none). Raft also ignores a snapshot whose last entry
// its log holds (it only moves its commit index), one whose conf state
// leaves this member out, and one that a later snapshot replaced before
// its Ready: their files would otherwise stay until the next local
// snapshot.
func (n *Node) dropUntakenSnapshots(taken string) {
	for _, p := range n.loop.steppedSnaps {
		if p != taken {
			n.store.DropReceivedSnapshot(p)
		}
	}
	clear(n.loop.steppedSnaps)
	n.loop.steppedSnaps = n.loop.steppedSnaps[:0]
}

func (n *Node) stepRaft(m *raftpb.Message) {
	if err := n.rn.Step(m); err != nil {
		n.lg.Debug("peer message refused", zap.Error(err), zap.Stringer("type", m.GetType()), zap.String("from", idString(m.GetFrom())))
	}
}

// waitingTimeoutNow is a MsgTimeoutNow held until this member has applied
// commit, the commit index when it arrived, and dropped after until.
type waitingTimeoutNow struct {
	m      *raftpb.Message
	until  time.Time
	commit uint64
}

// stepTimeoutNow hands Raft a MsgTimeoutNow once this member has applied
// what was committed when it arrived: Raft refuses to campaign while a
// committed conf change is unapplied, and the message that asks a member
// to lead often arrives right after the commit of a conf change (a removed
// leader's handOver follows the commit of its own removal). One that waits
// longer than an election timeout is dropped: it would only disrupt
// whatever leader the cluster has by then.
func (n *Node) stepTimeoutNow() {
	w := n.loop.timeoutNow
	if w == nil {
		return
	}
	if time.Now().After(w.until) {
		n.loop.timeoutNow = nil
		return
	}
	if n.rn.BasicStatus().Applied < w.commit {
		return
	}
	n.loop.timeoutNow = nil
	n.stepRaft(w.m)
}

// send hands durable-backed messages to the transport.
func (n *Node) send(msgs []*raftpb.Message) {
	if len(msgs) == 0 {
		return
	}
	for i, m := range msgs {
		switch m.GetType() {
		case raftpb.MsgApp:
			n.sendAppends.Add(1)
		case raftpb.MsgSnap:
			msgs[i] = n.currentSnapshot(m)
		}
	}
	if n.tr == nil {
		// No peers: a single voter addresses nobody else.
		return
	}
	n.tr.Send(msgs)
}

// termAndVoteSaved reports whether hs (nil: unchanged) has the term and
// vote of the last hard state saved: only its commit index may be new.
func (n *Node) termAndVoteSaved(hs *raftpb.HardState) bool {
	last := n.loop.hardState
	if hs == nil {
		return last != nil
	}
	return last != nil && hs.GetTerm() == last.GetTerm() && hs.GetVote() == last.GetVote()
}

func hasSnapshot(msgs []*raftpb.Message) bool {
	for _, m := range msgs {
		if m.GetType() == raftpb.MsgSnap {
			return true
		}
	}
	return false
}

// sendEarly sends the messages early picks, and returns the others for
// after Save.
func (n *Node) sendEarly(msgs []*raftpb.Message, early func(*raftpb.Message) bool) []*raftpb.Message {
	k := 0
	for _, m := range msgs {
		if early(m) {
			k++
		}
	}
	switch k {
	case 0:
		return msgs
	case len(msgs):
		n.send(msgs)
		return nil
	}
	now := make([]*raftpb.Message, 0, k)
	var later []*raftpb.Message
	for _, m := range msgs {
		if early(m) {
			now = append(now, m)
		} else {
			later = append(later, m)
		}
	}
	n.send(now)
	return later
}

func isConfEntry(e *raftpb.Entry) bool {
	t := e.GetType()
	return t == raftpb.EntryConfChange || t == raftpb.EntryConfChangeV2
}

func notSnapshot(m *raftpb.Message) bool { return m.GetType() != raftpb.MsgSnap }

// isForward reports whether m is a request a follower passes on to the
// leader.
func isForward(m *raftpb.Message) bool {
	t := m.GetType()
	return t == raftpb.MsgProp || t == raftpb.MsgReadIndex
}

// currentSnapshot re-labels an outgoing snapshot with this member's current
// applied position and conf state. The file the transport streams is the
// store as it is when sent, at or past that position; the snapshot Raft
// picked may be older, and its conf state may lack members added since
// (a new member would then refuse it as "not in the ConfState"). etcd sends
// such a merged snapshot at its applied index for the same reasons
// (createMergedSnapshotMessage).
func (n *Node) currentSnapshot(m *raftpb.Message) *raftpb.Message {
	idx := n.loop.raftApplied
	if idx > n.loop.applied || idx <= m.GetSnapshot().GetMetadata().GetIndex() {
		return m
	}
	term, err := n.ms.Term(idx)
	if err != nil {
		return m
	}
	mm := proto.Clone(m).(*raftpb.Message)
	mm.Snapshot.Metadata = &raftpb.SnapshotMetadata{
		Index:     new(idx),
		Term:      new(term),
		ConfState: proto.Clone(raftpb.EnsureConfState(n.loop.confState)).(*raftpb.ConfState),
	}
	return mm
}

// receive delivers a message from a peer to the loop; the transport calls
// it. A full queue drops the message, as a lossy network would: Raft
// retransmits. A snapshot waits for room instead (a while, not forever):
// its file is already received, and dropping it would cost a whole new
// transfer.
func (n *Node) receive(m *raftpb.Message) {
	if m.GetType() != raftpb.MsgSnap {
		select {
		case n.recvc <- m:
		default:
		}
		return
	}
	// A snapshot the loop will not take has its file removed.
	if !isClosed(n.donec) {
		t := time.NewTimer(snapDeliverTimeout)
		defer t.Stop()
		select {
		case n.recvc <- m:
			return
		case <-n.stopc:
		case <-n.donec:
		case <-t.C:
			n.lg.Warn("received snapshot dropped: the loop is not taking messages", zap.String("from", idString(m.GetFrom())))
		}
	}
	n.dropSnapshotFile(m)
}

// snapDeliverTimeout bounds how long a received snapshot waits for room in
// the loop's queue.
const snapDeliverTimeout = 5 * time.Second

// decodeSnapshotMembers decodes the member list and removed IDs a received
// snapshot file holds; nil members when the file has none.
func decodeSnapshotMembers(b, rb []byte) ([]memberRecord, map[uint64]bool, error) {
	if b == nil {
		return nil, nil, nil
	}
	members, err := decodeMembers(b)
	if err != nil {
		return nil, nil, err
	}
	removed, err := decodeIDs(rb)
	if err != nil {
		return nil, nil, err
	}
	return members, removed, nil
}

// mergeSnapshotVerdicts adds the verdicts a received snapshot file holds
// (b, encoded) to this member's, so that as leader it still recognizes a
// late copy of a change it never applied itself (see judgeConf).
func (n *Node) mergeSnapshotVerdicts(b []byte) error {
	v, err := decodeConfVerdicts(b)
	if err != nil {
		return err
	}
	for _, id := range v.order {
		n.loop.verdicts.add(id, v.m[id])
	}
	return nil
}

// reportUnreachable tells Raft a peer could not be reached, so it stops
// pipelining to it until it answers again.
func (n *Node) reportUnreachable(to uint64) {
	select {
	case n.reportc <- report{to: to, unreachable: true}:
	default:
	}
}

// reportSnapshot tells Raft how sending a snapshot to a peer ended. It is
// never dropped: Raft leaves a follower's snapshot state only on it (or an
// append answer, which a follower waiting for a snapshot never sends), and
// without it the follower would get nothing more from this leader. It
// never blocks either: the loop itself reports a snapshot it could not
// queue. When reportc is full, the report waits in snapReports, which the
// loop takes every turn (a tick at the latest).
func (n *Node) reportSnapshot(to uint64, status raft.SnapshotStatus) {
	r := report{to: to, snapshot: status}
	select {
	case n.reportc <- r:
	default:
		n.snapReportsMu.Lock()
		n.snapReports = append(n.snapReports, r)
		n.snapReported.Store(true)
		n.snapReportsMu.Unlock()
	}
}

// takeSnapshotReports hands Raft the snapshot outcomes reportc had no room
// for.
func (n *Node) takeSnapshotReports() {
	n.snapReportsMu.Lock()
	rs := n.snapReports
	n.snapReports = nil
	n.snapReported.Store(false)
	n.snapReportsMu.Unlock()
	for _, r := range rs {
		n.applyReport(r)
	}
}

func (n *Node) applyReport(r report) {
	if r.unreachable {
		n.rn.ReportUnreachable(r.to)
	}
	if r.snapshot != 0 {
		n.rn.ReportSnapshot(r.to, r.snapshot)
	}
}
