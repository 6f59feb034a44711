package raftkv

import (
	"errors"

	"github.com/etcaddy/etcaddy/storage"
	"go.uber.org/zap"
)

// dropMappedEvery is how many applied entries go by between two drops of
// the database pages the member has mapped. Commits copy every page they
// change to a new place in the file, and the next one reads it there: under
// a steady write load the pages read since the last drop are about the
// pages the last few hundred commits wrote. Dropping them costs a fraction
// of a millisecond (and a minor fault for each page read again after it).
const dropMappedEvery = 1000

// maybeDropMappedPages drops the mapped pages every dropMappedEvery applied
// entries. droppedAt starts at 0, so a member that restarts with more than
// that applied drops at its first Ready the pages bbolt's freelist rebuild
// read at open (every page of the file); one with fewer has a small file.
func (n *Node) maybeDropMappedPages() {
	ls := &n.loop
	if ls.applied-ls.droppedAt < dropMappedEvery {
		return
	}
	ls.droppedAt = ls.applied
	// The pages stay in the page cache; what shrinks is the member's RSS,
	// which would otherwise grow to the size of member.db.
	if err := n.store.DropMappedPages(); err != nil && !errors.Is(err, storage.ErrClosed) {
		n.lg.Warn("cannot drop the mapped pages of the database", zap.Error(err))
	}
}
