"""python-etcd's v2 auth (Debian's python3-etcd 0.4.5: etcd.auth) against one v2 server.

Usage: python3 python_etcd_auth.py HOST PORT

Prints one line per call: what the client returned or raised, indexes relative to the
server's index at the start, so that the transcripts of etcd and of etcaddy can be compared
line by line (TestPythonEtcdAuthMatchesEtcd). Run with PYTHONHASHSEED fixed: python-etcd
sends permission sets in set order, which etcd stores as sent.
"""

import json
import sys

import etcd
from etcd.auth import Auth, EtcdRole, EtcdUser

host, port = sys.argv[1], int(sys.argv[2])


def client(user=None, password=None):
    return etcd.Client(host=host, port=port, username=user, password=password, read_timeout=30)


c = client()
root = client("root", "rootpw")
base = c.read("/").etcd_index


def call(label, f):
    try:
        r = f()
    except Exception as e:  # noqa: BLE001 - the transcript records every outcome
        print("%s: %s %s" % (label, type(e).__name__, e))
        return None
    print("%s: %s" % (label, r))
    return r


def user(cl, name):
    # EtcdUser.read cannot read etcd 3.4's answer (its roles are objects, python-etcd wants
    # names): the raw call, which the EtcdUser calls are made of.
    d = json.loads(cl.api_execute("%s/auth/users/%s" % (cl.version_prefix, name), cl._MGET).data)
    return "user=%s roles=%s" % (d["user"], [r["role"] for r in d.get("roles") or []])


def put_json(cl, path, payload):
    r = cl.api_execute_json(cl.version_prefix + path, cl._MPUT, params=payload)
    return "%d %s" % (r.status, r.data.decode().strip())


def role(cl, name):
    r = EtcdRole(cl, name)
    r.read()
    return "role=%s acls=%s" % (r.name, sorted(r.acls.items()))


def index():
    return c.read("/").etcd_index - base


def write_user(cl, name, password=None, roles=None):
    u = EtcdUser(cl, name)
    try:
        u.read()
    except etcd.EtcdKeyNotFound:
        pass
    if password is not None:
        u.password = password
    if roles is not None:
        u.roles = roles
    u.write()
    return "written"


def write_role(cl, name, grant=(), revoke=()):
    r = EtcdRole(cl, name)
    try:
        r.read()
    except etcd.EtcdKeyNotFound:
        pass
    for path, perm in grant:
        r.grant(path, perm)
    for path, perm in revoke:
        r.revoke(path, perm)
    r.write()
    return "written"


def delete(cl, cls, name):
    cls(cl, name).delete()
    return "deleted"


def key(cl, path, **kw):
    r = cl.read(path, **kw)
    if r.dir:
        return "dir %s: %s" % (r.key, sorted(ch.key for ch in r.leaves))
    return "%s=%s" % (r.key, r.value)


call("auth on", lambda: Auth(c).active)
call("enable without a root user", lambda: setattr(Auth(c), "active", True))
call("users", lambda: EtcdUser(c, "x").names)
call("roles", lambda: [r["role"] for r in EtcdRole(c, "x").names])
call("set before", lambda: c.write("/before", "1").modifiedIndex - base)
call("add root", lambda: write_user(c, "root", password="rootpw"))
call("index after the first auth write", index)
call("root", lambda: user(c, "root"))
call("add role app", lambda: write_role(c, "app", grant=[("/app/*", "RW"), ("/shared", "R")]))
call("app", lambda: role(c, "app"))
call("add role app again", lambda: write_role(c, "app", grant=[("/app/*", "RW")]))
call("add alice", lambda: write_user(c, "alice", password="alicepw", roles=["app"]))
call("alice", lambda: user(c, "alice"))
call("add bob without password", lambda: write_user(c, "bob", roles=["app"]))
call("grant a missing role", lambda: put_json(c, "/auth/users/alice", {"user": "alice", "grant": ["ghost"]}))
call("revoke it", lambda: put_json(c, "/auth/users/alice", {"user": "alice", "revoke": ["ghost"]}))
call("alice", lambda: user(c, "alice"))
call("users", lambda: sorted(u["user"] for u in EtcdUser(c, "x").names))
call("missing user", lambda: user(c, "nobody"))
call("missing role", lambda: role(c, "nope"))
call("index", index)

call("enable", lambda: setattr(Auth(c), "active", True))
call("auth on", lambda: Auth(c).active)
call("users without credentials", lambda: EtcdUser(c, "x").names)
call("users as root", lambda: sorted(u["user"] for u in EtcdUser(root, "x").names))
call("guest", lambda: role(root, "guest"))
call("guest write before narrowing", lambda: c.write("/open", "1").key)
call("narrow guest", lambda: write_role(root, "guest", revoke=[("/*", "W")]))
call("guest", lambda: role(root, "guest"))
call("guest write", lambda: c.write("/open", "2").key)
call("guest read", lambda: key(c, "/open"))

alice = client("alice", "alicepw")
call("alice writes her key", lambda: alice.write("/app/x", "1").key)
call("alice reads it", lambda: key(alice, "/app/x"))
call("alice lists /app/", lambda: key(alice, "/app/", recursive=True))
call("alice lists /app", lambda: key(alice, "/app", recursive=True))
call("alice reads /shared", lambda: key(alice, "/shared"))
call("alice writes elsewhere", lambda: alice.write("/other", "1").key)
call("alice deletes her key", lambda: alice.delete("/app/x").key)
call("alice manages users", lambda: EtcdUser(alice, "x").names)
call("wrong password", lambda: key(client("alice", "wrong"), "/open"))
call("unknown user", lambda: key(client("mallory", "x"), "/open"))
call("alice through EtcdUser", lambda: EtcdUser(root, "alice").read())
call("change alice's password", lambda: put_json(root, "/auth/users/alice", {"user": "alice", "password": "newpw"}))
call("old password", lambda: key(client("alice", "alicepw"), "/open"))
call("new password", lambda: key(client("alice", "newpw"), "/open"))
call("revoke app from alice", lambda: put_json(root, "/auth/users/alice", {"user": "alice", "revoke": ["app"]}))
call("grant it twice", lambda: put_json(root, "/auth/users/alice", {"user": "alice", "grant": ["app", "app"]}))
call("alice", lambda: user(root, "alice"))
call("alice writes without the role", lambda: client("alice", "newpw").write("/app/y", "1").key)
call("revoke /shared from app", lambda: write_role(root, "app", revoke=[("/shared", "R")]))
call("app", lambda: role(root, "app"))
call("delete root while on", lambda: delete(root, EtcdUser, "root"))
call("delete role root", lambda: delete(root, EtcdRole, "root"))
call("delete alice", lambda: delete(root, EtcdUser, "alice"))
call("delete alice again", lambda: delete(root, EtcdUser, "alice"))
call("delete app", lambda: delete(root, EtcdRole, "app"))
call("delete guest", lambda: delete(root, EtcdRole, "guest"))
call("guest read without guest", lambda: key(c, "/open"))
call("roles", lambda: [r["role"] for r in EtcdRole(root, "x").names])
call("disable without credentials", lambda: setattr(Auth(c), "active", False))
call("disable", lambda: setattr(Auth(root), "active", False))
call("auth on", lambda: Auth(c).active)
call("write after", lambda: c.write("/after", "1").modifiedIndex - base)
call("index at the end", index)
