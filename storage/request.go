package storage

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Methods of a Request, as etcd's v2 server names them.
const (
	MethodPut    = "PUT"
	MethodPost   = "POST"
	MethodDelete = "DELETE"
	MethodQGet   = "QGET" // not used: quorum reads go through ReadIndex
	MethodSync   = "SYNC" // the leader's "expire what is due at Time"
)

// Request is one v2 write as it travels in a Raft log entry. Every field is
// decided by the member that received the client request, before it is
// proposed, so every member applies it alike: in particular the expiration
// is absolute, never a TTL.
//
// Dispatch follows etcd 3.4's apply_v2.go: PUT with PrevExist=false is
// create; PUT with PrevValue or PrevIndex>0 is compare-and-swap; PUT with
// PrevExist=true is update; other PUTs are set. POST creates an in-order key
// under Path. DELETE with PrevValue or PrevIndex>0 is compare-and-delete.
type Request struct {
	// ID identifies the proposal, so that a retried proposal is applied
	// once and its waiter finds its result. Zero for entries nobody awaits.
	ID         uint64
	Method     string
	Path       string // the key, cleaned, starting with "/", without the /v2/keys prefix
	Val        string
	Dir        bool
	PrevValue  string
	PrevIndex  uint64
	PrevExist  *bool
	Expiration int64 // unix nanoseconds; 0 means no TTL
	Recursive  bool
	Refresh    bool
	Time       int64 // SYNC: the leader's clock, unix nanoseconds
}

// The wire form of a Request, version 1:
//
//	byte     version (1)
//	byte     method code (see methodCodes; 0: the method follows as a string)
//	byte     flags (reqDir, reqRecursive, reqRefresh, reqPrevExistSet, reqPrevExist)
//	uvarint  ID, PrevIndex
//	varint   Expiration, Time
//	string   Path, Val, PrevValue [, Method when its code is 0]
//
// where a string is a uvarint length followed by its bytes. Nothing may
// follow the last field.
const requestVersion = 1

const (
	reqDir = 1 << iota
	reqRecursive
	reqRefresh
	reqPrevExistSet
	reqPrevExist
	reqKnownFlags = reqDir | reqRecursive | reqRefresh | reqPrevExistSet | reqPrevExist
)

var methodCodes = [...]string{1: MethodPut, 2: MethodPost, 3: MethodDelete, 4: MethodQGet, 5: MethodSync, 6: MethodAuthPut, 7: MethodAuthDelete}

func methodCode(m string) byte {
	for i, s := range methodCodes {
		if i > 0 && s == m {
			return byte(i)
		}
	}
	return 0
}

// Marshal encodes r for a Raft log entry (a compact binary form, versioned
// by its first byte).
func (r *Request) Marshal() []byte {
	code := methodCode(r.Method)
	n := 3 + 4*binary.MaxVarintLen64 + 3*binary.MaxVarintLen32 + len(r.Path) + len(r.Val) + len(r.PrevValue)
	if code == 0 {
		n += binary.MaxVarintLen32 + len(r.Method)
	}
	var flags byte
	if r.Dir {
		flags |= reqDir
	}
	if r.Recursive {
		flags |= reqRecursive
	}
	if r.Refresh {
		flags |= reqRefresh
	}
	if r.PrevExist != nil {
		flags |= reqPrevExistSet
		if *r.PrevExist {
			flags |= reqPrevExist
		}
	}
	b := make([]byte, 0, n)
	b = append(b, requestVersion, code, flags)
	b = binary.AppendUvarint(b, r.ID)
	b = binary.AppendUvarint(b, r.PrevIndex)
	b = binary.AppendVarint(b, r.Expiration)
	b = binary.AppendVarint(b, r.Time)
	b = appendString(b, r.Path)
	b = appendString(b, r.Val)
	b = appendString(b, r.PrevValue)
	if code == 0 {
		b = appendString(b, r.Method)
	}
	return b
}

// ErrBadRequest is returned (wrapped) by UnmarshalRequest for damaged input.
var ErrBadRequest = errors.New("storage: malformed request")

// UnmarshalRequest decodes what Marshal encoded; damaged input is an error,
// never a panic.
func UnmarshalRequest(data []byte) (*Request, error) {
	r := &Request{}
	if err := decodeRequest(data, r); err != nil {
		return nil, err
	}
	return r, nil
}

// decodeRequest is UnmarshalRequest into r, which it overwrites whole.
func decodeRequest(data []byte, r *Request) error {
	if len(data) < 3 {
		return fmt.Errorf("%w: %d bytes", ErrBadRequest, len(data))
	}
	if data[0] != requestVersion {
		return fmt.Errorf("%w: unknown version %d", ErrBadRequest, data[0])
	}
	code, flags := data[1], data[2]
	if int(code) >= len(methodCodes) {
		return fmt.Errorf("%w: unknown method code %d", ErrBadRequest, code)
	}
	if flags&^reqKnownFlags != 0 || (flags&reqPrevExist != 0 && flags&reqPrevExistSet == 0) {
		return fmt.Errorf("%w: bad flags %#x", ErrBadRequest, flags)
	}
	// The strings are cut from one copy of the rest of the data: one
	// allocation for all of them.
	d := decoder{b: data[3:], s: string(data[3:])}
	*r = Request{
		Method:    methodCodes[code],
		Dir:       flags&reqDir != 0,
		Recursive: flags&reqRecursive != 0,
		Refresh:   flags&reqRefresh != 0,
	}
	if flags&reqPrevExistSet != 0 {
		v := flags&reqPrevExist != 0
		r.PrevExist = &v
	}
	r.ID = d.uvarint()
	r.PrevIndex = d.uvarint()
	r.Expiration = d.varint()
	r.Time = d.varint()
	r.Path = d.string()
	r.Val = d.string()
	r.PrevValue = d.string()
	if code == 0 {
		r.Method = d.string()
		// A known method always gets its code, so a string form of one
		// cannot come from Marshal.
		if methodCode(r.Method) != 0 {
			d.fail()
		}
	}
	if d.err || len(d.b) != 0 {
		return fmt.Errorf("%w: truncated or trailing bytes", ErrBadRequest)
	}
	return nil
}

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

// decoder reads varints and strings from b; the first failure sets err and
// every later read returns zero values, so callers check once at the end.
type decoder struct {
	b   []byte
	s   string // when set, the same bytes as b at the start: strings are cut from it
	err bool
}

func (d *decoder) fail() { d.err, d.b = true, nil }

func (d *decoder) uvarint() uint64 {
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.fail()
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) varint() int64 {
	v, n := binary.Varint(d.b)
	if n <= 0 {
		d.fail()
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) bytes() []byte {
	n := d.uvarint()
	if d.err || n > uint64(len(d.b)) {
		d.fail()
		return nil
	}
	s := d.b[:n:n]
	d.b = d.b[n:]
	return s
}

func (d *decoder) string() string {
	b := d.bytes()
	if d.s == "" || d.err {
		return string(b)
	}
	// b ends where the rest of the input, d.b, starts.
	end := len(d.s) - len(d.b)
	return d.s[end-len(b) : end]
}

func (d *decoder) byte() byte {
	if len(d.b) == 0 {
		d.fail()
		return 0
	}
	c := d.b[0]
	d.b = d.b[1:]
	return c
}
