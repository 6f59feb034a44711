package caddymodule

import (
	"bytes"
	"encoding/json"
	"flag"
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
		{"bad cluster state", "{\n\traftkv {\n\t\tinitial_cluster_state maybe\n\t}\n}\n", `initial_cluster_state must be "new" or "existing"`},
		{"etcd takes no argument", ":2379 {\n\tetcd /v2/* extra\n}\n", "wrong argument count"},
		{"etcd has no options yet", ":2379 {\n\tetcd {\n\t\tcors off\n\t}\n}\n", `unrecognized etcd option "cors"`},
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
		{"bad cluster state", App{InitialClusterState: "old"}, "initial_cluster_state"},
		{"cluster without this member", App{Name: "n1", InitialCluster: map[string][]string{"n2": {"http://a:2380"}}}, `does not name this member "n1"`},
		{"peer URL without a port", App{Name: "n1", InitialCluster: map[string][]string{"n1": {"http://a"}}}, `does not have the form "host:port"`},
		{"peer URL with a path", App{Name: "n1", InitialCluster: map[string][]string{"n1": {"http://a:1/p"}}}, "must not contain a path"},
		{"bad client URL", App{AdvertiseClientURLs: []string{"ftp://a:1"}}, "URL scheme must be"},
		{"good cluster", App{Name: "n1", InitialCluster: map[string][]string{"n1": {"https://a:2380"}, "n2": {"https://b:2380"}}}, ""},
	}
	for _, tt := range tests {
		err := tt.app.Validate()
		if tt.wantErr == "" && err != nil || tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)) {
			t.Errorf("%s: Validate() = %v, want %q", tt.name, err, tt.wantErr)
		}
	}
}
