"""python-etcd (Debian's python3-etcd 0.4.5) against one v2 server.

Usage: python3 python_etcd.py HOST PORT

Prints one line per call: what the client returned or raised, with indexes made relative to
the server's index at the start, so that the transcript of etcd and of etcaddy can be compared
line by line (TestPythonEtcdMatchesEtcd). Watches wait for their watcher to be registered
(/v2/stats/store) before the write they expect; nothing sleeps.
"""

import re
import sys
import threading
import time

import etcd

host, port = sys.argv[1], int(sys.argv[2])
c = etcd.Client(host=host, port=port, allow_reconnect=True, read_timeout=30)
base = c.read("/").etcd_index
inorder = re.compile(r"/(\d{20})\b")
compared = re.compile(r"\[(\d+) != (\d+)\]")
cleared = re.compile(r"\[(\d+)/(\d+)\]")


def rel(i):
    return None if i is None else i - base


def rel_key(k):
    if k is None:
        return None
    return inorder.sub(lambda m: "/#%d" % rel(int(m.group(1))), k)


def node(r):
    if r is None:
        return "nil"
    parts = ["key=%s" % rel_key(r.key)]
    if r.dir:
        parts.append("dir")
    else:
        parts.append("value=%r" % (r.value,))
    if r.expiration is not None:
        parts.append("expiration")
    if r.ttl is not None:
        parts.append("ttl>0" if r.ttl > 0 else "ttl=%d" % r.ttl)
    parts.append("created=%s modified=%s" % (rel(r.createdIndex), rel(r.modifiedIndex)))
    if r.newKey:
        parts.append("newKey")
    return "{" + " ".join(parts) + "}"


def show(r):
    line = "%s %s prev=%s etcd_index=%s" % (
        r.action, node(r), node(getattr(r, "_prev_node", None)), rel(getattr(r, "etcd_index", None)))
    kids = [rel_key(ch["key"]) for ch in r._children]
    if kids:
        line += " children=%s" % kids
    return line


def call(op, fn, *args, **kwargs):
    """Runs one client call, prints its outcome and returns the result (None on error)."""
    try:
        r = fn(*args, **kwargs)
    except etcd.EtcdException as e:
        payload = e.payload if isinstance(e.payload, dict) else {}
        cause = payload.get("cause")
        if isinstance(cause, str):
            cause = inorder.sub(lambda m: "/#%d" % rel(int(m.group(1))), cause)
            if "prevIndex" in op or "update" in op:
                cause = compared.sub(lambda m: "[%d != %d]" % (rel(int(m.group(1))), rel(int(m.group(2)))), cause)
            cause = cleared.sub(lambda m: "[%d/%d]" % (rel(int(m.group(1))), rel(int(m.group(2)))), cause)
        print("%s -> %s errorCode=%s cause=%r status=%s" % (
            op, type(e).__name__, payload.get("errorCode"), cause, payload.get("status")))
        return None
    if isinstance(r, etcd.EtcdResult):
        print("%s -> %s" % (op, show(r)))
    else:
        print("%s -> %r" % (op, r))
    return r


def watchers():
    return c.store_stats["watchers"]


def wait_watchers(n):
    deadline = time.monotonic() + 10
    while watchers() < n:
        if time.monotonic() > deadline:
            print("no %d watcher(s) registered within 10s" % n)
            return


class Background:
    """A call on its own thread, for watches and blocking locks."""

    def __init__(self, op, fn, *args, **kwargs):
        self.out = []
        self.t = threading.Thread(target=self._run, args=(op, fn, args, kwargs), daemon=True)
        self.t.start()

    def _run(self, op, fn, args, kwargs):
        try:
            r = fn(*args, **kwargs)
            self.out.append("%s -> %s" % (op, show(r) if isinstance(r, etcd.EtcdResult) else repr(r)))
        except etcd.EtcdException as e:
            self.out.append("%s -> %s" % (op, type(e).__name__))

    def join(self):
        self.t.join(30)
        print(self.out[0] if self.out else "background call did not return within 30s")


# The cluster, as the client sees it.
print("machines include the endpoint:", c.base_uri in c.machines)
print("machines cache after reconnect setup:", c._machines_cache)
print("version keys:", sorted([c.version is not None, c.cluster_version is not None]))
members = c.members
print("members:", len(members), sorted(len(m["clientURLs"]) for m in members.values()))
print("leader is a member:", c.leader["id"] in members)
print("self stats state:", c.stats["state"])
print("store stats keys:", sorted(c.store_stats))
print("cluster id learnt:", bool(c.expected_cluster_id))

# Keys: write, read, compare, delete.
call("write /a", c.write, "/a", "one")
call("read /a", c.read, "/a")
call("write /a again", c.write, "/a", "two")
call("set /a", c.set, "/a", "three")
call("get /a", c.get, "/a")
call("read /a quorum", c.read, "/a", quorum=True)
print("/a in client:", "/a" in c, "/missing in client:", "/missing" in c)
call("read /missing", c.read, "/missing")
call("write prevExist=False on /a", c.write, "/a", "x", prevExist=False)
call("write prevExist=False on /b", c.write, "/b", "bee", prevExist=False)
call("write prevExist=True on /c", c.write, "/c", "x", prevExist=True)
call("test_and_set ok", c.test_and_set, "/a", "four", "three")
call("test_and_set bad", c.test_and_set, "/a", "five", "nope")
a = call("read /a for update", c.read, "/a")
if a is not None:
    a.value = "updated"
    call("update /a", c.update, a)
    a.value = "stale"
    call("update /a stale", c.update, a)
call("write prevIndex stale", c.write, "/a", "x", prevIndex=base + 1)
call("write ttl", c.write, "/ttl", "t", ttl=300)
call("read ttl", c.read, "/ttl")
call("refresh", c.refresh, "/ttl", 400)
call("refresh missing", c.refresh, "/nottl", 10)
call("write ttl=-1", c.write, "/ttl", "t", ttl=-1)
call("write under a file", c.write, "/a/b", "x")
call("read under a file", c.read, "/a/b")
call("write root", c.write, "/", "x")

# Directories.
call("write dir", c.write, "/d", None, dir=True)
call("write dir with value", c.write, "/d2", "v", dir=True)
call("write /d/x", c.write, "/d/x", "x")
call("write /d/y/z", c.write, "/d/y/z", "z")
call("write /d/_h", c.write, "/d/_h", "h")
d = call("read /d sorted", c.read, "/d", sorted=True)
r = call("read /d recursive sorted", c.read, "/d", recursive=True, sorted=True)
if r is not None:
    print("leaves:", [(rel_key(n.key), n.value) for n in r.leaves])
    print("subtree:", [rel_key(n.key) for n in r.get_subtree()])
call("write value on dir", c.write, "/d", "v")
call("delete dir", c.delete, "/d")
call("delete dir dir=True", c.delete, "/d", dir=True)
call("pop /d/x", c.pop, "/d/x")
call("delete /b prevValue bad", c.delete, "/b", prevValue="nope")
call("delete /b prevValue ok", c.delete, "/b", prevValue="bee")
call("delete /b again", c.delete, "/b")
call("delete /d recursive", c.delete, "/d", recursive=True)
call("delete /a prevIndex stale", c.delete, "/a", prevIndex=base + 1)

# In-order keys: a queue.
q1 = call("append 1", c.write, "/q", "job1", append=True)
call("append 2", c.write, "/q", "job2", append=True, ttl=300)
r = call("read /q", c.read, "/q", recursive=True, sorted=True)
if r is not None:
    print("queue:", [n.value for n in r.leaves])
if q1 is not None:
    call("delete first job", c.delete, q1.key)

# Watches: from the history, live, recursive, and a client-side timeout.
w0 = call("write /w/start", c.write, "/w/start", "s")
if w0 is not None:
    call("write /w/a", c.write, "/w/a", "1")
    call("write /w/_h", c.write, "/w/_h", "h")
    call("delete /w/a", c.delete, "/w/a")
    call("watch /w/a from history", c.watch, "/w/a", index=w0.modifiedIndex + 1)
    call("watch /w recursive from history", c.watch, "/w", index=w0.modifiedIndex + 1, recursive=True)
    events = c.eternal_watch("/w", index=w0.modifiedIndex, recursive=True)
    for i in range(4):
        print("eternal_watch %d -> %s" % (i + 1, show(next(events))))
    call("read wait waitIndex", c.read, "/w/start", wait=True, waitIndex=w0.modifiedIndex)
n = watchers()
live = Background("live watch /live", c.watch, "/live")
wait_watchers(n + 1)
call("write /live", c.write, "/live", "now")
live.join()
n = watchers()
rec = Background("live recursive watch /lr", c.watch, "/lr", recursive=True)
wait_watchers(n + 1)
call("write /lr/_hidden", c.write, "/lr/_hidden", "h")
call("write /lr/k", c.write, "/lr/k", "k")
rec.join()
call("watch with timeout", c.watch, "/never", timeout=0.3)
call("refresh with watcher", c.write, "/rw", "v", ttl=100)
n = watchers()
rw = Background("watch refreshed key", c.watch, "/rw")
wait_watchers(n + 1)
call("refresh /rw", c.refresh, "/rw", 200)
call("write /rw", c.write, "/rw", "w")
rw.join()

# A lock: one holder, a second that cannot take it, then takes it once released.
lock1 = etcd.Lock(c, "job")
print("lock1 acquire ->", lock1.acquire(lock_ttl=60))
print("lock1 is_acquired ->", lock1.is_acquired)
lock2 = etcd.Lock(c, "job")
print("lock2 non-blocking acquire ->", lock2.acquire(blocking=False, lock_ttl=60))
n = watchers()
waiter = Background("lock2 blocking acquire", lock2.acquire, lock_ttl=60, timeout=20)
wait_watchers(n + 1)
lock1.release()
print("lock1 released, is_acquired ->", lock1.is_acquired)
waiter.join()
print("lock2 is_acquired ->", lock2.is_acquired)
lock2.release()

# The history reaches back 1000 events.
first = c.write("/h", "0")
for i in range(1, 1002):
    c.write("/h", str(i))
call("watch cleared history", c.watch, "/h", index=first.modifiedIndex)
call("watch kept history", c.watch, "/h", index=first.modifiedIndex + 2)
