package caddymodule

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/caddyfile" // the caddyfile adapter
	"github.com/caddyserver/caddy/v2/caddytest"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

var updateAdapt = flag.Bool("update-adapt", false, "rewrite the expected JSON of testdata/caddyfile_adapt/*.caddytest")

// TestCaddyfileAdapt adapts every testdata/caddyfile_adapt/*.caddytest
// file (a Caddyfile, a line of dashes, the expected JSON) and compares.
func TestCaddyfileAdapt(t *testing.T) {
	files, err := filepath.Glob("testdata/caddyfile_adapt/*.caddytest")
	if err != nil || len(files) == 0 {
		t.Fatalf("no adapt tests: %v", err)
	}
	for _, file := range files {
		t.Run(filepath.Base(file), func(t *testing.T) {
			data, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			caddyfileText, expected, _ := strings.Cut(string(data), "----------\n")
			if *updateAdapt {
				writeAdapted(t, file, caddyfileText)
				return
			}
			if !caddytest.CompareAdapt(t, file, caddyfileText, "caddyfile", expected) {
				t.Errorf("%s: adapted JSON differs (diff above)", file)
			}
		})
	}
}

// TestCaddyfileExampleAdapts keeps the repository's Caddyfile.example (the
// three-member HTTPS cluster) valid: it adapts without warnings into the
// member, its client site and its mutual-TLS peer site.
func TestCaddyfileExampleAdapts(t *testing.T) {
	src, err := os.ReadFile("../Caddyfile.example")
	if err != nil {
		t.Fatal(err)
	}
	out, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt(src, map[string]any{"filename": "Caddyfile.example"})
	if err != nil {
		t.Fatalf("Caddyfile.example: %v", err)
	}
	if len(warnings) > 0 {
		t.Errorf("Caddyfile.example: warnings %v", warnings)
	}
	for _, want := range []string{
		`"handler":"etcd"`, `"handler":"raftkv_peer"`, `"mode":"require_and_verify"`,
		`"peer_cert_file":"/etc/etcaddy/etcd1.pem"`, `"peer_trusted_ca_file":"/etc/etcaddy/ca.pem"`,
		`"initial_cluster_state":"new"`,
	} {
		if !bytes.Contains(out, []byte(want)) {
			t.Errorf("Caddyfile.example adapts without %s:\n%s", want, out)
		}
	}
}

func writeAdapted(t *testing.T, file, caddyfileText string) {
	out, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfileText), nil)
	if err != nil {
		t.Fatal(err)
	}
	var pretty bytes.Buffer
	if err := json.Indent(&pretty, out, "", "\t"); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(file, []byte(caddyfileText+"----------\n"+pretty.String()), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestCaddyfileAdaptErrors(t *testing.T) {
	tests := []struct {
		name, caddyfile, wantErr string
	}{
		{"unknown raftkv option", "{\n\traftkv {\n\t\tflavour vanilla\n\t}\n}\n:2379 {\n\tetcd\n}\n", `unrecognized raftkv option "flavour"`},
		{"raftkv takes no argument", "{\n\traftkv fast\n}\n", "wrong argument count"},
		{"missing data_dir", "{\n\traftkv {\n\t\tdata_dir\n\t}\n}\n", "wrong argument count"},
		{"two names", "{\n\traftkv {\n\t\tname a b\n\t}\n}\n", "wrong argument count"},
		{"missing initial_cluster", "{\n\traftkv {\n\t\tinitial_cluster\n\t}\n}\n", "wrong argument count"},
		{"initial_cluster without a name", "{\n\traftkv {\n\t\tinitial_cluster http://a:2380\n\t}\n}\n", "is not <name>=<peer_url>"},
		{"missing advertise_client_urls", "{\n\traftkv {\n\t\tadvertise_client_urls\n\t}\n}\n", "wrong argument count"},
		{"bad duration", "{\n\traftkv {\n\t\theartbeat_interval soon\n\t}\n}\n", "heartbeat_interval must be a positive duration"},
		{"zero election timeout", "{\n\traftkv {\n\t\telection_timeout 0s\n\t}\n}\n", "election_timeout must be a positive duration"},
		{"bad snapshot count", "{\n\traftkv {\n\t\tsnapshot_count many\n\t}\n}\n", "snapshot_count must be a positive number"},
		{"zero catch-up entries", "{\n\traftkv {\n\t\tsnapshot_catchup_entries 0\n\t}\n}\n", "snapshot_catchup_entries must be a positive number"},
		{"bad cluster state", "{\n\traftkv {\n\t\tinitial_cluster_state maybe\n\t}\n}\n", `initial_cluster_state must be "new" or "existing"`},
		{"bad strict reconfig check", "{\n\traftkv {\n\t\tstrict_reconfig_check sometimes\n\t}\n}\n", `strict_reconfig_check must be true or false, not "sometimes"`},
		{"bad force_new_cluster", "{\n\traftkv {\n\t\tforce_new_cluster yes please\n\t}\n}\n", `force_new_cluster must be true or false, not "yes"`},
		{"etcd takes no argument", ":2379 {\n\tetcd /v2/* extra\n}\n", "wrong argument count"},
		{"raftkv_peer takes no argument", ":2380 {\n\traftkv_peer /raft extra\n}\n", "wrong argument count"},
		{"raftkv_peer has no options", ":2380 {\n\traftkv_peer {\n\t\tinsecure\n\t}\n}\n", `unrecognized raftkv_peer option "insecure"`},
		{"missing peer_cert_file", "{\n\traftkv {\n\t\tpeer_cert_file\n\t}\n}\n", "wrong argument count"},
		{"two peer CA files", "{\n\traftkv {\n\t\tpeer_trusted_ca_file a.pem b.pem\n\t}\n}\n", "wrong argument count"},
		{"unknown etcd option", ":2379 {\n\tetcd {\n\t\tcompress on\n\t}\n}\n", `unrecognized etcd option "compress"`},
		{"cors without origins", ":2379 {\n\tetcd {\n\t\tcors\n\t}\n}\n", "wrong argument count"},
		{"cors origin with a path", ":2379 {\n\tetcd {\n\t\tcors https://app.example.com/\n\t}\n}\n", "has a path"},
		{"cors origin without a scheme", ":2379 {\n\tetcd {\n\t\tcors app.example.com\n\t}\n}\n", "is not an origin"},
		{"cors origin with an empty port", ":2379 {\n\tetcd {\n\t\tcors https://app.example.com:\n\t}\n}\n", "empty port"},
		{"cors origin with a query", ":2379 {\n\tetcd {\n\t\tcors https://app.example.com?\n\t}\n}\n", "has a path"},
		{"cors origin in capitals", ":2379 {\n\tetcd {\n\t\tcors https://App.example.com\n\t}\n}\n", "lowercase"},
		{"empty name", "{\n\traftkv {\n\t\tname \"\"\n\t}\n}\n", "name needs a value"},
		{"empty initial_cluster", "{\n\traftkv {\n\t\tinitial_cluster \"\" ,\n\t}\n}\n", "initial_cluster needs <name>=<peer_url> pairs"},
		{"empty advertise_client_urls", "{\n\traftkv {\n\t\tadvertise_client_urls \"\"\n\t}\n}\n", "advertise_client_urls needs URLs"},
		{"missing initial_advertise_peer_urls", "{\n\traftkv {\n\t\tinitial_advertise_peer_urls\n\t}\n}\n", "wrong argument count"},
		{"empty initial_advertise_peer_urls", "{\n\traftkv {\n\t\tinitial_advertise_peer_urls ,\n\t}\n}\n", "initial_advertise_peer_urls needs URLs"},
		{"missing discovery", "{\n\traftkv {\n\t\tdiscovery\n\t}\n}\n", "wrong argument count"},
		{"two discovery URLs", "{\n\traftkv {\n\t\tdiscovery http://a:2379/v2/keys/d/1 http://b:2379/v2/keys/d/1\n\t}\n}\n", "wrong argument count"},
		{"bad proxy_failure_wait", "{\n\traftkv {\n\t\tproxy_failure_wait soon\n\t}\n}\n", "proxy_failure_wait must be a positive duration"},
		{"bad proxy", "{\n\traftkv {\n\t\tproxy yes\n\t}\n}\n", `proxy must be "off", "on" or "readonly"`},
		{"proxy_read_timeout as etcd's milliseconds", "{\n\traftkv {\n\t\tproxy_read_timeout 700\n\t}\n}\n", `proxy_read_timeout must be a duration with its unit (700ms for etcd's 700 milliseconds), or off, not "700"`},
		{"negative proxy_write_timeout", "{\n\traftkv {\n\t\tproxy_write_timeout -1s\n\t}\n}\n", `proxy_write_timeout must be a duration of at least 1ms, or off, not "-1s"`},
		{"proxy_write_timeout in nanoseconds", "{\n\traftkv {\n\t\tproxy_write_timeout 10ns\n\t}\n}\n", "proxy_write_timeout must be a duration of at least 1ms"},
		{"proxy_read_timeout twice", "{\n\traftkv {\n\t\tproxy_read_timeout 1s 2s\n\t}\n}\n", "wrong argument count"},
		{"bad discovery_fallback", "{\n\traftkv {\n\t\tdiscovery_fallback stay\n\t}\n}\n", `discovery_fallback must be "proxy" or "exit"`},
		{"missing discovery_srv", "{\n\traftkv {\n\t\tdiscovery_srv\n\t}\n}\n", "wrong argument count"},
		{"two discovery_srv domains", "{\n\traftkv {\n\t\tdiscovery_srv a.example b.example\n\t}\n}\n", "wrong argument count"},
		{"heartbeat as etcd's milliseconds", "{\n\traftkv {\n\t\theartbeat_interval 100\n\t}\n}\n", `heartbeat_interval must be a positive duration with its unit (100ms for etcd's 100 milliseconds), not "100"`},
		{"snapshot_count past 2^53", "{\n\traftkv {\n\t\tsnapshot_count 18446744073709551615\n\t}\n}\n", "snapshot_count must be at most 9007199254740992"},
		{"name twice", "{\n\traftkv {\n\t\tname a\n\t\tname b\n\t}\n}\n", "raftkv option name is set twice"},
		{"data_dir in two raftkv blocks", "{\n\traftkv {\n\t\tdata_dir /a\n\t}\n\traftkv {\n\t\tdata_dir /b\n\t}\n}\n", "raftkv option data_dir is set twice"},
		{"heartbeat twice", "{\n\traftkv {\n\t\theartbeat_interval 100ms\n\t\theartbeat_interval 200ms\n\t}\n}\n", "raftkv option heartbeat_interval is set twice"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(tt.caddyfile), nil)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("error %v, want one containing %q", err, tt.wantErr)
			}
		})
	}
}

// TestAppValidateAsEtcdFlags: the app refuses what etcd refuses of its
// flags.
func TestAppValidateAsEtcdFlags(t *testing.T) {
	ms := func(n int64) caddy.Duration { return caddy.Duration(time.Duration(n) * time.Millisecond) }
	tests := []struct {
		name    string
		app     App
		wantErr string
	}{
		{"defaults", App{}, ""},
		{"etcd's own defaults", App{HeartbeatInterval: ms(100), ElectionTimeout: ms(1000)}, ""},
		{"election under 5 heartbeats", App{HeartbeatInterval: ms(100), ElectionTimeout: ms(400)}, "at least 5 times heartbeat_interval"},
		{"election too long", App{HeartbeatInterval: ms(100), ElectionTimeout: ms(60000)}, "too long"},
		{"negative heartbeat", App{HeartbeatInterval: ms(-1)}, "negative"},
		{"heartbeat in nanoseconds", App{HeartbeatInterval: 100, ElectionTimeout: 1000}, "under 1ms"},
		{"snapshot_count past 2^53", App{SnapshotCount: 1<<53 + 2}, "must be at most 9007199254740992"},
		{"snapshot_count at 2^53", App{SnapshotCount: 1 << 53}, ""},
		{"shortest heartbeat", App{HeartbeatInterval: ms(1), ElectionTimeout: ms(5)}, ""},
		{"bad cluster state", App{InitialClusterState: "old"}, "initial_cluster_state"},
		{"cluster without this member", App{Name: "n1", InitialCluster: map[string][]string{"n2": {"http://a:2380"}}}, `does not name this member "n1"`},
		{"peer URL without a port", App{Name: "n1", InitialCluster: map[string][]string{"n1": {"http://a"}}}, `does not have the form "host:port"`},
		{"peer URL with a path", App{Name: "n1", InitialCluster: map[string][]string{"n1": {"http://a:1/p"}}}, "must not contain a path"},
		{"bad client URL", App{AdvertiseClientURLs: []string{"ftp://a:1"}}, "URL scheme must be"},
		{"good cluster", App{Name: "n1", InitialCluster: map[string][]string{"n1": {"https://a:2380"}, "n2": {"https://b:2380"}}}, ""},
		{"peer cert without its key", App{PeerCertFile: "n1.pem"}, "peer_cert_file and peer_key_file go together"},
		{"peer key without its cert", App{PeerKeyFile: "n1-key.pem", PeerTrustedCAFile: "ca.pem"}, "peer_cert_file and peer_key_file go together"},
		{"peer CA alone", App{PeerTrustedCAFile: "ca.pem"}, ""},
		{"peer TLS complete", App{PeerCertFile: "n1.pem", PeerKeyFile: "n1-key.pem", PeerTrustedCAFile: "ca.pem"}, ""},
		{"advertised peer URLs alone", App{Name: "n1", InitialAdvertisePeerURLs: []string{"http://a:2380"}}, ""},
		{"advertised peer URLs as in the cluster", App{Name: "n1", InitialAdvertisePeerURLs: []string{"http://b:2380", "http://a:2380"}, InitialCluster: map[string][]string{"n1": {"http://a:2380", "http://b:2380"}}}, ""},
		{"advertised peer URLs not in the cluster", App{Name: "n1", InitialAdvertisePeerURLs: []string{"http://a:2380"}, InitialCluster: map[string][]string{"n1": {"http://b:2380"}}}, "differ from this member's initial_cluster entry n1=http://b:2380"},
		{"bad advertised peer URL", App{InitialAdvertisePeerURLs: []string{"http://a"}}, "initial_advertise_peer_urls"},
		{"advertised peer URL twice", App{InitialAdvertisePeerURLs: []string{"http://a:2380", "http://a:2380"}, Discovery: "http://d:2379/v2/keys/discovery/abc"}, "initial_advertise_peer_urls has a duplicate URL"},
		{"discovery", App{Name: "n1", Discovery: "http://d:2379/v2/keys/discovery/abc", InitialAdvertisePeerURLs: []string{"http://a:2380"}}, ""},
		{"discovery and initial_cluster", App{Name: "n1", Discovery: "http://d:2379/v2/keys/discovery/abc", InitialCluster: map[string][]string{"n1": {"http://a:2380"}}}, "multiple discovery or bootstrap options"},
		{"discovery joining", App{Discovery: "http://d:2379/v2/keys/discovery/abc", InitialClusterState: "existing"}, "discovery bootstraps a new cluster"},
		{"discovery without a path", App{Discovery: "http://d:2379"}, "has no path"},
		{"discovery by ftp", App{Discovery: "ftp://d:2379/x"}, "http or https"},
		{"discovery through a proxy", App{Discovery: "http://d:2379/v2/keys/discovery/abc", DiscoveryProxy: "proxy.internal:3128"}, ""},
		{"discovery proxy alone", App{DiscoveryProxy: "proxy.internal:3128"}, "discovery_proxy goes with discovery"},
		{"bad discovery proxy", App{Discovery: "http://d:2379/v2/keys/discovery/abc", DiscoveryProxy: "ftp://proxy:21"}, "invalid discovery proxy address"},
		{"discovery with a query", App{Discovery: "http://d:2379/v2/keys/x?recursive=true"}, "no query"},
		{"proxy of a cluster that does not name it", App{Name: "p1", Proxy: "on", InitialCluster: map[string][]string{"m1": {"http://a:2380"}}}, ""},
		{"proxy timings", App{Name: "p1", Proxy: "on", ProxyRefreshInterval: caddy.Duration(time.Minute), ProxyFailureWait: caddy.Duration(time.Second), ProxyDialTimeout: caddy.Duration(500 * time.Millisecond)}, ""},
		{"proxy timing in nanoseconds", App{Proxy: "on", ProxyFailureWait: 5000}, "proxy_failure_wait must be at least 1ms"},
		{"proxy read and write timeouts", App{Name: "p1", Proxy: "on", ProxyReadTimeout: caddy.Duration(time.Minute), ProxyWriteTimeout: caddy.Duration(time.Second)}, ""},
		{"proxy write timeout off", App{Name: "p1", Proxy: "on", ProxyReadTimeout: -1, ProxyWriteTimeout: -1}, ""},
		{"proxy read timeout in nanoseconds", App{Proxy: "on", ProxyReadTimeout: 5000}, "proxy_read_timeout must be at least 1ms (or negative: none)"},
		{"proxy unknown", App{Proxy: "maybe"}, `proxy must be "off", "on" or "readonly"`},
		{"member not in initial_cluster", App{Name: "p1", Proxy: "off", InitialCluster: map[string][]string{"m1": {"http://a:2380"}}}, "initial_cluster does not name this member"},
		{"discovery_fallback exit", App{Name: "n1", Discovery: "http://d:2379/v2/keys/discovery/abc", DiscoveryFallback: "exit"}, ""},
		{"discovery_fallback alone", App{DiscoveryFallback: "proxy"}, "discovery_fallback goes with discovery"},
		{"discovery_fallback unknown", App{Discovery: "http://d:2379/v2/keys/discovery/abc", DiscoveryFallback: "wait"}, `discovery_fallback must be "proxy" or "exit"`},
		{"discovery_srv", App{Name: "n1", DiscoverySRV: "example.com", DiscoverySRVName: "blue", InitialAdvertisePeerURLs: []string{"https://n1.example.com:2380"}}, ""},
		{"discovery_srv joining", App{Name: "n1", DiscoverySRV: "example.com", InitialClusterState: "existing"}, ""},
		{"discovery_srv and initial_cluster", App{Name: "n1", DiscoverySRV: "example.com", InitialCluster: map[string][]string{"n1": {"http://a:2380"}}}, "multiple discovery or bootstrap options"},
		{"discovery_srv and discovery", App{DiscoverySRV: "example.com", Discovery: "http://d:2379/v2/keys/discovery/abc"}, "multiple discovery or bootstrap options"},
		{"discovery_srv as a URL", App{DiscoverySRV: "https://example.com"}, "is not a DNS name"},
		{"discovery_srv_name alone", App{DiscoverySRVName: "blue"}, "discovery_srv_name goes with discovery_srv"},
		{"discovery_srv_name with a dot", App{DiscoverySRV: "example.com", DiscoverySRVName: "blue.green"}, "letters, digits or dashes"},
	}
	for _, tt := range tests {
		err := tt.app.Validate()
		if tt.wantErr == "" && err != nil || tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)) {
			t.Errorf("%s: Validate() = %v, want %q", tt.name, err, tt.wantErr)
		}
	}
}

// TestPeerSecurityWarnings: the app tells the operator about peer traffic
// that travels in the clear beyond this host, or that peer TLS cannot
// protect; the README's loopback cluster draws no warning.
func TestPeerSecurityWarnings(t *testing.T) {
	cluster := func(urls ...string) map[string][]string {
		m := make(map[string][]string)
		for i, u := range urls {
			m[fmt.Sprintf("n%d", i+1)] = []string{u}
		}
		return m
	}
	tests := []struct {
		name string
		app  App
		want []string // substrings, one per expected warning
	}{
		{"default member", App{}, nil},
		{"loopback cluster", App{InitialCluster: cluster("http://127.0.0.1:12380", "http://localhost:22380", "http://[::1]:32380")}, nil},
		{"plain HTTP between hosts", App{InitialCluster: cluster("http://127.0.0.1:2380", "http://10.0.0.2:2380")}, []string{"plain HTTP beyond this host"}},
		{"https without a client certificate", App{InitialCluster: cluster("https://etcd1.internal:2380", "https://etcd2.internal:2380")}, []string{"without peer_cert_file"}},
		{"https by address", App{PeerCertFile: "c", PeerKeyFile: "k", InitialCluster: cluster("https://10.0.0.1:2380")}, []string{"names an IP address"}},
		{"mutual TLS by name", App{PeerCertFile: "c", PeerKeyFile: "k", PeerTrustedCAFile: "ca", InitialCluster: cluster("https://etcd1.internal:2380", "https://etcd2.internal:2380")}, nil},
	}
	for _, tt := range tests {
		core, logs := observer.New(zap.WarnLevel)
		tt.app.logger = zap.New(core)
		tt.app.warnPeerSecurity()
		var got []string
		for _, e := range logs.All() {
			got = append(got, e.Message)
		}
		if len(got) != len(tt.want) {
			t.Errorf("%s: warnings %q, want %d", tt.name, got, len(tt.want))
			continue
		}
		for i, w := range tt.want {
			if !strings.Contains(got[i], w) {
				t.Errorf("%s: warning %q, want one containing %q", tt.name, got[i], w)
			}
		}
	}
}

// TestPeerTLSFilesReadAtStart: Provision reads none of the peer TLS files
// (caddy validate runs it beside the live member); Start does, and fails
// with the file's name when one is missing or holds no certificate, before
// the member touches its data directory.
func TestPeerTLSFilesReadAtStart(t *testing.T) {
	dir := t.TempDir()
	notPEM := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(notPEM, []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name    string
		app     map[string]any
		wantErr string
	}{
		{"missing certificate", map[string]any{"peer_cert_file": filepath.Join(dir, "none.pem"), "peer_key_file": filepath.Join(dir, "none-key.pem")}, "none.pem"},
		{"CA file without PEM", map[string]any{"peer_trusted_ca_file": notPEM}, "holds no PEM certificate"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			data := filepath.Join(t.TempDir(), "data")
			tt.app["data_dir"] = data
			cfg, err := json.Marshal(map[string]any{
				"admin": map[string]any{"disabled": true, "config": map[string]any{"persist": false}},
				"apps":  map[string]any{"raftkv": tt.app},
			})
			if err != nil {
				t.Fatal(err)
			}
			if err := caddy.Validate(mustConfig(t, cfg)); err != nil {
				t.Fatalf("validate: %v", err)
			}
			err = caddy.Load(cfg, true)
			if err == nil {
				_ = caddy.Stop()
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("load: %v, want an error containing %q", err, tt.wantErr)
			}
			if _, err := os.Stat(data); !os.IsNotExist(err) {
				t.Errorf("the member touched its data directory: %v", err)
			}
			if _, ok := members.References(data); ok {
				t.Error("the failed load left its member behind")
			}
		})
	}
}

func mustConfig(t *testing.T, b []byte) *caddy.Config {
	t.Helper()
	var cfg caddy.Config
	if err := json.Unmarshal(b, &cfg); err != nil {
		t.Fatal(err)
	}
	return &cfg
}

// TestNameThatCannotNameADataDir: without data_dir, the member's directory
// is raftkv/<name> under Caddy's data directory: a name that would leave it
// (or be Caddy's own) is refused.
func TestNameThatCannotNameADataDir(t *testing.T) {
	for _, name := range []string{".", "..", "../x", "a/b", `a\b`} {
		var cfg caddy.Config
		raw := fmt.Sprintf(`{"admin":{"disabled":true},"apps":{"raftkv":{"name":%q}}}`, name)
		if err := json.Unmarshal([]byte(raw), &cfg); err != nil {
			t.Fatal(err)
		}
		if err := caddy.Validate(&cfg); err == nil || !strings.Contains(err.Error(), "set data_dir") {
			t.Errorf("name %q: %v", name, err)
		}
	}
}
