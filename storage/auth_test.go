package storage

import (
	"maps"
	"strings"
	"testing"
	"time"
)

func authPut(p, v string) Request { return Request{Method: MethodAuthPut, Path: p, Val: v} }

func authCreate(p, v string) Request {
	return Request{Method: MethodAuthPut, Path: p, Val: v, PrevExist: boolp(false)}
}

func (ts *tstore) authValues() map[string]string {
	ts.t.Helper()
	d, err := ts.Auth()
	if err != nil {
		ts.t.Fatal(err)
	}
	return d.Values
}

func TestAuthWritesMoveTheIndexAsEtcds(t *testing.T) {
	ts := newTestStore(t)
	if v := ts.authValues(); len(v) != 0 {
		t.Fatalf("fresh store's auth data: %v", v)
	}
	ts.mustDo(set("/k", "1"))
	all := mustWatch(t, ts, "/", true, true, 0)

	// The first auth write is etcd's four directory and flag creates, then itself.
	e := ts.mustDo(authCreate("/users/root", `{"user":"root"}`))
	if e.Node.ModifiedIndex != 6 || ts.Index() != 6 || e.Action != ActionCreate {
		t.Fatalf("first auth write: %s, index %d", jsonOf(t, e), ts.Index())
	}
	want := map[string]string{"/enabled": "false", "/users/root": `{"user":"root"}`}
	if v := ts.authValues(); !maps.Equal(v, want) {
		t.Fatalf("auth data %v, want %v", v, want)
	}
	// Later ones take one index each; failures none.
	if e := ts.mustDo(authPut("/roles/r", `{"role":"r"}`)); e.Node.ModifiedIndex != 7 {
		t.Fatalf("second auth write at %d", e.Node.ModifiedIndex)
	}
	for _, c := range []struct {
		r    Request
		code int
	}{
		{authCreate("/users/root", `{}`), EcodeNodeExist},
		{Request{Method: MethodAuthPut, Path: "/users/x", Val: "{}", PrevExist: boolp(true)}, EcodeKeyNotFound},
		{Request{Method: MethodAuthPut, Path: "/roles/r", Val: "{}", PrevValue: `{"role":"other"}`}, EcodeTestFailed},
		{Request{Method: MethodAuthDelete, Path: "/roles/x"}, EcodeKeyNotFound},
		{Request{Method: MethodAuthDelete, Path: "/roles/r", PrevValue: "{}"}, EcodeTestFailed},
		{authPut("/other", "x"), EcodeRaftInternal},
		{authPut("/users/a/b", "x"), EcodeRaftInternal},
		{authPut("/users/", "x"), EcodeRaftInternal},
		{Request{Method: MethodAuthDelete, Path: AuthEnabledPath}, EcodeRaftInternal},
		// Past bbolt's key limit the whole Save would fail, on every member.
		{authPut("/users/"+strings.Repeat("u", 32<<10), "{}"), EcodeInvalidField},
	} {
		if _, err := ts.do(c.r); err == nil || err.ErrorCode != c.code {
			t.Fatalf("%+v: got %v, want code %d", c.r, err, c.code)
		}
	}
	if ts.Index() != 7 {
		t.Fatalf("failed auth writes moved the index to %d", ts.Index())
	}
	if e := ts.mustDo(Request{Method: MethodAuthPut, Path: "/roles/r", Val: `{"role":"r2"}`, PrevValue: `{"role":"r"}`}); e.Action != ActionCompareAndSwap {
		t.Fatalf("conditional update: %s", jsonOf(t, e))
	}
	if e := ts.mustDo(Request{Method: MethodAuthDelete, Path: "/roles/r"}); e.Action != ActionDelete || e.Node.ModifiedIndex != 9 {
		t.Fatalf("delete: %s", jsonOf(t, e))
	}
	ts.mustDo(authPut(AuthEnabledPath, "true"))
	k := ts.mustDo(set("/k", "2"))
	if k.Node.ModifiedIndex != 11 {
		t.Fatalf("key write after auth writes at %d", k.Node.ModifiedIndex)
	}

	// No watcher sees auth writes, live or from history; they hold their
	// place in the history, as in etcd.
	if e := next(t, all); e.Node.Key != "/k" || e.Node.ModifiedIndex != 11 {
		t.Fatalf("watcher of / got %s", jsonOf(t, e))
	}
	check := func() {
		t.Helper()
		w := mustWatch(t, ts, "/", true, false, 2)
		if e := next(t, w); e.Node.ModifiedIndex != 11 {
			t.Fatalf("watch from 2 got %s", jsonOf(t, e))
		}
		want := map[string]string{"/enabled": "true", "/users/root": `{"user":"root"}`}
		if v := ts.authValues(); !maps.Equal(v, want) {
			t.Fatalf("auth data %v, want %v", v, want)
		}
		if ts.hub.history.n != 11 {
			t.Fatalf("history holds %d events, want 11", ts.hub.history.n)
		}
	}
	check()
	ts.reopen()
	check()
}

func TestSnapshotInstallCarriesAuthData(t *testing.T) {
	leader, follower := newTestStore(t), newTestStore(t)
	leader.apply(set("/a", "1"), authCreate("/users/root", "u"), authPut(AuthEnabledPath, "true"))
	follower.apply(authCreate("/roles/stale", "r"))
	path := receive(t, leader, follower)
	if _, err := follower.Save(snapshotReady(path, 3, 1, 1)); err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"/enabled": "true", "/users/root": "u"}
	for _, s := range []*tstore{follower, func() *tstore { follower.reopen(); return follower }()} {
		if v := s.authValues(); !maps.Equal(v, want) || s.Index() != 7 {
			t.Fatalf("after install: %v, index %d", v, s.Index())
		}
	}
}

// etcd's rules hold at apply, whatever the requests raced with: auth goes on only with a
// root user, and the root user stays while it is on.
func TestAuthRootRulesHoldAtApply(t *testing.T) {
	ts := newTestStore(t)
	ts.mustDo(authCreate("/users/alice", "a"))
	if _, err := ts.do(authPut(AuthEnabledPath, "true")); err == nil || err.ErrorCode != EcodeTestFailed {
		t.Fatalf("auth on without root: %v", err)
	}
	ts.mustDo(authCreate("/users/root", "r"))
	ts.mustDo(authPut(AuthEnabledPath, "true"))
	if _, err := ts.do(Request{Method: MethodAuthDelete, Path: "/users/root"}); err == nil || err.ErrorCode != EcodeTestFailed {
		t.Fatalf("root deleted while auth is on: %v", err)
	}
	ts.mustDo(Request{Method: MethodAuthDelete, Path: "/users/alice"})
	ts.mustDo(authPut(AuthEnabledPath, "false"))
	ts.mustDo(Request{Method: MethodAuthDelete, Path: "/users/root"})
	if v := ts.authValues(); len(v) != 1 || v[AuthEnabledPath] != "false" {
		t.Fatalf("auth data %v", v)
	}
}

// A deferred Save's results are answered before its commit: Auth waits for that commit
// when the Save changed the auth data (a revoked role must not pass a later check), and
// not otherwise (every request's access check reads it).
func TestAuthWaitsForDeferredAuthWritesOnly(t *testing.T) {
	ts := newTestStore(t)
	ents := []*raftEntry{
		entry(1, &Request{Method: MethodPut, Path: "/k", Val: "1"}),
		entry(2, &Request{Method: MethodAuthPut, Path: "/users/root", Val: "r", PrevExist: boolp(false)}),
	}
	if _, err := ts.Save(Ready{Entries: ents}); err != nil {
		t.Fatal(err)
	}
	auth := func() <-chan *AuthData {
		c := make(chan *AuthData, 1)
		go func() {
			d, err := ts.Auth()
			if err != nil {
				t.Error(err)
			}
			c <- d
		}()
		return c
	}
	if _, err := ts.Save(Ready{Committed: ents[:1], Defer: true}); err != nil {
		t.Fatal(err)
	}
	select {
	case d := <-auth():
		if len(d.Values) != 0 {
			t.Fatalf("auth data %v", d.Values)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Auth waited for a deferred key write")
	}
	if !ts.Deferred() {
		t.Fatal("a key write's deferred transaction was committed for Auth")
	}
	if _, err := ts.Save(Ready{Committed: ents[1:], Defer: true}); err != nil {
		t.Fatal(err)
	}
	got := auth()
	select {
	case <-ts.FlushRequests():
	case <-time.After(10 * time.Second):
		t.Fatal("Auth did not ask for the deferred auth write's commit")
	}
	if err := ts.Flush(); err != nil {
		t.Fatal(err)
	}
	if d := <-got; d.Values["/users/root"] != "r" {
		t.Fatalf("Auth after a deferred auth write: %v", d.Values)
	}
}
