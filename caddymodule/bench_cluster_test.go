package caddymodule

import (
	"fmt"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// benchClusterSize is the number of members of each cluster compared.
const benchClusterSize = 3

// BenchmarkClusterVsEtcd runs a three-member etcaddy cluster (peers over plain
// HTTP on loopback) and a three-member etcd 3.4 cluster (--enable-v2, fsync
// on, its default) side by side on this machine and prints, per workload, the
// median of benchRounds alternating rounds and the ratio etcaddy/etcd. Load is
// spread over every member, as clients configured with all endpoints spread
// it, except the serial writer, which talks to the leader: its figure is the
// latency of one commit, without a follower's forwarding hop. It measures; it
// asserts no figure. Run it with
//
//	go test ./caddymodule/ -run '^$' -bench BenchmarkClusterVsEtcd -benchtime 1x
//
// As BenchmarkVsEtcd, the comparison runs once whatever b.N is.
func BenchmarkClusterVsEtcd(b *testing.B) {
	type cluster struct {
		name    string
		members []*testMember
		c       *http.Client
	}
	clusters := []cluster{
		{name: "etcaddy", members: benchEtcaddyCluster(b), c: benchClient(benchClients)},
		{name: "etcd", members: benchEtcdCluster(b), c: benchClient(benchClients)},
	}
	for _, cl := range clusters {
		leader, err := benchLeader(cl.members, 30*time.Second)
		if err != nil {
			b.Fatalf("%s cluster: %v", cl.name, err)
		}
		b.Logf("%s cluster: leader %s", cl.name, leader.Name)
	}
	value := url.Values{"value": {strings.Repeat("v", benchValue)}}.Encode()
	// member spreads clients over the members the way a client given every
	// endpoint does: each sticks to one.
	member := func(cl cluster, client int) string {
		return cl.members[client%len(cl.members)].ClientURL
	}

	put64 := &benchRow{metric: "cluster-put64", workload: "PUT, 64 clients over 3 members, distinct keys", unit: "ops/s", higher: true, target: ">= 2x"}
	quorum := &benchRow{metric: "cluster-quorum-get64", workload: "GET quorum=true, 64 clients over 3 members", unit: "ops/s", higher: true, target: ">= 2x"}
	serial := &benchRow{metric: "cluster-serial-put", workload: "serial PUT, 1 client on the leader", unit: "ops/s", higher: true, target: ">= 1x"}
	measure := func(row *benchRow, name string, res benchResult) {
		row.add(name, res.rate())
		if res.errs > 0 {
			row.note("%s: %d errors, first: %v", name, res.errs, res.err)
		}
	}

	// Keys for the quorum reads, written once on each cluster through
	// every member.
	for _, cl := range clusters {
		var n atomic.Int64
		res := benchLoad(benchClients, time.Minute, benchGetKeys, func(c, _ int) error {
			return benchDo(cl.c, http.MethodPut, fmt.Sprintf("%s/v2/keys/bench/get/%d", member(cl, c), n.Add(1)-1), value)
		})
		if res.errs > 0 || res.ops < benchGetKeys {
			b.Fatalf("%s cluster: loading %d keys: %d written, %d errors, first: %v", cl.name, benchGetKeys, res.ops, res.errs, res.err)
		}
	}

	for round := 0; round < benchRounds; round++ {
		for _, cl := range clusters {
			measure(put64, cl.name, benchLoad(benchClients, benchWindow, 0, func(c, i int) error {
				return benchDo(cl.c, http.MethodPut, fmt.Sprintf("%s/v2/keys/bench/put/r%d/c%d/%d", member(cl, c), round, c, i), value)
			}))
		}
		for _, cl := range clusters {
			measure(quorum, cl.name, benchLoad(benchClients, benchWindow, 0, func(c, i int) error {
				return benchDo(cl.c, http.MethodGet, fmt.Sprintf("%s/v2/keys/bench/get/%d?quorum=true", member(cl, c), (c*7919+i)%benchGetKeys), "")
			}))
		}
		for _, cl := range clusters {
			// Asked each round: under the load above a leader may have
			// stepped down.
			leader, err := benchLeader(cl.members, 30*time.Second)
			if err != nil {
				serial.note("%s round %d: %v", cl.name, round, err)
				continue
			}
			measure(serial, cl.name, benchLoad(1, benchWindow, 0, func(_, i int) error {
				return benchDo(cl.c, http.MethodPut, fmt.Sprintf("%s/v2/keys/bench/serial/r%d/%d", leader.ClientURL, round, i), value)
			}))
		}
	}
	for _, cl := range clusters {
		cl.c.CloseIdleConnections()
		for _, m := range cl.members {
			m.stop()
		}
	}

	rows := []*benchRow{put64, quorum, serial}
	benchPrint("three-member clusters on loopback", "six server processes on one machine; ", rows)
	b.ReportMetric(0, "ns/op")
	for _, r := range rows {
		if ea, ed := benchMedian(r.values["etcaddy"]), benchMedian(r.values["etcd"]); ea > 0 && ed > 0 {
			b.ReportMetric(ea/ed, "etcaddy/etcd-"+r.metric)
		}
	}
}

// benchEtcaddyCluster starts benchClusterSize etcaddy members of a new
// cluster (plain HTTP peers on loopback), as the cluster tests do.
func benchEtcaddyCluster(b *testing.B) []*testMember {
	b.Helper()
	return startCluster(b, benchClusterSize, nil).members
}

// benchEtcdCluster starts benchClusterSize real etcd 3.4 members of a new
// cluster, with the v2 API and etcd's defaults otherwise (fsync on every
// commit), and waits until each answers /health.
func benchEtcdCluster(b *testing.B) []*testMember {
	b.Helper()
	var env []string
	for _, kv := range os.Environ() {
		// An ETCD_* variable in the caller's environment would configure the reference.
		if !strings.HasPrefix(kv, "ETCD_") {
			env = append(env, kv)
		}
	}
	ms := make([]*testMember, benchClusterSize)
	var initial []string
	for i := range ms {
		name := fmt.Sprintf("e%d", i+1)
		dir := b.TempDir()
		ms[i] = &testMember{
			Name:    name,
			PeerURL: fmt.Sprintf("http://127.0.0.1:%d", freePort(b)),
			proc: &proc{
				Name:      "etcd " + name,
				ClientURL: fmt.Sprintf("http://127.0.0.1:%d", freePort(b)),
				DataDir:   filepath.Join(dir, "data"),
				LogPath:   filepath.Join(dir, "etcd.log"),
				t:         b,
				path:      etcdBin,
				env:       env,
			},
		}
		initial = append(initial, name+"="+ms[i].PeerURL)
	}
	for _, m := range ms {
		m.args = []string{
			"--name", m.Name,
			"--enable-v2",
			"--data-dir", m.DataDir,
			"--listen-client-urls", m.ClientURL,
			"--advertise-client-urls", m.ClientURL,
			"--listen-peer-urls", m.PeerURL,
			"--initial-advertise-peer-urls", m.PeerURL,
			"--initial-cluster", strings.Join(initial, ","),
			"--initial-cluster-state", "new",
			"--logger", "zap",
			"--log-outputs", "stderr",
		}
		m.spawn(b)
	}
	benchWaitHealthy(b, ms)
	return ms
}

// benchWaitHealthy waits until every member answers /health: all of them
// were started first, since none is healthy before a quorum runs.
func benchWaitHealthy(b *testing.B, ms []*testMember) {
	b.Helper()
	for _, m := range ms {
		if err := m.waitHealthy(30 * time.Second); err != nil {
			b.Fatalf("%s did not become healthy: %v", m.Name, err)
		}
	}
}

// benchLeader waits until every member names the same leader and that
// leader has published its client URL, and returns it.
func benchLeader(ms []*testMember, timeout time.Duration) (*testMember, error) {
	var leader *testMember
	if poll(timeout, func() bool {
		var first memberInfo
		for i, m := range ms {
			l, ok := leaderOf(m)
			if !ok || (i > 0 && l.ID != first.ID) {
				return false
			}
			first = l
		}
		for _, m := range ms {
			if len(first.ClientURLs) > 0 && first.ClientURLs[0] == m.ClientURL {
				leader = m
				return true
			}
		}
		return false
	}) {
		return leader, nil
	}
	return nil, fmt.Errorf("members %v agree on no leader within %v", names(ms), timeout)
}
