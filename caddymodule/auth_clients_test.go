package caddymodule

// v2 auth through the real clients: etcdctl (v2 API) and go.etcd.io/etcd/client/v2, each run
// against etcaddy and against the real etcd 3.4 and compared call by call; then a three-member
// etcaddy cluster, where users, roles and the switch written through one member govern the
// others and survive a member's crash.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	client "go.etcd.io/etcd/client/v2"
)

// ctlAuthStep is one etcdctl run of the auth script.
type ctlAuthStep struct {
	args []string
	// stdin is what is typed at etcdctl's password prompts. etcdctl v2 reads a password with
	// speakeasy, which runs stty on its standard input (stty complains on stderr that a pipe
	// is no terminal, the same on both sides) and then reads a line from it: `user passwd`,
	// `user add <name>` and `--username <name>` can be driven through a pipe.
	stdin string
	// code is the exit code the script expects from etcd: both servers answering alike is
	// not enough when a step meant to pass fails on both (a wrong password in the script).
	code int
	// save, with -o extended, keeps each server's Modified-Index as ${save.index}.
	save string
}

func authCtl(args ...string) ctlAuthStep { return ctlAuthStep{args: args} }

// as runs the step with etcdctl's --username (name:password, or name alone to be prompted).
func (st ctlAuthStep) as(user string) ctlAuthStep {
	st.args = append([]string{"--username", user}, st.args...)
	return st
}

// typing gives in to etcdctl as its standard input.
func (st ctlAuthStep) typing(in string) ctlAuthStep {
	st.stdin = in
	return st
}

// saving keeps the Modified-Index the step prints (-o extended) as ${name.index}.
func (st ctlAuthStep) saving(name string) ctlAuthStep {
	st.save = name
	return st
}

// fails expects etcdctl to exit with code: 1 for an error of the auth API or the members
// API, 4 for an error of the keys API.
func (st ctlAuthStep) fails(code int) ctlAuthStep {
	st.code = code
	return st
}

// etcdctlTyping is diffSide.etcdctl with stdin on etcdctl's standard input, and with more
// time than etcdctl's default 2 s per request: every request with credentials costs the
// server a bcrypt comparison (etcd makes one each time), which a loaded machine can stretch.
func (s *diffSide) etcdctlTyping(stdin string, args []string) ctlResult {
	return s.runEtcdctl(stdin, 40*time.Second, append([]string{"--timeout", "15s", "--total-timeout", "30s"}, args...))
}

// TestEtcdctlAuthMatchesEtcd runs etcdctl's user, role and auth commands (ETCDCTL_API=2), and
// key commands as users with and without access, against etcd and against etcaddy, the same
// commands in the same order, and compares exit codes, output and error texts.
func TestEtcdctlAuthMatchesEtcd(t *testing.T) {
	d := newDiffer(t, startEtcd(t), startSubject(t))
	const (
		root    = "root:rootpw2"
		bob     = "bob:bobpw"
		bobNew  = "bob:bobpw2"
		member2 = "http://127.0.0.1:1" // never listened on: a member add must not get through
	)
	steps := []ctlAuthStep{
		// Before any auth data: nothing to list but the built-in root role; no enabling
		// without a root user.
		authCtl("user", "list"),
		authCtl("role", "list"),
		authCtl("auth", "enable").fails(1),
		authCtl("auth", "disable").fails(1),
		authCtl("user", "get", "root").fails(1),
		// etcd makes its auth directories before the first write of auth data, even one
		// that then fails: four indexes, which the next key shows.
		authCtl("role", "remove", "nosuch").fails(1),
		authCtl("-o", "extended", "set", "/first", "v"),
		authCtl("user", "remove", "nobody").fails(1),
		authCtl("-o", "extended", "get", "/first"),

		// Users: the password after a colon, typed at the prompt, or none at all. Adding a
		// user that exists sets its password: etcdctl sends a PUT without roles, which etcd
		// takes as an update.
		authCtl("user", "add", "root:rootpw"),
		authCtl("user", "add", root),
		authCtl("user", "add", "bob").typing("bobpw\n"),
		authCtl("user", "add", "eve").typing("").fails(1),
		authCtl("user", "add", "eve:").fails(1),
		authCtl("user", "add", "carl:a:b"), // the password is a:b
		authCtl("user", "add", "a b:pw"),
		authCtl("user", "get", "a b"),
		authCtl("user", "remove", "a b"),
		authCtl("user", "add", "a/b:pw").fails(1),
		authCtl("user", "get", "root"),
		authCtl("user", "get", "bob"),
		authCtl("user", "get", "nobody").fails(1),
		authCtl("user", "list"),

		// Roles.
		authCtl("role", "add", "rkt"),
		authCtl("role", "add", "rkt").fails(1),
		authCtl("role", "add", "root").fails(1),
		authCtl("role", "grant", "--path", "/rkt/*", "--readwrite", "rkt"),
		authCtl("role", "grant", "--path", "/rkt/*", "--read", "rkt").fails(1),
		authCtl("role", "grant", "--path", "/single", "--write", "rkt"),
		authCtl("role", "grant", "--path", "/pre*", "--readwrite", "rkt"),
		authCtl("role", "grant", "--path", "/sp ace", "--readwrite", "rkt"),
		authCtl("role", "grant", "--path", "/x", "--write", "root").fails(1),
		authCtl("role", "grant", "--path", "/x", "--write", "nosuch").fails(1),
		authCtl("role", "grant", "--readwrite", "rkt").fails(1),
		authCtl("role", "get", "rkt"),
		authCtl("role", "get", "root"),
		authCtl("role", "get", "nosuch").fails(1),
		authCtl("role", "list"),

		// Roles to users.
		authCtl("user", "grant", "--roles", "rkt", "bob"),
		authCtl("user", "grant", "--roles", "rkt", "bob").fails(1),
		authCtl("user", "grant", "--roles", "rkt", "carl"),
		authCtl("user", "grant", "bob").fails(1),
		authCtl("user", "grant", "--roles", "rkt", "nobody").fails(1),
		authCtl("user", "get", "bob"),
		authCtl("user", "list"),

		// The switch: once on, the auth API needs root, with its current password.
		authCtl("auth", "enable"),
		authCtl("auth", "enable").fails(1),
		authCtl("auth", "enable").as(root).fails(1),
		authCtl("user", "list").fails(1),
		authCtl("user", "list").as("root:rootpw").fails(1),
		authCtl("user", "list").as("nobody:x").fails(1),
		authCtl("user", "list").as(bob).fails(1),
		authCtl("user", "list").as(root),
		authCtl("user", "list").as("root").typing("rootpw2\n"),
		authCtl("role", "list").as(root),
		authCtl("role", "get", "guest").as(root),
		authCtl("user", "get", "root").as(root),
		authCtl("auth", "disable").as(bob).fails(1),

		// Keys as bob: /rkt/* read and write, /single write only, nothing else; a recursive
		// request only under a pattern that ends in "*". -o extended shows the store index,
		// which the auth writes moved.
		authCtl("-o", "extended", "set", "/rkt/a", "1").as(bob),
		authCtl("get", "/rkt/a").as(bob),
		authCtl("-o", "json", "get", "/rkt/a").as(bob),
		authCtl("set", "/rkt/b", "2").as(bob),
		authCtl("mkdir", "/rkt/d").as(bob),
		authCtl("set", "/other", "1").as(bob).fails(4),
		authCtl("get", "/other").as(bob).fails(4),
		authCtl("set", "/single", "w").as(bob),
		authCtl("get", "/single").as(bob).fails(4),
		authCtl("ls", "--sort", "/rkt").as(bob).fails(4),
		authCtl("ls", "--sort", "/rkt/").as(bob),
		authCtl("ls", "--sort", "--recursive", "/rkt").as(bob).fails(4),
		authCtl("ls", "--sort", "--recursive", "/rkt/").as(bob),
		authCtl("set", "/prefix", "p").as(bob),
		authCtl("set", "/pre/x", "p").as(bob),
		authCtl("get", "/pr").as(bob).fails(4),
		authCtl("set", "/sp ace", "s").as(bob),       // the pattern matches the path unescaped
		authCtl("get", "/sp%20ace").as(bob).fails(4), // a key named with the escape itself
		authCtl("-o", "extended", "mk", "--in-order", "/rkt/q", "job").as(bob),
		authCtl("mk", "--in-order", "/q", "job").as(bob).fails(4),
		authCtl("watch", "--after-index", "1", "/rkt/a").as(bob),
		authCtl("watch", "--after-index", "1", "/other").as(bob).fails(4),
		authCtl("set", "/rkt/d/e", "f").as(bob),
		authCtl("rm", "--recursive", "/rkt").as(bob).fails(4),
		authCtl("rm", "--recursive", "/rkt/d").as(bob),
		authCtl("rm", "/rkt/a").as(bob),
		authCtl("get", "/rkt/b").as("bob:wrong").fails(4),
		authCtl("get", "/rkt/b").as("bob:").fails(4),
		authCtl("get", "/rkt/b").as("carl:a:b"),
		authCtl("get", "/rkt/b").as("carl:a").fails(4),
		authCtl("get", "/rkt/b").as("bob").typing("bobpw\n"),
		authCtl("get", "/rkt/b").as("bob").typing("nope\n").fails(4),
		authCtl("member", "list").as(bob),
		authCtl("member", "add", "m2", member2).as(bob).fails(1),

		// The guest role: what a request without credentials may do.
		authCtl("set", "/guest", "v"),
		authCtl("get", "/guest"),
		authCtl("member", "add", "m2", member2).fails(1),
		authCtl("role", "revoke", "--path", "/*", "--write", "guest").fails(1),
		authCtl("role", "revoke", "--path", "/*", "--write", "guest").as(root),
		authCtl("role", "revoke", "--path", "/*", "--write", "guest").as(root).fails(1),
		authCtl("role", "get", "guest").as(root),
		authCtl("set", "/guest", "w").fails(4),
		authCtl("-o", "extended", "get", "/guest"),
		authCtl("rm", "/guest").fails(4),

		// A watch from an index the auth data took sees the next change of a key: the auth
		// writes have indexes, but no event a watcher can match.
		authCtl("-o", "extended", "set", "/w/0", "v").as(root).saving("w0"),
		authCtl("role", "add", "w").as(root),
		authCtl("role", "remove", "w").as(root),
		authCtl("set", "/w/1", "v").as(root),
		authCtl("-o", "extended", "watch", "--recursive", "--after-index", "${w0.index}", "/"),
		authCtl("-o", "extended", "watch", "--recursive", "--after-index", "${w0.index}", "/w"),

		// A new password: the old one, which worked a moment ago, stops working at once.
		authCtl("user", "passwd", "bob").as(root).typing("bobpw2\n"),
		authCtl("user", "passwd", "bob").typing("bobpw3\n").fails(1),
		// A new password for a user that does not exist creates it: etcd answers 201 with
		// the user, where etcdctl wants a 200, and prints the message it finds (none).
		authCtl("user", "passwd", "nobody").as(root).typing("x\n").fails(1),
		authCtl("user", "get", "nobody").as(root),
		authCtl("user", "remove", "nobody").as(root),
		authCtl("get", "/rkt/b").as(bob).fails(4),
		authCtl("get", "/rkt/b").as(bobNew),
		authCtl("-o", "extended", "set", "/rkt/b", "3").as(bobNew),

		// Revoking: a permission, then the role.
		authCtl("role", "revoke", "--path", "/rkt/*", "--write", "rkt").as(root),
		authCtl("role", "revoke", "--path", "/nope", "--write", "rkt").as(root).fails(1),
		authCtl("role", "get", "rkt").as(root),
		authCtl("set", "/rkt/b", "4").as(bobNew).fails(4),
		authCtl("get", "/rkt/b").as(bobNew),
		authCtl("user", "revoke", "--roles", "rkt", "bob").as(root),
		authCtl("user", "revoke", "--roles", "rkt", "bob").as(root).fails(1),
		authCtl("user", "get", "bob").as(root),
		authCtl("get", "/rkt/b").as(bobNew).fails(4),
		// The root user keeps the root role, whatever is stored.
		authCtl("user", "revoke", "--roles", "root", "root").as(root),
		authCtl("user", "get", "root").as(root),
		authCtl("user", "list").as(root),

		// Removing: never root's user or role while auth is on.
		authCtl("user", "remove", "root").as(root).fails(1),
		authCtl("role", "remove", "root").as(root).fails(1),
		authCtl("user", "remove", "bob").fails(1),
		authCtl("user", "remove", "bob").as(root),
		authCtl("user", "remove", "bob").as(root).fails(1),
		authCtl("role", "remove", "rkt").as(root),
		authCtl("role", "remove", "rkt").as(root).fails(1),
		authCtl("role", "list").as(root),
		authCtl("user", "list").as(root),
		// carl still holds the role removed: etcd lists him, but cannot show him.
		authCtl("user", "get", "carl").as(root).fails(1),
		authCtl("get", "/rkt/b").as("carl:a:b").fails(4),

		// A guest that may read one key: etcd checks the guest's patterns as if no request
		// were recursive. With no guest role, a request without credentials may do nothing
		// with keys (reading the members stays open to all); enabling auth again makes one.
		authCtl("role", "revoke", "--path", "/*", "--read", "guest").as(root),
		authCtl("role", "grant", "--path", "/gdir", "--read", "guest").as(root),
		authCtl("set", "/gdir/k", "v").as(root),
		authCtl("ls", "--sort", "/gdir"),
		authCtl("ls", "--sort", "--recursive", "/gdir"),
		authCtl("get", "/gdir/k").fails(4),
		authCtl("role", "remove", "guest").as(root),
		authCtl("ls", "/gdir").fails(4),
		authCtl("member", "list"),
		authCtl("cluster-health"),
		authCtl("auth", "disable").as(root),
		authCtl("auth", "enable").as(root),
		authCtl("role", "get", "guest").as(root),
		authCtl("get", "/gdir/k"),

		// Off again: open to everyone, the data kept.
		authCtl("auth", "disable").fails(1),
		authCtl("auth", "disable").as(root),
		authCtl("auth", "disable").as(root).fails(1),
		authCtl("-o", "extended", "set", "/guest", "x"),
		authCtl("role", "get", "guest"),
		authCtl("user", "list"),
		authCtl("user", "remove", "root"),
		authCtl("role", "remove", "guest"),
		authCtl("role", "list"),
		authCtl("user", "list"),
		authCtl("-o", "extended", "get", "/rkt/b"),
	}
	for _, st := range steps {
		var res, norm [2]ctlResult
		for i, s := range d.sides() {
			res[i] = s.etcdctlTyping(st.stdin, st.args)
			if m := extendedModifiedIndex.FindStringSubmatch(res[i].stdout); m != nil && st.save != "" {
				s.vars[st.save+".index"] = m[1]
			}
			norm[i] = ctlResult{code: res[i].code, stdout: s.normCtl(res[i].stdout, false), stderr: s.normCtl(res[i].stderr, false)}
		}
		desc := strings.Join(st.args, " ")
		if st.stdin != "" {
			desc += fmt.Sprintf(" (typing %q)", st.stdin)
		}
		if res[0].code != st.code {
			t.Errorf("script: etcdctl %s exits %d on %s, the script expects %d: %s", desc, res[0].code, d.ref.p.Name, st.code, res[0])
		}
		if d.transcript != nil {
			fmt.Fprintf(d.transcript, "### etcdctl %s\n--- %s: %s\n--- %s: %s\n", desc, d.ref.p.Name, res[0], d.sub.p.Name, res[1])
		}
		if norm[0] != norm[1] {
			t.Errorf("etcdctl %s differs:\n  %s (normalized): %s\n  %s (normalized): %s\n  %s (raw): %s\n  %s (raw): %s",
				desc, d.ref.p.Name, norm[0], d.sub.p.Name, norm[1], d.ref.p.Name, res[0], d.sub.p.Name, res[1])
		}
	}
	if testing.Verbose() {
		t.Logf("%d etcdctl runs compared", len(steps))
	}
}

// goAuthScript drives one server's v2 auth through the Go client: users and roles, the
// switch, then keys as a user with a role, as a user with wrong credentials, and as the guest
// before and after its write permission is revoked. Every outcome is recorded in r; each call
// says whether etcd accepts it (pass) or refuses it (fail), checked on the reference.
func goAuthScript(t *testing.T, s *diffSide, r *recorder) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	newClient := func(user, password string) client.Client {
		c, err := client.New(client.Config{
			Endpoints:               []string{s.p.ClientURL},
			Transport:               client.DefaultTransport,
			HeaderTimeoutPerRequest: 10 * time.Second,
			Username:                user,
			Password:                password,
		})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	anon := newClient("", "")
	rootc := newClient("root", "rootpw2")
	alice := newClient("alice", "alicepw")
	aliceNew := newClient("alice", "alicepw2")
	aliceWrong := newClient("alice", "wrong")

	const pass, fail = true, false
	expect := func(op string, want bool, err error) {
		if s.reference && (err == nil) != want {
			expected := "an error"
			if want {
				expected = "success"
			}
			t.Errorf("script: %s on %s: error %v, where the script expects %s", op, s.p.Name, err, expected)
		}
	}
	line := func(op string, want bool, result string, err error) {
		expect(op, want, err)
		if err == nil {
			r.lines = append(r.lines, op+" -> "+result)
			return
		}
		var ce client.Error
		if errors.As(err, &ce) {
			r.lines = append(r.lines, fmt.Sprintf("%s -> error %d %q cause=%q index=%d", op, ce.Code, ce.Message, s.relText(ce.Cause), s.rel(ce.Index)))
			return
		}
		// The auth APIs answer with the server's {"message"} in an unexported type, or with
		// the status code when they found no message to decode.
		r.lines = append(r.lines, fmt.Sprintf("%s -> error %T %q", op, err, s.relText(err.Error())))
	}
	done := func(op string, want bool) func(error) {
		return func(err error) { line(op, want, "ok", err) }
	}
	user := func(op string, want bool) func(*client.User, error) {
		return func(u *client.User, err error) {
			var res string
			if u != nil {
				res = fmt.Sprintf("user=%q roles=%q grant=%q revoke=%q password=%q", u.User, u.Roles, u.Grant, u.Revoke, u.Password)
			}
			line(op, want, res, err)
		}
	}
	role := func(op string, want bool) func(*client.Role, error) {
		return func(ro *client.Role, err error) {
			var res string
			if ro != nil {
				res = fmt.Sprintf("role=%q permissions=%+v grant=%v revoke=%v", ro.Role, ro.Permissions, ro.Grant, ro.Revoke)
			}
			line(op, want, res, err)
		}
	}
	names := func(op string, want bool) func([]string, error) {
		return func(list []string, err error) { line(op, want, fmt.Sprintf("%q", list), err) }
	}
	key := func(op string, want bool) func(*client.Response, error) {
		return func(resp *client.Response, err error) {
			expect(op, want, err)
			r.add(op, resp, err, false)
		}
	}
	member := func(op string, want bool) func(*client.Member, error) {
		return func(m *client.Member, err error) {
			var res string
			if m != nil {
				res = fmt.Sprintf("peerURLs=%q", m.PeerURLs)
			}
			line(op, want, res, err)
		}
	}

	auth, users, roles := client.NewAuthAPI(anon), client.NewAuthUserAPI(anon), client.NewAuthRoleAPI(anon)
	rootAuth, rootUsers, rootRoles := client.NewAuthAPI(rootc), client.NewAuthUserAPI(rootc), client.NewAuthRoleAPI(rootc)

	// Before any auth data.
	names("ListUsers", pass)(users.ListUsers(ctx))
	names("ListRoles", pass)(roles.ListRoles(ctx))
	done("Enable without root", fail)(auth.Enable(ctx))
	done("Disable while off", fail)(auth.Disable(ctx))

	// Users and roles, auth off: anyone may change them. AddUser of a user that exists sets
	// its password (a PUT without roles: etcd updates).
	done("AddUser root", pass)(users.AddUser(ctx, "root", "rootpw"))
	done("AddUser root again", pass)(users.AddUser(ctx, "root", "rootpw2"))
	done("AddUser empty password", fail)(users.AddUser(ctx, "eve", ""))
	done("AddUser alice", pass)(users.AddUser(ctx, "alice", "alicepw"))
	done("AddRole rkt", pass)(roles.AddRole(ctx, "rkt"))
	done("AddRole rkt again", fail)(roles.AddRole(ctx, "rkt"))
	done("AddRole root", fail)(roles.AddRole(ctx, "root"))
	role("GrantRoleKV rkt /rkt/*", pass)(roles.GrantRoleKV(ctx, "rkt", []string{"/rkt/*"}, client.ReadWritePermission))
	role("GrantRoleKV rkt /rkt/* again", fail)(roles.GrantRoleKV(ctx, "rkt", []string{"/rkt/*"}, client.ReadPermission))
	role("GrantRoleKV rkt /wo write", pass)(roles.GrantRoleKV(ctx, "rkt", []string{"/wo"}, client.WritePermission))
	role("GrantRoleKV missing role", fail)(roles.GrantRoleKV(ctx, "nosuch", []string{"/x"}, client.ReadPermission))
	role("GrantRoleKV root", fail)(roles.GrantRoleKV(ctx, "root", []string{"/x"}, client.ReadPermission))
	role("GetRole rkt", pass)(roles.GetRole(ctx, "rkt"))
	role("GetRole root", pass)(roles.GetRole(ctx, "root"))
	role("GetRole missing", fail)(roles.GetRole(ctx, "nosuch"))
	user("GrantUser alice rkt", pass)(users.GrantUser(ctx, "alice", []string{"rkt"}))
	user("GrantUser alice rkt again", fail)(users.GrantUser(ctx, "alice", []string{"rkt"}))
	user("GrantUser missing user", fail)(users.GrantUser(ctx, "nobody", []string{"rkt"}))
	user("GetUser alice", pass)(users.GetUser(ctx, "alice"))
	user("GetUser root", pass)(users.GetUser(ctx, "root"))
	user("GetUser missing", fail)(users.GetUser(ctx, "nobody"))
	names("ListUsers", pass)(users.ListUsers(ctx))
	names("ListRoles", pass)(roles.ListRoles(ctx))

	// Auth on: the auth API needs root, with its current password.
	done("Enable", pass)(auth.Enable(ctx))
	done("Enable again", fail)(auth.Enable(ctx))
	done("Enable again as root", fail)(rootAuth.Enable(ctx))
	names("ListUsers without credentials", fail)(users.ListUsers(ctx))
	names("ListRoles without credentials", fail)(roles.ListRoles(ctx))
	user("GetUser without credentials", fail)(users.GetUser(ctx, "alice"))
	names("ListUsers as alice", fail)(client.NewAuthUserAPI(alice).ListUsers(ctx))
	names("ListUsers with root's old password", fail)(client.NewAuthUserAPI(newClient("root", "rootpw")).ListUsers(ctx))
	names("ListUsers as root", pass)(rootUsers.ListUsers(ctx))
	names("ListRoles as root", pass)(rootRoles.ListRoles(ctx))
	role("GetRole guest", pass)(rootRoles.GetRole(ctx, "guest"))

	// Keys as alice: /rkt/* read and write, /wo write only; a recursive read only under a
	// pattern that ends in "*".
	ak := client.NewKeysAPI(alice)
	key("alice Set /rkt/a", pass)(ak.Set(ctx, "/rkt/a", "1", nil))
	key("alice Get /rkt/a", pass)(ak.Get(ctx, "/rkt/a", nil))
	key("alice Create /rkt/b", pass)(ak.Create(ctx, "/rkt/b", "2"))
	key("alice Get /rkt recursive", fail)(ak.Get(ctx, "/rkt", &client.GetOptions{Recursive: true, Sort: true}))
	key("alice Get /rkt/ sorted", pass)(ak.Get(ctx, "/rkt/", &client.GetOptions{Sort: true}))
	key("alice Set /other", fail)(ak.Set(ctx, "/other", "x", nil))
	key("alice Get /other", fail)(ak.Get(ctx, "/other", nil))
	key("alice Set /wo", pass)(ak.Set(ctx, "/wo", "w", nil))
	key("alice Get /wo", fail)(ak.Get(ctx, "/wo", nil))
	key("alice Delete /rkt/a", pass)(ak.Delete(ctx, "/rkt/a", nil))
	key("wrong password Set /rkt/a", fail)(client.NewKeysAPI(aliceWrong).Set(ctx, "/rkt/a", "x", nil))
	key("wrong password Get /rkt/b", fail)(client.NewKeysAPI(aliceWrong).Get(ctx, "/rkt/b", nil))
	member("alice MembersAPI.Add", fail)(client.NewMembersAPI(alice).Add(ctx, "http://127.0.0.1:1"))

	// The guest: everything until its write on /* is revoked, then reading only.
	gk := client.NewKeysAPI(anon)
	key("guest Set /guest", pass)(gk.Set(ctx, "/guest", "v", nil))
	member("guest MembersAPI.Add", fail)(client.NewMembersAPI(anon).Add(ctx, "http://127.0.0.1:1"))
	role("RevokeRoleKV guest write /* without credentials", fail)(roles.RevokeRoleKV(ctx, "guest", []string{"/*"}, client.WritePermission))
	role("RevokeRoleKV guest write /*", pass)(rootRoles.RevokeRoleKV(ctx, "guest", []string{"/*"}, client.WritePermission))
	role("RevokeRoleKV guest write /* again", fail)(rootRoles.RevokeRoleKV(ctx, "guest", []string{"/*"}, client.WritePermission))
	key("guest Set /guest after revoke", fail)(gk.Set(ctx, "/guest", "w", nil))
	key("guest Delete /guest after revoke", fail)(gk.Delete(ctx, "/guest", nil))
	key("guest Get /guest after revoke", pass)(gk.Get(ctx, "/guest", nil))
	key("guest Get /rkt/b", pass)(gk.Get(ctx, "/rkt/b", nil))

	// A new password: the old one, which worked a moment ago, stops working at once.
	user("ChangePassword alice without credentials", fail)(users.ChangePassword(ctx, "alice", "x"))
	user("ChangePassword alice", pass)(rootUsers.ChangePassword(ctx, "alice", "alicepw2"))
	// A new password for a user that does not exist creates it (201, where the client wants
	// a 200: an error without a message).
	user("ChangePassword missing user", fail)(rootUsers.ChangePassword(ctx, "nobody", "x"))
	user("GetUser made by ChangePassword", pass)(rootUsers.GetUser(ctx, "nobody"))
	key("old password Get /rkt/b", fail)(ak.Get(ctx, "/rkt/b", nil))
	anew := client.NewKeysAPI(aliceNew)
	key("new password Set /rkt/b", pass)(anew.Set(ctx, "/rkt/b", "3", nil))

	// Revoking a permission, then the role.
	role("RevokeRoleKV rkt write /rkt/*", pass)(rootRoles.RevokeRoleKV(ctx, "rkt", []string{"/rkt/*"}, client.WritePermission))
	role("RevokeRoleKV rkt write /nope", fail)(rootRoles.RevokeRoleKV(ctx, "rkt", []string{"/nope"}, client.WritePermission))
	key("alice Set /rkt/b read only", fail)(anew.Set(ctx, "/rkt/b", "4", nil))
	key("alice Get /rkt/b read only", pass)(anew.Get(ctx, "/rkt/b", nil))
	user("RevokeUser alice rkt", pass)(rootUsers.RevokeUser(ctx, "alice", []string{"rkt"}))
	user("RevokeUser alice rkt again", fail)(rootUsers.RevokeUser(ctx, "alice", []string{"rkt"}))
	user("GetUser alice", pass)(rootUsers.GetUser(ctx, "alice"))
	key("alice Get /rkt/b without a role", fail)(anew.Get(ctx, "/rkt/b", nil))

	// Removing: never root's user or role while auth is on.
	done("RemoveUser root", fail)(rootUsers.RemoveUser(ctx, "root"))
	done("RemoveRole root", fail)(rootRoles.RemoveRole(ctx, "root"))
	done("RemoveUser alice without credentials", fail)(users.RemoveUser(ctx, "alice"))
	done("RemoveUser alice", pass)(rootUsers.RemoveUser(ctx, "alice"))
	done("RemoveUser alice again", fail)(rootUsers.RemoveUser(ctx, "alice"))
	done("RemoveRole rkt", pass)(rootRoles.RemoveRole(ctx, "rkt"))
	done("RemoveRole rkt again", fail)(rootRoles.RemoveRole(ctx, "rkt"))

	// Off again: open to everyone, the data kept.
	done("Disable without credentials", fail)(auth.Disable(ctx))
	done("Disable", pass)(rootAuth.Disable(ctx))
	done("Disable again", fail)(rootAuth.Disable(ctx))
	key("guest Set /guest after disable", pass)(gk.Set(ctx, "/guest", "x", nil))
	names("ListUsers after disable", pass)(users.ListUsers(ctx))
	names("ListRoles after disable", pass)(roles.ListRoles(ctx))
	role("GetRole guest after disable", pass)(roles.GetRole(ctx, "guest"))
	done("RemoveUser root after disable", pass)(users.RemoveUser(ctx, "root"))
	done("RemoveRole guest after disable", pass)(roles.RemoveRole(ctx, "guest"))
	names("ListUsers at the end", pass)(users.ListUsers(ctx))
	names("ListRoles at the end", pass)(roles.ListRoles(ctx))
	key("Get /rkt/b at the end", pass)(gk.Get(ctx, "/rkt/b", nil))
}

// TestGoClientAuth runs the same go.etcd.io/etcd/client/v2 auth script (AuthAPI, AuthUserAPI,
// AuthRoleAPI, and KeysAPI with Config.Username and Password) against etcd and against
// etcaddy and compares the outcomes call by call.
func TestGoClientAuth(t *testing.T) {
	compareScripts(t, newDiffer(t, startEtcd(t), startSubject(t)), goAuthScript)
}

// authAnswer is the status and body of one answer of memberRequest.
type authAnswer struct {
	status int
	body   string
}

// memberRequest sends one request to m as user ("name:password"; empty: no credentials) with
// body (empty: none; JSON for /v2/auth and /v2/members, a form for /v2/keys), 30 s at most.
func memberRequest(m *testMember, method, path, user, body string) (authAnswer, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, m.ClientURL+path, rd)
	if err != nil {
		return authAnswer{}, err
	}
	if body != "" {
		ctype := "application/json"
		if strings.HasPrefix(path, "/v2/keys") {
			ctype = "application/x-www-form-urlencoded" // the keys API reads a form
		}
		req.Header.Set("Content-Type", ctype)
	}
	if user != "" {
		name, password, _ := strings.Cut(user, ":")
		req.SetBasicAuth(name, password)
	}
	st, _, b, err := roundTrip(req)
	return authAnswer{status: st, body: string(b)}, err
}

// clusterAuthDo is memberRequest, failing the test on a transport error.
func clusterAuthDo(t *testing.T, m *testMember, method, path, user, body string) authAnswer {
	t.Helper()
	a, err := memberRequest(m, method, path, user, body)
	if err != nil {
		t.Fatalf("%s: %s %s: %v", m.Name, method, path, err)
	}
	return a
}

// TestClusterAuthReplicates writes users, a role and the switch through different members of
// a three-member etcaddy cluster and checks that they govern a third member: a write the
// guest may not make is refused with etcd's 401 and errorCode 110, root and a user with a
// role get through, and the auth API lists the users; every member shows the same store
// index; and after a member is killed and restarted the auth data is still there.
func TestClusterAuthReplicates(t *testing.T) {
	c := startCluster(t, 3, nil)
	m0, m1, m2 := c.members[0], c.members[1], c.members[2]
	const root, carol = "root:rootpw", "carol:carolpw"

	want := func(what string, got authAnswer, status int, body string) {
		t.Helper()
		if got.status != status || (body != "" && strings.TrimSpace(got.body) != body) {
			if body == "" {
				body = "(any body)"
			}
			t.Errorf("%s: %d %s, want %d %s", what, got.status, strings.TrimSpace(got.body), status, body)
		}
	}
	want("PUT root user on "+m0.Name, clusterAuthDo(t, m0, "PUT", "/v2/auth/users/root", "", `{"user":"root","password":"rootpw"}`),
		http.StatusCreated, `{"user":"root","roles":["root"]}`)
	want("PUT role secret on "+m0.Name, clusterAuthDo(t, m0, "PUT", "/v2/auth/roles/secret", "",
		`{"role":"secret","permissions":{"kv":{"read":["/*"],"write":["/secret/*"]}}}`),
		http.StatusCreated, `{"role":"secret","permissions":{"kv":{"read":["/*"],"write":["/secret/*"]}}}`)
	// etcd creates a user whose body lists roles with 200, not 201.
	want("PUT user carol on "+m0.Name, clusterAuthDo(t, m0, "PUT", "/v2/auth/users/carol", "", `{"user":"carol","password":"carolpw","roles":["secret"]}`),
		http.StatusOK, `{"user":"carol","roles":["secret"]}`)
	want("PUT /v2/auth/enable on "+m1.Name, clusterAuthDo(t, m1, "PUT", "/v2/auth/enable", "", ""), http.StatusOK, "")
	// The guest role enabling made may write /public/* only.
	want("narrow guest on "+m1.Name, clusterAuthDo(t, m1, "PUT", "/v2/auth/roles/guest", root,
		`{"role":"guest","grant":{"kv":{"read":[],"write":["/public/*"]}},"revoke":{"kv":{"read":[],"write":["/*"]}}}`),
		http.StatusOK, `{"role":"guest","permissions":{"kv":{"read":["/*"],"write":["/public/*"]}}}`)

	// m2 checks requests against the auth data it has applied itself, as etcd does: wait
	// until it has applied everything m1 committed.
	waitCaughtUp(t, m2, etcdIndex(t, m1), 20*time.Second)
	want("GET /v2/auth/enable on "+m2.Name, clusterAuthDo(t, m2, "GET", "/v2/auth/enable", "", ""), http.StatusOK, `{"enabled":true}`)
	refused := `{"errorCode":110,"message":"The request requires user authentication","cause":"Insufficient credentials","index":0}`
	want("guest PUT /secret/x on "+m2.Name, clusterAuthDo(t, m2, "PUT", "/v2/keys/secret/x", "", "value=guest"), http.StatusUnauthorized, refused)
	want("guest PUT /public/x on "+m2.Name, clusterAuthDo(t, m2, "PUT", "/v2/keys/public/x", "", "value=guest"), http.StatusCreated, "")
	want("root PUT /secret/x on "+m2.Name, clusterAuthDo(t, m2, "PUT", "/v2/keys/secret/x", root, "value=root"), http.StatusCreated, "")
	want("carol PUT /secret/y on "+m2.Name, clusterAuthDo(t, m2, "PUT", "/v2/keys/secret/y", carol, "value=carol"), http.StatusCreated, "")
	want("carol PUT /other on "+m2.Name, clusterAuthDo(t, m2, "PUT", "/v2/keys/other", carol, "value=carol"), http.StatusUnauthorized, refused)
	want("wrong password PUT /secret/z on "+m2.Name, clusterAuthDo(t, m2, "PUT", "/v2/keys/secret/z", "carol:wrong", "value=x"), http.StatusUnauthorized, refused)
	want("guest GET /secret/x on "+m2.Name, clusterAuthDo(t, m2, "GET", "/v2/keys/secret/x", "", ""), http.StatusOK, "")
	want("GET /v2/auth/users without credentials on "+m2.Name, clusterAuthDo(t, m2, "GET", "/v2/auth/users", "", ""),
		http.StatusUnauthorized, `{"message":"Insufficient credentials"}`)
	want("carol POST /v2/members on "+m2.Name, clusterAuthDo(t, m2, "POST", "/v2/members", carol, `{"peerURLs":["http://127.0.0.1:1"]}`),
		http.StatusUnauthorized, `{"message":"Insufficient credentials"}`)

	// usersOf lists the users m names to root, each with its roles.
	usersOf := func(m *testMember) string {
		t.Helper()
		a := clusterAuthDo(t, m, "GET", "/v2/auth/users", root, "")
		var r struct {
			Users []struct {
				User  string `json:"user"`
				Roles []struct {
					Role string `json:"role"`
				} `json:"roles"`
			} `json:"users"`
		}
		if a.status != http.StatusOK || json.Unmarshal([]byte(a.body), &r) != nil {
			t.Errorf("%s: GET /v2/auth/users as root: %d %s", m.Name, a.status, a.body)
			return ""
		}
		var out []string
		for _, u := range r.Users {
			var roles []string
			for _, ro := range u.Roles {
				roles = append(roles, ro.Role)
			}
			out = append(out, u.User+"("+strings.Join(roles, ",")+")")
		}
		return strings.Join(out, " ")
	}
	const wantUsers = "carol(secret) root(root)"
	if got := usersOf(m2); got != wantUsers {
		t.Errorf("%s: users %q, want %q", m2.Name, got, wantUsers)
	}

	// sameIndex checks that every member, once it has applied what a quorum read on m0 saw,
	// shows the same store index: the auth writes moved it alike on each.
	sameIndex := func(when string) {
		t.Helper()
		target := etcdIndex(t, m0)
		var got []uint64
		for _, m := range c.members {
			waitCaughtUp(t, m, target, 20*time.Second)
			idx, ok := plainIndex(m)
			if !ok {
				t.Fatalf("%s: %s: no X-Etcd-Index", when, m.Name)
			}
			got = append(got, idx, etcdIndex(t, m))
		}
		if slices.Min(got) != slices.Max(got) {
			t.Errorf("%s: X-Etcd-Index (plain, quorum) per member %v differ", when, got)
		}
	}
	sameIndex("after the auth writes")

	// Grants to one role through the three members at once: each is decided on the role as
	// its member reads it and must not undo another's (etcd's v2 auth writes the merged role
	// back blindly; etcaddy's write is conditional on what it read, and decides again).
	const grantsPerMember = 5
	var wg sync.WaitGroup
	for _, m := range c.members {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range grantsPerMember {
				body := fmt.Sprintf(`{"role":"secret","grant":{"kv":{"read":[],"write":["/c/%s/%d"]}}}`, m.Name, i)
				a, err := memberRequest(m, "PUT", "/v2/auth/roles/secret", root, body)
				if err != nil || a.status != http.StatusOK {
					t.Errorf("%s: grant %s: %d %s %v", m.Name, body, a.status, a.body, err)
				}
			}
		}()
	}
	wg.Wait()
	wantWrite := []string{"/secret/*"}
	for _, m := range c.members {
		for i := range grantsPerMember {
			wantWrite = append(wantWrite, fmt.Sprintf("/c/%s/%d", m.Name, i))
		}
	}
	slices.Sort(wantWrite)
	writes, err := json.Marshal(wantWrite)
	if err != nil {
		t.Fatal(err)
	}
	wantRole := fmt.Sprintf(`{"role":"secret","permissions":{"kv":{"read":["/*"],"write":%s}}}`, writes)
	sameIndex("after the concurrent grants")
	for _, m := range c.members {
		want("GET role secret on "+m.Name, clusterAuthDo(t, m, "GET", "/v2/auth/roles/secret", root, ""), http.StatusOK, wantRole)
	}

	// A member killed and restarted still has the users, the roles and the switch.
	m2.kill9()
	want("root PUT /secret/while-down on "+m0.Name, clusterAuthDo(t, m0, "PUT", "/v2/keys/secret/while-down", root, "value=1"), http.StatusCreated, "")
	m2.restart(t)
	waitCaughtUp(t, m2, etcdIndex(t, m0), 20*time.Second)
	want("GET /v2/auth/enable on "+m2.Name+" after restart", clusterAuthDo(t, m2, "GET", "/v2/auth/enable", "", ""), http.StatusOK, `{"enabled":true}`)
	if got := usersOf(m2); got != wantUsers {
		t.Errorf("%s after restart: users %q, want %q", m2.Name, got, wantUsers)
	}
	want("guest PUT /secret/x on "+m2.Name+" after restart", clusterAuthDo(t, m2, "PUT", "/v2/keys/secret/x", "", "value=guest"), http.StatusUnauthorized, refused)
	want("carol PUT /secret/y on "+m2.Name+" after restart", clusterAuthDo(t, m2, "PUT", "/v2/keys/secret/y", carol, "value=again"), http.StatusOK, "")
	want("GET role guest on "+m2.Name+" after restart", clusterAuthDo(t, m2, "GET", "/v2/auth/roles/guest", root, ""),
		http.StatusOK, `{"role":"guest","permissions":{"kv":{"read":["/*"],"write":["/public/*"]}}}`)
	want("GET role secret on "+m2.Name+" after restart", clusterAuthDo(t, m2, "GET", "/v2/auth/roles/secret", root, ""), http.StatusOK, wantRole)
	sameIndex("after the restart")
}
