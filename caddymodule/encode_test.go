package caddymodule

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/etcaddy/etcaddy/storage"
)

// trickyStrings exercise every branch of encoding/json's string escaping.
var trickyStrings = []string{
	"", "a", "/foo/bar", "héllo wörld", "日本語", "emoji 😀",
	`quote " backslash \ slash /`, "<script>&amp;</script>", "\x00\x01\x1f\x7f",
	"\b\f\n\r\t", "line\u2028sep\u2029para", "bad \xff utf8 \xc3", "\xed\xa0\x80 surrogate",
	"trunc \xe2\x82", "\ufffd literal", "mixed <\xff>\u2028&\"\\\n", "\u007f\u0080\u00ff",
}

func strp(s string) *string { return &s }

// jsonEncode is how the v2 handler encoded events before: json.Encoder,
// with its trailing newline, and with etcd's escapes of \b and \f (see
// oldGoEscapes).
func jsonEncode(v any) ([]byte, error) {
	var buf bytes.Buffer
	err := json.NewEncoder(&buf).Encode(v)
	return oldGoEscapes(buf.Bytes()), err
}

// oldGoEscapes turns the short escapes \b and \f of today's encoding/json
// into the \u0008 and \u000c of the Go release etcd 3.4.23 was built with.
func oldGoEscapes(b []byte) []byte {
	var out []byte
	for i := 0; i < len(b); i++ {
		if b[i] == '\\' && i+1 < len(b) {
			switch b[i+1] {
			case 'b':
				out = append(out, `\u0008`...)
			case 'f':
				out = append(out, `\u000c`...)
			default:
				out = append(out, b[i], b[i+1])
			}
			i++
			continue
		}
		out = append(out, b[i])
	}
	return out
}

func checkEvent(t *testing.T, ev *storage.Event) {
	t.Helper()
	want, wantErr := jsonEncode(ev)
	got, err := appendEvent([]byte("prefix"), ev)
	if (err != nil) != (wantErr != nil) {
		t.Fatalf("error %v, encoding/json's %v", err, wantErr)
	}
	// checkTimes finds the error before anything is encoded.
	if err := errors.Join(checkTimes(ev.Node), checkTimes(ev.PrevNode)); (err != nil) != (wantErr != nil) {
		t.Fatalf("checkTimes: %v, encoding/json: %v", err, wantErr)
	}
	if err != nil {
		if string(got) != "prefix" {
			t.Fatalf("failed encoding left %q", got)
		}
		return
	}
	if !bytes.Equal(got[len("prefix"):], want) {
		t.Fatalf("encoded\n%s\nencoding/json\n%s", got[len("prefix"):], want)
	}
	// In pieces, the same bytes.
	if spilled, last := encodeSpilling(t, ev); !bytes.Equal(append(spilled, last...), want) {
		t.Fatalf("in pieces\n%s\nencoding/json\n%s", append(spilled, last...), want)
	}
}

// encodeSpilling encodes ev with appendEventSpilling: the pieces it spilled,
// and what it returned. No piece is empty or under spillAt.
func encodeSpilling(t *testing.T, ev *storage.Event) (spilled, last []byte) {
	t.Helper()
	last, _ = appendEventSpilling(nil, ev, func(b []byte) []byte {
		if len(b) < spillAt {
			t.Fatalf("spilled %d bytes, under spillAt", len(b))
		}
		spilled = append(spilled, b...)
		return b[:0]
	})
	return spilled, last
}

// A listing larger than spillAt goes out in pieces whose bytes together are
// encoding/json's.
func TestEncodeLargeListingInPieces(t *testing.T) {
	exp := time.Date(2026, 3, 4, 5, 6, 7, 891000000, time.UTC)
	var dirs []*storage.Node
	for d := range 20 {
		dir := &storage.Node{Key: fmt.Sprintf("/big/d%d", d), Dir: true, ModifiedIndex: uint64(d + 1), CreatedIndex: 1}
		for i := range 100 {
			v := trickyStrings[(d+i)%len(trickyStrings)] + strings.Repeat("v", i*3)
			n := &storage.Node{Key: fmt.Sprintf("%s/k%d", dir.Key, i), Value: &v, ModifiedIndex: uint64(i + 2), CreatedIndex: 2}
			if i%7 == 0 {
				n.Expiration, n.TTL = &exp, 60
			}
			dir.Nodes = append(dir.Nodes, n)
		}
		dirs = append(dirs, dir)
	}
	ev := &storage.Event{Action: storage.ActionGet, Node: &storage.Node{Key: "/big", Dir: true, Nodes: dirs, ModifiedIndex: 1, CreatedIndex: 1}}
	want, err := jsonEncode(ev)
	if err != nil {
		t.Fatal(err)
	}
	spilled, last := encodeSpilling(t, ev)
	if len(spilled) < 3*spillAt {
		t.Fatalf("%d bytes spilled of %d", len(spilled), len(want))
	}
	if got := append(spilled, last...); !bytes.Equal(got, want) {
		t.Fatalf("in pieces: %d bytes, encoding/json: %d", len(got), len(want))
	}
	checkEvent(t, ev)
}

func TestEncodeEventMatchesEncodingJSON(t *testing.T) {
	exp := time.Date(2026, 3, 4, 5, 6, 7, 891000000, time.UTC)
	expLocal := time.Unix(0, 1700000000123456789)
	expZone := time.Date(2024, 12, 31, 23, 59, 59, 1, time.FixedZone("X", -(3*3600+30*60)))
	expNoFrac := time.Date(2001, 1, 1, 0, 0, 0, 0, time.UTC)
	expBadYear := time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC)
	expBadZone := time.Date(2020, 1, 1, 0, 0, 0, 0, time.FixedZone("S", 61))

	var events []*storage.Event
	events = append(events,
		&storage.Event{},
		&storage.Event{Action: storage.ActionGet, Node: &storage.Node{Dir: true}},
		&storage.Event{Action: storage.ActionSet, Node: &storage.Node{Key: "/a", Value: strp(""), ModifiedIndex: 1, CreatedIndex: 1}},
		&storage.Event{Action: storage.ActionSet, Node: &storage.Node{Value: strp("v")}},
		&storage.Event{Action: storage.ActionExpire, Node: &storage.Node{Key: "/a", ModifiedIndex: 3, CreatedIndex: 2},
			PrevNode: &storage.Node{Key: "/a", Value: strp("x"), Expiration: &exp, TTL: -1, ModifiedIndex: 2, CreatedIndex: 2}},
		&storage.Event{Action: storage.ActionUpdate, Node: &storage.Node{Key: "/t", Value: strp("1"), Expiration: &expLocal, TTL: 1 << 40}},
		&storage.Event{Action: storage.ActionUpdate, Node: &storage.Node{Key: "/t", Expiration: &expZone, TTL: -9}},
		&storage.Event{Action: storage.ActionUpdate, Node: &storage.Node{Key: "/t", Expiration: &expNoFrac}},
		&storage.Event{Action: storage.ActionUpdate, Node: &storage.Node{Key: "/t", Expiration: &expBadYear}},
		&storage.Event{Action: storage.ActionUpdate, PrevNode: &storage.Node{Key: "/t", Expiration: &expBadZone}},
		&storage.Event{Action: storage.ActionGet, Node: &storage.Node{Key: "/d", Dir: true, Nodes: []*storage.Node{}}},
		&storage.Event{Action: storage.ActionGet, Node: &storage.Node{Key: "/d", Dir: true, Nodes: []*storage.Node{
			{Key: "/d/a", Value: strp("1"), ModifiedIndex: 5, CreatedIndex: 4},
			nil,
			{Key: "/d/e", Dir: true, Nodes: []*storage.Node{{Key: "/d/e/f", Value: strp("<&>")}, {}}},
			{Key: "/d/x", Dir: true, Expiration: &exp, TTL: 100, Nodes: []*storage.Node{{Key: "/d/x/y", Expiration: &expBadYear}}},
		}, ModifiedIndex: 1<<64 - 1, CreatedIndex: 1}},
	)
	for _, s := range trickyStrings {
		events = append(events,
			&storage.Event{Action: s, Node: &storage.Node{Key: s, Value: strp(s)}, PrevNode: &storage.Node{Key: s}},
			&storage.Event{Action: storage.ActionCompareAndSwap, Node: &storage.Node{Key: "/k", Value: strp(s), Nodes: []*storage.Node{{Key: s, Value: strp(s)}}}},
		)
	}
	for _, ev := range events {
		checkEvent(t, ev)
	}
}

func TestEncodeKeyErrorMatchesEncodingJSON(t *testing.T) {
	errs := []*storage.Error{
		storage.NewError(storage.EcodeKeyNotFound, "/foo", 7),
		storage.NewError(storage.EcodeInvalidForm, "", 0),
		storage.NewError(storage.EcodeRaftInternal, errNotRunning, 1<<64-1),
		{ErrorCode: -3},
	}
	for _, s := range trickyStrings {
		errs = append(errs, &storage.Error{ErrorCode: 209, Message: s, Cause: s, Index: 3})
	}
	for _, e := range errs {
		want, err := json.Marshal(e)
		if err != nil {
			t.Fatal(err)
		}
		want = append(oldGoEscapes(want), '\n')
		if got := appendKeyError(nil, e); !bytes.Equal(got, want) {
			t.Errorf("encoded\n%s\nencoding/json\n%s", got, want)
		}
	}
}

// FuzzEncodeEvent compares the hand-written encoder with encoding/json on
// events built from fuzzed strings, numbers and times, a node with a
// child and a previous node.
func FuzzEncodeEvent(f *testing.F) {
	for i, s := range trickyStrings {
		f.Add(s, s, true, int64(i)-3, int64(1700000000123456789)+int64(i), int32(i*1800), uint64(i), uint64(i*i), i%2 == 0, uint8(i))
	}
	f.Add("set", "/a", false, int64(0), int64(0), int32(0), uint64(0), uint64(0), false, uint8(0))
	f.Add("get", "/b", true, int64(-1), int64(-1<<63), int32(-1), uint64(1<<64-1), uint64(1), true, uint8(255))
	f.Fuzz(func(t *testing.T, action, s string, hasValue bool, ttl, expNs int64, zone int32, mi, ci uint64, dir bool, shape uint8) {
		var exp *time.Time
		if shape&1 != 0 {
			e := time.Unix(0, expNs).In(time.FixedZone("z", int(zone)))
			exp = &e
		}
		var val *string
		if hasValue {
			val = &s
		}
		child := &storage.Node{Key: s, Value: val, Expiration: exp, TTL: -ttl, ModifiedIndex: ci, CreatedIndex: mi}
		n := &storage.Node{Key: s, Value: val, Dir: dir, Expiration: exp, TTL: ttl, ModifiedIndex: mi, CreatedIndex: ci}
		if shape&2 != 0 {
			n.Nodes = []*storage.Node{child}
		}
		if shape&4 != 0 {
			n.Nodes = append(n.Nodes, nil, &storage.Node{})
		}
		ev := &storage.Event{Action: action}
		if shape&8 == 0 {
			ev.Node = n
		}
		if shape&16 != 0 {
			ev.PrevNode = child
		}
		checkEvent(t, ev)
	})
}

// TestLegacyEscapes: what writeJSON marshals escapes \b and \f as
// appendJSONString does (etcd 3.4.23's Go), and nothing else changes, an
// escaped backslash before a b or an f included.
func TestLegacyEscapes(t *testing.T) {
	for _, s := range []string{"", "plain", "a\bb\fc", `back\slash b \b \f \\b`, "\b\f\\b\f", "<&>\u2028\t\n\x01\xff"} {
		m, err := json.Marshal(map[string]string{"user": s})
		if err != nil {
			t.Fatal(err)
		}
		want := append(append([]byte(`{"user":`), appendJSONString(nil, s)...), '}')
		if got := legacyEscapes(m); !bytes.Equal(got, want) {
			t.Errorf("%q: legacyEscapes(%s) = %s, want %s", s, m, got, want)
		}
	}
}
