package storage

import (
	"strings"
	"testing"
	"time"
)

// TestKeyOperationsMatchEtcd replays, in one store, the write requests of
// the reference's edge cases (numbers in the names) and checks each answer
// as etcd 3.4 gives it: the event's JSON, or the error code, cause and
// index. Indexes start at 1 here (etcd's own internal writes take the
// first three on a fresh member).
func TestKeyOperationsMatchEtcd(t *testing.T) {
	ts := newTestStore(t)
	steps := []struct {
		name  string
		req   Request
		want  string // the event's JSON, when it succeeds
		code  int    // else the v2 error
		cause string
		index uint64
	}{
		{name: "1 set on a new key creates it", req: set("/a", "1"),
			want: `{"action":"set","node":{"key":"/a","value":"1","modifiedIndex":1,"createdIndex":1}}`},
		{name: "2 set again re-creates the node", req: set("/a", "2"),
			want: `{"action":"set","node":{"key":"/a","value":"2","modifiedIndex":2,"createdIndex":2},"prevNode":{"key":"/a","value":"1","modifiedIndex":1,"createdIndex":1}}`},
		{name: "3 an empty value is legal", req: set("/empty", ""),
			want: `{"action":"set","node":{"key":"/empty","value":"","modifiedIndex":3,"createdIndex":3}}`},
		{name: "7 create fails on an existing key", req: Request{Method: MethodPut, Path: "/a", Val: "x", PrevExist: boolp(false)},
			code: EcodeNodeExist, cause: "/a", index: 3},
		{name: "7 create on a new key", req: Request{Method: MethodPut, Path: "/newk", Val: "n", PrevExist: boolp(false)},
			want: `{"action":"create","node":{"key":"/newk","value":"n","modifiedIndex":4,"createdIndex":4}}`},
		{name: "8 update of a missing key", req: Request{Method: MethodPut, Path: "/missing", Val: "x", PrevExist: boolp(true)},
			code: EcodeKeyNotFound, cause: "/missing", index: 4},
		{name: "8 update keeps createdIndex", req: Request{Method: MethodPut, Path: "/a", Val: "3", PrevExist: boolp(true)},
			want: `{"action":"update","node":{"key":"/a","value":"3","modifiedIndex":5,"createdIndex":2},"prevNode":{"key":"/a","value":"2","modifiedIndex":2,"createdIndex":2}}`},
		{name: "10 prevIndex 0 is a plain set", req: Request{Method: MethodPut, Path: "/a", Val: "4", PrevIndex: 0},
			want: `{"action":"set","node":{"key":"/a","value":"4","modifiedIndex":6,"createdIndex":6},"prevNode":{"key":"/a","value":"3","modifiedIndex":5,"createdIndex":2}}`},
		{name: "11 CAS value mismatch", req: Request{Method: MethodPut, Path: "/a", Val: "x", PrevValue: "two"},
			code: EcodeTestFailed, cause: "[two != 4]", index: 6},
		{name: "11 CAS index mismatch", req: Request{Method: MethodPut, Path: "/a", Val: "x", PrevIndex: 1},
			code: EcodeTestFailed, cause: "[1 != 6]", index: 6},
		{name: "11 CAS both mismatch", req: Request{Method: MethodPut, Path: "/a", Val: "x", PrevValue: "two", PrevIndex: 1},
			code: EcodeTestFailed, cause: "[two != 4] [1 != 6]", index: 6},
		{name: "12 prevExist with prevValue is a CAS", req: Request{Method: MethodPut, Path: "/a", Val: "5", PrevValue: "4", PrevExist: boolp(true)},
			want: `{"action":"compareAndSwap","node":{"key":"/a","value":"5","modifiedIndex":7,"createdIndex":6},"prevNode":{"key":"/a","value":"4","modifiedIndex":6,"createdIndex":6}}`},
		{name: "13 CAS on a missing key is 404, not 412", req: Request{Method: MethodPut, Path: "/missing", Val: "x", PrevValue: "x"},
			code: EcodeKeyNotFound, cause: "/missing", index: 7},
		{name: "15 set dir on a new key", req: mkdir("/dir"),
			want: `{"action":"set","node":{"key":"/dir","dir":true,"modifiedIndex":8,"createdIndex":8}}`},
		{name: "14 CAS on a directory", req: Request{Method: MethodPut, Path: "/dir", Val: "x", PrevValue: "x"},
			code: EcodeNotFile, cause: "/dir", index: 8},
		{name: "15 set dir on an existing dir", req: mkdir("/dir"),
			code: EcodeNotFile, cause: "/dir", index: 8},
		{name: "17 set a value on a dir", req: set("/dir", "x"),
			code: EcodeNotFile, cause: "/dir", index: 8},
		{name: "15 set dir replaces a file", req: mkdir("/newk"),
			want: `{"action":"set","node":{"key":"/newk","dir":true,"modifiedIndex":9,"createdIndex":9},"prevNode":{"key":"/newk","value":"n","modifiedIndex":4,"createdIndex":4}}`},
		{name: "16 a dir ignores its value", req: Request{Method: MethodPut, Path: "/d2", Dir: true, Val: "x"},
			want: `{"action":"set","node":{"key":"/d2","dir":true,"modifiedIndex":10,"createdIndex":10}}`},
		{name: "18 an ancestor is a file", req: set("/a/b/c", "v"),
			code: EcodeNotDir, cause: "/a", index: 10},
		{name: "19 intermediate dirs are created", req: set("/x/y/z", "v"),
			want: `{"action":"set","node":{"key":"/x/y/z","value":"v","modifiedIndex":11,"createdIndex":11}}`},
		{name: "20 set on the root", req: set("/", "v"), code: EcodeRootROnly, cause: "/", index: 11},
		{name: "20 recursive delete of the root", req: Request{Method: MethodDelete, Path: "/", Recursive: true},
			code: EcodeRootROnly, cause: "/", index: 11},
		{name: "20 update of the root", req: Request{Method: MethodPut, Path: "/", PrevExist: boolp(true)},
			code: EcodeRootROnly, cause: "/", index: 11},
		{name: "20 CAS of the root", req: Request{Method: MethodPut, Path: "/", PrevValue: "x"},
			code: EcodeRootROnly, cause: "/", index: 11},
		{name: "20 create of the root", req: Request{Method: MethodPut, Path: "/", PrevExist: boolp(false)},
			code: EcodeRootROnly, cause: "/", index: 11},
		{name: "20 CAD of the root fails as a directory, with no cause", req: Request{Method: MethodDelete, Path: "/", PrevValue: "x"},
			code: EcodeNotFile, cause: "", index: 11},
		{name: "43 POST creates an in-order key", req: Request{Method: MethodPost, Path: "/q", Val: "j1"},
			want: `{"action":"create","node":{"key":"/q/00000000000000000012","value":"j1","modifiedIndex":12,"createdIndex":12}}`},
		{name: "44 POST dir creates an in-order dir", req: Request{Method: MethodPost, Path: "/q", Dir: true},
			want: `{"action":"create","node":{"key":"/q/00000000000000000013","dir":true,"modifiedIndex":13,"createdIndex":13}}`},
		{name: "45 POST on a file", req: Request{Method: MethodPost, Path: "/a", Val: "v"},
			code: EcodeNotDir, cause: "/a", index: 13},
		{name: "45 POST on the root", req: Request{Method: MethodPost, Path: "/", Val: "r"},
			want: `{"action":"create","node":{"key":"/00000000000000000014","value":"r","modifiedIndex":14,"createdIndex":14}}`},
		{name: "46 delete of a dir without dir", req: Request{Method: MethodDelete, Path: "/dir"},
			code: EcodeNotFile, cause: "/dir", index: 14},
		{name: "46 a key in the dir", req: set("/dir/k", "v"),
			want: `{"action":"set","node":{"key":"/dir/k","value":"v","modifiedIndex":15,"createdIndex":15}}`},
		{name: "46 delete dir=true of a non-empty dir", req: Request{Method: MethodDelete, Path: "/dir", Dir: true},
			code: EcodeDirNotEmpty, cause: "/dir", index: 15},
		{name: "46 recursive delete of a dir", req: Request{Method: MethodDelete, Path: "/dir", Recursive: true},
			want: `{"action":"delete","node":{"key":"/dir","dir":true,"modifiedIndex":16,"createdIndex":8},"prevNode":{"key":"/dir","dir":true,"modifiedIndex":8,"createdIndex":8}}`},
		{name: "47 delete dir=true of a file", req: Request{Method: MethodDelete, Path: "/empty", Dir: true},
			want: `{"action":"delete","node":{"key":"/empty","modifiedIndex":17,"createdIndex":3},"prevNode":{"key":"/empty","value":"","modifiedIndex":3,"createdIndex":3}}`},
		{name: "49 CAD mismatch", req: Request{Method: MethodDelete, Path: "/a", PrevValue: "wrong"},
			code: EcodeTestFailed, cause: "[wrong != 5]", index: 17},
		{name: "49 CAD index mismatch", req: Request{Method: MethodDelete, Path: "/a", PrevIndex: 1},
			code: EcodeTestFailed, cause: "[1 != 7]", index: 17},
		{name: "49 CAD", req: Request{Method: MethodDelete, Path: "/a", PrevValue: "5"},
			want: `{"action":"compareAndDelete","node":{"key":"/a","modifiedIndex":18,"createdIndex":6},"prevNode":{"key":"/a","value":"5","modifiedIndex":7,"createdIndex":6}}`},
		{name: "49 CAD on a dir", req: Request{Method: MethodDelete, Path: "/d2", PrevValue: "x"},
			code: EcodeNotFile, cause: "/d2", index: 18},
		{name: "49 CAD on a missing key", req: Request{Method: MethodDelete, Path: "/a", PrevValue: "5"},
			code: EcodeKeyNotFound, cause: "/a", index: 18},
		{name: "50 a file for prevExist delete", req: set("/pe", "v"),
			want: `{"action":"set","node":{"key":"/pe","value":"v","modifiedIndex":19,"createdIndex":19}}`},
		{name: "50 delete with prevExist is a plain delete", req: Request{Method: MethodDelete, Path: "/pe", PrevExist: boolp(true)},
			want: `{"action":"delete","node":{"key":"/pe","modifiedIndex":20,"createdIndex":19},"prevNode":{"key":"/pe","value":"v","modifiedIndex":19,"createdIndex":19}}`},
		{name: "update of a dir with a value", req: Request{Method: MethodPut, Path: "/d2", Dir: true, Val: "x", PrevExist: boolp(true)},
			code: EcodeNotFile, cause: "/d2", index: 20},
		{name: "a file for update dir=true", req: set("/f", "v"),
			want: `{"action":"set","node":{"key":"/f","value":"v","modifiedIndex":21,"createdIndex":21}}`},
		{name: "update dir=true of a file blanks its value", req: Request{Method: MethodPut, Path: "/f", Dir: true, PrevExist: boolp(true)},
			want: `{"action":"update","node":{"key":"/f","value":"","modifiedIndex":22,"createdIndex":21},"prevNode":{"key":"/f","value":"v","modifiedIndex":21,"createdIndex":21}}`},
		{name: "delete of a key under a file", req: Request{Method: MethodDelete, Path: "/f/g"},
			code: EcodeNotDir, cause: "/f", index: 22},
		{name: "unclean paths are cleaned", req: set("x//y/../y/w/", "w"),
			want: `{"action":"set","node":{"key":"/x/y/w","value":"w","modifiedIndex":23,"createdIndex":23}}`},
	}
	for _, st := range steps {
		e, err := ts.do(st.req)
		if st.code != 0 {
			if e != nil {
				t.Fatalf("%s: got %s, want error %d", st.name, jsonOf(t, e), st.code)
			}
			wantErr(t, verr(err), st.code, st.cause, st.index)
			if ts.Index() != st.index {
				t.Fatalf("%s: a failure moved the index to %d", st.name, ts.Index())
			}
			continue
		}
		if err != nil {
			t.Fatalf("%s: %v", st.name, err)
		}
		if got := jsonOf(t, e); got != st.want {
			t.Fatalf("%s:\ngot  %s\nwant %s", st.name, got, st.want)
		}
		if e.EtcdIndex != ts.Index() || e.EtcdIndex != e.Index() {
			t.Fatalf("%s: EtcdIndex %d, event index %d, store index %d", st.name, e.EtcdIndex, e.Index(), ts.Index())
		}
	}
	// 19: the intermediate directories carry the index of the write that
	// created them.
	wantJSON(t, ts.mustGet("/x", false).Node,
		`{"key":"/x","dir":true,"nodes":[{"key":"/x/y","dir":true,"modifiedIndex":11,"createdIndex":11}],"modifiedIndex":11,"createdIndex":11}`)
}

func TestGetMatchesEtcd(t *testing.T) {
	ts := newTestStore(t)
	ts.apply(
		set("/b", "2"),             // 1
		set("/a", "1"),             // 2
		mkdir("/emptydir"),         // 3
		set("/dir/z", "z"),         // 4
		set("/dir/sub/k", "k"),     // 5
		set("/dir/_hidden", "h"),   // 6
		set("/_hidden", "h"),       // 7
		set("/dir/sub/_deep", "d"), // 8
		set("/file", "f"),          // 9
	)
	tests := []struct {
		name      string
		path      string
		recursive bool
		want      string
		code      int
		cause     string
	}{
		{name: "33 the root has no key and no indexes; 37 hidden children are not listed", path: "/",
			want: `{"action":"get","node":{"dir":true,"nodes":[{"key":"/a","value":"1","modifiedIndex":2,"createdIndex":2},{"key":"/b","value":"2","modifiedIndex":1,"createdIndex":1},{"key":"/dir","dir":true,"modifiedIndex":4,"createdIndex":4},{"key":"/emptydir","dir":true,"modifiedIndex":3,"createdIndex":3},{"key":"/file","value":"f","modifiedIndex":9,"createdIndex":9}]}}`},
		{name: "34 one level: child dirs without nodes", path: "/dir",
			want: `{"action":"get","node":{"key":"/dir","dir":true,"nodes":[{"key":"/dir/sub","dir":true,"modifiedIndex":5,"createdIndex":5},{"key":"/dir/z","value":"z","modifiedIndex":4,"createdIndex":4}],"modifiedIndex":4,"createdIndex":4}}`},
		{name: "36 37 recursive and sorted, hidden never listed at any depth", path: "/dir", recursive: true,
			want: `{"action":"get","node":{"key":"/dir","dir":true,"nodes":[{"key":"/dir/sub","dir":true,"nodes":[{"key":"/dir/sub/k","value":"k","modifiedIndex":5,"createdIndex":5}],"modifiedIndex":5,"createdIndex":5},{"key":"/dir/z","value":"z","modifiedIndex":4,"createdIndex":4}],"modifiedIndex":4,"createdIndex":4}}`},
		{name: "35 an empty dir has no nodes field", path: "/emptydir",
			want: `{"action":"get","node":{"key":"/emptydir","dir":true,"modifiedIndex":3,"createdIndex":3}}`},
		{name: "37 a hidden key is readable directly", path: "/_hidden",
			want: `{"action":"get","node":{"key":"/_hidden","value":"h","modifiedIndex":7,"createdIndex":7}}`},
		{name: "38 the cause is the first missing component", path: "/nope/a/b", code: EcodeKeyNotFound, cause: "/nope"},
		{name: "38 a missing key in a dir", path: "/dir/nope", code: EcodeKeyNotFound, cause: "/dir/nope"},
		{name: "39 a component is a file", path: "/file/sub", code: EcodeNotDir, cause: "/file"},
		{name: "39 a deeper component is a file", path: "/dir/z/a/b", code: EcodeNotDir, cause: "/dir/z"},
	}
	for _, tt := range tests {
		e, err := ts.get(tt.path, tt.recursive, true)
		if tt.code != 0 {
			wantErr(t, err, tt.code, tt.cause, 9)
			continue
		}
		if err != nil {
			t.Fatalf("%s: %v", tt.name, err)
		}
		if got := jsonOf(t, e); got != tt.want {
			t.Fatalf("%s:\ngot  %s\nwant %s", tt.name, got, tt.want)
		}
		if e.EtcdIndex != 9 {
			t.Fatalf("%s: EtcdIndex %d", tt.name, e.EtcdIndex)
		}
	}
	st := ts.Stats()
	if st.GetSuccess != 5 || st.GetFail != 4 || st.SetSuccess != 9 {
		t.Fatalf("stats: %+v", st)
	}
}

func TestTTLFieldsAndExpiry(t *testing.T) {
	ts := newTestStore(t)
	exp := testClock.Add(5 * time.Second).UnixNano()
	// 21: expiration in UTC with ns precision, ttl = ceil of the seconds left.
	e := ts.mustDo(Request{Method: MethodPut, Path: "/foo", Val: "bar", Expiration: exp + 394947114})
	wantJSON(t, e, `{"action":"set","node":{"key":"/foo","value":"bar","expiration":"2026-01-02T03:04:10.394947114Z","ttl":6,"modifiedIndex":1,"createdIndex":1}}`)
	ts.clock = testClock.Add(2 * time.Second)
	if got := ts.mustGet("/foo", false).Node.TTL; got != 4 {
		t.Fatalf("ttl 2s later: %d", got)
	}
	// 25: update without an expiration removes the TTL.
	e = ts.mustDo(Request{Method: MethodPut, Path: "/foo", Val: "bar", PrevExist: boolp(true)})
	wantJSON(t, e, `{"action":"update","node":{"key":"/foo","value":"bar","modifiedIndex":2,"createdIndex":1},"prevNode":{"key":"/foo","value":"bar","expiration":"2026-01-02T03:04:10.394947114Z","ttl":4,"modifiedIndex":1,"createdIndex":1}}`)
	if _, ok := ts.NextExpiration(); ok {
		t.Fatal("an update without TTL left an expiration")
	}
	// 23: ttl=0 arrives as an expiration of "now": no ttl field, gone at the next SYNC.
	now := ts.clock.UnixNano()
	e = ts.mustDo(Request{Method: MethodPut, Path: "/zero", Val: "1", Expiration: now})
	wantJSON(t, e, `{"action":"set","node":{"key":"/zero","value":"1","expiration":"2026-01-02T03:04:07Z","modifiedIndex":3,"createdIndex":3}}`)
	if next, ok := ts.NextExpiration(); !ok || next.UnixNano() != now {
		t.Fatalf("NextExpiration = %v %v", next, ok)
	}
	// 22: SYNC expires it with an expire event: node without value, prevNode with expiration.
	w, err := ts.Watch("/zero", false, false, 0)
	if err != nil {
		t.Fatal(err)
	}
	ts.do(Request{Method: MethodSync, Time: now - 1})
	if _, err := ts.get("/zero", false, false); err != nil {
		t.Fatal("expired before its time")
	}
	ts.do(Request{Method: MethodSync, Time: now})
	wantJSON(t, <-w.EventChan, `{"action":"expire","node":{"key":"/zero","modifiedIndex":4,"createdIndex":3},"prevNode":{"key":"/zero","value":"1","expiration":"2026-01-02T03:04:07Z","modifiedIndex":3,"createdIndex":3}}`)
	_, err = ts.get("/zero", false, false)
	wantErr(t, err, EcodeKeyNotFound, "/zero", 4)
	if _, ok := ts.NextExpiration(); ok {
		t.Fatal("expiry index not emptied")
	}
	if st := ts.Stats(); st.ExpireCount != 1 {
		t.Fatalf("expireCount %d", st.ExpireCount)
	}
	// A key past its expiration but not yet reaped shows a negative ttl.
	ts.mustDo(Request{Method: MethodPut, Path: "/late", Expiration: testClock.UnixNano()})
	ts.clock = testClock.Add(3 * time.Second)
	if got := ts.mustGet("/late", false).Node.TTL; got != -3 {
		t.Fatalf("ttl of an overdue key: %d", got)
	}
}

func TestExpirationBefore2000(t *testing.T) {
	ts := newTestStore(t)
	old := time.Date(1999, 12, 31, 0, 0, 0, 0, time.UTC).UnixNano()
	// Set and create treat it as permanent (etcd's minExpireTime).
	e := ts.mustDo(Request{Method: MethodPut, Path: "/s", Val: "v", Expiration: old})
	wantJSON(t, e, `{"action":"set","node":{"key":"/s","value":"v","modifiedIndex":1,"createdIndex":1}}`)
	ts.mustDo(Request{Method: MethodPost, Path: "/q", Expiration: -5})
	if _, ok := ts.NextExpiration(); ok {
		t.Fatal("a pre-2000 expiration was indexed on set/create")
	}
	// Update stores it as is (etcd skips the check there): due at once.
	ts.mustDo(Request{Method: MethodPut, Path: "/s", Val: "v", PrevExist: boolp(true), Expiration: -5})
	if next, ok := ts.NextExpiration(); !ok || next.UnixNano() != -5 {
		t.Fatalf("NextExpiration = %v %v", next, ok)
	}
	ts.do(Request{Method: MethodSync, Time: testClock.UnixNano()})
	if _, err := ts.get("/s", false, false); err == nil {
		t.Fatal("a key updated with a pre-2000 expiration survived SYNC")
	}
}

func TestRefresh(t *testing.T) {
	ts := newTestStore(t)
	exp := testClock.Add(5 * time.Second).UnixNano()
	ts.mustDo(Request{Method: MethodPut, Path: "/foo", Val: "bar", Expiration: exp}) // 1
	w, err := ts.Watch("/foo", false, false, 0)
	if err != nil {
		t.Fatal(err)
	}
	// 26: update refresh keeps the value, bumps modifiedIndex, fires no watcher.
	e := ts.mustDo(Request{Method: MethodPut, Path: "/foo", Refresh: true, PrevExist: boolp(true), Expiration: exp + 2e9})
	wantJSON(t, e, `{"action":"update","node":{"key":"/foo","value":"bar","expiration":"2026-01-02T03:04:12Z","ttl":7,"modifiedIndex":2,"createdIndex":1},"prevNode":{"key":"/foo","value":"bar","expiration":"2026-01-02T03:04:10Z","ttl":5,"modifiedIndex":1,"createdIndex":1}}`)
	select {
	case got := <-w.EventChan:
		t.Fatalf("a refresh fired a watcher: %s", jsonOf(t, got))
	default:
	}
	// 28: refresh of a missing key.
	_, verr := ts.do(Request{Method: MethodPut, Path: "/nope", Refresh: true, Expiration: exp})
	wantErr(t, error(verr), EcodeKeyNotFound, "/nope", 2)
	_, verr = ts.do(Request{Method: MethodPut, Path: "/nope", Refresh: true, PrevExist: boolp(true), Expiration: exp})
	wantErr(t, error(verr), EcodeKeyNotFound, "/nope", 2)
	// 29: set refresh resets createdIndex.
	e = ts.mustDo(Request{Method: MethodPut, Path: "/foo", Refresh: true, Expiration: exp})
	wantJSON(t, e, `{"action":"set","node":{"key":"/foo","value":"bar","expiration":"2026-01-02T03:04:10Z","ttl":5,"modifiedIndex":3,"createdIndex":3},"prevNode":{"key":"/foo","value":"bar","expiration":"2026-01-02T03:04:12Z","ttl":7,"modifiedIndex":2,"createdIndex":1}}`)
	// CAS refresh keeps the value too.
	e = ts.mustDo(Request{Method: MethodPut, Path: "/foo", Refresh: true, PrevValue: "bar", Expiration: exp})
	if e.Action != ActionCompareAndSwap || *e.Node.Value != "bar" || !e.Refresh {
		t.Fatalf("CAS refresh: %s", jsonOf(t, e))
	}
	// The next real write reaches the watcher.
	ts.mustDo(set("/foo", "new")) // 5
	got := <-w.EventChan
	if got.Index() != 5 || got.Action != ActionSet {
		t.Fatalf("watcher got %s", jsonOf(t, got))
	}
	// 30: waitIndex at a refresh event returns the next non-refresh one.
	w2, err := ts.Watch("/foo", false, false, 2)
	if err != nil {
		t.Fatal(err)
	}
	if got := <-w2.EventChan; got.Index() != 5 {
		t.Fatalf("history scan returned %s", jsonOf(t, got))
	}
}

// TestDirectoryTTLUpdateKeepsStoredModifiedIndex is edge case 76, kept
// bug-compatible: the event reports the new index, GET the old one.
func TestDirectoryTTLUpdateKeepsStoredModifiedIndex(t *testing.T) {
	ts := newTestStore(t)
	ts.mustDo(mkdir("/dir"))
	exp := testClock.Add(30 * time.Second).UnixNano()
	e := ts.mustDo(Request{Method: MethodPut, Path: "/dir", Dir: true, PrevExist: boolp(true), Expiration: exp})
	wantJSON(t, e, `{"action":"update","node":{"key":"/dir","dir":true,"expiration":"2026-01-02T03:04:35Z","ttl":30,"modifiedIndex":2,"createdIndex":1},"prevNode":{"key":"/dir","dir":true,"modifiedIndex":1,"createdIndex":1}}`)
	wantJSON(t, ts.mustGet("/dir", false), `{"action":"get","node":{"key":"/dir","dir":true,"expiration":"2026-01-02T03:04:35Z","ttl":30,"modifiedIndex":1,"createdIndex":1}}`)
	if ts.Index() != 2 {
		t.Fatalf("index %d", ts.Index())
	}
}

func TestSyncExpiresDirectorySubtreeWithOneEvent(t *testing.T) {
	ts := newTestStore(t)
	t1 := testClock.Add(time.Second).UnixNano()
	t2 := testClock.Add(2 * time.Second).UnixNano()
	ts.apply(
		Request{Method: MethodPut, Path: "/d", Dir: true, Expiration: t1},  // 1
		Request{Method: MethodPut, Path: "/d/a", Val: "a", Expiration: t2}, // 2
		set("/d/sub/b", "b"), // 3
		Request{Method: MethodPut, Path: "/other", Val: "o", Expiration: t2}, // 4
	)
	w, _ := ts.Watch("/d/sub/b", false, false, 0)
	out := ts.apply(Request{Method: MethodSync, Time: t2})
	if out[0].Event != nil || out[0].Err != nil {
		t.Fatalf("SYNC result: %+v", out[0])
	}
	// /d first (earliest), whole subtree, one event; then /other.
	wantJSON(t, <-w.EventChan, `{"action":"expire","node":{"key":"/d","dir":true,"modifiedIndex":5,"createdIndex":1},"prevNode":{"key":"/d","dir":true,"expiration":"2026-01-02T03:04:06Z","ttl":1,"modifiedIndex":1,"createdIndex":1}}`)
	if ts.Index() != 6 {
		t.Fatalf("index %d after two expirations", ts.Index())
	}
	if _, ok := ts.NextExpiration(); ok {
		t.Fatal("the expired subtree left expiry index entries")
	}
	wantJSON(t, ts.mustGet("/", true), `{"action":"get","node":{"dir":true}}`)
	w2, _ := ts.Watch("/", true, true, 5)
	for _, want := range []string{"/d", "/other"} {
		if e := <-w2.EventChan; e.Node.Key != want || e.Action != ActionExpire {
			t.Fatalf("history: %s", jsonOf(t, e))
		}
	}
	w2.Remove()
}

func TestPathsWithControlBytes(t *testing.T) {
	ts := newTestStore(t)
	// Names holding the layout's separator and escape bytes stay apart.
	ts.apply(set("/a\x00b", "1"), set("/a/b", "2"), set("/a\x01/c", "3"), set("/a\x00", "4"))
	wantJSON(t, ts.mustGet("/a", true).Node.Nodes, `[{"key":"/a/b","value":"2","modifiedIndex":2,"createdIndex":2}]`)
	got := ts.mustGet("/", true).Node.Nodes
	var keys []string
	for _, n := range got {
		keys = append(keys, n.Key)
	}
	if strings.Join(keys, "|") != "/a|/a\x00|/a\x00b|/a\x01" {
		t.Fatalf("root listing %q", keys)
	}
	ts.mustDo(Request{Method: MethodDelete, Path: "/a", Recursive: true})
	if e := ts.mustGet("/a\x00b", false); *e.Node.Value != "1" {
		t.Fatal("deleting /a touched /a\\x00b")
	}
}

func TestTooLongKeyIsAV2Error(t *testing.T) {
	ts := newTestStore(t)
	_, err := ts.do(set("/"+strings.Repeat("k", MaxPathLen), "v"))
	wantErr(t, verr(err), EcodeInvalidField, "key is too long", 0)
	ts.mustDo(set("/"+strings.Repeat("k", MaxPathLen-1), "v"))
}

func TestStatsCountEveryOperation(t *testing.T) {
	ts := newTestStore(t)
	ts.apply(
		set("/a", "1"), set("/", "x"), // set ok, fail
		Request{Method: MethodPut, Path: "/a", PrevExist: boolp(false)},          // create fail
		Request{Method: MethodPost, Path: "/a"},                                  // create fail (+set fail: etcd quirk)
		Request{Method: MethodPut, Path: "/c", PrevExist: boolp(false)},          // create ok
		Request{Method: MethodPut, Path: "/a", Val: "2", PrevExist: boolp(true)}, // update ok
		Request{Method: MethodPut, Path: "/n", PrevExist: boolp(true)},           // update fail
		Request{Method: MethodPut, Path: "/a", Val: "3", PrevValue: "2"},         // cas ok
		Request{Method: MethodPut, Path: "/a", Val: "3", PrevValue: "2"},         // cas fail
		Request{Method: MethodDelete, Path: "/a", PrevValue: "3"},                // cad ok
		Request{Method: MethodDelete, Path: "/c", PrevValue: "x"},                // cad fail
		Request{Method: MethodDelete, Path: "/c"},                                // delete ok
		Request{Method: MethodDelete, Path: "/c"},                                // delete fail
	)
	ts.get("/", false, false)
	ts.get("/nope", false, false)
	w, _ := ts.Watch("/w", false, false, 0)
	want := Stats{GetSuccess: 1, GetFail: 1, SetSuccess: 1, SetFail: 2, CreateSuccess: 1, CreateFail: 2,
		UpdateSuccess: 1, UpdateFail: 1, CompareAndSwapSuccess: 1, CompareAndSwapFail: 1,
		CompareAndDeleteSuccess: 1, CompareAndDeleteFail: 1, DeleteSuccess: 1, DeleteFail: 1, Watchers: 1}
	if got := ts.Stats(); got != want {
		t.Fatalf("got  %+v\nwant %+v", got, want)
	}
	w.Remove()
	if ts.Stats().Watchers != 0 {
		t.Fatal("watchers not decremented")
	}
}

// TestSavePanicLeavesNoTransactionOpen panics in the middle of a Save, with
// its write transaction open (here in the clock the applier reads). The
// transaction must be rolled back before the panic goes on: left open, it
// would keep bbolt's lock, and Close would wait for it forever. What was
// saved before is intact; the half-applied entry is not there.
func TestSavePanicLeavesNoTransactionOpen(t *testing.T) {
	ts := newTestStore(t)
	ts.mustDo(set("/before", "1"))
	ts.Store.now = func() time.Time { panic("in the middle of a Save (test)") }
	func() {
		defer func() {
			if r := recover(); r == nil {
				t.Fatal("Save did not panic")
			}
		}()
		ts.apply(set("/during", "2"))
	}()
	closed := make(chan error, 1)
	go func() { closed <- ts.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close still waits 10s after a Save panicked: its transaction was left open")
	}
	ts.open()
	ts.mustGet("/before", false)
	_, err := ts.get("/during", false, false)
	wantErr(t, err, EcodeKeyNotFound, "/during", 1)
}
