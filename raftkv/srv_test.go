package raftkv

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/etcaddy/etcaddy/raftkv/dnstest"
	"github.com/etcaddy/etcaddy/storage"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
)

const srvDomain = "etcaddy.test"

// rec is an SRV record for host.<srvDomain>:port.
func rec(host string, port uint16) dnstest.SRV {
	return dnstest.SRV{Target: host + "." + srvDomain, Port: port}
}

// srvConfig is member name's configuration for DNS SRV discovery of
// srvDomain through dns, with its peer URLs mine.
func srvConfig(t *testing.T, dns *dnstest.Server, name string, mine ...string) Config {
	return Config{
		Name:           name,
		DataDir:        t.TempDir(),
		InitialCluster: map[string][]string{name: mine},
		DiscoverySRV:   srvDomain,
		Logger:         zaptest.NewLogger(t, zaptest.Level(zap.InfoLevel)),
		resolver:       dns.Resolver(),
	}
}

// TestSRVRecordsMakeTheCluster: the records of both services, each a
// member with one peer URL, are the initial cluster; this member is the
// record that resolves to its own peer URL's address and port, the others
// are named "0", "1", … (etcd's names until they publish theirs).
func TestSRVRecordsMakeTheCluster(t *testing.T) {
	dns := dnstest.Start(t, "127.0.0.1:0")
	for _, h := range []string{"a", "b", "c", "d"} {
		dns.SetA(h+"."+srvDomain, "127.0.0.1")
	}
	dns.SetA("elsewhere."+srvDomain, "127.0.0.2")
	ssl, plain := "_etcd-server-ssl._tcp."+srvDomain, "_etcd-server._tcp."+srvDomain
	reset := func() {
		for _, n := range []string{ssl, plain, "_etcd-server-ssl-blue._tcp." + srvDomain, "_etcd-server-blue._tcp." + srvDomain} {
			dns.SetSRV(n)
		}
	}
	type srvCase struct {
		name    string
		records map[string][]dnstest.SRV
		srvName string
		mine    []string
		want    map[string][]string
		wantErr string
	}
	tests := []srvCase{
		{name: "https records",
			records: map[string][]dnstest.SRV{ssl: {rec("a", 2380), rec("b", 2381), rec("c", 2382)}},
			mine:    []string{"https://b.etcaddy.test:2381"},
			want:    map[string][]string{"n": {"https://b.etcaddy.test:2381"}, "0": {"https://a.etcaddy.test:2380"}, "1": {"https://c.etcaddy.test:2382"}}},
		{name: "own URL by address: the record's URL is the member's",
			records: map[string][]dnstest.SRV{ssl: {rec("a", 2380), rec("b", 2381)}},
			mine:    []string{"https://127.0.0.1:2380"},
			want:    map[string][]string{"n": {"https://a.etcaddy.test:2380"}, "0": {"https://b.etcaddy.test:2381"}}},
		{name: "http records (etcd 3.4 reads only https ones)",
			records: map[string][]dnstest.SRV{plain: {rec("a", 2380), rec("b", 2381)}},
			mine:    []string{"http://a.etcaddy.test:2380"},
			want:    map[string][]string{"n": {"http://a.etcaddy.test:2380"}, "0": {"http://b.etcaddy.test:2381"}}},
		{name: "both services, one numbering",
			records: map[string][]dnstest.SRV{ssl: {rec("a", 2380), rec("b", 2381)}, plain: {rec("c", 2382)}},
			mine:    []string{"https://a.etcaddy.test:2380"},
			want:    map[string][]string{"n": {"https://a.etcaddy.test:2380"}, "0": {"https://b.etcaddy.test:2381"}, "1": {"http://c.etcaddy.test:2382"}}},
		{name: "a service name",
			records: map[string][]dnstest.SRV{ssl: {rec("d", 2399)}, "_etcd-server-ssl-blue._tcp." + srvDomain: {rec("a", 2380)}},
			srvName: "blue",
			mine:    []string{"https://a.etcaddy.test:2380"},
			want:    map[string][]string{"n": {"https://a.etcaddy.test:2380"}}},
		{name: "a target that does not resolve is left out",
			records: map[string][]dnstest.SRV{ssl: {rec("a", 2380), rec("gone", 2381)}},
			mine:    []string{"https://a.etcaddy.test:2380"},
			want:    map[string][]string{"n": {"https://a.etcaddy.test:2380"}}},
		{name: "same port, another address: not this member",
			records: map[string][]dnstest.SRV{ssl: {rec("elsewhere", 2380), rec("a", 2380)}},
			mine:    []string{"https://a.etcaddy.test:2380"},
			want:    map[string][]string{"n": {"https://a.etcaddy.test:2380"}, "0": {"https://elsewhere.etcaddy.test:2380"}}},
		{name: "this member not in the records",
			records: map[string][]dnstest.SRV{ssl: {rec("a", 2380)}},
			mine:    []string{"https://b.etcaddy.test:2381"},
			wantErr: `cannot find local etcd member "n" in SRV records`},
		{name: "this member's record has the other scheme",
			records: map[string][]dnstest.SRV{ssl: {rec("a", 2380), rec("b", 2381)}},
			mine:    []string{"http://a.etcaddy.test:2380"},
			wantErr: "has scheme mismatch with expected peer"},
		{name: "no records",
			mine:    []string{"https://a.etcaddy.test:2380"},
			wantErr: "error querying DNS SRV records for _etcd-server-ssl"},
		{name: "records of the unnamed services only",
			records: map[string][]dnstest.SRV{ssl: {rec("a", 2380)}},
			srvName: "blue",
			mine:    []string{"https://a.etcaddy.test:2380"},
			wantErr: "error querying DNS SRV records for _etcd-server-ssl-blue"},
	}
	tests = append(tests, srvCase{name: "a proxy (proxy on) needs no record of its own",
		records: map[string][]dnstest.SRV{ssl: {rec("a", 2380)}},
		mine:    []string{"https://b.etcaddy.test:2381"},
		want:    map[string][]string{"0": {"https://a.etcaddy.test:2380"}}})
	for _, tt := range tests {
		reset()
		for n, recs := range tt.records {
			dns.SetSRV(n, recs...)
		}
		cfg := srvConfig(t, dns, "n", tt.mine...)
		cfg.DiscoverySRVName = tt.srvName
		if strings.HasPrefix(tt.name, "a proxy") {
			cfg.Proxy = "on"
		}
		got, _, err := srvLookupCluster(context.Background(), cfg.resolver, cfg)
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("%s: error %v, want one saying %q", tt.name, err, tt.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", tt.name, err)
			continue
		}
		if !equalClusters(got, tt.want) {
			t.Errorf("%s: cluster %v, want %v", tt.name, got, tt.want)
		}
	}
}

// TestSRVDiscoveryBootstrapsACluster: three members that know only the
// domain and their own peer URLs (localhost, on ports of their own) read the same records and form one
// cluster, with the member IDs an initial cluster of those URLs gives; a
// member's own name replaces its number once it publishes it.
func TestSRVDiscoveryBootstrapsACluster(t *testing.T) {
	dns := dnstest.Start(t, "127.0.0.1:0")
	c := &testCluster{t: t}
	var recs []dnstest.SRV
	urls := make(map[string]string)
	for i := range 3 {
		m := newTestMember(t, fmt.Sprintf("m%d", i))
		c.members = append(c.members, m)
		u, err := url.Parse(m.url)
		if err != nil {
			t.Fatal(err)
		}
		// The peers dial each other through the system's resolver, which
		// knows localhost only.
		host := "localhost"
		var port uint16
		fmt.Sscan(u.Port(), &port)
		recs = append(recs, dnstest.SRV{Target: host, Port: port})
		urls[m.name] = "http://" + host + ":" + u.Port()
	}
	dns.SetSRV("_etcd-server._tcp."+srvDomain, recs...)
	c.edit = func(cfg *Config) {
		cfg.InitialCluster = map[string][]string{cfg.Name: {urls[cfg.Name]}}
		cfg.DiscoverySRV = srvDomain
		cfg.resolver = dns.Resolver()
	}
	for _, m := range c.members {
		c.start(m, "new")
	}
	c.waitLeader(c.members...)
	want := make(map[uint64]string)
	for name, u := range urls {
		want[memberID([]string{u}, "etcd-cluster")] = name
	}
	for _, m := range c.members {
		n := m.n()
		if want[n.Status().ID] != m.name {
			t.Errorf("%s has ID %x, want the one of its URL %s", m.name, n.Status().ID, urls[m.name])
		}
		waitFor(t, "every member's name published to "+m.name, func() bool {
			ms := n.Members()
			if len(ms) != 3 {
				return false
			}
			for _, mm := range ms {
				if want[mm.ID] != mm.Name || len(mm.PeerURLs) != 1 || mm.PeerURLs[0] != urls[mm.Name] {
					return false
				}
			}
			return true
		})
	}
	if _, err := c.members[0].n().Do(context.Background(), storage.Request{Method: storage.MethodPut, Path: "/srv", Val: "ok"}); err != nil {
		t.Fatal(err)
	}
	for _, m := range c.members {
		waitLocal(t, m.n(), "/srv", "ok")
	}
}

// TestSRVDiscoveryRetriesAFailingServer: SERVFAIL answers (a DNS server
// that may recover) are asked again after a backoff; the member starts
// once the answers come.
func TestSRVDiscoveryRetriesAFailingServer(t *testing.T) {
	defer func(b func(int) time.Duration) { discoveryBackoff = b }(discoveryBackoff)
	discoveryBackoff = func(int) time.Duration { return 10 * time.Millisecond }
	dns := dnstest.Start(t, "127.0.0.1:0")
	dns.SetA("a."+srvDomain, "127.0.0.1")
	ssl := "_etcd-server-ssl._tcp." + srvDomain
	dns.SetSRV(ssl, dnstest.SRV{Target: "a." + srvDomain, Port: 2380})
	dns.FailNext(ssl, 3)
	cfg := srvConfig(t, dns, "n1", "https://a.etcaddy.test:2380")
	n := NewNode(cfg)
	if err := n.Start(); err != nil {
		t.Fatal(err)
	}
	defer n.Stop()
	waitFor(t, "the member running", n.Ready)
	if q := dns.Queries(ssl); q < 4 {
		t.Errorf("%d queries for %s, want the 3 failed ones and one more", q, ssl)
	}
	if got, want := n.Status().ID, memberID([]string{"https://a.etcaddy.test:2380"}, "etcd-cluster"); got != want {
		t.Errorf("ID %x, want %x", got, want)
	}
}

// TestSRVDiscoveryWaitsForItsRecords: records that leave the member out
// (not published yet, or wrong) are looked up again after a backoff, the
// member waiting meanwhile (etcd exits, and its supervisor starts it
// again); once they are right it starts. A restart on data never looks the
// records up.
func TestSRVDiscoveryWaitsForItsRecords(t *testing.T) {
	defer func(b func(int) time.Duration) { discoveryBackoff = b }(discoveryBackoff)
	discoveryBackoff = func(int) time.Duration { return 20 * time.Millisecond }
	dns := dnstest.Start(t, "127.0.0.1:0")
	ssl := "_etcd-server-ssl._tcp." + srvDomain
	dns.SetA("a."+srvDomain, "127.0.0.1")
	dns.SetSRV(ssl, rec("a", 2380))
	cfg := srvConfig(t, dns, "n1", "https://a.etcaddy.test:2399")
	n := NewNode(cfg)
	if err := n.Start(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "several lookups", func() bool { return dns.Queries(ssl) >= 3 })
	if n.Failed() || !n.Discovering() || n.Running() {
		t.Fatalf("waiting for its records: failed %v, discovering %v, running %v", n.Failed(), n.Discovering(), n.Running())
	}
	dns.SetSRV(ssl, rec("a", 2399))
	waitFor(t, "the member running once its record is there", n.Ready)
	if err := n.Stop(); err != nil {
		t.Fatal(err)
	}

	before := dns.Queries(ssl)
	r := NewNode(cfg)
	if err := r.Start(); err != nil {
		t.Fatal(err)
	}
	defer r.Stop()
	if !r.Running() || r.Discovering() {
		t.Fatal("a restarted member with a DNS SRV domain does not run at once")
	}
	if q := dns.Queries(ssl); q != before {
		t.Errorf("a restart looked the records up (%d queries, %d before)", q, before)
	}
}

// TestSRVJoinsAMemberAddedByAddress: a member added to a running cluster
// by one spelling of its peer URL (an address) joins with the records'
// spelling (a name for that address), as etcd compares them resolved.
func TestSRVJoinsAMemberAddedByAddress(t *testing.T) {
	c := newTestCluster(t, 3, nil)
	leader := c.waitLeader(c.members...)
	dns := dnstest.Start(t, "127.0.0.1:0")
	joiner := newTestMember(t, "m3")
	ju, err := url.Parse(joiner.url)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	added, err := leader.n().AddMember(ctx, []string{joiner.url}) // http://127.0.0.1:<port>
	if err != nil {
		t.Fatal(err)
	}
	var recs []dnstest.SRV
	for _, m := range append(slices.Clone(c.members), joiner) {
		u, err := url.Parse(m.url)
		if err != nil {
			t.Fatal(err)
		}
		var port uint16
		fmt.Sscan(u.Port(), &port)
		recs = append(recs, dnstest.SRV{Target: "localhost", Port: port})
	}
	dns.SetSRV("_etcd-server._tcp."+srvDomain, recs...)
	prev := c.edit
	c.edit = func(cfg *Config) {
		if prev != nil {
			prev(cfg)
		}
		cfg.InitialCluster = map[string][]string{cfg.Name: {"http://localhost:" + ju.Port()}}
		cfg.DiscoverySRV = srvDomain
		cfg.resolver = dns.Resolver()
	}
	c.members = append(c.members, joiner)
	n := c.start(joiner, "existing")
	waitFor(t, "the joiner running", n.Ready)
	if n.Status().ID != added.ID {
		t.Fatalf("joined as %s, want the added %s", idString(n.Status().ID), idString(added.ID))
	}
}

// TestSRVConfigChecks: the options are checked as etcd checks its flags.
func TestSRVConfigChecks(t *testing.T) {
	base := func() Config {
		return Config{Name: "n1", DataDir: t.TempDir(), InitialCluster: map[string][]string{"n1": {"https://a.example.com:2380"}}, DiscoverySRV: "example.com"}
	}
	for _, tt := range []struct {
		name string
		edit func(*Config)
		want string
	}{
		{"with a discovery URL", func(c *Config) { c.Discovery = "http://127.0.0.1:2379/v2/keys/d/x" }, "multiple discovery options"},
		{"a URL for a domain", func(c *Config) { c.DiscoverySRV = "https://example.com" }, "not a DNS name"},
		{"a domain with a port", func(c *Config) { c.DiscoverySRV = "example.com:53" }, "not a DNS name"},
		{"other members given", func(c *Config) { c.InitialCluster["n2"] = []string{"https://b:2380"} }, "holds only this member"},
		{"a bad service name", func(c *Config) { c.DiscoverySRVName = "a.b" }, "letters, digits or dashes"},
		{"a service name alone", func(c *Config) { c.DiscoverySRV, c.DiscoverySRVName = "", "blue" }, "goes with a DNS SRV domain"},
	} {
		cfg := base()
		tt.edit(&cfg)
		if _, err := cfg.withDefaults(); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: %v, want an error saying %q", tt.name, err, tt.want)
		}
	}
	if _, err := base().withDefaults(); err != nil {
		t.Errorf("a valid config: %v", err)
	}
	if err := CheckSRVDomain("example.com."); err != nil {
		t.Errorf("a domain with its root dot: %v", err)
	}
}

// TestSRVPeerTLSChecksTheDomain: https peers learned from DNS, dialed with
// the system's roots, have their certificates checked against the domain
// (etcd's ServerName), while the server name sent stays each peer's host
// (Caddy refuses a mismatch with 421); with a cluster CA of its own, or
// http peers, the member's TLS is left as it is.
func TestSRVPeerTLSChecksTheDomain(t *testing.T) {
	https := map[string][]string{"n1": {"https://a.example.com:2380"}, "0": {"https://b.example.com:2380"}}
	plain := map[string][]string{"n1": {"http://a.example.com:2380"}}
	cert := tls.Certificate{Certificate: [][]byte{{1}}}
	for _, in := range []*tls.Config{nil, {Certificates: []tls.Certificate{cert}}} {
		c := srvPeerTLS(in, "example.com.", https)
		if c == nil || c.ServerName != "" || !c.InsecureSkipVerify || c.VerifyConnection == nil {
			t.Fatalf("system roots, https peers: %+v, want the domain checked by VerifyConnection, no ServerName", c)
		}
		if in != nil && (len(c.Certificates) != 1 || in.VerifyConnection != nil) {
			t.Error("the client certificate lost, or the original config changed")
		}
		if err := c.VerifyConnection(tls.ConnectionState{}); err == nil {
			t.Error("no certificate accepted")
		}
	}
	// httptest's certificate names example.com, but no system root
	// trusts it: refused, the error naming the domain it was checked for.
	srv := httptest.NewTLSServer(http.NotFoundHandler())
	defer srv.Close()
	c := srvPeerTLS(nil, "example.com", https)
	err := c.VerifyConnection(tls.ConnectionState{PeerCertificates: []*x509.Certificate{srv.Certificate()}})
	if err == nil || !strings.Contains(err.Error(), "DNS SRV domain example.com") {
		t.Errorf("an untrusted certificate: %v", err)
	}
	ca := &tls.Config{RootCAs: x509.NewCertPool()}
	if c := srvPeerTLS(ca, "example.com", https); c != ca || c.VerifyConnection != nil {
		t.Error("a cluster CA: the TLS config changed")
	}
	own := &tls.Config{Certificates: []tls.Certificate{cert}}
	if c := srvPeerTLS(own, "example.com", plain); c != own {
		t.Error("http peers: the TLS config changed")
	}
}
