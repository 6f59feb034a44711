package raftkv

import (
	"context"
	"errors"
	"io"

	"github.com/etcaddy/etcaddy/storage"
)

// What an operator's tools need beyond the v2 API: the applied index, a
// backup of the member's file, and a leader transfer to a chosen member.

// ErrNotLeader is returned by TransferLeadershipTo when this member does
// not lead the cluster: only the leader can hand leadership over.
var ErrNotLeader = errors.New("raftkv: this member is not the leader")

// AppliedIndex returns the last Raft index this member has applied (0
// before it has booted).
func (n *Node) AppliedIndex() uint64 { return n.applied.Load() }

// Backup writes a consistent copy of the member's bbolt file (member.db,
// as of one read transaction) to w and returns the bytes written. The copy
// holds every write this member had answered when Backup was called, and
// opens as a member.db: a backup to restore from. It fails with ErrStopped
// when the member stops before the copy is complete, so that a slow reader
// cannot hold a member's shutdown up for long.
func (n *Node) Backup(ctx context.Context, w io.Writer) (int64, error) {
	if err := n.checkRunning(); err != nil {
		return 0, err
	}
	// A write's answer can go out while its apply waits in a transaction
	// that stays open (storage.Ready.Defer), which no reader sees. Commit
	// it first, on the loop goroutine that owns the store's write side.
	flushed := make(chan error, 1)
	select {
	case n.ctrlc <- func() { flushed <- n.store.Flush() }:
	case <-ctx.Done():
		return 0, ErrTimeout
	case <-n.donec:
		return 0, ErrStopped
	}
	select {
	case err := <-flushed:
		if err != nil {
			return 0, err
		}
	case <-n.donec: // the loop ended before it answered (a panic, say)
		return 0, ErrStopped
	}
	written, err := n.store.WriteSnapshot(stopWriter{w: w, stop: n.bgCtx})
	if errors.Is(err, storage.ErrClosed) {
		err = ErrStopped
	}
	return written, err
}

// stopWriter fails once stop ends: Stop ends it before it closes the store,
// and bbolt's Close waits for the copy's read transaction.
type stopWriter struct {
	w    io.Writer
	stop context.Context
}

func (s stopWriter) Write(p []byte) (int, error) {
	if s.stop.Err() != nil {
		return 0, ErrStopped
	}
	return s.w.Write(p)
}

// TransferLeadershipTo hands leadership to the voting member to (0: the
// one whose log is furthest along), if this member leads, and waits until
// this member knows of another leader or ctx ends (ErrTimeout). Unlike
// TransferLeadership it fails with ErrNotLeader when this member does not
// lead; with ErrMemberNotFound when to is not another voting member, and
// ErrNoTransferee when there is none.
func (n *Node) TransferLeadershipTo(ctx context.Context, to uint64) error {
	return n.transferLeadership(ctx, to)
}
