package caddymodule

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"path"
	"reflect"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.org/x/crypto/bcrypt"

	"github.com/etcaddy/etcaddy/raftkv"
	"github.com/etcaddy/etcaddy/storage"
)

// etcd 3.4's v2 auth (etcdserver/api/v2auth, v2http/client_auth.go):
// users with bcrypt-hashed passwords, roles granting read and write on key
// patterns, and a switch that turns checking on. The data travels through
// Raft like any write (storage's AUTHPUT and AUTHDELETE), as JSON in etcd's
// own form, so answers and stored values are etcd's field for field.

const (
	rootRoleName  = "root"
	guestRoleName = "guest"
)

// authUser is etcd's v2auth.User: the stored form (password is the bcrypt
// hash) and the request body of PUT /v2/auth/users/<name>.
type authUser struct {
	User     string   `json:"user"`
	Password string   `json:"password,omitempty"`
	Roles    []string `json:"roles"`
	Grant    []string `json:"grant,omitempty"`
	Revoke   []string `json:"revoke,omitempty"`
}

// authRole is etcd's v2auth.Role.
type authRole struct {
	Role        string           `json:"role"`
	Permissions authPermissions  `json:"permissions"`
	Grant       *authPermissions `json:"grant,omitempty"`
	Revoke      *authPermissions `json:"revoke,omitempty"`
}

type authPermissions struct {
	KV rwPermission `json:"kv"`
}

type rwPermission struct {
	Read  []string `json:"read"`
	Write []string `json:"write"`
}

func (p *authPermissions) isEmpty() bool {
	return p == nil || (len(p.KV.Read) == 0 && len(p.KV.Write) == 0)
}

// The built-in roles: root is never stored and cannot change; guest is
// what enabling auth creates when there is none (everything allowed, so
// turning auth on locks nobody out until guest is narrowed).
var (
	rootRole  = authRole{Role: rootRoleName, Permissions: authPermissions{KV: rwPermission{Read: []string{"/*"}, Write: []string{"/*"}}}}
	guestRole = authRole{Role: guestRoleName, Permissions: authPermissions{KV: rwPermission{Read: []string{"/*"}, Write: []string{"/*"}}}}
)

// authError is etcd's v2auth.Error: a status and a {"message"} body.
type authError struct {
	status int
	msg    string
}

func (e *authError) Error() string { return e.msg }

func authErrf(status int, format string, args ...any) *authError {
	return &authError{status: status, msg: "auth: " + fmt.Sprintf(format, args...)}
}

// authView is the auth data of one storage.AuthData, parsed.
type authView struct {
	src     *storage.AuthData
	enabled bool
	users   map[string]string // name -> stored JSON (for conditional updates)
	roles   map[string]string
	user1   map[string]*authUser // parsed; never changed once the view is published
	role1   map[string]*authRole
}

// parsed caches the parsed form of the latest AuthData seen: it changes
// only when users, roles or the switch do.
var parsed atomic.Pointer[authView]

func viewOf(d *storage.AuthData) *authView {
	if v := parsed.Load(); v != nil && v.src == d {
		return v
	}
	v := &authView{src: d, users: map[string]string{}, roles: map[string]string{},
		user1: map[string]*authUser{}, role1: map[string]*authRole{}}
	for k, val := range d.Values {
		switch {
		case k == storage.AuthEnabledPath:
			_ = json.Unmarshal([]byte(val), &v.enabled)
		case strings.HasPrefix(k, "/users/"):
			u := &authUser{}
			if json.Unmarshal([]byte(val), u) == nil {
				// etcd's getUser: the root user always has the root role.
				if u.User == rootRoleName && !slices.Contains(u.Roles, rootRoleName) {
					u.Roles = append(u.Roles, rootRoleName)
				}
				v.users[k[len("/users/"):]], v.user1[k[len("/users/"):]] = val, u
			}
		case strings.HasPrefix(k, "/roles/"):
			r := &authRole{}
			if json.Unmarshal([]byte(val), r) == nil {
				v.roles[k[len("/roles/"):]], v.role1[k[len("/roles/"):]] = val, r
			}
		}
	}
	parsed.Store(v)
	return v
}

// user is etcd's getUser: a copy of the user, free to change.
func (v *authView) user(name string) (*authUser, error) {
	pu, ok := v.user1[name]
	if !ok {
		return nil, authErrf(http.StatusNotFound, "User %s does not exist.", name)
	}
	u := *pu
	u.Roles = slices.Clone(pu.Roles)
	return &u, nil
}

// role is etcd's getRole: a copy of the role (root's is built in).
func (v *authView) role(name string) (*authRole, error) {
	if name == rootRoleName {
		r := rootRole
		return &r, nil
	}
	pr, ok := v.role1[name]
	if !ok {
		return nil, authErrf(http.StatusNotFound, "Role %s does not exist.", name)
	}
	r := *pr
	r.Permissions.KV = rwPermission{Read: slices.Clone(pr.Permissions.KV.Read), Write: slices.Clone(pr.Permissions.KV.Write)}
	return &r, nil
}

func sortedNames(m map[string]string, extra ...string) []string {
	names := append([]string(nil), extra...)
	for k := range m {
		names = append(names, k)
	}
	sort.Strings(names)
	return names
}

// hasAccess is etcd's HasKeyAccess (recursive false) and
// HasRecursiveAccess: a pattern ending in "*" grants every key it is a
// string prefix of; any other grants that key alone, and never a
// recursive request.
func (r *authRole) hasAccess(key string, write, recursive bool) bool {
	if r.Role == rootRoleName {
		return true
	}
	list := r.Permissions.KV.Read
	if write {
		list = r.Permissions.KV.Write
	}
	for _, pat := range list {
		if prefix, ok := strings.CutSuffix(pat, "*"); ok {
			if strings.HasPrefix(key, prefix) {
				return true
			}
		} else if !recursive && key == pat {
			return true
		}
	}
	return false
}

// passwords remembers passwords bcrypt has accepted, so that a client
// sending its credentials with every request pays bcrypt's cost (tens of
// milliseconds, by design) once rather than every time, as etcd does. An
// entry holds the stored hash it was checked against, so a new password
// voids it, and an HMAC of the password under a key made at start, never
// the password.
var passwords = struct {
	sync.Mutex
	key  [32]byte
	seen map[string]passwordEntry
}{seen: map[string]passwordEntry{}}

type passwordEntry struct {
	hash string
	mac  []byte
}

func init() {
	_, _ = rand.Read(passwords.key[:])
}

func passwordMAC(user, password string) []byte {
	m := hmac.New(sha256.New, passwords.key[:])
	m.Write([]byte(user))
	m.Write([]byte{0})
	m.Write([]byte(password))
	return m.Sum(nil)
}

// bcryptSlots bounds the bcrypt runs at once: each takes a core for tens of
// milliseconds, and wrong passwords, which nothing remembers, cost one
// each; more at once would only starve every other request.
var bcryptSlots = make(chan struct{}, max(2, runtime.GOMAXPROCS(0)))

// bcryptMax is the length of password bcrypt hashes. etcd 3.4's bcrypt
// ignored the rest of a longer one, which bcrypt now refuses: it is cut
// to this length, as etcd did, for hashing and for checking alike.
const bcryptMax = 72

func bcryptInput(password string) []byte {
	b := []byte(password)
	return b[:min(len(b), bcryptMax)]
}

// hashPassword is etcd's HashPassword.
func hashPassword(password string) (string, error) {
	bcryptSlots <- struct{}{}
	defer func() { <-bcryptSlots }()
	hash, err := bcrypt.GenerateFromPassword(bcryptInput(password), bcrypt.DefaultCost)
	return string(hash), err
}

// checkPassword is etcd's CheckPassword with the memory above.
func checkPassword(u *authUser, password string) bool {
	mac := passwordMAC(u.User, password)
	passwords.Lock()
	e, ok := passwords.seen[u.User]
	passwords.Unlock()
	if ok && e.hash == u.Password && hmac.Equal(e.mac, mac) {
		return true
	}
	bcryptSlots <- struct{}{}
	err := bcrypt.CompareHashAndPassword([]byte(u.Password), bcryptInput(password))
	<-bcryptSlots
	if err != nil {
		return false
	}
	passwords.Lock()
	if len(passwords.seen) > 4096 {
		clear(passwords.seen) // users come and go; never grow without bound
	}
	passwords.seen[u.User] = passwordEntry{hash: u.Password, mac: mac}
	passwords.Unlock()
	return true
}

// requestUser is the user a request authenticates as: by basic auth, or,
// when it has no Authorization header, by the common name of a verified
// client certificate (etcd's --client-cert-auth; here: the site's
// client_auth verified one). Only the client's own certificate names a
// user: etcd tries the CAs of its chain too, so that a CA named like a
// user would make every certificate it signed that user. nil when the
// credentials are wrong or there are none; anonymous reports that there
// were none.
func (h *Handler) requestUser(r *http.Request, v *authView) (u *authUser, anonymous bool) {
	if r.Header.Get("Authorization") == "" {
		if r.TLS != nil {
			for _, chain := range r.TLS.VerifiedChains {
				if len(chain) == 0 {
					continue
				}
				if u, err := v.user(chain[0].Subject.CommonName); err == nil {
					return u, false
				}
			}
		}
		return nil, true
	}
	name, password, ok := r.BasicAuth()
	if !ok {
		return nil, false
	}
	u, err := v.user(name)
	if err != nil {
		return nil, false
	}
	if !checkPassword(u, password) {
		h.logger.Warn("incorrect password", zap.String("user-name", name))
		return nil, false
	}
	return u, false
}

// authView returns the member's auth data, parsed.
func (h *Handler) authView(ctx context.Context, n *raftkv.Node, quorum bool) (*authView, error) {
	d, err := n.Auth(ctx, quorum)
	if err != nil {
		return nil, err
	}
	return viewOf(d), nil
}

// rootAccess is etcd's hasRootAccess: anything goes while auth is off;
// then only a user with the root role.
func (h *Handler) rootAccess(r *http.Request, v *authView) bool {
	if !v.enabled {
		return true
	}
	u, _ := h.requestUser(r, v)
	return u != nil && slices.Contains(u.Roles, rootRoleName)
}

// keyAccess is etcd's hasKeyPrefixAccess for a request on key (the URL
// path after /v2/keys, as sent): GET and HEAD read, the rest write. A
// request without credentials gets the guest role's access, if there is
// a guest role; one with wrong credentials gets none.
// An error means the member cannot tell (it stopped).
func (h *Handler) keyAccess(r *http.Request, n *raftkv.Node, key string, recursive bool) (bool, error) {
	v, err := h.authView(r.Context(), n, false)
	if err != nil || !v.enabled {
		return err == nil, err
	}
	write := r.Method != http.MethodGet && r.Method != http.MethodHead
	u, anonymous := h.requestUser(r, v)
	if anonymous {
		// Checked as etcd does: as if not recursive, so that a guest's
		// exact pattern also grants recursive reads below it.
		guest, err := v.role(guestRoleName)
		return err == nil && guest.hasAccess(key, write, false), nil
	}
	if u == nil {
		return false, nil
	}
	for _, name := range u.Roles {
		if role, err := v.role(name); err == nil && role.hasAccess(key, write, recursive) {
			return true, nil
		}
	}
	h.logger.Warn("invalid access for user on key", zap.String("user-name", u.User), zap.String("key", key))
	return false, nil
}

// membersAccess is etcd's hasWriteRootAccess for /v2/members: reading is
// open, changing needs root.
func (h *Handler) membersAccess(r *http.Request, n *raftkv.Node) (bool, error) {
	if r.Method == http.MethodGet || r.Method == http.MethodHead {
		return true, nil
	}
	v, err := h.authView(r.Context(), n, false)
	if err != nil {
		return false, err
	}
	return h.rootAccess(r, v), nil
}

const errInsufficientCredentials = "Insufficient credentials"

// serveAuth answers /v2/auth/... but /v2/auth/enable (serveAuthEnable):
// etcd's mux routes /roles, /roles/..., /users and /users/...; any other
// path under it is its 404.
func (h *Handler) serveAuth(w http.ResponseWriter, r *http.Request) {
	sub := strings.TrimPrefix(r.URL.Path, authPrefix)
	var users bool
	switch {
	case sub == "/users" || strings.HasPrefix(sub, "/users/"):
		users = true
	case sub == "/roles" || strings.HasPrefix(sub, "/roles/"):
	default:
		http.Error(w, "404 page not found", http.StatusNotFound)
		return
	}
	// "/users/" cleans to "/users": the list; "/users/a/b" is refused.
	pieces := strings.Split(path.Clean(sub), "/")
	name := ""
	switch {
	case len(pieces) == 3:
		name = pieces[2]
	case len(pieces) != 2:
		writeMessage(w, http.StatusBadRequest, "Invalid path")
		return
	}
	methods := []string{"GET", "PUT", "DELETE"}
	if name == "" {
		methods = methods[:1]
	}
	if !allowMethod(w, r, methods...) {
		return
	}
	if r.Method == http.MethodPut && len("/roles/")+len(name) > storage.MaxPathLen {
		// etcd has no bound; the store keeps a name in a key of bbolt's.
		writeMessage(w, http.StatusBadRequest, fmt.Sprintf("name too long: at most %d bytes", storage.MaxPathLen-len("/roles/")))
		return
	}
	n, v, ok := h.authRequest(w, r, true)
	if !ok {
		return
	}
	switch {
	case users && name == "":
		listUsers(w, v)
	case users:
		h.serveUser(w, r, n, v, name)
	case name == "":
		listRoles(w, v)
	default:
		h.serveRole(w, r, n, v, name)
	}
}

// authRequest does what every /v2/auth request does after its method
// check: find the member, check root access (all of them need it once auth
// is on, except reading /enable), and set the headers of an answer.
func (h *Handler) authRequest(w http.ResponseWriter, r *http.Request, needRoot bool) (*raftkv.Node, *authView, bool) {
	n := h.node()
	if n == nil {
		writeMessage(w, http.StatusServiceUnavailable, errNotRunning)
		return nil, nil, false
	}
	v, err := h.authView(r.Context(), n, false)
	if err != nil {
		writeMessage(w, http.StatusServiceUnavailable, errNotRunning)
		return nil, nil, false
	}
	if needRoot && !h.rootAccess(r, v) {
		writeMessage(w, http.StatusUnauthorized, errInsufficientCredentials)
		return nil, nil, false
	}
	w.Header().Set("X-Etcd-Cluster-Id", idString(n.Status().ClusterID))
	w.Header().Set("Content-Type", "application/json")
	return n, v, true
}

// serveAuthEnable is etcd's enableDisable: GET tells whether auth is on
// (anyone may ask), PUT turns it on (root only once on, and only when a
// root user exists), DELETE turns it off.
func (h *Handler) serveAuthEnable(w http.ResponseWriter, r *http.Request) {
	if !allowMethod(w, r, "GET", "PUT", "DELETE") {
		return
	}
	n, v, ok := h.authRequest(w, r, r.Method != http.MethodGet)
	if !ok {
		return
	}
	if r.Method == http.MethodGet {
		writeJSON(w, http.StatusOK, struct {
			Enabled bool `json:"enabled"`
		}{v.enabled}, true)
		return
	}
	on := r.Method == http.MethodPut
	// etcd checks its local view first, answering at once even without a
	// quorum, then reads the root user with a quorum read, where any
	// failure, a timeout without a quorum too, is its 409.
	// The quorum view is checked again: the local one may lag.
	already := func(v *authView) error {
		switch {
		case on && v.enabled:
			return authErrf(http.StatusConflict, "already enabled")
		case !on && !v.enabled:
			return authErrf(http.StatusConflict, "already disabled")
		}
		return nil
	}
	if err := already(v); err != nil {
		h.writeAuthError(w, err)
		return
	}
	errNoRoot := authErrf(http.StatusConflict, "No root user available, please create one")
	err := h.changeAuth(r, n, func(v *authView) (*authChange, error) {
		if err := already(v); err != nil {
			return nil, err
		}
		if on {
			if _, err := v.user(rootRoleName); err != nil {
				return nil, errNoRoot
			}
			if _, err := v.role(guestRoleName); err != nil {
				// etcd creates the guest role first, in a write of its own.
				return &authChange{path: "/roles/" + guestRoleName, value: guestRole, create: true, then: true}, nil
			}
		}
		return &authChange{path: storage.AuthEnabledPath, value: on, prev: v.src.Values[storage.AuthEnabledPath]}, nil
	})
	if qe, ok := errors.AsType[*quorumReadError](err); ok && on && errors.Is(qe.err, raftkv.ErrTimeout) {
		err = errNoRoot
	}
	if err != nil {
		h.writeAuthError(w, err)
		return
	}
	w.WriteHeader(http.StatusOK)
}

// quorumReadError is a failure of the quorum read an auth change starts
// with, before anything is proposed.
type quorumReadError struct{ err error }

func (e *quorumReadError) Error() string { return e.err.Error() }
func (e *quorumReadError) Unwrap() error { return e.err }

// userWithRoles is etcd's answer about a user: its roles spelled out.
type userWithRoles struct {
	User  string      `json:"user"`
	Roles []*authRole `json:"roles,omitempty"`
}

// listUsers is etcd's baseUsers: every user with its roles spelled out
// (roles that no longer exist left out); no users is "users": null. As in
// etcd, whose users are keys of its store, a name that starts with "_" is
// hidden from the list (and only from it).
func listUsers(w http.ResponseWriter, v *authView) {
	var out struct {
		Users []userWithRoles `json:"users"`
	}
	for _, name := range sortedNames(v.users) {
		if strings.HasPrefix(name, "_") {
			continue
		}
		uwr := userWithRoles{User: v.user1[name].User}
		for _, rn := range v.user1[name].Roles {
			if role, err := v.role(rn); err == nil {
				uwr.Roles = append(uwr.Roles, role)
			}
		}
		out.Users = append(out.Users, uwr)
	}
	writeJSON(w, http.StatusOK, out, true)
}

// listRoles is etcd's baseRoles: root and every stored role, by name,
// those whose names start with "_" hidden as listUsers hides users.
func listRoles(w http.ResponseWriter, v *authView) {
	var out struct {
		Roles []*authRole `json:"roles"`
	}
	for _, name := range sortedNames(v.roles, rootRoleName) {
		if strings.HasPrefix(name, "_") {
			continue
		}
		role, _ := v.role(name) // every name has its role
		out.Roles = append(out.Roles, role)
	}
	writeJSON(w, http.StatusOK, out, true)
}

// serveUser is etcd's forUser.
func (h *Handler) serveUser(w http.ResponseWriter, r *http.Request, n *raftkv.Node, v *authView, name string) {
	switch r.Method {
	case http.MethodGet:
		u, err := v.user(name)
		if err != nil {
			h.writeAuthError(w, err)
			return
		}
		out := userWithRoles{User: u.User}
		for _, rn := range u.Roles {
			role, err := v.role(rn)
			if err != nil {
				h.writeAuthError(w, err)
				return
			}
			out.Roles = append(out.Roles, role)
		}
		writeJSON(w, http.StatusOK, out, true)

	case http.MethodPut:
		var in authUser
		if !decodeAuthBody(w, r, &in) {
			return
		}
		if in.User != name {
			writeMessage(w, http.StatusBadRequest, "User JSON name does not match the name in the URL")
			return
		}
		if (len(in.Grant) > 0 || len(in.Revoke) > 0) && len(in.Roles) > 0 {
			writeMessage(w, http.StatusBadRequest, "User JSON contains both roles and grant/revoke")
			return
		}
		var out *authUser
		created := false
		err := h.changeAuth(r, n, func(v *authView) (*authChange, error) {
			old, err := v.user(name)
			// etcd creates when the body has roles (200 even so), or when
			// there is no such user (201); otherwise it updates.
			create := len(in.Grant) == 0 && len(in.Revoke) == 0 && (len(in.Roles) > 0 || err != nil)
			if create {
				u := in
				if u.User == rootRoleName && !slices.Contains(u.Roles, rootRoleName) {
					u.Roles = append(u.Roles, rootRoleName)
				}
				if u.Password == "" {
					return nil, authErrf(http.StatusBadRequest, "Cannot create user %s with an empty password", u.User)
				}
				hash, err := hashPassword(u.Password)
				if err != nil {
					return nil, err
				}
				u.Password = hash
				out, created = &u, len(in.Roles) == 0
				return &authChange{path: "/users/" + name, value: u, create: true,
					exists: authErrf(http.StatusConflict, "User %s already exists.", name)}, nil
			}
			if err != nil {
				// etcd's UpdateUser passes getUser's error on as it is.
				return nil, err
			}
			nu, err := mergeUser(old, &in)
			if err != nil {
				return nil, err
			}
			if reflect.DeepEqual(old, nu) {
				return nil, authErrf(http.StatusBadRequest, "User not updated. Use grant/revoke/password to update the user.")
			}
			out, created = nu, false
			return &authChange{path: "/users/" + name, value: nu, prev: v.users[name]}, nil
		})
		if err != nil {
			h.writeAuthError(w, err)
			return
		}
		status := http.StatusOK
		if created {
			status = http.StatusCreated
		}
		o := *out
		o.Password = ""
		writeJSON(w, status, o, true)

	case http.MethodDelete:
		err := h.changeAuth(r, n, func(v *authView) (*authChange, error) {
			if v.enabled && name == rootRoleName {
				return nil, authErrf(http.StatusForbidden, "Cannot delete root user while auth is enabled.")
			}
			return &authChange{path: "/users/" + name, delete: true,
				missing: authErrf(http.StatusNotFound, "User %s does not exist", name)}, nil
		})
		if err != nil {
			h.writeAuthError(w, err)
		}
	}
}

// decodeAuthBody reads the JSON value a PUT of a user or role starts with
// (etcd reads no further), from at most etcd's --max-request-bytes.
func decodeAuthBody(w http.ResponseWriter, r *http.Request, v any) bool {
	return decodeJSONBody(w, r, v, "Invalid JSON in request body.")
}

// decodeJSONBody reads the JSON value a request body starts with into v,
// from at most etcd's --max-request-bytes; it answers 413 past them, and
// 400 with badJSON when the value does not decode.
func decodeJSONBody(w http.ResponseWriter, r *http.Request, v any, badJSON string) bool {
	err := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxRequestBytes)).Decode(v)
	var tooLarge *http.MaxBytesError
	switch {
	case errors.As(err, &tooLarge):
		writeMessage(w, http.StatusRequestEntityTooLarge, causeBodyTooLarge)
	case err != nil:
		writeMessage(w, http.StatusBadRequest, badJSON)
	default:
		return true
	}
	return false
}

// mergeUser is etcd's User.merge: a new password (hashed), then the roles
// granted and revoked, sorted.
func mergeUser(old, in *authUser) (*authUser, error) {
	out := &authUser{User: old.User, Password: old.Password}
	if in.Password != "" {
		hash, err := hashPassword(in.Password)
		if err != nil {
			return nil, err
		}
		out.Password = hash
	}
	roles := setOf(old.Roles)
	for _, g := range in.Grant {
		if roles[g] {
			return nil, authErrf(http.StatusConflict, "Granting duplicate role %s for user %s", g, in.User)
		}
		roles[g] = true
	}
	for _, rv := range in.Revoke {
		if !roles[rv] {
			return nil, authErrf(http.StatusConflict, "Revoking ungranted role %s for user %s", rv, in.User)
		}
		delete(roles, rv)
	}
	out.Roles = keysOf(roles)
	return out, nil
}

func setOf(list []string) map[string]bool {
	m := make(map[string]bool, len(list))
	for _, s := range list {
		m[s] = true
	}
	return m
}

// keysOf is the set's members, sorted: never nil (etcd's Values).
func keysOf(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// serveRole is etcd's forRole.
func (h *Handler) serveRole(w http.ResponseWriter, r *http.Request, n *raftkv.Node, v *authView, name string) {
	switch r.Method {
	case http.MethodGet:
		role, err := v.role(name)
		if err != nil {
			h.writeAuthError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, role, true)

	case http.MethodPut:
		var in authRole
		if !decodeAuthBody(w, r, &in) {
			return
		}
		if in.Role != name {
			writeMessage(w, http.StatusBadRequest, "Role JSON name does not match the name in the URL")
			return
		}
		create := in.Grant.isEmpty() && in.Revoke.isEmpty()
		if !create && !in.Permissions.isEmpty() {
			writeMessage(w, http.StatusBadRequest, "Role JSON contains both permissions and grant/revoke")
			return
		}
		if name == rootRoleName {
			h.writeAuthError(w, authErrf(http.StatusForbidden, "Cannot modify role %s: is root role.", name))
			return
		}
		out := &in
		err := h.changeAuth(r, n, func(v *authView) (*authChange, error) {
			if create {
				return &authChange{path: "/roles/" + name, value: in, create: true,
					exists: authErrf(http.StatusConflict, "Role %s already exists.", name)}, nil
			}
			old, err := v.role(name)
			if err != nil {
				return nil, err // as etcd's UpdateRole passes getRole's on
			}
			nr, err := mergeRole(old, &in)
			if err != nil {
				return nil, err
			}
			if reflect.DeepEqual(old, nr) {
				return nil, authErrf(http.StatusBadRequest, "Role not updated. Use grant/revoke to update the role.")
			}
			out = nr
			return &authChange{path: "/roles/" + name, value: nr, prev: v.roles[name]}, nil
		})
		if err != nil {
			h.writeAuthError(w, err)
			return
		}
		status := http.StatusOK
		if create {
			status = http.StatusCreated
		}
		writeJSON(w, status, out, true)

	case http.MethodDelete:
		if name == rootRoleName {
			h.writeAuthError(w, authErrf(http.StatusForbidden, "Cannot modify role %s: is root role.", name))
			return
		}
		err := h.changeAuth(r, n, func(*authView) (*authChange, error) {
			return &authChange{path: "/roles/" + name, delete: true,
				missing: authErrf(http.StatusNotFound, "Role %s doesn't exist.", name)}, nil
		})
		if err != nil {
			h.writeAuthError(w, err)
		}
	}
}

// mergeRole is etcd's Role.merge: grants (a duplicate is a conflict), then
// revokes (one not granted is passed over), each list sorted.
func mergeRole(old, in *authRole) (*authRole, error) {
	out := &authRole{Role: old.Role}
	kv := old.Permissions.KV
	if in.Grant != nil {
		read, write := setOf(kv.Read), setOf(kv.Write)
		if err := grantAll(read, in.Grant.KV.Read, "read"); err != nil {
			return nil, err
		}
		if err := grantAll(write, in.Grant.KV.Write, "write"); err != nil {
			return nil, err
		}
		kv = rwPermission{Read: keysOf(read), Write: keysOf(write)}
	}
	if in.Revoke != nil {
		read, write := setOf(kv.Read), setOf(kv.Write)
		for _, p := range in.Revoke.KV.Read {
			delete(read, p)
		}
		for _, p := range in.Revoke.KV.Write {
			delete(write, p)
		}
		kv = rwPermission{Read: keysOf(read), Write: keysOf(write)}
	}
	out.Permissions.KV = kv
	return out, nil
}

// grantAll adds the patterns to a role's read or write set; one already
// there is etcd's conflict.
func grantAll(set map[string]bool, patterns []string, kind string) error {
	for _, p := range patterns {
		if set[p] {
			return authErrf(http.StatusConflict, "Granting duplicate %s permission %s", kind, p)
		}
		set[p] = true
	}
	return nil
}

// authChange is one write of the auth data that an operation decided on.
type authChange struct {
	path    string
	value   any    // marshalled as JSON
	delete  bool   // delete path instead (it must exist)
	create  bool   // path must not exist
	prev    string // path must still hold this (an update read from it)
	exists  error  // the answer when create finds path taken
	missing error  // the answer when delete finds nothing
	then    bool   // the operation goes on after this write (decide again)
}

// changeAuth runs an operation on the auth data: decide looks at the data
// as of a linearizable read and names the write to make, or the error to
// answer. An update is conditional on the value it was computed from, and
// is decided again on the new data when another write came first (etcd
// writes blindly, so that one of two concurrent grants could be lost).
//
// The request's root access is checked again on that data: a member that
// has not yet applied auth's switch to on must not let anyone through.
// And every member must be able to apply the write (raftkv.ClusterHas):
// during a rolling upgrade it waits for the last member until the
// request's time is up, then answers etcd's "not capable".
func (h *Handler) changeAuth(r *http.Request, n *raftkv.Node, decide func(*authView) (*authChange, error)) error {
	ctx, cancel := h.requestContext(r)
	defer cancel()
	for {
		v, err := h.authView(ctx, n, true)
		if err != nil {
			return &quorumReadError{err}
		}
		if !h.rootAccess(r, v) {
			return &authError{status: http.StatusUnauthorized, msg: errInsufficientCredentials}
		}
		c, err := decide(v)
		if err != nil {
			return err
		}
		if err := awaitCapable(ctx, n); err != nil {
			return err
		}
		req := storage.Request{Method: storage.MethodAuthPut, Path: c.path, PrevValue: c.prev}
		if c.delete {
			req.Method = storage.MethodAuthDelete
		} else {
			b, err := json.Marshal(c.value)
			if err != nil {
				return err
			}
			req.Val = string(b)
			if c.create {
				req.PrevExist = new(false)
			}
		}
		_, err = n.Do(ctx, req)
		var se *storage.Error
		switch {
		case errors.As(err, &se) && se.ErrorCode == storage.EcodeTestFailed:
			continue // changed since it was read: decide again
		case errors.As(err, &se) && se.ErrorCode == storage.EcodeNodeExist && c.exists != nil:
			return c.exists
		case errors.As(err, &se) && se.ErrorCode == storage.EcodeNodeExist && c.then:
			continue // made meanwhile by another request
		case errors.As(err, &se) && se.ErrorCode == storage.EcodeKeyNotFound && c.missing != nil:
			return c.missing
		case errors.As(err, &se) && se.ErrorCode == storage.EcodeKeyNotFound && c.prev != "":
			continue // deleted since it was read
		case err != nil:
			return err
		case c.then:
			continue
		}
		return nil
	}
}

// errNotCapable is etcd's answer to auth requests while a member of an
// earlier version is in the cluster.
var errNotCapable = &authError{status: http.StatusInternalServerError,
	msg: "Not capable of accessing auth feature during rolling upgrades."}

// awaitCapable waits until every member can apply auth writes, or ctx ends.
func awaitCapable(ctx context.Context, n *raftkv.Node) error {
	if n.ClusterHas(raftkv.FeatureAuth) {
		return nil
	}
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for !n.ClusterHas(raftkv.FeatureAuth) {
		select {
		case <-ctx.Done():
			return errNotCapable
		case <-tick.C:
		}
	}
	return nil
}

// writeAuthError answers an auth operation's error as etcd's writeError
// does: its own status and message, or 500 for anything else (a timeout
// too: etcd's WriteError answers every error that is not its own kind
// with a bare "Internal Server Error").
func (h *Handler) writeAuthError(w http.ResponseWriter, err error) {
	var ae *authError
	switch {
	case errors.As(err, &ae):
		writeMessage(w, ae.status, ae.msg)
	case errors.Is(err, raftkv.ErrStopped):
		writeMessage(w, http.StatusServiceUnavailable, errNotRunning)
	case errors.Is(err, raftkv.ErrTimeout):
		writeMessage(w, http.StatusInternalServerError, "Internal Server Error")
	default:
		h.logger.Warn("auth operation failed", zap.Error(err))
		writeMessage(w, http.StatusInternalServerError, "Internal Server Error")
	}
}
