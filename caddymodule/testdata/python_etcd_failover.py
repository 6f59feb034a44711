"""python-etcd fails over between the members of a cluster.

Usage: python3 python_etcd_failover.py PORT...   (members' client ports on 127.0.0.1)

The client is given every member (allow_reconnect). It writes, says which member it talks to
("connected PORT") and waits for a line on standard input: the test kills that member meanwhile.
Then it writes again (the client must move to a member that is up) and reads both keys back
with quorum=true.

Then it watches a key on the member it talks to now, says so once the watch is registered
("watching PORT"), and waits for the watch's event: meanwhile the test brings the killed member
back, removes the watched one from the cluster and writes the key through another. The removed
member cuts its watch's connection, as etcd's exit does: the client must move to another member
and get the event there (from the history: the watch has an index). Every line it prints is
checked by TestPythonEtcdFailsOver.
"""

import sys
import threading
import time

import etcd

ports = [int(p) for p in sys.argv[1:]]
c = etcd.Client(host=tuple(("127.0.0.1", p) for p in ports), allow_reconnect=True, read_timeout=30)
c.write("/py/before", "1")
print("members", len(c.members))
print("machines", " ".join(sorted(m.strip() for m in c.machines)))
print("connected", c.port, flush=True)

sys.stdin.readline()  # the member at c.port is down now
killed = c.port
r = c.write("/py/after", "2")
print("after", r.action, r.value, "moved" if c.port != killed else "did not move")
print("read before", c.read("/py/before", quorum=True).value)
print("read after", c.read("/py/after", quorum=True).value)

watched = c.port
since = c.read("/py/after").etcd_index + 1
got = []
watch = threading.Thread(target=lambda: got.append(c.watch("/py/moved", index=since, timeout=90)))
watch.start()
alone = etcd.Client(host="127.0.0.1", port=watched)
deadline = time.monotonic() + 10
while alone.store_stats["watchers"] < 1:
    if time.monotonic() > deadline:
        print("the watch was never registered on", watched, flush=True)
        sys.exit(1)
    time.sleep(0.05)
print("watching", watched, flush=True)
watch.join()
print("watch", got[0].action, got[0].value, "moved" if c.port != watched else "did not move")
print("done", flush=True)
