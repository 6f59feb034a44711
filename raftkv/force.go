package raftkv

import (
	"errors"
	"fmt"
	"maps"
	"slices"

	"github.com/etcaddy/etcaddy/storage"
	"go.etcd.io/raft/v3/raftpb"
	"go.uber.org/zap"
	"google.golang.org/protobuf/proto"
)

// forceNewCluster makes this member the only member of its cluster before
// it starts, as etcd's --force-new-cluster does: the way back for a cluster
// that lost a majority of its members for good. Entries past the commit
// index this member knows are dropped: no member left can commit them (a
// write the lost majority committed after this member last heard of it is
// lost with them, as with etcd). Conf changes that remove every other
// member are appended after the commit index, at the hard state's term,
// and committed at once: applied at start like any other, they leave this
// member its cluster's only voter, with the cluster's data, member and
// cluster IDs and index. The others are removed for good, and at once:
// one that comes back, even before the removals are applied, is refused
// and stops. rs is updated to what it saved.
//
// raftApplied is the index up to which Raft's view (the saved conf state)
// is applied. It returns the index once applied the member is alone.
func (n *Node) forceNewCluster(st *storage.Store, rs *storage.RaftState, raftApplied uint64) (uint64, error) {
	hs := rs.HardState
	if hs == nil {
		return 0, errors.New("raftkv: force_new_cluster: the data directory holds no Raft hard state")
	}
	cs := rs.ConfState
	if cs == nil && rs.Snapshot != nil {
		cs = rs.Snapshot.GetConfState()
	}
	if len(cs.GetVotersOutgoing()) > 0 {
		return 0, errors.New("raftkv: force_new_cluster: the member's cluster is in a joint configuration")
	}
	// What the store applied is committed too: after the install of a
	// snapshot whose file was ahead of it, the store's applied index can be
	// ahead of the saved commit index (Raft then hands out the entries in
	// between again, for their conf changes). The removals go after both.
	commit := hs.GetCommit()
	if applied := st.AppliedIndex(); applied > commit {
		last := rs.Snapshot.GetIndex()
		if k := len(rs.Entries); k > 0 {
			last = rs.Entries[k-1].GetIndex()
		}
		if last < applied {
			return 0, fmt.Errorf("raftkv: force_new_cluster: the member's log ends at %d, before the index %d it applied from a snapshot; "+
				"force another member, or one restored from a backup (GET /raftkv/snapshot)", last, applied)
		}
		commit = applied
	}
	// The members as of that index: the saved conf state's, with the conf
	// changes Raft has still to hand out.
	voter := make(map[uint64]bool)
	for _, id := range cs.GetVoters() {
		voter[id] = true
	}
	for _, id := range slices.Concat(cs.GetLearners(), cs.GetLearnersNext()) {
		voter[id] = false
	}
	keep := len(rs.Entries)
	for i, e := range rs.Entries {
		if e.GetIndex() > commit {
			keep = i
			break
		}
		if e.GetIndex() <= raftApplied {
			continue
		}
		var changes []*raftpb.ConfChangeSingle
		switch e.GetType() {
		case raftpb.EntryConfChange:
			cc := &raftpb.ConfChange{}
			if err := proto.Unmarshal(e.GetData(), cc); err != nil {
				return 0, fmt.Errorf("raftkv: damaged conf change at index %d: %w", e.GetIndex(), err)
			}
			changes = cc.AsV2().GetChanges()
		case raftpb.EntryConfChangeV2:
			cc := &raftpb.ConfChangeV2{}
			if err := proto.Unmarshal(e.GetData(), cc); err != nil {
				return 0, fmt.Errorf("raftkv: damaged conf change at index %d: %w", e.GetIndex(), err)
			}
			changes = cc.GetChanges()
		}
		for _, c := range changes {
			id := c.GetNodeId()
			switch {
			case id == 0:
			case c.GetType() == raftpb.ConfChangeRemoveNode:
				delete(voter, id)
			case n.isRemoved(id):
				// Applied with node ID 0 (see resurrects).
			case c.GetType() == raftpb.ConfChangeAddNode:
				voter[id] = true
			case c.GetType() == raftpb.ConfChangeAddLearnerNode:
				voter[id] = false
			}
		}
	}
	if !voter[n.id] {
		return 0, fmt.Errorf("raftkv: force_new_cluster: member %s is not a voting member of its cluster (was it removed?)", idString(n.id))
	}
	delete(voter, n.id)
	others := slices.Sorted(maps.Keys(voter))
	if len(others) == 0 {
		n.lg.Warn("force_new_cluster is set, but this member is already the only member of its cluster: nothing to do; remove the setting")
		return commit, nil
	}
	dropped := len(rs.Entries) - keep
	ents := make([]*raftpb.Entry, 0, len(others))
	for i, id := range others {
		data, err := proto.Marshal(&raftpb.ConfChange{Type: raftpb.ConfChangeRemoveNode.Enum(), NodeId: new(id)})
		if err != nil {
			return 0, err
		}
		ents = append(ents, &raftpb.Entry{
			Type:  raftpb.EntryConfChange.Enum(),
			Term:  new(hs.GetTerm()),
			Index: new(commit + 1 + uint64(i)),
			Data:  data,
		})
	}
	forced := proto.Clone(hs).(*raftpb.HardState)
	forced.Commit = new(ents[len(ents)-1].GetIndex())
	// One commit: the uncommitted tail goes as the removals replace it.
	if _, err := st.Save(storage.Ready{HardState: forced, Entries: ents}); err != nil {
		return 0, err
	}
	rs.HardState = forced
	rs.Entries = append(rs.Entries[:keep:keep], ents...)
	// Refused from now on, not only once the removals are applied: a
	// removed member heard before that could still lead this one's log.
	n.membersMu.Lock()
	if n.removed == nil {
		n.removed = make(map[uint64]bool)
	}
	for _, id := range others {
		n.removed[id] = true
	}
	n.membersMu.Unlock()
	ids := make([]string, len(others))
	for i, id := range others {
		ids[i] = idString(id)
	}
	n.lg.Warn("force_new_cluster: this member now forms a cluster of its own, with its data; the other members are removed for good. "+
		"Remove force_new_cluster from the config now: every start with it removes the members added since",
		zap.String("member-id", idString(n.id)), zap.Strings("removed", ids),
		zap.Uint64("commit-index", commit), zap.Int("uncommitted-entries-dropped", dropped))
	return forced.GetCommit(), nil
}
