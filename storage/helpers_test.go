package storage

import (
	"encoding/json"
	"testing"
	"time"

	"go.etcd.io/raft/v3/raftpb"
	"go.uber.org/goleak"
	"google.golang.org/protobuf/proto"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// testClock is the fixed time the tests' stores build ttl fields with.
var testClock = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

// tstore drives a real Store on a real bbolt file the way raftkv does: one
// Save per batch of entries, each entry appended and committed at once.
type tstore struct {
	*Store
	t     *testing.T
	dir   string
	clock time.Time
}

func newTestStore(t *testing.T) *tstore {
	t.Helper()
	ts := &tstore{t: t, dir: t.TempDir(), clock: testClock}
	ts.open()
	t.Cleanup(func() { ts.Close() })
	return ts
}

func (ts *tstore) open() {
	ts.t.Helper()
	s, err := Open(ts.dir)
	if err != nil {
		ts.t.Fatal(err)
	}
	s.now = func() time.Time { return ts.clock }
	ts.Store = s
}

func (ts *tstore) reopen() {
	ts.t.Helper()
	if err := ts.Close(); err != nil {
		ts.t.Fatal(err)
	}
	ts.open()
}

func entry(index uint64, r *Request) *raftpb.Entry {
	e := &raftpb.Entry{Index: proto.Uint64(index), Term: proto.Uint64(1), Type: raftpb.EntryNormal.Enum()}
	if r != nil {
		e.Data = r.Marshal()
	}
	return e
}

// apply appends and commits one entry per request in one Save.
func (ts *tstore) apply(reqs ...Request) []Applied {
	ts.t.Helper()
	next := ts.AppliedIndex() + 1
	var ents []*raftpb.Entry
	for i := range reqs {
		ents = append(ents, entry(next+uint64(i), &reqs[i]))
	}
	out, err := ts.Save(Ready{
		HardState: &raftpb.HardState{Term: proto.Uint64(1), Commit: proto.Uint64(next + uint64(len(reqs)) - 1)},
		Entries:   ents,
		Committed: ents,
	})
	if err != nil {
		ts.t.Fatal(err)
	}
	return out
}

// do applies one request and returns its event or v2 error.
func (ts *tstore) do(r Request) (*Event, *Error) {
	ts.t.Helper()
	out := ts.apply(r)
	if len(out) != 1 {
		ts.t.Fatalf("%d results for one request", len(out))
	}
	return out[0].Event, out[0].Err
}

// mustDo applies r and fails the test on a v2 error.
func (ts *tstore) mustDo(r Request) *Event {
	ts.t.Helper()
	e, err := ts.do(r)
	if err != nil {
		ts.t.Fatalf("%+v: %v", r, err)
	}
	return e
}

func (ts *tstore) get(p string, recursive, sorted bool) (*Event, error) {
	return ts.Get(p, recursive, sorted, ts.clock)
}

func (ts *tstore) mustGet(p string, recursive bool) *Event {
	ts.t.Helper()
	e, err := ts.get(p, recursive, true)
	if err != nil {
		ts.t.Fatalf("GET %s: %v", p, err)
	}
	return e
}

func boolp(b bool) *bool { return &b }

type raftEntry = raftpb.Entry

func set(p, v string) Request { return Request{Method: MethodPut, Path: p, Val: v} }

func mkdir(p string) Request { return Request{Method: MethodPut, Path: p, Dir: true} }

// wantErr checks a v2 error's code, cause and index.
func wantErr(t *testing.T, err error, code int, cause string, index uint64) {
	t.Helper()
	e, ok := err.(*Error)
	if !ok || e == nil {
		t.Fatalf("got error %v, want %d %q [%d]", err, code, cause, index)
	}
	if e.ErrorCode != code || e.Cause != cause || e.Index != index {
		t.Fatalf("got %d %q [%d], want %d %q [%d]", e.ErrorCode, e.Cause, e.Index, code, cause, index)
	}
}

// verr turns a *Error result into an error without the typed-nil trap.
func verr(e *Error) error {
	if e == nil {
		return nil
	}
	return e
}

// jsonOf is the event as etcd's JSON, the form clients compare.
func jsonOf(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func wantJSON(t *testing.T, v any, want string) {
	t.Helper()
	if got := jsonOf(t, v); got != want {
		t.Fatalf("got  %s\nwant %s", got, want)
	}
}
