package storage

import (
	"encoding/binary"
	"errors"
	"strings"
	"time"
)

// Keyspace layout. A node at path "/a/b" is stored under the key
//
//	esc("/a") 0x00 esc("b")
//
// so the children of a directory are exactly the keys that start with
// esc(dir)+0x00: a one-level listing is one prefix scan, however large the
// subtrees below, and it comes out sorted byte-wise by name, which is
// etcd's "sorted" order (a sort on the full key of siblings). esc keeps 0x00
// out of the encoded parts (0x00 -> 0x01 0x01, 0x01 -> 0x01 0x02), an
// order-preserving escape, so a name holding a NUL byte cannot forge a
// sibling's prefix. The root "/" is implicit: it has no key of its own.

// MaxPathLen bounds a key's path so that its encoded form (at most twice as
// long) stays below bbolt's 32 KiB key limit, and an auth record's path
// (/users/<name>, /roles/<name>). A longer path is refused with a v2 error
// rather than failing the whole Raft batch.
const MaxPathLen = 16000

func needsEscape(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 2 {
			return true
		}
	}
	return false
}

func appendEscaped(b []byte, s string) []byte {
	if !needsEscape(s) {
		return append(b, s...)
	}
	for i := 0; i < len(s); i++ {
		switch c := s[i]; c {
		case 0:
			b = append(b, 1, 1)
		case 1:
			b = append(b, 1, 2)
		default:
			b = append(b, c)
		}
	}
	return b
}

func unescape(b []byte) string {
	if i := indexByte(b, 1); i < 0 {
		return string(b)
	}
	out := make([]byte, 0, len(b))
	for i := 0; i < len(b); i++ {
		if b[i] == 1 && i+1 < len(b) {
			out = append(out, b[i+1]-1)
			i++
			continue
		}
		out = append(out, b[i])
	}
	return string(out)
}

func indexByte(b []byte, c byte) int {
	for i, x := range b {
		if x == c {
			return i
		}
	}
	return -1
}

// splitPath splits a clean absolute path other than "/" into its parent
// directory and its last component: "/a/b" -> "/a", "b"; "/a" -> "/", "a".
func splitPath(p string) (dir, name string) {
	i := strings.LastIndexByte(p, '/')
	if i <= 0 {
		return "/", p[i+1:]
	}
	return p[:i], p[i+1:]
}

// joinPath is the path of child name under dir.
func joinPath(dir, name string) string {
	if dir == "/" {
		return "/" + name
	}
	return dir + "/" + name
}

// appendNodeKey appends the keyspace key of the node at p (p != "/") to b.
func appendNodeKey(b []byte, p string) []byte {
	dir, name := splitPath(p)
	b = appendEscaped(b, dir)
	b = append(b, 0)
	return appendEscaped(b, name)
}

// childPrefix is the prefix shared by the keys of dir's children.
func childPrefix(dir string) []byte {
	b := make([]byte, 0, len(dir)+1)
	b = appendEscaped(b, dir)
	return append(b, 0)
}

// record is a stored node: a file (value) or a directory (children under
// its child prefix).
type record struct {
	dir        bool
	created    uint64
	modified   uint64
	expiration int64 // unix nanoseconds; 0 = permanent
	// value is a string, not a slice of the page: the events built from a
	// record share it instead of copying it again.
	value string
}

// Node value: flags byte (1 = dir), uvarint createdIndex, uvarint
// modifiedIndex, varint expiration, then the value bytes to the end.
func (r *record) appendTo(b []byte) []byte {
	var flags byte
	if r.dir {
		flags = 1
	}
	b = append(b, flags)
	b = binary.AppendUvarint(b, r.created)
	b = binary.AppendUvarint(b, r.modified)
	b = binary.AppendVarint(b, r.expiration)
	return append(b, r.value...)
}

var errBadRecord = errors.New("storage: damaged keyspace record")

// parseRecord decodes a node value, its value copied out of v.
func parseRecord(v []byte) (record, error) {
	r, rest, err := parseRecordHead(v)
	if err == nil && len(rest) > 0 {
		r.value = string(rest)
	}
	return r, err
}

// parseRecordHead decodes a node value but its value, which it returns
// as the tail of v.
func parseRecordHead(v []byte) (record, []byte, error) {
	if len(v) == 0 || v[0] > 1 {
		return record{}, nil, errBadRecord
	}
	d := decoder{b: v[1:]}
	r := record{dir: v[0] == 1}
	r.created = d.uvarint()
	r.modified = d.uvarint()
	r.expiration = d.varint()
	if d.err {
		return record{}, nil, errBadRecord
	}
	return r, d.b, nil
}

// Expiry index key: the expiration as 8 big-endian bytes with the sign bit
// flipped (so negative times, which an update may store, sort first), then
// the path.
func appendExpiryKey(b []byte, exp int64, p string) []byte {
	b = binary.BigEndian.AppendUint64(b, uint64(exp)^(1<<63))
	return append(b, p...)
}

func parseExpiryKey(k []byte) (int64, string, bool) {
	if len(k) < 9 {
		return 0, "", false
	}
	return int64(binary.BigEndian.Uint64(k) ^ (1 << 63)), string(k[8:]), true
}

// external builds the JSON node of r at path p, with ttl counted against
// now as etcd does (node.go expirationAndTTL: ceil of the remaining
// seconds, negative once past).
func (r *record) external(p string, now time.Time) *Node {
	var n *Node
	if r.dir {
		n = &Node{}
	} else {
		// One allocation for the node and the string its Value points to.
		nv := &nodeWithValue{value: r.value}
		n = &nv.node
		n.Value = &nv.value
	}
	n.Key, n.Dir, n.ModifiedIndex, n.CreatedIndex = p, r.dir, r.modified, r.created
	n.Expiration, n.TTL = expirationAndTTL(r.expiration, now)
	return n
}

type nodeWithValue struct {
	node  Node
	value string
}

func expirationAndTTL(exp int64, now time.Time) (*time.Time, int64) {
	if exp == 0 {
		return nil, 0
	}
	t := time.Unix(0, exp).UTC()
	d := t.Sub(now)
	ttl := d / time.Second
	if d%time.Second > 0 {
		ttl++
	}
	return &t, int64(ttl)
}

// Events kept for history are stored in the events bucket in this form:
//
//	byte     action code (actionCodes)
//	byte     flags (1 refresh, 2 has node, 4 has prevNode, 8 EtcdIndex is
//	         the node's modifiedIndex)
//	[uvarint EtcdIndex]
//	node     [node] [prevNode]
//
// and a node as: flags byte (1 dir, 2 has value, 4 has expiration, 8 the
// key is the node's, 16 createdIndex is modifiedIndex), [key], [value],
// [varint expiration], varint ttl, uvarint modifiedIndex, [uvarint
// createdIndex]. Nodes of events never have children. Every event of the
// store has its own index as EtcdIndex, and a prevNode is mostly at the
// node's key, so a set is stored with its key once.
var actionCodes = [...]string{ActionGet, ActionSet, ActionCreate, ActionUpdate, ActionDelete,
	ActionCompareAndSwap, ActionCompareAndDelete, ActionExpire}

func actionCode(a string) byte {
	for i, s := range actionCodes {
		if s == a {
			return byte(i)
		}
	}
	return 255
}

func marshalEvent(e *Event) []byte { return appendEvent(make([]byte, 0, 64), e) }

func appendEvent(b []byte, e *Event) []byte {
	var flags byte
	if e.Refresh {
		flags |= 1
	}
	if e.Node != nil {
		flags |= 2
	}
	if e.PrevNode != nil {
		flags |= 4
	}
	if e.Node != nil && e.EtcdIndex == e.Node.ModifiedIndex {
		flags |= 8
	}
	b = append(b, actionCode(e.Action), flags)
	if flags&8 == 0 {
		b = binary.AppendUvarint(b, e.EtcdIndex)
	}
	if e.Node != nil {
		b = appendEventNode(b, e.Node, nil)
	}
	if e.PrevNode != nil {
		b = appendEventNode(b, e.PrevNode, e.Node)
	}
	return b
}

// appendEventNode appends n; of is the event's node when n is its prevNode.
func appendEventNode(b []byte, n, of *Node) []byte {
	var flags byte
	if n.Dir {
		flags |= 1
	}
	if n.Value != nil {
		flags |= 2
	}
	if n.Expiration != nil {
		flags |= 4
	}
	if of != nil && of.Key == n.Key {
		flags |= 8
	}
	if n.CreatedIndex == n.ModifiedIndex {
		flags |= 16
	}
	b = append(b, flags)
	if flags&8 == 0 {
		b = appendString(b, n.Key)
	}
	if n.Value != nil {
		b = appendString(b, *n.Value)
	}
	if n.Expiration != nil {
		b = binary.AppendVarint(b, n.Expiration.UnixNano())
	}
	b = binary.AppendVarint(b, n.TTL)
	b = binary.AppendUvarint(b, n.ModifiedIndex)
	if flags&16 == 0 {
		b = binary.AppendUvarint(b, n.CreatedIndex)
	}
	return b
}

var errBadEvent = errors.New("storage: damaged event record")

func unmarshalEvent(data []byte) (*Event, error) {
	d := decoder{b: data}
	code, flags := d.byte(), d.byte()
	// An event always has a node (Index reads it).
	if d.err || int(code) >= len(actionCodes) || flags > 15 || flags&2 == 0 {
		return nil, errBadEvent
	}
	e := &Event{Action: actionCodes[code], Refresh: flags&1 != 0}
	if flags&8 == 0 {
		e.EtcdIndex = d.uvarint()
	}
	e.Node = d.eventNode(nil)
	if flags&4 != 0 && e.Node != nil {
		e.PrevNode = d.eventNode(e.Node)
	}
	if d.err || len(d.b) != 0 || e.Node == nil {
		return nil, errBadEvent
	}
	if flags&8 != 0 {
		e.EtcdIndex = e.Node.ModifiedIndex
	}
	return e, nil
}

// eventNode reads a node; of is the event's node when reading its prevNode.
func (d *decoder) eventNode(of *Node) *Node {
	flags := d.byte()
	if flags > 31 || (flags&8 != 0 && of == nil) {
		d.fail()
		return nil
	}
	n := &Node{Dir: flags&1 != 0}
	if flags&8 != 0 {
		n.Key = of.Key
	} else {
		n.Key = d.string()
	}
	if flags&2 != 0 {
		v := d.string()
		n.Value = &v
	}
	if flags&4 != 0 {
		t := time.Unix(0, d.varint()).UTC()
		n.Expiration = &t
	}
	n.TTL = d.varint()
	n.ModifiedIndex = d.uvarint()
	n.CreatedIndex = n.ModifiedIndex
	if flags&16 == 0 {
		n.CreatedIndex = d.uvarint()
	}
	if d.err {
		return nil
	}
	return n
}
