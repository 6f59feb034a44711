package storage

import (
	"errors"
	"time"

	bolt "go.etcd.io/bbolt"
	"go.etcd.io/raft/v3/raftpb"
)

// ErrClosed is returned by a Store that has been closed.
var ErrClosed = errors.New("storage: closed")

// Store is one member's bbolt file: keyspace, event history, Raft log.
// Reads (Get, Watch, Index, Stats) may run from any goroutine; Save, Compact
// and SetMeta only from the one goroutine that drives Raft.
type Store struct {
	db *bolt.DB
	// TODO(storage): the rest of the state (watcher hub, counters, cached index).
}

// Open opens (creating if needed) <dir>/member.db, with the directory
// created 0700. It takes bbolt's file lock with a timeout, so a second
// process on the same directory fails instead of hanging.
func Open(dir string) (*Store, error) { panic("storage.Open: not implemented") }

// Close stops every watcher (their channels close) and closes the file.
func (s *Store) Close() error { panic("not implemented") }

// RaftState is what a restarting member reads back to rebuild its Raft log.
type RaftState struct {
	HardState *raftpb.HardState        // nil when nothing was ever saved
	Snapshot  *raftpb.SnapshotMetadata // the last snapshot (nil: none); its Index/Term/ConfState
	ConfState *raftpb.ConfState        // the latest applied conf state (nil: none)
	Entries   []*raftpb.Entry          // every log entry after Snapshot.Index, in order
	Applied   uint64                   // the last applied Raft index
}

// LoadRaft reads back the Raft state saved by Save and Compact.
func (s *Store) LoadRaft() (*RaftState, error) { panic("not implemented") }

// Ready is one Raft Ready's worth of durable work. Save writes all of it in
// one bbolt transaction (one commit, so one pair of fsyncs per Ready).
type Ready struct {
	HardState *raftpb.HardState // nil: unchanged
	Entries   []*raftpb.Entry   // appended to the log; any saved entry at or above Entries[0].Index is replaced first
	Snapshot  *raftpb.Snapshot  // a snapshot received from the leader (nil: none): replaces keyspace and log (cluster only)
	Committed []*raftpb.Entry   // applied in order, after the append; entries at or below the applied index are skipped
	ConfState *raftpb.ConfState // the conf state after applying Committed's conf changes (nil: unchanged)
}

// Applied is the outcome of one committed entry that carried a Request.
type Applied struct {
	Index uint64 // Raft index of the entry
	ID    uint64 // Request.ID
	Event *Event // the result on success
	Err   *Error // the v2 error on failure (the index in it is the store index at apply time)
}

// Save persists rd and applies its committed entries in one transaction.
// EntryNormal entries carry an encoded Request (empty data: a leader's
// no-op); conf-change entries only advance the applied index. After the
// commit, events go to the watcher hub; the results come back for waiters.
// SYNC requests expire every key whose expiration is at or before Time,
// one "expire" event each, each bumping the store index.
func (s *Store) Save(rd Ready) ([]Applied, error) { panic("not implemented") }

// Compact records snap as the latest snapshot and deletes log entries at or
// below compactIndex (compactIndex <= snap.Index; raftkv keeps a tail of
// entries for slow followers).
func (s *Store) Compact(snap *raftpb.SnapshotMetadata, compactIndex uint64) error {
	panic("not implemented")
}

// Applied returns the last applied Raft index.
func (s *Store) AppliedIndex() uint64 { panic("not implemented") }

// Index returns the current store (etcd) index: the X-Etcd-Index.
func (s *Store) Index() uint64 { panic("not implemented") }

// Get reads a key or directory as etcd's v2 GET does (children one level
// deep unless recursive; hidden "_" children never listed; sorted byte-wise
// by key when sorted, else in whatever order is cheapest). TTLs are computed
// against now. Errors: 100 (cause: the first missing path component), 104.
func (s *Store) Get(path string, recursive, sorted bool, now time.Time) (*Event, error) {
	panic("not implemented")
}

// Watch registers a watcher as etcd's v2 store does: sinceIndex 0 means
// "from the next event"; a sinceIndex still in the 1000-event history is
// answered from it first; one older than the history gives error 401.
// The returned watcher's StartIndex is the store index at registration.
func (s *Store) Watch(path string, recursive, stream bool, sinceIndex uint64) (*Watcher, error) {
	panic("not implemented")
}

// NextExpiration returns the earliest expiration among live keys, if any:
// the leader's reaper proposes a SYNC once it is due.
func (s *Store) NextExpiration() (time.Time, bool) { panic("not implemented") }

// Meta reads a member-level value (IDs, cluster membership) from the meta
// bucket; nil when absent.
func (s *Store) Meta(key string) []byte { panic("not implemented") }

// SetMeta writes a member-level value durably.
func (s *Store) SetMeta(key string, value []byte) error { panic("not implemented") }

// WriteSnapshot writes a consistent copy of the whole file (one read
// transaction) to w, for a follower that needs a snapshot.
// func (s *Store) WriteSnapshot(w io.Writer) (int64, error)

// Stats are etcd's /v2/stats/store counters, kept in memory since Open.
type Stats struct {
	GetSuccess              uint64 `json:"getsSuccess"`
	GetFail                 uint64 `json:"getsFail"`
	SetSuccess              uint64 `json:"setsSuccess"`
	SetFail                 uint64 `json:"setsFail"`
	DeleteSuccess           uint64 `json:"deleteSuccess"`
	DeleteFail              uint64 `json:"deleteFail"`
	UpdateSuccess           uint64 `json:"updateSuccess"`
	UpdateFail              uint64 `json:"updateFail"`
	CreateSuccess           uint64 `json:"createSuccess"`
	CreateFail              uint64 `json:"createFail"`
	CompareAndSwapSuccess   uint64 `json:"compareAndSwapSuccess"`
	CompareAndSwapFail      uint64 `json:"compareAndSwapFail"`
	CompareAndDeleteSuccess uint64 `json:"compareAndDeleteSuccess"`
	CompareAndDeleteFail    uint64 `json:"compareAndDeleteFail"`
	ExpireCount             uint64 `json:"expireCount"`
	Watchers                uint64 `json:"watchers"`
}

// Stats returns a copy of the counters.
func (s *Store) Stats() Stats { panic("not implemented") }

// Watcher receives the events of one v2 watch.
type Watcher struct {
	// EventChan yields matching events in index order; it is closed when
	// the watch ends (after one event unless streaming, on Remove, on
	// Close, or when a streaming watcher falls 100 events behind).
	EventChan <-chan *Event
	// StartIndex is the store index when the watch was registered.
	StartIndex uint64
	// TODO(storage): internals.
}

// Remove unregisters the watcher and closes its channel; safe to call more
// than once and after the watch ended.
func (w *Watcher) Remove() { panic("not implemented") }
