package caddymodule

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyevents"
	"go.uber.org/zap"

	"github.com/etcaddy/etcaddy/raftkv"
)

func init() {
	caddy.RegisterModule(App{})
}

// members holds the Raft node of every data directory in use, keyed by the
// directory's absolute path. Caddy rebuilds every app on every config change
// and runs the new instance beside the old one for a while, so the node must
// outlive app instances: each instance takes a reference in Provision and
// drops it in Cleanup, and the node stops only when the last one goes.
var members = caddy.NewUsagePool()

// Defaults, as etcd's flags have them.
const (
	defaultName              = "default"
	defaultSnapshotCount     = 10000
	defaultHeartbeatInterval = 100 * time.Millisecond
	defaultElectionTimeout   = time.Second
	defaultClusterToken      = "etcd-cluster"
	// etcd refuses an election timeout over 50 s (embed.Config.Validate).
	maxElectionTimeout = 50 * time.Second
	// maxEntryCount bounds snapshot_count and snapshot_catchup_entries:
	// Caddy carries a config's numbers as JSON's doubles on their way to
	// the app, which keep integers exact up to 2^53 only.
	maxEntryCount = 1 << 53
)

// App runs one etcaddy member: its store, its Raft node and the leader's
// TTL reaper. The etcd handler serves the v2 API from it. Without any
// configuration it runs a single-member cluster named "default" with its
// data under Caddy's data directory, like a bare `etcd` does.
//
// The member survives config reloads: as long as its data directory and
// name stay the same, a reload keeps the running Raft node. A reload that
// gives an existing data directory another name or cluster token fails.
type App struct {
	// The member's name (etcd's --name). Default: "default".
	Name string `json:"name,omitempty"`

	// Where the member keeps its data: one bbolt file, member.db (etcd's
	// --data-dir). Default: raftkv/<name> under Caddy's data directory.
	DataDir string `json:"data_dir,omitempty"`

	// How many applied entries trigger a snapshot and log compaction
	// (etcd's --snapshot-count). Default: 10000.
	SnapshotCount uint64 `json:"snapshot_count,omitempty"`

	// How many entries the log keeps behind each snapshot, for followers
	// that lag to catch up from instead of a whole snapshot (etcd 3.6's
	// --snapshot-catchup-entries, 3.5.13's
	// --experimental-snapshot-catchup-entries; etcd 3.4 always keeps
	// 5000). Default: 5000.
	SnapshotCatchUpEntries uint64 `json:"snapshot_catchup_entries,omitempty"`

	// Time between the leader's heartbeats (etcd's --heartbeat-interval).
	// At least 1ms. Default: 100ms.
	HeartbeatInterval caddy.Duration `json:"heartbeat_interval,omitempty"`

	// How long a follower waits without hearing from a leader before it
	// starts an election (etcd's --election-timeout). At least 5 heartbeat
	// intervals and at most 50s. Default: 1s.
	ElectionTimeout caddy.Duration `json:"election_timeout,omitempty"`

	// The members of the cluster to bootstrap, by name, with their peer
	// URLs (etcd's --initial-cluster). It must name this member (a proxy's
	// lists the members it forwards to). Used only
	// when the data directory is new. Default: this member alone, with
	// initial_advertise_peer_urls. Not with discovery or discovery_srv.
	InitialCluster map[string][]string `json:"initial_cluster,omitempty"`

	// This member's peer URLs, as the other members reach it (etcd's
	// --initial-advertise-peer-urls): with initial_cluster they must be
	// this member's entry there; with discovery they are what the member
	// registers, with discovery_srv what finds it among the records. Used only when the data directory is new. Default: this
	// member's entry in initial_cluster, else http://localhost:2380.
	InitialAdvertisePeerURLs []string `json:"initial_advertise_peer_urls,omitempty"`

	// The URL of a discovery service that bootstraps a new cluster instead
	// of initial_cluster (etcd's --discovery): an etcd v2 keys API
	// directory, such as http://host:2379/v2/keys/discovery/<token> on any
	// etcd or etcaddy, whose _config/size key holds the number of members.
	// Each member registers there with initial_advertise_peer_urls and
	// waits until that many have; the first that many are the cluster.
	// The member starts once discovery ends (Caddy does not wait for it).
	// The URL is also the cluster token. Used only when the data directory
	// is new, with initial_cluster_state new.
	Discovery string `json:"discovery,omitempty"`

	// An HTTP proxy to reach the discovery service through (etcd's
	// --discovery-proxy): http://host:port, or host:port. Without it the
	// member reaches the service directly, whatever HTTP_PROXY says, as
	// etcd does.
	DiscoveryProxy string `json:"discovery_proxy,omitempty"`

	// What a member does when the discovery service says the cluster is
	// full without it (etcd's --discovery-fallback): "proxy" runs it as a
	// proxy of that cluster, its etcd handler forwarding every request to
	// the members' client URLs, for good (its data directory remembers);
	// "exit" leaves it stopped. Default: "proxy", as etcd.
	DiscoveryFallback string `json:"discovery_fallback,omitempty"`

	// Run a member that starts on an empty data directory as a proxy of
	// its cluster instead (etcd's --proxy): "on" makes its etcd handler
	// forward every API request to the client URLs of the members of
	// initial_cluster (or of the cluster discovery or discovery_srv
	// finds), "readonly" only the GETs (others get 501), "off" runs a
	// member. The data directory keeps what the first start made of it.
	// Default: "off".
	Proxy string `json:"proxy,omitempty"`

	// A proxy's timings (etcd's --proxy-refresh-interval,
	// --proxy-failure-wait, --proxy-dial-timeout): how often it reads
	// the members' client URLs again (default 30s; while none answers,
	// every second, when the interval is 30s or more), how long a member
	// it could not reach is left out (default 5s), how long it dials a
	// member's client URL (default 1s; the member list is read from the
	// peer URLs with the peer transport's own 1s). They apply to a member
	// that runs as a proxy, by proxy or by discovery_fallback.
	ProxyRefreshInterval caddy.Duration `json:"proxy_refresh_interval,omitempty"`
	ProxyFailureWait     caddy.Duration `json:"proxy_failure_wait,omitempty"`
	ProxyDialTimeout     caddy.Duration `json:"proxy_dial_timeout,omitempty"`

	// How long each read from, and each write to, a proxy's connection to
	// a member may take (etcd's --proxy-read-timeout and
	// --proxy-write-timeout): a member that stops answering, or stops
	// reading what it is sent, for that long fails the request there, and
	// the proxy tries the next member (all failed: 502) and leaves that
	// one out for proxy_failure_wait. A read timeout also ends a watch
	// that waits longer for its event (its client sees an empty answer
	// and watches again), as etcd's does, and makes the proxy speak
	// HTTP/1.1 to the members. Defaults: no read timeout, 5s for writes;
	// a negative duration turns either off (Caddyfile: 0 or off).
	ProxyReadTimeout  caddy.Duration `json:"proxy_read_timeout,omitempty"`
	ProxyWriteTimeout caddy.Duration `json:"proxy_write_timeout,omitempty"`

	// A DNS domain whose SRV records list the members of a new cluster
	// (etcd's --discovery-srv), instead of initial_cluster:
	// _etcd-server-ssl._tcp.<domain> for https peer URLs and
	// _etcd-server._tcp.<domain> for http ones, each record a member's
	// peer host and port. This member is the record whose host and port
	// resolve to those of its initial_advertise_peer_urls. With
	// initial_cluster_state existing the records name the members to ask
	// for the member list. The member starts once the records are read
	// (Caddy does not wait for it). Used only when the data directory is
	// new.
	DiscoverySRV string `json:"discovery_srv,omitempty"`

	// A suffix for the SRV services' names (etcd's --discovery-srv-name):
	// with "blue", _etcd-server-ssl-blue._tcp.<domain> and
	// _etcd-server-blue._tcp.<domain>, so that one domain can list
	// several clusters.
	DiscoverySRVName string `json:"discovery_srv_name,omitempty"`

	// "new" to bootstrap a new cluster, "existing" to join one that runs
	// (etcd's --initial-cluster-state). Default: "new".
	InitialClusterState string `json:"initial_cluster_state,omitempty"`

	// A token that makes the member and cluster IDs of this cluster unique
	// (etcd's --initial-cluster-token). Default: "etcd-cluster".
	InitialClusterToken string `json:"initial_cluster_token,omitempty"`

	// The client URLs this member publishes in /v2/members and
	// /v2/machines (etcd's --advertise-client-urls). When empty, the
	// member answers with the scheme and host each request came in on, so
	// clients that sync their endpoints keep using the address they know.
	AdvertiseClientURLs []string `json:"advertise_client_urls,omitempty"`

	// The certificate (PEM) this member presents to its peers when it
	// dials their https:// peer URLs (etcd's --peer-cert-file). It must
	// be valid for client authentication, and comes with peer_key_file.
	// The server side of peer TLS is the peer site's own `tls` and
	// `client_auth`.
	PeerCertFile string `json:"peer_cert_file,omitempty"`

	// The private key (PEM) of peer_cert_file (etcd's --peer-key-file).
	PeerKeyFile string `json:"peer_key_file,omitempty"`

	// The CA certificates (PEM) that sign the peers' certificates: this
	// member trusts only them when it dials https:// peer URLs (etcd's
	// --peer-trusted-ca-file). Default: the system's roots.
	PeerTrustedCAFile string `json:"peer_trusted_ca_file,omitempty"`

	// Whether membership changes that could cost the cluster its quorum
	// are refused, as etcd's --strict-reconfig-check refuses them (500
	// from /v2/members): adding a member while this member has not reached
	// every member for the last 5 s, or while too few members have started
	// to make the new quorum; removing a member that is up while too few
	// others are. A reload changes it on the running member. Default: true.
	StrictReconfigCheck *bool `json:"strict_reconfig_check,omitempty"`

	// Whether the member, when it starts on its data, makes itself the only
	// member of its cluster (etcd's --force-new-cluster): the way back for
	// a cluster that lost a majority of its members for good. It keeps its
	// data, member and cluster IDs and index; the others are removed for
	// good (one that comes back is refused, and stops), and its entries not
	// yet committed are dropped. Remove it once the member runs: every
	// start with it removes the members added since. No effect on an empty
	// data directory. Default: false.
	ForceNewCluster bool `json:"force_new_cluster,omitempty"`

	member  *member
	poolKey string        // set while this instance holds a reference in members
	cfg     raftkv.Config // this config's node settings, for a member that starts anew
	files   peerTLSFiles
	started bool // Start succeeded: Cleanup's release may stop a member that ran
	logger  *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (App) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "raftkv",
		New: func() caddy.Module { return new(App) },
	}
}

// Provision fills in defaults, checks the configuration and takes a
// reference on the member of its data directory. It opens nothing (it
// only looks whether data_dir holds a member's database, see Validate):
// `caddy validate` provisions in a second process while the real member
// runs and holds the data directory.
func (a *App) Provision(ctx caddy.Context) error {
	a.logger = ctx.Logger()
	if a.DataDir == "" && (strings.ContainsAny(a.Name, `/\`) || a.Name == "." || a.Name == "..") {
		// The default data_dir is raftkv/<name> under Caddy's data directory.
		return fmt.Errorf("name %q cannot name a directory under Caddy's data directory: set data_dir", a.Name)
	}
	a.setDefaults()
	if err := a.Validate(); err != nil {
		return err
	}
	dir, err := filepath.Abs(a.DataDir)
	if err != nil {
		return fmt.Errorf("data_dir %q: %w", a.DataDir, err)
	}
	a.DataDir = dir
	a.warnPeerSecurity()
	if err := movedByReload(dir, a.Name); err != nil {
		return err
	}
	cfg := a.nodeConfig()
	files := a.peerTLSFiles()
	a.cfg, a.files = cfg, files
	val, loaded, err := members.LoadOrNew(dir, func() (caddy.Destructor, error) {
		m := &member{peerFiles: files, logLevel: zap.NewAtomicLevelAt(zap.DebugLevel)}
		m.cfg = m.nodeConfig(cfg, files)
		m.node.Store(raftkv.NewNode(m.cfg))
		return m, nil
	})
	if err != nil {
		return err
	}
	m := val.(*member)
	if loaded {
		if err := m.sameIdentity(cfg); err != nil {
			// Give the reference back now: Cleanup must not drop it twice.
			if _, derr := members.Delete(dir); derr != nil {
				a.logger.Error("releasing member", zap.Error(derr))
			}
			return err
		}
		changed := m.tuningChanges(cfg)
		if m.peerFiles != files {
			changed = append(changed, "peer TLS files")
		}
		n := m.current()
		discovering := n != nil && n.Discovering()
		if len(changed) > 0 && !discovering {
			a.logger.Warn("member settings changed; they take effect when Caddy restarts (or when a member a failure stopped starts again)",
				zap.String("data_dir", dir), zap.Strings("settings", changed))
		}
		// A member still discovering has not started: Start begins again
		// with the new settings (member.start).
		if changed := m.bootstrapChanges(cfg); len(changed) > 0 && !discovering {
			why := "this member's list of members lives in its data"
			if n != nil && n.Proxy() != nil {
				why = "this member runs as a proxy of its cluster, and its data directory keeps it one"
			}
			a.logger.Warn("member settings changed that only a member's first start on an empty data_dir reads; "+why,
				zap.String("data_dir", dir), zap.Strings("settings", changed))
		}
	}
	a.member, a.poolKey = m, dir
	m.hold(a)
	if reg := ctx.GetMetricsRegistry(); reg != nil {
		// This config's registry, which the admin endpoint's /metrics
		// serves while the config runs.
		if err := reg.Register(memberMetrics{m}); err != nil {
			a.logger.Warn("cannot export the member's metrics", zap.Error(err))
		}
	}
	// Caddy stops its apps in no set order, and its HTTP servers, the
	// peer site among them, stop answering first when the http app goes
	// first: a leader that waits for its own Stop to hand over can no
	// longer hear the member it hands over to. Caddy's "stopping" event
	// comes before any app stops.
	events, err := ctx.App("events")
	if err != nil {
		return err
	}
	return events.(*caddyevents.App).On("stopping", exitHandover{m})
}

// exitHandover is the member's handler of Caddy's "stopping" event, which
// every config emits as it stops: when the process exits (not on a
// reload, which keeps the member), open watches and waiting requests end,
// and a leader hands leadership over while its peers still hear it.
type exitHandover struct{ m *member }

// Handle implements caddyevents.Handler.
func (h exitHandover) Handle(context.Context, caddy.Event) error {
	if !caddy.Exiting() {
		return nil
	}
	endWatchesIfExiting()
	if n := h.m.running(); n != nil {
		n.HandOver()
		n.EndPeerStreams()
	}
	return nil
}

// movedByReload refuses a config whose member would live in data
// directory dir while this process runs a member in another one: a config
// has one member, so the new config would replace the running member by
// another, with what that directory holds (often nothing: a new cluster),
// and stop the running one. That is a reload that changed data_dir, or a
// name when data_dir is left to its default. A member that stopped (removed
// from its cluster, or by a failure) may be replaced.
func movedByReload(dir, name string) error {
	var err error
	members.Range(func(key, value any) bool {
		m := value.(*member)
		if key.(string) != dir && m.current().Running() {
			err = fmt.Errorf("this process runs member %q in data_dir %s: a reload cannot move it to %s "+
				"(member %q); to move its data, stop Caddy, move the directory and start Caddy again",
				m.cfg.Name, key, dir, name)
			return false
		}
		return true
	})
	return err
}

func (a *App) setDefaults() {
	if a.Name == "" {
		a.Name = defaultName
	}
	if a.DataDir == "" {
		a.DataDir = filepath.Join(caddy.AppDataDir(), "raftkv", a.Name)
	}
	if a.SnapshotCount == 0 {
		a.SnapshotCount = defaultSnapshotCount
	}
	if a.SnapshotCatchUpEntries == 0 {
		a.SnapshotCatchUpEntries = raftkv.DefaultSnapshotCatchUpEntries
	}
	if a.HeartbeatInterval == 0 {
		a.HeartbeatInterval = caddy.Duration(defaultHeartbeatInterval)
	}
	if a.ElectionTimeout == 0 {
		a.ElectionTimeout = caddy.Duration(defaultElectionTimeout)
	}
	if a.InitialClusterState == "" {
		a.InitialClusterState = "new"
	}
	if a.InitialClusterToken == "" {
		a.InitialClusterToken = defaultClusterToken
	}
}

// Validate checks the configuration as etcd checks its flags.
func (a *App) Validate() error {
	if a.HeartbeatInterval < 0 {
		return fmt.Errorf("heartbeat_interval %v is negative", time.Duration(a.HeartbeatInterval))
	}
	if a.ElectionTimeout < 0 {
		return fmt.Errorf("election_timeout %v is negative", time.Duration(a.ElectionTimeout))
	}
	hb, et := time.Duration(a.HeartbeatInterval), time.Duration(a.ElectionTimeout)
	if hb > 0 && hb < time.Millisecond {
		// etcd's flag counts whole milliseconds; below that, the Raft loop
		// would tick faster than it can turn (or not at all).
		return fmt.Errorf("heartbeat_interval %v is under 1ms (in JSON, a number without a unit is nanoseconds: write \"100ms\")", hb)
	}
	if a.SnapshotCount > maxEntryCount || a.SnapshotCatchUpEntries > maxEntryCount {
		return fmt.Errorf("snapshot_count and snapshot_catchup_entries must be at most %d", uint64(maxEntryCount))
	}
	if hb > 0 && et > 0 && et < 5*hb {
		return fmt.Errorf("election_timeout %v should be at least 5 times heartbeat_interval %v", et, hb)
	}
	if et > maxElectionTimeout {
		return fmt.Errorf("election_timeout %v is too long, and should be at most %v", et, maxElectionTimeout)
	}
	switch a.InitialClusterState {
	case "", "new", "existing":
	default:
		return fmt.Errorf(`initial_cluster_state %q must be "new" or "existing"`, a.InitialClusterState)
	}
	for name, urls := range a.InitialCluster {
		if name == "" {
			return errors.New("initial_cluster has a member without a name")
		}
		if _, err := raftkv.NormalizeURLs(urls); err != nil {
			return fmt.Errorf("initial_cluster member %q: %v", name, err)
		}
	}
	if len(a.InitialCluster) > 0 && a.Name != "" && (a.Proxy == "" || a.Proxy == "off") {
		// A proxy's initial_cluster lists the members it forwards to. A
		// member that has run before reads its cluster from its data and
		// not from initial_cluster, as etcd does (a member renamed at a
		// restart publishes its new name).
		if _, ok := a.InitialCluster[a.Name]; !ok && !hasMemberData(a.DataDir) {
			return fmt.Errorf("initial_cluster does not name this member %q", a.Name)
		}
	}
	if len(a.AdvertiseClientURLs) > 0 {
		if _, err := raftkv.NormalizeURLs(a.AdvertiseClientURLs); err != nil {
			return fmt.Errorf("advertise_client_urls: %v", err)
		}
	}
	if err := a.validateBootstrap(); err != nil {
		return err
	}
	// etcd's TLSInfo needs the certificate and its key together; a CA
	// alone is fine (the member verifies its peers but shows no
	// certificate, which a peer site with client_auth refuses).
	if (a.PeerCertFile == "") != (a.PeerKeyFile == "") {
		return errors.New("peer_cert_file and peer_key_file go together: give both or neither")
	}
	return nil
}

// validateBootstrap checks discovery and initial_advertise_peer_urls
// against the rest, as etcd checks its bootstrap flags.
func (a *App) validateBootstrap() error {
	if len(a.InitialAdvertisePeerURLs) > 0 {
		mine, err := raftkv.NormalizeURLs(a.InitialAdvertisePeerURLs)
		if err != nil {
			return fmt.Errorf("initial_advertise_peer_urls: %v", err)
		}
		if dup := slices.Compact(slices.Clone(mine)); len(dup) != len(mine) {
			// etcd's checkDuplicateURL: a member registered so would make
			// every member's discovery fail.
			return fmt.Errorf("initial_advertise_peer_urls has a duplicate URL: %s", strings.Join(mine, ","))
		}
		if entry, ok := a.InitialCluster[a.Name]; ok {
			// Validate has checked the entry's URLs.
			entry, _ = raftkv.NormalizeURLs(entry)
			if !slices.Equal(mine, entry) {
				return fmt.Errorf("initial_advertise_peer_urls %s differ from this member's initial_cluster entry %s=%s",
					strings.Join(mine, ","), a.Name, strings.Join(entry, ","))
			}
		}
	}
	if a.DiscoverySRVName != "" {
		if a.DiscoverySRV == "" {
			return errors.New("discovery_srv_name goes with discovery_srv")
		}
		if err := raftkv.CheckSRVName(a.DiscoverySRVName); err != nil {
			return fmt.Errorf("discovery_srv_name: %v", err)
		}
	}
	if a.DiscoverySRV != "" {
		if err := raftkv.CheckSRVDomain(a.DiscoverySRV); err != nil {
			return fmt.Errorf("discovery_srv: %v", err)
		}
		if a.Discovery != "" || len(a.InitialCluster) > 0 {
			// etcd's ErrConflictBootstrapFlags.
			return errors.New(`multiple discovery or bootstrap options are set: choose one of "initial_cluster", "discovery" or "discovery_srv" (with discovery_srv, initial_advertise_peer_urls gives this member's peer URLs)`)
		}
	}
	for _, d := range []struct {
		name string
		v    caddy.Duration
		off  bool // negative: none
	}{
		{"proxy_refresh_interval", a.ProxyRefreshInterval, false}, {"proxy_failure_wait", a.ProxyFailureWait, false},
		{"proxy_dial_timeout", a.ProxyDialTimeout, false},
		{"proxy_read_timeout", a.ProxyReadTimeout, true}, {"proxy_write_timeout", a.ProxyWriteTimeout, true},
	} {
		if d.v < 0 && !d.off || d.v > 0 && time.Duration(d.v) < time.Millisecond {
			orNone := ""
			if d.off {
				orNone = " (or negative: none)"
			}
			return fmt.Errorf("%s must be at least 1ms%s, not %v", d.name, orNone, time.Duration(d.v))
		}
	}
	switch a.Proxy {
	case "", "off", "on", "readonly":
	default:
		return fmt.Errorf(`proxy must be "off", "on" or "readonly", not %q`, a.Proxy)
	}
	switch a.DiscoveryFallback {
	case "", "proxy", "exit":
	default:
		return fmt.Errorf(`discovery_fallback must be "proxy" or "exit", not %q`, a.DiscoveryFallback)
	}
	if a.Discovery == "" {
		if a.DiscoveryProxy != "" {
			return errors.New("discovery_proxy goes with discovery")
		}
		if a.DiscoveryFallback != "" {
			return errors.New("discovery_fallback goes with discovery")
		}
		return nil
	}
	if _, err := raftkv.ParseDiscoveryProxy(a.DiscoveryProxy); err != nil {
		return err
	}
	if err := raftkv.CheckDiscoveryURL(a.Discovery); err != nil {
		return err
	}
	if len(a.InitialCluster) > 0 {
		// etcd's ErrConflictBootstrapFlags.
		return errors.New(`multiple discovery or bootstrap options are set: choose one of "initial_cluster" or "discovery" (with discovery, initial_advertise_peer_urls gives this member's peer URLs)`)
	}
	if a.InitialClusterState == "existing" {
		return errors.New("discovery bootstraps a new cluster; to join a running one, start with initial_cluster (the members to ask) and initial_cluster_state existing")
	}
	return nil
}

// warnPeerSecurity tells the operator about peer traffic that travels
// unprotected or that the peer TLS options will not protect.
func (a *App) warnPeerSecurity() {
	httpsPeers := false
	peers := a.InitialCluster
	if len(peers) == 0 && len(a.InitialAdvertisePeerURLs) > 0 {
		// With discovery, the others' URLs come later; this member's now.
		peers = map[string][]string{a.Name: a.InitialAdvertisePeerURLs}
	}
	for name, urls := range peers {
		for _, raw := range urls {
			u, err := url.Parse(raw)
			if err != nil {
				continue // Validate has refused it already
			}
			switch {
			case u.Scheme == "https":
				httpsPeers = true
				if _, err := netip.ParseAddr(u.Hostname()); err == nil {
					// Go's TLS client sends no SNI for an address; Caddy then
					// matches none of the site's connection policies, and its
					// strict SNI check answers every peer request with 421.
					a.logger.Warn("https:// peer URL names an IP address: a TLS client sends no server name for it, "+
						"so a Caddy peer site with client_auth answers 421 Misdirected Request; name the peer by a "+
						"DNS name (an /etc/hosts entry will do) and give its certificate that name",
						zap.String("member", name), zap.String("peer_url", raw))
				}
			case u.Scheme == "http" && !isLoopback(u.Hostname()):
				a.logger.Warn("peer URL is plain HTTP beyond this host: Raft traffic and snapshots travel "+
					"unencrypted and unauthenticated; use https:// peer URLs with mutual TLS",
					zap.String("member", name), zap.String("peer_url", raw))
			}
		}
	}
	if httpsPeers && a.PeerCertFile == "" {
		a.logger.Warn("https:// peer URLs without peer_cert_file: this member presents no client certificate, " +
			"so peer sites that require one (client_auth) refuse it")
	}
}

// isLoopback reports whether host names this machine only.
func isLoopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.IsLoopback()
}

// Start starts the member. On a reload it is already running, and Start
// only applies the settings a reload changes, strict_reconfig_check and
// advertise_client_urls; a member that a failure stopped starts again,
// with this config's settings.
func (a *App) Start() error {
	if err := a.member.start(a.cfg, a.files); err != nil {
		return fmt.Errorf("starting member %q in %s: %w", a.Name, a.DataDir, err)
	}
	a.started = true
	a.member.apply(a)
	return nil
}

func (a *App) strictReconfigCheck() bool {
	return a.StrictReconfigCheck == nil || *a.StrictReconfigCheck
}

// Stop leaves the member be: it outlives this app instance, and the
// instance's Cleanup releases it. When Caddy exits, it ends open watches
// (see processExit). When Caddy rolls a reload back (an app started after
// this one failed), the config it keeps running gets its settings back.
func (a *App) Stop() error {
	endWatchesIfExiting()
	if a.member != nil && !caddy.Exiting() {
		a.member.withdraw(a)
	}
	return nil
}

// Cleanup releases this instance's reference on the member; the member
// stops when no config uses its data directory any more.
func (a *App) Cleanup() error {
	if a.poolKey == "" {
		return nil
	}
	key := a.poolKey
	a.poolKey = ""
	a.member.release(a)
	deleted, err := members.Delete(key)
	if deleted && a.started && a.logger != nil {
		a.logger.Info("member stopped", zap.String("name", a.Name), zap.String("data_dir", key))
	}
	return err
}

// requestTimeout bounds a write or a quorum read: etcd's request timeout,
// 5s plus two election timeouts.
func (a *App) requestTimeout() time.Duration {
	return 5*time.Second + 2*time.Duration(a.ElectionTimeout)
}

func (a *App) nodeConfig() raftkv.Config {
	var cluster map[string][]string
	switch {
	case len(a.InitialCluster) > 0:
		cluster = make(map[string][]string, len(a.InitialCluster))
		for name, urls := range a.InitialCluster {
			cluster[name] = slices.Clone(urls)
		}
	case len(a.InitialAdvertisePeerURLs) > 0:
		// etcd's default --initial-cluster: this member, with its
		// advertised peer URLs (the one discovery registers).
		cluster = map[string][]string{a.Name: slices.Clone(a.InitialAdvertisePeerURLs)}
	}
	return raftkv.Config{
		Name:                   a.Name,
		DataDir:                a.DataDir,
		SnapshotCount:          a.SnapshotCount,
		SnapshotCatchUpEntries: a.SnapshotCatchUpEntries,
		HeartbeatInterval:      time.Duration(a.HeartbeatInterval),
		ElectionTimeout:        time.Duration(a.ElectionTimeout),
		InitialCluster:         cluster,
		InitialClusterState:    a.InitialClusterState,
		InitialClusterToken:    a.InitialClusterToken,
		AdvertiseClientURLs:    slices.Clone(a.AdvertiseClientURLs),
		ForceNewCluster:        a.ForceNewCluster,
		Discovery:              a.Discovery,
		DiscoveryProxy:         a.DiscoveryProxy,
		DiscoveryFallback:      a.DiscoveryFallback,
		Proxy:                  a.Proxy,
		ProxyRefreshInterval:   time.Duration(a.ProxyRefreshInterval),
		ProxyFailureWait:       time.Duration(a.ProxyFailureWait),
		ProxyDialTimeout:       time.Duration(a.ProxyDialTimeout),
		ProxyReadTimeout:       time.Duration(a.ProxyReadTimeout),
		ProxyWriteTimeout:      time.Duration(a.ProxyWriteTimeout),
		DiscoverySRV:           a.DiscoverySRV,
		DiscoverySRVName:       a.DiscoverySRVName,
		LooseReconfig:          !a.strictReconfigCheck(),
		// The node outlives this config, so it logs through the process's
		// default logger rather than this config's.
		Logger: caddy.Log().Named("raftkv"),
	}
}

// withPeerTLS gives cfg the client side of peer TLS when files name any:
// an empty tls.Config, filled in from the files by member.start before
// the node starts and first dials a peer (reading them in Provision would
// be I/O there).
func withPeerTLS(cfg raftkv.Config, files peerTLSFiles) raftkv.Config {
	if !files.empty() {
		cfg.Peer.TLS = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	return cfg
}

// member is what the pool holds for one data directory: the node, and the
// configuration it was last started with.
type member struct {
	node      atomic.Pointer[raftkv.Node] // replaced only when a failure stopped it (see start)
	cfg       raftkv.Config
	peerFiles peerTLSFiles

	// logLevel is the level PUT /config/local/log set for the member's
	// logs (serveConfigLog), Debug (Caddy's config decides) until then.
	logLevel zap.AtomicLevel

	startMu    sync.Mutex
	peerLoaded bool
	apps       []*App // the app instances holding the member, oldest first
	inEffect   *App   // the started instance whose reloadable settings the node has
}

// hasMemberData reports whether dir holds a member's database: the member
// has started there before.
func hasMemberData(dir string) bool {
	if dir == "" {
		return false
	}
	fi, err := os.Stat(filepath.Join(dir, "member.db"))
	return err == nil && fi.Mode().IsRegular() && fi.Size() > 0
}

// nodeConfig is the configuration a node of the member runs with: cfg with
// the peer TLS files' settings and the member's log level.
func (m *member) nodeConfig(cfg raftkv.Config, files peerTLSFiles) raftkv.Config {
	cfg = withPeerTLS(cfg, files)
	cfg.Logger = withMemberLevel(cfg.Logger, m.logLevel)
	return cfg
}

// hold and release track the app instances that hold the member.
func (m *member) hold(a *App) {
	m.startMu.Lock()
	defer m.startMu.Unlock()
	m.apps = append(m.apps, a)
}

func (m *member) release(a *App) {
	m.startMu.Lock()
	defer m.startMu.Unlock()
	m.apps = slices.DeleteFunc(m.apps, func(b *App) bool { return b == a })
	if m.inEffect == a {
		m.inEffect = nil
	}
}

// apply gives the node the settings a reload changes on a running member
// (strict_reconfig_check, advertise_client_urls) from a, a started
// instance.
func (m *member) apply(a *App) {
	m.startMu.Lock()
	defer m.startMu.Unlock()
	m.applyLocked(a)
}

func (m *member) applyLocked(a *App) {
	n := m.current()
	n.SetStrictReconfigCheck(a.strictReconfigCheck())
	n.SetAdvertiseClientURLs(a.AdvertiseClientURLs)
	m.inEffect = a
}

// withdraw is a's Stop while the process goes on. After a reload, the old
// instance stops once the new one has started, whose settings are in
// effect: nothing to do. When a's are in effect, Caddy is rolling back the
// reload that started a (an app after it failed to start) and keeps the
// config it ran before: the node gets that config's settings back, which
// a's Start had replaced (published client URLs among them). A member a
// failure had stopped keeps running, with a's timings, until it restarts.
func (m *member) withdraw(a *App) {
	m.startMu.Lock()
	defer m.startMu.Unlock()
	if m.inEffect != a {
		return
	}
	for _, b := range slices.Backward(m.apps) {
		if b != a && b.started {
			m.applyLocked(b)
			return
		}
	}
}

// current is the member's node (nil when m is: a handler whose app has
// none).
func (m *member) current() *raftkv.Node {
	if m == nil {
		return nil
	}
	return m.node.Load()
}

// running returns the member's node when it runs, nil otherwise (or when m
// is nil: a handler whose app has none).
func (m *member) running() *raftkv.Node {
	if m == nil {
		return nil
	}
	if n := m.current(); n.Running() {
		return n
	}
	return nil
}

// start loads the peer TLS files into the node's client TLS config, the
// first time only, then starts the node (which does nothing when it runs
// already: a reload).
//
// A node whose Raft loop a panic or a storage failure stopped is done for;
// etcd's process would have exited, and its supervisor started a new one.
// Caddy lives on, so the operator's reload (`caddy reload --force` when the
// config is unchanged: Caddy skips loading the config it runs) or restart
// is that new start: the dead node is stopped, which closes its file, and a
// new one starts on the same data directory, from what the file holds,
// with the settings of cfg and files, the config being started (the cause
// may have been one of them: a heartbeat too short for the machine, say).
// Handlers of every config look the node up per request, so they all move
// to the new one. If the failure is still there, the start fails, and so
// does the reload. A node whose start failed is stopped, and the next
// start makes a new one the same way.
func (m *member) start(cfg raftkv.Config, files peerTLSFiles) error {
	m.startMu.Lock()
	defer m.startMu.Unlock()
	n := m.current()
	// A member that waits for its discovery service has not started: a
	// config that changes how it starts (another token, its peer URLs,
	// timings) starts it again with those.
	rediscover := n.Discovering() && m.startChanges(cfg, files)
	if failed := n.Failed(); failed || n.Stopped() || rediscover {
		switch {
		case failed:
			m.cfg.Logger.Warn("the member was stopped by a failure; starting it again", zap.String("data_dir", m.cfg.DataDir))
		case rediscover:
			m.cfg.Logger.Info("the member's settings changed while it waited for its discovery service; discovering again with them", zap.String("data_dir", m.cfg.DataDir))
		}
		if err := n.Stop(); err != nil {
			m.cfg.Logger.Warn("closing the stopped member's storage", zap.Error(err))
		}
		m.cfg, m.peerFiles, m.peerLoaded = m.nodeConfig(cfg, files), files, false
		n = raftkv.NewNode(m.cfg)
		m.node.Store(n)
	}
	err := m.loadPeerFiles()
	if err == nil {
		err = n.Start()
	}
	if err != nil {
		// Requests waiting for the member to be ready (HTTP may have
		// started first) get its 503 now, not when their clients give
		// up; the next start makes a new node.
		_ = n.Stop() // it never ran: nothing to close
	}
	return err
}

// startChanges reports whether cfg and files start the member otherwise
// than the settings it was started with.
func (m *member) startChanges(cfg raftkv.Config, files peerTLSFiles) bool {
	return len(m.tuningChanges(cfg)) > 0 || len(m.bootstrapChanges(cfg)) > 0 || m.peerFiles != files
}

// loadPeerFiles loads the peer TLS files into the member's client TLS
// config, the first time only.
func (m *member) loadPeerFiles() error {
	if !m.peerLoaded && m.cfg.Peer.TLS != nil {
		if err := m.peerFiles.load(m.cfg.Peer.TLS); err != nil {
			return err
		}
	}
	m.peerLoaded = true
	return nil
}

// Destruct stops the node when the last config using it is gone.
func (m *member) Destruct() error { return m.current().Stop() }

// sameIdentity fails when cfg would turn the running member into another
// one: its name and cluster token make its member ID.
func (m *member) sameIdentity(cfg raftkv.Config) error {
	if m.cfg.Name != cfg.Name {
		return fmt.Errorf("data_dir %s belongs to running member %q, not %q: "+
			"a member cannot be renamed by a reload (stop Caddy first, or use another data_dir)",
			cfg.DataDir, m.cfg.Name, cfg.Name)
	}
	if m.cfg.InitialClusterToken != cfg.InitialClusterToken {
		return fmt.Errorf("data_dir %s belongs to running member %q of cluster token %q, not %q: "+
			"the cluster token cannot change by a reload (stop Caddy first, or use another data_dir)",
			cfg.DataDir, cfg.Name, m.cfg.InitialClusterToken, cfg.InitialClusterToken)
	}
	return nil
}

// tuningChanges names the settings that differ from the running member's
// and that only a restart applies. (advertise_client_urls is not one: Start
// publishes the current config's.)
func (m *member) tuningChanges(cfg raftkv.Config) []string {
	var changed []string
	if m.cfg.SnapshotCount != cfg.SnapshotCount {
		changed = append(changed, "snapshot_count")
	}
	if m.cfg.SnapshotCatchUpEntries != cfg.SnapshotCatchUpEntries {
		changed = append(changed, "snapshot_catchup_entries")
	}
	if m.cfg.HeartbeatInterval != cfg.HeartbeatInterval {
		changed = append(changed, "heartbeat_interval")
	}
	if m.cfg.ElectionTimeout != cfg.ElectionTimeout {
		changed = append(changed, "election_timeout")
	}
	if m.cfg.ForceNewCluster != cfg.ForceNewCluster {
		changed = append(changed, "force_new_cluster")
	}
	n := m.current()
	if n != nil && n.Proxy() != nil && (m.cfg.Proxy == "readonly") != (cfg.Proxy == "readonly") {
		// A proxy reads at every start whether it is read-only (proxy
		// readonly, or on or off: read-write), as etcd's does.
		changed = append(changed, "proxy")
	}
	if n != nil && (n.Proxy() != nil || n.Discovering()) {
		// A proxy's timings (or a proxy's to be); a member that runs Raft
		// has no use for them.
		if m.cfg.ProxyRefreshInterval != cfg.ProxyRefreshInterval {
			changed = append(changed, "proxy_refresh_interval")
		}
		if m.cfg.ProxyFailureWait != cfg.ProxyFailureWait {
			changed = append(changed, "proxy_failure_wait")
		}
		if m.cfg.ProxyDialTimeout != cfg.ProxyDialTimeout {
			changed = append(changed, "proxy_dial_timeout")
		}
		// Compared as they take effect: zero is the default, any negative
		// duration none.
		oldRead, oldWrite := m.cfg.ProxyTimeoutsInEffect()
		newRead, newWrite := cfg.ProxyTimeoutsInEffect()
		if oldRead != newRead {
			changed = append(changed, "proxy_read_timeout")
		}
		if oldWrite != newWrite {
			changed = append(changed, "proxy_write_timeout")
		}
	}
	return changed
}

// bootstrapChanges lists the settings cfg changes that a member reads only
// when it first starts on an empty data directory, as etcd reads its
// --initial-cluster flags: after that its member list lives in its data.
func (m *member) bootstrapChanges(cfg raftkv.Config) []string {
	var changed []string
	if !sameCluster(m.cfg.InitialCluster, cfg.InitialCluster) {
		changed = append(changed, "initial_cluster")
	}
	if m.cfg.InitialClusterState != cfg.InitialClusterState {
		changed = append(changed, "initial_cluster_state")
	}
	if m.cfg.Discovery != cfg.Discovery {
		changed = append(changed, "discovery")
	}
	if m.cfg.DiscoveryProxy != cfg.DiscoveryProxy {
		changed = append(changed, "discovery_proxy")
	}
	if n := m.current(); m.cfg.Proxy != cfg.Proxy && (n == nil || n.Proxy() == nil) {
		// A proxy's is a tuning change (tuningChanges).
		changed = append(changed, "proxy")
	}
	if m.cfg.DiscoveryFallback != cfg.DiscoveryFallback {
		changed = append(changed, "discovery_fallback")
	}
	if m.cfg.DiscoverySRV != cfg.DiscoverySRV {
		changed = append(changed, "discovery_srv")
	}
	if m.cfg.DiscoverySRVName != cfg.DiscoverySRVName {
		changed = append(changed, "discovery_srv_name")
	}
	return changed
}

func sameCluster(a, b map[string][]string) bool {
	if len(a) != len(b) {
		return false
	}
	for name, ua := range a {
		ub, ok := b[name]
		if !ok {
			return false
		}
		ua, ub = slices.Clone(ua), slices.Clone(ub)
		sort.Strings(ua)
		sort.Strings(ub)
		if !slices.Equal(ua, ub) {
			return false
		}
	}
	return true
}

// Interface guards.
var (
	_ caddy.App          = (*App)(nil)
	_ caddy.Provisioner  = (*App)(nil)
	_ caddy.Validator    = (*App)(nil)
	_ caddy.CleanerUpper = (*App)(nil)
	_ caddy.Destructor   = (*member)(nil)
)
