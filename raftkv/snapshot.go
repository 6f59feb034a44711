package raftkv

import (
	"errors"

	"go.etcd.io/raft/v3"
	"go.uber.org/zap"
)

// DefaultSnapshotCatchUpEntries is how many entries stay in the log behind
// a snapshot unless configured (etcd's DefaultSnapshotCatchUpEntries, which
// etcd 3.4 always keeps), so a slow follower catches up from the log
// instead of needing a whole snapshot. It must outlast a snapshot's
// transfer: a follower that a snapshot leaves further behind than this
// needs another, and under a steady write load may never catch up.
const DefaultSnapshotCatchUpEntries = 5000

// maybeSnapshot takes a snapshot every SnapshotCount applied entries and
// compacts the log behind it. The snapshot's data is the keyspace itself,
// already in bbolt at the applied index, so it records only the position
// and conf state; compaction keeps a tail of catch-up entries.
func (n *Node) maybeSnapshot() error {
	ls := &n.loop
	// Raft's applied index, not the store's: the sole voter's fast path
	// applies ahead of Raft, and Raft still reads the entries in between
	// from MemoryStorage to hand them out as committed.
	applied := min(ls.applied, ls.raftApplied)
	if applied <= ls.snapIndex || applied-ls.snapIndex < n.cfg.SnapshotCount {
		return nil
	}
	snap, err := n.ms.CreateSnapshot(applied, ls.confState, nil)
	if err != nil {
		if errors.Is(err, raft.ErrSnapOutOfDate) {
			return nil
		}
		return err
	}
	catchUp := n.cfg.SnapshotCatchUpEntries
	var compact uint64
	if applied > catchUp {
		compact = applied - catchUp
	}
	if err := n.store.Compact(snap.GetMetadata(), compact); err != nil {
		return err
	}
	if compact > 0 {
		if err := n.ms.Compact(compact); err != nil && !errors.Is(err, raft.ErrCompacted) {
			return err
		}
	}
	ls.snapIndex = applied
	// Received snapshots Raft did not take (step removes those at or
	// below its commit index, or of an older term, when it steps them;
	// these are the rest) or never got (a message dropped on the way)
	// would stay until the next start; this runs every snapshot_count
	// entries.
	n.store.DropReceivedSnapshots(n.committed.Load())
	n.lg.Info("snapshot taken",
		zap.Uint64("index", snap.GetMetadata().GetIndex()),
		zap.Uint64("term", snap.GetMetadata().GetTerm()),
		zap.Uint64("compacted-to", compact))
	return nil
}
