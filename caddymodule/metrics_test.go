package caddymodule

import (
	"bufio"
	"context"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"
)

// scrapeMetrics reads the etcd_ metrics of m's admin endpoint (/metrics),
// by name with labels as Prometheus writes them; nil when it does not
// answer.
func scrapeMetrics(m *testMember) map[string]float64 {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	status, _, body, err := adminTry(ctx, m.proc, "GET", "/metrics")
	if err != nil || status != http.StatusOK {
		return nil
	}
	out := make(map[string]float64)
	sc := bufio.NewScanner(strings.NewReader(string(body)))
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "etcd_") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err == nil {
			out[line[:i]] = v
		}
	}
	return out
}

// TestMetricsUnderEtcdsNames: each member of a three-member cluster exports
// through Caddy's /metrics what etcd exports under the same names: a leader,
// which member leads, its ID, the leaders it saw, the committed and applied
// indexes, its open watches; a reload keeps them exported.
func TestMetricsUnderEtcdsNames(t *testing.T) {
	c := startCluster(t, 3, nil)
	ms := c.members
	leader := agreedLeader(t, ms, "", 10*time.Second)
	st, h, body := ms[1].do(t, "PUT", "/v2/keys/metrics/k", url.Values{"value": {"v"}})
	if st != http.StatusCreated {
		t.Fatalf("PUT: %d %s", st, body)
	}
	raftIndex, _ := strconv.ParseFloat(h.Get("X-Raft-Index"), 64)
	ids := make(map[string]string)
	changes := make(map[string]float64) // leaders each member saw
	for _, mi := range listMembers(t, ms[0]) {
		ids[mi.Name] = mi.ID
	}
	for _, m := range ms {
		var got map[string]float64
		if !poll(10*time.Second, func() bool {
			got = scrapeMetrics(m)
			return got["etcd_server_proposals_applied_total"] >= raftIndex
		}) {
			t.Fatalf("%s: applied index never reached %v: %v", m.Name, raftIndex, got)
		}
		isLeader := 0.0
		if ids[m.Name] == leader.ID {
			isLeader = 1
		}
		for name, want := range map[string]float64{
			"etcd_server_has_leader":                          1,
			"etcd_server_is_leader":                           isLeader,
			`etcd_server_id{server_id="` + ids[m.Name] + `"}`: 1,
			"etcd_debugging_store_watchers":                   0,
			"etcd_server_proposals_pending":                   0,
		} {
			if v, ok := got[name]; !ok || v != want {
				t.Errorf("%s: %s = %v (present %v), want %v", m.Name, name, v, ok, want)
			}
		}
		if _, ok := got["etcd_server_proposals_failed_total"]; !ok {
			t.Errorf("%s: no etcd_server_proposals_failed_total: %v", m.Name, got)
		}
		if got["etcd_server_leader_changes_seen_total"] < 1 {
			t.Errorf("%s: no leader seen: %v", m.Name, got)
		}
		changes[m.Name] = got["etcd_server_leader_changes_seen_total"]
		if got["etcd_server_proposals_committed_total"] < got["etcd_server_proposals_applied_total"] {
			t.Errorf("%s: committed %v below applied %v", m.Name, got["etcd_server_proposals_committed_total"], got["etcd_server_proposals_applied_total"])
		}
	}

	// A watch open on a member counts there until its client goes.
	w := ms[2]
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, _, _, _ = w.tryDo(ctx, "GET", "/v2/keys/metrics/never?wait=true", nil)
	}()
	if !poll(10*time.Second, func() bool { return scrapeMetrics(w)["etcd_debugging_store_watchers"] == 1 }) {
		t.Errorf("%s: the open watch is not counted: %v", w.Name, scrapeMetrics(w))
	}
	cancel()
	<-done
	if !poll(10*time.Second, func() bool { return scrapeMetrics(w)["etcd_debugging_store_watchers"] == 0 }) {
		t.Errorf("%s: the ended watch is still counted: %v", w.Name, scrapeMetrics(w))
	}

	// A reload registers them in the new config's registry.
	if st, b, err := reloadLoad(http.DefaultClient, w.AdminURL, reloadCaddyfileText(t, w.proc)+"\n# reloaded\n"); err != nil || st != http.StatusOK {
		t.Fatalf("reload: %d %s %v", st, b, err)
	}
	if got := scrapeMetrics(w); got["etcd_server_has_leader"] != 1 || got[`etcd_server_id{server_id="`+ids[w.Name]+`"}`] != 1 {
		t.Errorf("%s after a reload: %v", w.Name, got)
	}

	// The leader killed: the others see one more leader.
	var rest []*testMember
	for _, m := range ms {
		if ids[m.Name] == leader.ID {
			m.kill9()
		} else {
			rest = append(rest, m)
		}
	}
	agreedLeader(t, rest, leader.ID, 10*time.Second)
	for _, m := range rest {
		if !poll(10*time.Second, func() bool { return scrapeMetrics(m)["etcd_server_leader_changes_seen_total"] > changes[m.Name] }) {
			t.Errorf("%s: leader changes after the leader's death: %v", m.Name, scrapeMetrics(m))
		}
	}
}

// TestMetricsOnTheClientSite: Caddy's metrics handler in the client site
// serves the etcd metrics on the client URL's /metrics, where etcd serves
// them, so a scrape configured for etcd finds them there.
func TestMetricsOnTheClientSite(t *testing.T) {
	p := startEtcaddy(t, etcaddyOpts{Caddyfile: "{\n\tadmin 127.0.0.1:{admin_port}\n\traftkv {\n\t\tdata_dir {data_dir}\n\t}\n}\n\n" +
		"http://127.0.0.1:{client_port} {\n\tmetrics /metrics\n\tetcd\n}\n"})
	st, h, body := p.do(t, "GET", "/metrics", nil)
	if st != http.StatusOK || !strings.Contains(string(body), "\netcd_server_has_leader 1\n") || !strings.Contains(string(body), "\netcd_server_is_leader 1\n") {
		t.Fatalf("GET /metrics on the client site: %d %s\n%.600s", st, h.Get("Content-Type"), body)
	}
	if st, _, body := p.do(t, "GET", "/v2/keys/", nil); st != http.StatusOK {
		t.Fatalf("the API beside it: %d %s", st, body)
	}
}
