package raftkv

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httptrace"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/etcaddy/etcaddy/raftkv/dnstest"
	"github.com/etcaddy/etcaddy/storage"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
)

// proxiedCluster is a two-member cluster whose members have published
// their client URLs, which a proxy of it forwards to. Each member must know
// both: a proxy reads the member list from whichever member answers it, and
// a follower may apply the other member's publication after the leader.
// Known as its peer endpoint lists them (memberSnapshot): Members shows a
// member's own client URLs from its config before its publication applies.
func proxiedCluster(t *testing.T) *testCluster {
	c := newTestCluster(t, 2, nil)
	c.waitLeader(c.members...)
	waitOnEach(t, c.members, "both members' client URLs published", func(member *testMember) bool {
		n := 0
		for _, m := range member.n().memberSnapshot() {
			n += len(m.ClientURLs)
		}
		return n == 2
	})
	return c
}

// TestProxyRunsFromItsDataDirectory: a data directory marked as a proxy's
// (its discovery found the cluster full) starts a proxy, whatever the
// config says: never ready, no Raft, its endpoints the client URLs the
// cluster's members publish; an endpoint that failed is left out for
// the failure wait; Stop closes the store.
func TestProxyRunsFromItsDataDirectory(t *testing.T) {
	c := proxiedCluster(t)

	dir := t.TempDir()
	st, err := storage.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := saveProxyCluster(st, []string{c.members[1].url, c.members[0].url}); err != nil {
		t.Fatal(err)
	}
	st.Close()
	n := NewNode(Config{Name: "px", DataDir: dir, ProxyFailureWait: 100 * time.Millisecond, Logger: zaptest.NewLogger(t, zaptest.Level(zap.InfoLevel))})
	if err := n.Start(); err != nil {
		t.Fatal(err)
	}
	px := n.Proxy()
	if px == nil || n.Running() || n.Discovering() || n.Failed() {
		t.Fatalf("proxy %v, running %v, discovering %v, failed %v", px, n.Running(), n.Discovering(), n.Failed())
	}
	if err := n.WaitReady(context.Background()); !errors.Is(err, ErrStopped) {
		t.Fatalf("WaitReady on a proxy: %v, want ErrStopped (it never will be)", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	px.WaitEndpoints(ctx)
	endpoints := func() []string {
		var out []string
		for _, u := range px.Endpoints() {
			out = append(out, u.String())
		}
		slices.Sort(out)
		return out
	}
	want := []string{"http://m0.example:2379", "http://m1.example:2379"}
	if got := endpoints(); !slices.Equal(got, want) {
		t.Fatalf("endpoints %v, want %v", got, want)
	}
	failedAt := time.Now()
	px.Failed(px.Endpoints()[0])
	if got := px.Endpoints(); len(got) != 1 {
		t.Fatalf("after a failure: endpoints %v, want one left", got)
	}
	px.mu.Lock()
	for _, e := range px.endpoints {
		if !e.downUntil.IsZero() && e.downUntil.After(failedAt.Add(time.Second)) {
			t.Errorf("the endpoint is out until %v after its failure: the configured failure wait is 100ms", e.downUntil.Sub(failedAt))
		}
	}
	px.mu.Unlock()
	waitFor(t, "the failed endpoint back", func() bool { return len(px.Endpoints()) == 2 })
	if err := n.Stop(); err != nil {
		t.Fatal(err)
	}
	st, err = storage.Open(dir)
	if err != nil {
		t.Fatalf("the store after Stop: %v", err)
	}
	peers, err := proxyPeerURLs(st)
	st.Close()
	wantPeers := []string{c.members[0].url, c.members[1].url}
	slices.Sort(wantPeers)
	if err != nil || !slices.Equal(peers, wantPeers) {
		t.Fatalf("the saved peer URLs %v (%v), want the cluster's, sorted", peers, err)
	}
}

// TestProxyTransportChecksTheHostDialed: with a cluster CA, the proxy
// checks a client URL's certificate for the host it dialed, an address
// too (for which TLS sends no server name): a certificate of the CA for
// another name is refused.
func TestProxyTransportChecksTheHostDialed(t *testing.T) {
	ca := newPeerTestCA(t)
	other := func() tls.Certificate {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "evil.example"},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
			DNSNames: []string{"evil.example"}}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
		if err != nil {
			t.Fatal(err)
		}
		return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	}()
	p := newProxy(nil, nil, &tls.Config{RootCAs: ca.pool}, false, proxyTimeouts{dial: time.Second}, zap.NewNop())
	defer p.transport.CloseIdleConnections()
	for _, tc := range []struct {
		name string
		cert tls.Certificate
		ok   bool
	}{
		{"for 127.0.0.1", ca.issue(t, "m1", x509.ExtKeyUsageServerAuth), true},
		{"for another name", other, false},
	} {
		srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
		srv.TLS = &tls.Config{Certificates: []tls.Certificate{tc.cert}}
		srv.StartTLS()
		req, err := http.NewRequest(http.MethodGet, srv.URL+"/version", nil)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := p.Transport().RoundTrip(req)
		if err == nil {
			resp.Body.Close()
		}
		if (err == nil) != tc.ok {
			t.Errorf("%s at %s: error %v, want success %v", tc.name, srv.URL, err, tc.ok)
		}
		srv.Close()
	}
}

// TestProxyFromSRVRecords: a member with proxy on and a DNS SRV domain reads
// its cluster from the records (it needs no record of its own) and runs as
// its proxy.
func TestProxyFromSRVRecords(t *testing.T) {
	c := proxiedCluster(t)
	dns := dnstest.Start(t, "127.0.0.1:0")
	var recs []dnstest.SRV
	for _, m := range c.members {
		u, err := url.Parse(m.url)
		if err != nil {
			t.Fatal(err)
		}
		port, err := strconv.Atoi(u.Port())
		if err != nil {
			t.Fatal(err)
		}
		recs = append(recs, dnstest.SRV{Target: "localhost", Port: uint16(port)})
	}
	dns.SetSRV("_etcd-server._tcp."+srvDomain, recs...)
	cfg := srvConfig(t, dns, "px", "http://127.0.0.1:9")
	cfg.Proxy = "on"
	n := NewNode(cfg)
	if err := n.Start(); err != nil {
		t.Fatal(err)
	}
	defer n.Stop()
	waitFor(t, "the proxy", func() bool { return n.Proxy() != nil })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	n.Proxy().WaitEndpoints(ctx)
	if got := n.Proxy().Endpoints(); len(got) != 2 {
		t.Fatalf("endpoints %v, want the two members' client URLs", got)
	}
	if q := dns.Queries("_etcd-server._tcp." + srvDomain); q == 0 {
		t.Fatal("the records were not read")
	}
}

// TestProxyTransportTimeouts: the proxy's read and write timeouts (etcd's
// --proxy-read-timeout and --proxy-write-timeout) end a request to a member
// that takes the connection and then neither answers nor reads; without
// them the request waits as long as its context. With a read timeout the
// proxy speaks HTTP/1.1 to a member that offers HTTP/2 too.
func TestProxyTransportTimeouts(t *testing.T) {
	// A member that takes connections and does nothing more with them.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var conns []net.Conn
	var mu sync.Mutex
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	defer func() {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	}()
	// More than the loopback socket buffers on both ends take.
	big := bytes.Repeat([]byte("x"), 64<<20)
	roundTrip := func(to proxyTimeouts, body []byte, wait time.Duration) error {
		t.Helper()
		p := newProxy(nil, nil, nil, false, to, zap.NewNop())
		defer p.transport.CloseIdleConnections()
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		defer cancel()
		req, err := http.NewRequestWithContext(ctx, http.MethodPut, "http://"+ln.Addr().String()+"/v2/keys/a", bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		resp, err := p.Transport().RoundTrip(req)
		if err == nil {
			resp.Body.Close()
			t.Fatalf("%+v: an answer from a member that gives none", to)
		}
		return err
	}
	isTimeout := func(err error) bool {
		var ne net.Error
		return errors.As(err, &ne) && ne.Timeout() && !errors.Is(err, context.DeadlineExceeded)
	}
	for _, tc := range []struct {
		name string
		to   proxyTimeouts
		body []byte
	}{
		{"read timeout", proxyTimeouts{dial: time.Second, read: 200 * time.Millisecond}, []byte("value=1")},
		{"write timeout", proxyTimeouts{dial: time.Second, write: 200 * time.Millisecond}, big},
	} {
		if err := roundTrip(tc.to, tc.body, 30*time.Second); !isTimeout(err) {
			t.Errorf("%s: %v, want the connection's timeout", tc.name, err)
		}
	}
	// Without them, only the request's own context ends it.
	for _, body := range [][]byte{[]byte("value=1"), big} {
		if err := roundTrip(proxyTimeouts{dial: time.Second}, body, time.Second); !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("no timeouts, a body of %d bytes: %v, want the request's context's end", len(body), err)
		}
	}

	// A request on a connection that was idle a while gets the whole read
	// timeout for its answer: the transport's read waiting on the idle
	// connection started earlier. A POST, which the transport does not
	// send again on another connection.
	slow := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if d, err := time.ParseDuration(r.URL.Query().Get("wait")); err == nil {
			time.Sleep(d) // a member slow to answer: the test's subject, not a wait for a condition
		}
	}))
	defer slow.Close()
	const readTimeout = time.Second
	reused := false
	for attempt := 0; attempt < 3 && !reused; attempt++ {
		p := newProxy(nil, nil, nil, false, proxyTimeouts{dial: time.Second, read: readTimeout}, zap.NewNop())
		post := func(wait time.Duration) (bool, error) {
			var got httptrace.GotConnInfo
			ctx := httptrace.WithClientTrace(context.Background(), &httptrace.ClientTrace{GotConn: func(i httptrace.GotConnInfo) { got = i }})
			req, err := http.NewRequestWithContext(ctx, http.MethodPost, slow.URL+"/v2/keys/q?wait="+wait.String(), io.NopCloser(strings.NewReader("value=1")))
			if err != nil {
				t.Fatal(err)
			}
			resp, err := p.Transport().RoundTrip(req)
			if err == nil {
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
			return got.Reused, err
		}
		if _, err := post(0); err != nil {
			t.Fatal(err)
		}
		time.Sleep(3 * readTimeout / 10) // the connection idles (the test's subject, not a wait for a condition)
		r, err := post(8 * readTimeout / 10)
		p.transport.CloseIdleConnections()
		if !r {
			continue // idled out of the pool: the scenario did not happen
		}
		reused = true
		if err != nil {
			t.Errorf("a POST on a connection idle for %v, answered after %v, with a read timeout of %v: %v", 3*readTimeout/10, 8*readTimeout/10, readTimeout, err)
		}
	}
	if !reused {
		t.Error("the second POST never went on the first one's connection")
	}

	// HTTP/2 where the member offers it, unless reads have a timeout.
	ca := newPeerTestCA(t)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	srv.EnableHTTP2 = true
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{ca.issue(t, "m1", x509.ExtKeyUsageServerAuth)}}
	srv.StartTLS()
	defer srv.Close()
	for _, tc := range []struct {
		to    proxyTimeouts
		major int
	}{
		{proxyTimeouts{dial: time.Second, write: time.Second}, 2},
		{proxyTimeouts{dial: time.Second, read: time.Second, write: time.Second}, 1},
	} {
		p := newProxy(nil, nil, &tls.Config{RootCAs: ca.pool}, false, tc.to, zap.NewNop())
		req, err := http.NewRequest(http.MethodGet, srv.URL+"/version", nil)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := p.Transport().RoundTrip(req)
		if err != nil {
			t.Fatalf("%+v: %v", tc.to, err)
		}
		resp.Body.Close()
		if resp.ProtoMajor != tc.major {
			t.Errorf("%+v: HTTP/%d, want HTTP/%d", tc.to, resp.ProtoMajor, tc.major)
		}
		p.transport.CloseIdleConnections()
	}
}

// TestProxyTimeoutsInEffect: zero takes etcd's defaults (no read timeout, a
// 5 s write timeout), a negative duration is none, and reloads compare the
// timeouts this way (a write timeout of 0 and one of 5 s are the same).
func TestProxyTimeoutsInEffect(t *testing.T) {
	for _, tc := range []struct{ read, write, wantRead, wantWrite time.Duration }{
		{0, 0, 0, DefaultProxyWriteTimeout},
		{-1, -1, 0, 0},
		{-time.Second, 0, 0, DefaultProxyWriteTimeout},
		{time.Second, 2 * time.Second, time.Second, 2 * time.Second},
	} {
		read, write := Config{ProxyReadTimeout: tc.read, ProxyWriteTimeout: tc.write}.ProxyTimeoutsInEffect()
		if read != tc.wantRead || write != tc.wantWrite {
			t.Errorf("read %v, write %v: in effect %v, %v; want %v, %v", tc.read, tc.write, read, write, tc.wantRead, tc.wantWrite)
		}
	}
}
