package storage

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"path"
	"strconv"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"
)

// minExpiration is etcd's minExpireTime (v2store/store.go): set and create
// treat a non-zero expiration before 2000-01-01 as "no TTL" (the comment
// there: such times come from zero times serialized through JavaScript).
// Update and compare-and-swap do not apply that rule in etcd (they call
// node.UpdateTTL directly), so an old expiration given to them is stored as
// is and the key expires at the next SYNC; this store does the same.
var minExpiration = time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano()

// cleanPath makes p absolute and clean, as etcd does with
// path.Clean(path.Join("/", p)). It does not allocate for a clean path.
func cleanPath(p string) string {
	if p == "" || p[0] != '/' {
		p = "/" + p
	}
	return path.Clean(p)
}

// view reads the keyspace inside one bbolt transaction, read-only or not.
type view struct {
	keys  *bolt.Bucket
	index uint64 // the store index, which v2 errors carry
	now   time.Time
	err   error // the first damaged record met; the transaction fails with it
	// A cursor and a key buffer kept for point reads and deletes: each
	// Bucket.Get or Delete would build a cursor of its own, and bbolt
	// copies the keys it stores.
	kc   *bolt.Cursor
	kbuf []byte
}

var rootRecord = record{dir: true}

// get reads the node at p (p != "/").
func (v *view) get(p string) (record, bool) {
	v.kbuf = appendNodeKey(v.kbuf[:0], p)
	k, val := v.cursor().Seek(v.kbuf)
	if val == nil || !bytes.Equal(k, v.kbuf) {
		return record{}, false
	}
	rec, err := parseRecord(val)
	if err != nil {
		if v.err == nil {
			v.err = fmt.Errorf("%w: %q", err, p)
		}
		return record{}, false
	}
	return rec, true
}

func (v *view) cursor() *bolt.Cursor {
	if v.kc == nil {
		v.kc = v.keys.Cursor()
	}
	return v.kc
}

// seekDelete is Bucket.Delete through a cursor the caller keeps.
func seekDelete(c *bolt.Cursor, key []byte) error {
	if k, _ := c.Seek(key); k != nil && bytes.Equal(k, key) {
		return c.Delete()
	}
	return nil
}

// lookup finds the node at p as etcd's internalGet does: 100 with the first
// missing component as the cause, 104 with the first file met on the way.
func (v *view) lookup(p string) (record, *Error) {
	if p == "/" {
		return rootRecord, nil
	}
	if rec, ok := v.get(p); ok {
		// Every ancestor of a stored node is a stored directory.
		return rec, nil
	}
	cur, rest := "/", p[1:]
	for {
		i := strings.IndexByte(rest, '/')
		comp := rest
		if i >= 0 {
			comp = rest[:i]
		}
		next := joinPath(cur, comp)
		rec, ok := v.get(next)
		if !ok {
			return record{}, NewError(EcodeKeyNotFound, next, v.index)
		}
		if i < 0 {
			return rec, nil
		}
		if !rec.dir {
			return record{}, NewError(EcodeNotDir, next, v.index)
		}
		cur, rest = next, rest[i+1:]
	}
}

// hasChildren reports whether dir has any child, hidden ones included (etcd
// counts them when refusing to delete a non-empty directory).
func (v *view) hasChildren(dir string) bool {
	prefix := childPrefix(dir)
	k, _ := v.keys.Cursor().Seek(prefix)
	return k != nil && bytes.HasPrefix(k, prefix)
}

// list returns dir's visible children: hidden ("_") names are never listed,
// at any depth. Keys come out sorted byte-wise, which is etcd's sorted order,
// so sorting costs nothing and unsorted listings are sorted too.
func (v *view) list(dir string, recursive bool) []*Node {
	prefix := childPrefix(dir)
	c := v.keys.Cursor()
	var nodes []*Node
	for k, val := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, val = c.Next() {
		name := unescape(k[len(prefix):])
		if name == "" || name[0] == '_' {
			continue
		}
		rec, err := parseRecord(val)
		if err != nil {
			if v.err == nil {
				v.err = err
			}
			continue
		}
		p := joinPath(dir, name)
		n := rec.external(p, v.now)
		if rec.dir && recursive {
			n.Nodes = v.list(p, true)
		}
		nodes = append(nodes, n)
	}
	return nodes
}

// getEvent is the "get" event for p (etcd's Store.Get).
func (v *view) getEvent(p string, recursive bool) (*Event, *Error) {
	rec, verr := v.lookup(p)
	if verr != nil {
		return nil, verr
	}
	var n *Node
	if p == "/" {
		// The root has no key and no indexes in etcd's answers.
		n = &Node{Dir: true}
	} else {
		n = rec.external(p, v.now)
	}
	if rec.dir {
		n.Nodes = v.list(p, recursive)
	}
	return &Event{Action: ActionGet, Node: n, EtcdIndex: v.index}, nil
}

// applier applies requests inside Save's write transaction.
type applier struct {
	view
	expiry *bolt.Bucket
	events *bolt.Bucket
	ec     *bolt.Cursor // the expiry index's, for deletes
	ebuf   []byte       // expiry keys
	// Stored values are encoded in scratch, then copied to the arena.
	scratch []byte
	arena   *arena
	// published are the events of this Save in index order, for the
	// watcher hub once the transaction has committed.
	published []*Event
	stats     statDelta
	eventKey  [8]byte
	// expiryChanged is set once the expiry index is written, so that a
	// Save without TTLs does not look for the next expiration again.
	expiryChanged bool
	// watched is set when the hub had watchers as the Save began: then a
	// removed directory's event lists the nodes it took (Event.removed),
	// collected here by remove while removed is not nil.
	watched bool
	removed map[string]struct{}
	// auth is the auth data's bucket; authChanged is set once a write
	// changed it, so that Save publishes the new data.
	auth        *bolt.Bucket
	authChanged bool
}

// apply runs one request and returns its event or v2 error. SYNC returns
// neither: its expire events only go to watchers.
func (a *applier) apply(r *Request) (*Event, *Error) {
	p := cleanPath(r.Path)
	switch r.Method {
	case MethodPost:
		return a.create(p, r, true)
	case MethodPut:
		switch {
		case r.PrevExist != nil && !*r.PrevExist:
			return a.create(p, r, false)
		case r.PrevExist != nil && r.PrevIndex == 0 && r.PrevValue == "":
			return a.update(p, r)
		case r.PrevExist != nil || r.PrevIndex > 0 || r.PrevValue != "":
			return a.compareAndSwap(p, r)
		default:
			return a.set(p, r)
		}
	case MethodDelete:
		if r.PrevIndex > 0 || r.PrevValue != "" {
			return a.compareAndDelete(p, r)
		}
		return a.delete(p, r)
	case MethodSync:
		a.expire(r.Time)
		return nil, nil
	case MethodAuthPut, MethodAuthDelete:
		return a.applyAuth(r)
	case MethodQGet:
		e, verr := a.getEvent(p, r.Recursive)
		a.stats.count(&a.stats.gets, verr == nil)
		return e, verr
	}
	return nil, NewError(EcodeRaftInternal, "storage: unknown method "+strconv.Quote(r.Method), a.index)
}

// emit records e as the event of the next index: in the events bucket (the
// last 1000 survive a restart) and for the watcher hub.
func (a *applier) emit(e *Event) error {
	binary.BigEndian.PutUint64(a.eventKey[:], e.Index())
	a.scratch = appendEvent(a.scratch[:0], e)
	if err := a.events.Put(a.eventKey[:], a.arena.copy(a.scratch)); err != nil {
		return err
	}
	a.published = append(a.published, e)
	return nil
}

// eventSlack is how many events beyond historySize the events bucket may
// hold. Deleting the oldest event at every write would rewrite the first
// leaf of the bucket as well as the last one on every commit; deleting
// them in batches leaves most commits one leaf to write there. Open reads
// only the newest historySize.
const eventSlack = 256

// trimEvents deletes the events older than the newest historySize once
// more than eventSlack of them have piled up.
func (a *applier) trimEvents() error {
	if a.index <= historySize+eventSlack {
		return nil
	}
	first := a.index - historySize + 1 // the oldest event kept
	c := a.events.Cursor()
	k, _ := c.First()
	if len(k) != 8 || binary.BigEndian.Uint64(k) >= first-eventSlack {
		return nil
	}
	// Collect, then delete: deleting under a moving cursor skips keys.
	var old [][8]byte
	for ; len(k) == 8 && binary.BigEndian.Uint64(k) < first; k, _ = c.Next() {
		old = append(old, [8]byte(k))
	}
	// Newest first: bbolt deletes a key by shifting the rest of its leaf
	// down, which costs nothing for the last key of the leaf.
	for i := len(old) - 1; i >= 0; i-- {
		if err := seekDelete(c, old[i][:]); err != nil {
			return err
		}
	}
	return nil
}

// fail keeps the first storage error, which aborts the transaction.
func (a *applier) fail(err error) {
	if err != nil && a.err == nil {
		a.err = err
	}
}

// put writes the node at p and keeps the expiry index in step with its
// expiration (oldExp: the expiration indexed until now, 0 for none).
func (a *applier) put(p string, rec *record, oldExp int64) {
	a.kbuf = appendNodeKey(a.kbuf[:0], p)
	a.scratch = rec.appendTo(a.scratch[:0])
	a.fail(a.keys.Put(a.kbuf, a.arena.copy(a.scratch)))
	if oldExp != rec.expiration {
		a.expiryChanged = true
		if oldExp != 0 {
			a.deleteExpiry(oldExp, p)
		}
		if rec.expiration != 0 {
			a.ebuf = appendExpiryKey(a.ebuf[:0], rec.expiration, p)
			a.fail(a.expiry.Put(a.ebuf, []byte{}))
		}
	}
}

func (a *applier) deleteExpiry(exp int64, p string) {
	if a.ec == nil {
		a.ec = a.expiry.Cursor()
	}
	a.ebuf = appendExpiryKey(a.ebuf[:0], exp, p)
	a.fail(seekDelete(a.ec, a.ebuf))
}

// remove deletes the node at p with its whole subtree and their expiry
// index entries. Watchers get one event for all of it (etcd-io/etcd#3672).
func (a *applier) remove(p string, rec record) {
	if a.removed != nil {
		a.removed[p] = struct{}{}
	}
	if rec.dir {
		a.removeChildren(p)
	}
	a.kbuf = appendNodeKey(a.kbuf[:0], p)
	a.fail(seekDelete(a.cursor(), a.kbuf))
	if rec.expiration != 0 {
		a.expiryChanged = true
		a.deleteExpiry(rec.expiration, p)
	}
}

func (a *applier) removeChildren(dir string) {
	prefix := childPrefix(dir)
	c := a.keys.Cursor()
	// Seek again after every removal: the bucket changed under the cursor.
	for k, val := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, val = c.Seek(prefix) {
		rec, _, err := parseRecordHead(val)
		if err != nil {
			a.fail(err)
			return
		}
		a.remove(joinPath(dir, unescape(k[len(prefix):])), rec)
		if a.err != nil {
			return
		}
	}
}

// createParents is etcd's walk with checkDir over the directory part of a
// new node's path: it returns the directories to create, or 104 with the
// first file met as the cause.
func (a *applier) createParents(dir string) ([]string, *Error) {
	if dir == "/" {
		return nil, nil
	}
	if rec, ok := a.get(dir); ok {
		if rec.dir {
			return nil, nil
		}
		// Its ancestors are directories, so it is the first file.
		return nil, NewError(EcodeNotDir, dir, a.index)
	}
	var missing []string
	cur, rest := "/", dir[1:]
	for rest != "" {
		i := strings.IndexByte(rest, '/')
		comp := rest
		if i >= 0 {
			comp, rest = rest[:i], rest[i+1:]
		} else {
			rest = ""
		}
		next := joinPath(cur, comp)
		if len(missing) > 0 {
			missing = append(missing, next)
		} else if rec, ok := a.get(next); !ok {
			missing = append(missing, next)
		} else if !rec.dir {
			return nil, NewError(EcodeNotDir, next, a.index)
		}
		cur = next
	}
	return missing, nil
}

// internalCreate is etcd's store.internalCreate: it creates the file or
// directory at p (under p with an in-order name when unique), creating
// missing parent directories with the new index; replace allows an
// existing file (never a directory) to be replaced.
func (a *applier) internalCreate(p string, dir bool, value string, unique, replace bool, exp int64, action string) (*Event, *Error) {
	next := a.index + 1
	if unique {
		p = cleanPath(p + "/" + fmt.Sprintf("%020d", next))
	}
	if p == "/" {
		return nil, NewError(EcodeRootROnly, "/", a.index)
	}
	if len(p) > MaxPathLen {
		return nil, NewError(EcodeInvalidField, "key is too long", a.index)
	}
	if exp < minExpiration {
		exp = 0
	}
	parent, _ := splitPath(p)
	missing, verr := a.createParents(parent)
	if verr != nil {
		if action == ActionCreate {
			// etcd's internalCreate counts a walk failure as a failed
			// set on top of the caller's own failure counter.
			a.stats.sets[1]++
		}
		return nil, verr
	}
	e := &Event{Action: action, EtcdIndex: next}
	var oldExp int64
	if len(missing) == 0 {
		if old, ok := a.get(p); ok {
			if !replace {
				return nil, NewError(EcodeNodeExist, p, a.index)
			}
			if old.dir {
				return nil, NewError(EcodeNotFile, p, a.index)
			}
			e.PrevNode = old.external(p, a.now)
			// A file has no subtree: the put below replaces it, and its
			// expiry index entry goes with oldExp.
			oldExp = old.expiration
		}
	}
	for _, d := range missing {
		a.put(d, &record{dir: true, created: next, modified: next}, 0)
	}
	rec := record{dir: dir, created: next, modified: next, expiration: exp}
	if !dir {
		rec.value = value
	}
	a.put(p, &rec, oldExp)
	e.Node = rec.external(p, a.now)
	a.index = next
	return e, nil
}

func (a *applier) set(p string, r *Request) (*Event, *Error) {
	value := r.Val
	if r.Refresh {
		// A refresh keeps the value and needs the key to exist (etcd Set).
		n, verr := a.lookup(p)
		if verr != nil {
			a.stats.count(&a.stats.sets, false)
			return nil, verr
		}
		value = n.value
	}
	e, verr := a.internalCreate(p, r.Dir, value, false, true, r.Expiration, ActionSet)
	a.stats.count(&a.stats.sets, verr == nil)
	if verr != nil {
		return nil, verr
	}
	e.Refresh = r.Refresh
	return e, nil
}

func (a *applier) create(p string, r *Request, unique bool) (*Event, *Error) {
	e, verr := a.internalCreate(p, r.Dir, r.Val, unique, false, r.Expiration, ActionCreate)
	a.stats.count(&a.stats.creates, verr == nil)
	return e, verr
}

// update is etcd's store.Update. On a directory only the TTL changes, and
// the stored modifiedIndex stays old while the event reports the new index
// (node.Write refuses directories): etcd answers GET with the old one.
func (a *applier) update(p string, r *Request) (e *Event, verr *Error) {
	defer func() { a.stats.count(&a.stats.updates, verr == nil) }()
	if p == "/" {
		return nil, NewError(EcodeRootROnly, "/", a.index)
	}
	n, verr := a.lookup(p)
	if verr != nil {
		return nil, verr
	}
	value := r.Val
	if n.dir && value != "" {
		return nil, NewError(EcodeNotFile, p, a.index)
	}
	if r.Refresh {
		value = n.value
	}
	next := a.index + 1
	e = &Event{Action: ActionUpdate, EtcdIndex: next, Refresh: r.Refresh}
	e.PrevNode = n.external(p, a.now)
	oldExp := n.expiration
	if !n.dir {
		n.value = value
		n.modified = next
	}
	n.expiration = r.Expiration
	a.put(p, &n, oldExp)
	e.Node = n.external(p, a.now)
	e.Node.ModifiedIndex = next
	a.index = next
	return e, nil
}

// compareFailCause is etcd's getCompareFailCause.
func compareFailCause(n *record, prevValue string, prevIndex uint64) (string, bool) {
	indexMatch := prevIndex == 0 || n.modified == prevIndex
	valueMatch := prevValue == "" || n.value == prevValue
	switch {
	case indexMatch && valueMatch:
		return "", true
	case indexMatch:
		return fmt.Sprintf("[%s != %s]", prevValue, n.value), false
	case valueMatch:
		return fmt.Sprintf("[%d != %d]", prevIndex, n.modified), false
	}
	return fmt.Sprintf("[%s != %s] [%d != %d]", prevValue, n.value, prevIndex, n.modified), false
}

func (a *applier) compareAndSwap(p string, r *Request) (e *Event, verr *Error) {
	defer func() { a.stats.count(&a.stats.compareAndSwaps, verr == nil) }()
	if p == "/" {
		return nil, NewError(EcodeRootROnly, "/", a.index)
	}
	n, verr := a.compared(p, r)
	if verr != nil {
		return nil, verr
	}
	value := r.Val
	if r.Refresh {
		value = n.value
	}
	next := a.index + 1
	e = &Event{Action: ActionCompareAndSwap, EtcdIndex: next, Refresh: r.Refresh}
	e.PrevNode = n.external(p, a.now)
	oldExp := n.expiration
	n.value = value
	n.modified = next
	n.expiration = r.Expiration
	a.put(p, &n, oldExp)
	e.Node = n.external(p, a.now)
	a.index = next
	return e, nil
}

func (a *applier) delete(p string, r *Request) (e *Event, verr *Error) {
	defer func() { a.stats.count(&a.stats.deletes, verr == nil) }()
	if p == "/" {
		return nil, NewError(EcodeRootROnly, "/", a.index)
	}
	dir := r.Dir || r.Recursive // recursive implies dir
	n, verr := a.lookup(p)
	if verr != nil {
		return nil, verr
	}
	if n.dir {
		if !dir {
			return nil, NewError(EcodeNotFile, p, a.index)
		}
		if !r.Recursive && a.hasChildren(p) {
			return nil, NewError(EcodeDirNotEmpty, p, a.index)
		}
	}
	next := a.index + 1
	e = &Event{Action: ActionDelete, EtcdIndex: next,
		Node:     &Node{Key: p, Dir: n.dir, ModifiedIndex: next, CreatedIndex: n.created},
		PrevNode: n.external(p, a.now)}
	a.removeNode(e, p, n)
	a.index = next
	return e, nil
}

// removeNode removes the node of a delete or expire event and its subtree;
// when watchers may wait below a directory, the event keeps the paths of
// the nodes removed (see hub.notify).
func (a *applier) removeNode(e *Event, p string, rec record) {
	if rec.dir && a.watched {
		a.removed = make(map[string]struct{})
	}
	a.remove(p, rec)
	e.removed, a.removed = a.removed, nil
}

// compared finds the file that a compare-and-swap or compare-and-delete
// tests, and tests it: 100 when it is missing, 102 for a directory, 101
// when prevValue or prevIndex does not match.
func (a *applier) compared(p string, r *Request) (record, *Error) {
	n, verr := a.lookup(p)
	if verr != nil {
		return n, verr
	}
	if n.dir {
		// etcd keeps the keys under /1 in its store and trims that prefix
		// off an error's cause: the root's own path comes out empty.
		cause := p
		if p == "/" {
			cause = ""
		}
		return n, NewError(EcodeNotFile, cause, a.index)
	}
	if cause, ok := compareFailCause(&n, r.PrevValue, r.PrevIndex); !ok {
		return n, NewError(EcodeTestFailed, cause, a.index)
	}
	return n, nil
}

// compareAndDelete is etcd's: unlike the other writes it has no read-only
// root check, so "/" fails as a directory (102).
func (a *applier) compareAndDelete(p string, r *Request) (e *Event, verr *Error) {
	defer func() { a.stats.count(&a.stats.compareAndDeletes, verr == nil) }()
	n, verr := a.compared(p, r)
	if verr != nil {
		return nil, verr
	}
	next := a.index + 1
	e = &Event{Action: ActionCompareAndDelete, EtcdIndex: next,
		Node:     &Node{Key: p, ModifiedIndex: next, CreatedIndex: n.created},
		PrevNode: n.external(p, a.now)}
	a.remove(p, n)
	a.index = next
	return e, nil
}

// expire is etcd's DeleteExpiredKeys(cutoff): every node whose expiration is
// at or before cutoff goes, earliest first, each with its subtree, one
// "expire" event and one index each. The expiry index is ordered by time,
// so this reads only what is due.
func (a *applier) expire(cutoff int64) {
	c := a.expiry.Cursor()
	for k, _ := c.First(); k != nil; k, _ = c.First() {
		exp, p, ok := parseExpiryKey(k)
		if !ok {
			a.fail(fmt.Errorf("storage: damaged expiry index key %x", k))
			return
		}
		if exp > cutoff {
			return
		}
		n, found := a.get(p)
		if !found || n.expiration != exp {
			// An entry the keyspace no longer backs: drop it.
			a.expiryChanged = true
			a.deleteExpiry(exp, p)
			if a.err != nil {
				return
			}
			continue
		}
		next := a.index + 1
		e := &Event{Action: ActionExpire, EtcdIndex: next,
			Node:     &Node{Key: p, Dir: n.dir, ModifiedIndex: next, CreatedIndex: n.created},
			PrevNode: n.external(p, a.now)}
		a.removeNode(e, p, n)
		a.index = next
		a.stats.expires++
		a.fail(a.emit(e))
		if a.err != nil {
			return
		}
	}
}
