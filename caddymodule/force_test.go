package caddymodule

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestClusterForceNewClusterAfterLosingAMajority recovers a three-member
// cluster that lost two members for good, as an etcd operator would with
// --force-new-cluster: the survivor restarts with force_new_cluster and
// serves alone, every acknowledged write with its index, under its cluster
// ID; a new member joins it; the option comes out of its config; a lost
// member that comes back is refused and stops.
func TestClusterForceNewClusterAfterLosingAMajority(t *testing.T) {
	c := startCluster(t, 3, nil)
	ms := c.members
	acked := make(map[string]crashAck)
	for i := range 30 {
		key := fmt.Sprintf("/force/k%02d", i)
		st, _, body := ms[i%3].do(t, "PUT", "/v2/keys"+key, url.Values{"value": {fmt.Sprint(i)}})
		if st != http.StatusCreated {
			t.Fatalf("PUT %s: %d %s", key, st, body)
		}
		acked[key] = crashAck{Value: fmt.Sprint(i), Index: modifiedIndex(t, body)}
	}
	_, h, _ := ms[0].do(t, "GET", "/v2/keys/force", nil)
	clusterID := h.Get("X-Etcd-Cluster-Id")
	// Every member has every write: the survivor may be any of them.
	for _, m := range ms {
		if !poll(10*time.Second, func() bool { return len(quorumKeys(t, m, "/force")) == len(acked) }) {
			t.Fatalf("%s never had the %d writes", m.Name, len(acked))
		}
	}
	survivor, lost := ms[0], ms[1:]
	for _, m := range lost {
		m.kill9()
	}
	survivor.kill9()

	setForce := func(on bool) {
		text := c.caddyfile(survivor, ms, "new")
		if on {
			text = strings.Replace(text, "\traftkv {\n", "\traftkv {\n\t\tforce_new_cluster\n", 1)
		}
		if err := os.WriteFile(survivor.Caddyfile, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	setForce(true)
	survivor.restart(t)
	got := listMembers(t, survivor)
	if len(got) != 1 || got[0].Name != survivor.Name {
		t.Fatalf("members after the forced start: %+v, want %s alone", got, survivor.Name)
	}
	checkAcked(t, survivor, "/force", acked)
	st, h, body := survivor.do(t, "PUT", "/v2/keys/force/after", url.Values{"value": {"alone"}})
	if st != http.StatusCreated {
		t.Fatalf("PUT on the forced member: %d %s", st, body)
	}
	acked["/force/after"] = crashAck{Value: "alone", Index: modifiedIndex(t, body)}
	if got := h.Get("X-Etcd-Cluster-Id"); got != clusterID {
		t.Errorf("cluster ID %s after the forced start, %s before", got, clusterID)
	}
	out, err := etcdctl(t, []string{survivor.ClientURL}, "cluster-health")
	if err != nil || !strings.Contains(out, "cluster is healthy") || strings.Count(out, "got healthy result from") != 1 {
		t.Errorf("etcdctl cluster-health on the forced member: %v\n%s", err, out)
	}

	// The cluster grows again: a new member joins it.
	n4 := c.newTestMember("n4")
	if !poll(30*time.Second, func() bool {
		out, err = etcdctl(t, []string{survivor.ClientURL}, "member", "add", "n4", n4.PeerURL)
		return err == nil
	}) {
		t.Fatalf("etcdctl member add: %v\n%s", err, out)
	}
	c.writeCaddyfile(n4, []*testMember{survivor, n4}, "existing")
	n4.spawn(t)
	if err := n4.waitHealthy(30 * time.Second); err != nil {
		t.Fatalf("n4 did not become healthy: %v", err)
	}
	checkAcked(t, n4, "/force", acked)

	// The option comes out of the config; a restart keeps both members.
	setForce(false)
	survivor.stop()
	survivor.restart(t)
	if !poll(20*time.Second, func() bool {
		var names []string
		for _, mi := range listMembers(t, survivor) {
			names = append(names, mi.Name)
		}
		slices.Sort(names)
		return slices.Equal(names, []string{survivor.Name, "n4"})
	}) {
		t.Fatalf("members after the restart without force_new_cluster: %+v", listMembers(t, survivor))
	}
	if st, _, body := n4.do(t, "PUT", "/v2/keys/force/n4", url.Values{"value": {"two"}}); st != http.StatusCreated {
		t.Fatalf("PUT on n4: %d %s", st, body)
	}

	// A lost member that comes back is refused, and stops serving.
	back := lost[0]
	back.spawn(t)
	var bst adminStatus
	if !poll(20*time.Second, func() bool {
		var ok bool
		bst, ok = adminStatusOf(back.proc)
		return ok && !bst.Running
	}) {
		t.Fatalf("%s, removed by the forced start, came back and runs: %+v", back.Name, bst)
	}
	if !poll(10*time.Second, func() bool { return strings.Contains(back.logTail(400), "permanently removed") }) {
		t.Errorf("%s stopped, but its log does not say it was removed:\n%s", back.Name, back.logTail(40))
	}
	checkAcked(t, survivor, "/force", acked)
}

// modifiedIndex is the modifiedIndex of a write's answer.
func modifiedIndex(t *testing.T, body []byte) uint64 {
	t.Helper()
	var r crashResponse
	if err := json.Unmarshal(body, &r); err != nil || r.Node.ModifiedIndex == 0 {
		t.Fatalf("a write's answer without its index: %v %s", err, body)
	}
	return r.Node.ModifiedIndex
}
