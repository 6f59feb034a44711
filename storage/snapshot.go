package storage

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
	"go.etcd.io/raft/v3/raftpb"
)

// A member that falls too far behind gets the leader's whole member.db,
// written by WriteSnapshot (one read transaction: a consistent copy). The
// follower streams it to <dir>/snap.tmp with ReceiveSnapshot, and Raft hands
// the MsgSnap back in a Ready whose Snapshot.Data is that path; Save then
// makes the file this member's (its own Raft state and member values go
// in) and renames it over member.db (see snapshotInstall).
//
// The copy is the leader's state at its applied index when the copy was
// taken, which may be past the Raft snapshot's index: Raft then hands the
// entries in between out again, and Save skips them as already applied, as
// etcd's v3 backend does with its consistent index.

// ErrSnapshotInvalid is returned by ReceiveSnapshot when the stream ends
// early or is not a member.db, or the file's state is older than the
// snapshot it is sent for, or its history does not decode: the sender's
// fault, not this member's.
var ErrSnapshotInvalid = errors.New("storage: invalid snapshot")

// snapshotName begins the names of received snapshots: snap.tmp.* while
// one is written, snap.tmp-<index>-<n> once it waits for Raft to install
// it (see ReceiveSnapshot).
const snapshotName = "snap.tmp"

// replicatedBuckets are the buckets a snapshot brings: the state every
// member holds alike. The Raft log, hard state and member values (the raft
// and meta buckets) are this member's own, taken from its live file. A
// snapshot may lack the auth bucket (a leader of an earlier version had
// none): prepareSnapshotFile then adds an empty one.
var replicatedBuckets = [][]byte{bucketKeys, bucketExpiry, bucketEvents, bucketRequests, bucketReqOrder, bucketAuth}

// receivedIndex is the snapshot index in the name of a file
// ReceiveSnapshot left in this store's directory; ok is false for any other
// path.
func (s *Store) receivedIndex(path string) (index uint64, ok bool) {
	if filepath.Dir(path) != s.dir {
		return 0, false
	}
	rest, ok := strings.CutPrefix(filepath.Base(path), snapshotName+"-")
	if !ok {
		return 0, false
	}
	idx, n, ok := strings.Cut(rest, "-")
	index, err := strconv.ParseUint(idx, 10, 64)
	if _, err2 := strconv.ParseUint(n, 10, 64); !ok || err != nil || err2 != nil {
		return 0, false
	}
	return index, true
}

// ReceiveSnapshot streams a snapshot sent by the leader (WriteSnapshot's
// output) for snapshot index to <dir>/snap.tmp-<index>-<n>, fsynced, and
// returns that path: the value for the Snapshot.Data of the MsgSnap that
// goes with it. The stream is copied through a small buffer, never held in
// memory.
//
// The file is written under a temporary name, checked (a bbolt file holding
// the store's buckets, every page reachable) and only then renamed into
// place, so Save never sees a partial or damaged file. A stream that fails
// to read or is not such a file gives an error wrapping ErrSnapshotInvalid.
// Each file has a name of its own: a second snapshot received while Raft
// has yet to take the first one's message leaves that one's file alone.
// Installing a snapshot makes its file member.db (or copies its state in:
// see snapshotInstall), and removes every other one Raft can no longer
// take (at or below its snapshot index).
func (s *Store) ReceiveSnapshot(r io.Reader, index uint64) (path string, err error) {
	if s.closed.Load() {
		return "", ErrClosed
	}
	dir := s.dir
	f, err := os.CreateTemp(dir, snapshotName+".*")
	if err != nil {
		return "", fmt.Errorf("storage: receiving a snapshot: %w", err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	src := &readErrReader{r: r}
	if _, err := io.Copy(f, src); err != nil {
		if src.err != nil {
			return "", fmt.Errorf("%w: %w", ErrSnapshotInvalid, src.err)
		}
		return "", fmt.Errorf("storage: receiving a snapshot: %w", err)
	}
	if err := f.Sync(); err != nil {
		return "", fmt.Errorf("storage: receiving a snapshot: %w", err)
	}
	if err := f.Close(); err != nil {
		return "", fmt.Errorf("storage: receiving a snapshot: %w", err)
	}
	if err := checkSnapshotFile(tmp); err != nil {
		return "", err
	}
	history, err := prepareSnapshotFile(tmp, index)
	if err != nil {
		return "", err
	}
	path = filepath.Join(dir, fmt.Sprintf("%s-%d-%d", snapshotName, index, s.received.Add(1)))
	s.histories.Store(path, history)
	if err := os.Rename(tmp, path); err != nil {
		s.histories.Delete(path)
		return "", fmt.Errorf("storage: receiving a snapshot: %w", err)
	}
	// The rename must survive a crash before the install commits.
	if err := syncDir(dir); err != nil {
		os.Remove(path)
		s.histories.Delete(path)
		return "", fmt.Errorf("storage: receiving a snapshot: %w", err)
	}
	return path, nil
}

// readErrReader remembers a failed read, so ReceiveSnapshot can tell the
// sender's failures from its own disk's.
type readErrReader struct {
	r   io.Reader
	err error
}

func (r *readErrReader) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	if err != nil && err != io.EOF {
		r.err = err
	}
	return n, err
}

func openSnapshotFile(path string) (*bolt.DB, error) {
	return bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
}

// checkSnapshotFile verifies that path is a whole member.db: its pages
// first (checkFile: bbolt's own check would crash the process on a
// damaged page, or fault on a page past the end of a truncated file),
// then the buckets an install copies.
func checkSnapshotFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	err = checkOpenFile(f)
	f.Close()
	if err != nil {
		return fmt.Errorf("%w: %w", ErrSnapshotInvalid, err)
	}
	db, err := openSnapshotFile(path)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrSnapshotInvalid, err)
	}
	defer db.Close()
	return db.View(func(tx *bolt.Tx) error {
		for _, name := range append([][]byte{bucketMeta}, replicatedBuckets...) {
			if tx.Bucket(name) == nil && !bytes.Equal(name, bucketAuth) {
				return fmt.Errorf("%w: no %s bucket", ErrSnapshotInvalid, name)
			}
		}
		return nil
	})
}

// prepareSnapshotFile readies a received, checked file to become a
// member.db, doing here, off the Raft loop, what does not depend on this
// member's state: the applied request IDs the leader's log holds become
// the file's seed (see dedup), the leader's log goes, every bucket exists,
// and bbolt writes its freelist, so that the install opens the file
// without walking its pages (member.db keeps none: see dbOptions).
//
// What the install would otherwise find wrong with the file is refused
// here, as a bad stream is: a state older than the snapshot it is sent
// for, an event that does not decode. It returns the file's history, which
// the install hands to watchers (decoding it there held the Raft loop for
// tens of milliseconds with large values).
func prepareSnapshotFile(path string, index uint64) (history []*Event, err error) {
	opts := dbOptions()
	opts.NoFreelistSync = false
	opts.InitialMmapSize = 0 // open once, briefly, beside the live file
	db, err := openDB(path, opts)
	if err != nil {
		return nil, fmt.Errorf("storage: receiving a snapshot: %w", err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		if err := createBuckets(tx); err != nil {
			return err
		}
		applied := getUint64(tx.Bucket(bucketMeta), keyApplied)
		if applied < index {
			return fmt.Errorf("%w: the file's applied index %d is older than snapshot %d", ErrSnapshotInvalid, applied, index)
		}
		h, err := readHistory(tx.Bucket(bucketEvents))
		if err != nil {
			return fmt.Errorf("%w: %w", ErrSnapshotInvalid, err)
		}
		history = h
		d, err := loadDedup(tx, applied)
		if err != nil {
			return fmt.Errorf("%w: %w", ErrSnapshotInvalid, err)
		}
		if err := d.saveSeed(tx, applied); err != nil {
			return err
		}
		if err := tx.DeleteBucket(bucketLog); err != nil {
			return err
		}
		_, err = tx.CreateBucket(bucketLog)
		return err
	})
	if cerr := db.Close(); err == nil {
		err = cerr
	}
	if err != nil && !errors.Is(err, ErrSnapshotInvalid) {
		err = fmt.Errorf("storage: receiving a snapshot: %w", err)
	}
	if err != nil {
		return nil, err
	}
	return history, nil
}

// snapshotInstall is a received snapshot being installed by one Save.
//
// The received file becomes member.db: Save runs in a write transaction of
// that file (tx), which takes this member's own state from the live file
// (the meta and raft buckets: hard state, member values) and resets the
// log to the snapshot, then commits; the file is renamed over member.db
// and replaces the live one for every reader (see Store.db). What the
// leader's state costs to take in — its keys, history and request IDs —
// is then a rename, not a copy: copying it in one transaction held the
// Raft loop, heartbeats and all, for seconds (1.6 s for 220 MB).
// prepareSnapshotFile did the rest when the file arrived, off the loop.
// Where an open file cannot be renamed (installByRename), the file's state
// is copied into the live file in Save's transaction instead.
type snapshotInstall struct {
	path    string
	meta    *raftpb.SnapshotMetadata
	applied uint64 // the file's applied index, or the live one when behind
	index   uint64 // the file's store index, or the live one when behind
	// behind: the file's state is older than the live one, which stays;
	// only the log and the snapshot's place reset, in the live file.
	behind bool
	copy   bool // the file's state is copied into the live file

	db      *bolt.DB // the received file; nil when behind
	tx      *bolt.Tx // Save's transaction on db; a read transaction when copy
	events  []*Event // the file's history, for watchers
	swapped bool     // db is member.db now
}

// openSnapshot opens the file a Ready's snapshot refers to and, unless
// its state is behind the live one, begins Save's transaction on it with
// this member's own state taken over (adopt). Only the file
// ReceiveSnapshot writes is accepted: Data comes from a peer's message
// path, and must never name another file. Save's goroutine, with no
// transaction open on the live file.
func (s *Store) openSnapshot(snap *raftpb.Snapshot) (*snapshotInstall, error) {
	path := string(snap.GetData())
	if path == "" {
		return nil, ErrSnapshotUnsupported
	}
	if _, ok := s.receivedIndex(path); !ok {
		return nil, fmt.Errorf("storage: snapshot file %q is not one this store received", path)
	}
	md := snap.GetMetadata()
	history, _ := s.histories.LoadAndDelete(path)
	if _, err := os.Stat(path); err != nil {
		return nil, fmt.Errorf("storage: installing snapshot %d: %w", md.GetIndex(), err)
	}
	opts := dbOptions()
	opts.OpenFile = func(name string, flag int, perm os.FileMode) (*os.File, error) {
		return os.OpenFile(name, flag&^os.O_CREATE, perm) // never an empty new file
	}
	if !installByRename {
		// Only read: a file opened for writing is grown to its mapping
		// (Windows), and it must be closed before it is removed.
		opts.ReadOnly, opts.InitialMmapSize = true, 0
	}
	db, err := openDB(path, opts)
	if err != nil {
		return nil, fmt.Errorf("storage: installing snapshot %d: %w", md.GetIndex(), err)
	}
	in := &snapshotInstall{path: path, meta: md, db: db}
	ok := false
	defer func() {
		if !ok {
			in.close()
		}
	}()
	if in.tx, err = db.Begin(installByRename); err != nil {
		return nil, fmt.Errorf("storage: installing snapshot %d: %w", md.GetIndex(), err)
	}
	meta := in.tx.Bucket(bucketMeta)
	if meta == nil {
		return nil, fmt.Errorf("storage: installing snapshot %d: the file has no meta bucket", md.GetIndex())
	}
	in.applied, in.index = getUint64(meta, keyApplied), getUint64(meta, keyIndex)
	if in.applied < md.GetIndex() {
		return nil, fmt.Errorf("storage: snapshot file at applied index %d is older than snapshot %d", in.applied, md.GetIndex())
	}
	if in.applied < s.applied.Load() {
		in.close()
		in.behind = true
		ok = true
		return in, nil
	}
	// The history was decoded as the file arrived (ReceiveSnapshot); it
	// is read here only if its stash is gone.
	if h, stashed := history.([]*Event); stashed {
		in.events = h
	} else if in.events, err = readHistory(in.tx.Bucket(bucketEvents)); err != nil {
		return nil, fmt.Errorf("storage: installing snapshot %d: %w", md.GetIndex(), err)
	}
	if !installByRename {
		in.copy = true
		ok = true
		return in, nil
	}
	live, err := s.file().Begin(false)
	if err != nil {
		return nil, closedErr(err)
	}
	defer live.Rollback()
	if err := in.adopt(live); err != nil {
		return nil, fmt.Errorf("storage: installing snapshot %d: %w", md.GetIndex(), err)
	}
	ok = true
	return in, nil
}

// adopt makes in.tx's file this member's: its own meta and raft buckets
// come from the live file, and the snapshot's place and the file's indexes
// are set.
func (in *snapshotInstall) adopt(live *bolt.Tx) error {
	for _, name := range [][]byte{bucketMeta, bucketRaft} {
		if err := replaceBucket(in.tx, live.Bucket(name), name, true); err != nil {
			return err
		}
	}
	return in.resetRaft(in.tx)
}

// copyInto is the install where the file cannot become member.db: its
// replicated buckets are copied into tx, the live file's transaction.
// Their values stay valid: the file's transaction ends after tx commits.
func (in *snapshotInstall) copyInto(tx *bolt.Tx) error {
	for _, name := range replicatedBuckets {
		if err := replaceBucket(tx, in.tx.Bucket(name), name, false); err != nil {
			return err
		}
	}
	return in.resetRaft(tx)
}

// readHistory decodes the newest historySize events of an events bucket.
func readHistory(b *bolt.Bucket) ([]*Event, error) {
	var events []*Event
	err := b.ForEach(func(_, v []byte) error {
		e, err := unmarshalEvent(v)
		if err != nil {
			return err
		}
		events = append(events, e)
		if len(events) > historySize {
			events = events[1:]
		}
		return nil
	})
	return events, err
}

// resetRaft resets tx's Raft log to the snapshot: Raft discards its whole
// log when it restores a snapshot (raftLog.restore), so no saved entry,
// even above the snapshot index, may be read back later. The snapshot's
// metadata, its conf state and the indexes are saved with it.
func (in *snapshotInstall) resetRaft(tx *bolt.Tx) error {
	if err := tx.DeleteBucket(bucketLog); err != nil {
		return err
	}
	if _, err := tx.CreateBucket(bucketLog); err != nil {
		return err
	}
	raft, meta := tx.Bucket(bucketRaft), tx.Bucket(bucketMeta)
	cs := raftpb.EnsureConfState(in.meta.GetConfState())
	md := &raftpb.SnapshotMetadata{Index: new(in.meta.GetIndex()), Term: new(in.meta.GetTerm()), ConfState: cs}
	if err := putProto(raft, keySnapshot, md); err != nil {
		return err
	}
	if err := putProto(raft, keyConfState, cs); err != nil {
		return err
	}
	for _, kv := range []struct {
		k []byte
		v uint64
	}{{keyApplied, in.applied}, {keyIndex, in.index}, {keyCompacted, in.meta.GetIndex()}} {
		if err := putUint64(meta, kv.k, kv.v); err != nil {
			return err
		}
	}
	return nil
}

// keepLive handles a file behind the live state (a member that installed
// a file ahead of its snapshot index, then a snapshot of a leader that had
// applied less): the live state stays as it is, since both are the same
// history, the live one further along, and replacing it would take reads
// and watchers back in time. Only the log and the snapshot's place reset,
// in tx, the live file's transaction.
func (in *snapshotInstall) keepLive(tx *bolt.Tx) error {
	meta := tx.Bucket(bucketMeta)
	in.applied, in.index = getUint64(meta, keyApplied), getUint64(meta, keyIndex)
	return in.resetRaft(tx)
}

func (in *snapshotInstall) close() {
	if in.db == nil || in.swapped {
		return
	}
	if in.tx != nil {
		_ = in.tx.Rollback()
	}
	in.db.Close()
	in.db, in.tx = nil, nil
}

// replaceBucket makes name in tx a copy of src, a bucket of another file.
// bbolt keeps a value by reference until commit: with clone, each is
// copied, so src's transaction may end first; without, it must not.
func replaceBucket(tx *bolt.Tx, src *bolt.Bucket, name []byte, clone bool) error {
	if err := tx.DeleteBucket(name); err != nil && !errors.Is(err, berrors.ErrBucketNotFound) {
		return err
	}
	dst, err := tx.CreateBucket(name)
	if err != nil {
		return err
	}
	if src == nil {
		return nil
	}
	return src.ForEach(func(k, v []byte) error {
		if v == nil {
			return fmt.Errorf("unexpected nested bucket %q in %s", k, name)
		}
		if clone {
			v = bytes.Clone(v)
		}
		return dst.Put(k, v)
	})
}

// swapIn makes the installed file member.db, once Save's transaction on it
// has committed, and then the file every read goes to. The live file
// closes once its last reader is done (a snapshot being streamed to a peer
// may hold one for a while). A crash before the rename leaves the live
// file without this Save's Ready (and Open removes the received one);
// after the directory's fsync, the new one, whole; in between, either.
func (s *Store) swapIn(in *snapshotInstall) error {
	if err := os.Rename(in.path, filepath.Join(s.dir, "member.db")); err != nil {
		return fmt.Errorf("storage: installing snapshot %d: %w", in.meta.GetIndex(), err)
	}
	// Readers see the new state only once the rename is durable: a crash
	// must not take them back to the old file. If it cannot be made so,
	// the store fails (no reader sees either file), holding the lock of
	// the file that is member.db now.
	synced := syncDir(s.dir)
	old := s.db.Swap(in.db)
	in.swapped = true
	s.retired.Add(1)
	go func() {
		defer s.retired.Done()
		old.Close()
	}()
	if synced != nil {
		return fmt.Errorf("storage: installing snapshot %d: %w", in.meta.GetIndex(), synced)
	}
	return nil
}

// installed runs after Save's transaction has committed: watchers learn
// of the new state, and the received files go: this one, unless it is
// member.db now, and every one Raft can no longer take (its snapshot index
// is at or below this one's, so at or below Raft's commit index: Raft
// ignores such a snapshot). Not below the applied index: a file may be
// ahead of its snapshot index, and Raft takes a snapshot above its commit
// index whatever its file applied.
func (s *Store) installed(in *snapshotInstall) {
	if !in.behind {
		s.hub.recover(in.events, in.index)
	}
	if !in.swapped {
		in.close() // a file that is open cannot be removed everywhere
		os.Remove(in.path)
	}
	s.DropReceivedSnapshots(in.meta.GetIndex())
}

// DropReceivedSnapshots removes the received snapshot files whose snapshot
// index is at or below index. Raft ignores a snapshot at or below its
// commit index, so that is the index to give: the files of snapshots Raft
// did not take, or whose message was dropped on the way to it, go.
func (s *Store) DropReceivedSnapshots(index uint64) {
	dir := s.dir
	entries, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range entries {
		p := filepath.Join(dir, e.Name())
		if i, ok := s.receivedIndex(p); ok && i <= index {
			os.Remove(p)
		}
	}
	// Histories of files gone another way (a message the loop never took).
	s.histories.Range(func(k, _ any) bool {
		if i, ok := s.receivedIndex(k.(string)); !ok || i <= index {
			s.histories.Delete(k)
		}
		return true
	})
}

// DropReceivedSnapshot removes the received snapshot file path names, one
// Raft did not take; any other path is left alone.
func (s *Store) DropReceivedSnapshot(path string) {
	if _, ok := s.receivedIndex(path); ok {
		os.Remove(path)
		s.histories.Delete(path)
	}
}

// removeStaleSnapshots deletes received snapshots left by an earlier run:
// the MsgSnap that went with them was lost with the process.
func removeStaleSnapshots(dir string) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), snapshotName) {
			os.Remove(filepath.Join(dir, e.Name()))
		}
	}
}

// recover replaces the history with a snapshot's and brings every live
// watcher up to it.
//
// etcd 3.4 recovers its v2 store from a snapshot by unmarshalling over it:
// watchers stay registered, the history is replaced, and a watcher never
// hears of the events the snapshot skipped over (error 400, "watcher is
// cleared due to etcd recovery", is defined but never sent). Here a watcher
// gets the events it missed from the snapshot's history, as a new watch
// with its waitIndex would; when that history no longer reaches back to
// the watcher's next index, its channel closes, so the client watches
// again and gets error 401 instead of silently missing events.
func (h *hub) recover(events []*Event, index uint64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.history = history{events: make([]*Event, historySize)}
	for _, e := range events {
		h.history.add(e)
	}
	h.index = index
	type live struct {
		w   *Watcher
		key string
	}
	var ws []live
	var walk func(n *watchNode, key string)
	walk = func(n *watchNode, key string) {
		for w := range n.watchers {
			ws = append(ws, live{w, key})
		}
		for name, c := range n.children {
			walk(c, joinPath(key, name))
		}
	}
	walk(&h.root, "/")
	for _, l := range ws {
		w := l.w
		next := max(w.since, w.lastSent+1)
		if next > h.history.lastIndex() {
			continue // nothing it waits for has happened yet
		}
		if h.history.n == 0 || h.history.startIndex() > next {
			h.end(w)
			continue
		}
		for i := h.history.first(next); i < h.history.n; i++ {
			e := h.history.at(i)
			if !historyMatch(e, l.key, w.recursive) {
				continue
			}
			ne := *e
			ne.EtcdIndex = index
			if !h.send(w, &ne) {
				break
			}
		}
	}
}

// SnapshotMeta reads, from a received snapshot file (the path in a
// MsgSnap's Data), before Save installs it, its applied index (a file
// behind this member's applied index leaves its state as it is: see
// snapshotInstall.keepLive) and the member values keys name, as SetMeta
// writes them, nil when absent. Install keeps this member's own values, so
// a value that describes the cluster rather than the member (raftkv's
// member list) is read from the leader's file this way.
func SnapshotMeta(path string, keys ...string) (applied uint64, values [][]byte, err error) {
	db, err := openSnapshotFile(path)
	if err != nil {
		return 0, nil, fmt.Errorf("storage: reading snapshot %s: %w", path, err)
	}
	defer db.Close()
	values = make([][]byte, len(keys))
	err = db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketMeta)
		if b == nil {
			return nil
		}
		applied = getUint64(b, keyApplied)
		for i, key := range keys {
			if v := b.Get([]byte(metaUserPrefix + key)); v != nil {
				values[i] = append([]byte{}, v...)
			}
		}
		return nil
	})
	return applied, values, err
}
