package caddymodule

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// discoveryCaddyfile is m's configuration when it bootstraps through the
// discovery URL durl, as an operator writes it for etcd's --discovery;
// extra are more raftkv options, one per line.
func discoveryCaddyfile(m *testMember, durl string, extra ...string) string {
	return fmt.Sprintf(`{
	admin %s
	raftkv {
		name %s
		data_dir %s
		advertise_client_urls %s
		initial_advertise_peer_urls %s
		discovery %s
		election_timeout %v%s
	}
}

%s {
	etcd
}

%s {
	raftkv_peer
}
`, strings.TrimPrefix(m.AdminURL, "http://"), m.Name, m.DataDir, m.ClientURL, m.PeerURL, durl, clusterElectionTimeout,
		strings.Join(append([]string{""}, extra...), "\n\t\t"), m.ClientURL, m.PeerURL)
}

// discoveryEntries lists the registrations in a discovery directory:
// member ID (the key's last segment) -> value.
func discoveryEntries(t *testing.T, service *proc, dir string) map[string]string {
	t.Helper()
	st, _, body := service.do(t, "GET", "/v2/keys"+dir, nil)
	if st != http.StatusOK {
		t.Fatalf("GET %s on the discovery service: %d %s", dir, st, body)
	}
	var got struct {
		Node struct {
			Nodes []struct {
				Key   string `json:"key"`
				Value string `json:"value"`
				Dir   bool   `json:"dir"`
			} `json:"nodes"`
		} `json:"node"`
	}
	if err := json.Unmarshal(body, &got); err != nil {
		t.Fatalf("GET %s: %v: %s", dir, err, body)
	}
	out := make(map[string]string)
	for _, n := range got.Node.Nodes {
		if !n.Dir {
			out[filepath.Base(n.Key)] = n.Value
		}
	}
	return out
}

// setDiscoverySize creates a discovery directory for size members, as an
// operator does before the members start.
func setDiscoverySize(t *testing.T, service *proc, dir string, size int) {
	t.Helper()
	if st, _, body := service.do(t, "PUT", "/v2/keys"+dir+"/_config/size", url.Values{"value": {fmt.Sprint(size)}}); st != http.StatusCreated {
		t.Fatalf("PUT %s/_config/size: %d %s", dir, st, body)
	}
}

// TestDiscoveryBootstrapsACluster bootstraps three members through a
// discovery service, a real etcd 3.4, as etcd's --discovery does: Caddy
// starts at once on each, the members wait (their API holds requests)
// until the third has registered, then form one cluster whose IDs are the
// registered keys. A fourth member (discovery_fallback exit) finds the cluster full and does not
// start, while its Caddy runs on and exits on SIGTERM. A restarted member
// needs the service no more.
func TestDiscoveryBootstrapsACluster(t *testing.T) {
	service := startEtcd(t)
	const dir = "/discovery/6c007a14875d53d9bf0ef5a6fc0257c8"
	setDiscoverySize(t, service, dir, 3)
	durl := service.ClientURL + "/v2/keys" + dir

	c := &testCluster{t: t}
	var ms []*testMember
	for i := 1; i <= 4; i++ {
		m := c.newTestMember(fmt.Sprintf("n%d", i))
		var extra []string
		if i == 4 {
			// The member of a full cluster stops (etcd's default makes it a
			// proxy: TestDiscoveryFallbackProxy).
			extra = append(extra, "discovery_fallback exit")
		}
		if err := os.WriteFile(m.Caddyfile, []byte(discoveryCaddyfile(m, durl, extra...)), 0o644); err != nil {
			t.Fatal(err)
		}
		ms = append(ms, m)
	}

	// Two members: Caddy runs (its admin API answers), the members wait.
	for _, m := range ms[:2] {
		m.spawn(t)
	}
	for _, m := range ms[:2] {
		if !poll(20*time.Second, func() bool { return len(discoveryEntries(t, service, dir)) >= 2 }) {
			t.Fatalf("the members never registered: %v", discoveryEntries(t, service, dir))
		}
		if !poll(10*time.Second, func() bool {
			resp, err := http.Get(m.AdminURL + "/config/apps/raftkv/name")
			if err != nil {
				return false
			}
			resp.Body.Close()
			return resp.StatusCode == http.StatusOK
		}) {
			t.Fatalf("%s: Caddy's admin API never answered while the member discovers", m.Name)
		}
		st, _, body, err := m.tryDoTimeout("GET", "/health", time.Second)
		if err != nil || st == http.StatusOK {
			t.Fatalf("%s: /health while discovering: %d %s %v, want an answer that is not 200", m.Name, st, body, err)
		}
		if st, _, body, err := m.tryDoTimeout("GET", "/v2/keys/", 300*time.Millisecond); err == nil {
			t.Fatalf("%s: GET /v2/keys/ while discovering answered %d %s; it should wait", m.Name, st, body)
		}
	}
	if !strings.Contains(ms[0].logTail(200), "discovery: waiting for more members") {
		t.Fatalf("n1's log does not say it waits:\n%s", ms[0].logTail(40))
	}
	// The admin API says why the member is not there yet.
	if resp, err := http.Get(ms[0].AdminURL + "/raftkv/status"); err != nil {
		t.Fatal(err)
	} else {
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(body), "waits for its discovery service") {
			t.Fatalf("GET /raftkv/status while discovering: %d %s", resp.StatusCode, body)
		}
	}
	// A reload while n1 discovers keeps its discovery going.
	admin := &http.Client{Timeout: 10 * time.Second}
	withRoute := discoveryCaddyfile(ms[0], durl) + "\n" + ms[0].ClientURL + "/hello {\n\trespond hi\n}\n"
	if st, body, err := reloadLoad(admin, ms[0].AdminURL, withRoute); err != nil || st != http.StatusOK {
		t.Fatalf("reload of n1 while it discovers: %d %s %v", st, body, err)
	}
	// n2 crashes after it registered, before it had any Raft state: its
	// restart finds its own registration and waits on (etcd's would stop
	// on a duplicate ID).
	ms[1].kill9()
	ms[1].startProcess(t)
	if !poll(20*time.Second, func() bool { return strings.Contains(ms[1].logTail(100), "this member registered before") }) {
		t.Fatalf("n2's restart did not take its registration back:\n%s", ms[1].logTail(40))
	}

	// The third: all three start, as one cluster.
	ms[2].spawn(t)
	for _, m := range ms[:3] {
		if err := m.waitHealthy(30 * time.Second); err != nil {
			t.Fatalf("%s: %v", m.Name, err)
		}
	}
	registered := discoveryEntries(t, service, dir)
	if len(registered) != 3 {
		t.Fatalf("registrations %v, want 3", registered)
	}
	var clusterID string
	for _, m := range ms[:3] {
		var got []memberInfo
		if !poll(20*time.Second, func() bool {
			got = listMembers(t, m)
			return len(got) == 3 && !slices.ContainsFunc(got, func(mi memberInfo) bool { return len(mi.ClientURLs) == 0 })
		}) {
			t.Fatalf("%s: members %+v", m.Name, got)
		}
		for _, mi := range got {
			o := c.byNameIn(ms, mi.Name)
			if want := o.Name + "=" + o.PeerURL; registered[mi.ID] != want {
				t.Errorf("%s lists %s as %s; its registration under that ID is %q, want %q", m.Name, mi.Name, mi.ID, registered[mi.ID], want)
			}
			if !slices.Equal(mi.PeerURLs, []string{o.PeerURL}) || !slices.Equal(mi.ClientURLs, []string{o.ClientURL}) {
				t.Errorf("%s lists %+v, want peer %s client %s", m.Name, mi, o.PeerURL, o.ClientURL)
			}
		}
		_, h, _ := m.do(t, "GET", "/v2/keys/", nil)
		if clusterID == "" {
			clusterID = h.Get("X-Etcd-Cluster-Id")
		} else if h.Get("X-Etcd-Cluster-Id") != clusterID {
			t.Errorf("%s: cluster ID %s, n1's %s", m.Name, h.Get("X-Etcd-Cluster-Id"), clusterID)
		}
	}
	if st, _, body := ms[0].do(t, "PUT", "/v2/keys/discovered", url.Values{"value": {"yes"}}); st != http.StatusCreated {
		t.Fatalf("PUT on n1: %d %s", st, body)
	}
	if st, _, body := ms[2].do(t, "GET", "/v2/keys/discovered?quorum=true", nil); st != http.StatusOK || !strings.Contains(string(body), `"value":"yes"`) {
		t.Fatalf("quorum GET on n3: %d %s", st, body)
	}
	if out, err := etcdctl(t, clientURLs(ms[:3]), "cluster-health"); err != nil || !strings.Contains(out, "cluster is healthy") {
		t.Fatalf("etcdctl cluster-health: %v\n%s", err, out)
	}

	// A fourth: the cluster is full. It does not register, does not start,
	// and its Caddy exits on SIGTERM at once.
	n4 := ms[3]
	n4.spawn(t)
	if !poll(20*time.Second, func() bool { return strings.Contains(n4.logTail(200), "discovery: cluster is full") }) {
		t.Fatalf("n4's log never said the cluster is full:\n%s", n4.logTail(40))
	}
	if st, _, body, err := n4.tryDoTimeout("GET", "/health", time.Second); err != nil || st == http.StatusOK {
		t.Fatalf("n4 /health: %d %s %v, want an answer that is not 200", st, body, err)
	}
	if got := discoveryEntries(t, service, dir); len(got) != 3 {
		t.Fatalf("n4 registered in a full cluster: %v", got)
	}
	// The operator's fix, a token of its own, and a reload: it starts.
	const dir2 = "/discovery/n4-alone"
	setDiscoverySize(t, service, dir2, 1)
	if st, body, err := reloadLoad(admin, n4.AdminURL, discoveryCaddyfile(n4, service.ClientURL+"/v2/keys"+dir2)); err != nil || st != http.StatusOK {
		t.Fatalf("reload of n4 with a new token: %d %s %v", st, body, err)
	}
	if err := n4.waitHealthy(30 * time.Second); err != nil {
		t.Fatalf("n4 after its reload: %v", err)
	}
	if got := listMembers(t, n4); len(got) != 1 || got[0].Name != "n4" {
		t.Fatalf("n4's cluster: %+v", got)
	}

	// A member that waits for others, reloaded with another token,
	// discovers again with it.
	const dir3, dir4 = "/discovery/never-full", "/discovery/n5-alone"
	setDiscoverySize(t, service, dir3, 2)
	setDiscoverySize(t, service, dir4, 1)
	n5 := c.newTestMember("n5")
	if err := os.WriteFile(n5.Caddyfile, []byte(discoveryCaddyfile(n5, service.ClientURL+"/v2/keys"+dir3)), 0o644); err != nil {
		t.Fatal(err)
	}
	n5.spawn(t)
	if !poll(20*time.Second, func() bool { return strings.Contains(n5.logTail(100), "discovery: waiting for more members") }) {
		t.Fatalf("n5 never waited:\n%s", n5.logTail(40))
	}
	if st, body, err := reloadLoad(admin, n5.AdminURL, discoveryCaddyfile(n5, service.ClientURL+"/v2/keys"+dir4)); err != nil || st != http.StatusOK {
		t.Fatalf("reload of n5 with a new token: %d %s %v", st, body, err)
	}
	if err := n5.waitHealthy(30 * time.Second); err != nil {
		t.Fatalf("n5 after its reload: %v", err)
	}
	if got := discoveryEntries(t, service, dir4); len(got) != 1 {
		t.Fatalf("n5's registrations under its new token: %v", got)
	}

	// A copy of n1's config on another data directory (no peer site: the
	// port is n1's) is another member with n1's ID: refused, as by etcd.
	twin := c.newTestMember("n1")
	twin.PeerURL = ms[0].PeerURL
	const dir5 = "/discovery/twins"
	setDiscoverySize(t, service, dir5, 2)
	first := c.newTestMember("n1")
	first.PeerURL = ms[0].PeerURL
	for _, m := range []*testMember{first, twin} {
		cf := discoveryCaddyfile(m, service.ClientURL+"/v2/keys"+dir5)
		cf = cf[:strings.LastIndex(cf, m.PeerURL+" {")]
		if err := os.WriteFile(m.Caddyfile, []byte(cf), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	first.spawn(t)
	if !poll(20*time.Second, func() bool { return strings.Contains(first.logTail(100), "discovery: waiting for more members") }) {
		t.Fatalf("the first of the twins never waited:\n%s", first.logTail(40))
	}
	twin.spawn(t)
	if !poll(20*time.Second, func() bool { return strings.Contains(twin.logTail(100), "discovery: found duplicate id") }) {
		t.Fatalf("the second twin was not refused as a duplicate ID:\n%s", twin.logTail(40))
	}
	// A member that waits for others exits on SIGTERM at once.
	if !first.signal(syscall.SIGTERM, 10*time.Second) {
		t.Fatal("a member waiting for others did not exit within 10 s of SIGTERM")
	}

	// A restart reads the member from its data: the service may be gone.
	service.stop()
	ms[0].kill9()
	ms[0].restart(t)
	if st, _, body := ms[0].do(t, "GET", "/v2/keys/discovered?quorum=true", nil); st != http.StatusOK || !strings.Contains(string(body), `"value":"yes"`) {
		t.Fatalf("quorum GET on the restarted n1: %d %s", st, body)
	}
}

// TestDiscoveryRegistersAsEtcdDoes: a member registers the key (its member
// ID, made from its peer URLs and the discovery URL) and the value etcd
// 3.4 registers for the same name and peer URLs, in the same directory. The
// service is an etcaddy member, which etcd's own discovery client also
// bootstraps a two-member etcd cluster through.
func TestDiscoveryRegistersAsEtcdDoes(t *testing.T) {
	service := startEtcaddy(t, etcaddyOpts{})
	const dir = "/discovery/same"
	durl := service.ClientURL + "/v2/keys" + dir
	c := &testCluster{t: t}
	m := c.newTestMember("solo")
	if err := os.WriteFile(m.Caddyfile, []byte(discoveryCaddyfile(m, durl)), 0o644); err != nil {
		t.Fatal(err)
	}
	setDiscoverySize(t, service, dir, 1)
	m.spawn(t)
	if err := m.waitHealthy(30 * time.Second); err != nil {
		t.Fatal(err)
	}
	ours := discoveryEntries(t, service, dir)
	members := listMembers(t, m)
	m.stop()
	if len(members) != 1 || ours[members[0].ID] != "solo="+m.PeerURL {
		t.Fatalf("etcaddy registered %v, and lists %+v", ours, members)
	}

	// etcd, with the same name, peer URL and discovery URL, after the
	// directory was made anew.
	if st, _, body := service.do(t, "DELETE", "/v2/keys"+dir+"?recursive=true", nil); st != http.StatusOK {
		t.Fatalf("DELETE %s: %d %s", dir, st, body)
	}
	setDiscoverySize(t, service, dir, 1)
	e := discoveringEtcd(t, "solo", m.PeerURL, durl)
	e.launch(t)
	theirs := discoveryEntries(t, service, dir)
	if !maps.Equal(ours, theirs) {
		t.Fatalf("etcaddy registered %v, etcd %v", ours, theirs)
	}
	e.stop()

	// Two etcd members bootstrap through etcaddy.
	const dir2 = "/discovery/etcd-pair"
	setDiscoverySize(t, service, dir2, 2)
	var pair []*proc
	for _, name := range []string{"e1", "e2"} {
		p := discoveringEtcd(t, name, fmt.Sprintf("http://127.0.0.1:%d", freePort(t)), service.ClientURL+"/v2/keys"+dir2)
		p.spawn(t)
		pair = append(pair, p)
	}
	for _, p := range pair {
		if err := p.waitHealthy(30 * time.Second); err != nil {
			t.Fatalf("%s: %v", p.Name, err)
		}
	}
	var got struct {
		Members []memberInfo `json:"members"`
	}
	_, _, body := pair[0].do(t, "GET", "/v2/members", nil)
	if err := json.Unmarshal(body, &got); err != nil || len(got.Members) != 2 {
		t.Fatalf("etcd's members after discovery through etcaddy: %s (%v)", body, err)
	}
	if reg := discoveryEntries(t, service, dir2); len(reg) != 2 || reg[got.Members[0].ID] == "" || reg[got.Members[1].ID] == "" {
		t.Fatalf("registrations %v, members %+v", reg, got.Members)
	}
}

// discoveringEtcd prepares a real etcd 3.4 member that bootstraps through
// durl with the given name and peer URL; launch or spawn starts it.
func discoveringEtcd(t *testing.T, name, peerURL, durl string) *proc {
	return etcdProc(t, "etcd "+name, fmt.Sprintf("http://127.0.0.1:%d", freePort(t)),
		"--name", name,
		"--listen-peer-urls", peerURL,
		"--initial-advertise-peer-urls", peerURL,
		"--discovery", durl,
		"--discovery-fallback", "exit")
}

// tryDoTimeout is tryDo with a deadline of timeout.
func (p *proc) tryDoTimeout(method, path string, timeout time.Duration) (int, http.Header, []byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return p.tryDo(ctx, method, path, nil)
}

// TestDiscoveryWaitsForTheService: members started before their discovery
// service runs retry, as etcd's do, and bootstrap once it is up and holds
// the cluster's size.
func TestDiscoveryWaitsForTheService(t *testing.T) {
	servicePort := freePort(t)
	const dir = "/discovery/later"
	durl := fmt.Sprintf("http://127.0.0.1:%d/v2/keys%s", servicePort, dir)
	c := &testCluster{t: t}
	var ms []*testMember
	for i := 1; i <= 3; i++ {
		m := c.newTestMember(fmt.Sprintf("n%d", i))
		if err := os.WriteFile(m.Caddyfile, []byte(discoveryCaddyfile(m, durl)), 0o644); err != nil {
			t.Fatal(err)
		}
		m.spawn(t)
		ms = append(ms, m)
	}
	for _, m := range ms {
		if !poll(20*time.Second, func() bool { return strings.Contains(m.logTail(200), "cannot reach the discovery service") }) {
			t.Fatalf("%s never tried the service:\n%s", m.Name, m.logTail(40))
		}
	}
	service := etcdAt(t, fmt.Sprintf("http://127.0.0.1:%d", servicePort))
	service.launch(t)
	setDiscoverySize(t, service, dir, 3)
	for _, m := range ms {
		// Retries back off 2, 4, then 8 s, as etcd's.
		if err := m.waitHealthy(40 * time.Second); err != nil {
			t.Fatalf("%s: %v", m.Name, err)
		}
	}
	if got := listMembers(t, ms[0]); len(got) != 3 {
		t.Fatalf("members %+v", got)
	}
}

// byNameIn finds the member of ms named name.
func (c *testCluster) byNameIn(ms []*testMember, name string) *testMember {
	for _, m := range ms {
		if m.Name == name {
			return m
		}
	}
	c.t.Fatalf("no member %q", name)
	return nil
}

// TestDiscoveryThroughAProxy: with discovery_proxy (etcd's
// --discovery-proxy) every request to the discovery service goes through
// the proxy; here a forward HTTP proxy in the test process (Go's
// ReverseProxy passing on the absolute-form requests it is sent), which
// records what it forwards.
func TestDiscoveryThroughAProxy(t *testing.T) {
	service := startEtcd(t)
	const dir = "/discovery/proxied"
	setDiscoverySize(t, service, dir, 1)
	var (
		mu   sync.Mutex
		seen []string
	)
	proxy := httptest.NewServer(&httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			mu.Lock()
			seen = append(seen, pr.In.Method+" "+pr.In.URL.Path)
			mu.Unlock()
			pr.Out.URL = pr.In.URL // absolute: where the member asked to go
		},
		FlushInterval: -1,
	})
	defer proxy.Close()

	c := &testCluster{t: t}
	m := c.newTestMember("n1")
	cf := strings.Replace(discoveryCaddyfile(m, service.ClientURL+"/v2/keys"+dir), "\t\tdiscovery ",
		"\t\tdiscovery_proxy "+strings.TrimPrefix(proxy.URL, "http://")+"\n\t\tdiscovery ", 1)
	if err := os.WriteFile(m.Caddyfile, []byte(cf), 0o644); err != nil {
		t.Fatal(err)
	}
	m.spawn(t)
	if err := m.waitHealthy(30 * time.Second); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if !slices.ContainsFunc(seen, func(s string) bool { return strings.HasPrefix(s, "PUT /v2/keys"+dir+"/") }) {
		t.Fatalf("the proxy did not carry the registration; it saw %q", seen)
	}
}
