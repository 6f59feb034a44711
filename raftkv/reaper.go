package raftkv

import (
	"time"

	"github.com/etcaddy/etcaddy/storage"
	"go.uber.org/zap"
)

// reapInterval is the shortest time between two SYNC proposals. Keys then
// outlive their TTL by at most this plus one commit, well under etcd's own
// 500 ms SYNC ticker.
const reapInterval = 100 * time.Millisecond

// reaper is the leader's TTL expiry, run by the loop: time enters the state
// only through SYNC entries carrying the leader's clock, so every member
// expires the same keys at the same log position (etcd 3.4's
// Request{Method: "SYNC", Time: now}). It never blocks the loop: proposing
// is a call into Raft, and a SYNC nobody awaits needs no waiter.
type reaper struct {
	leader       bool
	timer        *time.Timer // wakes the loop at the next expiration
	pendingID    uint64      // the SYNC proposed and not yet applied
	pendingSince time.Time
	last         time.Time // when the last SYNC was proposed
}

func (rp *reaper) init() {
	rp.timer = time.NewTimer(time.Hour)
	rp.timer.Stop()
}

func (rp *reaper) stop() { rp.timer.Stop() }

// setReaperLeader turns the reaper on when this member leads, off when not.
func (n *Node) setReaperLeader(leader bool) {
	rp := &n.loop.reap
	if rp.leader == leader {
		return
	}
	rp.leader = leader
	rp.pendingID = 0
	if leader {
		n.reapCheck(time.Now())
	} else {
		rp.timer.Stop()
	}
}

// reapApplied notes that our pending SYNC was applied.
func (n *Node) reapApplied(applied []storage.Applied) {
	rp := &n.loop.reap
	if rp.pendingID == 0 {
		return
	}
	for i := range applied {
		if applied[i].ID == rp.pendingID {
			rp.pendingID = 0
			return
		}
	}
}

// reapCheck proposes a SYNC when a key is due, or sets the timer for when
// one will be. The loop calls it when the timer fires, after each apply, and
// on becoming leader.
func (n *Node) reapCheck(now time.Time) {
	rp := &n.loop.reap
	if !rp.leader {
		return
	}
	if rp.pendingID != 0 {
		// One SYNC at a time; its application calls us again. One that has
		// not committed within an election timeout is presumed lost.
		if now.Sub(rp.pendingSince) < n.cfg.ElectionTimeout {
			rp.timer.Reset(n.cfg.ElectionTimeout - now.Sub(rp.pendingSince))
			return
		}
		rp.pendingID = 0
	}
	next, ok := n.store.NextExpiration()
	if !ok {
		rp.timer.Stop()
		return
	}
	at := next
	if earliest := rp.last.Add(reapInterval); at.Before(earliest) {
		at = earliest
	}
	if now.Before(at) {
		rp.timer.Reset(at.Sub(now))
		return
	}
	req := storage.Request{ID: n.ids.id(), Method: storage.MethodSync, Time: now.UnixNano()}
	rp.last = now
	if err := n.rn.Propose(req.Marshal()); err != nil {
		// A transfer in progress, say: try again shortly.
		n.lg.Debug("SYNC proposal dropped", zap.Error(err))
		rp.timer.Reset(reapInterval)
		return
	}
	rp.pendingID, rp.pendingSince = req.ID, now
	rp.timer.Reset(n.cfg.ElectionTimeout)
	if ce := n.lg.Check(zap.DebugLevel, "proposed SYNC"); ce != nil {
		ce.Write(zap.Time("time", now), zap.Time("due", next))
	}
}
