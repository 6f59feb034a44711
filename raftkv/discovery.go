package raftkv

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/url"
	"path"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/etcaddy/etcaddy/storage"
	"go.uber.org/zap"
)

// Discovery errors, with etcd's messages (etcdserver/api/v2discovery).
var (
	ErrDiscoveryFullCluster   = errors.New("discovery: cluster is full")
	ErrDiscoverySizeNotFound  = errors.New("discovery: size key not found")
	ErrDiscoveryBadSizeKey    = errors.New("discovery: size key is bad")
	ErrDiscoveryDuplicateID   = errors.New("discovery: found duplicate id")
	ErrDiscoveryDuplicateName = errors.New("discovery: found duplicate name")
	ErrDiscoveryInvalidURL    = errors.New("discovery: invalid URL")
	ErrDiscoveryBadEndpoint   = errors.New("discovery: bad discovery endpoint")
)

// CheckDiscoveryURL checks a discovery URL as a member needs it: http or
// https, a host, and the path of the cluster's directory on the service
// (on an etcd, /v2/keys/<dir>; on discovery.etcd.io, /<token>).
func CheckDiscoveryURL(raw string) error {
	u, err := url.Parse(raw)
	if err != nil {
		return fmt.Errorf("discovery URL %q: %w", raw, err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return fmt.Errorf("discovery URL %q: the scheme must be http or https", raw)
	}
	if u.Host == "" {
		return fmt.Errorf("discovery URL %q has no host", raw)
	}
	if strings.Trim(u.Path, "/") == "" {
		return fmt.Errorf("discovery URL %q has no path: it names the cluster's directory on the service (for an etcd, /v2/keys/discovery/<token>)", raw)
	}
	if u.RawQuery != "" || u.Fragment != "" {
		return fmt.Errorf("discovery URL %q: no query or fragment", raw)
	}
	return nil
}

// ParseDiscoveryProxy reads a discovery proxy as etcd's --discovery-proxy
// does: a URL, or host:port for http://host:port. Empty: no proxy.
func ParseDiscoveryProxy(raw string) (*url.URL, error) {
	if raw == "" {
		return nil, nil
	}
	u, err := url.Parse(raw)
	if !strings.Contains(raw, "://") && (err != nil || u.Host == "" || u.Scheme != "http" && u.Scheme != "https") {
		// host:port: etcd tries again with http:// in front (it parses
		// as a scheme and an opaque part; http-proxy:3128 too).
		if u2, err2 := url.Parse("http://" + raw); err2 == nil {
			u, err = u2, nil
		}
	}
	if err != nil {
		return nil, fmt.Errorf("invalid discovery proxy address %q: %v", raw, err)
	}
	if u.Host == "" || u.Scheme != "http" && u.Scheme != "https" {
		return nil, fmt.Errorf("invalid discovery proxy address %q: want http://host:port or host:port", raw)
	}
	return u, nil
}

// discoveryRequestTimeout bounds each request to the discovery service but
// the watch (etcd's client.DefaultRequestTimeout).
const discoveryRequestTimeout = 5 * time.Second

// discoveryWatchTimeout bounds one watch for registrations; then the
// cluster is read again and a new watch starts (etcd's waits on one watch
// for good).
const discoveryWatchTimeout = time.Minute

// discoveryBackoff is how long discovery waits before its retry-th retry
// after the service could not be reached, or answered 5xx: etcd's 2^n
// seconds, at most 256 s (n counts every retry of the start). Tests
// shorten it.
var discoveryBackoff = func(retry int) time.Duration {
	return time.Duration(1<<min(retry, 8)) * time.Second
}

// discoverer bootstraps a new cluster through a discovery service, as
// etcd 3.4's --discovery does: the service is an etcd v2 keys API (any
// etcd, etcaddy, or discovery.etcd.io) holding a directory per cluster
// with the expected size in _config/size. Each member registers itself
// under its member ID with its "name=peerURL,…" and waits until size
// members have; the first size registrations, in the order they were
// made, are the initial cluster.
type discoverer struct {
	lg      *zap.Logger
	client  *http.Client
	base    *url.URL // the service: scheme and host
	cluster string   // the cluster's directory: the discovery URL's path
	// dirKey is the directory's key in the service's answers (the URL
	// path less /v2/keys on an etcd; the service's own on another).
	dirKey  string
	self    string // this member's key name: its ID in hex
	config  string // what it registers: "name=peerURL,…", sorted
	retries int
	// registered is called just before this member registers; mine
	// reports whether this data directory registered before.
	registered func() error
	mine       bool
}

// discoveryNode is a node of the service's JSON answers.
type discoveryNode struct {
	Key           string           `json:"key"`
	Value         string           `json:"value"`
	Dir           bool             `json:"dir"`
	CreatedIndex  uint64           `json:"createdIndex"`
	ModifiedIndex uint64           `json:"modifiedIndex"`
	Nodes         []*discoveryNode `json:"nodes"`
}

// discoveryAnswer is a keys API answer: an action and its node, or an
// error.
type discoveryAnswer struct {
	Action    string         `json:"action"`
	Node      *discoveryNode `json:"node"`
	ErrorCode int            `json:"errorCode"`
	Message   string         `json:"message"`
	Cause     string         `json:"cause"`
	index     uint64         // X-Etcd-Index
}

func (a *discoveryAnswer) Error() string {
	return fmt.Sprintf("%d: %s (%s)", a.ErrorCode, a.Message, a.Cause)
}

// errDiscoveryEmptyAnswer is a 200 without a body: a watch the service
// ended (anything else that answers so is no keys API).
var errDiscoveryEmptyAnswer = fmt.Errorf("%w: an empty answer", ErrDiscoveryBadEndpoint)

// errDiscoveryUnreachable marks what etcd's discovery retries after a
// backoff: the service could not be reached, or answered 5xx.
var errDiscoveryUnreachable = errors.New("discovery service unreachable")

// newDiscoverer prepares the discovery of the member name, whose peer URLs
// are peerURLs (sorted, normalized) and whose ID is id.
func newDiscoverer(durl, proxy, name string, peerURLs []string, id uint64, lg *zap.Logger) (*discoverer, error) {
	if err := CheckDiscoveryURL(durl); err != nil {
		return nil, err
	}
	proxyURL, err := ParseDiscoveryProxy(proxy)
	if err != nil {
		return nil, err
	}
	u, _ := url.Parse(durl)
	cluster := path.Clean("/" + u.Path)
	u.Path, u.RawPath = "", ""
	pairs := make([]string, len(peerURLs))
	for i, p := range peerURLs {
		pairs[i] = name + "=" + p
	}
	slices.Sort(pairs)
	tr := http.DefaultTransport.(*http.Transport).Clone()
	// etcd's discovery client goes through a proxy only when
	// --discovery-proxy names one, never one from the environment.
	tr.Proxy = nil
	if proxyURL != nil {
		tr.Proxy = http.ProxyURL(proxyURL)
		lg.Info("discovery: through a proxy", zap.String("proxy-url", proxyURL.Redacted()))
	}
	return &discoverer{
		lg:      lg,
		client:  &http.Client{Transport: tr},
		base:    u,
		cluster: cluster,
		self:    idString(id),
		config:  strings.Join(pairs, ","),
	}, nil
}

// join registers this member and waits for the others; it returns the
// initial cluster (name -> peer URLs). It gives up only on an answer that
// no retry would change (a full cluster, no size key…) or when ctx ends;
// an unreachable service is tried again after a backoff, as etcd does.
func (d *discoverer) join(ctx context.Context) (map[string][]string, error) {
	return d.find(ctx, true)
}

// readCluster reads the cluster the directory bootstraps, without
// registering (etcd's GetCluster, for a proxy): once size members have
// registered, the first size of them.
func (d *discoverer) readCluster(ctx context.Context) (map[string][]string, error) {
	return d.find(ctx, false)
}

// find is join, or readCluster when register is false. A cluster full
// without this member is the cluster for a reader, and for a member that
// registers a *discoveryFull (the cluster a proxy of it forwards to).
func (d *discoverer) find(ctx context.Context, register bool) (map[string][]string, error) {
	defer d.client.CloseIdleConnections()
	registered := false
	for {
		nodes, size, index, err := d.checkCluster(ctx)
		if errors.Is(err, ErrDiscoveryFullCluster) {
			cluster, cerr := nodesToCluster(nodes, size)
			if !register {
				return cluster, cerr
			}
			if cerr == nil {
				return nil, &discoveryFull{cluster: cluster}
			}
		}
		if err != nil {
			return nil, err
		}
		if register && !registered {
			// etcd checks first, so that a member of a full cluster does
			// not register; then checks again, since others register too.
			if err := d.createSelf(ctx); err != nil {
				return nil, err
			}
			registered = true
			continue
		}
		all, err := d.waitNodes(ctx, nodes, size, index)
		if errors.Is(err, errDiscoveryUnreachable) || errors.Is(err, errDiscoveryRecheck) {
			continue
		}
		if err != nil {
			return nil, err
		}
		return nodesToCluster(all, size)
	}
}

// discoveryFull is ErrDiscoveryFullCluster with the cluster that is full.
type discoveryFull struct{ cluster map[string][]string }

func (e *discoveryFull) Error() string { return ErrDiscoveryFullCluster.Error() }
func (e *discoveryFull) Unwrap() error { return ErrDiscoveryFullCluster }

// errDiscoveryRecheck asks join to read the cluster again: the watch
// lost its place (the service's event history no longer reaches back), or
// it waited discoveryWatchTimeout.
var errDiscoveryRecheck = errors.New("discovery: watch fell behind")

// checkCluster reads the expected size and the registrations so far, in
// the order they were made, and the service's index then. A cluster whose
// first size registrations leave this member out is full.
func (d *discoverer) checkCluster(ctx context.Context) ([]*discoveryNode, uint64, uint64, error) {
	sizeKey := path.Join(d.cluster, "_config", "size")
	a, err := d.retry(ctx, "cluster status check", func() (*discoveryAnswer, error) {
		return d.do(ctx, http.MethodGet, sizeKey, nil, nil, discoveryRequestTimeout)
	})
	if err != nil {
		return nil, 0, 0, err
	}
	if a.ErrorCode == 100 {
		return nil, 0, 0, fmt.Errorf("%w (%s)", ErrDiscoverySizeNotFound, sizeKey)
	}
	if a.ErrorCode != 0 || a.Node == nil {
		return nil, 0, 0, fmt.Errorf("discovery: reading %s: %w", sizeKey, a)
	}
	size, err := strconv.ParseUint(a.Node.Value, 10, 0)
	if err != nil || size == 0 {
		return nil, 0, 0, fmt.Errorf("%w: %q", ErrDiscoveryBadSizeKey, a.Node.Value)
	}
	a, err = d.retry(ctx, "cluster status check", func() (*discoveryAnswer, error) {
		return d.do(ctx, http.MethodGet, d.cluster, nil, nil, discoveryRequestTimeout)
	})
	if err != nil {
		return nil, 0, 0, err
	}
	if a.ErrorCode != 0 || a.Node == nil {
		return nil, 0, 0, fmt.Errorf("discovery: reading %s: %w", d.cluster, a)
	}
	if a.index == 0 {
		// No X-Etcd-Index (a proxy may drop it): the directory's own
		// indexes are a lower bound, which the watch then catches up from.
		a.index = a.Node.ModifiedIndex
		for _, n := range a.Node.Nodes {
			a.index = max(a.index, n.ModifiedIndex)
		}
	}
	d.dirKey = a.Node.Key
	var nodes []*discoveryNode
	for _, n := range a.Node.Nodes {
		if path.Base(n.Key) != "_config" {
			nodes = append(nodes, n)
		}
	}
	slices.SortStableFunc(nodes, func(x, y *discoveryNode) int { return cmpUint64(x.CreatedIndex, y.CreatedIndex) })
	for i, n := range nodes {
		if path.Base(n.Key) == d.self {
			break
		}
		if uint64(i) >= size-1 {
			return nodes[:size], size, a.index, ErrDiscoveryFullCluster
		}
	}
	return nodes, size, a.index, nil
}

// createSelf registers this member: its ID as the key, "name=peerURL,…"
// as the value, created only if absent. A key already there with the same
// value, when this data directory registered before, is this member's own,
// from a start that stopped before its first Raft state was saved: etcd
// refuses it as a duplicate ID (its TODO says it should not). Another
// member with the same name and peer URLs (a copy of the config, the
// defaults) has its own data directory: a duplicate ID, as with etcd.
func (d *discoverer) createSelf(ctx context.Context) error {
	key := path.Join(d.cluster, d.self)
	if err := d.registered(); err != nil {
		return err
	}
	form := url.Values{"value": {d.config}}
	attempts := 0
	a, err := d.retry(ctx, "registering", func() (*discoveryAnswer, error) {
		attempts++
		return d.do(ctx, http.MethodPut, key, url.Values{"prevExist": {"false"}}, form, discoveryRequestTimeout)
	})
	if err != nil {
		return err
	}
	switch {
	case a.ErrorCode == 0:
		return nil
	case a.ErrorCode != 105: // not "Key already exists"
		return fmt.Errorf("discovery: registering %s: %w", key, a)
	}
	a, err = d.retry(ctx, "registering", func() (*discoveryAnswer, error) {
		return d.do(ctx, http.MethodGet, key, nil, nil, discoveryRequestTimeout)
	})
	if err != nil {
		return err
	}
	// Ours when this data directory registered at an earlier start, or
	// when an attempt of this one may have landed unanswered (a timeout).
	mine := d.mine || attempts > 1
	if !mine || a.ErrorCode != 0 || a.Node == nil || a.Node.Value != d.config {
		return ErrDiscoveryDuplicateID
	}
	d.lg.Info("discovery: this member registered before, with the same peer URLs", zap.String("key", key))
	return nil
}

// waitNodes watches the cluster's directory from index on until size
// members have registered, and returns the first size.
func (d *discoverer) waitNodes(ctx context.Context, nodes []*discoveryNode, size, index uint64) ([]*discoveryNode, error) {
	if uint64(len(nodes)) > size {
		nodes = nodes[:size]
	}
	all := slices.Clone(nodes)
	for _, n := range all {
		if path.Base(n.Key) == d.self {
			d.lg.Info("discovery: found self", zap.String("self", d.self))
		} else {
			d.lg.Info("discovery: found peer", zap.String("peer", path.Base(n.Key)))
		}
	}
	seen := func(key string) bool {
		return slices.ContainsFunc(all, func(n *discoveryNode) bool { return n.Key == key })
	}
	for uint64(len(all)) < size {
		d.lg.Info("discovery: waiting for more members", zap.Int("found", len(all)), zap.Uint64("needed", size-uint64(len(all))))
		q := url.Values{"wait": {"true"}, "recursive": {"true"}, "waitIndex": {strconv.FormatUint(index+1, 10)}}
		wctx, cancel := context.WithTimeout(ctx, discoveryWatchTimeout)
		a, err := d.do(wctx, http.MethodGet, d.cluster, q, nil, 0)
		expired := wctx.Err() != nil && ctx.Err() == nil
		cancel()
		if expired {
			// A watch that heard nothing for so long may hang on a
			// connection the network dropped silently: read again.
			return nil, errDiscoveryRecheck
		}
		if errors.Is(err, errDiscoveryEmptyAnswer) {
			// etcd ends a watch with an empty 200 when it drops the
			// watcher; some proxies do on an idle timeout.
			return nil, d.pause(ctx)
		}
		if err != nil {
			if errors.Is(err, errDiscoveryUnreachable) {
				d.lg.Warn("discovery: error while waiting for members", zap.Error(err))
				if err := d.backoff(ctx, "waiting for other members"); err != nil {
					return nil, err
				}
			}
			return nil, err
		}
		switch {
		case a.ErrorCode == 401: // the event index was cleared
			return nil, d.pause(ctx)
		case a.ErrorCode != 0 || a.Node == nil:
			return nil, fmt.Errorf("discovery: watching %s: %w", d.cluster, a)
		}
		index = max(index+1, a.Node.ModifiedIndex)
		// A registration is a key created right under the cluster's
		// directory; etcd counts any event there, which a change of
		// _config or a deletion would make a member.
		n := a.Node
		if a.Action != "create" && a.Action != "set" || n.Dir || path.Dir(n.Key) != d.dirKey || path.Base(n.Key) == "_config" || seen(n.Key) {
			continue
		}
		d.lg.Info("discovery: found peer", zap.String("peer", path.Base(n.Key)))
		all = append(all, n)
	}
	d.lg.Info("discovery: found all members", zap.Int("members", len(all)))
	return all, nil
}

// nodesToCluster is etcd's: the registrations' values, joined, are the
// initial cluster; one name registered twice is an error.
func nodesToCluster(nodes []*discoveryNode, size uint64) (map[string][]string, error) {
	cluster := make(map[string][]string)
	var values []string
	for _, n := range nodes {
		values = append(values, n.Value)
		for pair := range strings.SplitSeq(n.Value, ",") {
			name, u, ok := strings.Cut(pair, "=")
			if !ok || name == "" {
				return nil, fmt.Errorf("%w: %q", ErrDiscoveryInvalidURL, n.Value)
			}
			if _, err := NormalizeURLs([]string{u}); err != nil {
				return nil, fmt.Errorf("%w: %q: %v", ErrDiscoveryInvalidURL, n.Value, err)
			}
			cluster[name] = append(cluster[name], u)
		}
	}
	if uint64(len(cluster)) != size {
		return nil, fmt.Errorf("%w: %s", ErrDiscoveryDuplicateName, strings.Join(values, ","))
	}
	if err := checkDuplicateURLs(cluster); err != nil {
		return nil, fmt.Errorf("discovery: the cluster %s: %w", strings.Join(values, ","), err)
	}
	return cluster, nil
}

// retry runs req until it reaches the service, waiting discoveryBackoff
// between tries.
func (d *discoverer) retry(ctx context.Context, step string, req func() (*discoveryAnswer, error)) (*discoveryAnswer, error) {
	for {
		a, err := req()
		if !errors.Is(err, errDiscoveryUnreachable) {
			return a, err
		}
		d.lg.Warn("discovery: cannot reach the discovery service", zap.String("step", step), zap.Error(err))
		if err := d.backoff(ctx, step); err != nil {
			return nil, err
		}
	}
}

// discoveryRecheckPause is how long discovery waits before it reads the
// cluster again after a watch that lost its place, so that a service that
// keeps answering so cannot make it spin.
var discoveryRecheckPause = time.Second

// pause waits discoveryRecheckPause and asks for a recheck, or returns
// ctx's error.
func (d *discoverer) pause(ctx context.Context) error {
	if err := sleepCtx(ctx, discoveryRecheckPause); err != nil {
		return err
	}
	return errDiscoveryRecheck
}

// backoff waits before the next try, or until ctx ends.
func (d *discoverer) backoff(ctx context.Context, step string) error {
	d.retries++
	wait := discoveryBackoff(d.retries)
	d.lg.Info("discovery: retrying", zap.String("url", d.base.String()), zap.String("reason", step), zap.Duration("backoff", wait))
	return sleepCtx(ctx, wait)
}

// sleepCtx waits for d, or returns ctx's error when it ends first.
func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// do sends one keys API request for key and decodes the answer. Failing
// to reach the service, a 5xx, and a timeout (timeout > 0) are
// errDiscoveryUnreachable; an answer that is not the keys API's JSON is
// ErrDiscoveryBadEndpoint; an etcd error is the answer's ErrorCode.
func (d *discoverer) do(ctx context.Context, method, key string, query, form url.Values, timeout time.Duration) (*discoveryAnswer, error) {
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	u := *d.base
	u.Path = key
	u.RawQuery = query.Encode()
	var body io.Reader
	if form != nil {
		body = strings.NewReader(form.Encode())
	}
	req, err := http.NewRequestWithContext(ctx, method, u.String(), body)
	if err != nil {
		return nil, err
	}
	if form != nil {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	resp, err := d.client.Do(req)
	if err != nil {
		return nil, unreachable(ctx, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return nil, unreachable(ctx, err)
	}
	if resp.StatusCode == http.StatusOK && len(strings.TrimSpace(string(raw))) == 0 {
		return nil, errDiscoveryEmptyAnswer
	}
	if resp.StatusCode >= 500 {
		return nil, fmt.Errorf("%w: %s %s answered %s", errDiscoveryUnreachable, method, u.Redacted(), resp.Status)
	}
	a := &discoveryAnswer{}
	if err := json.Unmarshal(raw, a); err != nil || a.Node == nil && a.ErrorCode == 0 {
		return nil, fmt.Errorf("%w: %s %s answered %s, not the etcd v2 keys API", ErrDiscoveryBadEndpoint, method, u.Redacted(), resp.Status)
	}
	a.index, _ = strconv.ParseUint(resp.Header.Get("X-Etcd-Index"), 10, 64)
	return a, nil
}

// unreachable is the error of a request that got no whole answer: the
// cause of ctx's end when the member is stopping, else
// errDiscoveryUnreachable (a timeout among them), which is retried.
func unreachable(ctx context.Context, err error) error {
	if cause := context.Cause(ctx); cause != nil && !errors.Is(cause, context.DeadlineExceeded) {
		return cause
	}
	return fmt.Errorf("%w: %v", errDiscoveryUnreachable, err)
}

// discoverCluster runs discovery for the member n configures and returns
// its initial cluster.
func (n *Node) discoverCluster(ctx context.Context, st *storage.Store) (map[string][]string, error) {
	if n.cfg.DiscoverySRV != "" {
		n.lg.Info("DNS SRV discovery: looking the cluster up", zap.String("discovery-srv", n.cfg.DiscoverySRV), zap.String("discovery-srv-name", n.cfg.DiscoverySRVName))
		return n.srvCluster(ctx)
	}
	mine, err := NormalizeURLs(n.cfg.InitialCluster[n.cfg.Name])
	if err != nil {
		return nil, fmt.Errorf("raftkv: the member's peer URLs: %w", err)
	}
	d, err := newDiscoverer(n.cfg.Discovery, n.cfg.DiscoveryProxy, n.cfg.Name, mine, memberID(mine, n.cfg.InitialClusterToken), n.lg)
	if err != nil {
		return nil, err
	}
	if n.cfg.proxying() {
		n.lg.Info("discovery: reading the cluster to proxy", zap.String("discovery-url", n.cfg.Discovery))
		return d.readCluster(ctx)
	}
	d.mine = string(st.Meta(metaDiscovery)) == n.cfg.Discovery
	d.registered = func() error { return st.SetMeta(metaDiscovery, []byte(n.cfg.Discovery)) }
	n.lg.Info("discovery: joining", zap.String("discovery-url", n.cfg.Discovery), zap.String("member-id", d.self), zap.String("registration", d.config))
	cluster, err := d.join(ctx)
	if err != nil {
		return nil, err
	}
	n.lg.Info("discovery: the initial cluster", zap.Strings("members", slices.Sorted(maps.Keys(cluster))))
	return cluster, nil
}

// Discovering reports whether the member waits for its discovery service
// (started, not failed, not stopped).
func (n *Node) Discovering() bool {
	n.lifeMu.Lock()
	defer n.lifeMu.Unlock()
	return n.disc != nil && !n.started && !n.stopped && !n.disc.failed && n.proxy.Load() == nil
}

// discoveryRun is a discovery in progress, or one that failed.
type discoveryRun struct {
	cancel context.CancelFunc
	done   chan struct{} // closed once the discovery goroutine has returned
	failed bool          // guarded by Node.lifeMu
}

// startDiscovery runs discovery in the background, then starts the member
// on st (Raft state rs) with the cluster it learned. Discovery can take as
// long as the last member takes to register, and etcd's start blocks on
// it; Caddy's start must not (the admin API, a reload, the process's exit
// would all wait), so the member starts later, as a member a reload
// started again does. The caller holds lifeMu.
func (n *Node) startDiscovery(st *storage.Store, rs *storage.RaftState) {
	ctx, cancel := context.WithCancel(context.Background())
	d := &discoveryRun{cancel: cancel, done: make(chan struct{})}
	n.disc = d
	go func() {
		defer close(d.done)
		defer cancel()
		cluster, err := n.discoverCluster(ctx, st)
		n.lifeMu.Lock()
		defer n.lifeMu.Unlock()
		if n.stopped {
			if err := st.Close(); err != nil {
				n.lg.Warn("closing the store after discovery was stopped", zap.Error(err))
			}
			return
		}
		var full *discoveryFull
		if errors.As(err, &full) && n.cfg.DiscoveryFallback == "proxy" {
			// etcd's default fallback: the member of a full cluster runs
			// as its proxy. startProxy takes st over.
			n.lg.Info("discovery cluster full, falling back to proxy", zap.String("discovery-url", n.cfg.Discovery))
			if err = n.startProxy(st, clusterPeerURLs(full.cluster), "its discovery found the cluster full"); err == nil {
				return
			}
		}
		if err == nil && n.cfg.proxying() {
			if err = n.startProxy(st, clusterPeerURLs(cluster), "proxy "+n.cfg.Proxy+", its cluster found by discovery"); err == nil {
				return
			}
		}
		if err == nil {
			n.cfg.InitialCluster = cluster
			if n.cfg.DiscoverySRV != "" {
				n.cfg.Peer.TLS = srvPeerTLS(n.cfg.Peer.TLS, n.cfg.DiscoverySRV, cluster)
			}
			err = n.startOn(st, rs)
		} else {
			st.Close()
		}
		if err != nil {
			d.failed = true
			n.halt()
			if n.cfg.DiscoverySRV != "" {
				n.lg.Error("DNS SRV discovery failed; the member does not start (fix the records or the cause, and `caddy reload --force` starts it again)",
					zap.String("discovery-srv", n.cfg.DiscoverySRV), zap.Error(err))
			} else {
				n.lg.Error("discovery failed; the member does not start (fix the cause, or bootstrap with a new discovery token, and `caddy reload --force` starts it again)",
					zap.String("discovery-url", n.cfg.Discovery), zap.Error(err))
			}
		}
	}()
}
