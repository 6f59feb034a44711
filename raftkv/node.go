package raftkv

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/etcaddy/etcaddy/storage"
	"go.etcd.io/raft/v3"
	"go.etcd.io/raft/v3/raftpb"
	"go.uber.org/zap"
)

// Errors of Node.
var (
	// ErrStopped is returned by a node that is not running: never started,
	// stopped, or stopped by a storage failure.
	ErrStopped = errors.New("raftkv: node stopped")
	// ErrTimeout is returned when a request's context ends before its
	// proposal was applied; the handler answers etcd's 500/300
	// "etcdserver: request timed out".
	ErrTimeout = errors.New("etcdserver: request timed out")
	// ErrNeedTransport was returned by Start before the peer transport
	// existed. Start no longer returns it; kept for callers that test it.
	ErrNeedTransport = errors.New("raftkv: multi-member clusters need the peer transport")
)

// Config is a member's configuration. Zero values take etcd's defaults.
type Config struct {
	Name          string // member name; default "default"
	DataDir       string // required
	SnapshotCount uint64 // applied entries between snapshots; default 10000
	// SnapshotCatchUpEntries is how many entries stay in the log behind a
	// snapshot for lagging followers; default 5000.
	SnapshotCatchUpEntries uint64
	HeartbeatInterval      time.Duration       // default 100ms
	ElectionTimeout        time.Duration       // default 1000ms
	InitialCluster         map[string][]string // name -> peer URLs; default {Name: [InitialAdvertisePeerURLs...]} or {Name: ["http://localhost:2380"]}
	InitialClusterState    string              // "new" (default) or "existing"
	InitialClusterToken    string              // default "etcd-cluster"
	AdvertiseClientURLs    []string            // may be empty: the handler then answers with the URL the request came in on
	Peer                   PeerConfig          // how this member dials its peers
	// ForceNewCluster makes a member that restarts on its data the only
	// member of its cluster (etcd's --force-new-cluster), to recover a
	// cluster that lost a majority for good; see forceNewCluster. It has
	// no effect on an empty data directory.
	ForceNewCluster bool
	// Discovery is the URL of a discovery service (etcd's --discovery):
	// a member that starts on an empty data directory with
	// InitialClusterState "new" registers there and learns its initial
	// cluster from it, in the background (see Start); InitialCluster then
	// holds only this member, with its peer URLs, and the discovery URL
	// is the cluster token, as with etcd.
	Discovery string
	// DiscoveryProxy is an HTTP proxy to reach the discovery service
	// through (etcd's --discovery-proxy); see ParseDiscoveryProxy.
	DiscoveryProxy string
	// DiscoveryFallback is what a member does when the discovery service
	// says the cluster is full without it (etcd's --discovery-fallback):
	// "proxy" (the default, as etcd's) runs it as a proxy of that cluster
	// (see Proxy), "exit" fails its start.
	DiscoveryFallback string
	// Proxy makes a member that starts on an empty data directory a proxy
	// of its cluster (etcd's --proxy): "on" forwards every client request
	// to the cluster of InitialCluster (or of Discovery, or DiscoverySRV),
	// "readonly" only the GETs; "off" (the default) runs a member. A data
	// directory keeps what its first start made of it: a member's stays a
	// member's, a proxy's a proxy's.
	Proxy string
	// A proxy's timings (etcd's --proxy-refresh-interval,
	// --proxy-failure-wait, --proxy-dial-timeout): how often it reads the
	// members' client URLs again, how long an endpoint that failed is left
	// out, how long it dials one. Defaults: 30 s, 5 s, 1 s.
	ProxyRefreshInterval time.Duration
	ProxyFailureWait     time.Duration
	ProxyDialTimeout     time.Duration
	// How long each read from, and each write to, a proxy's connection to
	// a member's client URL may take (etcd's --proxy-read-timeout,
	// --proxy-write-timeout): a read or write that takes longer ends the
	// connection, and the request goes to the next endpoint. Zero: the
	// default, none for reads (a watch waits as long as its client does;
	// etcd's default too), 5 s for writes; negative: none.
	ProxyReadTimeout  time.Duration
	ProxyWriteTimeout time.Duration
	// DiscoverySRV is a DNS domain whose SRV records list the peer URLs
	// of a new cluster's members (etcd's --discovery-srv): a member that
	// starts on an empty data directory learns its initial cluster from
	// them, in the background (see Start and srvCluster); InitialCluster
	// then holds only this member, with its peer URLs. With
	// InitialClusterState "existing" the records name the members to ask
	// for the member list.
	DiscoverySRV string
	// DiscoverySRVName is the suffix of the SRV services' names (etcd's
	// --discovery-srv-name): _etcd-server-ssl-<name>._tcp.<domain>.
	DiscoverySRVName string
	// LooseReconfig turns off etcd's strict reconfiguration check
	// (--strict-reconfig-check=false); see SetStrictReconfigCheck.
	LooseReconfig bool
	Logger        *zap.Logger

	// healthInterval is how long every peer must have been reachable for
	// the strict reconfiguration check (default: etcd's 5 s); tests
	// shorten it.
	healthInterval time.Duration
	// resolver answers DNS SRV discovery's lookups (default: the
	// system's); tests give it their own DNS server.
	resolver srvResolver
}

// proxying reports whether a fresh member is to be a proxy (Proxy on or
// readonly).
func (c Config) proxying() bool { return c.Proxy == "on" || c.Proxy == "readonly" }

// withDefaults fills etcd's defaults in and checks what has none.
func (c Config) withDefaults() (Config, error) {
	if c.DataDir == "" {
		return c, errors.New("raftkv: a data directory is required")
	}
	if c.Name == "" {
		c.Name = "default"
	}
	if c.SnapshotCount == 0 {
		c.SnapshotCount = 10000
	}
	if c.SnapshotCatchUpEntries == 0 {
		c.SnapshotCatchUpEntries = DefaultSnapshotCatchUpEntries
	}
	if c.HeartbeatInterval <= 0 {
		c.HeartbeatInterval = 100 * time.Millisecond
	}
	if c.ElectionTimeout <= 0 {
		c.ElectionTimeout = time.Second
	}
	// etcd refuses an election timeout under 5 heartbeats only with a
	// warning; Raft itself needs ElectionTick > HeartbeatTick.
	if c.ElectionTimeout/c.HeartbeatInterval < 2 {
		return c, fmt.Errorf("raftkv: election timeout %v must be at least twice the heartbeat interval %v", c.ElectionTimeout, c.HeartbeatInterval)
	}
	if len(c.InitialCluster) == 0 {
		c.InitialCluster = map[string][]string{c.Name: {"http://localhost:2380"}}
	}
	switch c.InitialClusterState {
	case "":
		c.InitialClusterState = "new"
	case "new", "existing":
	default:
		return c, fmt.Errorf("raftkv: initial cluster state %q is neither \"new\" nor \"existing\"", c.InitialClusterState)
	}
	if c.InitialClusterToken == "" {
		c.InitialClusterToken = "etcd-cluster"
	}
	if c.Discovery != "" && c.DiscoverySRV != "" {
		return c, errors.New("raftkv: multiple discovery options are set: a discovery URL and a DNS SRV domain")
	}
	if c.Discovery != "" || c.DiscoverySRV != "" {
		if _, ok := c.InitialCluster[c.Name]; !ok || len(c.InitialCluster) != 1 {
			return c, errors.New("raftkv: with discovery (a discovery URL or DNS SRV records), the initial cluster holds only this member, with its peer URLs")
		}
		// As etcd, before it registers anything the others would trip on.
		if err := checkDuplicateURLs(c.InitialCluster); err != nil {
			return c, err
		}
	}
	if c.Discovery != "" {
		if err := CheckDiscoveryURL(c.Discovery); err != nil {
			return c, fmt.Errorf("raftkv: %w", err)
		}
		c.InitialClusterToken = c.Discovery
		if _, err := ParseDiscoveryProxy(c.DiscoveryProxy); err != nil {
			return c, fmt.Errorf("raftkv: %w", err)
		}
	}
	switch c.Proxy {
	case "":
		c.Proxy = "off"
	case "off", "on", "readonly":
	default:
		return c, fmt.Errorf("raftkv: proxy %q is none of \"off\", \"on\" and \"readonly\"", c.Proxy)
	}
	if c.ProxyRefreshInterval <= 0 {
		c.ProxyRefreshInterval = DefaultProxyRefreshInterval
	}
	if c.ProxyFailureWait <= 0 {
		c.ProxyFailureWait = DefaultProxyFailureWait
	}
	if c.ProxyDialTimeout <= 0 {
		c.ProxyDialTimeout = DefaultProxyDialTimeout
	}
	switch c.DiscoveryFallback {
	case "":
		c.DiscoveryFallback = "proxy"
	case "proxy", "exit":
	default:
		return c, fmt.Errorf("raftkv: discovery fallback %q is neither \"proxy\" nor \"exit\"", c.DiscoveryFallback)
	}
	if c.DiscoverySRV != "" {
		if err := CheckSRVDomain(c.DiscoverySRV); err != nil {
			return c, fmt.Errorf("raftkv: %w", err)
		}
	}
	if c.DiscoverySRVName != "" {
		if c.DiscoverySRV == "" {
			return c, errors.New("raftkv: a DNS SRV service name goes with a DNS SRV domain")
		}
		if err := CheckSRVName(c.DiscoverySRVName); err != nil {
			return c, fmt.Errorf("raftkv: %w", err)
		}
	}
	if c.Logger == nil {
		c.Logger = zap.NewNop()
	}
	if c.healthInterval <= 0 {
		c.healthInterval = defaultHealthInterval
	}
	return c, nil
}

// Node is one running member. Create it with NewNode (cheap, no I/O), then
// Start it; Stop ends it. All methods are safe for concurrent use.
type Node struct {
	cfg Config
	lg  *zap.Logger

	lifeMu  sync.Mutex // serializes Start and Stop
	started bool
	stopped bool
	disc    *discoveryRun // set when Start went to a discovery service first
	booted  atomic.Bool   // identity and configuration are set (never reset)
	running atomic.Bool
	gone    atomic.Bool // the cluster removed this member

	store *storage.Store
	ms    *raft.MemoryStorage
	rn    *raft.RawNode  // touched only by the loop goroutine once started
	tr    *peerTransport // the other members; it sends only what is durable
	peerH atomic.Pointer[peerHandler]

	id        uint64
	clusterID uint64
	ids       *idGen
	startTime time.Time

	membersMu sync.RWMutex
	members   []memberRecord  // sorted by ID
	removed   map[uint64]bool // removed member IDs, never reused

	confMu sync.Mutex  // one membership change at a time from this member
	loose  atomic.Bool // the strict reconfiguration check is off
	// confIndex is the log index of the last membership change the member
	// list reflects, 0 when not known (see strictCheck).
	confIndex atomic.Uint64
	// advertise is the client URLs this member publishes (starting as
	// cfg.AdvertiseClientURLs; SetAdvertiseClientURLs changes them).
	advertise atomic.Pointer[[]string]
	// endc is closed by EndRequests: waiting requests end at once.
	endc    chan struct{}
	endOnce sync.Once
	// peerEnd is closed by EndPeerStreams: the peer streams this member
	// reads end.
	peerEnd     chan struct{}
	peerEndOnce sync.Once
	// readyc is closed once the member has caught up with its cluster
	// after it started (becomeReady); haltc once it never will: Stop, or
	// the end of its loop (a failure, its removal).
	readyc   chan struct{}
	haltc    chan struct{}
	haltOnce sync.Once
	// proxy is set when the member runs as a proxy of its cluster (see
	// Proxy); it never runs Raft then.
	proxy atomic.Pointer[Proxy]

	bg     sync.WaitGroup  // background goroutines (publish, becomeReady)
	bgCtx  context.Context // ended by Stop
	bgStop context.CancelFunc

	propc   chan proposal
	readc   chan struct{}
	recvc   chan *raftpb.Message
	reportc chan report
	// Snapshot outcomes reportc had no room for (see reportSnapshot);
	// the loop takes them every turn once snapReported is set.
	snapReportsMu sync.Mutex
	snapReports   []report
	snapReported  atomic.Bool
	ctrlc         chan func()   // work run on the loop goroutine
	selfc         chan struct{} // a peer said this member was removed
	stopc         chan struct{} // closed by Stop
	donec         chan struct{} // closed when the loop has returned

	w             waiters
	leaderChanged broadcast // notified when the known leader changes
	retryEpoch    broadcast // notified once per election timeout

	// sole counts the changes of whether this member leads as the only
	// voter; it is odd while it does (see Get). Only the loop changes it.
	sole atomic.Uint64
	// commitSeen is Raft's commit index as the loop learns it, before it
	// sends anything that speaks of it.
	commitSeen atomic.Uint64

	readMu   sync.Mutex
	nextRead *readRound // collects quorum reads for the next ReadIndex round

	loop loopState // owned by the loop goroutine

	// Published by the loop for other goroutines.
	leader      atomic.Uint64
	term        atomic.Uint64
	committed   atomic.Uint64
	applied     atomic.Uint64
	leaderSince atomic.Int64  // unix nanoseconds
	leaderNews  atomic.Uint64 // leaders seen (Metrics.LeaderChanges)
	// Proposals (writes, membership changes) waiting for their outcome, and
	// those that ended with an error (a timeout, the member stopping).
	proposalsPending atomic.Int64
	proposalsFailed  atomic.Uint64
	saves            atomic.Uint64 // store.Save calls
	drops            atomic.Uint64 // proposal attempts Raft refused
	readRounds       atomic.Uint64 // ReadIndex requests made
	installs         atomic.Uint64 // snapshots received and installed
	sendAppends      atomic.Uint64
	recvAppends      atomic.Uint64
	sendRate         rateQueue // of the appends the transport sends
	recvRate         rateQueue // and the peer handler receives
}

// NewNode returns a node that has not started: no file is opened.
func NewNode(cfg Config) *Node {
	n := &Node{cfg: cfg, endc: make(chan struct{}), peerEnd: make(chan struct{}), readyc: make(chan struct{}), haltc: make(chan struct{})}
	n.loose.Store(cfg.LooseReconfig)
	urls := slices.Clone(cfg.AdvertiseClientURLs)
	n.advertise.Store(&urls)
	return n
}

// Start opens the store, restores Raft state and starts the Raft loop, the
// ticker and the reaper. Calling Start on a started node does nothing.
//
// A fresh data directory bootstraps the cluster of cfg.InitialCluster
// (every member started with the same initial cluster and token), or, with
// InitialClusterState "existing", joins a running cluster that already
// added this member (AddMember): it reads the member list from a peer's
// GET /raft/members and catches up from the leader's log or snapshot. A
// used data directory restarts the member it holds and ignores the initial
// cluster, as etcd does. Peers are reached with cfg.Peer; this member's
// peer endpoint is PeerHandler, served by the caller.
//
// With cfg.Discovery, a fresh member of a new cluster learns its initial
// cluster from the discovery service, which takes until every member has
// registered: Start returns once the store is open, and the member starts
// when discovery ends (requests wait for it as for any member not ready
// yet). If discovery fails, the error is logged and Failed reports true.
// With cfg.DiscoverySRV, a fresh member reads its initial cluster from DNS
// SRV records the same way, in the background.
func (n *Node) Start() error {
	n.lifeMu.Lock()
	defer n.lifeMu.Unlock()
	if n.stopped {
		return ErrStopped // a Node is not restartable: make a new one
	}
	if n.started || n.disc != nil {
		return nil
	}
	cfg, err := n.cfg.withDefaults()
	if err != nil {
		return err
	}
	n.cfg, n.lg = cfg, cfg.Logger
	st, err := storage.Open(cfg.DataDir)
	if err != nil {
		return err
	}
	rs, err := st.LoadRaft()
	if err != nil {
		st.Close()
		return err
	}
	if !freshRaft(rs) {
		if cfg.proxying() {
			n.lg.Warn("proxy is set, but the data directory holds a member's data: it starts as that member", zap.String("data_dir", cfg.DataDir))
		}
		return n.startOn(st, rs)
	}
	// A member that became a proxy stays one, whatever the config says,
	// as etcd's data directory with a proxy in it does.
	peers, err := proxyPeerURLs(st)
	switch {
	case err != nil:
		st.Close()
		return err
	case peers != nil:
		return n.startProxy(st, peers, "its data directory keeps it one")
	case cfg.Discovery != "" && (cfg.InitialClusterState == "new" || cfg.proxying()) || cfg.DiscoverySRV != "":
		n.startDiscovery(st, rs)
		return nil
	case cfg.proxying():
		return n.startProxy(st, clusterPeerURLs(cfg.InitialCluster), "proxy "+cfg.Proxy)
	}
	return n.startOn(st, rs)
}

// startOn boots the member from st, whose Raft state is rs, and starts it;
// on an error it closes st. The caller holds lifeMu.
func (n *Node) startOn(st *storage.Store, rs *storage.RaftState) error {
	cfg := n.cfg
	if err := n.boot(st, rs); err != nil {
		st.Close()
		return err
	}
	n.store = st
	n.startTime = time.Now()
	n.propc = make(chan proposal, 1024)
	n.readc = make(chan struct{}, 1)
	// Peer messages beyond this are dropped (Node.receive), as etcd's
	// transport drops beyond its 4096: a forwarded proposal so lost waits
	// for a retry.
	n.recvc = make(chan *raftpb.Message, 4096)
	n.reportc = make(chan report, 64)
	n.ctrlc = make(chan func())
	n.selfc = make(chan struct{}, 1)
	n.stopc = make(chan struct{})
	n.donec = make(chan struct{})
	n.tr = newPeerTransport(transportConfig{
		ID:                n.id,
		ClusterID:         n.clusterID,
		TLS:               cfg.Peer.TLS,
		H2C:               cfg.Peer.H2C,
		Snapshot:          st.WriteSnapshot,
		ReportUnreachable: n.reportUnreachable,
		ReportSnapshot:    n.reportSnapshot,
		Removed:           n.peerSaysRemoved,
		Logger:            n.lg.Named("peer"),
		ProbeIdle:         n.cfg.healthInterval / 5,
		SentAppends:       &n.sendRate,
	})
	ph := newPeerHandler(n.id, n.clusterID, n.tr.peerStatus, n.receive, st, n.lg.Named("peer"))
	ph.members = n.memberSnapshot
	ph.recvAppends = &n.recvRate
	// Streams end with the loop, not when Stop begins: Stop hands
	// leadership over first, and needs to hear the other members.
	ph.ended, ph.halted = n.peerEnd, n.donec
	n.tr.setReceiver(ph)
	n.syncPeers()
	n.peerH.Store(ph)
	n.bgCtx, n.bgStop = context.WithCancel(context.Background())
	n.started = true
	n.booted.Store(true)
	n.running.Store(true)
	n.lg.Info("raftkv member started",
		zap.String("name", cfg.Name),
		zap.String("member-id", idString(n.id)),
		zap.String("cluster-id", idString(n.clusterID)),
		zap.Uint64("applied-index", n.applied.Load()),
		zap.Uint64("etcd-index", st.Index()))
	go n.run()
	n.bg.Add(2)
	go n.publish()
	go n.becomeReady()
	return nil
}

// becomeReady closes readyc once this member has applied everything its
// cluster had committed when it asked, which takes a leader's read index
// (a quorum read). Until then WaitReady holds client requests, as etcd
// serves none before it has published itself through Raft: a member that
// restarted after answering a write whose application had not reached its
// disk yet (the log had; see storage.Ready.Defer) would otherwise read as
// of before that write until it heard from the leader, and one that cannot
// reach its cluster (no quorum, another cluster's peers) would serve what
// its file holds, or nothing, as if current.
func (n *Node) becomeReady() {
	defer n.bg.Done()
	for n.bgCtx.Err() == nil {
		ctx, cancel := context.WithTimeout(n.bgCtx, 2*n.cfg.ElectionTimeout)
		err := n.linearizableRead(ctx)
		cancel()
		switch {
		case err == nil:
			close(n.readyc)
			n.lg.Info("raftkv member ready to serve clients", zap.String("member-id", idString(n.id)),
				zap.Uint64("applied-index", n.applied.Load()))
			return
		case errors.Is(err, ErrStopped):
			return
		}
	}
}

// WaitReady waits until the member is ready to serve clients (see
// becomeReady), ctx ends (ErrTimeout), or it never will be: it stopped, or
// Caddy exits (ErrStopped). It returns at once for a ready member.
func (n *Node) WaitReady(ctx context.Context) error {
	if n.Ready() {
		return nil
	}
	select {
	case <-n.readyc:
		return nil
	case <-ctx.Done():
		return ErrTimeout
	case <-n.haltc:
		return ErrStopped
	case <-n.endc:
		return ErrStopped
	}
}

// Ready reports whether the member is ready to serve clients.
func (n *Node) Ready() bool { return isClosed(n.readyc) }

// halt closes haltc: the member will never be ready (again).
func (n *Node) halt() { n.haltOnce.Do(func() { close(n.haltc) }) }

// advertised returns the client URLs this member publishes (a copy).
func (n *Node) advertised() []string { return slices.Clone(*n.advertise.Load()) }

// SetAdvertiseClientURLs changes the client URLs this member publishes: a
// running member publishes them through Raft, so that every member's
// /v2/members and /v2/machines list them (etcd publishes its attributes
// once, at start; a Caddy reload changes them on the running member).
func (n *Node) SetAdvertiseClientURLs(urls []string) {
	urls = slices.Clone(urls)
	if slices.Equal(urls, *n.advertise.Load()) {
		return
	}
	n.advertise.Store(&urls)
	n.lifeMu.Lock()
	defer n.lifeMu.Unlock()
	if n.started && !n.stopped {
		n.bg.Add(1)
		go n.publish()
	}
}

// EndRequests ends every request waiting for Raft (a write, a quorum read,
// a membership change) with ErrStopped, now and from now on, while the
// node goes on: Caddy calls it when the process exits, since it waits for
// every response before it stops the member, and a member without a
// quorum would keep them for their whole timeout. etcd's exit ends them
// alike, as "server stopped": what such a write became is not known.
func (n *Node) EndRequests() { n.endOnce.Do(func() { close(n.endc) }) }

// EndPeerStreams ends the streams of messages other members send this one
// (they open new ones, which end at once): the process exits, and its
// peer site must let go of them before Caddy can stop it. Call it after
// HandOver, which needs to hear the other members.
func (n *Node) EndPeerStreams() { n.peerEndOnce.Do(func() { close(n.peerEnd) }) }

// Stop stops the loop (transferring leadership first when there are other
// members), waits for it and closes the store. Waiting requests get
// ErrStopped. Safe to call more than once.
func (n *Node) Stop() error {
	n.lifeMu.Lock()
	if d := n.disc; d != nil && !n.started {
		// Discovering (or failed to): end it, and wait for it to close
		// the store, without the lock it takes to start the member.
		n.stopped = true
		n.halt()
		d.cancel()
		n.lifeMu.Unlock()
		<-d.done
		return nil
	}
	defer n.lifeMu.Unlock()
	if n.stopped || !n.started {
		n.stopped = true
		n.halt()
		return nil
	}
	n.stopped = true
	n.halt()
	n.HandOver()
	n.running.Store(false)
	n.bgStop()
	close(n.stopc)
	<-n.donec
	n.bg.Wait()
	// Peers now hear 503 (try later), not 403 from a transport that no
	// longer knows them.
	n.peerH.Store(nil)
	n.tr.Stop()
	err := n.store.Close()
	n.lg.Info("raftkv member stopped", zap.String("member-id", idString(n.id)))
	return err
}

// HandOver transfers leadership to another member when this one leads,
// waiting at most an election timeout, so that the cluster does not wait
// one out after this member stops (etcd transfers leadership on shutdown
// too). Stop calls it; Caddy calls it earlier when it exits, before its
// servers stop answering the peers that must take over.
func (n *Node) HandOver() {
	if !n.running.Load() || n.leader.Load() != n.id {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), n.cfg.ElectionTimeout)
	defer cancel()
	switch err := n.TransferLeadership(ctx); {
	case err == nil, errors.Is(err, ErrNoTransferee):
	case errors.Is(err, ErrTransfereeUnreachable):
		// The others are down or stopping too: nobody to hand over to.
		n.lg.Info("no leadership transfer on stop", zap.Error(err))
	default:
		n.lg.Warn("leadership transfer on stop failed", zap.Error(err))
	}
}

// Stopped reports whether Stop has been called: the node cannot start
// again.
func (n *Node) Stopped() bool {
	n.lifeMu.Lock()
	defer n.lifeMu.Unlock()
	return n.stopped
}

// Running reports whether Start succeeded and Stop has not been called.
func (n *Node) Running() bool { return n.running.Load() }

// Failed reports whether the member stopped on its own: its Raft loop
// ended on a panic or a storage failure, not by Stop or by its removal
// from the cluster. A Node does not restart; a new one on the same data
// directory starts the member again from what its file holds, as a new
// etcd process would.
func (n *Node) Failed() bool {
	n.lifeMu.Lock()
	defer n.lifeMu.Unlock()
	if d := n.disc; d != nil && !n.started {
		return d.failed && !n.stopped
	}
	if !n.started || n.stopped || n.gone.Load() {
		return false
	}
	return isClosed(n.donec)
}

// isClosed reports whether ch, a channel that is only ever closed, is.
func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// Do proposes a write and waits until it is applied on this member, retrying
// a proposal Raft dropped until ctx ends. A v2 failure (412, 404, ...) is
// returned as a *storage.Error; ctx ending gives ErrTimeout.
//
// Every attempt carries the same request ID, so however many attempts reach
// the log the store applies the request once (later ones are Duplicates);
// the waiter stays registered until the first outcome for the ID arrives.
func (n *Node) Do(ctx context.Context, r storage.Request) (*storage.Event, error) {
	if !n.running.Load() {
		return nil, ErrStopped
	}
	if ctx.Err() != nil {
		return nil, ErrTimeout
	}
	r.ID = n.ids.id()
	if ce := n.lg.Check(zap.DebugLevel, "proposing"); ce != nil {
		ce.Write(zap.String("request-id", idString(r.ID)), zap.String("method", r.Method), zap.String("path", r.Path))
	}
	res, err := n.submit(ctx, r.ID, proposal{data: r.Marshal(), c: waitChans.Get().(chan result)})
	if err != nil {
		return nil, err
	}
	return outcome(res.applied)
}

// submit proposes p (data, or a conf change) and waits for the first
// application of id, proposing again each time an attempt was dropped or
// went unanswered, until ctx ends. p.c receives the outcome.
func (n *Node) submit(ctx context.Context, id uint64, p proposal) (_ result, err error) {
	select {
	case <-n.endc:
		return result{}, ErrStopped
	default:
	}
	// etcd's etcd_server_proposals_pending and _failed_total (Metrics).
	n.proposalsPending.Add(1)
	defer func() {
		n.proposalsPending.Add(-1)
		if err != nil {
			n.proposalsFailed.Add(1)
		}
	}()
	n.w.register(id, p.c)
	defer n.w.cancel(id)
	var installs uint64 // snapshots installed when the first attempt that may be in a log went
	inLog := false      // an attempt may have reached a log
	for attempt := 0; ; attempt++ {
		if !inLog {
			// Snapshots installed while no attempt could be in a log
			// cannot hold this request.
			installs = n.installs.Load()
		}
		// Take the leader signal before proposing: a leader elected between
		// the drop and our wait must still wake us.
		leaderChanged := n.leaderChanged.wait()
		select {
		case n.propc <- p: // the common case, without the full select
		default:
			select {
			case n.propc <- p:
			case <-ctx.Done():
				return result{}, ErrTimeout
			case <-n.donec:
				return result{}, ErrStopped
			case <-n.endc:
				return result{}, ErrStopped
			}
		}
		retryOn := leaderChanged
		if p.cc != nil {
			retryOn = nil // see changeMembership
		}
		res, done, err := n.awaitAttempt(ctx, p.c, retryOn)
		if err != nil {
			return result{}, err
		}
		if done {
			if attempt == 0 && len(p.c) == 0 {
				// The one attempt was flushed to Raft (it was applied) and
				// the waiter is gone: nothing can send on p.c any more.
				waitChans.Put(p.c)
			}
			return res, nil
		}
		if err := n.backoff(ctx, attempt, leaderChanged); err != nil {
			return result{}, err
		}
		inLog = inLog || !res.dropped
		if inLog {
			// An attempt may be in a log, committed even, unheard of here
			// (a member cut off from its leader). A read index applied
			// here first: an attempt committed by then is applied and
			// answered, and one that commits later lands near the copy
			// in the log. Without it a copy could come after the store
			// forgot the original's ID, and apply the write again.
			if err := n.linearizableRead(ctx); err != nil {
				return result{}, err
			}
		}
		// The answer may have come meanwhile: then no copy goes.
		select {
		case res := <-p.c:
			if !res.dropped {
				return res, nil
			}
		default:
		}
		if inLog && n.installs.Load() != installs {
			// A snapshot came since the first attempt that may be in a
			// log: it may hold the request applied, which answers nobody
			// here, and the ID forgotten. Whether it was applied cannot
			// be told: etcd's answer to that is a timeout.
			return result{}, ErrTimeout
		}
	}
}

// awaitAttempt waits for the outcome of one attempt. It returns done false
// when the attempt must be retried: Raft dropped it (no leader, a leader
// transfer in progress), a new leader was elected since it was proposed
// (leaderChanged, nil for none: the leader it went to may have lost it, and
// a proposal a leader drops on stepping down is dropped silently), or it
// did not commit within two election timeouts (a message lost on the way).
// A copy that survives as well is applied once: the store skips a request
// ID it has applied (storage's dedup).
func (n *Node) awaitAttempt(ctx context.Context, c chan result, leaderChanged <-chan struct{}) (res result, done bool, err error) {
	epochs := 0
	epoch := n.retryEpoch.wait()
	for {
		select {
		case res = <-c:
			return res, !res.dropped, nil
		case <-leaderChanged:
			if n.leader.Load() != 0 {
				return res, false, nil
			}
			// Lost, not changed: wait for the next one.
			leaderChanged = n.leaderChanged.wait()
		case <-epoch:
			if epochs++; epochs >= 2 {
				return res, false, nil
			}
			epoch = n.retryEpoch.wait()
		case <-ctx.Done():
			return res, false, ErrTimeout
		case <-n.endc:
			return res, false, ErrStopped
		case <-n.donec:
			// The last Ready before the loop stopped may have answered.
			select {
			case res = <-c:
				if !res.dropped {
					return res, true, nil
				}
			default:
			}
			return res, false, ErrStopped
		}
	}
}

// backoff waits before another attempt: until the leader changes, or a
// short, growing delay for drops that a leader change does not end (a
// transfer in progress, the uncommitted-size limit).
func (n *Node) backoff(ctx context.Context, attempt int, leaderChanged <-chan struct{}) error {
	d := 5 * time.Millisecond << min(attempt, 10)
	d = min(d, n.cfg.ElectionTimeout/2)
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-leaderChanged:
	case <-t.C:
	case <-ctx.Done():
		return ErrTimeout
	case <-n.donec:
		return ErrStopped
	case <-n.endc:
		return ErrStopped
	}
	return nil
}

// outcome turns the first application of a request into Do's answer.
func outcome(a storage.Applied) (*storage.Event, error) {
	if a.Err != nil {
		return nil, a.Err
	}
	if a.Event != nil {
		return a.Event, nil
	}
	// An outcome with neither event nor error is a duplicate whose original
	// result this process never saw (it cannot happen while IDs are unique
	// per boot). The write did happen, its answer is lost: indeterminate,
	// which is what etcd's "request timed out" tells a client.
	return nil, ErrTimeout
}

// Get reads a key. With quorum it first obtains a read index through Raft
// (a fresh request context per attempt) and waits until this member has
// applied it: linearizable. Without quorum it reads local state.
func (n *Node) Get(ctx context.Context, path string, recursive, sorted, quorum bool) (*storage.Event, error) {
	return readLocal(ctx, n, quorum, func() (*storage.Event, error) { return n.localGet(path, recursive, sorted) })
}

// Auth returns the v2 auth data this member has applied; with quorum, as
// of a linearizable read (see Get).
func (n *Node) Auth(ctx context.Context, quorum bool) (*storage.AuthData, error) {
	return readLocal(ctx, n, quorum, func() (*storage.AuthData, error) {
		d, err := n.store.Auth()
		if errors.Is(err, storage.ErrClosed) {
			return nil, ErrStopped
		}
		return d, err
	})
}

// readLocal runs local, a read of this member's store; with quorum, so that it
// sees everything committed before the call.
func readLocal[T any](ctx context.Context, n *Node, quorum bool, local func() (T, error)) (T, error) {
	var zero T
	if !n.running.Load() {
		return zero, ErrStopped
	}
	if quorum {
		// The only voter, leading, needs no read index: no other member can
		// have committed anything, and every write it answered is applied.
		// Only once it has applied all Raft has committed (entries of an
		// earlier configuration may be committed but not yet applied), and
		// it must still be the only voter when the read is done: the loop
		// counts the change before it sends a new voter anything, so an
		// unchanged count means no other member has had a say yet.
		if g := n.sole.Load(); g%2 == 1 && n.applied.Load() >= n.commitSeen.Load() {
			v, err := local()
			if n.sole.Load() == g {
				return v, err
			}
		}
		if err := n.linearizableRead(ctx); err != nil {
			return zero, err
		}
	}
	return local()
}

func (n *Node) localGet(path string, recursive, sorted bool) (*storage.Event, error) {
	ev, err := n.store.Get(path, recursive, sorted, time.Now())
	if errors.Is(err, storage.ErrClosed) {
		return nil, ErrStopped
	}
	return ev, err
}

// Watch registers a v2 watcher on this member's store.
func (n *Node) Watch(path string, recursive, stream bool, sinceIndex uint64) (*storage.Watcher, error) {
	if !n.running.Load() {
		return nil, ErrStopped
	}
	w, err := n.store.Watch(path, recursive, stream, sinceIndex)
	if errors.Is(err, storage.ErrClosed) {
		return nil, ErrStopped
	}
	return w, err
}

// Status is a point-in-time view of the member for response headers and
// stats.
type Status struct {
	ID          uint64 // member ID
	ClusterID   uint64
	Leader      uint64 // 0 when there is none
	Term        uint64
	RaftIndex   uint64 // the committed Raft index (X-Raft-Index)
	EtcdIndex   uint64 // the store index (X-Etcd-Index)
	IsLeader    bool
	StartTime   time.Time
	LeaderSince time.Time // when the current leader became known
}

// Status returns the member's current status.
func (n *Node) Status() Status {
	if !n.booted.Load() {
		return Status{}
	}
	s := Status{
		ID:        n.id,
		ClusterID: n.clusterID,
		Leader:    n.leader.Load(),
		Term:      n.term.Load(),
		RaftIndex: n.committed.Load(),
		StartTime: n.startTime,
	}
	s.IsLeader = s.Leader != 0 && s.Leader == n.id
	if ns := n.leaderSince.Load(); ns != 0 {
		s.LeaderSince = time.Unix(0, ns)
	}
	// A stopped member's store keeps its last index (an atomic: readable
	// after the file closed).
	s.EtcdIndex = n.store.Index()
	return s
}

// Member is one entry of /v2/members.
type Member struct {
	ID         uint64
	Name       string
	PeerURLs   []string
	ClientURLs []string
}

// Healthy reports whether the member has a leader and can commit: /health.
// Like etcd's health check it goes through Raft, here with a ReadIndex
// round, bounded by ctx and one election timeout.
func (n *Node) Healthy(ctx context.Context) bool {
	if !n.running.Load() || n.leader.Load() == 0 {
		return false
	}
	ctx, cancel := context.WithTimeout(ctx, n.cfg.ElectionTimeout)
	defer cancel()
	return n.linearizableRead(ctx) == nil
}
