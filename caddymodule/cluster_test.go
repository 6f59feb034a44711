package caddymodule

// End-to-end tests of multi-member clusters: real Caddy processes on 127.0.0.1, each running
// one member with its client site (the etcd handler) and its peer site (raftkv_peer), talking
// Raft to each other over real HTTP — plain on loopback, or mutual TLS under a CA the test
// makes.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddytls"
	client "go.etcd.io/etcd/client/v2"

	"github.com/etcaddy/etcaddy/raftkv"
)

// clusterElectionTimeout is the members' election timeout: etcd's default, so that the
// leader-failure test measures what a default cluster does.
const clusterElectionTimeout = time.Second

// testMember is one member of a test cluster and the process that runs it.
type testMember struct {
	*proc
	Name    string
	PeerURL string
	// PeerSite, when set, is the address of the member's peer site, where it differs
	// from the peer URL the cluster knows it by; "": PeerURL.
	PeerSite string
}

// testCluster is a set of members started by the test.
type testCluster struct {
	t             testing.TB
	pki           *testPKI // nil: peers over plain HTTP on loopback
	snapshotCount int      // raftkv's snapshot_count and snapshot_catchup_entries; 0: the defaults
	allowedCN     []string // the peer sites' raftkv_peer allowed_cn (with pki)
	// dataDir, when set, names the data directory of the member of that name (called once
	// per member); nil: a directory of the member's own in the test's temp dir.
	dataDir func(name string) string
	members []*testMember
}

// newTestMember picks the ports of a member-to-be and prepares its process; nothing runs yet.
func (c *testCluster) newTestMember(name string) *testMember {
	t := c.t
	dir := t.TempDir()
	clientPort, peerPort, adminPort := freePort(t), freePort(t), freePort(t)
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", peerPort)
	if c.pki != nil {
		// A name, not an address: TLS clients send no SNI for an IP address,
		// and Caddy picks the site's client_auth policy by SNI.
		peerURL = fmt.Sprintf("https://localhost:%d", peerPort)
	}
	home := filepath.Join(dir, "home")
	cfPath := filepath.Join(dir, "Caddyfile")
	m := &testMember{
		Name:    name,
		PeerURL: peerURL,
		proc: &proc{
			Name:      "etcaddy " + name,
			ClientURL: fmt.Sprintf("http://127.0.0.1:%d", clientPort),
			AdminURL:  fmt.Sprintf("http://127.0.0.1:%d", adminPort),
			DataDir:   filepath.Join(dir, "data"),
			Caddyfile: cfPath,
			LogPath:   filepath.Join(dir, "caddy.log"),
			t:         t,
			path:      caddyBin,
			args:      []string{"run", "--config", cfPath, "--adapter", "caddyfile"},
			env: append(os.Environ(),
				"HOME="+home,
				"XDG_CONFIG_HOME="+filepath.Join(home, "config"),
				"XDG_DATA_HOME="+filepath.Join(home, "data"),
			),
		},
	}
	if c.dataDir != nil {
		m.DataDir = c.dataDir(name)
	}
	return m
}

// caddyfile is m's configuration, written as an operator would: the member, its client site
// and its peer site. initial lists the members of initial_cluster.
func (c *testCluster) caddyfile(m *testMember, initial []*testMember, state string) string {
	var cluster []string
	for _, o := range initial {
		cluster = append(cluster, o.Name+"="+o.PeerURL)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "{\n\tadmin %s\n", strings.TrimPrefix(m.AdminURL, "http://"))
	if c.pki != nil {
		// The peer site is the only https one: no port 80 redirect, no local CA.
		b.WriteString("\tauto_https disable_redirects\n\tskip_install_trust\n")
	}
	fmt.Fprintf(&b, "\traftkv {\n\t\tname %s\n\t\tdata_dir %s\n\t\tadvertise_client_urls %s\n", m.Name, m.DataDir, m.ClientURL)
	fmt.Fprintf(&b, "\t\tinitial_cluster %s\n\t\tinitial_cluster_state %s\n", strings.Join(cluster, " "), state)
	fmt.Fprintf(&b, "\t\telection_timeout %v\n", clusterElectionTimeout)
	if c.snapshotCount > 0 {
		// The log keeps as many entries behind each snapshot.
		fmt.Fprintf(&b, "\t\tsnapshot_count %d\n\t\tsnapshot_catchup_entries %d\n", c.snapshotCount, c.snapshotCount)
	}
	if c.pki != nil {
		cert, key := c.pki.memberFiles(m.Name)
		fmt.Fprintf(&b, "\t\tpeer_cert_file %s\n\t\tpeer_key_file %s\n\t\tpeer_trusted_ca_file %s\n", cert, key, c.pki.caFile)
	}
	b.WriteString("\t}\n}\n\n")
	fmt.Fprintf(&b, "%s {\n\tetcd\n}\n\n", m.ClientURL)
	if c.pki != nil {
		cert, key := c.pki.memberFiles(m.Name)
		peer := "raftkv_peer"
		if len(c.allowedCN) > 0 {
			peer += " {\n\t\tallowed_cn " + strings.Join(c.allowedCN, " ") + "\n\t}"
		}
		fmt.Fprintf(&b, "%s {\n\tbind 127.0.0.1\n\ttls %s %s {\n\t\tclient_auth {\n\t\t\tmode require_and_verify\n\t\t\ttrust_pool file %s\n\t\t}\n\t}\n\t%s\n}\n",
			m.PeerURL, cert, key, c.pki.caFile, peer)
	} else {
		site := m.PeerURL
		if m.PeerSite != "" {
			site = m.PeerSite
		}
		fmt.Fprintf(&b, "%s {\n\traftkv_peer\n}\n", site)
	}
	return b.String()
}

// startCluster starts n members of a new cluster at once (none can be healthy before a
// quorum runs) and waits until each answers /health.
func startCluster(t testing.TB, n int, pki *testPKI) *testCluster {
	t.Helper()
	return (&testCluster{t: t, pki: pki}).start(n)
}

// start is startCluster for a cluster whose options are set.
func (c *testCluster) start(n int) *testCluster {
	t := c.t
	t.Helper()
	for i := 1; i <= n; i++ {
		c.members = append(c.members, c.newTestMember(fmt.Sprintf("n%d", i)))
	}
	return c.launch()
}

// launch starts the members of c.members at once, as start does.
func (c *testCluster) launch() *testCluster {
	t := c.t
	t.Helper()
	n := len(c.members)
	for _, m := range c.members {
		c.writeCaddyfile(m, c.members, "new")
		m.spawn(t)
	}
	for _, m := range c.members {
		if err := m.waitHealthy(30 * time.Second); err != nil {
			t.Fatalf("%s did not become healthy: %v", m.Name, err)
		}
	}
	// Each member publishes its name and client URLs through Raft once it
	// runs, as etcd does; until then etcdctl cannot reach it by its
	// client URL. A cluster is ready when every member lists them all.
	for _, m := range c.members {
		var got []memberInfo
		if !poll(20*time.Second, func() bool {
			got = listMembers(t, m)
			if len(got) != n {
				return false
			}
			for _, mi := range got {
				if mi.Name == "" || len(mi.ClientURLs) == 0 {
					return false
				}
			}
			return true
		}) {
			t.Fatalf("%s: the members never all published their names and client URLs: %+v", m.Name, got)
		}
	}
	return c
}

func (c *testCluster) writeCaddyfile(m *testMember, initial []*testMember, state string) {
	if err := os.WriteFile(m.Caddyfile, []byte(c.caddyfile(m, initial, state)), 0o644); err != nil {
		c.t.Fatal(err)
	}
}

// memberInfo is a member as /v2/members shows it.
type memberInfo struct {
	ID         string   `json:"id"`
	Name       string   `json:"name"`
	PeerURLs   []string `json:"peerURLs"`
	ClientURLs []string `json:"clientURLs"`
}

// leaderOf asks m which member leads; ok is false during an election or when m does not
// answer.
func leaderOf(m *testMember) (memberInfo, bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	st, _, body, err := m.tryDo(ctx, "GET", "/v2/members/leader", nil)
	if err != nil || st != http.StatusOK {
		return memberInfo{}, false
	}
	var l memberInfo
	if json.Unmarshal(body, &l) != nil || l.ID == "" {
		return memberInfo{}, false
	}
	return l, true
}

// agreedLeader waits until every member of ms names the same leader, other than not (when
// not is set), and returns it.
func agreedLeader(t *testing.T, ms []*testMember, not string, timeout time.Duration) memberInfo {
	t.Helper()
	var leader memberInfo
	ok := poll(timeout, func() bool {
		var first memberInfo
		for i, m := range ms {
			l, ok := leaderOf(m)
			if !ok || l.ID == not || (i > 0 && l.ID != first.ID) {
				return false
			}
			first = l
		}
		leader = first
		return true
	})
	if !ok {
		t.Fatalf("members %v agree on no leader (other than %q) within %v", names(ms), not, timeout)
	}
	return leader
}

func names(ms []*testMember) []string {
	var out []string
	for _, m := range ms {
		out = append(out, m.Name)
	}
	return out
}

func (c *testCluster) byName(name string) *testMember {
	for _, m := range c.members {
		if m.Name == name {
			return m
		}
	}
	c.t.Fatalf("no member is named %q", name)
	return nil
}

// listMembers GETs /v2/members from m.
func listMembers(t testing.TB, m *testMember) []memberInfo {
	t.Helper()
	st, _, body := m.do(t, "GET", "/v2/members", nil)
	if st != http.StatusOK {
		t.Fatalf("%s: GET /v2/members: %d %s", m.Name, st, body)
	}
	var r struct {
		Members []memberInfo `json:"members"`
	}
	if err := json.Unmarshal(body, &r); err != nil {
		t.Fatalf("%s: GET /v2/members: %v in %s", m.Name, err, body)
	}
	return r.Members
}

// etcdctl runs the real etcdctl (v2 API) against endpoints and returns its output.
func etcdctl(t *testing.T, endpoints []string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, etcdctlBin, append([]string{"--endpoints", strings.Join(endpoints, ",")}, args...)...)
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "ETCDCTL_") {
			env = append(env, kv)
		}
	}
	cmd.Env = append(env, "ETCDCTL_API=2")
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func clientURLs(ms []*testMember) []string {
	var out []string
	for _, m := range ms {
		out = append(out, m.ClientURL)
	}
	return out
}

// quorumKeys reads dir recursively on m with quorum=true (linearizable: m waits until it has
// applied everything committed before the read) and returns its files by key.
func quorumKeys(t *testing.T, m *testMember, dir string) map[string]crashNode {
	t.Helper()
	st, _, body := m.do(t, "GET", "/v2/keys"+dir+"?recursive=true&quorum=true", nil)
	if st != http.StatusOK {
		t.Fatalf("%s: quorum GET %s: %d %s", m.Name, dir, st, crashShort(body))
	}
	var r crashResponse
	if err := json.Unmarshal(body, &r); err != nil {
		t.Fatalf("%s: quorum GET %s: %v", m.Name, dir, err)
	}
	got := make(map[string]crashNode)
	crashFlatten(r.Node, got)
	return got
}

// checkAcked checks that every acknowledged write is on m, with its value and index.
func checkAcked(t *testing.T, m *testMember, dir string, acked map[string]crashAck) {
	t.Helper()
	got := quorumKeys(t, m, dir)
	bad := 0
	for key, a := range acked {
		n, ok := got[key]
		if !ok || n.Value != a.Value || n.ModifiedIndex != a.Index {
			if bad++; bad <= 5 {
				t.Errorf("%s: acknowledged %s = %q at index %d; has %+v (present %v)", m.Name, key, a.Value, a.Index, n, ok)
			}
		}
	}
	if bad > 0 {
		t.Errorf("%s: %d of %d acknowledged writes missing or changed", m.Name, bad, len(acked))
	}
}

// TestClusterThreeMembersOverLoopback runs the README's loopback cluster: three members whose
// peers talk plain HTTP on 127.0.0.1. Writes on any member are read on every member, etcdctl
// sees the cluster, and the stats and machine list speak for all three.
func TestClusterThreeMembersOverLoopback(t *testing.T) {
	c := startCluster(t, 3, nil)
	ms := c.members

	// Writes on every member, each read back on every member.
	acked := make(map[string]crashAck)
	for i, m := range ms {
		for j := range 5 {
			key := fmt.Sprintf("/cluster/%s-%d", m.Name, j)
			value := fmt.Sprintf("written on %s (%d)", m.Name, i)
			_, node, err := crashPut(context.Background(), testClient, m.ClientURL, key, value)
			if err != nil {
				t.Fatalf("%s: %v", m.Name, err)
			}
			acked[key] = crashAck{Value: value, Index: node.ModifiedIndex}
		}
	}
	for _, m := range ms {
		checkAcked(t, m, "/cluster", acked)
	}
	// A plain (serializable) read on a follower catches up without quorum too.
	for _, m := range ms {
		if !poll(10*time.Second, func() bool {
			st, _, body := m.do(t, "GET", "/v2/keys/cluster/n3-4", nil)
			return st == http.StatusOK && strings.Contains(string(body), `"value":"written on n3 (2)"`)
		}) {
			t.Errorf("%s: serializable GET never saw the last write", m.Name)
		}
	}

	// Every member knows every member, by name, with the client URLs each published.
	for _, m := range ms {
		var got []string
		if !poll(10*time.Second, func() bool {
			got = got[:0]
			for _, mi := range listMembers(t, m) {
				got = append(got, fmt.Sprintf("%s %v %v", mi.Name, mi.PeerURLs, mi.ClientURLs))
			}
			sort.Strings(got)
			return len(got) == 3 && !strings.Contains(strings.Join(got, ","), "[]")
		}) {
			t.Fatalf("%s: /v2/members never listed the three members with client URLs: %q", m.Name, got)
		}
		for i, o := range ms {
			want := fmt.Sprintf("%s [%s] [%s]", o.Name, o.PeerURL, o.ClientURL)
			if got[i] != want {
				t.Errorf("%s: member %d is %q, want %q", m.Name, i, got[i], want)
			}
		}
		st, _, body := m.do(t, "GET", "/v2/machines", nil)
		urls := clientURLs(ms)
		sort.Strings(urls)
		want := strings.Join(urls, ", ")
		if st != http.StatusOK || string(body) != want {
			t.Errorf("%s: /v2/machines: %d %q, want %q", m.Name, st, body, want)
		}
	}

	leader := agreedLeader(t, ms, "", 10*time.Second)
	for _, m := range ms {
		st, _, body := m.do(t, "GET", "/v2/stats/leader", nil)
		if m.Name != leader.Name {
			if st != http.StatusForbidden || string(body) != `{"message":"not current leader"}` {
				t.Errorf("%s (follower): /v2/stats/leader: %d %s", m.Name, st, body)
			}
			continue
		}
		var ls struct {
			Leader    string `json:"leader"`
			Followers map[string]struct {
				Counts struct {
					Success uint64 `json:"success"`
				} `json:"counts"`
			} `json:"followers"`
		}
		if st != http.StatusOK || json.Unmarshal(body, &ls) != nil || ls.Leader != leader.ID || len(ls.Followers) != 2 {
			t.Errorf("%s (leader): /v2/stats/leader: %d %s", m.Name, st, body)
		}
		if _, self := ls.Followers[leader.ID]; self {
			t.Errorf("the leader lists itself as a follower: %s", body)
		}
	}

	// etcdctl: member list marks the leader; cluster-health asks every member.
	out, err := etcdctl(t, clientURLs(ms[:1]), "member", "list")
	if err != nil {
		t.Fatalf("etcdctl member list: %v\n%s", err, out)
	}
	for _, m := range ms {
		line := regexp.MustCompile(`(?m)^[0-9a-f]+: name=` + m.Name + ` peerURLs=` + regexp.QuoteMeta(m.PeerURL) +
			` clientURLs=` + regexp.QuoteMeta(m.ClientURL) + ` isLeader=(true|false)$`).FindStringSubmatch(out)
		if line == nil {
			t.Errorf("etcdctl member list has no line for %s:\n%s", m.Name, out)
		} else if (line[1] == "true") != (m.Name == leader.Name) {
			t.Errorf("etcdctl member list: %s isLeader=%s, leader is %s", m.Name, line[1], leader.Name)
		}
	}
	out, err = etcdctl(t, clientURLs(ms[1:2]), "cluster-health")
	if err != nil || !strings.Contains(out, "cluster is healthy") || strings.Count(out, "is healthy: got healthy result from") != 3 {
		t.Errorf("etcdctl cluster-health: %v\n%s", err, out)
	}
	out, err = etcdctl(t, clientURLs(ms), "get", "/cluster/n1-0")
	if err != nil || strings.TrimSpace(out) != "written on n1 (0)" {
		t.Errorf("etcdctl get: %v\n%s", err, out)
	}

	// The peer site hands what is not /raft to the next handler: here none, Caddy's empty 200.
	resp, err := testClient.Get(ms[0].PeerURL + "/elsewhere")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("peer site, other path: %d", resp.StatusCode)
	}
}

// TestClusterMemberItsPeersCannotDial runs a member whose peer URL its peers cannot dial
// (nothing listens there: its peer site is on another port), as behind a one-way firewall or
// after a member update to a wrong URL: as with etcd, it takes part all the same, because its
// peers send to it over the streams it opens to them. It is written to and read from; down
// through more than snapshot_count writes, it catches up by a snapshot sent in answer to its
// poll for one (etcd sends snapshots to the peer URL only); and it elects a leader with one
// other member once the leader is killed.
func TestClusterMemberItsPeersCannotDial(t *testing.T) {
	c := &testCluster{t: t, snapshotCount: 20}
	for i := 1; i <= 3; i++ {
		c.members = append(c.members, c.newTestMember(fmt.Sprintf("n%d", i)))
	}
	n3 := c.members[2]
	n3.PeerSite, n3.PeerURL = n3.PeerURL, fmt.Sprintf("http://127.0.0.1:%d", freePort(t))
	c.launch()

	acked := make(map[string]crashAck)
	write := func(ms []*testMember, round int) {
		t.Helper()
		for _, m := range ms {
			for j := range 5 {
				key := fmt.Sprintf("/oneway/%d-%s-%d", round, m.Name, j)
				_, node, err := crashPut(context.Background(), testClient, m.ClientURL, key, key)
				if err != nil {
					t.Fatalf("%s: %v", m.Name, err)
				}
				acked[key] = crashAck{Value: key, Index: node.ModifiedIndex}
			}
		}
		checkAckedEverywhere(t, ms, "/oneway", acked)
	}
	// said reports whether n1 or n2 logged what.
	said := func(what string) bool {
		t.Helper()
		for _, m := range c.members[:2] {
			lines, err := logLinesSince(m.proc, 0)
			if err != nil {
				t.Fatal(err)
			}
			if slices.ContainsFunc(lines, func(l string) bool { return strings.Contains(l, what) }) {
				return true
			}
		}
		return false
	}
	write(c.members, 0)
	if !said("over the streams it opened to this member") {
		t.Error("neither n1 nor n2 said it sends to n3 over n3's streams")
	}

	// n3 down through five times snapshot_count writes: the log it needs is gone.
	n3.kill9()
	for round := 1; round <= 10; round++ {
		write(c.members[:2], round)
	}
	n3.restart(t)
	checkAckedEverywhere(t, c.members, "/oneway", acked)
	if !said("snapshot sent in answer to the peer's poll") {
		t.Error("n3 caught up, but not by a snapshot sent in answer to its poll")
	}

	// Kill the leader (n1 when n3 leads): n3 and the member left elect a leader and go on.
	leader := agreedLeader(t, c.members, "", 10*time.Second)
	victim := c.byName(leader.Name)
	if victim == n3 {
		victim = c.members[0]
	}
	victim.kill9()
	var left []*testMember
	for _, m := range c.members {
		if m != victim {
			left = append(left, m)
		}
	}
	agreedLeader(t, left, victim.Name, 20*time.Second)
	write(left, 11)
}

// writeLoad is writers putting keys into a cluster concurrently, each key written once, so
// that every acknowledged write stays the latest value of its key. It keeps what the
// members acknowledged and every request that was not answered 2xx.
type writeLoad struct {
	dir    string
	client *http.Client
	start  time.Time
	// pick names the member writer w sends to; try counts the members it
	// already found down (a refused connection) for the write at hand.
	pick func(w, try int) *testMember

	stopping atomic.Bool
	cancel   context.CancelFunc // ends requests in flight: only when the test gives up
	wg       sync.WaitGroup
	nAcked   atomic.Int64

	mu       sync.Mutex
	acked    map[string]crashAck
	failures []string
}

// startWriteLoad starts writers under dir. It stops them when the test ends, if stop was not
// called before.
func startWriteLoad(t *testing.T, dir string, writers int, pick func(w, try int) *testMember) *writeLoad {
	ctx, cancel := context.WithCancel(context.Background())
	l := &writeLoad{
		dir:    dir,
		client: crashClient(writers),
		start:  time.Now(),
		pick:   pick,
		cancel: cancel,
		acked:  make(map[string]crashAck),
	}
	t.Cleanup(func() {
		l.cancel()
		l.stop()
	})
	for w := range writers {
		l.wg.Go(func() { l.write(ctx, w) })
	}
	return l
}

func (l *writeLoad) write(ctx context.Context, w int) {
	for seq := 0; !l.stopping.Load() && ctx.Err() == nil; seq++ {
		key := fmt.Sprintf("%s/w%02d-%06d", l.dir, w, seq)
		for try := 0; ctx.Err() == nil; try++ {
			m := l.pick(w, try)
			value := fmt.Sprintf("%d/%d via %s", w, seq, m.Name)
			sent := time.Now()
			rctx, rcancel := context.WithTimeout(ctx, 15*time.Second)
			status, node, err := crashPut(rctx, l.client, m.ClientURL, key, value)
			rcancel()
			if err == nil {
				l.mu.Lock()
				l.acked[key] = crashAck{Value: value, Index: node.ModifiedIndex}
				l.mu.Unlock()
				l.nAcked.Add(1)
				break
			}
			if ctx.Err() != nil {
				return // the test gave up: not an answer of the cluster's
			}
			l.mu.Lock()
			l.failures = append(l.failures, fmt.Sprintf("PUT %s%s sent at +%v: status %d after %v: %v",
				m.Name, key, sent.Sub(l.start).Round(time.Millisecond), status,
				time.Since(sent).Round(time.Millisecond), err))
			l.mu.Unlock()
			if !linNeverSent(err) {
				// Indeterminate (cut by a kill, timed out in an election,
				// refused by the server): it may exist, so the key is not
				// written again.
				break
			}
			// Refused connection: nothing was sent, the member is down;
			// the same write goes to another member.
		}
	}
}

// stop lets every writer finish the request it has in flight, then returns the writes
// acknowledged and the requests that failed.
func (l *writeLoad) stop() (map[string]crashAck, []string) {
	l.stopping.Store(true)
	l.wg.Wait()
	l.client.CloseIdleConnections()
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.acked, l.failures
}

// waitAcks waits until n writes are acknowledged in all.
func (l *writeLoad) waitAcks(t *testing.T, n int64, what string) {
	t.Helper()
	if !poll(30*time.Second, func() bool { return l.nAcked.Load() >= n }) {
		l.cancel()
		t.Fatalf("%s: only %d of %d writes acknowledged", what, l.nAcked.Load(), n)
	}
}

// since is how long ago the load started, for messages that put events on the writers'
// timeline.
func (l *writeLoad) since() time.Duration {
	return time.Since(l.start).Round(time.Millisecond)
}

// plainIndex reads X-Etcd-Index from a serializable GET of / on m: the store index of what m
// itself has applied. ok is false when m does not answer.
func plainIndex(m *testMember) (uint64, bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	st, h, _, err := m.tryDo(ctx, "GET", "/v2/keys/", nil)
	if err != nil || st != http.StatusOK {
		return 0, false
	}
	idx, err := strconv.ParseUint(h.Get("X-Etcd-Index"), 10, 64)
	return idx, err == nil
}

// waitCaughtUp waits until m has applied the store up to index, as its own (not quorum)
// reads show.
func waitCaughtUp(t *testing.T, m *testMember, index uint64, timeout time.Duration) {
	t.Helper()
	var got uint64
	if !poll(timeout, func() bool {
		got, _ = plainIndex(m)
		return got >= index
	}) {
		t.Fatalf("%s never caught up: store index %d, want %d, after %v", m.Name, got, index, timeout)
	}
}

// logSize is the length of p's log now, where raftLogSince can start.
func logSize(p *proc) int64 {
	fi, err := os.Stat(p.LogPath)
	if err != nil {
		return 0
	}
	return fi.Size()
}

// raftLogSince returns the Raft library's lines (elections, votes, leader changes) that p
// logged from offset on, n at most: what explains a slow election.
func raftLogSince(p *proc, offset int64, n int) string {
	lines, err := logLinesSince(p, offset)
	if err != nil {
		return err.Error()
	}
	var out []string
	for _, line := range lines {
		if strings.Contains(line, `"raftkv.raft"`) || strings.Contains(line, `"leader changed"`) || strings.Contains(line, `"leader lost"`) {
			if out = append(out, line); len(out) == n {
				break
			}
		}
	}
	return strings.Join(out, "\n")
}

// logLinesSince returns the lines p logged from offset on.
func logLinesSince(p *proc, offset int64) ([]string, error) {
	b, err := os.ReadFile(p.LogPath)
	if err != nil {
		return nil, err
	}
	return strings.Split(string(b[min(offset, int64(len(b))):]), "\n"), nil
}

// becameLeaderAt returns the time of the last "became leader" line the Raft library of p
// logged from offset on.
func becameLeaderAt(p *proc, offset int64) (time.Time, bool) {
	lines, err := logLinesSince(p, offset)
	if err != nil {
		return time.Time{}, false
	}
	var at time.Time
	for _, line := range lines {
		var e struct {
			TS     float64 `json:"ts"`
			Logger string  `json:"logger"`
			Msg    string  `json:"msg"`
		}
		if !strings.Contains(line, "became leader") || json.Unmarshal([]byte(line), &e) != nil ||
			e.Logger != "raftkv.raft" || !strings.Contains(e.Msg, " became leader at term ") {
			continue
		}
		sec, frac := math.Modf(e.TS)
		at = time.Unix(int64(sec), int64(frac*1e9))
	}
	return at, !at.IsZero()
}

// checkAckedEverywhere checks every acknowledged write on each of ms twice: with a quorum
// read, and with a plain read once the member has applied everything any quorum read saw.
func checkAckedEverywhere(t *testing.T, ms []*testMember, dir string, acked map[string]crashAck) {
	t.Helper()
	var target, highest uint64
	for _, a := range acked {
		highest = max(highest, a.Index)
	}
	for _, m := range ms {
		checkAcked(t, m, dir, acked)
		target = max(target, etcdIndex(t, m))
	}
	for _, m := range ms {
		waitCaughtUp(t, m, target, 20*time.Second)
		crashVerifyAcked(t, testClient, m.ClientURL, dir, acked, highest)
	}
}

// TestClusterLeaderKilledUnderWrites kills the leader with SIGKILL three times in a row while
// 16 clients write to the members that are up: each time the survivors elect a new leader
// within two election timeouts, the killed member is restarted and catches up, and the next
// kill hits the leader of the moment. At the end every acknowledged write is on every member.
func TestClusterLeaderKilledUnderWrites(t *testing.T) {
	const (
		dir     = "/kill"
		writers = 16
		kills   = 3
	)
	c := startCluster(t, 3, nil)
	ms := c.members
	down := make([]atomic.Bool, len(ms))
	// Each writer has a home member, the leader's too: what a killed leader
	// acknowledged before dying must survive. A writer whose member is down
	// moves to the next one up.
	load := startWriteLoad(t, dir, writers, func(w, try int) *testMember {
		for i := range ms {
			if j := (w + try + i) % len(ms); !down[j].Load() {
				return ms[j]
			}
		}
		return ms[(w+try)%len(ms)]
	})
	load.waitAcks(t, 100, "before the first kill")

	cur := agreedLeader(t, ms, "", 10*time.Second)
	var elected []string
	for kill := 1; kill <= kills; kill++ {
		victim := c.byName(cur.Name)
		vi := slices.Index(ms, victim)
		var survivors []*testMember
		for _, m := range ms {
			if m != victim {
				survivors = append(survivors, m)
			}
		}
		logFrom := make([]int64, len(survivors))
		for i, m := range survivors {
			logFrom[i] = logSize(m.proc)
		}
		down[vi].Store(true)
		killed := time.Now()
		victim.kill9()
		// Poll for the survivors' agreement on a new leader.
		var (
			agreed time.Time
			next   memberInfo
		)
		if !poll(10*clusterElectionTimeout, func() bool {
			a, okA := leaderOf(survivors[0])
			b, okB := leaderOf(survivors[1])
			if okA && okB && a.ID == b.ID && a.ID != cur.ID {
				agreed, next = time.Now(), a
				return true
			}
			return false
		}) {
			t.Fatalf("kill %d: no new leader among %v within %v of killing %s", kill, names(survivors), 10*clusterElectionTimeout, cur.Name)
		}
		// The election's moment is the new leader's own "became leader" line:
		// the agreement seen by polling comes later by the polls' interval and
		// their answers' time under the write load.
		took := agreed.Sub(killed)
		for i, m := range survivors {
			if m.Name == next.Name {
				if at, ok := becameLeaderAt(m.proc, logFrom[i]); ok && at.Before(agreed) {
					took = at.Sub(killed)
				}
			}
		}
		t.Logf("kill %d at +%v: leader %s killed; %s elected after %v (agreement polled after %v)", kill, load.since(), cur.Name, next.Name,
			took.Round(time.Millisecond), agreed.Sub(killed).Round(time.Millisecond))
		if took > 2*clusterElectionTimeout {
			t.Errorf("kill %d: new leader after %v, more than two election timeouts (%v)", kill, took, 2*clusterElectionTimeout)
			for i, m := range survivors {
				t.Logf("%s's Raft log from the kill to the agreement:\n%s", m.Name, raftLogSince(m.proc, logFrom[i], 40))
			}
		}
		elected = append(elected, next.Name)
		load.waitAcks(t, load.nAcked.Load()+100, fmt.Sprintf("kill %d, %s down", kill, victim.Name))

		victim.restart(t)
		// Rejoined: it follows the leader the others agree on and has
		// applied what that leader had committed when it came back.
		cur = agreedLeader(t, ms, "", 15*time.Second)
		if cur.ID != next.ID {
			// With PreVote and CheckQuorum a member coming back does not
			// unseat a leader that is heard from; the next kill would not
			// hit the leader this one elected.
			t.Errorf("kill %d: leadership moved from %s to %s when %s came back", kill, next.Name, cur.Name, victim.Name)
		}
		waitCaughtUp(t, victim, etcdIndex(t, c.byName(cur.Name)), 20*time.Second)
		down[vi].Store(false)
		t.Logf("kill %d at +%v: %s back and caught up", kill, load.since(), victim.Name)
		load.waitAcks(t, load.nAcked.Load()+50, fmt.Sprintf("kill %d, %s back", kill, victim.Name))
	}
	acked, failures := load.stop()
	t.Logf("leaders elected: %v; %d writes acknowledged, %d not (in flight at a kill, or waiting out an election)",
		elected, len(acked), len(failures))
	checkAckedEverywhere(t, ms, dir, acked)
}

// TestClusterMemberDownCatchesUpBySnapshot keeps a follower down while the others apply
// many times snapshot_count writes under load, so the leader's log no longer reaches back to
// it: it comes back by a snapshot streamed from the leader, installed while the writes go on,
// and ends up holding every acknowledged write.
func TestClusterMemberDownCatchesUpBySnapshot(t *testing.T) {
	const (
		dir           = "/snap"
		writers       = 8
		snapshotCount = 50 // the leader keeps as many entries behind each snapshot
	)
	c := (&testCluster{t: t, snapshotCount: snapshotCount}).start(3)
	ms := c.members
	// A few large values, so the snapshot is more than a few pages.
	for i := range 64 {
		if st, _, body := ms[i%3].do(t, "PUT", fmt.Sprintf("/v2/keys%s/big/%02d", dir, i), url.Values{"value": {strings.Repeat("x", 16<<10)}}); st != http.StatusCreated {
			t.Fatalf("PUT %d to %s: %d %s", i, ms[i%3].Name, st, body)
		}
	}
	leader := agreedLeader(t, ms, "", 10*time.Second)
	var victim *testMember
	for _, m := range ms {
		if m.Name != leader.Name {
			victim = m
			break
		}
	}
	var down atomic.Bool
	load := startWriteLoad(t, dir, writers, func(w, try int) *testMember {
		m := ms[(w+try)%len(ms)]
		if m == victim && down.Load() {
			m = ms[(w+try+1)%len(ms)]
		}
		return m
	})
	load.waitAcks(t, 50, "before the follower goes down")

	down.Store(true)
	victim.kill9()
	from := load.nAcked.Load()
	load.waitAcks(t, from+int64(10*snapshotCount), victim.Name+" down")
	logFrom := logSize(victim.proc)
	victim.restart(t)
	waitCaughtUp(t, victim, etcdIndex(t, c.byName(leader.Name)), 30*time.Second)
	down.Store(false)
	load.waitAcks(t, load.nAcked.Load()+100, victim.Name+" back")
	acked, failures := load.stop()

	lines, err := logLinesSince(victim.proc, logFrom)
	if err != nil {
		t.Fatal(err)
	}
	var received, installed int
	for _, line := range lines {
		switch {
		case strings.Contains(line, `"snapshot received"`):
			received++
		case strings.Contains(line, `"snapshot installed"`):
			installed++
			t.Logf("%s: %s", victim.Name, line)
		}
	}
	if received == 0 || installed == 0 {
		t.Fatalf("%s caught up without a snapshot (%d received, %d installed):\n%s", victim.Name, received, installed, raftLogSince(victim.proc, logFrom, 40))
	}
	if now := agreedLeader(t, ms, "", 10*time.Second); now.ID != leader.ID {
		t.Errorf("leadership moved from %s to %s while %s caught up", leader.Name, now.Name, victim.Name)
	}
	t.Logf("%d writes acknowledged, %d not; %s installed %d snapshots", len(acked), len(failures), victim.Name, installed)
	checkAckedEverywhere(t, ms, dir, acked)
	// The installed file is member.db; none is left under a received name.
	if !poll(10*time.Second, func() bool {
		left, _ := filepath.Glob(filepath.Join(victim.DataDir, "snap.tmp*"))
		return len(left) == 0
	}) {
		left, _ := filepath.Glob(filepath.Join(victim.DataDir, "snap.tmp*"))
		t.Errorf("received snapshot files left in %s: %v", victim.DataDir, left)
	}
}

// TestClusterMembershipChanges adds a fourth member with etcdctl, starts it against the
// running cluster (initial_cluster_state existing) and watches it catch up, then removes a
// member, with etcd's answers to the requests around it.
func TestClusterMembershipChanges(t *testing.T) {
	c := startCluster(t, 3, nil)
	ms := c.members
	for i := range 20 {
		if st, _, body := ms[i%3].do(t, "PUT", fmt.Sprintf("/v2/keys/before/%02d", i), url.Values{"value": {"v"}}); st != http.StatusCreated {
			t.Fatalf("PUT: %d %s", st, body)
		}
	}

	n4 := c.newTestMember("n4")
	// etcd's strict reconfiguration check refuses an addition until the
	// member asked has reached every member for 5 s (a 500, which etcdctl
	// reports as "has no leader" from each endpoint); a refusal changes
	// nothing, so etcdctl is run again until it is taken.
	var out string
	var err error
	if !poll(30*time.Second, func() bool {
		out, err = etcdctl(t, clientURLs(ms), "member", "add", "n4", n4.PeerURL)
		return err == nil
	}) {
		t.Fatalf("etcdctl member add: %v\n%s", err, out)
	}
	idm := regexp.MustCompile(`Added member named n4 with ID ([0-9a-f]+) to cluster`).FindStringSubmatch(out)
	if idm == nil || !strings.Contains(out, `ETCD_INITIAL_CLUSTER_STATE="existing"`) {
		t.Fatalf("etcdctl member add:\n%s", out)
	}
	n4ID := idm[1]

	// etcd's answers around an add: the same peer URL again fails the
	// strict check first (no member reaches n4 yet), with a bare 500;
	// once n4 runs, it is a conflict (below).
	body := `{"peerURLs":["` + n4.PeerURL + `"]}`
	if st, b := postJSON(t, ms[1], "POST", "/v2/members", body); st != http.StatusInternalServerError || b != `{"message":"Internal Server Error"}` {
		t.Errorf("POST the same peer URL again while n4 is down: %d %s", st, b)
	}
	// While n4 has not started, no member reaches it: the strict check
	// refuses another addition, as etcd does, with a bare 500.
	n5 := c.newTestMember("n5")
	if !poll(10*time.Second, func() bool { return len(listMembers(t, ms[2])) == 4 }) {
		t.Fatalf("%s never listed n4: %+v", ms[2].Name, listMembers(t, ms[2]))
	}
	if st, b := postJSON(t, ms[2], "POST", "/v2/members", `{"peerURLs":["`+n5.PeerURL+`"]}`); st != http.StatusInternalServerError || b != `{"message":"Internal Server Error"}` {
		t.Errorf("POST /v2/members while n4 is added but down: %d %s, want etcd's 500", st, b)
	}
	if out, err := etcdctl(t, clientURLs(ms), "member", "add", "n5", n5.PeerURL); err == nil || !strings.Contains(out, "has no leader") {
		t.Errorf("etcdctl member add while n4 is added but down: %v\n%s", err, out)
	}

	c.members = append(c.members, n4)
	c.writeCaddyfile(n4, c.members, "existing")
	n4.spawn(t)
	if err := n4.waitHealthy(30 * time.Second); err != nil {
		t.Fatalf("n4 did not become healthy: %v", err)
	}
	// The strict check passes once every member was reached for 5 s.
	var st int
	var b string
	if !poll(20*time.Second, func() bool {
		st, b = postJSON(t, ms[1], "POST", "/v2/members", body)
		if st == http.StatusCreated {
			t.Fatalf("the same peer URL was added again: %s", b)
		}
		return st == http.StatusConflict
	}) || b != `{"message":"membership: peerURL exists"}` {
		t.Errorf("POST the same peer URL again once n4 runs: %d %s", st, b)
	}
	// n4 has what was written before it joined, and takes new writes.
	if got := quorumKeys(t, n4, "/before"); len(got) != 20 {
		t.Errorf("n4 has %d of the 20 keys written before it joined", len(got))
	}
	if st, _, b := n4.do(t, "PUT", "/v2/keys/after/n4", url.Values{"value": {"from n4"}}); st != http.StatusCreated {
		t.Fatalf("PUT on n4: %d %s", st, b)
	}
	for _, m := range ms {
		if got := quorumKeys(t, m, "/after"); got["/after/n4"].Value != "from n4" {
			t.Errorf("%s does not have n4's write: %v", m.Name, got)
		}
	}
	if !poll(10*time.Second, func() bool {
		for _, mi := range listMembers(t, ms[0]) {
			if mi.ID == n4ID {
				return mi.Name == "n4" && slices.Equal(mi.ClientURLs, []string{n4.ClientURL})
			}
		}
		return false
	}) {
		t.Errorf("n4 never published its name and client URL: %+v", listMembers(t, ms[0]))
	}

	// Remove n3 with etcdctl; etcd's answers after a removal.
	var n3ID string
	for _, mi := range listMembers(t, ms[0]) {
		if mi.Name == "n3" {
			n3ID = mi.ID
		}
	}
	out, err = etcdctl(t, clientURLs(ms[:2]), "member", "remove", n3ID)
	if err != nil || !strings.Contains(out, "Removed member "+n3ID+" from cluster") {
		t.Fatalf("etcdctl member remove %s: %v\n%s", n3ID, err, out)
	}
	// The removed member's admin API tells it stopped: no leader any more, and the
	// store index it reached.
	var n3st adminStatus
	if !poll(10*time.Second, func() bool {
		var ok bool
		n3st, ok = adminStatusOf(ms[2].proc)
		return ok && !n3st.Running
	}) {
		t.Errorf("n3's admin status after its removal: %+v", n3st)
	} else if n3st.Leader != "" || n3st.IsLeader || n3st.LeaderSince != nil || n3st.EtcdIndex == 0 || n3st.Ready {
		t.Errorf("n3's admin status after its removal: %+v, want no leader, no leader_since, its last etcd_index", n3st)
	}
	remaining := []*testMember{ms[0], ms[1], n4}
	for _, m := range remaining {
		var got []string
		if !poll(10*time.Second, func() bool {
			got = got[:0]
			for _, mi := range listMembers(t, m) {
				got = append(got, mi.Name)
			}
			sort.Strings(got)
			return slices.Equal(got, []string{"n1", "n2", "n4"})
		}) {
			t.Errorf("%s: members after removing n3: %v", m.Name, got)
		}
	}
	cases := []struct {
		method, path, body string
		status             int
		want               string
	}{
		{"DELETE", "/v2/members/" + n3ID, "", http.StatusGone, `{"message":"Member permanently removed: ` + n3ID + `"}`},
		{"PUT", "/v2/members/" + n3ID, `{"peerURLs":["http://127.0.0.1:1"]}`, http.StatusInternalServerError, `{"message":"Internal Server Error"}`},
		{"DELETE", "/v2/members/123abc", "", http.StatusNotFound, `{"message":"No such member: 123abc"}`},
		{"PUT", "/v2/members/123abc", `{"peerURLs":["http://127.0.0.1:1"]}`, http.StatusNotFound, `{"message":"No such member: 123abc"}`},
		// etcd looks for the member first: an unknown or removed one with a peer URL in use
		// is still 404 or 500, not 409.
		{"PUT", "/v2/members/123abc", `{"peerURLs":["` + ms[0].PeerURL + `"]}`, http.StatusNotFound, `{"message":"No such member: 123abc"}`},
		{"PUT", "/v2/members/" + n3ID, `{"peerURLs":["` + ms[0].PeerURL + `"]}`, http.StatusInternalServerError, `{"message":"Internal Server Error"}`},
		{"PUT", "/v2/members/" + n4ID, `{"peerURLs":["` + ms[0].PeerURL + `"]}`, http.StatusConflict, `{"message":"membership: peerURL exists"}`},
		// Updating a member to the peer URLs it has is a no-op that succeeds.
		{"PUT", "/v2/members/" + n4ID, `{"peerURLs":["` + n4.PeerURL + `"]}`, http.StatusNoContent, ""},
	}
	for _, tc := range cases {
		if st, b := postJSON(t, ms[0], tc.method, tc.path, tc.body); st != tc.status || b != tc.want {
			t.Errorf("%s %s: %d %q, want %d %q", tc.method, tc.path, st, b, tc.status, tc.want)
		}
	}
	// The cluster of three left still commits.
	for _, m := range remaining {
		if st, _, b := m.do(t, "PUT", "/v2/keys/after/"+m.Name, url.Values{"value": {"x"}}); st/100 != 2 {
			t.Errorf("PUT on %s after the removal: %d %s", m.Name, st, b)
		}
	}
	out, err = etcdctl(t, clientURLs(remaining), "cluster-health")
	if err != nil || !strings.Contains(out, "cluster is healthy") || strings.Count(out, "is healthy: got healthy result from") != 3 {
		t.Errorf("etcdctl cluster-health after the changes: %v\n%s", err, out)
	}
}

// TestClusterMemberReplacedUnderWriteLoad replaces a member while 8 clients write through two
// members that stay: a fourth member is added with POST /v2/members, started with
// initial_cluster_state existing and waited for until it has caught up, then one of the
// original three is removed with DELETE /v2/members/<id>. No write may fail: every request
// is answered 2xx. At the end the three members left hold every acknowledged write. The
// member removed is a follower, or the leader: asked through another member, the leader
// steps down when it applies its removal and the others elect one; asked itself, it first
// hands leadership over.
func TestClusterMemberReplacedUnderWriteLoad(t *testing.T) {
	t.Run("follower removed", func(t *testing.T) { memberReplacedUnderWriteLoad(t, false, false) })
	t.Run("leader removed through a follower", func(t *testing.T) { memberReplacedUnderWriteLoad(t, true, false) })
	t.Run("leader removes itself", func(t *testing.T) { memberReplacedUnderWriteLoad(t, true, true) })
}

// memberReplacedUnderWriteLoad is one case of TestClusterMemberReplacedUnderWriteLoad: the
// member removed is the leader or a follower, and the DELETE goes to that member itself
// (viaGone) or to one that stays.
func memberReplacedUnderWriteLoad(t *testing.T, removeLeader, viaGone bool) {
	const (
		dir     = "/replace"
		writers = 8
	)
	c := startCluster(t, 3, nil)
	ms := c.members
	leader := agreedLeader(t, ms, "", 10*time.Second)
	var gone *testMember
	var stay []*testMember
	for _, m := range ms {
		if gone == nil && (m.Name == leader.Name) == removeLeader {
			gone = m
		} else {
			stay = append(stay, m)
		}
	}
	t.Logf("leader %s; writing through %v; %s is to be removed", leader.Name, names(stay), gone.Name)
	load := startWriteLoad(t, dir, writers, func(w, try int) *testMember {
		return stay[(w+try)%len(stay)]
	})
	load.waitAcks(t, 100, "three members")

	n4 := c.newTestMember("n4")
	// The strict reconfiguration check answers 500 until stay[0] has
	// reached every member for 5 s; a refusal changes nothing.
	var st int
	var body string
	poll(30*time.Second, func() bool {
		st, body = postJSON(t, stay[0], "POST", "/v2/members", `{"peerURLs":["`+n4.PeerURL+`"]}`)
		return st != http.StatusInternalServerError
	})
	var added memberInfo
	if st != http.StatusCreated || json.Unmarshal([]byte(body), &added) != nil || added.ID == "" {
		t.Fatalf("POST /v2/members: %d %s", st, body)
	}
	t.Logf("+%v: n4 added as %s", load.since(), added.ID)
	c.members = append(c.members, n4)
	c.writeCaddyfile(n4, c.members, "existing")
	n4.spawn(t)
	if err := n4.waitHealthy(30 * time.Second); err != nil {
		t.Fatalf("n4 did not become healthy: %v", err)
	}
	waitCaughtUp(t, n4, etcdIndex(t, stay[0]), 30*time.Second)
	t.Logf("+%v: n4 caught up", load.since())
	load.waitAcks(t, load.nAcked.Load()+100, "four members")

	var goneID string
	for _, mi := range listMembers(t, stay[0]) {
		if mi.Name == gone.Name {
			goneID = mi.ID
		}
	}
	if goneID == "" {
		t.Fatalf("%s is not in %s's member list", gone.Name, stay[0].Name)
	}
	if removeLeader {
		if now, ok := leaderOf(stay[0]); !ok || now.ID != goneID {
			t.Logf("%s no longer leads (%+v, %v): removing it all the same", gone.Name, now, ok)
		}
	}
	via := stay[1]
	if viaGone {
		via = gone
	}
	removing, ackedBefore := load.since(), load.nAcked.Load()
	// The strict check also answers 500 while via has not reached enough
	// members for 5 s: again until it takes it.
	poll(30*time.Second, func() bool {
		st, body = postJSON(t, via, "DELETE", "/v2/members/"+goneID, "")
		return st != http.StatusInternalServerError
	})
	if st != http.StatusNoContent {
		t.Fatalf("DELETE /v2/members/%s (%s): %d %s", goneID, gone.Name, st, body)
	}
	t.Logf("+%v: %s removed (DELETE sent to %s at +%v); %d writes acknowledged meanwhile",
		load.since(), gone.Name, via.Name, removing, load.nAcked.Load()-ackedBefore)

	remaining := []*testMember{stay[0], stay[1], n4}
	want := names(remaining)
	sort.Strings(want)
	for _, m := range remaining {
		var got []string
		if !poll(10*time.Second, func() bool {
			got = got[:0]
			for _, mi := range listMembers(t, m) {
				got = append(got, mi.Name)
			}
			sort.Strings(got)
			return slices.Equal(got, want)
		}) {
			t.Errorf("%s: members after removing %s: %v", m.Name, gone.Name, got)
		}
	}
	now := agreedLeader(t, remaining, goneID, 10*time.Second)
	t.Logf("+%v: %s leads %v", load.since(), now.Name, want)
	load.waitAcks(t, load.nAcked.Load()+100, "after the removal")

	acked, failures := load.stop()
	t.Logf("%d writes acknowledged, %d failed", len(acked), len(failures))
	for i, f := range failures {
		if i == 20 {
			t.Errorf("… and %d more", len(failures)-i)
			break
		}
		t.Errorf("failed write: %s", f)
	}
	checkAckedEverywhere(t, remaining, dir, acked)
}

// postJSON sends a JSON body (or none) to m and returns the status and body.
func postJSON(t *testing.T, m *testMember, method, path, body string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, m.ClientURL+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := testClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

// TestClusterPeersOverMutualTLS runs three members whose peer sites require a client
// certificate from the cluster's CA, which the test makes: the cluster forms and replicates,
// and the peer endpoint refuses a client without a certificate, or with one from another CA.
func TestClusterPeersOverMutualTLS(t *testing.T) {
	pki := newTestPKI(t, "n1", "n2", "n3")
	c := startCluster(t, 3, pki)
	ms := c.members
	acked := make(map[string]crashAck)
	for _, m := range ms {
		key := "/tls/" + m.Name
		_, node, err := crashPut(context.Background(), testClient, m.ClientURL, key, "via "+m.Name)
		if err != nil {
			t.Fatalf("%s: %v", m.Name, err)
		}
		acked[key] = crashAck{Value: "via " + m.Name, Index: node.ModifiedIndex}
	}
	for _, m := range ms {
		checkAcked(t, m, "/tls", acked)
	}
	leader := agreedLeader(t, ms, "", 10*time.Second)
	if leader.PeerURLs[0] != c.byName(leader.Name).PeerURL {
		t.Errorf("leader's peer URLs %v", leader.PeerURLs)
	}

	// The peer endpoint itself: trusted clients get through TLS (and raftkv, which wants
	// its own headers, answers); others fail the handshake.
	peer := ms[0].PeerURL + "/raft"
	other := newTestPKI(t, "intruder")
	for _, tc := range []struct {
		name   string
		certs  []tls.Certificate
		wantOK bool
	}{
		{"no client certificate", nil, false},
		{"certificate from another CA", []tls.Certificate{other.pair(t, "intruder")}, false},
		{"member certificate", []tls.Certificate{pki.pair(t, "n2")}, true},
	} {
		client := &http.Client{
			Timeout: 10 * time.Second,
			Transport: &http.Transport{TLSClientConfig: &tls.Config{
				RootCAs:      pki.pool,
				Certificates: tc.certs,
				MinVersion:   tls.VersionTLS12,
			}},
		}
		resp, err := client.Post(peer, "application/octet-stream", strings.NewReader(""))
		if tc.wantOK {
			if err != nil {
				t.Errorf("%s: %v", tc.name, err)
				continue
			}
			resp.Body.Close()
			// Not a valid batch: raftkv refuses it, but it was raftkv
			// answering, behind TLS.
			if resp.StatusCode/100 == 5 || resp.StatusCode == http.StatusMisdirectedRequest {
				t.Errorf("%s: %d", tc.name, resp.StatusCode)
			}
		} else if err == nil {
			resp.Body.Close()
			t.Errorf("%s: got through: %d", tc.name, resp.StatusCode)
		}
		client.CloseIdleConnections()
	}
}

// TestPeerAllowedCN: raftkv_peer's allowed_cn (etcd's
// --peer-cert-allowed-cn) lets the members in, and refuses a client
// certificate of the same CA with another common name with 403.
func TestPeerAllowedCN(t *testing.T) {
	pki := newTestPKI(t, "n1", "n2", "n3", "rogue")
	c := (&testCluster{t: t, pki: pki, allowedCN: []string{"n1", "n2", "n3"}}).start(3)
	if st, _, body := c.members[0].do(t, "PUT", "/v2/keys/cn", url.Values{"value": {"ok"}}); st != http.StatusCreated {
		t.Fatalf("PUT: %d %s", st, body)
	}
	for _, tc := range []struct {
		cert string
		want int
	}{{"rogue", http.StatusForbidden}, {"n2", http.StatusBadRequest}} {
		client := &http.Client{
			Timeout: 10 * time.Second,
			Transport: &http.Transport{TLSClientConfig: &tls.Config{
				RootCAs:      pki.pool,
				Certificates: []tls.Certificate{pki.pair(t, tc.cert)},
				MinVersion:   tls.VersionTLS12,
			}},
		}
		resp, err := client.Post(c.members[0].PeerURL+"/raft", "application/octet-stream", strings.NewReader(""))
		if err != nil {
			t.Fatalf("%s: %v", tc.cert, err)
		}
		resp.Body.Close()
		client.CloseIdleConnections()
		if (resp.StatusCode == http.StatusForbidden) != (tc.want == http.StatusForbidden) {
			t.Errorf("a peer request with the certificate of %q: %d, want 403 %v", tc.cert, resp.StatusCode, tc.want == http.StatusForbidden)
		}
	}
}

// TestPeerHandlerRoutes: the peer handler takes /raft and the paths under
// it, answering 503 while the member does not run (peers retry), and hands
// every other path to the next handler.
func TestPeerHandlerRoutes(t *testing.T) {
	h := &PeerHandler{member: memberOf(raftkv.NewNode(raftkv.Config{DataDir: t.TempDir()}))}
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		w.WriteHeader(http.StatusTeapot)
		return nil
	})
	for _, tc := range []struct {
		path   string
		status int
	}{
		{"/raft", http.StatusServiceUnavailable},
		{"/raft/snapshot", http.StatusServiceUnavailable},
		{"/raftx", http.StatusTeapot},
		{"/", http.StatusTeapot},
		{"/v2/keys/a", http.StatusTeapot},
	} {
		rec := httptest.NewRecorder()
		if err := h.ServeHTTP(rec, httptest.NewRequest("POST", tc.path, nil), next); err != nil {
			t.Fatalf("%s: %v", tc.path, err)
		}
		if rec.Code != tc.status {
			t.Errorf("POST %s: %d, want %d", tc.path, rec.Code, tc.status)
		}
	}
}

// testPKI is a cluster CA made by the test, with a certificate per member, as PEM files.
type testPKI struct {
	dir    string
	caFile string
	ca     *x509.Certificate
	caKey  *ecdsa.PrivateKey
	pool   *x509.CertPool
}

// srvDomain is the domain whose SRV records the DNS SRV tests serve.
const srvDomain = "etcaddy.test"

// newTestPKI makes a CA and a certificate for each member name, valid for server and client
// authentication on localhost and 127.0.0.1, as the README's openssl commands make them
// (and on srvDomain and *.srvDomain, the DNS SRV tests' domain and peer hosts).
func newTestPKI(t *testing.T, members ...string) *testPKI {
	t.Helper()
	dir := t.TempDir()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "etcaddy test cluster CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	p := &testPKI{dir: dir, caFile: filepath.Join(dir, "ca.pem"), ca: ca, caKey: key, pool: x509.NewCertPool()}
	p.pool.AddCert(ca)
	writePEM(t, p.caFile, "CERTIFICATE", der)
	for i, name := range members {
		mkey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		mt := &x509.Certificate{
			SerialNumber: big.NewInt(int64(i + 2)),
			Subject:      pkix.Name{CommonName: name},
			NotBefore:    time.Now().Add(-time.Hour),
			NotAfter:     time.Now().Add(24 * time.Hour),
			KeyUsage:     x509.KeyUsageDigitalSignature,
			ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
			DNSNames:     []string{"localhost", "*." + srvDomain, srvDomain},
			IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		}
		mder, err := x509.CreateCertificate(rand.Reader, mt, ca, &mkey.PublicKey, key)
		if err != nil {
			t.Fatal(err)
		}
		kder, err := x509.MarshalECPrivateKey(mkey)
		if err != nil {
			t.Fatal(err)
		}
		cert, keyFile := p.memberFiles(name)
		writePEM(t, cert, "CERTIFICATE", mder)
		writePEM(t, keyFile, "EC PRIVATE KEY", kder)
	}
	return p
}

func (p *testPKI) memberFiles(name string) (cert, key string) {
	return filepath.Join(p.dir, name+".pem"), filepath.Join(p.dir, name+"-key.pem")
}

func (p *testPKI) pair(t *testing.T, name string) tls.Certificate {
	t.Helper()
	cert, key := p.memberFiles(name)
	pair, err := tls.LoadX509KeyPair(cert, key)
	if err != nil {
		t.Fatal(err)
	}
	return pair
}

// leaf is member name's certificate.
func (p *testPKI) leaf(t *testing.T, name string) *x509.Certificate {
	t.Helper()
	c, err := x509.ParseCertificate(p.pair(t, name).Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// crl writes a certificate revocation list of the CA revoking certs, and
// returns its file.
func (p *testPKI) crl(t *testing.T, certs ...*x509.Certificate) string {
	t.Helper()
	var entries []x509.RevocationListEntry
	for _, c := range certs {
		entries = append(entries, x509.RevocationListEntry{SerialNumber: c.SerialNumber, RevocationTime: time.Now()})
	}
	der, err := x509.CreateRevocationList(rand.Reader, &x509.RevocationList{
		Number:                    big.NewInt(1),
		ThisUpdate:                time.Now().Add(-time.Minute),
		NextUpdate:                time.Now().Add(time.Hour),
		RevokedCertificateEntries: entries,
	}, p.ca, p.caKey)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "revoked.crl")
	writePEM(t, path, "X509 CRL", der)
	return path
}

func writePEM(t *testing.T, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestGoClientWatchMovesOnWhenItsMemberIsRemoved watches a key through the Go v2 client
// pinned to the leader (EndpointSelectionPrioritizeLeader, after a Sync), removes that member,
// and writes the key through another. The removed member ends its watch at once (cutting
// the connection, as etcd's exit does) and answers 503 from then on; the client takes that
// as a failed endpoint and asks the next one, with the watch's index, so Next returns the
// write instead of hanging on a member that will never see it.
func TestGoClientWatchMovesOnWhenItsMemberIsRemoved(t *testing.T) {
	c := startCluster(t, 3, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	gc, err := client.New(client.Config{
		Endpoints:     clientURLs(c.members),
		Transport:     client.DefaultTransport,
		SelectionMode: client.EndpointSelectionPrioritizeLeader,
	})
	if err != nil {
		t.Fatal(err)
	}
	leaderInfo := agreedLeader(t, c.members, "", 10*time.Second)
	leader := c.byName(leaderInfo.Name)
	if err := gc.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if eps := gc.Endpoints(); !slices.Contains(eps, leader.ClientURL) {
		t.Fatalf("endpoints after Sync: %v", eps)
	}
	kapi := client.NewKeysAPI(gc)
	set, err := kapi.Set(ctx, "/gowatch", "0", nil)
	if err != nil {
		t.Fatal(err)
	}
	type next struct {
		resp *client.Response
		err  error
	}
	got := make(chan next, 1)
	go func() {
		w := kapi.Watcher("/gowatch", &client.WatcherOptions{AfterIndex: set.Node.ModifiedIndex})
		resp, err := w.Next(ctx)
		got <- next{resp, err}
	}()
	var st struct {
		Watchers int `json:"watchers"`
	}
	if !poll(10*time.Second, func() bool {
		_, _, body := leader.do(t, "GET", "/v2/stats/store", nil)
		return json.Unmarshal(body, &st) == nil && st.Watchers == 1
	}) {
		t.Fatalf("the watch never reached the leader %s (watchers %d): the client is not pinned to it", leader.Name, st.Watchers)
	}

	var others []*testMember
	for _, m := range c.members {
		if m != leader {
			others = append(others, m)
		}
	}
	var status int
	var body string
	if !poll(30*time.Second, func() bool {
		status, body = postJSON(t, others[0], "DELETE", "/v2/members/"+leaderInfo.ID, "")
		return status == http.StatusNoContent
	}) {
		t.Fatalf("DELETE /v2/members/%s (the leader): %d %s", leaderInfo.ID, status, body)
	}
	// A write during the election that follows may be refused: the test retries it.
	var b []byte
	if !poll(30*time.Second, func() bool {
		status, _, b = others[0].do(t, "PUT", "/v2/keys/gowatch", url.Values{"value": {"1"}})
		return status == http.StatusOK
	}) {
		t.Fatalf("PUT /gowatch after the removal: %d %s", status, b)
	}
	select {
	case n := <-got:
		if n.err != nil || n.resp.Node == nil || n.resp.Node.Value != "1" {
			t.Fatalf("the watch across its member's removal: %+v %v; want the write", n.resp, n.err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the watch never returned after its member was removed")
	}
}

// TestPythonEtcdFailsOver gives python-etcd every member of a three-member cluster, the
// leader first (the one it talks to), kills that member (kill -9), and has it write and read
// on: the client finds the others through /v2/machines and goes on there once they have
// elected a new leader, as against an etcd cluster. Then a watch on the member it moved to:
// that member is removed from the cluster, which cuts the watch's connection as etcd's exit
// does, and the client must get the event from another member.
func TestPythonEtcdFailsOver(t *testing.T) {
	c := startCluster(t, 3, nil)
	script, err := filepath.Abs(filepath.Join("testdata", "python_etcd_failover.py"))
	if err != nil {
		t.Fatal(err)
	}
	leader := c.byName(agreedLeader(t, c.members, "", 10*time.Second).Name)
	ms := []*testMember{leader}
	for _, m := range c.members {
		if m != leader {
			ms = append(ms, m)
		}
	}
	args := []string{script}
	var urls []string
	for _, m := range ms {
		u, err := url.Parse(m.ClientURL)
		if err != nil {
			t.Fatal(err)
		}
		args = append(args, u.Port())
		urls = append(urls, m.ClientURL)
	}
	slices.Sort(urls)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, pythonBin, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if cmd.ProcessState == nil { // the test failed before the Wait below
			cmd.Process.Kill()
			cmd.Wait()
		}
	}()
	lines := bufio.NewScanner(stdout)
	next := func() string {
		if !lines.Scan() {
			t.Fatalf("python-etcd stopped early (%v); stderr:\n%s", lines.Err(), stderr.String())
		}
		return lines.Text()
	}
	if got := next(); got != "members 3" {
		t.Errorf("got %q, want members 3", got)
	}
	if got, want := next(), "machines "+strings.Join(urls, " "); got != want {
		t.Errorf("got %q, want %q", got, want)
	}
	var port string
	if _, err := fmt.Sscan(strings.TrimPrefix(next(), "connected "), &port); err != nil {
		t.Fatal(err)
	}
	var victim *testMember
	for _, m := range c.members {
		if strings.HasSuffix(m.ClientURL, ":"+port) {
			victim = m
		}
	}
	if victim != leader {
		t.Fatalf("python-etcd talks to port %s, not to the leader %s (%s)", port, leader.Name, leader.ClientURL)
	}
	victim.kill9()
	t.Logf("killed %s, the leader, which python-etcd talked to", victim.Name)
	if _, err := io.WriteString(stdin, "go on\n"); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"after set 2 moved", "read before 1", "read after 2"} {
		if got := next(); got != want {
			t.Errorf("got %q, want %q", got, want)
		}
	}

	// The watch on the member python-etcd moved to; that member is removed (the killed
	// one back first, so that the two left make a quorum).
	line := next()
	if _, err := fmt.Sscan(strings.TrimPrefix(line, "watching "), &port); err != nil {
		t.Fatalf("got %q, want watching PORT", line)
	}
	var watched, other *testMember
	for _, m := range c.members {
		switch {
		case strings.HasSuffix(m.ClientURL, ":"+port):
			watched = m
		case m != victim:
			other = m
		}
	}
	if watched == nil || watched == victim {
		t.Fatalf("python-etcd watches on port %s", port)
	}
	victim.restart(t)
	var watchedID string
	for _, mi := range listMembers(t, other) {
		if mi.Name == watched.Name {
			watchedID = mi.ID
		}
	}
	// The strict reconfiguration check refuses the removal (a 500) until the member that came
	// back has been reached for 5 s, as etcd's does; a refusal changes nothing.
	var st int
	var b string
	if !poll(30*time.Second, func() bool {
		st, b = postJSON(t, other, "DELETE", "/v2/members/"+watchedID, "")
		return st == http.StatusNoContent
	}) {
		t.Fatalf("DELETE /v2/members/%s (%s): %d %s", watchedID, watched.Name, st, b)
	}
	if st, _, b := other.do(t, "PUT", "/v2/keys/py/moved", url.Values{"value": {"3"}}); st != http.StatusCreated {
		t.Fatalf("PUT /py/moved on %s: %d %s", other.Name, st, b)
	}
	for _, want := range []string{"watch set 3 moved", "done"} {
		if got := next(); got != want {
			t.Errorf("got %q, want %q", got, want)
		}
	}
	stdin.Close()
	if err := cmd.Wait(); err != nil {
		t.Errorf("python-etcd: %v; stderr:\n%s", err, stderr.String())
	}
}

// TestClusterMemberWithoutQuorumExitsAtOnce: a member whose peers are gone holds a write
// until its request timeout (5 s + 2 election timeouts); when Caddy is told to exit, it
// answers it at once with etcd's "server stopped" and exits, as etcd does, instead of
// waiting the timeout out (Caddy waits for every response before it stops the member).
func TestClusterMemberWithoutQuorumExitsAtOnce(t *testing.T) {
	c := startCluster(t, 3, nil)
	m := c.members[0]
	c.members[1].kill9()
	c.members[2].kill9()
	type answer struct {
		status int
		body   []byte
		err    error
	}
	answers := make(chan answer, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		status, _, body, err := m.tryDo(ctx, "PUT", "/v2/keys/held", url.Values{"value": {"1"}})
		answers <- answer{status, body, err}
	}()
	select {
	case a := <-answers:
		t.Fatalf("the write ended without a quorum: %d %s %v", a.status, a.body, a.err)
	case <-time.After(2 * clusterElectionTimeout):
		// Held: the member waits for a quorum, and has stepped down if it led.
	}
	start := time.Now()
	// The request would hold Caddy until its timeout, 5 s from now.
	if !m.signal(syscall.SIGTERM, 3*time.Second) {
		t.Fatalf("Caddy still runs %v after SIGTERM; log:\n%s", time.Since(start), m.logTail(30))
	}
	a := <-answers
	if a.err != nil || a.status != http.StatusInternalServerError || !strings.Contains(string(a.body), "etcdserver: server stopped") {
		t.Fatalf("the held write: %d %s %v, want 500 server stopped", a.status, a.body, a.err)
	}
}

// TestClusterPeerSiteReloadsUnderWriteLoad: the leader and a follower reload their configs
// ten times each (each time a changed site beside the others, so Caddy serves every site from
// new servers) while four clients write through the third member, whose writes go to the
// leader and back over the reloaded peer sites. (Its client site is not reloaded: a reload
// can reset a client connection in the kernel, see reloadClassify, which is not what this
// test is about.) The message streams the old peer sites held end, and their senders open new
// ones on the new servers: no write fails, every acknowledged write is on every member, the
// leader stays, and the old servers go away (the goroutine count does not grow with the
// reloads, as it would if each old server kept its streams).
func TestClusterPeerSiteReloadsUnderWriteLoad(t *testing.T) {
	c := startCluster(t, 3, nil)
	l := agreedLeader(t, c.members, "", 10*time.Second)
	leader := c.byName(l.Name)
	var reloaded []*testMember
	var writeTo *testMember
	for _, m := range c.members {
		if m != leader && writeTo == nil {
			writeTo = m
		} else {
			reloaded = append(reloaded, m)
		}
	}
	base := make([]int, len(reloaded))
	for i, m := range reloaded {
		base[i] = watchleakGoroutines(t, testClient, m.AdminURL)
	}
	load := startWriteLoad(t, "/peerreload", 4, func(w, try int) *testMember { return writeTo })
	load.waitAcks(t, 50, "before the reloads")
	extraPort := freePort(t)
	for r := range 10 {
		for _, m := range reloaded {
			cf := reloadCaddyfileText(t, m.proc) + fmt.Sprintf("\nhttp://127.0.0.1:%d {\n\tbind 127.0.0.1\n\trespond \"reload %d\"\n}\n", extraPort, r)
			if status, body, err := reloadLoad(testClient, m.AdminURL, cf); err != nil || status != http.StatusOK {
				t.Fatalf("%s: reload %d: %d %s %v", m.Name, r, status, body, err)
			}
		}
	}
	load.waitAcks(t, load.nAcked.Load()+50, "after the reloads")
	acked, failures := load.stop()
	if len(failures) > 0 {
		t.Fatalf("%d writes failed during the reloads: %v", len(failures), failures)
	}
	checkAckedEverywhere(t, c.members, "/peerreload", acked)
	if now := agreedLeader(t, c.members, "", 10*time.Second); now.ID != l.ID {
		t.Errorf("leadership moved from %s to %s during the reloads", l.Name, now.Name)
	}
	for i, m := range reloaded {
		var n int
		if !poll(10*time.Second, func() bool {
			n = watchleakGoroutines(t, testClient, m.AdminURL)
			return n <= base[i]+10
		}) {
			t.Errorf("%s: %d goroutines after 10 reloads, %d before", m.Name, n, base[i])
		}
	}
	t.Logf("%d writes acknowledged through %s through 20 reloads of %s and %s", len(acked), writeTo.Name, reloaded[0].Name, reloaded[1].Name)

	// A reload that has the peer site refuse a member (a stand-in for a changed client_auth)
	// cuts that member off: its open stream ends with the old config (and a failed probe would
	// cut it too), and the new config refuses the next one.
	cut := reloaded[1]
	if cut == leader {
		cut = reloaded[0]
	}
	memberID := func(m *testMember) string {
		var self struct {
			ID string `json:"id"`
		}
		if st, _, body := m.do(t, "GET", "/v2/stats/self", nil); st != http.StatusOK || json.Unmarshal(body, &self) != nil || self.ID == "" {
			t.Fatalf("%s: /v2/stats/self: %d %s", m.Name, st, body)
		}
		return self.ID
	}
	writerID, cutID := memberID(writeTo), memberID(cut)
	from := logSize(writeTo.proc)
	cf := strings.Replace(reloadCaddyfileText(t, cut.proc), "\traftkv_peer\n",
		"\t@cut header X-Etcaddy-From "+writerID+"\n\troute {\n\t\trespond @cut \"cut off (test)\" 403\n\t\traftkv_peer\n\t}\n", 1)
	if status, body, err := reloadLoad(testClient, cut.AdminURL, cf); err != nil || status != http.StatusOK {
		t.Fatalf("%s: reload cutting %s off: %d %s %v", cut.Name, writeTo.Name, status, body, err)
	}
	if !poll(10*time.Second, func() bool {
		b, err := os.ReadFile(writeTo.LogPath)
		return err == nil && strings.Contains(string(b[min(from, int64(len(b))):]), `"peer unreachable","peer":"`+cutID+`"`)
	}) {
		t.Errorf("%s still reaches %s after a reload of %s's peer site that refuses it", writeTo.Name, cut.Name, cut.Name)
	}
}

// TestClusterLeaderHandsOverOnExit: a leader told to exit (SIGTERM) under a write load hands
// leadership over before its peer site stops answering: Caddy stops its apps in no set order,
// and its servers first, so the hand-over runs on Caddy's "stopping" event, before any app
// stops. The log says it was handed over, and the writes to the others go on.
func TestClusterLeaderHandsOverOnExit(t *testing.T) {
	c := startCluster(t, 3, nil)
	l := agreedLeader(t, c.members, "", 10*time.Second)
	leader := c.byName(l.Name)
	var others []*testMember
	for _, m := range c.members {
		if m != leader {
			others = append(others, m)
		}
	}
	load := startWriteLoad(t, "/handover", 4, func(w, try int) *testMember { return others[(w+try)%2] })
	load.waitAcks(t, 50, "before the exit")
	logStart := logSize(leader.proc)
	leader.stop()
	next := agreedLeader(t, others, l.ID, 10*time.Second)
	load.waitAcks(t, load.nAcked.Load()+50, "after the exit")
	acked, failures := load.stop()
	b, err := os.ReadFile(leader.LogPath)
	if err != nil {
		t.Fatal(err)
	}
	log := string(b[min(logStart, int64(len(b))):])
	if !strings.Contains(log, "transferring leadership") || strings.Contains(log, "transfer on stop failed") ||
		strings.Contains(log, "no leadership transfer") {
		t.Fatalf("the leader's log on exit:\n%s", log)
	}
	if len(failures) > 0 {
		t.Fatalf("%d writes to the members that stay failed: %v", len(failures), failures)
	}
	checkAckedEverywhere(t, others, "/handover", acked)
	t.Logf("%s handed over to %s; %d writes acknowledged", l.Name, next.Name, len(acked))
}

// TestClusterRestartedMemberReadsNoOlderThanItAcknowledged: a member killed right after it
// acknowledged a write (its application of the write may not have reached its disk yet: see
// README, "applying waits for the next append's commit") restarts with the entry in its log
// but not yet known to be committed. Until it has caught up with its cluster it must not
// answer a read as of before that write: with its peers stopped (SIGSTOP) a GET waits, as
// etcd's does until it has published itself, and never says the key is missing; once they
// run again, the key is there.
func TestClusterRestartedMemberReadsNoOlderThanItAcknowledged(t *testing.T) {
	c := startCluster(t, 3, nil)
	for round := range 3 {
		l := agreedLeader(t, c.members, "", 20*time.Second)
		var m *testMember
		var others []*testMember
		for _, o := range c.members {
			if o.Name != l.Name && m == nil {
				m = o
			} else {
				others = append(others, o)
			}
		}
		key := fmt.Sprintf("/v2/keys/acked%d", round)
		if status, _, body := m.do(t, "PUT", key, url.Values{"value": {"v"}}); status != http.StatusCreated {
			t.Fatalf("PUT %s on %s: %d %s", key, m.Name, status, body)
		}
		m.kill9()
		for _, o := range others {
			if err := syscall.Kill(o.Cmd.Process.Pid, syscall.SIGSTOP); err != nil {
				t.Fatal(err)
			}
		}
		resume := func() {
			for _, o := range others {
				_ = syscall.Kill(o.Cmd.Process.Pid, syscall.SIGCONT)
			}
		}
		t.Cleanup(resume)
		m.startProcess(t)
		if !poll(30*time.Second, func() bool {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			_, _, _, err := m.tryDo(ctx, "GET", "/version", nil)
			return err == nil
		}) {
			t.Fatalf("%s did not come back", m.Name)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		status, _, body, err := m.tryDo(ctx, "GET", key, nil)
		cancel()
		if err == nil && status != http.StatusOK {
			t.Fatalf("round %d: %s answered GET %s with its peers stopped: %d %s", round, m.Name, key, status, body)
		}
		resume()
		if status, _, body := m.do(t, "GET", key, nil); status != http.StatusOK {
			t.Fatalf("round %d: GET %s on %s with its peers back: %d %s", round, key, m.Name, status, body)
		}
	}
}

// TestPeerCertificateChecks: raftkv_peer's allowed_hostname (etcd's
// --peer-cert-allowed-hostname) and crl_file (etcd's --peer-crl-file)
// refuse a peer's verified client certificate that is not valid for the
// host name, or that the CRL revokes; allowed_cn and allowed_hostname
// together are refused, as by etcd.
func TestPeerCertificateChecks(t *testing.T) {
	pki := newTestPKI(t, "n1", "rogue")
	leaf := func(name string) *x509.Certificate { return pki.leaf(t, name) }
	n1, rogue := leaf("n1"), leaf("rogue")
	crlFile := pki.crl(t, rogue)
	revoked, err := readCRL(crlFile)
	if err != nil {
		t.Fatal(err)
	}
	req := func(c *x509.Certificate) *http.Request {
		r := httptest.NewRequest("POST", "https://localhost/raft", nil)
		r.TLS = &tls.ConnectionState{PeerCertificates: []*x509.Certificate{c}, VerifiedChains: [][]*x509.Certificate{{c, pki.ca}}}
		return r
	}
	for _, tc := range []struct {
		name string
		h    PeerHandler
		cert *x509.Certificate
		want string
	}{
		{"hostname matches", PeerHandler{AllowedHostname: "localhost"}, n1, ""},
		{"hostname does not", PeerHandler{AllowedHostname: "etcd9.example.net"}, n1, "not valid for the allowed host name"},
		{"not revoked", PeerHandler{revoked: revoked}, n1, ""},
		{"revoked", PeerHandler{revoked: revoked}, rogue, "revoked"},
		{"no certificate", PeerHandler{AllowedHostname: "localhost"}, nil, "no verified client certificate"},
		{"no certificate, a CRL", PeerHandler{revoked: revoked}, nil, ""},
		{"revoked, unverified", PeerHandler{revoked: revoked}, rogue, "revoked"},
		{"unverified, a host name", PeerHandler{AllowedHostname: "localhost"}, n1, "no verified client certificate"},
		{"no checks", PeerHandler{}, nil, ""},
	} {
		r := req(tc.cert)
		if tc.cert == nil {
			r.TLS = nil
		} else if strings.Contains(tc.name, "unverified") {
			r.TLS.VerifiedChains = nil
		}
		if got := tc.h.refusePeer(r); tc.want == "" && got != "" || tc.want != "" && !strings.Contains(got, tc.want) {
			t.Errorf("%s: %q, want %q", tc.name, got, tc.want)
		}
	}
	var parsed PeerHandler
	d := caddyfile.NewTestDispenser("raftkv_peer {\n\tallowed_hostname etcd1.cluster.internal\n\tcrl_file /etc/etcaddy/peers.crl\n}")
	if err := parsed.UnmarshalCaddyfile(d); err != nil || parsed.AllowedHostname != "etcd1.cluster.internal" || parsed.CRLFile != "/etc/etcaddy/peers.crl" {
		t.Errorf("the Caddyfile options: %+v, %v", parsed, err)
	}
	both := PeerHandler{AllowedCN: []string{"n1"}, AllowedHostname: "localhost"}
	if err := both.Provision(caddy.Context{}); err == nil || !strings.Contains(err.Error(), "mutually exclusive") {
		t.Errorf("allowed_cn with allowed_hostname: %v", err)
	}
	empty := PeerHandler{AllowedCN: []string{"n1", ""}}
	if err := empty.Provision(caddy.Context{}); err == nil || !strings.Contains(err.Error(), "empty name") {
		t.Errorf("an empty allowed_cn: %v", err)
	}
	for _, tc := range []struct {
		name string
		ca   *caddytls.ClientAuthentication
		want bool
	}{
		{"no client_auth", nil, false},
		{"mode require", &caddytls.ClientAuthentication{Mode: "require"}, false},
		{"mode request with a CA", &caddytls.ClientAuthentication{Mode: "request", CARaw: []byte(`{"provider":"file"}`)}, false},
		{"require_and_verify", &caddytls.ClientAuthentication{Mode: "require_and_verify", CARaw: []byte(`{"provider":"file"}`)}, true},
		{"verify_if_given", &caddytls.ClientAuthentication{Mode: "verify_if_given"}, true},
		{"the default mode with a CA", &caddytls.ClientAuthentication{CARaw: []byte(`{"provider":"inline"}`)}, true},
	} {
		srv := &caddyhttp.Server{TLSConnPolicies: caddytls.ConnectionPolicies{{ClientAuthentication: tc.ca}}}
		if got := verifiesClients(srv); got != tc.want {
			t.Errorf("verifiesClients, %s: %v, want %v", tc.name, got, tc.want)
		}
	}
	bad := PeerHandler{CRLFile: filepath.Join(t.TempDir(), "missing.crl")}
	if err := bad.Provision(caddy.Context{}); err == nil || !strings.Contains(err.Error(), "crl_file") {
		t.Errorf("a missing CRL file: %v", err)
	}
}

// TestClientCertChecks: the etcd handler's client_cert_allowed_hostname and
// client_crl_file (etcd's --client-cert-allowed-hostname, --client-crl-file)
// on an HTTPS client site whose client_auth verifies certificates when
// given: a valid certificate gets through, a revoked one and a request
// without one get 403.
func TestClientCertChecks(t *testing.T) {
	pki := newTestPKI(t, "n1", "rogue")
	crlFile := pki.crl(t, pki.leaf(t, "rogue"))
	port := freePort(t)
	cert, key := pki.memberFiles("n1")
	cf := fmt.Sprintf("{\n\tadmin 127.0.0.1:{admin_port}\n\tauto_https disable_redirects\n\tskip_install_trust\n\traftkv {\n\t\tdata_dir {data_dir}\n\t}\n}\n\n"+
		"http://127.0.0.1:{client_port} {\n\tetcd\n}\n\n"+
		"https://localhost:%d {\n\tbind 127.0.0.1\n\ttls %s %s {\n\t\tclient_auth {\n\t\t\tmode verify_if_given\n\t\t\ttrust_pool file %s\n\t\t}\n\t}\n"+
		"\tetcd {\n\t\tclient_cert_allowed_hostname localhost\n\t\tclient_crl_file %s\n\t}\n}\n", port, cert, key, pki.caFile, crlFile)
	startEtcaddy(t, etcaddyOpts{Caddyfile: cf})
	for _, tc := range []struct {
		cert string
		want int
	}{{"n1", http.StatusOK}, {"rogue", http.StatusForbidden}, {"", http.StatusForbidden}} {
		tlsCfg := &tls.Config{RootCAs: pki.pool, MinVersion: tls.VersionTLS12}
		if tc.cert != "" {
			tlsCfg.Certificates = []tls.Certificate{pki.pair(t, tc.cert)}
		}
		client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: tlsCfg}}
		resp, err := client.Get(fmt.Sprintf("https://localhost:%d/v2/keys/", port))
		if err != nil {
			t.Fatalf("certificate %q: %v", tc.cert, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		client.CloseIdleConnections()
		if resp.StatusCode != tc.want {
			t.Errorf("certificate %q: %d %s, want %d", tc.cert, resp.StatusCode, body, tc.want)
		}
	}
}
