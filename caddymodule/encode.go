package caddymodule

import (
	"bytes"
	"strconv"
	"sync"
	"unicode/utf8"

	"github.com/etcaddy/etcaddy/storage"
)

// The v2 API's hot answers (events and key errors) are encoded by hand:
// encoding/json's reflection was a large share of a GET's CPU. The output
// is byte for byte what json.NewEncoder(w).Encode gave before, as etcd
// writes it (encode_test.go and FuzzEncodeEvent compare the two), so the
// escaping below is encoding/json's, HTML escaping included.

// bufPool holds response buffers. A buffer that grew past maxPooledBuf (a
// large value) is dropped rather than kept alive for small answers; one that
// spilled a listing (spillAt) is kept.
var bufPool = sync.Pool{New: func() any { b := make([]byte, 0, 512); return &b }}

const maxPooledBuf = 128 << 10

func getBuf() *[]byte { return bufPool.Get().(*[]byte) }

func putBuf(b *[]byte) {
	if cap(*b) > maxPooledBuf {
		return
	}
	*b = (*b)[:0]
	bufPool.Put(b)
}

// appendEvent appends ev's JSON and json.Encoder's newline. The only error
// is encoding/json's for an expiration that time.Time cannot marshal
// (a year outside 0-9999), in which case b is returned unchanged.
func appendEvent(b []byte, ev *storage.Event) ([]byte, error) {
	return appendEventSpilling(b, ev, nil)
}

// spillAt is how large an answer's buffer grows before it goes to the
// client, between two nodes of a listing: a recursive listing of a large
// key space goes out in pieces instead of in one buffer grown to its size
// (each growth a copy of it all: a 137 MB listing took three times its
// size in copies and most of its CPU).
const spillAt = 64 << 10

// A spiller takes the bytes encoded so far of an answer and returns the
// buffer to go on with (emptied).
type spiller func(b []byte) []byte

// appendEventSpilling is appendEvent, handing what it has encoded to spill
// (when not nil) whenever it reaches spillAt bytes between two nodes of a
// listing. On an error what was spilled is gone: see checkTimes.
func appendEventSpilling(b []byte, ev *storage.Event, spill spiller) ([]byte, error) {
	orig := b
	b = append(b, `{"action":`...)
	b = appendJSONString(b, ev.Action)
	var err error
	if ev.Node != nil {
		b = append(b, `,"node":`...)
		if b, err = appendNode(b, ev.Node, spill); err != nil {
			return orig, err
		}
	}
	if ev.PrevNode != nil {
		b = append(b, `,"prevNode":`...)
		if b, err = appendNode(b, ev.PrevNode, spill); err != nil {
			return orig, err
		}
	}
	return append(b, '}', '\n'), nil
}

// checkTimes returns the error appendNode would meet in n or below it: an
// expiration time.Time cannot marshal.
func checkTimes(n *storage.Node) error {
	if n == nil {
		return nil
	}
	if n.Expiration != nil {
		var a [64]byte
		if _, err := n.Expiration.AppendText(a[:0]); err != nil {
			return err
		}
	}
	for _, c := range n.Nodes {
		if err := checkTimes(c); err != nil {
			return err
		}
	}
	return nil
}

// appendNode appends n's JSON, with encoding/json's omitempty rules: a
// non-nil empty value is kept, a negative TTL is kept, a nil element of
// nodes is null. See appendEventSpilling for spill.
func appendNode(b []byte, n *storage.Node, spill spiller) ([]byte, error) {
	if n == nil {
		return append(b, "null"...), nil
	}
	b = append(b, '{')
	if n.Key != "" {
		b = append(b, `"key":`...)
		b = appendJSONString(b, n.Key)
	}
	if n.Value != nil {
		b = appendField(b, `"value":`)
		b = appendJSONString(b, *n.Value)
	}
	if n.Dir {
		b = appendField(b, `"dir":true`)
	}
	if n.Expiration != nil {
		b = appendField(b, `"expiration":"`)
		// AppendText is the RFC 3339 form, with the same range checks,
		// that time.Time's MarshalJSON quotes.
		var err error
		if b, err = n.Expiration.AppendText(b); err != nil {
			return b, err
		}
		b = append(b, '"')
	}
	if n.TTL != 0 {
		b = appendField(b, `"ttl":`)
		b = strconv.AppendInt(b, n.TTL, 10)
	}
	if len(n.Nodes) > 0 {
		b = appendField(b, `"nodes":[`)
		for i, c := range n.Nodes {
			if i > 0 {
				b = append(b, ',')
			}
			var err error
			if b, err = appendNode(b, c, spill); err != nil {
				return b, err
			}
			if spill != nil && len(b) >= spillAt {
				b = spill(b)
			}
		}
		b = append(b, ']')
	}
	if n.ModifiedIndex != 0 {
		b = appendField(b, `"modifiedIndex":`)
		b = strconv.AppendUint(b, n.ModifiedIndex, 10)
	}
	if n.CreatedIndex != 0 {
		b = appendField(b, `"createdIndex":`)
		b = strconv.AppendUint(b, n.CreatedIndex, 10)
	}
	return append(b, '}'), nil
}

// appendField appends a member's name, after a comma unless it is the
// object's first.
func appendField(b []byte, name string) []byte {
	if b[len(b)-1] != '{' {
		b = append(b, ',')
	}
	return append(b, name...)
}

// appendKeyError appends e's JSON and a newline, as etcd's
// v2error.Error.WriteTo writes it.
func appendKeyError(b []byte, e *storage.Error) []byte {
	b = append(b, `{"errorCode":`...)
	b = strconv.AppendInt(b, int64(e.ErrorCode), 10)
	b = append(b, `,"message":`...)
	b = appendJSONString(b, e.Message)
	if e.Cause != "" {
		b = append(b, `,"cause":`...)
		b = appendJSONString(b, e.Cause)
	}
	b = append(b, `,"index":`...)
	b = strconv.AppendUint(b, e.Index, 10)
	return append(b, '}', '\n')
}

// jsonSafe marks the ASCII bytes encoding/json copies as they are with
// HTML escaping on: 0x20 to 0x7f (DEL included), but not '"', '\\', '<', '>' or '&'.
var jsonSafe = func() (t [utf8.RuneSelf]bool) {
	for c := 0x20; c < utf8.RuneSelf; c++ {
		t[c] = c != '"' && c != '\\' && c != '<' && c != '>' && c != '&'
	}
	return t
}()

const hexDigits = "0123456789abcdef"

// appendJSONString is encoding/json's appendString with escapeHTML, as
// the Go release etcd 3.4.23 was built with has it: short escapes for \"
// \\ \n \r \t, \u00XX for the other control bytes (\b and \f too: Go 1.22
// gave them short escapes) and for < > &, \ufffd for each byte of invalid
// UTF-8, and \u2028 \u2029 escaped for JavaScript.
func appendJSONString(b []byte, s string) []byte {
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		if c := s[i]; c < utf8.RuneSelf {
			if jsonSafe[c] {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hexDigits[r&0xf])
			i += size
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}

// legacyEscapes rewrites the \b and \f escapes of encoding/json's output
// (short since Go 1.22) as \u0008 and \u000c, as etcd 3.4.23's Go wrote
// them (see appendJSONString): for the bodies writeJSON marshals.
func legacyEscapes(b []byte) []byte {
	if !bytes.Contains(b, []byte(`\b`)) && !bytes.Contains(b, []byte(`\f`)) {
		return b
	}
	out := make([]byte, 0, len(b)+8)
	for i := 0; i < len(b); i++ {
		if b[i] != '\\' || i+1 == len(b) {
			out = append(out, b[i])
			continue
		}
		i++
		switch b[i] {
		case 'b':
			out = append(out, `\u0008`...)
		case 'f':
			out = append(out, `\u000c`...)
		default:
			out = append(out, '\\', b[i])
		}
	}
	return out
}
