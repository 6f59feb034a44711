package raftkv

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/url"
	"slices"
	"strconv"
	"strings"

	"go.uber.org/zap"
)

// CheckSRVDomain checks a DNS SRV discovery domain (etcd's
// --discovery-srv): a DNS name, without a scheme, port or path.
func CheckSRVDomain(domain string) error {
	d := strings.TrimSuffix(domain, ".")
	if d == "" {
		return errors.New("the DNS SRV discovery domain is empty")
	}
	if len(d) > 253 {
		return fmt.Errorf("DNS SRV discovery domain %q: longer than a DNS name can be", domain)
	}
	for label := range strings.SplitSeq(d, ".") {
		if label == "" || len(label) > 63 {
			return fmt.Errorf("DNS SRV discovery domain %q is not a DNS name (give the domain alone, as example.com)", domain)
		}
		for _, c := range label {
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return fmt.Errorf("DNS SRV discovery domain %q is not a DNS name (give the domain alone, as example.com)", domain)
			}
		}
	}
	return nil
}

// CheckSRVName checks a DNS SRV service name suffix (etcd's
// --discovery-srv-name): it goes after "etcd-server-" in the service's
// name, so it is one DNS label's worth of letters, digits and dashes.
func CheckSRVName(name string) error {
	// "_etcd-server-ssl-" and the name make one DNS label: 63 bytes.
	if name == "" || len(name) > 46 {
		return fmt.Errorf("DNS SRV service name %q: want 1 to 46 letters, digits or dashes", name)
	}
	for _, c := range name {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-') {
			return fmt.Errorf("DNS SRV service name %q: want letters, digits or dashes", name)
		}
	}
	return nil
}

// srvServices are the SRV services a member looks up, with the scheme
// each gives its peer URLs: _etcd-server-ssl._tcp.<domain> for https
// peers, _etcd-server._tcp.<domain> for http ones, each with
// "-<DiscoverySRVName>" after it when that is set.
func (c Config) srvServices() [2][2]string {
	suffix := ""
	if c.DiscoverySRVName != "" {
		suffix = "-" + c.DiscoverySRVName
	}
	return [2][2]string{{"etcd-server-ssl" + suffix, "https"}, {"etcd-server" + suffix, "http"}}
}

// srvResolver is what DNS SRV discovery asks of DNS; a *net.Resolver.
type srvResolver interface {
	LookupSRV(ctx context.Context, service, proto, name string) (string, []*net.SRV, error)
	LookupIPAddr(ctx context.Context, host string) ([]net.IPAddr, error)
}

// srvCluster learns a new cluster's members from DNS SRV records, as
// etcd's --discovery-srv: every record of both services is a member with
// one peer URL, scheme://target:port. The record whose target and port
// resolve to an address of this member's own peer URLs is this member
// (under its name); the others get the names "0", "1", … until they
// publish their own, as with etcd. The member IDs, and so the cluster,
// come from the URLs and the cluster token, so every member that reads
// the same records bootstraps the same cluster.
//
// Records that are not there (yet: DNS takes a while to spread), that
// leave this member out, or a DNS server that fails, are looked up again
// after a backoff (2, 4, … up to 256 s) until ctx ends, with a warning
// each time: etcd exits then, and its supervisor starts it again; Caddy's
// process goes on, so the member waits here instead. etcd 3.4 reads only
// the https service (its http records are ignored, and a missing https
// one fails the start); both count here, as etcd's documentation
// describes them.
func (n *Node) srvCluster(ctx context.Context) (map[string][]string, error) {
	r := n.resolver()
	for retry := 1; ; retry++ {
		cluster, both, err := srvLookupCluster(ctx, r, n.cfg)
		if err == nil {
			if both {
				n.lg.Warn("DNS SRV discovery: both the https and the http service have records; etcd 3.4 reads only the https ones, so etcd members would bootstrap another cluster from them",
					zap.String("discovery-srv", n.cfg.DiscoverySRV))
			}
			for name, urls := range cluster {
				for _, u := range urls {
					n.lg.Info("got bootstrap from DNS for etcd-server", zap.String("node", name+"="+u))
				}
			}
			return cluster, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		wait := discoveryBackoff(retry)
		n.lg.Warn("DNS SRV discovery: no cluster from the records yet; looking them up again",
			zap.String("discovery-srv", n.cfg.DiscoverySRV), zap.Duration("backoff", wait), zap.Error(err))
		if err := sleepCtx(ctx, wait); err != nil {
			return nil, err
		}
	}
}

// resolver is the member's DNS resolver: the system's, or a test's.
func (n *Node) resolver() srvResolver {
	if n.cfg.resolver != nil {
		return n.cfg.resolver
	}
	return net.DefaultResolver
}

// srvLookupCluster is one try of srvCluster; both reports that both
// services had records.
func srvLookupCluster(ctx context.Context, r srvResolver, cfg Config) (cluster map[string][]string, both bool, err error) {
	mine := make(map[string]string) // ip:port of this member's peer URLs -> scheme
	for _, raw := range cfg.InitialCluster[cfg.Name] {
		u, err := url.Parse(raw)
		if err != nil {
			return nil, false, fmt.Errorf("raftkv: the member's peer URL %q: %w", raw, err)
		}
		addrs, err := resolveHostPort(ctx, r, u.Host)
		if err != nil {
			return nil, false, err
		}
		for _, a := range addrs {
			mine[a] = u.Scheme
		}
	}

	cluster = make(map[string][]string)
	temp, services := 0, 0
	var failures []string
	for _, svc := range cfg.srvServices() {
		service, scheme := svc[0], svc[1]
		_, records, err := r.LookupSRV(ctx, service, "tcp", cfg.DiscoverySRV)
		if err != nil {
			if dnsMayPass(err) {
				return nil, false, err // a cluster read from half the records would be another cluster
			}
			failures = append(failures, fmt.Sprintf("error querying DNS SRV records for _%s %v", service, err))
			continue
		}
		if len(records) > 0 {
			services++
		}
		for _, rec := range records {
			target := strings.TrimSuffix(rec.Target, ".")
			hostPort := net.JoinHostPort(target, strconv.Itoa(int(rec.Port)))
			addrs, err := resolveHostPort(ctx, r, hostPort)
			if err != nil {
				if dnsMayPass(err) {
					return nil, false, err
				}
				failures = append(failures, fmt.Sprintf("_%s: %v", service, err))
				continue
			}
			peerURL := scheme + "://" + hostPort
			name := ""
			for _, a := range addrs {
				if s, ok := mine[a]; ok {
					if s != scheme {
						failures = append(failures, fmt.Sprintf("bootstrap at %s from DNS for %s has scheme mismatch with expected peer %s://%s", peerURL, service, s, a))
						name = "-"
						break
					}
					name = cfg.Name
				}
			}
			switch name {
			case "-":
				continue
			case "":
				name = strconv.Itoa(temp)
				temp++
			}
			if !slices.Contains(cluster[name], peerURL) {
				cluster[name] = append(cluster[name], peerURL)
			}
		}
	}
	if len(cluster) == 0 {
		return nil, false, fmt.Errorf("DNS SRV discovery of %s: %s", cfg.DiscoverySRV, strings.Join(failures, "; "))
	}
	if _, ok := cluster[cfg.Name]; !ok && !cfg.proxying() {
		msg := fmt.Sprintf("cannot find local etcd member %q in SRV records", cfg.Name)
		if len(failures) > 0 {
			msg += " (" + strings.Join(failures, "; ") + ")"
		}
		return nil, false, errors.New(msg)
	}
	if err := checkDuplicateURLs(cluster); err != nil {
		return nil, false, err
	}
	return cluster, services == 2, nil
}

// dnsMayPass reports whether a DNS lookup failed in a way that may pass
// (a timeout, a server that failed) rather than with an answer.
func dnsMayPass(err error) bool {
	var dnsErr *net.DNSError
	return errors.As(err, &dnsErr) && (dnsErr.IsTemporary || dnsErr.IsTimeout)
}

// resolveHostPort resolves host:port to the ip:port strings of every
// address of host.
func resolveHostPort(ctx context.Context, r srvResolver, hostPort string) ([]string, error) {
	host, port, err := net.SplitHostPort(hostPort)
	if err != nil {
		return nil, err
	}
	if ip := net.ParseIP(host); ip != nil {
		return []string{net.JoinHostPort(ip.String(), port)}, nil
	}
	ips, err := r.LookupIPAddr(ctx, host)
	if err != nil {
		return nil, err
	}
	out := make([]string, 0, len(ips))
	for _, ip := range ips {
		out = append(out, net.JoinHostPort(ip.IP.String(), port))
	}
	return out, nil
}

// srvPeerTLS is the peer TLS a member that learned https peers from DNS
// SRV records dials them with: without a trusted CA of its own (the
// system's roots) it checks their certificates against the SRV domain
// rather than each peer's host, as etcd sets its peer TLS ServerName to
// --discovery-srv then: DNS told where the peers are, so a record an
// attacker could forge must not also choose the name the certificate is
// checked for. Unlike etcd's, the TLS server name sent (SNI) stays the
// peer's host: a Caddy peer site with client_auth refuses a request whose
// SNI differs from its Host (421). As with etcd, only the start that read
// the records does so; later starts check each peer's host.
func srvPeerTLS(peer *tls.Config, domain string, cluster map[string][]string) *tls.Config {
	if peer != nil && peer.RootCAs != nil {
		return peer
	}
	https := false
	for _, urls := range cluster {
		for _, u := range urls {
			https = https || strings.HasPrefix(u, "https://")
		}
	}
	if !https {
		return peer
	}
	var c *tls.Config
	if peer != nil {
		c = peer.Clone()
	} else {
		c = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	domain = strings.TrimSuffix(domain, ".")
	// The usual check, with the domain for the host: Go skips its own
	// (which would use the host) and runs this one instead.
	c.InsecureSkipVerify = true
	c.VerifyConnection = func(cs tls.ConnectionState) error {
		if err := verifyServer(cs, domain, nil); err != nil {
			return fmt.Errorf("the peer's certificate, checked for the DNS SRV domain %s: %w", domain, err)
		}
		return nil
	}
	return c
}

// sameURLsResolved reports whether a and b name the same peer endpoints
// once their hosts are resolved, as etcd's netutil.URLStringsEqual
// compares a joining member's URLs with the cluster's: a member added as
// https://10.0.0.4:2380 is the one whose DNS SRV record says
// n4.example.com:2380 when that name resolves to 10.0.0.4.
func sameURLsResolved(ctx context.Context, r srvResolver, a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	ka, oka := resolvedURLKeys(ctx, r, a)
	kb, okb := resolvedURLKeys(ctx, r, b)
	return oka && okb && slices.Equal(ka, kb)
}

// resolvedURLKeys turns each URL into its scheme and the sorted
// addresses:ports its host resolves to, sorted.
func resolvedURLKeys(ctx context.Context, r srvResolver, urls []string) ([]string, bool) {
	keys := make([]string, 0, len(urls))
	for _, raw := range urls {
		u, err := url.Parse(raw)
		if err != nil {
			return nil, false
		}
		addrs, err := resolveHostPort(ctx, r, u.Host)
		if err != nil || len(addrs) == 0 {
			return nil, false
		}
		slices.Sort(addrs)
		keys = append(keys, u.Scheme+"://"+strings.Join(addrs, ","))
	}
	slices.Sort(keys)
	return keys, true
}
