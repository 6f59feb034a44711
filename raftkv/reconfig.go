package raftkv

import (
	"encoding/json"
	"errors"
	"time"

	"go.etcd.io/raft/v3/raftpb"
	"go.uber.org/zap"
)

// Errors of etcd's strict reconfiguration check, worded as etcd words them.
// The /v2/members handler answers both with a bare 500, as etcd does.
var (
	// ErrUnhealthy refuses a change while this member has not reached
	// every member it would need for the new quorum for a whole health
	// interval.
	ErrUnhealthy = errors.New("etcdserver: unhealthy cluster")
	// ErrNotEnoughStartedMembers refuses a change after which the members
	// that have started (published their name) would not make a quorum.
	ErrNotEnoughStartedMembers = errors.New("etcdserver: re-configuration failed due to not enough started members")
)

// defaultHealthInterval is etcd's HealthInterval: how long a peer must have
// been reachable to count for the strict reconfiguration check.
const defaultHealthInterval = 5 * time.Second

// SetStrictReconfigCheck turns etcd's strict reconfiguration check on (the
// default, as etcd's --strict-reconfig-check) or off. While it is on,
// AddMember and RemoveMember refuse a change that could leave the cluster
// without a quorum: adding a member while the members started so far would
// not make the new quorum (ErrNotEnoughStartedMembers) or while this member
// has not reached every member for a health interval (5 s; ErrUnhealthy),
// and removing a reachable member while too few of the others are reachable
// (ErrUnhealthy). A member that is down may always be removed. The check
// runs on the member asked, against what it knows, as etcd's does; and once
// more on the leader, against its own list, when changes sent to different
// members at once could each have passed it alone (see strictCheck).
func (n *Node) SetStrictReconfigCheck(on bool) { n.loose.Store(!on) }

// strictCheck is what a change's proposer adds to its context when it made
// the strict check: the log index of the last membership change it had
// applied when it checked (0: not known, since its start or a snapshot).
// The leader takes the change only when all earlier ones are applied
// (proposeConf); if it has applied a later change than its proposer had,
// the proposer checked a member list that is out of date (two changes sent
// to two members at once each pass their member's check, and together may
// leave the cluster without a quorum: two additions of members that have
// yet to start, or the removals of two members of four), and the leader
// makes the check again (judgeConf). etcd's Raft drops a second change
// proposed while one is pending, which mostly spares it the same race.
type strictCheck struct {
	Strict    bool   `json:"strictChecked,omitempty"`
	ConfIndex uint64 `json:"checkedAtConfIndex,omitempty"`
}

// strictAgain reports why the leader refuses cc under the strict check
// its proposer made (nil: it takes it). The proposer's check stands when
// it was made against the list the leader has.
func (n *Node) strictAgain(cc *raftpb.ConfChange) error {
	var sc strictCheck
	if json.Unmarshal(cc.GetContext(), &sc) != nil || !sc.Strict {
		return nil
	}
	if at := n.confIndex.Load(); at != 0 && sc.ConfIndex == at {
		return nil
	}
	switch cc.GetType() {
	case raftpb.ConfChangeAddNode:
		return n.strictAdd()
	case raftpb.ConfChangeRemoveNode:
		return n.strictRemove(cc.GetNodeId())
	}
	return nil
}

// checkStrict makes the strict check of this member for a change, and
// returns what its context carries of it (see strictCheck).
func (n *Node) checkStrict(check func() error) (strictCheck, error) {
	if n.loose.Load() {
		return strictCheck{}, nil
	}
	// Read before the check: a change applied in between makes the index
	// older than the list checked, which only makes the leader check again.
	sc := strictCheck{Strict: true, ConfIndex: n.confIndex.Load()}
	return sc, check()
}

// MayAddMember is etcd's strict check of an added voting member (see
// SetStrictReconfigCheck), which comes before any other check of the
// change: nil when the check is off.
func (n *Node) MayAddMember() error { return n.mayAddMember() }

// mayAddMember is etcd's mayAddMember for a voting member.
func (n *Node) mayAddMember() error {
	if n.loose.Load() {
		return nil
	}
	return n.strictAdd()
}

// strictAdd is the strict check of an added voting member, against this
// member's list and reach.
func (n *Node) strictAdd() error {
	members := n.memberSnapshot()
	total, started := countStarted(members, 0)
	total++ // the new member
	// Adding a second member to a lone one (etcd's case of restoring a
	// cluster from one member's data) is allowed.
	if !(started == 1 && total == 2) && started < total/2+1 {
		n.lg.Warn("refusing to add a member: not enough started members",
			zap.Int("started", started), zap.Int("members-after", total))
		return ErrNotEnoughStartedMembers
	}
	if n.connectedSince(members) != len(members) {
		n.lg.Warn("refusing to add a member: this member has not reached every member for the last "+
			n.cfg.healthInterval.String()+"; the change could break the quorum",
			zap.Int("members", len(members)))
		return ErrUnhealthy
	}
	return nil
}

// strictRemove is etcd's mayRemoveMember for a voting member, against
// this member's list and reach.
func (n *Node) strictRemove(id uint64) error {
	members := n.memberSnapshot()
	others, started := countStarted(members, id)
	if started < others/2+1 {
		n.lg.Warn("refusing to remove a member: not enough started members would be left",
			zap.String("member", idString(id)), zap.Int("started", started), zap.Int("members-after", others))
		return ErrNotEnoughStartedMembers
	}
	// A member this one does not reach is no part of the quorum it sees.
	if id != n.id && n.activeSince(id).IsZero() {
		return nil
	}
	if active := n.connectedSince(members); active-1 < 1+(len(members)-1)/2 {
		n.lg.Warn("refusing to remove a member: too few members reachable; the change could break the quorum",
			zap.String("member", idString(id)), zap.Int("reachable", active), zap.Int("members", len(members)))
		return ErrUnhealthy
	}
	return nil
}

// countStarted counts the members other than except, and those of them
// that have started: published their name, as etcd's IsStarted.
func countStarted(members []memberRecord, except uint64) (total, started int) {
	for _, m := range members {
		if m.ID == except {
			continue
		}
		total++
		if m.Name != "" {
			started++
		}
	}
	return total, started
}

// connectedSince counts the members this one has reached for the whole
// last health interval, itself included (etcd's numConnectedSince).
func (n *Node) connectedSince(members []memberRecord) int {
	since := time.Now().Add(-n.cfg.healthInterval)
	k := 0
	for _, m := range members {
		if m.ID == n.id {
			k++
			continue
		}
		if t := n.activeSince(m.ID); !t.IsZero() && t.Before(since) {
			k++
		}
	}
	return k
}

// activeSince is when peer id became reachable; zero when it is not, or
// when this member runs alone (no transport).
func (n *Node) activeSince(id uint64) time.Time {
	if n.tr == nil {
		return time.Time{}
	}
	return n.tr.activeSince(id)
}
