package storage

import (
	"strings"

	bolt "go.etcd.io/bbolt"
)

// The v2 auth data (users, roles, whether auth is on) lives beside the
// keyspace, where etcd keeps it in its v2 store under /2, out of reach of
// /v2/keys (which is /1 there). The store treats it as opaque values at
// three kinds of path: /enabled, /users/<name> and /roles/<name>; what the
// values mean (etcd's JSON) is the caller's business.
//
// Writes to it go through Raft as AUTHPUT and AUTHDELETE requests, so every
// member holds the same data, and they move the store index as etcd's do:
// before the first one, etcd creates /2, /2/users, /2/roles and /2/enabled
// (four more indexes), and each write that succeeds takes one. Each of
// those indexes has an event in the history, as in etcd, under a key
// outside the keyspace (no leading "/"), which no watcher can match and
// which carries no value.
const (
	MethodAuthPut    = "AUTHPUT"    // set Path to Val; PrevExist and PrevValue as for PUT
	MethodAuthDelete = "AUTHDELETE" // delete Path (not /enabled), which must exist; PrevValue as for DELETE
)

var bucketAuth = []byte("auth")

// AuthEnabledPath is the path of the "is auth on" value ("true" or
// "false"), which exists once the first auth write has been applied.
const AuthEnabledPath = "/enabled"

// authRootUser is the root user's path: while auth is on it cannot go,
// and auth cannot go on without it.
const authRootUser = "/users/root"

// AuthData is the auth data as of one commit: path -> value. It is never
// changed once published; a write publishes a new one.
type AuthData struct {
	Values map[string]string
}

// authPath reports whether p is a path of the auth data.
func authPath(p string) bool {
	if p == AuthEnabledPath {
		return true
	}
	for _, dir := range []string{"/users/", "/roles/"} {
		if name, ok := strings.CutPrefix(p, dir); ok {
			return name != "" && !strings.Contains(name, "/")
		}
	}
	return false
}

// loadAuth reads the auth bucket whole (a few users and roles at most).
func loadAuth(b *bolt.Bucket) (*AuthData, error) {
	d := &AuthData{Values: map[string]string{}}
	if b == nil {
		return d, nil
	}
	err := b.ForEach(func(k, v []byte) error {
		d.Values[string(k)] = string(v)
		return nil
	})
	return d, err
}

// Auth returns the auth data as this member has applied it. When an auth
// write was answered from a transaction not yet committed (a deferred
// Save), it first waits for that commit, as Get does for any write; other
// writes it does not wait for: every request's access check reads this.
func (s *Store) Auth() (*AuthData, error) {
	if err := s.usable(); err != nil {
		return nil, err
	}
	if s.authAcked.Load() > s.applied.Load() {
		if err := s.settle(); err != nil {
			return nil, err
		}
	}
	return s.auth.Load(), nil
}

// internalEvent is the history's record of an auth write: etcd's event
// for /2/<p> without its leading slash or value.
func (a *applier) internalEvent(action, p string, dir bool) *Event {
	return &Event{Action: action, EtcdIndex: a.index,
		Node: &Node{Key: "2" + p, Dir: dir, ModifiedIndex: a.index, CreatedIndex: a.index}}
}

// applyAuth applies an AUTHPUT or AUTHDELETE. Its failures are the v2
// errors etcd's store gives for the same write under /2: 105 for a create
// of an existing path, 100 for a missing one, 101 for a failed compare.
func (a *applier) applyAuth(r *Request) (*Event, *Error) {
	if !authPath(r.Path) {
		return nil, NewError(EcodeRaftInternal, "storage: not an auth path: "+r.Path, a.index)
	}
	if len(r.Path) > MaxPathLen {
		return nil, NewError(EcodeInvalidField, "key is too long", a.index)
	}
	if r.Method == MethodAuthDelete && r.Path == AuthEnabledPath {
		// It says whether the rest exists (see above): it only changes.
		return nil, NewError(EcodeRaftInternal, "storage: "+AuthEnabledPath+" cannot be deleted", a.index)
	}
	b := a.auth
	if b.Get([]byte(AuthEnabledPath)) == nil {
		// etcd's ensureAuthDirectories, before its first auth write.
		for _, p := range []string{"", "/users", "/roles"} {
			a.index++
			a.fail(a.emit(a.internalEvent(ActionCreate, p, true)))
		}
		a.index++
		a.fail(b.Put([]byte(AuthEnabledPath), []byte("false")))
		a.fail(a.emit(a.internalEvent(ActionCreate, AuthEnabledPath, false)))
		a.authChanged = true
	}
	// etcd's own rules, kept here too so that no pair of concurrent
	// requests can break them: auth on needs a root user, and the root
	// user stays while auth is on. A refusal is a failed compare: the
	// caller decides again on the data that refused it.
	on := string(b.Get([]byte(AuthEnabledPath))) == "true"
	switch {
	case r.Method == MethodAuthPut && r.Path == AuthEnabledPath && r.Val == "true" && b.Get([]byte(authRootUser)) == nil:
		return nil, NewError(EcodeTestFailed, "[no root user]", a.index)
	case r.Method == MethodAuthDelete && r.Path == authRootUser && on:
		return nil, NewError(EcodeTestFailed, "[auth is on]", a.index)
	}
	key := []byte(r.Path)
	cur := b.Get(key)
	cause := "/2" + r.Path
	if cur == nil && (r.Method == MethodAuthDelete || r.PrevExist != nil && *r.PrevExist || r.PrevValue != "") {
		return nil, NewError(EcodeKeyNotFound, cause, a.index)
	}
	if r.PrevValue != "" && string(cur) != r.PrevValue {
		return nil, NewError(EcodeTestFailed, "[prevValue mismatch]", a.index)
	}
	var action string
	switch {
	case r.Method == MethodAuthDelete:
		a.fail(b.Delete(key))
		action = ActionDelete
		if r.PrevValue != "" {
			action = ActionCompareAndDelete
		}
	case r.PrevExist != nil && !*r.PrevExist:
		if cur != nil {
			return nil, NewError(EcodeNodeExist, cause, a.index)
		}
		action = ActionCreate
	case r.PrevValue != "":
		action = ActionCompareAndSwap
	case r.PrevExist != nil:
		action = ActionUpdate
	default:
		action = ActionSet
	}
	if r.Method == MethodAuthPut {
		a.fail(b.Put(key, a.arena.copy([]byte(r.Val))))
	}
	a.index++
	a.authChanged = true
	return a.internalEvent(action, r.Path, false), nil
}
