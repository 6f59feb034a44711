package raftkv

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"time"

	"github.com/etcaddy/etcaddy/storage"
	"go.etcd.io/raft/v3"
	"go.etcd.io/raft/v3/raftpb"
)

// boot restores (or bootstraps) the member from st, whose Raft state is
// rs, and builds its Raft node. Nothing runs yet: Start launches the loop
// afterwards.
func (n *Node) boot(st *storage.Store, rs *storage.RaftState) error {
	var err error
	ms := raft.NewMemoryStorage()
	fresh := freshRaft(rs)
	var peers []raft.Peer
	var voters int
	var raftApplied uint64
	var aloneAt uint64 // forced: the index once applied this member is alone
	if fresh && n.cfg.ForceNewCluster {
		n.lg.Warn("force_new_cluster is set, but the data directory is empty: it has no effect")
	}
	switch {
	case fresh && n.cfg.InitialClusterState == "existing":
		// Joining: no peers to bootstrap with. The leader sends the log or
		// a snapshot, and the conf changes in it (or the snapshot's member
		// list) bring the membership up to date.
		if err := n.joinMembers(st); err != nil {
			return err
		}
	case fresh:
		peers, err = n.bootstrapMembers(st)
		if err != nil {
			return err
		}
		voters = len(peers)
	default:
		if err := n.restoreMembers(st); err != nil {
			return err
		}
		// After a snapshot install the store may have applied past the
		// commit index saved with it (the leader's file was ahead); Raft
		// refuses an applied index above its commit, and re-delivers the
		// entries in between, which the store skips (their conf changes
		// apply).
		raftApplied = min(st.AppliedIndex(), rs.HardState.GetCommit())
		raftApplied = max(raftApplied, rs.Snapshot.GetIndex())
		if n.cfg.ForceNewCluster {
			if aloneAt, err = n.forceNewCluster(st, rs, raftApplied); err != nil {
				return err
			}
		}
		cs := rs.ConfState
		if cs == nil && rs.Snapshot != nil {
			cs = rs.Snapshot.GetConfState()
		}
		voters = len(cs.GetVoters())
		// MemoryStorage is Raft's view of the log; bbolt holds the durable
		// copy and rebuilds it here as etcd rebuilds it from its WAL: the
		// snapshot's position (its data lives in the keyspace already), with
		// the conf state as of the applied index (Config.Applied below keeps
		// Raft from delivering the conf changes it includes again), the hard
		// state, then the entries after the snapshot.
		snap := &raftpb.Snapshot{Metadata: &raftpb.SnapshotMetadata{
			Index:     new(rs.Snapshot.GetIndex()),
			Term:      new(rs.Snapshot.GetTerm()),
			ConfState: raftpb.EnsureConfState(cs),
		}}
		if err := ms.ApplySnapshot(snap); err != nil {
			return fmt.Errorf("raftkv: restoring snapshot %d: %w", rs.Snapshot.GetIndex(), err)
		}
		if rs.HardState != nil {
			if err := ms.SetHardState(rs.HardState); err != nil {
				return err
			}
		}
		if err := ms.Append(rs.Entries); err != nil {
			return err
		}
		n.loop.snapIndex = rs.Snapshot.GetIndex()
		n.loop.confState = raftpb.EnsureConfState(cs)
		n.committed.Store(rs.HardState.GetCommit())
		n.commitSeen.Store(rs.HardState.GetCommit())
		n.term.Store(rs.HardState.GetTerm())
	}

	// A new ID generation on every boot keeps request IDs unique across
	// restarts (see idGen).
	gen, _ := getUint64(st.Meta(metaIDGen))
	gen++
	if err := st.SetMeta(metaIDGen, putUint64(gen)); err != nil {
		return err
	}
	n.ids = newIDGen(n.id, gen)

	applied := st.AppliedIndex()
	n.applied.Store(applied)
	n.loop.applied, n.loop.raftApplied = applied, raftApplied
	n.loop.hardState = rs.HardState
	rn, err := raft.NewRawNode(&raft.Config{
		ID:                        n.id,
		ElectionTick:              n.cfg.electionTicks(),
		HeartbeatTick:             ticksPerHeartbeat,
		Storage:                   ms,
		Applied:                   raftApplied,
		MaxSizePerMsg:             1 << 20,
		MaxInflightMsgs:           256,
		MaxUncommittedEntriesSize: 1 << 30,
		CheckQuorum:               true,
		PreVote:                   true,
		ReadOnlyOption:            raft.ReadOnlySafe,
		// A removed leader stops leading at once (etcd-io/raft#83).
		StepDownOnRemoval: true,
		Logger:            newRaftLogger(n.lg),
	})
	if err != nil {
		return err
	}
	if len(peers) > 0 {
		if err := rn.Bootstrap(peers); err != nil {
			return err
		}
	}
	n.ms, n.rn = ms, rn
	// A single voter need not wait out an election timeout: it is its own
	// quorum. A fresh one must first apply its bootstrap conf change (Raft
	// refuses to campaign with unapplied conf changes), so the loop
	// campaigns once it has; a restarted one campaigns now (if a conf
	// change is still unapplied, Raft's election timer does it later). A
	// forced member is the only voter once it has applied the removals,
	// which may take several Readies: it campaigns then.
	switch {
	case voters == 1 && fresh:
		if !n.loop.noFastCampaign {
			n.loop.campaignAt = uint64(len(peers))
		}
	case voters == 1:
		if err := rn.Campaign(); err != nil {
			return err
		}
	case aloneAt > 0:
		if !n.loop.noFastCampaign {
			n.loop.campaignAt = aloneAt
		}
	}
	return nil
}

// freshRaft reports whether a member has no Raft state yet: it bootstraps
// or joins a cluster.
func freshRaft(rs *storage.RaftState) bool {
	return rs.HardState == nil && rs.Snapshot == nil && len(rs.Entries) == 0
}

// bootstrapMembers computes the initial cluster, persists it and returns
// the Raft peers to bootstrap with.
func (n *Node) bootstrapMembers(st *storage.Store) ([]raft.Peer, error) {
	members, err := initialMembers(n.cfg.InitialCluster, n.cfg.InitialClusterToken)
	if err != nil {
		return nil, err
	}
	var self *memberRecord
	for i := range members {
		if members[i].Name == n.cfg.Name {
			self = &members[i]
		}
	}
	if self == nil {
		return nil, fmt.Errorf("raftkv: couldn't find local name %q in the initial cluster configuration", n.cfg.Name)
	}
	if len(members) == 1 {
		// The only member's list is the cluster's: its features are known
		// without a publish (every member that joins later copies it).
		self.Features = slices.Clone(buildFeatures)
	}
	n.id = self.ID
	n.clusterID = clusterID(memberIDs(members))
	n.members = members
	if err := n.checkNotBootstrapped(); err != nil {
		return nil, err
	}
	// Meta first: a crash before the first Save leaves a data directory
	// that still looks fresh and bootstraps again to the same IDs.
	if err := n.saveIdentity(st); err != nil {
		return nil, err
	}
	peers := make([]raft.Peer, len(members))
	for i, m := range members {
		peers[i] = raft.Peer{ID: m.ID, Context: encodeMember(m)}
	}
	return peers, nil
}

// bootstrapCheckTimeout bounds how long a new member asks the others
// whether they already know it (etcd's bootstrap timeout is 1 s too).
const bootstrapCheckTimeout = time.Second

// checkNotBootstrapped is etcd's isMemberBootstrapped: a member of a new
// cluster that starts with no Raft state asks the other members of the
// initial cluster for their member list, and refuses to start when one
// lists it with client URLs: it ran before, and its data directory was
// emptied or replaced. Bootstrapping again would hand Raft a log that the
// cluster's commit index is far past, which Raft cannot survive; the way
// back is member remove, member add, and a start with
// initial_cluster_state existing. Members that do not answer (a new
// cluster starting) are no objection.
func (n *Node) checkNotBootstrapped() error {
	ask := n.otherInitialPeerURLs()
	if len(ask) == 0 {
		return nil
	}
	client := newPeerClient(n.cfg.Peer.TLS, n.cfg.Peer.H2C)
	// One request per peer: no connection is kept for later (a dial that
	// ends after its request gave up would otherwise idle on).
	client.Transport.(*http.Transport).DisableKeepAlives = true
	defer client.CloseIdleConnections()
	known := make(chan bool, len(ask))
	for _, u := range ask {
		go func() {
			members, cid, err := fetchMembers(context.Background(), client, u, bootstrapCheckTimeout)
			ok := err == nil && cid == n.clusterID && slices.ContainsFunc(members, func(m memberRecord) bool {
				return m.ID == n.id && len(m.ClientURLs) > 0
			})
			known <- ok
		}()
	}
	bootstrapped := false
	for range ask {
		bootstrapped = <-known || bootstrapped // every answer: no goroutine outlives the call
	}
	if bootstrapped {
		return fmt.Errorf("raftkv: member %s has already been bootstrapped: its data directory %s holds no Raft state, "+
			"but the cluster knows it; remove it (member remove), add it again (member add) and start it with initial_cluster_state existing",
			idString(n.id), n.cfg.DataDir)
	}
	return nil
}

// saveIdentity persists a new member's ID, cluster ID and member list, in
// one commit.
func (n *Node) saveIdentity(st *storage.Store) error {
	return st.SetMetas(map[string][]byte{
		metaMembers:   encodeMembers(n.members),
		metaClusterID: putUint64(n.clusterID),
		metaMemberID:  putUint64(n.id),
	})
}

// restoreMembers reads back the member's identity and the member list.
func (n *Node) restoreMembers(st *storage.Store) error {
	id, ok := getUint64(st.Meta(metaMemberID))
	if !ok || id == 0 {
		return fmt.Errorf("raftkv: the data directory holds Raft state but no member ID")
	}
	cid, ok := getUint64(st.Meta(metaClusterID))
	if !ok {
		return fmt.Errorf("raftkv: the data directory holds Raft state but no cluster ID")
	}
	members, err := decodeMembers(st.Meta(metaMembers))
	if err != nil {
		return err
	}
	removed, err := decodeIDs(st.Meta(metaRemoved))
	if err != nil {
		return err
	}
	verdicts, err := decodeConfVerdicts(st.Meta(metaVerdicts))
	if err != nil {
		return err
	}
	n.id, n.clusterID, n.members, n.removed = id, cid, members, removed
	n.loop.verdicts = verdicts
	n.confIndex.Store(decodeConfIndex(st.Meta(metaConfIndex), st.Meta(metaMembers)))
	return nil
}
