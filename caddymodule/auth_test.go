package caddymodule

import (
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/etcaddy/etcaddy/storage"
	"golang.org/x/crypto/bcrypt"
)

// asUser sends a JSON body (none when empty) with basic auth as user ("name:password"; empty:
// no credentials).
func (s *inproc) asUser(user, method, path, body string) (*http.Response, string) {
	s.t.Helper()
	ctype := ""
	if body != "" {
		ctype = "application/json"
	}
	req := s.request(s.t.Context(), method, path, ctype, body)
	if name, password, ok := strings.Cut(user, ":"); ok {
		req.SetBasicAuth(name, password)
	}
	resp, err := s.client.Do(req)
	if err != nil {
		s.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		s.t.Fatal(err)
	}
	return resp, string(b)
}

func (s *inproc) wantStatus(resp *http.Response, body string, status int) {
	s.t.Helper()
	if resp.StatusCode != status {
		s.t.Fatalf("%s %s: status %d, want %d; body %q", resp.Request.Method, resp.Request.URL, resp.StatusCode, status, body)
	}
}

// Two roles granted to one user at the same moment both stay granted: each update is
// conditional on the user it was computed from, and computed again when the other won.
// (etcd writes each blindly, and one of the two can be lost.)
func TestConcurrentAuthUpdatesAreNotLost(t *testing.T) {
	s := startInproc(t)
	resp, body := s.asUser("", "PUT", "/v2/auth/users/u", `{"user":"u","password":"p"}`)
	s.wantStatus(resp, body, http.StatusCreated)
	const n = 6
	for i := range n {
		resp, body := s.asUser("", "PUT", fmt.Sprintf("/v2/auth/roles/r%d", i), fmt.Sprintf(`{"role":"r%d","permissions":{"kv":{"read":["/r%d/*"]}}}`, i, i))
		s.wantStatus(resp, body, http.StatusCreated)
	}
	var wg sync.WaitGroup
	errs := make(chan string, n)
	for i := range n {
		wg.Go(func() {
			req := s.request(t.Context(), "PUT", "/v2/auth/users/u", "application/json", fmt.Sprintf(`{"user":"u","grant":["r%d"]}`, i))
			resp, err := s.client.Do(req)
			if err != nil {
				errs <- err.Error()
				return
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				errs <- fmt.Sprintf("grant r%d: status %d", i, resp.StatusCode)
			}
		})
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	resp, body = s.asUser("", "GET", "/v2/auth/users/u", "")
	s.wantStatus(resp, body, http.StatusOK)
	var u struct {
		Roles []struct {
			Role string `json:"role"`
		} `json:"roles"`
	}
	if err := json.Unmarshal([]byte(body), &u); err != nil {
		t.Fatal(err)
	}
	if len(u.Roles) != n {
		t.Fatalf("user has %d roles after %d concurrent grants: %s", len(u.Roles), n, body)
	}
}

func TestAuthBadInputOverHTTP(t *testing.T) {
	s := startInproc(t)
	big := `{"user":"big","password":"` + strings.Repeat("p", maxRequestBytes) + `"}`
	resp, body := s.asUser("", "PUT", "/v2/auth/users/big", big)
	s.wantStatus(resp, body, http.StatusRequestEntityTooLarge)
	if !strings.Contains(body, causeBodyTooLarge) {
		t.Fatalf("body %q", body)
	}
	resp, body = s.asUser("", "PUT", "/v2/auth/roles/big", `{"role":"big","permissions":{"kv":{"read":["`+strings.Repeat("r", maxRequestBytes)+`"]}}}`)
	s.wantStatus(resp, body, http.StatusRequestEntityTooLarge)
	for _, b := range []string{"", "{", `{"user":["x"]}`, `{"user":"x","roles":"r"}`, "\xff"} {
		resp, body := s.asUser("", "PUT", "/v2/auth/users/x", b)
		s.wantStatus(resp, body, http.StatusBadRequest)
	}
	// A name longer than the store keeps (under Caddy's header limit).
	long := strings.Repeat("n", storage.MaxPathLen)
	for _, kind := range []string{"users", "roles"} {
		resp, body := s.asUser("", "PUT", "/v2/auth/"+kind+"/"+long, `{"user":"`+long+`","role":"`+long+`","password":"p"}`)
		s.wantStatus(resp, body, http.StatusBadRequest)
		if !strings.Contains(body, "name too long") {
			t.Fatalf("%s: %q", kind, body)
		}
	}
	// Nothing of it was stored; the member goes on.
	resp, body = s.asUser("", "GET", "/v2/auth/users", "")
	s.wantStatus(resp, body, http.StatusOK)
	if body != "{\"users\":null}\n" {
		t.Fatalf("users after bad input: %q", body)
	}
	resp, body = s.form("PUT", "/v2/keys/after", "value=ok")
	s.expect(resp, body, http.StatusCreated)
}

func TestPasswordMemoryFollowsTheStoredHash(t *testing.T) {
	hash := func(pw string) string {
		h, err := bcrypt.GenerateFromPassword([]byte(pw), bcrypt.MinCost)
		if err != nil {
			t.Fatal(err)
		}
		return string(h)
	}
	u1 := &authUser{User: "memo", Password: hash("one")}
	for _, c := range []struct {
		u    *authUser
		pw   string
		want bool
	}{
		{u1, "one", true}, {u1, "one", true}, {u1, "two", false}, {u1, "", false},
		// A new password voids what was remembered of the old one.
		{&authUser{User: "memo", Password: hash("two")}, "one", false},
		{&authUser{User: "memo", Password: hash("two")}, "two", true},
		{u1, "two", false}, {u1, "one", true},
		// Another user's password is not this one's.
		{&authUser{User: "other", Password: u1.Password}, "one", true},
	} {
		if got := checkPassword(c.u, c.pw); got != c.want {
			t.Fatalf("checkPassword(%s, %q) = %v, want %v", c.u.User, c.pw, got, c.want)
		}
	}
	passwords.Lock()
	e := passwords.seen["memo"]
	passwords.Unlock()
	if e.hash != u1.Password || slices.Equal(e.mac, []byte("one")) {
		t.Fatalf("remembered %+v", e)
	}
}

// A client certificate the site verified (Caddy's client_auth) authenticates as the user its
// common name names, when the request has no Authorization header (etcd's
// --client-cert-auth); basic auth, when sent, decides instead.
func TestClientCertificateAuthenticatesItsCommonName(t *testing.T) {
	pki := newTestPKI(t, "fleet", "stranger")
	tlsPort := freePort(t)
	cert, key := pki.memberFiles("fleet")
	p := startEtcaddy(t, etcaddyOpts{Caddyfile: fmt.Sprintf(`{
	admin 127.0.0.1:{admin_port}
	auto_https disable_redirects
	skip_install_trust
	raftkv {
		data_dir {data_dir}
	}
}

http://127.0.0.1:{client_port} {
	etcd
}

https://localhost:%d {
	bind 127.0.0.1
	tls %s %s {
		client_auth {
			mode verify_if_given
			trust_pool file %s
		}
	}
	etcd
}
`, tlsPort, cert, key, pki.caFile)})
	put := func(user, path, body string) int {
		t.Helper()
		req, err := http.NewRequestWithContext(t.Context(), "PUT", p.ClientURL+path, strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/json")
		if name, pw, ok := strings.Cut(user, ":"); ok {
			req.SetBasicAuth(name, pw)
		}
		resp, err := testClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	for _, s := range []struct{ user, path, body string }{
		{"", "/v2/auth/users/root", `{"user":"root","password":"rootpw"}`},
		{"", "/v2/auth/roles/rkt", `{"role":"rkt","permissions":{"kv":{"read":["/rkt/*"],"write":["/rkt/*"]}}}`},
		{"", "/v2/auth/users/fleet", `{"user":"fleet","password":"fleetpw","roles":["rkt"]}`},
		// A user named as the CA is named: only a client's own certificate names a user.
		{"", "/v2/auth/users/" + url.PathEscape("etcaddy test cluster CA"), `{"user":"etcaddy test cluster CA","password":"ca","roles":["rkt"]}`},
		{"", "/v2/auth/enable", ""},
		{"root:rootpw", "/v2/auth/roles/guest", `{"role":"guest","revoke":{"kv":{"read":["/*"],"write":["/*"]}}}`},
	} {
		if st := put(s.user, s.path, s.body); st/100 != 2 {
			t.Fatalf("PUT %s: %d", s.path, st)
		}
	}
	base := fmt.Sprintf("https://localhost:%d", tlsPort)
	client := func(name string) *http.Client {
		cfg := &tls.Config{RootCAs: pki.pool, MinVersion: tls.VersionTLS12}
		if name != "" {
			cfg.Certificates = []tls.Certificate{pki.pair(t, name)}
		}
		c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: cfg}}
		t.Cleanup(c.CloseIdleConnections)
		return c
	}
	for _, tc := range []struct {
		name, cert, user, path string
		want                   int
	}{
		{"fleet's certificate may write its keys", "fleet", "", "/v2/keys/rkt/x", http.StatusCreated},
		{"but not others", "fleet", "", "/v2/keys/other", http.StatusUnauthorized},
		{"basic auth decides when sent", "fleet", "root:rootpw", "/v2/keys/other", http.StatusCreated},
		{"wrong basic auth is refused", "fleet", "fleet:wrong", "/v2/keys/rkt/y", http.StatusUnauthorized},
		{"a certificate naming no user is a guest", "stranger", "", "/v2/keys/rkt/z", http.StatusUnauthorized},
		{"no certificate is a guest", "", "", "/v2/keys/rkt/z", http.StatusUnauthorized},
	} {
		req, err := http.NewRequestWithContext(t.Context(), "PUT", base+tc.path, strings.NewReader("value=1"))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", formType)
		if name, pw, ok := strings.Cut(tc.user, ":"); ok {
			req.SetBasicAuth(name, pw)
		}
		resp, err := client(tc.cert).Do(req)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.want {
			t.Errorf("%s: status %d, want %d", tc.name, resp.StatusCode, tc.want)
		}
	}
}

// A member that has not published the auth feature (one added but not started here, as a
// member of an earlier build would be) holds auth writes back: etcd's "not capable" once the
// request's time is up; they go through again once it is gone.
func TestAuthWritesWaitForEveryMembersFeature(t *testing.T) {
	c := startCluster(t, 3, nil)
	m := c.members[0]
	put := func(path, body string) (int, string) {
		t.Helper()
		req, err := http.NewRequestWithContext(t.Context(), "PUT", m.ClientURL+path, strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/json")
		resp, err := testClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		return resp.StatusCode, string(b)
	}
	if st, body := put("/v2/auth/users/root", `{"user":"root","password":"rootpw"}`); st != http.StatusCreated {
		t.Fatalf("root user: %d %s", st, body)
	}
	// Until the leader has reached every member for a while, etcd's strict reconfiguration
	// check refuses to add one.
	var added struct {
		ID string `json:"id"`
	}
	peer := fmt.Sprintf(`{"peerURLs":["http://127.0.0.1:%d"]}`, freePort(t))
	if !poll(30*time.Second, func() bool {
		req, err := http.NewRequestWithContext(t.Context(), "POST", m.ClientURL+"/v2/members", strings.NewReader(peer))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/json")
		resp, err := testClient.Do(req)
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		return resp.StatusCode == http.StatusCreated && json.NewDecoder(resp.Body).Decode(&added) == nil
	}) {
		t.Fatal("the cluster did not take a fourth member")
	}
	st, msg := put("/v2/auth/roles/r", `{"role":"r","permissions":{"kv":{"read":["/r/*"],"write":[]}}}`)
	if st != http.StatusInternalServerError || msg != `{"message":"Not capable of accessing auth feature during rolling upgrades."}` {
		t.Fatalf("auth write with a member that has not published its features: %d %s", st, msg)
	}
	if st, _, body := m.do(t, "DELETE", "/v2/members/"+added.ID, nil); st != http.StatusNoContent {
		t.Fatalf("removing the member: %d %s", st, body)
	}
	if st, msg := put("/v2/auth/roles/r", `{"role":"r","permissions":{"kv":{"read":["/r/*"],"write":[]}}}`); st != http.StatusCreated {
		t.Fatalf("auth write once it is gone: %d %s", st, msg)
	}
}
