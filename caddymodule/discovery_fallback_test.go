package caddymodule

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// fallbackAnswer is what a proxy answered, with what legitimately differs
// between etcd and etcaddy normalized: indexes, times, the member's URL.
type fallbackAnswer struct {
	status int
	ctype  string
	body   string
}

// fallbackScript sends the same requests to a member of a one-member
// cluster (member) and to the proxy its discovery fell back to (proxy),
// then kills the member and asks the proxy again.
func fallbackScript(t *testing.T, member, proxy *proc) []fallbackAnswer {
	t.Helper()
	var out []fallbackAnswer
	ask := func(method, path string, form url.Values) {
		st, h, body := proxy.do(t, method, path, form)
		b := strings.ReplaceAll(string(body), member.ClientURL, "<member>")
		b = indexFields.ReplaceAllString(b, `"$1":N`)
		out = append(out, fallbackAnswer{st, h.Get("Content-Type"), b})
		if strings.HasPrefix(path, "/v2/keys") && st < 500 {
			if got, want := h.Get("X-Etcd-Cluster-Id"), memberClusterID(t, member); got != want {
				t.Errorf("%s %s through the proxy: X-Etcd-Cluster-Id %q, the member's %q", method, path, got, want)
			}
		}
	}
	ask("PUT", "/v2/keys/fb", url.Values{"value": {"1"}})
	ask("GET", "/v2/keys/fb", nil)
	ask("GET", "/v2/keys/missing", nil)
	ask("POST", "/v2/keys/fb", url.Values{"value": {"x"}, "prevExist": {"maybe"}})
	ask("GET", "/v2/config/local/proxy", nil)
	ask("GET", "/version", nil)
	ask("GET", "/health", nil)
	member.kill9()
	ask("GET", "/v2/keys/fb", nil)
	ask("GET", "/v2/keys/fb", nil)
	ask("GET", "/health", nil)
	return out
}

// compareAnswers reports each answer of etcd's proxy (want) and etcaddy's
// (got) that differ.
func compareAnswers(t *testing.T, want, got []fallbackAnswer) {
	t.Helper()
	for i := range max(len(want), len(got)) {
		var w, g fallbackAnswer
		if i < len(want) {
			w = want[i]
		}
		if i < len(got) {
			g = got[i]
		}
		if i >= len(want) || i >= len(got) || w != g {
			t.Errorf("answer %d: etcd's proxy %d %q %s; etcaddy's %d %q %s", i, w.status, w.ctype, w.body, g.status, g.ctype, g.body)
		}
	}
}

var indexFields = regexp.MustCompile(`"(modifiedIndex|createdIndex|index)":\d+`)

func memberClusterID(t *testing.T, member *proc) string {
	t.Helper()
	_, h, _ := member.do(t, "GET", "/v2/keys/", nil)
	return h.Get("X-Etcd-Cluster-Id")
}

// TestDiscoveryFallbackProxy: a member whose discovery finds the cluster
// full runs as a proxy of that cluster, as etcd's default
// --discovery-fallback proxy makes an etcd member: the same requests to an
// etcd 3.4 proxy and to an etcaddy one get the same answers (the key
// operations, the proxy's own /v2/config/local/proxy, and once the member
// is gone 502 then 503 with etcd's messages). Then etcaddy's proxy: a
// watch through it gets its headers at once and its event; etcdctl
// (--no-sync) works through it; restarted, it is a proxy again, and it
// finds the member again once that runs.
func TestDiscoveryFallbackProxy(t *testing.T) {
	service := startEtcaddy(t, etcaddyOpts{})

	// The reference.
	const edir = "/discovery/etcd-full"
	setDiscoverySize(t, service, edir, 1)
	edurl := service.ClientURL + "/v2/keys" + edir
	e1 := discoveringEtcd(t, "e1", fmt.Sprintf("http://127.0.0.1:%d", freePort(t)), edurl)
	e1.launch(t)
	epeer := fmt.Sprintf("http://127.0.0.1:%d", freePort(t))
	e2 := etcdProc(t, "etcd proxy", fmt.Sprintf("http://127.0.0.1:%d", freePort(t)),
		"--name", "e2",
		"--listen-peer-urls", epeer,
		"--initial-advertise-peer-urls", epeer,
		"--discovery", edurl)
	e2.launch(t)
	if !strings.Contains(e2.logTail(100), "falling back to proxy") {
		t.Fatalf("etcd did not fall back to a proxy:\n%s", e2.logTail(30))
	}
	want := fallbackScript(t, e1, e2)

	// etcaddy.
	const dir = "/discovery/etcaddy-full"
	setDiscoverySize(t, service, dir, 1)
	durl := service.ClientURL + "/v2/keys" + dir
	c := &testCluster{t: t}
	n1, n2 := c.newTestMember("n1"), c.newTestMember("n2")
	for _, m := range []*testMember{n1, n2} {
		if err := os.WriteFile(m.Caddyfile, []byte(discoveryCaddyfile(m, durl)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	n1.launch(t)
	n2.launch(t)
	if !strings.Contains(n2.logTail(100), "discovery cluster full, falling back to proxy") {
		t.Fatalf("n2 did not fall back to a proxy:\n%s", n2.logTail(30))
	}
	if reg := discoveryEntries(t, service, dir); len(reg) != 1 {
		t.Fatalf("registrations %v: the proxy registered", reg)
	}
	// Through the proxy, a watch's headers come at once, and its event.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, "GET", n2.ClientURL+"/v2/keys/watched?wait=true", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("a watch through the proxy: %v", err)
	}
	if st, _, body := n1.do(t, "PUT", "/v2/keys/watched", url.Values{"value": {"seen"}}); st != http.StatusCreated {
		t.Fatalf("PUT on the member: %d %s", st, body)
	}
	line, err := bufio.NewReader(resp.Body).ReadString('\n')
	resp.Body.Close()
	if !strings.Contains(line, `"value":"seen"`) {
		t.Fatalf("the watch through the proxy got %q (%v)", line, err)
	}
	if out, err := etcdctl(t, []string{n2.ClientURL}, "--no-sync", "get", "/watched"); err != nil || strings.TrimSpace(out) != "seen" {
		t.Fatalf("etcdctl get through the proxy: %v: %s", err, out)
	}
	if st, _, body := n2.do(t, "DELETE", "/v2/keys/watched", nil); st != http.StatusOK {
		t.Fatalf("DELETE through the proxy: %d %s", st, body)
	}
	compareAnswers(t, want, fallbackScript(t, n1.proc, n2.proc))

	// It finds the member again once that runs; restarted, it is a proxy
	// again.
	n1.restart(t)
	if !poll(20*time.Second, func() bool {
		st, _, body, err := n2.tryDo(context.Background(), "GET", "/v2/keys/fb", nil)
		return err == nil && st == http.StatusOK && strings.Contains(string(body), `"value":"1"`)
	}) {
		t.Fatalf("the proxy never reached the restarted member:\n%s", n2.logTail(30))
	}
	n2.stop()
	logFrom := logSize(n2.proc)
	n2.restart(t)
	if st, _, body := n2.do(t, "GET", "/v2/keys/fb", nil); st != http.StatusOK || !strings.Contains(string(body), `"value":"1"`) {
		t.Fatalf("the restarted proxy: %d %s", st, body)
	}
	if reg := discoveryEntries(t, service, dir); len(reg) != 1 {
		t.Fatalf("registrations %v after the proxy's restart", reg)
	}
	if lines, err := logLinesSince(n2.proc, logFrom); err != nil || !strings.Contains(strings.Join(lines, "\n"), "proxy: this member forwards client requests") {
		t.Fatalf("n2's log does not say it is a proxy after its restart:\n%s", n2.logTail(30))
	}
	// A proxy by option reads the cluster from the service without
	// registering.
	n3 := c.newTestMember("n3")
	if err := os.WriteFile(n3.Caddyfile, []byte(discoveryCaddyfile(n3, durl, "proxy on")), 0o644); err != nil {
		t.Fatal(err)
	}
	n3.launch(t)
	if st, _, body := n3.do(t, "GET", "/v2/keys/fb", nil); st != http.StatusOK || !strings.Contains(string(body), `"value":"1"`) {
		t.Fatalf("a proxy by option, through discovery: %d %s", st, body)
	}
	if reg := discoveryEntries(t, service, dir); len(reg) != 1 {
		t.Fatalf("registrations %v: the proxy by option registered", reg)
	}

	proxyStatusSays(t, n2, "its data directory keeps it one", n1.ClientURL)
}

// proxyStatusSays checks that the proxy p's GET /raftkv/status answers 503
// with a message that says each of want (why it is a proxy, the client URLs
// it forwards to).
func proxyStatusSays(t *testing.T, p *testMember, want ...string) {
	t.Helper()
	resp, err := http.Get(p.AdminURL + "/raftkv/status")
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("%s's /raftkv/status: %d %s, want 503", p.Name, resp.StatusCode, body)
	}
	for _, w := range want {
		if !strings.Contains(string(body), w) {
			t.Errorf("%s's /raftkv/status does not say %q: %s", p.Name, w, body)
		}
	}
}

// proxyCaddyfile is the configuration of an etcaddy proxy (raftkv's proxy
// option: on or readonly) of the cluster whose member m is.
func proxyCaddyfile(p *testMember, mode string, m *testMember, options ...string) string {
	var more string
	for _, o := range options {
		more += "\t\t" + o + "\n"
	}
	return fmt.Sprintf("{\n\tadmin %s\n\traftkv {\n\t\tname %s\n\t\tdata_dir %s\n\t\tproxy %s\n\t\tinitial_cluster %s=%s\n%s\t}\n}\n\n%s {\n\tetcd\n}\n",
		strings.TrimPrefix(p.AdminURL, "http://"), p.Name, p.DataDir, mode, m.Name, m.PeerURL, more, p.ClientURL)
}

// proxyModeScript sends the same requests to a proxy (etcd's --proxy, or
// raftkv's proxy option) of a one-member cluster.
func proxyModeScript(t *testing.T, member, on, readonly *proc) []fallbackAnswer {
	t.Helper()
	var out []fallbackAnswer
	ask := func(p *proc, method, path string, form url.Values) {
		st, h, body := p.do(t, method, path, form)
		b := strings.ReplaceAll(string(body), member.ClientURL, "<member>")
		b = indexFields.ReplaceAllString(b, `"$1":N`)
		out = append(out, fallbackAnswer{st, h.Get("Content-Type") + " cors=" + h.Get("Access-Control-Allow-Origin"), b})
	}
	ask(on, "PUT", "/v2/keys/p", url.Values{"value": {"on"}})
	ask(on, "GET", "/v2/keys/p", nil)
	ask(on, "GET", "/v2/config/local/proxy", nil)
	ask(readonly, "GET", "/v2/keys/p", nil)
	ask(readonly, "PUT", "/v2/keys/p", url.Values{"value": {"readonly"}})
	ask(readonly, "DELETE", "/v2/keys/p", nil)
	ask(readonly, "OPTIONS", "/v2/keys/p", nil)
	ask(readonly, "GET", "/v2/config/local/proxy", nil)
	ask(member, "GET", "/v2/keys/p", nil)
	return out
}

// TestProxyOption: raftkv's proxy option answers as etcd 3.4's --proxy on
// and --proxy readonly do (readonly: every request but a GET gets a bare
// 501, OPTIONS too); it fronts an etcd cluster too; a watch through it
// does not hold Caddy's exit; a proxy's data directory keeps it a proxy
// when the option goes.
func TestProxyOption(t *testing.T) {
	// The reference: an etcd member and two etcd proxies of it.
	e := startEtcd(t)
	epeer := e.args[slices.Index(e.args, "--initial-advertise-peer-urls")+1]
	var eproxies []*proc
	for _, mode := range []string{"on", "readonly"} {
		p := etcdProc(t, "etcd proxy "+mode, fmt.Sprintf("http://127.0.0.1:%d", freePort(t)),
			"--proxy", mode, "--initial-cluster", "default="+epeer)
		p.spawn(t)
		if !poll(20*time.Second, func() bool {
			st, _, body, err := p.tryDo(context.Background(), "GET", "/v2/config/local/proxy", nil)
			return err == nil && st == http.StatusOK && strings.Contains(string(body), e.ClientURL)
		}) {
			t.Fatalf("etcd's %s proxy never found its member:\n%s", mode, p.logTail(20))
		}
		eproxies = append(eproxies, p)
	}
	want := proxyModeScript(t, e, eproxies[0], eproxies[1])
	for _, ep := range eproxies {
		ep.stop()
	}

	c := &testCluster{t: t}
	// An etcaddy proxy in front of the etcd member: it reads etcd's own
	// member list (GET /members on its peer URL).
	pe := c.newTestMember("p-etcd")
	if err := os.WriteFile(pe.Caddyfile, []byte(proxyCaddyfile(pe, "on", &testMember{Name: "default", PeerURL: epeer})), 0o644); err != nil {
		t.Fatal(err)
	}
	pe.launch(t)
	st, h, body := pe.do(t, "GET", "/v2/keys/p", nil)
	if _, eh, _ := e.do(t, "GET", "/v2/keys/p", nil); st != http.StatusOK || h.Get("X-Etcd-Cluster-Id") != eh.Get("X-Etcd-Cluster-Id") {
		t.Fatalf("etcaddy's proxy of an etcd member: %d %s, cluster %q (etcd's %q)", st, body, h.Get("X-Etcd-Cluster-Id"), eh.Get("X-Etcd-Cluster-Id"))
	}
	pe.stop()

	m := c.newTestMember("m1")
	c.writeCaddyfile(m, []*testMember{m}, "new")
	m.launch(t)
	var proxies []*testMember
	for _, mode := range []string{"on", "readonly"} {
		p := c.newTestMember("p-" + mode)
		if err := os.WriteFile(p.Caddyfile, []byte(proxyCaddyfile(p, mode, m)), 0o644); err != nil {
			t.Fatal(err)
		}
		p.launch(t)
		proxies = append(proxies, p)
	}
	compareAnswers(t, want, proxyModeScript(t, m.proc, proxies[0].proc, proxies[1].proc))
	proxyStatusSays(t, proxies[0], "(proxy on)", "client URLs "+m.ClientURL, m.PeerURL)
	proxyStatusSays(t, proxies[1], "(proxy readonly)", m.ClientURL)

	// A watch through a proxy does not hold Caddy's exit (its grace
	// period is unlimited by default): it ends, as the member's own do.
	ro := proxies[1]
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, "GET", ro.ClientURL+"/v2/keys/p?wait=true&stream=true", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("a stream watch through the proxy: %v", err)
	}
	defer resp.Body.Close()
	if !ro.signal(syscall.SIGTERM, 10*time.Second) {
		t.Fatal("the proxy did not exit within 10 s of SIGTERM while a watch through it was open")
	}

	// A reload from on to readonly: the proxy reads it at its next start,
	// and says so (not that only a first start reads it).
	p := proxies[0]
	logFrom := logSize(p.proc)
	if st, body, err := reloadLoad(http.DefaultClient, p.AdminURL, proxyCaddyfile(p, "readonly", m)); err != nil || st != http.StatusOK {
		t.Fatalf("reloading the proxy as readonly: %d %s %v", st, body, err)
	}
	if !poll(10*time.Second, func() bool {
		lines, err := logLinesSince(p.proc, logFrom)
		log := strings.Join(lines, "\n")
		return err == nil && strings.Contains(log, "take effect when Caddy restarts") && strings.Contains(log, `"settings":["proxy"]`)
	}) {
		t.Fatalf("the reload from proxy on to readonly does not say it takes effect at the next start:\n%s", p.logTail(10))
	}
	if lines, _ := logLinesSince(p.proc, logFrom); strings.Contains(strings.Join(lines, "\n"), "first start on an empty data_dir") {
		t.Errorf("the reload from proxy on to readonly says only a first start reads it:\n%s", p.logTail(10))
	}

	// Without the option, the data directory keeps it a proxy.
	p.stop()
	cf := fmt.Sprintf("{\n\tadmin %s\n\traftkv {\n\t\tname %s\n\t\tdata_dir %s\n\t}\n}\n\n%s {\n\tetcd\n}\n",
		strings.TrimPrefix(p.AdminURL, "http://"), p.Name, p.DataDir, p.ClientURL)
	if err := os.WriteFile(p.Caddyfile, []byte(cf), 0o644); err != nil {
		t.Fatal(err)
	}
	p.restart(t)
	if st, _, body := p.do(t, "GET", "/v2/config/local/proxy", nil); st != http.StatusOK || !strings.Contains(string(body), m.ClientURL) {
		t.Fatalf("restarted without the option: /v2/config/local/proxy %d %s", st, body)
	}
	proxyStatusSays(t, p, "(its data directory keeps it one)", m.ClientURL)
}
