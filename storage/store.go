package storage

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
	"go.etcd.io/raft/v3/raftpb"
)

// ErrClosed is returned by a Store that has been closed.
var ErrClosed = errors.New("storage: closed")

// errFailed is what a store refuses every write and read with once a
// commit failed, or a transaction whose results Save had handed out (a
// deferred Save's) was rolled back: readers would otherwise be served the
// state before writes whose answers went out, and a failed commit may have
// reached the file after all. Opening the file again applies the
// committed entries from the log. It is an ErrClosed: the member stops.
var errFailed = fmt.Errorf("%w: a commit failed, open the file again", ErrClosed)

// usable is nil unless the store is closed or failed.
func (s *Store) usable() error {
	if s.failed.Load() {
		return errFailed
	}
	if s.closed.Load() {
		return ErrClosed
	}
	return nil
}

// ErrSnapshotUnsupported is returned by Save for a Ready whose snapshot
// names no received file (its Data is empty): this store installs only
// snapshots that ReceiveSnapshot wrote.
var ErrSnapshotUnsupported = errors.New("storage: installing a snapshot from the leader is not supported yet")

// initialMmapSize is etcd's 10 GiB where addresses are 64 bits, 1 GiB
// where they are 32 (bbolt maps at most 2 GiB there).
const initialMmapSize = 1<<30 + (strconv.IntSize/64)*(9<<30)

// Buckets of member.db, by role.
//
// A commit rewrites every page on the path to each key it changes, so what
// every commit writes is kept together: the hard state, applied index and
// store index share the meta bucket, which bbolt keeps inline in the root
// page (any commit rewrites that page anyway) while it stays under a
// quarter of a page.
var (
	bucketLog    = []byte("log")    // Raft log: big-endian index -> proto Entry
	bucketRaft   = []byte("raft")   // conf state, snapshot metadata
	bucketKeys   = []byte("keys")   // the v2 keyspace (node.go)
	bucketExpiry = []byte("expiry") // expiration + path -> nothing
	bucketEvents = []byte("events") // the last 1000 events and up to eventSlack older: big-endian index -> event
	bucketMeta   = []byte("meta")   // hard state, applied index, store index, compaction point, member values
	// bucketAuth ("auth", auth.go): the v2 auth data, path -> value
	// Applied request IDs are no longer stored per commit (see dedup); the
	// two empty buckets remain only because a received snapshot is checked
	// for them (checkSnapshotFile).
	bucketRequests = []byte("requests")
	bucketReqOrder = []byte("reqorder")
)

// Keys of the meta and raft buckets. Member values set with SetMeta live in
// the meta bucket under metaUserPrefix, apart from the store's own keys.
var (
	keyApplied     = []byte("applied")
	keyIndex       = []byte("index")
	keyCompacted   = []byte("compacted")
	keyHardState   = []byte("hardstate") // in meta, next to the applied index
	keyConfState   = []byte("confstate")
	keySnapshot    = []byte("snapshot")
	metaUserPrefix = "m/"
)

// Store is one member's bbolt file: keyspace, event history, Raft log.
// Reads (Get, Watch, Index, Stats) may run from any goroutine; Save, Compact,
// SetMeta and DropMappedPages only from the one goroutine that drives Raft.
type Store struct {
	// db is the open file. Installing a snapshot replaces it with the
	// received file (see snapshotInstall): readers load it through view;
	// Save's goroutine, the only one that replaces it, through file.
	db       atomic.Pointer[bolt.DB]
	dir      string
	retired  sync.WaitGroup // closes of files a snapshot replaced, waiting for their readers
	hub      *hub
	counters counters
	closed   atomic.Bool
	failed   atomic.Bool // see errFailed
	applied  atomic.Uint64
	index    atomic.Uint64
	auth     atomic.Pointer[AuthData]
	// authAcked is the applied index of the last auth change Save handed
	// out: Auth waits for a commit only while it is above applied.
	authAcked atomic.Uint64
	nextExp   atomic.Pointer[time.Time] // nil: no key has a TTL
	dedup     *dedup                    // nil after a failed Save: rebuilt from the file; Save's goroutine only
	now       func() time.Time          // the clock for ttl fields; tests replace it
	received  atomic.Uint64             // received snapshots, for their file names
	histories sync.Map                  // received snapshot's path -> its history ([]*Event), for the install
	arena     arena                     // Save's values; Save's goroutine only
	bufs      saveBufs                  // Save's encoding buffers, kept from one Save to the next
	open      *bolt.Tx                  // a deferred Save's transaction, not yet committed; Save's goroutine only
	pend      pending                   // what open holds that readers must not see before it commits
	acked     atomic.Uint64             // the applied index whose results Save has handed out (committed or in open)
	flushc    chan struct{}             // readers ask Save's goroutine to commit open (see FlushRequests)
	commitMu  sync.Mutex                // guards commitc
	commitc   chan struct{}             // closed, and replaced, at each commit that moves the applied index
	donec     chan struct{}             // closed by Close

	beforePublish func() // tests only: runs in commit before watchers hear of its events
}

// pending is the part of a deferred Save's outcome that is published when
// its transaction commits: until then readers see the state before it.
type pending struct {
	published []*Event
	stats     statDelta
	applied   uint64
	index     uint64
	nextExp   *time.Time
	auth      *AuthData // nil: unchanged
}

// saveBufs are the buffers keys and values are encoded in before bbolt
// (which copies keys) or the arena takes them.
type saveBufs struct {
	key, expiryKey, value []byte
}

// keep returns b unless a huge value made it too big to keep around.
func keep(b []byte) []byte {
	if cap(b) > arenaChunk {
		return nil
	}
	return b
}

// arena holds the values one write transaction puts, in shared chunks
// rather than one allocation each. bbolt keeps a value by reference until
// the transaction ends (it copies it into a page at commit), so the chunks
// are reused by the next transaction, never within one.
type arena struct {
	buf  []byte   // the chunk being filled
	used [][]byte // the chunks this transaction filled before buf
	free [][]byte // chunks no transaction references
}

// arenaChunk is the size of a chunk; a value over a quarter of it gets an
// allocation of its own, so that a chunk kept for reuse stays small.
const arenaChunk = 16 << 10

// arenaKeep is how many free chunks are kept for the next transactions: a
// Ready of a few hundred writes fills that many; a rare huge one leaves
// no more behind.
const arenaKeep = 64

// reset makes the chunks reusable: no transaction references them any more.
func (a *arena) reset() {
	for _, c := range a.used {
		if len(a.free) < arenaKeep {
			a.free = append(a.free, c[:0])
		}
	}
	clear(a.used)
	a.used = a.used[:0]
	a.buf = a.buf[:0]
}

// copy returns a copy of b that stays valid until the next reset.
func (a *arena) copy(b []byte) []byte {
	if len(b) > arenaChunk/4 {
		return slices.Clone(b)
	}
	if cap(a.buf)-len(a.buf) < len(b) {
		if a.buf != nil {
			a.used = append(a.used, a.buf)
		}
		if k := len(a.free); k > 0 {
			a.buf, a.free = a.free[k-1], a.free[:k-1]
		} else {
			a.buf = make([]byte, 0, arenaChunk)
		}
	}
	n := len(a.buf)
	a.buf = append(a.buf, b...)
	return a.buf[n:len(a.buf):len(a.buf)]
}

// Open opens (creating if needed) <dir>/member.db, with the directory
// created 0700. It takes the file's lock, waiting a second at most, so a
// second process on the same directory fails (ErrLocked) instead of
// hanging, and checks the file's pages before bbolt reads them: a damaged
// file is ErrDamaged, never a crash.
func Open(dir string) (*Store, error) {
	parents, err := mkdirAll(dir)
	if err != nil {
		return nil, fmt.Errorf("storage: %w", err)
	}
	opts := dbOptions()
	// The file's lock is taken and its pages checked before bbolt reads
	// them: a damaged file is an error, not a crash.
	opts.OpenFile = openChecked
	db, err := openDB(filepath.Join(dir, "member.db"), opts)
	if err != nil {
		return nil, fmt.Errorf("storage: opening %s: %w", dir, err)
	}
	// bbolt syncs what it writes in the file, not the name it made: until
	// the directory is synced, a power failure may take member.db away
	// whole, with every write acknowledged since. So before anything is,
	// at every start (a crash may have come between the file's making and
	// its directory's sync), and each directory made here in its parent.
	for _, d := range append(parents, dir) {
		if err := syncDir(d); err != nil {
			db.Close()
			return nil, fmt.Errorf("storage: opening %s: %w", dir, err)
		}
	}
	removeStaleSnapshots(dir)
	s := &Store{dir: filepath.Clean(dir), now: time.Now, flushc: make(chan struct{}, 1), commitc: make(chan struct{}), donec: make(chan struct{})}
	s.db.Store(db)
	var events []*Event
	err = db.Update(func(tx *bolt.Tx) error {
		if err := createBuckets(tx); err != nil {
			return err
		}
		meta := tx.Bucket(bucketMeta)
		s.applied.Store(getUint64(meta, keyApplied))
		s.index.Store(getUint64(meta, keyIndex))
		// Only the newest historySize events: older ones await deletion.
		c := tx.Bucket(bucketEvents).Cursor()
		for k, v := c.Last(); k != nil && len(events) < historySize; k, v = c.Prev() {
			e, err := unmarshalEvent(v)
			if err != nil {
				return err
			}
			events = append(events, e)
		}
		slices.Reverse(events)
		d, err := loadDedup(tx, s.applied.Load())
		if err != nil {
			return err
		}
		s.dedup = d
		s.nextExp.Store(firstExpiration(tx.Bucket(bucketExpiry)))
		auth, err := loadAuth(tx.Bucket(bucketAuth))
		s.auth.Store(auth)
		return err
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("storage: opening %s: %w", dir, err)
	}
	s.hub = newHub(s.index.Load(), events)
	s.acked.Store(s.applied.Load())
	return s, nil
}

// mkdirAll is os.MkdirAll(dir, 0o700) that returns the parents of the
// directories it made, whose entries only a sync of each parent makes
// durable.
func mkdirAll(dir string) ([]string, error) {
	dir = filepath.Clean(dir)
	var parents []string
	for d := dir; ; {
		if _, err := os.Stat(d); err == nil || !errors.Is(err, fs.ErrNotExist) {
			break
		}
		parent := filepath.Dir(d)
		parents = append(parents, parent)
		if parent == d {
			break
		}
		d = parent
	}
	return parents, os.MkdirAll(dir, 0o700)
}

// createBuckets creates every bucket member.db has that tx's file lacks.
func createBuckets(tx *bolt.Tx) error {
	for _, name := range [][]byte{bucketLog, bucketRaft, bucketKeys, bucketExpiry, bucketEvents,
		bucketRequests, bucketReqOrder, bucketMeta, bucketDedup, bucketAuth} {
		if _, err := tx.CreateBucketIfNotExists(name); err != nil {
			return err
		}
	}
	return nil
}

// dbOptions are the options member.db is opened with.
func dbOptions() *bolt.Options {
	return &bolt.Options{
		Timeout: lockTimeout,
		// The freelist is rebuilt at open instead of written at every
		// commit, which keeps commits cheap after log compaction.
		NoFreelistSync: true,
		FreelistType:   bolt.FreelistMapType,
		// Map address space up front, as etcd maps 10 GiB: each remap as
		// the file grows waits for every reader (a snapshot streamed to a
		// follower holds one for the whole transfer) and stalls every
		// writer, the Raft loop's commits with them. Untouched pages of
		// the mapping cost no memory.
		InitialMmapSize: initialMmapSize,
	}
}

// file is the open file, for Save's goroutine (see Store.db).
func (s *Store) file() *bolt.DB { return s.db.Load() }

// view runs fn in a read transaction of the open file. A read that began
// on a file a snapshot install has just replaced and closed begins again
// on the new one.
func (s *Store) view(fn func(*bolt.Tx) error) error {
	for {
		db := s.db.Load()
		err := db.View(fn)
		if errors.Is(err, berrors.ErrDatabaseNotOpen) && s.db.Load() != db {
			continue
		}
		return err
	}
}

// openDB is bolt.Open that turns a panic on this goroutine into an error.
// bbolt's freelist rebuild panics here on any problem its walk (on a
// goroutine of its own) reports, and what it reads here (meta pages, a
// synced freelist) may panic too; openChecked has checked all of it first,
// so this is a second guard. bbolt cleans nothing up after such a panic:
// the file it opened is closed here, which lets go of its lock, so that a
// later start can try again; its mapping and its walk's goroutine remain.
func openDB(path string, opts *bolt.Options) (db *bolt.DB, err error) {
	var file *os.File
	openFile := opts.OpenFile
	if openFile == nil {
		openFile = os.OpenFile
	}
	opts.OpenFile = func(name string, flag int, perm os.FileMode) (*os.File, error) {
		f, err := openFile(name, flag, perm)
		file = f
		return f, err
	}
	defer func() {
		if r := recover(); r != nil {
			if file != nil {
				file.Close()
			}
			db, err = nil, fmt.Errorf("%w: %v", ErrDamaged, r)
		}
	}()
	db, err = bolt.Open(path, 0o600, opts)
	if errors.Is(err, berrors.ErrTimeout) {
		err = ErrLocked
	}
	return db, err
}

// Close stops every watcher (their channels close) and closes the file.
func (s *Store) Close() error {
	if s.closed.Swap(true) {
		return ErrClosed
	}
	close(s.donec)
	s.hub.close()
	if s.open != nil {
		// The loop ended without Flush (it failed): what open held is in
		// the log, and is applied again at the next start.
		s.open.Rollback()
		s.open = nil
	}
	err := s.file().Close()
	s.retired.Wait()
	return err
}

// EndWatches ends every watcher and refuses new ones (Watch answers
// ErrClosed), while reads go on: the member that calls it will apply
// nothing more (its Raft loop ended), so no event would ever come.
func (s *Store) EndWatches() { s.hub.close() }

// Ready is one Raft Ready's worth of durable work. Save writes all of it in
// one bbolt transaction (one commit, so one pair of fsyncs per Ready).
type Ready struct {
	HardState *raftpb.HardState // nil: unchanged
	Entries   []*raftpb.Entry   // appended to the log; any saved entry at or above Entries[0].Index is replaced first
	// Snapshot is a snapshot received from the leader (nil, or index 0:
	// none). Its Data is the path ReceiveSnapshot returned, and nothing
	// else: the transport puts it there when it hands Raft the MsgSnap.
	// It replaces the keyspace, history and log; see Save.
	Snapshot  *raftpb.Snapshot
	Committed []*raftpb.Entry   // applied in order, after the append; entries at or below the applied index are skipped
	ConfState *raftpb.ConfState // the conf state after applying Committed's conf changes (nil: unchanged)
	// Defer lets Save leave its transaction open when the Ready holds no
	// entries, snapshot or conf state: nothing Raft needs durable before
	// its next step. See Save.
	Defer bool
}

// Applied is the outcome of one committed entry that carried a Request.
type Applied struct {
	Index uint64 // Raft index of the entry
	ID    uint64 // Request.ID
	Event *Event // the result on success
	Err   *Error // the v2 error on failure (the index in it is the store index at apply time)
	// Duplicate is set when a request with this ID was applied before
	// (raftkv retried a proposal that had made it): it was not applied
	// again, and Event and Err are nil.
	Duplicate bool
}

// Save persists rd and applies its committed entries in one transaction.
// EntryNormal entries carry an encoded Request (empty data: a leader's
// no-op); conf-change entries only advance the applied index. After the
// commit, events go to the watcher hub; the results come back for waiters.
// SYNC requests expire every key whose expiration is at or before Time,
// one "expire" event each, each bumping the store index. If the commit
// fails nothing is published and the error is returned.
//
// An entry whose data does not decode as a Request is skipped like a no-op
// on every member alike, and reported as an Applied with error 300.
// Entries that are not contiguous, or committed entries that do not follow
// the applied index, fail the whole Save.
//
// A Ready.Snapshot with index 0 (raft's empty snapshot) counts as none.
// Any other is installed first in the same transaction, before the entries
// (Raft's order: snapshot, then entries): the keyspace, expiry index, event
// history, applied request IDs, store index and applied index become the
// received file's; the whole saved log is dropped, since Raft forgets its
// log on restoring a snapshot; the snapshot metadata and its conf state are
// saved and the log's compaction point moves to the snapshot index. This
// member's own meta values stay. The transaction is the received file's,
// which then replaces member.db (see snapshotInstall; where open files
// cannot be renamed, the file's state is copied in instead). The file may be
// ahead of the snapshot (the leader copies its current state): the store's
// applied index then stays ahead of Raft's, and the committed entries in
// between are skipped when Raft hands them out again. Once committed,
// watchers are brought up to the new state (see hub.recover).
//
// With rd.Defer, a Ready that has nothing Raft needs durable before its
// next step (no entries, snapshot or conf state; the caller vouches that
// its hard state changes only the commit index) is applied in a
// transaction that stays open: the next Save continues it and commits
// both, so that a member in a cluster commits once per write rather than
// once to append and again to apply. Its results are returned at once. The
// entries are in the log already, so a crash before the commit loses
// nothing: they are applied again at the next start. Readers do not see
// the open transaction; a read that starts after a result was handed out
// waits for its commit (see settle), and asks for it on FlushRequests.
func (s *Store) Save(rd Ready) ([]Applied, error) {
	if err := s.usable(); err != nil {
		return nil, err
	}
	var install *snapshotInstall
	if rd.Snapshot != nil && rd.Snapshot.GetMetadata().GetIndex() != 0 {
		// What an open transaction applied commits first, on its own: the
		// snapshot replaces that state, and watchers must see it in order.
		if err := s.Flush(); err != nil {
			return nil, err
		}
		in, err := s.openSnapshot(rd.Snapshot)
		if err != nil {
			return nil, err
		}
		defer in.close()
		install = in
	}
	if install == nil && rd.HardState == nil && len(rd.Entries) == 0 && len(rd.Committed) == 0 && rd.ConfState == nil {
		return nil, nil // nothing to make durable: spare the fsyncs
	}
	var (
		out     []Applied
		a       applier
		applied uint64
		nextExp *time.Time
		auth    *AuthData
		req     Request
	)
	tx := s.open
	switch {
	case install != nil && !install.behind && !install.copy:
		// Save goes on in the received file's transaction (s.open was
		// flushed above).
		s.arena.reset()
		tx = install.tx
	case tx == nil:
		// The previous transaction has ended: its values are in the file.
		s.arena.reset()
		var err error
		if tx, err = s.file().Begin(true); err != nil {
			return nil, closedErr(err)
		}
	}
	s.open = nil
	defer s.rollbackOnPanic(tx)
	err := func() error {
		defer func() { s.bufs = saveBufs{key: keep(a.kbuf), expiryKey: keep(a.ebuf), value: keep(a.scratch)} }()
		meta := tx.Bucket(bucketMeta)
		if s.dedup == nil {
			d, err := loadDedup(tx, getUint64(meta, keyApplied))
			if err != nil {
				return err
			}
			s.dedup = d
		}
		if install != nil {
			if install.behind {
				if err := install.keepLive(tx); err != nil {
					return err
				}
				// The log that held our request IDs was just dropped: they
				// become our seed.
				if err := s.dedup.saveSeed(tx, install.applied); err != nil {
					return err
				}
			} else {
				if install.copy {
					if err := install.copyInto(tx); err != nil {
						return fmt.Errorf("storage: installing snapshot %d: %w", install.meta.GetIndex(), err)
					}
				}
				// The file's applied request IDs replace ours: its seed
				// holds them all (prepareSnapshotFile), and becomes ours
				// (in a copy, written into the live file).
				d, err := loadDedup(install.tx, install.applied)
				if err != nil {
					return fmt.Errorf("storage: installing snapshot %d: %w", install.meta.GetIndex(), err)
				}
				if install.copy {
					if err := d.saveSeed(tx, install.applied); err != nil {
						return err
					}
				}
				s.dedup = d
			}
		}
		log := tx.Bucket(bucketLog)
		log.FillPercent = appendFill
		if err := appendLog(log, rd.Entries, &s.arena, &s.bufs.value); err != nil {
			return err
		}
		if rd.HardState != nil {
			if err := putProto(meta, keyHardState, rd.HardState); err != nil {
				return err
			}
		}
		applied = getUint64(meta, keyApplied)
		a = applier{
			view:      view{keys: tx.Bucket(bucketKeys), index: getUint64(meta, keyIndex)},
			expiry:    tx.Bucket(bucketExpiry),
			events:    tx.Bucket(bucketEvents),
			arena:     &s.arena,
			published: make([]*Event, 0, len(rd.Committed)),
			ebuf:      s.bufs.expiryKey,
			scratch:   s.bufs.value,
			watched:   s.hub.count.Load() > 0,
			auth:      tx.Bucket(bucketAuth),
		}
		a.kbuf = s.bufs.key
		a.events.FillPercent = appendFill
		startIndex := a.index
		if len(rd.Committed) > 0 {
			out = make([]Applied, 0, len(rd.Committed))
		}
		// One clock reading for the whole Ready: its entries are applied
		// within microseconds of each other.
		clocked := false
		for _, ent := range rd.Committed {
			idx := ent.GetIndex()
			if idx <= applied {
				continue
			}
			if idx != applied+1 {
				return fmt.Errorf("storage: committed entry %d does not follow the applied index %d", idx, applied)
			}
			applied = idx
			if ent.GetType() != raftpb.EntryNormal || len(ent.GetData()) == 0 {
				continue // conf changes and the leader's no-op
			}
			r := &req
			if err := decodeRequest(ent.GetData(), r); err != nil {
				out = append(out, Applied{Index: idx,
					Err: NewError(EcodeRaftInternal, err.Error(), a.index)})
				continue
			}
			res := Applied{Index: idx, ID: r.ID}
			if r.ID != 0 && s.dedup.note(r.ID) {
				res.Duplicate = true
				out = append(out, res)
				continue
			}
			if !clocked {
				a.now, clocked = s.now(), true
			}
			e, verr := a.apply(r)
			if a.err != nil {
				return a.err
			}
			if e != nil && r.Method != MethodQGet {
				if err := a.emit(e); err != nil {
					return err
				}
			}
			res.Event, res.Err = e, verr
			out = append(out, res)
		}
		if rd.ConfState != nil {
			if err := putProto(tx.Bucket(bucketRaft), keyConfState, rd.ConfState); err != nil {
				return err
			}
		}
		if err := putUint64(meta, keyApplied, applied); err != nil {
			return err
		}
		if a.index != startIndex || install != nil {
			if err := putUint64(meta, keyIndex, a.index); err != nil {
				return err
			}
			if err := a.trimEvents(); err != nil {
				return err
			}
		}
		if a.authChanged || install != nil {
			var err error
			if auth, err = loadAuth(a.auth); err != nil {
				return err
			}
		}
		if a.expiryChanged || install != nil {
			nextExp = firstExpiration(a.expiry)
		} else if s.pend.applied != 0 {
			nextExp = s.pend.nextExp
		} else {
			nextExp = s.nextExp.Load()
		}
		return nil
	}()
	if err != nil {
		tx.Rollback()
		s.abandon()
		return nil, closedErr(err)
	}
	s.pend.published = append(s.pend.published, a.published...)
	s.pend.stats.merge(&a.stats)
	s.pend.applied, s.pend.index, s.pend.nextExp = applied, a.index, nextExp
	if auth != nil {
		s.pend.auth = auth
		s.authAcked.Store(applied)
	}
	if rd.Defer && install == nil && len(rd.Entries) == 0 && rd.ConfState == nil {
		s.open = tx
		s.acked.Store(applied)
		return out, nil
	}
	if err := s.commit(tx, install); err != nil {
		return nil, err
	}
	return out, nil
}

// commit commits tx and only then lets readers see what it holds: the
// applied and store indexes, the counters, the events (to watchers).
func (s *Store) commit(tx *bolt.Tx, install *snapshotInstall) error {
	if err := tx.Commit(); err != nil {
		s.failed.Store(true)
		s.abandon()
		return closedErr(err)
	}
	if install != nil && !install.behind && !install.copy {
		if err := s.swapIn(install); err != nil {
			s.failed.Store(true)
			s.abandon()
			return err
		}
	}
	p := s.pend
	s.pend = pending{}
	// The auth data first: Auth trusts it once the applied index covers
	// the change (see authAcked).
	if p.auth != nil {
		s.auth.Store(p.auth)
	}
	s.nextExp.Store(p.nextExp)
	s.counters.add(&p.stats)
	s.index.Store(p.index)
	if install != nil {
		s.installed(install)
	}
	if s.beforePublish != nil {
		s.beforePublish()
	}
	s.hub.publish(p.published, p.index)
	// Readers that wait for the commit (settle) go on only now: a watch
	// that starts after the answer it waited for registers after that
	// answer's event, which it must not be handed.
	s.applied.Store(p.applied)
	s.acked.Store(p.applied)
	s.wakeSettlers()
	return nil
}

// abandon forgets a transaction that was rolled back. The request IDs it
// noted are forgotten by rebuilding the set from the file, as Open does.
// Results it handed out (a deferred Save's) came from committed log
// entries, which are applied again at the next start; until then the
// store has failed (errFailed), and readers waiting for them get that.
func (s *Store) abandon() {
	if s.acked.Load() > s.applied.Load() {
		s.failed.Store(true)
	}
	s.dedup = nil
	s.pend = pending{}
	s.acked.Store(s.applied.Load())
	s.wakeSettlers()
}

// wakeSettlers wakes the readers settle has waiting, to look again.
func (s *Store) wakeSettlers() {
	s.commitMu.Lock()
	close(s.commitc)
	s.commitc = make(chan struct{})
	s.commitMu.Unlock()
}

// Flush commits the transaction a deferred Save left open, if any. Save's
// goroutine only.
func (s *Store) Flush() error {
	if s.open == nil {
		return nil
	}
	tx := s.open
	s.open = nil
	defer s.rollbackOnPanic(tx)
	return s.commit(tx, nil)
}

// rollbackOnPanic ends tx and forgets what it held when its caller panics
// (in bbolt, say), then lets the panic go on: a write transaction left open
// would keep bbolt's lock, and Close would wait for it forever. Rolling
// back a transaction that committed does nothing.
func (s *Store) rollbackOnPanic(tx *bolt.Tx) {
	if r := recover(); r != nil {
		_ = tx.Rollback()
		s.open = nil
		s.abandon()
		panic(r)
	}
}

// Deferred reports whether a deferred Save's transaction awaits Flush.
// Save's goroutine only.
func (s *Store) Deferred() bool { return s.open != nil }

// FlushRequests receives when a reader waits for a deferred Save's results
// to become visible: Save's goroutine should then Flush.
func (s *Store) FlushRequests() <-chan struct{} { return s.flushc }

// settle waits until the results every Save has handed out so far are
// visible to readers: a read that follows a write's answer sees the write.
// It asks Save's goroutine to Flush, which commits a deferred Save.
func (s *Store) settle() error {
	target := s.acked.Load()
	for {
		// acked is read before failed: abandon sets failed first.
		done := s.applied.Load() >= min(target, s.acked.Load())
		if err := s.usable(); err != nil || done {
			return err
		}
		s.commitMu.Lock()
		ch := s.commitc
		s.commitMu.Unlock()
		if s.applied.Load() >= min(target, s.acked.Load()) {
			return s.usable()
		}
		select {
		case s.flushc <- struct{}{}:
		default:
		}
		select {
		case <-ch:
		case <-s.donec:
			return ErrClosed
		}
	}
}

// appendFill is the fill percent of buckets whose keys only ever grow (the
// log, the events): bbolt splits a full leaf in halves by default, and
// the left half of an append-only bucket is never filled again.
const appendFill = 0.9

func firstExpiration(b *bolt.Bucket) *time.Time {
	k, _ := b.Cursor().First()
	if exp, _, ok := parseExpiryKey(k); ok {
		t := time.Unix(0, exp)
		return &t
	}
	return nil
}

// AppliedIndex returns the last applied Raft index.
func (s *Store) AppliedIndex() uint64 { return s.applied.Load() }

// Index returns the current store (etcd) index: the X-Etcd-Index.
func (s *Store) Index() uint64 { return s.index.Load() }

// Get reads a key or directory as etcd's v2 GET does (children one level
// deep unless recursive; hidden "_" children never listed; sorted byte-wise
// by key when sorted, else in whatever order is cheapest). TTLs are computed
// against now. Errors: 100 (cause: the first missing path component), 104.
//
// Listings always come sorted: the keyspace is ordered that way.
func (s *Store) Get(path string, recursive, sorted bool, now time.Time) (*Event, error) {
	if err := s.usable(); err != nil {
		return nil, err
	}
	if err := s.settle(); err != nil {
		return nil, err
	}
	var (
		e    *Event
		verr *Error
	)
	err := s.view(func(tx *bolt.Tx) error {
		keys, meta := tx.Bucket(bucketKeys), tx.Bucket(bucketMeta)
		if keys == nil || meta == nil {
			// Every file this store opens has both (Open's check, the
			// snapshot install's): a read that finds one missing reads
			// a tree that went wrong in memory or under it.
			return fmt.Errorf("%w: transaction %d (%d bytes) has no keys or meta bucket", ErrDamaged, tx.ID(), tx.Size())
		}
		v := view{keys: keys, index: getUint64(meta, keyIndex), now: now}
		e, verr = v.getEvent(cleanPath(path), recursive)
		return v.err
	})
	if err != nil {
		return nil, closedErr(err)
	}
	if verr != nil {
		s.counters.gets[1].Add(1)
		return nil, verr
	}
	s.counters.gets[0].Add(1)
	return e, nil
}

// NextExpiration returns the earliest expiration among live keys, if any:
// the leader's reaper proposes a SYNC once it is due. It counts what the
// last Save applied, committed to disk or not yet (a deferred apply, see
// Ready.Defer): a SYNC enters the log after those entries, so it finds
// their keys. Call it from the goroutine that calls Save.
func (s *Store) NextExpiration() (time.Time, bool) {
	t := s.nextExp.Load()
	if s.pend.applied != 0 {
		t = s.pend.nextExp
	}
	if t != nil {
		return *t, true
	}
	return time.Time{}, false
}

// Meta reads a member-level value (IDs, cluster membership) from the meta
// bucket; nil when absent (or when the store is closed).
func (s *Store) Meta(key string) []byte {
	if s.closed.Load() {
		return nil
	}
	var out []byte
	_ = s.view(func(tx *bolt.Tx) error {
		if v := tx.Bucket(bucketMeta).Get([]byte(metaUserPrefix + key)); v != nil {
			out = append([]byte{}, v...)
		}
		return nil
	})
	return out
}

// SetMeta writes a member-level value durably.
func (s *Store) SetMeta(key string, value []byte) error {
	return s.SetMetas(map[string][]byte{key: value})
}

// SetMetas stores several member values in one commit.
func (s *Store) SetMetas(values map[string][]byte) error {
	if err := s.usable(); err != nil {
		return err
	}
	// bbolt has one writer: a deferred Save's transaction commits first.
	if err := s.Flush(); err != nil {
		return err
	}
	err := s.file().Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketMeta)
		for k, v := range values {
			if err := b.Put([]byte(metaUserPrefix+k), v); err != nil {
				return err
			}
		}
		return nil
	})
	return closedErr(err)
}

// WriteSnapshot writes a consistent copy of the whole file (one read
// transaction) to w, for a follower that needs a snapshot.
func (s *Store) WriteSnapshot(w io.Writer) (int64, error) {
	if s.closed.Load() {
		return 0, ErrClosed
	}
	var n int64
	err := s.view(func(tx *bolt.Tx) error {
		var err error
		n, err = tx.WriteTo(w)
		return err
	})
	return n, closedErr(err)
}

// closedErr reports bbolt's "database not open" (Close won a race with the
// caller) as ErrClosed.
func closedErr(err error) error {
	if errors.Is(err, berrors.ErrDatabaseNotOpen) {
		return ErrClosed
	}
	return err
}

func getUint64(b *bolt.Bucket, key []byte) uint64 {
	if v := b.Get(key); len(v) == 8 {
		return binary.BigEndian.Uint64(v)
	}
	return 0
}

func putUint64(b *bolt.Bucket, key []byte, v uint64) error {
	var buf [8]byte
	binary.BigEndian.PutUint64(buf[:], v)
	return b.Put(key, buf[:])
}
