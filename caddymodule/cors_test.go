package caddymodule

import (
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
)

// TestCORSOriginsMatchEtcd: with a list of origins (etcd's --cors), etcd
// 3.4 and etcaddy send the same CORS headers for every origin, listed or
// not, on the keys, members, version and health endpoints and on OPTIONS.
// etcd's flag takes only host:port URLs, so the origins here carry ports.
func TestCORSOriginsMatchEtcd(t *testing.T) {
	const origins = "http://a.example:80,https://b.example:8443"
	ref := etcdAt(t, fmt.Sprintf("http://127.0.0.1:%d", freePort(t)))
	ref.args = append(ref.args, "--cors", origins)
	ref.launch(t)
	sub := startEtcaddy(t, etcaddyOpts{Caddyfile: "{\n\tadmin 127.0.0.1:{admin_port}\n\traftkv {\n\t\tdata_dir {data_dir}\n\t}\n}\n\n" +
		"http://127.0.0.1:{client_port} {\n\tetcd {\n\t\tcors " + strings.ReplaceAll(origins, ",", " ") + "\n\t}\n}\n"})
	corsHeaders := func(p *proc, method, path, origin string) (int, string) {
		req, err := http.NewRequest(method, p.ClientURL+path, nil)
		if err != nil {
			t.Fatal(err)
		}
		if origin != "" {
			req.Header.Set("Origin", origin)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("%s %s %s: %v", p.Name, method, path, err)
		}
		resp.Body.Close()
		var hs []string
		for k, v := range resp.Header {
			if strings.HasPrefix(k, "Access-Control-") {
				hs = append(hs, k+": "+strings.Join(v, ","))
			}
		}
		slices.Sort(hs)
		return resp.StatusCode, strings.Join(hs, "\n")
	}
	for _, origin := range []string{"", "http://a.example:80", "http://a.example", "https://b.example:8443", "http://c.example", "null"} {
		for _, rq := range []struct{ method, path string }{
			{"GET", "/v2/keys/"}, {"GET", "/v2/keys/missing"}, {"GET", "/v2/members"}, {"GET", "/version"}, {"GET", "/health"}, {"OPTIONS", "/v2/keys/x"},
		} {
			es, eh := corsHeaders(ref, rq.method, rq.path, origin)
			ss, sh := corsHeaders(sub, rq.method, rq.path, origin)
			if es != ss || eh != sh {
				t.Errorf("Origin %q, %s %s:\netcd     %d\n%s\netcaddy  %d\n%s", origin, rq.method, rq.path, es, eh, ss, sh)
			}
		}
	}
	// Caches keep the answers apart: etcaddy says they vary by Origin.
	req, _ := http.NewRequest("GET", sub.ClientURL+"/v2/keys/", nil)
	req.Header.Set("Origin", "https://b.example:8443")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if v := resp.Header.Values("Vary"); !slices.Contains(v, "Origin") {
		t.Errorf("Vary %q, want Origin", v)
	}
}
