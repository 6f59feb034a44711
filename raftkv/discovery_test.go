package raftkv

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"path"
	"strings"
	"sync"
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

func TestParseDiscoveryProxy(t *testing.T) {
	for raw, want := range map[string]string{
		"":                       "",
		"proxy.internal:3128":    "http://proxy.internal:3128",
		"http-proxy:3128":        "http://http-proxy:3128",
		"httpproxy.corp:8080":    "http://httpproxy.corp:8080",
		"http://10.0.0.1:3128":   "http://10.0.0.1:3128",
		"https://proxy:443":      "https://proxy:443",
		"http://u:p@proxy:3128/": "http://u:p@proxy:3128/",
	} {
		u, err := ParseDiscoveryProxy(raw)
		got := ""
		if u != nil {
			got = u.String()
		}
		if err != nil || got != want {
			t.Errorf("%q: %q, %v; want %q", raw, got, err, want)
		}
	}
	for _, bad := range []string{"ftp://proxy:21", "http://", "%zz"} {
		if u, err := ParseDiscoveryProxy(bad); err == nil {
			t.Errorf("%q accepted as %v", bad, u)
		}
	}
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
	// A retry an hour away: Stop must end the wait, not sit it out.
	defer func(b func(int) time.Duration) { discoveryBackoff = b }(discoveryBackoff)
	discoveryBackoff = func(int) time.Duration { return time.Hour }
	cfg := discoveryConfig(t, "http://"+addr+"/v2/keys/discovery/x")
	n := NewNode(cfg)
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
	stopped := make(chan error, 1)
	go func() { stopped <- n.Stop() }()
	select {
	case err := <-stopped:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Stop did not end the discovery waiting for its retry")
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

// TestDiscoveryWatchLostAndEndedReadsAgain: a watch answered 401 (the
// service's history no longer reaches its index) or ended with an empty
// 200 reads the directory again, after a pause, and goes on. The service
// here is a stand-in: a real etcd answers so only when a watch falls 1000
// events behind, or when it drops a watcher, which no test can time; it
// answers the few requests discovery makes as etcd 3.4 does.
func TestDiscoveryWatchLostAndEndedReadsAgain(t *testing.T) {
	defer func(p time.Duration) { discoveryRecheckPause = p }(discoveryRecheckPause)
	discoveryRecheckPause = 10 * time.Millisecond
	const dir = "/v2/keys/discovery/t"
	var (
		mu       sync.Mutex
		self     string // the registration's value, once made
		watches  int
		requests int
	)
	svc := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		requests++
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Etcd-Index", "7")
		switch {
		case r.URL.Path == dir+"/_config/size":
			fmt.Fprint(w, `{"action":"get","node":{"key":"/discovery/t/_config/size","value":"2","modifiedIndex":5,"createdIndex":5}}`)
		case r.Method == http.MethodPut:
			r.ParseForm()
			self = r.PostForm.Get("value")
			w.WriteHeader(http.StatusCreated)
			fmt.Fprintf(w, `{"action":"create","node":{"key":"/discovery/t/%s","value":%q,"modifiedIndex":6,"createdIndex":6}}`, path.Base(r.URL.Path), self)
		case r.URL.Query().Get("wait") == "true":
			watches++
			switch watches {
			case 1:
				w.WriteHeader(http.StatusBadRequest)
				fmt.Fprint(w, `{"errorCode":401,"message":"The event in requested index is outdated and cleared","cause":"the requested history has been cleared [1008/8]","index":2007}`)
			case 2: // an ended watch
			default:
				fmt.Fprint(w, `{"action":"create","node":{"key":"/discovery/t/b0b","value":"n2=http://127.0.0.2:2380","modifiedIndex":9,"createdIndex":9}}`)
			}
		default: // the directory
			nodes := `{"key":"/discovery/t/_config","dir":true,"modifiedIndex":5,"createdIndex":5}`
			if self != "" {
				nodes += fmt.Sprintf(`,{"key":"/discovery/t/self","value":%q,"modifiedIndex":6,"createdIndex":6}`, self)
			}
			fmt.Fprintf(w, `{"action":"get","node":{"key":"/discovery/t","dir":true,"nodes":[%s],"modifiedIndex":5,"createdIndex":5}}`, nodes)
		}
	}))
	defer svc.Close()
	d, err := newDiscoverer(svc.URL+dir, "", "n1", []string{"http://127.0.0.1:2380"}, 1, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	d.self = "self"
	d.registered = func() error { return nil }
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cluster, err := d.join(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string][]string{"n1": {"http://127.0.0.1:2380"}, "n2": {"http://127.0.0.2:2380"}}
	if !equalClusters(cluster, want) {
		t.Fatalf("cluster %v, want %v", cluster, want)
	}
	mu.Lock()
	defer mu.Unlock()
	if watches != 3 || requests > 12 {
		t.Fatalf("%d watches, %d requests in all; want 3 watches and a handful of reads", watches, requests)
	}
}

// TestDiscoveryRegistrationWhoseAnswerWasLostIsOurs: a registration that
// landed but whose answer did not (here a 503 after the write) is this
// member's own when its retry finds the key, not another's duplicate ID.
// The service is a stand-in, as above: a real etcd does not lose the
// answer of a write it made on demand.
func TestDiscoveryRegistrationWhoseAnswerWasLostIsOurs(t *testing.T) {
	defer func(b func(int) time.Duration) { discoveryBackoff = b }(discoveryBackoff)
	discoveryBackoff = func(int) time.Duration { return time.Millisecond }
	const dir = "/v2/keys/discovery/lost"
	var (
		mu   sync.Mutex
		self string
	)
	svc := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		w.Header().Set("X-Etcd-Index", "7")
		switch {
		case r.URL.Path == dir+"/_config/size":
			fmt.Fprint(w, `{"action":"get","node":{"key":"/discovery/lost/_config/size","value":"1","modifiedIndex":5,"createdIndex":5}}`)
		case r.Method == http.MethodPut && self == "":
			r.ParseForm()
			self = r.PostForm.Get("value")
			w.WriteHeader(http.StatusServiceUnavailable) // written, but the answer is lost
		case r.Method == http.MethodPut:
			w.WriteHeader(http.StatusPreconditionFailed)
			fmt.Fprint(w, `{"errorCode":105,"message":"Key already exists","cause":"/discovery/lost/self","index":6}`)
		case r.URL.Path == dir+"/self":
			fmt.Fprintf(w, `{"action":"get","node":{"key":"/discovery/lost/self","value":%q,"modifiedIndex":6,"createdIndex":6}}`, self)
		default: // the directory
			nodes := `{"key":"/discovery/lost/_config","dir":true,"modifiedIndex":5,"createdIndex":5}`
			if self != "" {
				nodes += fmt.Sprintf(`,{"key":"/discovery/lost/self","value":%q,"modifiedIndex":6,"createdIndex":6}`, self)
			}
			fmt.Fprintf(w, `{"action":"get","node":{"key":"/discovery/lost","dir":true,"nodes":[%s],"modifiedIndex":5,"createdIndex":5}}`, nodes)
		}
	}))
	defer svc.Close()
	d, err := newDiscoverer(svc.URL+dir, "", "n1", []string{"http://127.0.0.1:2380"}, 1, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	d.self = "self"
	d.registered = func() error { return nil } // a first start: d.mine is false
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cluster, err := d.join(ctx)
	if err != nil {
		t.Fatalf("join after a registration whose answer was lost: %v", err)
	}
	if !equalClusters(cluster, map[string][]string{"n1": {"http://127.0.0.1:2380"}}) {
		t.Fatalf("cluster %v", cluster)
	}
}
