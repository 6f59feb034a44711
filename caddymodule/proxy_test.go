package caddymodule

import (
	"context"
	"encoding/json"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"
)

// TestProxyInFrontOfACluster: Caddy's reverse_proxy stands where etcd's v2
// proxy (--proxy on) stood, a local endpoint that forwards to the members
// and moves on when one is down, with the options the README gives
// (Cluster, "A local endpoint in front of the cluster", for plain-HTTP
// members): writes and reads, a long-poll watch and a stream watch
// (flush_interval -1) through it, etcdctl with --no-sync, and the first
// member killed.
func TestProxyInFrontOfACluster(t *testing.T) {
	c := startCluster(t, 3, nil)
	ms := c.members
	var upstreams []string
	for _, m := range ms {
		upstreams = append(upstreams, strings.TrimPrefix(m.ClientURL, "http://"))
	}
	p := startEtcaddy(t, etcaddyOpts{Caddyfile: "{\n\tadmin 127.0.0.1:{admin_port}\n}\n\n" +
		"http://127.0.0.1:{client_port} {\n" +
		"\treverse_proxy " + strings.Join(upstreams, " ") + " {\n" +
		"\t\tlb_policy first\n\t\tlb_try_duration 5s\n\t\tfail_duration 30s\n" +
		"\t\tflush_interval -1\n\t\theader_up Host {upstream_hostport}\n\t}\n}\n"})

	st, h, body := p.do(t, "PUT", "/v2/keys/proxy/a", url.Values{"value": {"1"}})
	if st != http.StatusCreated || h.Get("X-Etcd-Index") == "" || h.Get("X-Etcd-Cluster-Id") == "" {
		t.Fatalf("PUT through the proxy: %d %v %s", st, h, body)
	}
	for _, m := range ms {
		if got := quorumKeys(t, m, "/proxy"); got["/proxy/a"].Value != "1" {
			t.Fatalf("%s does not have the write made through the proxy: %v", m.Name, got)
		}
	}

	// A long poll, answered by a write on another member. Its headers come
	// through at once (the member flushes them as the watch registers), so
	// the write follows the registration.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	watch := func(path string) *http.Response {
		t.Helper()
		req, err := http.NewRequestWithContext(ctx, "GET", p.ClientURL+path, nil)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("watch %s through the proxy: %v %v", path, resp, err)
		}
		t.Cleanup(func() { resp.Body.Close() })
		return resp
	}
	resp := watch("/v2/keys/proxy/b?wait=true")
	ms[2].do(t, "PUT", "/v2/keys/proxy/b", url.Values{"value": {"polled"}})
	var polled crashResponse
	if err := json.NewDecoder(resp.Body).Decode(&polled); err != nil || polled.Node.Value != "polled" {
		t.Fatalf("long poll through the proxy: %+v %v", polled, err)
	}

	// A stream: each event arrives as it happens.
	dec := json.NewDecoder(watch("/v2/keys/proxy/s?wait=true&stream=true").Body)
	for _, v := range []string{"first", "second"} {
		ms[1].do(t, "PUT", "/v2/keys/proxy/s", url.Values{"value": {v}})
		var r crashResponse
		if err := dec.Decode(&r); err != nil || r.Node.Value != v {
			t.Fatalf("stream event %q through the proxy: %+v %v", v, r, err)
		}
	}

	out, err := etcdctl(t, []string{p.ClientURL}, "--no-sync", "set", "/proxy/ctl", "x")
	if err != nil || strings.TrimSpace(out) != "x" {
		t.Fatalf("etcdctl --no-sync set through the proxy: %v\n%s", err, out)
	}

	// The member the proxy uses first dies: requests go to the next one.
	ms[0].kill9()
	agreedLeader(t, ms[1:], "", 15*time.Second)
	for i := range 5 {
		st, _, body := p.do(t, "PUT", "/v2/keys/proxy/after", url.Values{"value": {"v"}})
		if st/100 != 2 {
			t.Fatalf("PUT %d through the proxy after its first member died: %d %s", i, st, body)
		}
	}
	if got := quorumKeys(t, ms[1], "/proxy"); got["/proxy/after"].Value != "v" || got["/proxy/ctl"].Value != "x" {
		t.Fatalf("%s after the failover: %v", ms[1].Name, got)
	}
}
