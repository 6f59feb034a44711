package raftkv

import (
	"encoding/binary"
	"hash/fnv"
	"sync"
	"sync/atomic"

	"github.com/etcaddy/etcaddy/storage"
	"go.etcd.io/raft/v3/raftpb"
)

// result is what the loop tells a waiting Do: either the outcome of the
// entry that carried its request ID, or that Raft dropped one attempt.
type result struct {
	applied storage.Applied
	err     error // a conf change the leader refused
	dropped bool
}

// proposal is one attempt to get a request into the log. Do sends the same
// data (the same request ID) on every attempt, so the store applies it once
// however many attempts reach the log.
type proposal struct {
	data []byte
	cc   *raftpb.ConfChange // a membership change instead of data
	c    chan result        // the waiter's channel; nil for proposals nobody awaits
}

// newWaitChan makes a waiter's channel. The loop is its only sender and
// sends at most one drop signal that has not been received (it checks
// len == 0 first) plus one result, so a capacity of 2 means the loop never
// blocks on a caller that has already given up.
func newWaitChan() chan result { return make(chan result, 2) }

// waitChans recycles the channels of requests answered at their first
// attempt; see submit for when the loop is known to hold none of them.
var waitChans = sync.Pool{New: func() any { return newWaitChan() }}

// signalDropped tells a waiter that Raft refused this attempt. Called only
// by the loop.
func signalDropped(c chan result) {
	if c != nil && len(c) == 0 {
		c <- result{dropped: true}
	}
}

// waiters maps request IDs to the channels of the Do calls waiting for them.
// A waiter stays registered across retries until the first Applied with its
// ID arrives — the original application; a later Duplicate of the same ID
// finds nobody and is ignored — or until its caller gives up.
type waiters struct {
	mu sync.Mutex
	m  map[uint64]chan result
}

func (w *waiters) register(id uint64, c chan result) {
	w.mu.Lock()
	if w.m == nil {
		w.m = make(map[uint64]chan result)
	}
	w.m[id] = c
	w.mu.Unlock()
}

// cancel unregisters id; the caller no longer listens.
func (w *waiters) cancel(id uint64) {
	w.mu.Lock()
	delete(w.m, id)
	w.mu.Unlock()
}

// trigger hands each applied outcome to its waiter, under one lock for the
// whole apply batch.
func (w *waiters) trigger(applied []storage.Applied) {
	w.mu.Lock()
	for i := range applied {
		w.handLocked(result{applied: applied[i]})
	}
	w.mu.Unlock()
}

// finish hands whole results (conf changes, which may carry a refusal) to
// their waiters.
func (w *waiters) finish(results []result) {
	w.mu.Lock()
	for _, r := range results {
		w.handLocked(r)
	}
	w.mu.Unlock()
}

// handLocked hands r to the waiter of its request ID, if any.
func (w *waiters) handLocked(r result) {
	id := r.applied.ID
	if id == 0 {
		return
	}
	if c, ok := w.m[id]; ok {
		delete(w.m, id)
		c <- r
	}
}

func (w *waiters) len() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.m)
}

// idGen hands out request IDs: 32 bits that name this boot of this member,
// then a 32-bit counter. The boot's bits hash the whole member ID with its
// boot generation (kept in the store, bumped on every Start), so two members
// collide only with probability 2^-32, where the member ID's low 16 bits
// alone (etcd's idutil prefix) collide once in 65,536 pairs; a collision
// would make the store drop one member's write as the other's retry.
// IDs are unique for 2^32 requests per boot, far beyond the window in which
// a retry can reach the log.
type idGen struct {
	base uint64
	next atomic.Uint64
}

func newIDGen(member uint64, generation uint64) *idGen {
	h := fnv.New64a()
	var b [16]byte
	binary.BigEndian.PutUint64(b[:8], member)
	binary.BigEndian.PutUint64(b[8:], generation)
	h.Write(b[:])
	sum := h.Sum64()
	return &idGen{base: (sum ^ sum<<32) &^ 0xffffffff}
}

func (g *idGen) id() uint64 {
	for {
		id := g.base | g.next.Add(1)&0xffffffff
		if id != 0 { // 0 means "nobody waits"
			return id
		}
	}
}

// broadcast wakes every goroutine waiting on the current channel at once,
// then starts a new one: "the leader changed", "an election timeout
// passed".
type broadcast struct {
	mu sync.Mutex
	c  chan struct{}
}

func (b *broadcast) wait() <-chan struct{} {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.c == nil {
		b.c = make(chan struct{})
	}
	return b.c
}

func (b *broadcast) notify() {
	b.mu.Lock()
	if b.c != nil {
		close(b.c)
		b.c = nil
	}
	b.mu.Unlock()
}
