package caddymodule

import (
	"encoding/json"
	"fmt"
	"testing"
	"time"
)

// TestRestartedMemberIgnoresInitialCluster restarts a member under a new
// name that its initial_cluster does not list: as etcd, a member that has
// run before reads its cluster from its data, starts, keeps its keys and
// publishes the new name. A member that never ran is refused at once.
func TestRestartedMemberIgnoresInitialCluster(t *testing.T) {
	cf := func(name string, peerPort int) string {
		return fmt.Sprintf("{\n\tadmin 127.0.0.1:{admin_port}\n\traftkv {\n\t\tname %s\n\t\tdata_dir {data_dir}\n"+
			"\t\tinitial_cluster n1=http://127.0.0.1:%d\n\t}\n}\n\nhttp://127.0.0.1:{client_port} {\n\tetcd\n}\n", name, peerPort)
	}
	peerPort := freePort(t)
	first := startEtcaddy(t, etcaddyOpts{Caddyfile: cf("n1", peerPort)})
	if status, _, body := first.do(t, "PUT", "/v2/keys/kept", vals("value", "1")); status != 201 {
		t.Fatalf("PUT: %d %s", status, body)
	}
	first.stop()

	renamed := startEtcaddy(t, etcaddyOpts{Caddyfile: cf("n9", peerPort), DataDir: first.DataDir})
	if status, _, body := renamed.do(t, "GET", "/v2/keys/kept", nil); status != 200 {
		t.Fatalf("GET after the restart: %d %s", status, body)
	}
	var names []string
	if !poll(10*time.Second, func() bool {
		_, _, body := renamed.do(t, "GET", "/v2/members", nil)
		var ms struct{ Members []struct{ Name string } }
		if json.Unmarshal(body, &ms) != nil {
			return false
		}
		names = names[:0]
		for _, m := range ms.Members {
			names = append(names, m.Name)
		}
		return len(names) == 1 && names[0] == "n9"
	}) {
		t.Fatalf("members %q, want the one member named n9", names)
	}

	// Validation: the name must be in initial_cluster unless the data
	// directory holds a member.
	cluster := map[string][]string{"n1": {fmt.Sprintf("http://127.0.0.1:%d", peerPort)}}
	if err := (&App{Name: "n9", DataDir: t.TempDir(), InitialCluster: cluster}).Validate(); err == nil {
		t.Error("a member that never ran, left out of its initial_cluster, passed validation")
	}
	if err := (&App{Name: "n9", DataDir: first.DataDir, InitialCluster: cluster}).Validate(); err != nil {
		t.Errorf("a member that ran before, renamed: %v", err)
	}
}
