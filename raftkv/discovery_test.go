package raftkv

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
)

// TestDiscoveryRegistrationsMakeTheCluster: the registrations' values,
// in the order they were made, are the initial cluster, checked as etcd
// checks them.
func TestDiscoveryRegistrationsMakeTheCluster(t *testing.T) {
	reg := func(values ...string) []*discoveryNode {
		var ns []*discoveryNode
		for _, v := range values {
			ns = append(ns, &discoveryNode{Value: v})
		}
		return ns
	}
	tests := []struct {
		name    string
		nodes   []*discoveryNode
		size    uint64
		want    map[string][]string
		wantErr error
	}{
		{"three", reg("n1=http://a:2380", "n2=http://b:2380", "n3=http://c:2380"), 3,
			map[string][]string{"n1": {"http://a:2380"}, "n2": {"http://b:2380"}, "n3": {"http://c:2380"}}, nil},
		{"several peer URLs", reg("n1=http://a:2380,n1=http://a2:2380", "n2=http://b:2380"), 2,
			map[string][]string{"n1": {"http://a:2380", "http://a2:2380"}, "n2": {"http://b:2380"}}, nil},
		{"a name twice", reg("n1=http://a:2380", "n1=http://b:2380"), 2, nil, ErrDiscoveryDuplicateName},
		{"not name=URL", reg("n1=http://a:2380", "http://b:2380"), 2, nil, ErrDiscoveryInvalidURL},
		{"a URL with a path", reg("n1=http://a:2380/x"), 1, nil, ErrDiscoveryInvalidURL},
	}
	for _, tt := range tests {
		got, err := nodesToCluster(tt.nodes, tt.size)
		if !errors.Is(err, tt.wantErr) {
			t.Errorf("%s: error %v, want %v", tt.name, err, tt.wantErr)
			continue
		}
		if tt.wantErr == nil && !equalClusters(got, tt.want) {
			t.Errorf("%s: cluster %v, want %v", tt.name, got, tt.want)
		}
	}
	if _, err := nodesToCluster(reg("n1=http://a:2380", "n2=http://a:2380"), 2); err == nil || !strings.Contains(err.Error(), "duplicate URL") {
		t.Errorf("a URL registered by two members: %v, want a duplicate URL error", err)
	}
}

func equalClusters(a, b map[string][]string) bool {
	if len(a) != len(b) {
		return false
	}
	for name, urls := range a {
		if strings.Join(urls, ",") != strings.Join(b[name], ",") {
			return false
		}
	}
	return true
}

func TestCheckDiscoveryURL(t *testing.T) {
	for _, ok := range []string{"http://10.0.0.1:2379/v2/keys/discovery/abc", "https://discovery.etcd.io/3e86b59982e49066c5d813af1c2e2579cbf573de"} {
		if err := CheckDiscoveryURL(ok); err != nil {
			t.Errorf("%s: %v", ok, err)
		}
	}
	for _, bad := range []string{"", "discovery.etcd.io/abc", "ftp://a/b", "http:///v2/keys/x", "http://a:2379", "http://a:2379/", "http://a/x?y=1", "http://a/x#y"} {
		if err := CheckDiscoveryURL(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

// discoveryConfig is a fresh member's configuration that bootstraps
// through durl.
func discoveryConfig(t *testing.T, durl string) Config {
	return Config{
		Name:           "n1",
		DataDir:        t.TempDir(),
		InitialCluster: map[string][]string{"n1": {"http://127.0.0.1:2380"}},
		Discovery:      durl,
		Logger:         zaptest.NewLogger(t, zaptest.Level(zap.InfoLevel)),
	}
}

// TestDiscoveryDoesNotHoldStartAndStopEndsIt: Start returns while the
// service is unreachable (it is retried in the background); the member
// does not run, requests wait, and Stop ends the discovery at once,
// closing the store for the next node.
func TestDiscoveryDoesNotHoldStartAndStopEndsIt(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close() // nothing listens there: connection refused
	cfg := discoveryConfig(t, "http://"+addr+"/v2/keys/discovery/x")
	n := NewNode(cfg)
	start := time.Now()
	if err := n.Start(); err != nil {
		t.Fatal(err)
	}
	if n.Running() || n.Failed() || !n.Discovering() {
		t.Fatalf("discovering: running %v, failed %v, discovering %v", n.Running(), n.Failed(), n.Discovering())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if err := n.WaitReady(ctx); !errors.Is(err, ErrTimeout) {
		t.Fatalf("WaitReady while discovering: %v, want ErrTimeout", err)
	}
	if err := n.Start(); err != nil {
		t.Fatalf("a second Start while discovering: %v", err)
	}
	if err := n.Stop(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("Start and Stop took %v", d)
	}
	if err := n.WaitReady(context.Background()); !errors.Is(err, ErrStopped) {
		t.Fatalf("WaitReady after Stop: %v, want ErrStopped", err)
	}
	if n.Discovering() {
		t.Fatal("still discovering after Stop")
	}
	// The store is closed: another node opens it.
	cfg.Discovery = ""
	m := NewNode(cfg)
	if err := m.Start(); err != nil {
		t.Fatalf("a node on the same data directory after Stop: %v", err)
	}
	m.Stop()
}

// TestDiscoveryFailureStopsTheMember: a service that is not an etcd keys
// API (here a web server answering HTML) is an error no retry mends: the
// member does not start, Failed reports it, waiting requests end, and a
// new node on the same data directory can start.
func TestDiscoveryFailureStopsTheMember(t *testing.T) {
	web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html")
		w.Write([]byte("<html>a web page</html>"))
	}))
	defer web.Close()
	cfg := discoveryConfig(t, web.URL+"/v2/keys/discovery/x")
	n := NewNode(cfg)
	if err := n.Start(); err != nil {
		t.Fatal(err)
	}
	if err := n.WaitReady(context.Background()); !errors.Is(err, ErrStopped) {
		t.Fatalf("WaitReady: %v, want ErrStopped once discovery failed", err)
	}
	waitFor(t, "Failed", n.Failed)
	if n.Running() || n.Discovering() {
		t.Fatal("running or discovering after a failed discovery")
	}
	if err := n.Stop(); err != nil {
		t.Fatal(err)
	}
	if n.Failed() {
		t.Fatal("still failed after Stop")
	}
	cfg.Discovery = ""
	m := NewNode(cfg)
	if err := m.Start(); err != nil {
		t.Fatalf("a node on the same data directory: %v", err)
	}
	m.Stop()
}

// TestDiscoveryIgnoredOnARestart: a member with Raft state restarts from
// it and never asks the service (which does not exist here).
func TestDiscoveryIgnoredOnARestart(t *testing.T) {
	cfg := discoveryConfig(t, "")
	cfg.Discovery = ""
	n := NewNode(cfg)
	if err := n.Start(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "ready", n.Ready)
	n.Stop()
	cfg.Discovery = "http://127.0.0.1:1/v2/keys/discovery/x"
	m := NewNode(cfg)
	if err := m.Start(); err != nil {
		t.Fatal(err)
	}
	defer m.Stop()
	if !m.Running() || m.Discovering() {
		t.Fatal("a restarted member with a discovery URL does not run at once")
	}
}
