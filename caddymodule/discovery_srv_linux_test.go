package caddymodule

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/etcaddy/etcaddy/raftkv/dnstest"
)

// srvDNS is the DNS of the processes under a DNS SRV test: a server on port
// 53 (resolv.conf names no port) of a loopback address of its own, and a
// resolv.conf naming it. inNamespace runs a process with that resolv.conf
// over /etc/resolv.conf in a mount namespace of its own, so that its
// resolver asks this server, and nothing else on the machine changes.
type srvDNS struct {
	*dnstest.Server
	resolvConf string
	unshare    string
}

// startSRVDNS starts the server, on 127.53.x.y:53 for random x and y (a
// port below 1024 needs root, as the mount namespaces do: CI runs as root).
func startSRVDNS(t *testing.T) *srvDNS {
	t.Helper()
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		t.Fatalf("unshare (util-linux) runs each process with its own resolv.conf: %v", err)
	}
	var s *dnstest.Server
	for try := 0; s == nil; try++ {
		addr := fmt.Sprintf("127.53.%d.%d:53", 1+rand.IntN(254), 1+rand.IntN(254))
		s, err = dnstest.Listen(addr)
		if err != nil && try == 20 {
			t.Fatalf("a DNS server on port 53 of a loopback address (the tests run as root): %v", err)
		}
	}
	t.Cleanup(s.Close)
	host := strings.TrimSuffix(s.UDPAddr, ":53")
	rc := filepath.Join(t.TempDir(), "resolv.conf")
	if err := os.WriteFile(rc, []byte("nameserver "+host+"\noptions timeout:1 attempts:2\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	d := &srvDNS{Server: s, resolvConf: rc, unshare: unshare}
	// Check the namespace trick itself once, so that its failure reads as
	// what it is.
	out, err := exec.Command(unshare, "-m", "sh", "-c", `mount --bind "$0" /etc/resolv.conf && exec cat /etc/resolv.conf`, rc).CombinedOutput()
	if err != nil || !strings.Contains(string(out), host) {
		t.Fatalf("running a process with its own resolv.conf (unshare -m, mount --bind, as root): %v: %s", err, out)
	}
	return d
}

// inNamespace makes p run in a mount namespace of its own with d's
// resolv.conf. The process keeps its PID: unshare and sh exec it.
func (d *srvDNS) inNamespace(p *proc) {
	p.args = append([]string{"-m", "sh", "-c", `mount --bind "$0" /etc/resolv.conf && exec "$@"`, d.resolvConf, p.path}, p.args...)
	p.path = d.unshare
}

// srvCaddyfile is m's configuration when it bootstraps from the SRV records
// of srvDomain with peers over mutual TLS, as an operator writes it for
// etcd's --discovery-srv; without trustCA it trusts the system's roots
// for its peers (no peer_trusted_ca_file).
func srvCaddyfile(m *testMember, pki *testPKI, token string, trustCA bool) string {
	cert, key := pki.memberFiles(m.Name)
	caLine := "peer_trusted_ca_file " + pki.caFile
	if !trustCA {
		caLine = "# the system's roots"
	}
	return fmt.Sprintf(`{
	admin %s
	auto_https disable_redirects
	skip_install_trust
	raftkv {
		name %s
		data_dir %s
		advertise_client_urls %s
		initial_advertise_peer_urls %s
		initial_cluster_token %s
		discovery_srv %s
		election_timeout %v
		peer_cert_file %s
		peer_key_file %s
		%s
	}
}

%s {
	etcd
}

%s {
	bind 127.0.0.1
	tls %s %s {
		client_auth {
			mode require_and_verify
			trust_pool file %s
		}
	}
	raftkv_peer
}
`, strings.TrimPrefix(m.AdminURL, "http://"), m.Name, m.DataDir, m.ClientURL, m.PeerURL, token, srvDomain,
		clusterElectionTimeout, cert, key, caLine, m.ClientURL, m.PeerURL, cert, key, pki.caFile)
}

// srvEtcd prepares a real etcd 3.4 member that bootstraps from the SRV
// records of srvDomain with the given name, peer URL and token, its peers
// over mutual TLS; launch or spawn starts it.
func srvEtcd(t *testing.T, d *srvDNS, pki *testPKI, name, peerURL, token string) *proc {
	port := peerURL[strings.LastIndex(peerURL, ":")+1:]
	cert, key := pki.memberFiles(name)
	p := etcdProc(t, "etcd "+name, fmt.Sprintf("http://127.0.0.1:%d", freePort(t)),
		"--name", name,
		"--listen-peer-urls", "https://127.0.0.1:"+port,
		"--initial-advertise-peer-urls", peerURL,
		"--initial-cluster-token", token,
		"--discovery-srv", srvDomain,
		"--peer-cert-file", cert,
		"--peer-key-file", key,
		"--peer-trusted-ca-file", pki.caFile,
		"--peer-client-cert-auth")
	d.inNamespace(p)
	return p
}

// srvCluster prepares three members n1..n3 whose https peer URLs are
// n<i>.srvDomain on ports of their own, and serves their
// _etcd-server-ssl records and addresses; nothing runs yet.
func srvCluster(t *testing.T, d *srvDNS, pki *testPKI) *testCluster {
	t.Helper()
	c := &testCluster{t: t, pki: pki}
	var recs []dnstest.SRV
	for i := 1; i <= 3; i++ {
		m := c.newTestMember(fmt.Sprintf("n%d", i))
		port, err := strconv.Atoi(m.PeerURL[strings.LastIndex(m.PeerURL, ":")+1:])
		if err != nil {
			t.Fatal(err)
		}
		host := m.Name + "." + srvDomain
		m.PeerURL = fmt.Sprintf("https://%s:%d", host, port)
		d.SetA(host, "127.0.0.1")
		recs = append(recs, dnstest.SRV{Target: host, Port: uint16(port)})
		c.members = append(c.members, m)
	}
	d.SetSRV("_etcd-server-ssl._tcp."+srvDomain, recs...)
	return c
}

// clusterIDAndMembers reads a member's cluster ID (X-Etcd-Cluster-Id) and
// its member list, by name.
func clusterIDAndMembers(t *testing.T, p *proc) (string, map[string]memberInfo) {
	t.Helper()
	var header http.Header
	var members []memberInfo
	if !poll(20*time.Second, func() bool {
		st, h, body := p.do(t, "GET", "/v2/members", nil)
		if st != http.StatusOK {
			return false
		}
		header = h
		var r struct {
			Members []memberInfo `json:"members"`
		}
		if err := json.Unmarshal(body, &r); err != nil {
			t.Fatalf("%s: GET /v2/members: %v in %s", p.Name, err, body)
		}
		members = r.Members
		for _, m := range members {
			if m.Name == "" || strings.Trim(m.Name, "0123456789") == "" {
				return false // not published yet: etcd's number for it
			}
		}
		return len(members) == 3
	}) {
		t.Fatalf("%s: the members never all published their names: %+v", p.Name, members)
	}
	byName := make(map[string]memberInfo)
	for _, m := range members {
		byName[m.Name] = m
	}
	return header.Get("X-Etcd-Cluster-Id"), byName
}

// TestDiscoverySRVBootstrapsAsEtcdDoes: three etcd 3.4 members bootstrap
// from the SRV records of a domain (_etcd-server-ssl, peers over mutual
// TLS); then three etcaddy members, with the same names, peer URLs, token
// and records, bootstrap the very same cluster: the same member IDs and
// cluster ID. The etcaddy cluster works (a write read on every member,
// etcdctl cluster-health), and a member restarts on its data with the
// records gone.
func TestDiscoverySRVBootstrapsAsEtcdDoes(t *testing.T) {
	d := startSRVDNS(t)
	pki := newTestPKI(t, "n1", "n2", "n3")
	c := srvCluster(t, d, pki)
	const token = "srv-cluster"

	// The reference.
	var etcds []*proc
	for _, m := range c.members {
		e := srvEtcd(t, d, pki, m.Name, m.PeerURL, token)
		e.spawn(t)
		etcds = append(etcds, e)
	}
	for _, e := range etcds {
		if err := e.waitHealthy(30 * time.Second); err != nil {
			t.Fatalf("%s: %v", e.Name, err)
		}
	}
	wantCluster, want := clusterIDAndMembers(t, etcds[0])
	for _, e := range etcds {
		e.stop() // frees the peer ports for etcaddy
	}

	for _, m := range c.members {
		if err := os.WriteFile(m.Caddyfile, []byte(srvCaddyfile(m, pki, token, true)), 0o644); err != nil {
			t.Fatal(err)
		}
		d.inNamespace(m.proc)
		m.spawn(t)
	}
	for _, m := range c.members {
		if err := m.waitHealthy(30 * time.Second); err != nil {
			t.Fatalf("%s: %v", m.Name, err)
		}
	}
	for _, m := range c.members {
		gotCluster, got := clusterIDAndMembers(t, m.proc)
		if gotCluster != wantCluster {
			t.Errorf("%s: cluster ID %s, etcd's %s", m.Name, gotCluster, wantCluster)
		}
		for name, w := range want {
			g := got[name]
			if g.ID != w.ID || !slices.Equal(g.PeerURLs, w.PeerURLs) {
				t.Errorf("%s lists %s as %s %v; etcd as %s %v", m.Name, name, g.ID, g.PeerURLs, w.ID, w.PeerURLs)
			}
		}
	}

	if st, _, body := c.members[0].do(t, "PUT", "/v2/keys/srv", url.Values{"value": {"found"}}); st != http.StatusCreated {
		t.Fatalf("PUT: %d %s", st, body)
	}
	for _, m := range c.members {
		if !poll(10*time.Second, func() bool {
			st, _, body := m.do(t, "GET", "/v2/keys/srv", nil)
			return st == http.StatusOK && strings.Contains(string(body), `"value":"found"`)
		}) {
			t.Errorf("%s never had the write", m.Name)
		}
	}
	if out, err := etcdctl(t, clientURLs(c.members), "cluster-health"); err != nil || !strings.Contains(out, "cluster is healthy") {
		t.Errorf("etcdctl cluster-health: %v\n%s", err, out)
	}

	// A restart reads its data, not the records (gone now).
	d.SetSRV("_etcd-server-ssl._tcp." + srvDomain)
	m := c.members[2]
	m.stop()
	m.start(t)
	if st, _, body := m.do(t, "GET", "/v2/keys/srv?quorum=true", nil); st != http.StatusOK || !strings.Contains(string(body), `"value":"found"`) {
		t.Errorf("%s after its restart: %d %s", m.Name, st, body)
	}
}

// TestDiscoverySRVHTTPRecords: records of _etcd-server (http peers) alone
// bootstrap a cluster; etcd 3.4 reads only _etcd-server-ssl and refuses to
// start on them (README, Differences).
func TestDiscoverySRVHTTPRecords(t *testing.T) {
	d := startSRVDNS(t)
	port := freePort(t)
	host := "solo." + srvDomain
	peerURL := fmt.Sprintf("http://%s:%d", host, port)
	d.SetA(host, "127.0.0.1")
	d.SetSRV("_etcd-server._tcp."+srvDomain, dnstest.SRV{Target: host, Port: uint16(port)})

	e := etcdProc(t, "etcd solo", fmt.Sprintf("http://127.0.0.1:%d", freePort(t)),
		"--name", "solo",
		"--listen-peer-urls", fmt.Sprintf("http://127.0.0.1:%d", port),
		"--initial-advertise-peer-urls", peerURL,
		"--discovery-srv", srvDomain)
	d.inNamespace(e)
	e.spawn(t)
	if !poll(20*time.Second, func() bool { return !e.running() }) {
		t.Fatal("etcd 3.4 started on _etcd-server records alone; README's Differences say it does not")
	}
	if log := e.logTail(20); !strings.Contains(log, "error querying DNS SRV records for _etcd-server-ssl") {
		t.Errorf("etcd's log does not say why it exits:\n%s", log)
	}

	c := &testCluster{t: t}
	m := c.newTestMember("solo")
	m.PeerURL = peerURL
	cf := fmt.Sprintf("{\n\tadmin %s\n\traftkv {\n\t\tname solo\n\t\tdata_dir %s\n\t\tinitial_advertise_peer_urls %s\n\t\tdiscovery_srv %s\n\t}\n}\n\n%s {\n\tetcd\n}\n\nhttp://:%d {\n\tbind 127.0.0.1\n\traftkv_peer\n}\n",
		strings.TrimPrefix(m.AdminURL, "http://"), m.DataDir, peerURL, srvDomain, m.ClientURL, port)
	if err := os.WriteFile(m.Caddyfile, []byte(cf), 0o644); err != nil {
		t.Fatal(err)
	}
	d.inNamespace(m.proc)
	m.launch(t)
	ms := listMembers(t, m)
	if len(ms) != 1 || ms[0].Name != "solo" || !slices.Equal(ms[0].PeerURLs, []string{peerURL}) {
		t.Errorf("members %+v, want solo at %s", ms, peerURL)
	}
}

// TestDiscoverySRVWithTheSystemRoots: members that trust the system's roots
// for their peers (no peer_trusted_ca_file; here the test CA is the
// system's, through SSL_CERT_FILE) check the certificates of the https
// peers the records name against the domain, as etcd does, and still send
// each peer its own host as the TLS server name, which the Caddy peer
// sites (client_auth) insist on: the cluster forms.
func TestDiscoverySRVWithTheSystemRoots(t *testing.T) {
	d := startSRVDNS(t)
	pki := newTestPKI(t, "n1", "n2", "n3")
	c := srvCluster(t, d, pki)
	for _, m := range c.members {
		m.env = append(m.env, "SSL_CERT_FILE="+pki.caFile)
		if err := os.WriteFile(m.Caddyfile, []byte(srvCaddyfile(m, pki, "system-roots", false)), 0o644); err != nil {
			t.Fatal(err)
		}
		d.inNamespace(m.proc)
	}
	for _, m := range c.members {
		m.spawn(t)
	}
	for _, m := range c.members {
		if err := m.waitHealthy(30 * time.Second); err != nil {
			t.Fatalf("%s: %v", m.Name, err)
		}
	}
	if st, _, body := c.members[1].do(t, "PUT", "/v2/keys/roots", url.Values{"value": {"system"}}); st != http.StatusCreated {
		t.Fatalf("PUT: %d %s", st, body)
	}
	for _, m := range c.members {
		if st, _, body := m.do(t, "GET", "/v2/keys/roots?quorum=true", nil); st != http.StatusOK || !strings.Contains(string(body), `"value":"system"`) {
			t.Errorf("%s: %d %s", m.Name, st, body)
		}
	}
}
