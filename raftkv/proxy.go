package raftkv

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"slices"
	"sync"
	"time"

	"github.com/etcaddy/etcaddy/storage"
	"go.uber.org/zap"
)

// metaProxy marks a data directory whose member runs as a proxy: the JSON
// {"PeerURLs": [...]} of the cluster it forwards to (etcd's
// <data-dir>/proxy/cluster file, which makes every later start a proxy).
const metaProxy = "raftkv/proxy"

// etcd's proxy timings' defaults (--proxy-refresh-interval,
// --proxy-failure-wait, --proxy-dial-timeout, --proxy-write-timeout): the
// cluster's client URLs are read again every refresh interval, or every
// second while none is available (when the interval is the default or
// longer, as etcd's); an endpoint that failed is left out for the failure
// wait. Reads have no timeout by default (etcd's --proxy-read-timeout 0).
const (
	DefaultProxyRefreshInterval = 30 * time.Second
	DefaultProxyFailureWait     = 5 * time.Second
	DefaultProxyDialTimeout     = time.Second
	DefaultProxyWriteTimeout    = 5 * time.Second
	proxyEmptyRefresh           = time.Second
)

// Proxy is a member that runs as a v2 proxy of its cluster, as etcd runs a
// member whose discovery found the cluster full (--discovery-fallback
// proxy, etcd's default), or one started with --proxy: it takes no part in
// Raft and keeps no keys; the etcd handler forwards every client request
// to one of the cluster's client URLs (Endpoints), which it reads from the
// members' peer endpoints (an etcaddy's /raft/members, or an etcd's
// /members) and reads again every refresh interval. The cluster's peer
// URLs are kept in the data directory, so the member starts as a proxy
// again.
type Proxy struct {
	lg         *zap.Logger
	st         *storage.Store
	peerClient *http.Client
	transport  *http.Transport

	firstc       chan struct{} // closed once the first refresh is done
	warned       bool          // a refresh found no endpoint and said so (run's goroutine only)
	readOnly     bool
	why          string // why the member runs as a proxy (Why)
	refreshEvery time.Duration
	failWait     time.Duration

	mu        sync.Mutex
	peerURLs  []string
	endpoints []*proxyEndpoint
}

// WaitEndpoints waits until the proxy has read the cluster once (at its
// start), or ctx ends, as etcd's proxy reads it before it serves.
func (p *Proxy) WaitEndpoints(ctx context.Context) {
	select {
	case <-p.firstc:
	case <-ctx.Done():
	}
}

type proxyEndpoint struct {
	url       *url.URL
	downUntil time.Time
}

// proxyCluster is what metaProxy holds (etcd's cluster file's JSON).
type proxyCluster struct {
	PeerURLs []string
}

// Proxy returns the member's proxy when it runs as one, else nil.
func (n *Node) Proxy() *Proxy { return n.proxy.Load() }

// Endpoints lists the client URLs a request may go to now, in the order to
// try them (shuffled at each refresh, as etcd's, so that proxies spread
// their clients); an endpoint that failed within the failure wait is left
// out.
func (p *Proxy) Endpoints() []*url.URL {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := time.Now()
	var out []*url.URL
	for _, e := range p.endpoints {
		if now.After(e.downUntil) {
			u := *e.url
			out = append(out, &u)
		}
	}
	return out
}

// Failed leaves u out of Endpoints for the failure wait: a request could
// not reach it.
func (p *Proxy) Failed(u *url.URL) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, e := range p.endpoints {
		if e.url.String() == u.String() {
			e.downUntil = time.Now().Add(p.failWait)
			p.lg.Info("proxy: marked endpoint unavailable", zap.String("endpoint", u.String()))
		}
	}
}

// PeerURLs are the cluster's peer URLs as the proxy last read them.
func (p *Proxy) PeerURLs() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.peerURLs)
}

// Transport reaches the members' client URLs: directly (no proxy from the
// environment), with the member's peer TLS client certificate, trusting
// the system's roots and the cluster CA of peer_trusted_ca_file.
func (p *Proxy) Transport() http.RoundTripper { return p.transport }

// ProxyTimeoutsInEffect are the proxy's read and write timeouts as they
// apply (0: none): zero takes etcd's default (none for reads,
// DefaultProxyWriteTimeout for writes), a negative duration is none.
func (c Config) ProxyTimeoutsInEffect() (read, write time.Duration) {
	read, write = max(c.ProxyReadTimeout, 0), max(c.ProxyWriteTimeout, 0)
	if c.ProxyWriteTimeout == 0 {
		write = DefaultProxyWriteTimeout
	}
	return read, write
}

// proxyTimeouts are how long a proxy gives a member's client URL to take
// a connection (dial), and each read from and write to it; zero or
// negative: no limit (read and write).
type proxyTimeouts struct {
	dial, read, write time.Duration
}

// newProxy builds the proxy of the cluster at peerURLs, dialing peers with
// peerTLS and the members' client URLs within to.
func newProxy(st *storage.Store, peerURLs []string, peerTLS *tls.Config, h2c bool, to proxyTimeouts, lg *zap.Logger) *Proxy {
	dialer := peerDialer()
	dialer.Timeout = to.dial
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dialer.DialContext(ctx, network, addr)
		if err != nil || to.read <= 0 && to.write <= 0 {
			return c, err
		}
		return &deadlineConn{Conn: c, read: to.read, write: to.write}, nil
	}
	tr := &http.Transport{
		Proxy:               nil,
		DialContext:         dial,
		TLSHandshakeTimeout: 5 * time.Second,
		ForceAttemptHTTP2:   true,
		MaxIdleConnsPerHost: 64,
		IdleConnTimeout:     90 * time.Second,
		// A member that vanished without a FIN is noticed instead of
		// holding every watch on its connection.
		HTTP2: &http.HTTP2Config{SendPingTimeout: 10 * time.Second, PingTimeout: 5 * time.Second},
	}
	protos := []string{"h2", "http/1.1"}
	if to.read > 0 {
		// A read timeout is a limit per request, as etcd's proxy (which
		// speaks HTTP/1.1 to members) has it: a watch that waits longer
		// ends. On HTTP/2 every request shares a connection, whose reads
		// the other requests' answers and the pings keep going.
		tr.ForceAttemptHTTP2 = false
		tr.Protocols = new(http.Protocols)
		tr.Protocols.SetHTTP1(true)
		protos = []string{"http/1.1"}
		// An idle connection's wait for its next answer counts as a read
		// too: the pool lets it go before that times out, rather than
		// hand a request a connection about to fail.
		tr.IdleConnTimeout = min(tr.IdleConnTimeout, to.read/2)
	}
	if peerTLS != nil {
		tr.TLSClientConfig = peerTLS.Clone()
		if cluster := peerTLS.RootCAs; cluster != nil {
			// Client sites may have certificates from a public CA (Caddy's
			// automatic HTTPS) or from the cluster's: either will do, for
			// the host dialed (an address too, for which no server name is
			// sent, so the check must know it).
			tr.DialTLSContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
				host, _, err := net.SplitHostPort(addr)
				if err != nil {
					return nil, err
				}
				raw, err := dial(ctx, network, addr)
				if err != nil {
					return nil, err
				}
				cfg := peerTLS.Clone()
				if net.ParseIP(host) == nil {
					cfg.ServerName = host
				}
				cfg.NextProtos = protos
				cfg.InsecureSkipVerify = true
				cfg.VerifyConnection = verifyEither(cluster, host)
				conn := tls.Client(raw, cfg)
				hctx, cancel := context.WithTimeout(ctx, 5*time.Second)
				defer cancel()
				if err := conn.HandshakeContext(hctx); err != nil {
					raw.Close()
					return nil, err
				}
				return conn, nil
			}
		}
	}
	return &Proxy{
		lg:           lg,
		st:           st,
		peerClient:   newPeerClient(peerTLS, h2c),
		transport:    tr,
		peerURLs:     slices.Clone(peerURLs),
		firstc:       make(chan struct{}),
		refreshEvery: DefaultProxyRefreshInterval,
		failWait:     DefaultProxyFailureWait,
	}
}

// verifyEither checks a server's chain for host against the system's
// roots, and failing that against cluster.
func verifyEither(cluster *x509.CertPool, host string) func(tls.ConnectionState) error {
	return func(cs tls.ConnectionState) error {
		if err := verifyServer(cs, host, nil, cluster); err != nil {
			return fmt.Errorf("the server's certificate, against the system's roots and the cluster CA: %w", err)
		}
		return nil
	}
}

// verifyServer checks the chain cs presents for name against each of
// roots in turn (nil: the system's), as Go's own check does for the host
// it dialed; the first that takes it will do.
func verifyServer(cs tls.ConnectionState, name string, roots ...*x509.CertPool) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("the server presented no certificate")
	}
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	var errs []error
	for _, pool := range roots {
		_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{DNSName: name, Roots: pool, Intermediates: inter})
		if err == nil {
			return nil
		}
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// refresh reads the cluster from the first peer that answers: its client
// URLs become the endpoints (all available, shuffled), its peer URLs the
// ones asked next time (saved when they changed). When no peer answers
// there are no endpoints, as with etcd.
func (p *Proxy) refresh(ctx context.Context) {
	var members []memberRecord
	var lastErr error
	for _, u := range p.PeerURLs() {
		ms, _, err := fetchMembers(ctx, p.peerClient, u, 5*time.Second)
		if err != nil && ctx.Err() == nil {
			// An etcd cluster's member: its own list, as etcd's proxy
			// reads it.
			if ems, _, eerr := fetchMembersAt(ctx, p.peerClient, u+etcdMembersPath, "X-Etcd-Cluster-Id", 5*time.Second); eerr == nil {
				ms, err = ems, nil
			}
		}
		if err == nil {
			members = ms
			break
		}
		lastErr = err
	}
	if members == nil {
		if ctx.Err() == nil {
			p.warnOnce("proxy: cannot read the cluster's members (said once until it can)", zap.Strings("peer-urls", p.PeerURLs()), zap.Error(lastErr))
		}
		p.mu.Lock()
		p.endpoints = nil
		p.mu.Unlock()
		return
	}
	var clientURLs, peerURLs []string
	for _, m := range members {
		clientURLs = append(clientURLs, m.ClientURLs...)
		peerURLs = append(peerURLs, m.PeerURLs...)
	}
	slices.Sort(clientURLs)
	slices.Sort(peerURLs)
	clientURLs, peerURLs = slices.Compact(clientURLs), slices.Compact(peerURLs)
	var eps []*proxyEndpoint
	for _, raw := range clientURLs {
		u, err := url.Parse(raw)
		if err != nil || u.Host == "" {
			p.lg.Warn("proxy: a member's client URL is not a URL", zap.String("url", raw))
			continue
		}
		eps = append(eps, &proxyEndpoint{url: u})
	}
	rand.Shuffle(len(eps), func(i, j int) { eps[i], eps[j] = eps[j], eps[i] })
	p.mu.Lock()
	changed := !slices.Equal(p.peerURLs, peerURLs)
	p.peerURLs = peerURLs
	p.endpoints = eps
	p.mu.Unlock()
	if changed {
		p.lg.Info("proxy: the cluster's peer URLs changed", zap.Strings("peer-urls", peerURLs))
		if err := saveProxyCluster(p.st, peerURLs); err != nil {
			p.lg.Warn("proxy: saving the cluster's peer URLs", zap.Error(err))
		}
	}
	if len(eps) == 0 {
		p.warnOnce("proxy: the cluster's members publish no client URLs (advertise_client_urls; said once until they do)")
		return
	}
	if p.warned {
		p.lg.Info("proxy: endpoints found", zap.Stringers("endpoints", p.Endpoints()))
		p.warned = false
	}
}

// warnOnce logs a refresh that found no endpoint, once until one finds
// some: a refresh runs every second then.
func (p *Proxy) warnOnce(msg string, fields ...zap.Field) {
	if !p.warned {
		p.lg.Warn(msg, fields...)
		p.warned = true
	}
}

// run refreshes the endpoints until ctx ends: at once, then every refresh
// interval, or every proxyEmptyRefresh while none is available (when the
// interval is not shorter than etcd's default, as etcd's director does).
func (p *Proxy) run(ctx context.Context) {
	defer p.transport.CloseIdleConnections()
	defer p.peerClient.CloseIdleConnections()
	p.refresh(ctx)
	p.lg.Info("proxy: endpoints found", zap.Stringers("endpoints", p.Endpoints()))
	close(p.firstc)
	for {
		wait := p.refreshEvery
		if len(p.Endpoints()) == 0 && wait >= DefaultProxyRefreshInterval {
			wait = proxyEmptyRefresh
		}
		if err := sleepCtx(ctx, wait); err != nil {
			return
		}
		p.refresh(ctx)
	}
}

func saveProxyCluster(st *storage.Store, peerURLs []string) error {
	b, err := json.Marshal(proxyCluster{PeerURLs: peerURLs})
	if err != nil {
		return err
	}
	return st.SetMeta(metaProxy, b)
}

// proxyPeerURLs reads a data directory's proxy mark: the cluster's peer
// URLs, or nil when its member is no proxy.
func proxyPeerURLs(st *storage.Store) ([]string, error) {
	b := st.Meta(metaProxy)
	if b == nil {
		return nil, nil
	}
	var c proxyCluster
	if err := json.Unmarshal(b, &c); err != nil || len(c.PeerURLs) == 0 {
		return nil, fmt.Errorf("raftkv: the data directory's proxy record %q is damaged", b)
	}
	return c.PeerURLs, nil
}

// clusterPeerURLs lists every peer URL of cluster, sorted.
func clusterPeerURLs(cluster map[string][]string) []string {
	var peers []string
	for _, urls := range cluster {
		peers = append(peers, urls...)
	}
	slices.Sort(peers)
	return slices.Compact(peers)
}

// ReadOnly reports whether the proxy forwards GET requests only (etcd's
// --proxy readonly); it answers every other 501.
func (p *Proxy) ReadOnly() bool { return p.readOnly }

// Why says why the member runs as a proxy: "proxy on" or "proxy readonly"
// (the option), that its discovery found the cluster full, or that its data
// directory keeps it one.
func (p *Proxy) Why() string { return p.why }

// startProxy runs the member as a proxy of the cluster at peerURLs on st
// (whose Raft state is empty), for the reason why, until Stop, which ends
// it as it ends a discovery (n.disc): the store stays open (the data
// directory is the proxy's) and closes when the proxy ends. The member
// never becomes ready. The caller holds lifeMu, and hands st over.
func (n *Node) startProxy(st *storage.Store, peerURLs []string, why string) error {
	if err := saveProxyCluster(st, peerURLs); err != nil {
		return err
	}
	read, write := n.cfg.ProxyTimeoutsInEffect()
	p := newProxy(st, peerURLs, n.cfg.Peer.TLS, n.cfg.Peer.H2C,
		proxyTimeouts{dial: n.cfg.ProxyDialTimeout, read: read, write: write}, n.lg.Named("proxy"))
	p.readOnly = n.cfg.Proxy == "readonly"
	p.why = why
	p.refreshEvery, p.failWait = n.cfg.ProxyRefreshInterval, n.cfg.ProxyFailureWait
	ctx, cancel := context.WithCancel(context.Background())
	d := &discoveryRun{cancel: cancel, done: make(chan struct{})}
	n.disc = d
	n.proxy.Store(p)
	n.halt()
	n.lg.Info("proxy: this member forwards client requests to its cluster (v2 API only)", zap.String("why", why), zap.Strings("peer-urls", peerURLs))
	go func() {
		defer close(d.done)
		defer func() {
			if err := st.Close(); err != nil {
				n.lg.Warn("closing the proxy's store", zap.Error(err))
			}
		}()
		p.run(ctx)
	}()
	return nil
}

// deadlineConn gives each Read and Write of a connection its own deadline,
// read or write from when it starts (none when zero), as etcd's proxy's
// timeoutConn does: a member that stops answering, or stops reading what
// it is sent, ends the request that waits on it. A write also starts the
// read's time again: the transport keeps a read waiting on an idle
// connection, and a request sent on it later gets the whole read timeout
// for its answer.
type deadlineConn struct {
	net.Conn
	read, write time.Duration
}

func (c *deadlineConn) Read(b []byte) (int, error) {
	if c.read > 0 {
		if err := c.SetReadDeadline(time.Now().Add(c.read)); err != nil {
			return 0, err
		}
	}
	return c.Conn.Read(b)
}

func (c *deadlineConn) Write(b []byte) (int, error) {
	if c.write > 0 {
		if err := c.SetWriteDeadline(time.Now().Add(c.write)); err != nil {
			return 0, err
		}
	}
	n, err := c.Conn.Write(b)
	if c.read > 0 && err == nil {
		if derr := c.SetReadDeadline(time.Now().Add(c.read)); derr != nil {
			return n, derr
		}
	}
	return n, err
}
