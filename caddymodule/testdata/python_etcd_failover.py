"""python-etcd fails over between the members of a cluster.

Usage: python3 python_etcd_failover.py PORT...   (members' client ports on 127.0.0.1)

The client is given every member (allow_reconnect). It writes, says which member it talks to
("connected PORT") and waits for a line on standard input: the test kills that member meanwhile.
Then it writes again (the client must move to a member that is up) and reads both keys back
with quorum=true. Every line it prints is checked by TestPythonEtcdFailsOver.
"""

import sys

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
print("done", flush=True)
