package caddymodule

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/etcaddy/etcaddy/storage"
)

// FuzzKeysOverHTTP sends fuzzed requests to /v2/keys — any method, key and
// query, content type and body, written as raw bytes so that nothing in a
// client library tidies them up — through a real Caddy to a member, and
// checks what the API promises for bad input: an answer (a watch may wait
// for its event instead), never a 5xx or a dropped connection, an etcd JSON
// error for a refused request, and a store that still answers afterwards.
// The paths stay under /v2/keys: a fuzzed POST /v2/members could add a
// member that never starts, and the single member would lose its quorum.
// Its seeds run in every `go test`; `go test -fuzz FuzzKeysOverHTTP`
// explores.
func FuzzKeysOverHTTP(f *testing.F) {
	s := startInproc(f)
	resp, body := s.form("PUT", "/v2/keys/fuzz/sentinel", "value=intact")
	s.expect(resp, body, http.StatusCreated)

	for _, seed := range []struct{ method, target, ctype, body string }{
		{"GET", "/v2/keys/", "", ""},
		{"PUT", "/v2/keys/a", formType, "value=1&ttl=abc"},
		{"PUT", "/v2/keys/a?ttl=-1", formType, "value=1"},
		{"PUT", "/v2/keys/a?ttl=", formType, "value=1"},
		{"PUT", "/v2/keys/a?prevIndex=-1&prevValue=", formType, ""},
		{"PUT", "/v2/keys/dir?dir=true", formType, "value=x"},
		{"POST", "/v2/keys/queue", formType, "value=job"},
		{"DELETE", "/v2/keys/fuzz?recursive=true&dir=maybe", "", ""},
		{"DELETE", "/v2/keys/?recursive=true", "", ""},
		{"GET", "/v2/keys/a?x=%zz", "", ""},
		{"PUT", "/v2/keys/a", formType, "value=%zz"},
		{"GET", "/v2/keys/a?a=1;b=2", "", ""},
		{"PUT", "/v2/keys/u%ff%fe", formType, "value=1"},
		{"PUT", "/v2/keys/../../etc/passwd", formType, "value=1"},
		{"PUT", "/v2/keys/a/./b/../c", formType, "value=1"},
		{"PUT", "/v2/keys//double//slash", formType, "value=1"},
		{"PUT", "/v2/keys/%2e%2e/%2F", formType, "value=1"},
		{"PUT", "/v2/keys/" + strings.Repeat("k", 9000), formType, "value=1"},
		{"PUT", "/v2/keys/a", "multipart/form-data; boundary=x", "--x\r\nContent-Disposition: form-data; name=\"value\"\r\n\r\nv\r\n--x--\r\n"},
		{"PUT", "/v2/keys/a", "application/json", `{"value":"1"}`},
		{"PUT", "/v2/keys/a", formType + "; charset=\xff", "value=1"},
		{"PATCH", "/v2/keys/a", "", ""},
		{"OPTIONS", "/v2/keys/a", "", ""},
		{"HEAD", "/v2/keys/fuzz/sentinel", "", ""},
		{"GET", "/v2/keys/a?wait=true&waitIndex=1", "", ""},
		{"GET", "/v2/keys/a?wait=true&waitIndex=18446744073709551615", "", ""},
		{"GET", "/v2/keys/a?wait=true&stream=true&recursive=true", "", ""},
		{"PUT", "/v2/keys/a?wait=true", formType, "value=1"},
		{"PUT", "/v2/keys/a?refresh=true&ttl=5", formType, ""},
		{"PUT", "/v2/keys/a?prevExist=false&prevExist=true", formType, "value=1&value=2"},
		{"GET", "/v2/keys/fuzz?recursive=true&sorted=true&quorum=true", "", ""},
		{"BREW", "/v2/keys/a", "", ""},
		{"GET", "/v2/keys/../../v2/members", "", ""},
		{"GET", "/v2/keys/a%", "", ""},
		{"GET", "/v2/keys?recursive=true", "", ""},
	} {
		f.Add(seed.method, seed.target, seed.ctype, seed.body)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", s.port)
	f.Fuzz(func(t *testing.T, method, target, ctype, body string) {
		method, target, ctype = fuzzField(method, "\r\n \t"), fuzzField(target, "\r\n \t"), fuzzField(ctype, "\r\n")
		if method == "" || len(body) > 64<<10 {
			return
		}
		if !strings.HasPrefix(target, "/v2/keys") {
			target = "/v2/keys/" + target
		}
		req := rawHTTP(addr, method, target, body, "Content-Type", ctype)

		// A watch (wait=true, however it is spelled) answers its headers at
		// once and its body when an event comes: its body is not awaited.
		watch := strings.Contains(strings.ToLower(target+body), "wait")
		status, ctypeOut, answer, err := rawRequest(addr, method, req, watch)
		switch {
		case err != nil:
			t.Fatalf("%s %q: %v", method, target, err)
		case status >= 500:
			t.Fatalf("%s %q (%q, %q): status %d: %s", method, target, ctype, body, status, answer)
		case status >= 400 && method != http.MethodHead && strings.HasPrefix(target, "/v2/keys") && strings.HasPrefix(ctypeOut, "application/json"):
			// (A HEAD's answer has etcd's headers and no body.)
			var e storage.Error
			if err := json.Unmarshal(answer, &e); err != nil || e.ErrorCode == 0 || e.Message == "" {
				t.Fatalf("%s %q: status %d with a body that is not etcd's error: %q (%v)", method, target, status, answer, err)
			}
		}
		// The store still answers the key written before the fuzzing,
		// unless this input removed or changed it, which etcd allows too.
		checkSentinel(t, addr, method, target, http.StatusOK, http.StatusNotFound)
	})
}

// fuzzField keeps of a fuzzed request line or header field only the bytes it
// can hold (no NUL, none of cut): the fuzz is about what the server makes of
// them, not about HTTP framing.
func fuzzField(s, cut string) string {
	return strings.Map(func(r rune) rune {
		if r == 0 || strings.ContainsRune(cut, r) {
			return -1
		}
		return r
	}, s)
}

// checkSentinel fails t unless the key the fuzz wrote first still answers
// with one of statuses, after the fuzzed request method target.
func checkSentinel(t *testing.T, addr, method, target string, statuses ...int) {
	t.Helper()
	status, _, answer, err := rawRequest(addr, "GET", "GET /v2/keys/fuzz/sentinel HTTP/1.1\r\nHost: "+addr+"\r\nConnection: close\r\n\r\n", false)
	if err != nil || !slices.Contains(statuses, status) {
		t.Fatalf("after %s %q: the store answers %d, %v: %s", method, target, status, err, answer)
	}
}

// rawHTTP is an HTTP/1.1 request as it goes on the wire, with the headers
// given as name, value pairs (one with an empty value left out).
func rawHTTP(addr, method, target, body string, headers ...string) string {
	var req strings.Builder
	fmt.Fprintf(&req, "%s %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n", method, target, addr)
	for i := 0; i+1 < len(headers); i += 2 {
		if headers[i+1] != "" {
			fmt.Fprintf(&req, "%s: %s\r\n", headers[i], headers[i+1])
		}
	}
	fmt.Fprintf(&req, "Content-Length: %d\r\n\r\n%s", len(body), body)
	return req.String()
}

// rawRequest writes req (whose method is method) on a new connection and
// reads the response: for a watch only its status and headers. It gives up
// after twice the time the etcd handler gives a request (requestTimeout).
func rawRequest(addr, method, req string, watch bool) (status int, ctype string, body []byte, err error) {
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		return 0, "", nil, err
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(2 * (5*time.Second + 2*defaultElectionTimeout))); err != nil {
		return 0, "", nil, err
	}
	if _, err := io.WriteString(conn, req); err != nil {
		return 0, "", nil, err
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), &http.Request{Method: method})
	if err != nil {
		return 0, "", nil, err
	}
	// No resp.Body.Close: it would read a watch's body to its end. Closing
	// the connection ends both.
	if watch && resp.StatusCode == http.StatusOK {
		return resp.StatusCode, resp.Header.Get("Content-Type"), nil, nil
	}
	body, err = io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header.Get("Content-Type"), body, err
}

// FuzzAuthOverHTTP sends fuzzed requests to /v2/auth — any method, path below it, JSON body
// and Authorization header — through a real Caddy to a member, and checks what it promises
// for bad input: an answer, never a 5xx or a dropped connection, etcd's {"message"} error
// for a refused request, and a store that still answers afterwards (possibly refusing the
// request, when the input turned auth on and narrowed the guest role).
func FuzzAuthOverHTTP(f *testing.F) {
	s := startInproc(f)
	resp, body := s.form("PUT", "/v2/keys/fuzz/sentinel", "value=intact")
	s.expect(resp, body, http.StatusCreated)
	root := "Basic cm9vdDpyb290cHc=" // root:rootpw
	for _, seed := range []struct{ method, target, authz, body string }{
		{"GET", "/v2/auth/enable", "", ""},
		{"PUT", "/v2/auth/users/root", "", `{"user":"root","password":"rootpw"}`},
		{"PUT", "/v2/auth/roles/r", "", `{"role":"r","permissions":{"kv":{"read":["/fuzz/*"],"write":[]}}}`},
		{"PUT", "/v2/auth/roles/r", "", `{"role":"r","grant":{"kv":{"read":["/x"]}},"revoke":{"kv":{"write":["/y"]}}}`},
		{"PUT", "/v2/auth/users/u", "", `{"user":"u","password":"p","roles":["r","r"]}`},
		{"PUT", "/v2/auth/users/u", "", `{"user":"u","grant":["r"],"revoke":["r"]}`},
		{"PUT", "/v2/auth/users/u", "", `{"user":"u","password":null,"roles":[null]}`},
		{"PUT", "/v2/auth/enable", root, ""},
		{"GET", "/v2/auth/users", "Basic !!!", ""},
		{"GET", "/v2/auth/users", "Bearer x", ""},
		{"GET", "/v2/auth/users", "Basic " + "dTo=", ""},
		{"DELETE", "/v2/auth/enable", root, ""},
		{"DELETE", "/v2/auth/users/%ff", root, ""},
		{"PUT", "/v2/auth/roles/%2F", root, `{"role":"/"}`},
		{"PUT", "/v2/auth/users/x", "", "\xff\xfe"},
		{"PATCH", "/v2/auth/roles/r", "", ""},
		{"GET", "/v2/auth/users/a/b/c", "", ""},
		{"HEAD", "/v2/auth/users/a/b/c", "", ""},
		{"GET", "/v2/auth/../keys/fuzz/sentinel", "", ""},
		{"PUT", "/v2/auth/roles/guest", root, `{"role":"guest","revoke":{"kv":{"read":["/*"],"write":["/*"]}}}`},
	} {
		f.Add(seed.method, seed.target, seed.authz, seed.body)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", s.port)
	f.Fuzz(func(t *testing.T, method, target, authz, body string) {
		method, target, authz = fuzzField(method, "\r\n \t"), fuzzField(target, "\r\n \t"), fuzzField(authz, "\r\n")
		if method == "" || len(body) > 64<<10 {
			return
		}
		if !strings.HasPrefix(target, "/v2/auth") {
			target = "/v2/auth/" + target
		}
		req := rawHTTP(addr, method, target, body, "Content-Type", "application/json", "Authorization", authz)
		status, ctypeOut, answer, err := rawRequest(addr, method, req, false)
		switch {
		case err != nil:
			t.Fatalf("%s %q: %v", method, target, err)
		case status >= 500:
			t.Fatalf("%s %q (%q, %q): status %d: %s", method, target, authz, body, status, answer)
		case status >= 400 && method != http.MethodHead && strings.HasPrefix(ctypeOut, "application/json"):
			var e struct {
				Message string `json:"message"`
			}
			if err := json.Unmarshal(answer, &e); err != nil || e.Message == "" {
				t.Fatalf("%s %q: status %d with a body that is not etcd's error: %q (%v)", method, target, status, answer, err)
			}
		}
		checkSentinel(t, addr, method, target, http.StatusOK, http.StatusNotFound, http.StatusUnauthorized)
	})
}
