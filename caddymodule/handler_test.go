package caddymodule

// Real HTTP through an in-process Caddy: caddy.Load of a JSON config whose
// server listens on 127.0.0.1 with a port from :0, a member with its data in
// t.TempDir(). caddy.Load is process-global, so these tests never run in
// parallel and each one stops Caddy when it ends.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/etcaddy/etcaddy/raftkv"
	"github.com/etcaddy/etcaddy/storage"
)

type inproc struct {
	t        testing.TB
	upstream string // host:port of the backend behind reverse_proxy /app/*
	port     int
	base     string
	dataDir  string
	config   []byte // the config startInproc loaded
	client   *http.Client
}

// inprocConfig is a site that serves the v2 API through etcd, /app/*
// through reverse_proxy to upstream, /static through static_response and
// everything else through file_server.
//
// An empty name leaves the raftkv app out of the config: the handler then
// gets one with every default.
func inprocConfig(port int, dataDir, webRoot, caddyDir, name, staticBody, upstream string) []byte {
	cfg := map[string]any{
		"admin":   map[string]any{"disabled": true, "config": map[string]any{"persist": false}},
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{"level": "ERROR"}}},
		"storage": map[string]any{"module": "file_system", "root": caddyDir},
		"apps": map[string]any{
			"raftkv": map[string]any{
				"name":               name,
				"data_dir":           dataDir,
				"heartbeat_interval": "10ms",
				"election_timeout":   "100ms",
			},
			"http": map[string]any{
				"servers": map[string]any{
					"test": map[string]any{
						"listen":          []string{fmt.Sprintf("127.0.0.1:%d", port)},
						"automatic_https": map[string]any{"disable": true},
						"routes": []any{
							map[string]any{"handle": []any{map[string]any{"handler": "etcd"}}},
							map[string]any{
								"match": []any{map[string]any{"path": []string{"/app/*"}}},
								"handle": []any{map[string]any{
									"handler":   "reverse_proxy",
									"upstreams": []any{map[string]any{"dial": upstream}},
								}},
							},
							map[string]any{
								"match":  []any{map[string]any{"path": []string{"/static"}}},
								"handle": []any{map[string]any{"handler": "static_response", "body": staticBody}},
							},
							map[string]any{"handle": []any{map[string]any{"handler": "file_server", "root": webRoot}}},
						},
					},
				},
			},
		},
	}
	if name == "" {
		delete(cfg["apps"].(map[string]any), "raftkv")
	}
	b, _ := json.Marshal(cfg)
	return b
}

func inprocPort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// startInproc loads a config into this process's Caddy and waits until the
// member has elected itself.
func startInproc(t testing.TB) *inproc {
	t.Helper()
	return startInprocNamed(t, "default")
}

func startInprocNamed(t testing.TB, name string) *inproc {
	t.Helper()
	dir := t.TempDir()
	webRoot := filepath.Join(dir, "www")
	if err := os.MkdirAll(webRoot, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(webRoot, "hello.txt"), []byte("hello from file_server\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "backend saw "+r.URL.Path)
	}))
	t.Cleanup(backend.Close)
	port := inprocPort(t)
	s := &inproc{
		upstream: strings.TrimPrefix(backend.URL, "http://"),
		t:        t,
		port:     port,
		base:     fmt.Sprintf("http://127.0.0.1:%d", port),
		dataDir:  filepath.Join(dir, "member"),
		client: &http.Client{
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
			Transport:     &http.Transport{DisableCompression: true},
		},
	}
	if name == "" {
		// The default data directory, under Caddy's.
		t.Setenv("XDG_DATA_HOME", filepath.Join(dir, "xdg"))
		s.dataDir = filepath.Join(dir, "xdg", "caddy", "raftkv", "default")
	}
	s.config = inprocConfig(port, s.dataDir, webRoot, filepath.Join(dir, "caddy"), name, "static", s.upstream)
	if err := caddy.Load(s.config, true); err != nil {
		t.Fatalf("caddy.Load: %v", err)
	}
	t.Cleanup(func() {
		if err := caddy.Stop(); err != nil {
			t.Errorf("caddy.Stop: %v", err)
		}
		// The last config is gone: so is the member.
		if n, ok := members.References(s.dataDir); ok {
			t.Errorf("member of %s still has %d references after Stop", s.dataDir, n)
		}
	})
	s.waitFor("the member to be healthy", func() bool {
		resp, _ := s.do("GET", "/health", "", "")
		return resp.StatusCode == http.StatusOK
	})
	return s
}

func (s *inproc) waitFor(what string, cond func() bool) {
	s.t.Helper()
	if !poll(10*time.Second, cond) {
		s.t.Fatalf("timed out waiting for %s", what)
	}
}

// getAfterReload forgets the client's idle connections and asks GET path until an answer
// comes through and ok takes it, and returns that answer's body: a reload may reset a
// connection made as it swaps the listening sockets, before its request was read (README,
// Reloads). Caddy shuts the replaced server down after the load returns, so it then waits
// until the replaced server's listening socket is gone (where that can be seen: Linux) and
// forgets the idle connections again: the requests after it neither reuse a connection the
// replaced server is about to close nor land in its socket.
func (s *inproc) getAfterReload(what, path string, ok func(status int, body string) bool) string {
	s.t.Helper()
	s.client.CloseIdleConnections()
	var body string
	s.waitFor(what, func() bool {
		resp, err := s.client.Do(s.request(context.Background(), "GET", path, "", ""))
		if err != nil {
			return false
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		body = string(b)
		return err == nil && ok(resp.StatusCode, body)
	})
	s.waitFor("the replaced server's listening socket to close", func() bool {
		n, ok := tcpListeners(s.port)
		return !ok || n == 1
	})
	s.client.CloseIdleConnections()
	return body
}

func (s *inproc) request(ctx context.Context, method, path, ctype, body string) *http.Request {
	s.t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, s.base+path, rd)
	if err != nil {
		s.t.Fatal(err)
	}
	if ctype != "" {
		req.Header.Set("Content-Type", ctype)
	}
	return req
}

// do sends a request and reads the whole answer.
func (s *inproc) do(method, path, ctype, body string) (*http.Response, string) {
	s.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	resp, err := s.client.Do(s.request(ctx, method, path, ctype, body))
	if err != nil {
		s.t.Fatalf("%s %s: %v", method, path, err)
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		s.t.Fatalf("%s %s: reading body: %v", method, path, err)
	}
	return resp, string(b)
}

// form sends a form-urlencoded body, as etcdctl and curl -d do.
func (s *inproc) form(method, path, body string) (*http.Response, string) {
	s.t.Helper()
	return s.do(method, path, formType, body)
}

func (s *inproc) expect(resp *http.Response, body string, status int) {
	s.t.Helper()
	if resp.StatusCode != status {
		s.t.Fatalf("%s %s: status %d, want %d; body %q", resp.Request.Method, resp.Request.URL, resp.StatusCode, status, body)
	}
	h := resp.Header
	if h.Get("Access-Control-Allow-Origin") != "*" ||
		h.Get("Access-Control-Allow-Methods") != "POST, GET, OPTIONS, PUT, DELETE" ||
		h.Get("Access-Control-Allow-Headers") != "accept, content-type, authorization" {
		s.t.Fatalf("%s %s: missing etcd's CORS headers: %v", resp.Request.Method, resp.Request.URL, h)
	}
	if h.Get("Server") != "" {
		s.t.Fatalf("%s %s: a Server header etcd does not send: %q", resp.Request.Method, resp.Request.URL, h.Get("Server"))
	}
}

func decodeEvent(t testing.TB, body string) *storage.Event {
	t.Helper()
	var ev storage.Event
	if err := json.Unmarshal([]byte(body), &ev); err != nil {
		t.Fatalf("decoding event %q: %v", body, err)
	}
	return &ev
}

func decodeError(t testing.TB, body string) *storage.Error {
	t.Helper()
	if !strings.HasSuffix(body, "\n") {
		t.Fatalf("error body %q lacks etcd's newline", body)
	}
	var e storage.Error
	if err := json.Unmarshal([]byte(body), &e); err != nil {
		t.Fatalf("decoding error %q: %v", body, err)
	}
	return &e
}

// expectKeyError checks the status, etcd's error JSON and its headers: a
// cluster ID and X-Etcd-Index, never X-Raft-*.
func (s *inproc) expectKeyError(resp *http.Response, body string, status, code int, cause string) *storage.Error {
	s.t.Helper()
	s.expect(resp, body, status)
	e := decodeError(s.t, body)
	if e.ErrorCode != code || (cause != "" && e.Cause != cause) {
		s.t.Fatalf("%s %s: error %d %q, want %d %q", resp.Request.Method, resp.Request.URL, e.ErrorCode, e.Cause, code, cause)
	}
	if got := resp.Header.Get("X-Etcd-Index"); got != strconv.FormatUint(e.Index, 10) {
		s.t.Fatalf("X-Etcd-Index %q, want the error's index %d", got, e.Index)
	}
	if resp.Header.Get("X-Raft-Index") != "" || resp.Header.Get("X-Raft-Term") != "" {
		s.t.Fatalf("an error carries X-Raft-* headers: %v", resp.Header)
	}
	if resp.Header.Get("X-Etcd-Cluster-Id") == "" || resp.Header.Get("Content-Type") != "application/json" {
		s.t.Fatalf("error headers %v", resp.Header)
	}
	return e
}

func (s *inproc) expectSuccessHeaders(resp *http.Response, ev *storage.Event) {
	s.t.Helper()
	h := resp.Header
	if h.Get("Content-Type") != "application/json" || h.Get("X-Etcd-Cluster-Id") == "" ||
		h.Get("X-Raft-Index") == "" || h.Get("X-Raft-Term") == "" {
		s.t.Fatalf("success headers %v", h)
	}
	if ev != nil && ev.Node != nil && ev.Node.ModifiedIndex != 0 && ev.Action != storage.ActionGet {
		if got := h.Get("X-Etcd-Index"); got != strconv.FormatUint(ev.Node.ModifiedIndex, 10) {
			s.t.Fatalf("X-Etcd-Index %q, want the write's index %d", got, ev.Node.ModifiedIndex)
		}
	}
}

func TestSetGetDeleteOverHTTP(t *testing.T) {
	s := startInproc(t)

	resp, body := s.form("PUT", "/v2/keys/message", "value=Hello world")
	s.expect(resp, body, http.StatusCreated)
	ev := decodeEvent(t, body)
	s.expectSuccessHeaders(resp, ev)
	if ev.Action != "set" || ev.PrevNode != nil || *ev.Node.Value != "Hello world" || ev.Node.CreatedIndex != ev.Node.ModifiedIndex {
		t.Fatalf("first set: %s", body)
	}
	if !strings.HasSuffix(body, "}\n") || strings.Count(body, "\n") != 1 {
		t.Fatalf("body %q is not one JSON object and a newline", body)
	}
	first := ev.Node.ModifiedIndex

	resp, body = s.form("PUT", "/v2/keys/message", "value=Hello etcd")
	s.expect(resp, body, http.StatusOK)
	ev = decodeEvent(t, body)
	s.expectSuccessHeaders(resp, ev)
	if ev.PrevNode == nil || *ev.PrevNode.Value != "Hello world" || ev.Node.CreatedIndex <= first {
		t.Fatalf("second set (set re-creates the node): %s", body)
	}

	resp, body = s.do("GET", "/v2/keys/message", "", "")
	s.expect(resp, body, http.StatusOK)
	s.expectSuccessHeaders(resp, nil)
	if ev := decodeEvent(t, body); ev.Action != "get" || *ev.Node.Value != "Hello etcd" {
		t.Fatalf("get: %s", body)
	}

	// HEAD: GET's status and headers, Content-Length included, no body.
	resp, body = s.do("HEAD", "/v2/keys/message", "", "")
	s.expect(resp, body, http.StatusOK)
	if body != "" || resp.ContentLength <= 0 || resp.Header.Get("X-Etcd-Index") == "" {
		t.Fatalf("HEAD: length %d, body %q, headers %v", resp.ContentLength, body, resp.Header)
	}

	resp, body = s.do("DELETE", "/v2/keys/message", "", "")
	s.expect(resp, body, http.StatusOK)
	if ev := decodeEvent(t, body); ev.Action != "delete" || ev.Node.Value != nil || *ev.PrevNode.Value != "Hello etcd" {
		t.Fatalf("delete: %s", body)
	}

	resp, body = s.do("GET", "/v2/keys/message", "", "")
	e := s.expectKeyError(resp, body, http.StatusNotFound, storage.EcodeKeyNotFound, "/message")
	if e.Index == 0 {
		t.Fatal("a store error carries the store index, not 0")
	}
	resp, body = s.do("HEAD", "/v2/keys/message", "", "")
	s.expect(resp, body, http.StatusNotFound)
	if body != "" {
		t.Fatalf("HEAD 404 has a body %q", body)
	}

	// Body beats query; JSON bodies are not parsed; noValueOnSuccess.
	resp, body = s.form("PUT", "/v2/keys/prec?value=query", "value=body")
	s.expect(resp, body, http.StatusCreated)
	if ev := decodeEvent(t, body); *ev.Node.Value != "body" {
		t.Fatalf("body did not beat query: %s", body)
	}
	resp, body = s.do("PUT", "/v2/keys/json", "application/json", `{"value":"x"}`)
	s.expect(resp, body, http.StatusCreated)
	if ev := decodeEvent(t, body); ev.Node.Value == nil || *ev.Node.Value != "" {
		t.Fatalf("JSON body was parsed: %s", body)
	}
	resp, body = s.form("PUT", "/v2/keys/prec?noValueOnSuccess=true", "value=again")
	s.expect(resp, body, http.StatusOK)
	if body != "{\"action\":\"set\"}\n" {
		t.Fatalf("noValueOnSuccess: %q", body)
	}
}

func TestCompareAndSwapOverHTTP(t *testing.T) {
	s := startInproc(t)
	resp, body := s.form("PUT", "/v2/keys/foo?prevExist=false", "value=one")
	s.expect(resp, body, http.StatusCreated)
	ev := decodeEvent(t, body)
	if ev.Action != "create" {
		t.Fatalf("create: %s", body)
	}
	created := ev.Node.CreatedIndex

	resp, body = s.form("PUT", "/v2/keys/foo?prevExist=false", "value=again")
	s.expectKeyError(resp, body, http.StatusPreconditionFailed, storage.EcodeNodeExist, "/foo")

	resp, body = s.form("PUT", "/v2/keys/foo?prevValue=two", "value=three")
	s.expectKeyError(resp, body, http.StatusPreconditionFailed, storage.EcodeTestFailed, "[two != one]")

	resp, body = s.form("PUT", "/v2/keys/foo?prevValue=one", "value=two")
	s.expect(resp, body, http.StatusOK)
	ev = decodeEvent(t, body)
	s.expectSuccessHeaders(resp, ev)
	if ev.Action != "compareAndSwap" || ev.Node.CreatedIndex != created || *ev.Node.Value != "two" {
		t.Fatalf("CAS: %s", body)
	}
	resp, body = s.form("PUT", "/v2/keys/foo?prevIndex="+strconv.FormatUint(ev.Node.ModifiedIndex, 10)+"&prevExist=true", "value=four")
	s.expect(resp, body, http.StatusOK)

	resp, body = s.form("PUT", "/v2/keys/missing?prevExist=true", "value=x")
	s.expectKeyError(resp, body, http.StatusNotFound, storage.EcodeKeyNotFound, "/missing")

	resp, body = s.do("DELETE", "/v2/keys/foo?prevValue=nope", "", "")
	s.expectKeyError(resp, body, http.StatusPreconditionFailed, storage.EcodeTestFailed, "[nope != four]")
	resp, body = s.do("DELETE", "/v2/keys/foo?prevValue=four", "", "")
	s.expect(resp, body, http.StatusOK)
	if ev := decodeEvent(t, body); ev.Action != "compareAndDelete" {
		t.Fatalf("CAD: %s", body)
	}
}

func TestTTLExpiresOverHTTP(t *testing.T) {
	s := startInproc(t)
	resp, body := s.form("PUT", "/v2/keys/ttl", "value=v&ttl=1")
	s.expect(resp, body, http.StatusCreated)
	ev := decodeEvent(t, body)
	if ev.Node.TTL != 1 || ev.Node.Expiration == nil || ev.Node.Expiration.Location() != time.UTC {
		t.Fatalf("ttl set: %s", body)
	}
	s.waitFor("the key to expire", func() bool {
		resp, _ := s.do("GET", "/v2/keys/ttl", "", "")
		return resp.StatusCode == http.StatusNotFound
	})

	// An empty ttl is no TTL: an update with it removes the key's TTL.
	resp, body = s.form("PUT", "/v2/keys/keep", "value=v&ttl=100")
	s.expect(resp, body, http.StatusCreated)
	resp, body = s.form("PUT", "/v2/keys/keep?prevExist=true", "value=v&ttl=")
	s.expect(resp, body, http.StatusOK)
	if ev := decodeEvent(t, body); ev.Node.Expiration != nil || ev.Node.TTL != 0 || ev.PrevNode.TTL == 0 {
		t.Fatalf("ttl= did not clear the TTL: %s", body)
	}

	// Bug-compatible with etcd: the overflowing TTL is a second in the
	// past, so the key is answered with "ttl":-1 and expires at once.
	resp, body = s.form("PUT", "/v2/keys/overflow", "value=v&ttl=18446744073709551615")
	s.expect(resp, body, http.StatusCreated)
	if !strings.Contains(body, `"ttl":-1,`) {
		t.Fatalf("overflowing ttl: %s", body)
	}
	s.waitFor("the overflowed key to expire", func() bool {
		resp, _ := s.do("GET", "/v2/keys/overflow", "", "")
		return resp.StatusCode == http.StatusNotFound
	})

	// Refresh: the value stays, the TTL is new.
	resp, body = s.form("PUT", "/v2/keys/rf", "value=kept&ttl=50")
	s.expect(resp, body, http.StatusCreated)
	resp, body = s.form("PUT", "/v2/keys/rf?refresh=true&prevExist=true", "ttl=100")
	s.expect(resp, body, http.StatusOK)
	if ev := decodeEvent(t, body); ev.Action != "update" || *ev.Node.Value != "kept" || ev.Node.TTL != 100 {
		t.Fatalf("refresh: %s", body)
	}
}

func TestDirectoriesAndInOrderKeysOverHTTP(t *testing.T) {
	s := startInproc(t)
	resp, body := s.form("PUT", "/v2/keys/dir", "dir=true")
	s.expect(resp, body, http.StatusCreated)
	if ev := decodeEvent(t, body); !ev.Node.Dir || ev.Node.Value != nil {
		t.Fatalf("mkdir: %s", body)
	}
	resp, body = s.form("PUT", "/v2/keys/dir", "value=x")
	s.expectKeyError(resp, body, http.StatusForbidden, storage.EcodeNotFile, "/dir")

	var names []string
	for _, job := range []string{"Job1", "Job2", "Job3"} {
		resp, body = s.form("POST", "/v2/keys/queue", "value="+job)
		s.expect(resp, body, http.StatusCreated)
		ev := decodeEvent(t, body)
		if ev.Action != "create" || !strings.HasPrefix(ev.Node.Key, "/queue/") || len(ev.Node.Key) != len("/queue/")+20 {
			t.Fatalf("in-order create: %s", body)
		}
		names = append(names, ev.Node.Key)
	}
	resp, body = s.do("GET", "/v2/keys/queue?recursive=true&sorted=true", "", "")
	s.expect(resp, body, http.StatusOK)
	ev := decodeEvent(t, body)
	if len(ev.Node.Nodes) != 3 {
		t.Fatalf("listing: %s", body)
	}
	for i, n := range ev.Node.Nodes {
		if n.Key != names[i] || *n.Value != fmt.Sprintf("Job%d", i+1) {
			t.Fatalf("sorted listing out of creation order: %s", body)
		}
	}

	resp, body = s.do("DELETE", "/v2/keys/queue", "", "")
	s.expectKeyError(resp, body, http.StatusForbidden, storage.EcodeNotFile, "/queue")
	resp, body = s.do("DELETE", "/v2/keys/queue?dir=true", "", "")
	s.expectKeyError(resp, body, http.StatusForbidden, storage.EcodeDirNotEmpty, "/queue")
	resp, body = s.do("DELETE", "/v2/keys/queue?recursive=true", "", "")
	s.expect(resp, body, http.StatusOK)

	// Root: no key, no indexes; read-only.
	resp, body = s.do("GET", "/v2/keys/", "", "")
	s.expect(resp, body, http.StatusOK)
	if !strings.HasPrefix(body, `{"action":"get","node":{"dir":true`) {
		t.Fatalf("root: %s", body)
	}
	resp, body = s.form("PUT", "/v2/keys/", "value=x")
	s.expectKeyError(resp, body, http.StatusBadRequest, storage.EcodeRootROnly, "/")
}

// readEvent reads one newline-terminated event from a watch response.
func readEvent(t *testing.T, rd *bufio.Reader) *storage.Event {
	t.Helper()
	line, err := rd.ReadString('\n')
	if err != nil {
		t.Fatalf("reading a watch event: %v (got %q)", err, line)
	}
	return decodeEvent(t, line)
}

func (s *inproc) watchers() uint64 {
	s.t.Helper()
	resp, body := s.do("GET", "/v2/stats/store", "", "")
	s.expect(resp, body, http.StatusOK)
	var st storage.Stats
	if err := json.Unmarshal([]byte(body), &st); err != nil {
		s.t.Fatal(err)
	}
	return st.Watchers
}

func TestWatchOverHTTP(t *testing.T) {
	s := startInproc(t)
	resp, body := s.form("PUT", "/v2/keys/w/k", "value=0")
	s.expect(resp, body, http.StatusCreated)
	start := decodeEvent(t, body).Node.ModifiedIndex

	// One event: headers come at once, before any event.
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	wresp, err := s.client.Do(s.request(ctx, "GET", "/v2/keys/w/k?wait=true", "", ""))
	if err != nil {
		t.Fatal(err)
	}
	s.expect(wresp, "", http.StatusOK)
	if wresp.Header.Get("X-Etcd-Index") != strconv.FormatUint(start, 10) || wresp.Header.Get("X-Raft-Index") == "" ||
		len(wresp.TransferEncoding) == 0 || wresp.TransferEncoding[0] != "chunked" {
		t.Fatalf("watch headers: %v %v", wresp.Header, wresp.TransferEncoding)
	}
	resp, body = s.form("PUT", "/v2/keys/w/k", "value=1")
	s.expect(resp, body, http.StatusOK)
	all, err := io.ReadAll(wresp.Body)
	wresp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	if ev := decodeEvent(t, string(all)); ev.Action != "set" || *ev.Node.Value != "1" || strings.Count(string(all), "\n") != 1 {
		t.Fatalf("watch event: %q", all)
	}

	// A past waitIndex is answered from history at once.
	resp, body = s.do("GET", "/v2/keys/w/k?wait=true&waitIndex="+strconv.FormatUint(start, 10), "", "")
	s.expect(resp, body, http.StatusOK)
	if ev := decodeEvent(t, body); ev.Node.ModifiedIndex != start {
		t.Fatalf("historical watch: %s", body)
	}

	// Stream: every event, each flushed, on one response.
	sresp, err := s.client.Do(s.request(ctx, "GET", "/v2/keys/w?wait=true&recursive=true&stream=true", "", ""))
	if err != nil {
		t.Fatal(err)
	}
	rd := bufio.NewReader(sresp.Body)
	for i := 2; i <= 4; i++ {
		resp, body = s.form("PUT", "/v2/keys/w/k", fmt.Sprintf("value=%d", i))
		s.expect(resp, body, http.StatusOK)
		if ev := readEvent(t, rd); *ev.Node.Value != strconv.Itoa(i) {
			t.Fatalf("stream event %d: %+v", i, ev.Node)
		}
	}
	if got := s.watchers(); got != 1 {
		t.Fatalf("watchers = %d with one stream open", got)
	}
	// The client goes away: the watcher is removed.
	sresp.Body.Close()
	s.waitFor("the stream watcher to be removed", func() bool { return s.watchers() == 0 })

	// A long poll whose client gives up frees its watcher too.
	pctx, pcancel := context.WithCancel(context.Background())
	presp, err := s.client.Do(s.request(pctx, "GET", "/v2/keys/never?wait=true", "", ""))
	if err != nil {
		t.Fatal(err)
	}
	if got := s.watchers(); got != 1 {
		t.Fatalf("watchers = %d with one long poll open", got)
	}
	pcancel()
	presp.Body.Close()
	s.waitFor("the long-poll watcher to be removed", func() bool { return s.watchers() == 0 })

	// Watch errors: a bad parameter, a cleared history.
	resp, body = s.do("GET", "/v2/keys/w?wait=true&waitIndex=x", "", "")
	s.expectKeyError(resp, body, http.StatusBadRequest, storage.EcodeIndexNaN, `invalid value for "waitIndex"`)
}

func TestBadInputOverHTTP(t *testing.T) {
	s := startInproc(t)
	tests := []struct {
		name, method, path, body string
		status, code             int
		cause                    string
	}{
		{"ttl not a number", "PUT", "/v2/keys/a", "value=1&ttl=abc", 400, 202, `invalid value for "ttl"`},
		{"bad bool", "GET", "/v2/keys/a?recursive=maybe", "", 400, 209, `invalid value for "recursive"`},
		{"wait on PUT", "PUT", "/v2/keys/a?wait=true", "value=1", 400, 209, `"wait" can only be used with GET requests`},
		{"empty prevValue", "PUT", "/v2/keys/a?prevValue=", "value=1", 400, 201, `"prevValue" cannot be empty`},
		{"bad escape", "GET", "/v2/keys/a?x=%zz", "", 400, 210, `invalid URL escape "%zz"`},
		{"refresh without ttl", "PUT", "/v2/keys/a?refresh=true&prevExist=true", "", 400, 212, "No TTL value set"},
		{"invalid UTF-8 key", "PUT", "/v2/keys/u%ff", "value=1", 400, 209, "key is not valid UTF-8"},
		{"key too long", "PUT", "/v2/keys/" + strings.Repeat("k", maxKeyBytes+1), "value=1", 400, 209, "key is longer than 8192 bytes"},
		{"body too large", "PUT", "/v2/keys/big", "value=" + strings.Repeat("v", maxRequestBytes), 413, 210, causeBodyTooLarge},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, body := s.form(tt.method, tt.path, tt.body)
			e := s.expectKeyError(resp, body, tt.status, tt.code, tt.cause)
			if e.Index != 0 || resp.Header.Get("X-Etcd-Index") != "0" {
				t.Fatalf("a parameter error has index %d, header %q; want 0", e.Index, resp.Header.Get("X-Etcd-Index"))
			}
		})
	}
	// The store is intact after all of it.
	resp, body := s.form("PUT", "/v2/keys/after", "value=ok")
	s.expect(resp, body, http.StatusCreated)
}

func TestMethodsRedirectsAndCORSOverHTTP(t *testing.T) {
	s := startInproc(t)

	resp, body := s.do("PATCH", "/v2/keys/foo", "", "")
	s.expect(resp, body, http.StatusMethodNotAllowed)
	if resp.Header.Get("Allow") != "HEAD,GET,PUT,POST,DELETE" || body != "Method Not Allowed\n" ||
		resp.Header.Get("Content-Type") != "text/plain; charset=utf-8" || resp.Header.Get("X-Etcd-Cluster-Id") != "" {
		t.Fatalf("405: %v %q", resp.Header, body)
	}
	for path, allow := range map[string]string{
		"/v2/members": "GET,POST,DELETE,PUT", "/v2/machines": "GET,HEAD", "/v2/stats/store": "GET",
		"/v2/stats/self": "GET", "/v2/stats/leader": "GET", "/version": "GET", "/health": "GET",
	} {
		resp, body := s.do("PATCH", path, "", "")
		s.expect(resp, body, http.StatusMethodNotAllowed)
		if resp.Header.Get("Allow") != allow {
			t.Fatalf("PATCH %s: Allow %q, want %q", path, resp.Header.Get("Allow"), allow)
		}
	}

	for _, path := range []string{"/v2/keys/x", "/v2/members", "/v2/keys//x", "/health"} {
		resp, body := s.do("OPTIONS", path, "", "")
		s.expect(resp, body, http.StatusOK)
		if body != "" || resp.Header.Get("Content-Type") != "" {
			t.Fatalf("OPTIONS %s: %v %q", path, resp.Header, body)
		}
	}

	redirects := []struct{ method, path, location, body string }{
		{"GET", "/v2/keys//foo", "/v2/keys/foo", "<a href=\"/v2/keys/foo\">Moved Permanently</a>.\n\n"},
		{"GET", "/v2/keys/a/./b", "/v2/keys/a/b", "<a href=\"/v2/keys/a/b\">Moved Permanently</a>.\n\n"},
		{"GET", "/v2/keys/a/../b?x=1&y=%2F", "/v2/keys/b?x=1&y=%2F", "<a href=\"/v2/keys/b?x=1&amp;y=%2F\">Moved Permanently</a>.\n\n"},
		{"GET", "/v2/keys/a%2F%2Fb", "/v2/keys/a/b", "<a href=\"/v2/keys/a/b\">Moved Permanently</a>.\n\n"},
		{"GET", "/v2//keys/a", "/v2/keys/a", "<a href=\"/v2/keys/a\">Moved Permanently</a>.\n\n"},
		{"GET", "/v2/keys/..", "/v2", "<a href=\"/v2\">Moved Permanently</a>.\n\n"},
		{"PUT", "/v2/keys//foo", "/v2/keys/foo", ""},
		{"HEAD", "/v2/keys//foo", "/v2/keys/foo", ""},
	}
	for _, rd := range redirects {
		resp, body := s.do(rd.method, rd.path, "", "")
		s.expect(resp, body, http.StatusMovedPermanently)
		if resp.Header.Get("Location") != rd.location || body != rd.body {
			t.Fatalf("%s %s: Location %q body %q; want %q %q", rd.method, rd.path, resp.Header.Get("Location"), body, rd.location, rd.body)
		}
		wantCT := "text/html; charset=utf-8"
		if rd.method == "PUT" {
			wantCT = ""
		}
		if resp.Header.Get("Content-Type") != wantCT {
			t.Fatalf("%s %s: Content-Type %q", rd.method, rd.path, resp.Header.Get("Content-Type"))
		}
	}

	// %2F inside a key addresses the key with a slash in its path.
	resp, body = s.form("PUT", "/v2/keys/sl/x", "value=slash")
	s.expect(resp, body, http.StatusCreated)
	resp, body = s.do("GET", "/v2/keys/sl%2Fx", "", "")
	s.expect(resp, body, http.StatusOK)
	resp, body = s.do("GET", "/v2/keys/sl/x/", "", "")
	s.expect(resp, body, http.StatusOK)
}

// TestEtcdSharesASiteOverHTTP: the API, reverse_proxy /app/*, a
// static_response route and a file_server route in one site; paths that are not the API's are not
// touched (no CORS headers either).
func TestEtcdSharesASiteOverHTTP(t *testing.T) {
	s := startInproc(t)
	resp, body := s.do("GET", "/static", "", "")
	if resp.StatusCode != http.StatusOK || body != "static" || resp.Header.Get("Access-Control-Allow-Origin") != "" ||
		resp.Header.Get("Server") != "Caddy" {
		t.Fatalf("static_response: %d %q %v", resp.StatusCode, body, resp.Header)
	}
	resp, body = s.do("GET", "/app/x", "", "")
	if resp.StatusCode != http.StatusOK || body != "backend saw /app/x" {
		t.Fatalf("reverse_proxy: %d %q", resp.StatusCode, body)
	}
	resp, body = s.do("GET", "/hello.txt", "", "")
	if resp.StatusCode != http.StatusOK || body != "hello from file_server\n" {
		t.Fatalf("file_server: %d %q", resp.StatusCode, body)
	}
	// etcd's ServeMux owns /v2/: a path there that it does not serve is
	// its plain 404, with the CORS headers of every API response.
	resp, body = s.do("GET", "/v2/keysx", "", "")
	if resp.StatusCode != http.StatusNotFound || body != "404 page not found\n" ||
		resp.Header.Get("Access-Control-Allow-Origin") != "*" {
		t.Fatalf("/v2/keysx: %d %q %v", resp.StatusCode, body, resp.Header)
	}
	resp, body = s.form("PUT", "/v2/keys/site", "value=shared")
	s.expect(resp, body, http.StatusCreated)
}

func TestMembersStatsVersionHealthOverHTTP(t *testing.T) {
	s := startInproc(t)

	resp, body := s.do("GET", "/v2/members", "", "")
	s.expect(resp, body, http.StatusOK)
	var mc struct {
		Members []memberJSON `json:"members"`
	}
	if err := json.Unmarshal([]byte(body), &mc); err != nil || len(mc.Members) != 1 || !strings.HasSuffix(body, "\n") {
		t.Fatalf("members: %q %v", body, err)
	}
	self := mc.Members[0]
	// No advertise_client_urls: the URL the request came in on.
	if self.Name != "default" || len(self.ClientURLs) != 1 || self.ClientURLs[0] != s.base ||
		resp.Header.Get("X-Etcd-Cluster-Id") == "" {
		t.Fatalf("self: %+v %v", self, resp.Header)
	}

	resp, body = s.do("GET", "/v2/members/leader", "", "")
	s.expect(resp, body, http.StatusOK)
	var leader memberJSON
	if err := json.Unmarshal([]byte(body), &leader); err != nil || leader.ID != self.ID {
		t.Fatalf("leader: %q", body)
	}
	resp, body = s.do("GET", "/v2/members/xyz", "", "")
	s.expect(resp, body, http.StatusNotFound)
	if body != `{"message":"Not found"}` {
		t.Fatalf("members/xyz: %q", body)
	}

	resp, body = s.do("GET", "/v2/machines", "", "")
	s.expect(resp, body, http.StatusOK)
	if body != s.base || resp.Header.Get("Content-Type") != "text/plain; charset=utf-8" || resp.Header.Get("X-Etcd-Cluster-Id") != "" {
		t.Fatalf("machines: %q %v", body, resp.Header)
	}

	memberCalls := []struct {
		method, path, ctype, body string
		status                    int
		want                      string
	}{
		{"POST", "/v2/members", formType, "{}", 415, `{"message":"Bad Content-Type application/x-www-form-urlencoded, accept application/json"}`},
		{"POST", "/v2/members", "application/json; charset=utf-8", "{}", 400, `{"message":"no valid URLs given"}`},
		{"POST", "/v2/members", "application/json", `{"peerURLs":["not a url"]}`, 400, `{"message":"URL scheme must be http, https, unix, or unixs: not a url"}`},
		{"POST", "/v2/members", "application/json", `{bad`, 400, `{"message":"invalid character 'b' looking for beginning of object key string"}`},
		{"DELETE", "/v2/members/zzz", "", "", 404, `{"message":"No such member: zzz"}`},
		{"DELETE", "/v2/members/0012345", "", "", 404, `{"message":"No such member: 12345"}`},
		{"DELETE", "/v2/members", "", "", 405, "Method Not Allowed\n"},
		// Removing the only member would leave no voter: etcd 3.4 answers 500.
		{"DELETE", "/v2/members/" + self.ID, "", "", 500, `{"message":"Internal Server Error"}`},
		// Its own peer URLs again: a no-op change etcd accepts.
		{"PUT", "/v2/members/" + self.ID, "application/json", `{"peerURLs":["` + strings.Join(self.PeerURLs, `","`) + `"]}`, 204, ""},
		{"PUT", "/v2/members/1234", "application/json", `{"peerURLs":["http://1.2.3.4:5"]}`, 404, `{"message":"No such member: 1234"}`},
	}
	for _, c := range memberCalls {
		resp, body := s.do(c.method, c.path, c.ctype, c.body)
		s.expect(resp, body, c.status)
		if body != c.want {
			t.Fatalf("%s %s: %q, want %q", c.method, c.path, body, c.want)
		}
	}

	resp, body = s.do("GET", "/version", "", "")
	s.expect(resp, body, http.StatusOK)
	if body != `{"etcdserver":"3.4.23","etcdcluster":"3.4.0"}` || resp.Header.Get("Content-Type") != "application/json" {
		t.Fatalf("version: %q", body)
	}
	for _, path := range []string{"/health", "/health?serializable=true"} {
		resp, body = s.do("GET", path, "", "")
		s.expect(resp, body, http.StatusOK)
		if body != `{"health":"true"}` || resp.Header.Get("Content-Type") != "text/plain; charset=utf-8" {
			t.Fatalf("%s: %q %v", path, body, resp.Header)
		}
	}

	resp, body = s.do("GET", "/v2/stats/leader", "", "")
	s.expect(resp, body, http.StatusOK)
	if body != `{"leader":"`+self.ID+`","followers":{}}` {
		t.Fatalf("stats/leader: %q", body)
	}
	resp, body = s.do("GET", "/v2/stats/self", "", "")
	s.expect(resp, body, http.StatusOK)
	var ss raftkv.SelfStats
	if err := json.Unmarshal([]byte(body), &ss); err != nil || ss.ID != self.ID || ss.State != "StateLeader" || strings.HasSuffix(body, "\n") {
		t.Fatalf("stats/self: %q %v", body, err)
	}
	resp, body = s.do("GET", "/v2/stats/store", "", "")
	s.expect(resp, body, http.StatusOK)
	if !strings.HasPrefix(body, `{"getsSuccess":`) || !strings.HasSuffix(body, `"watchers":0}`) {
		t.Fatalf("stats/store: %q", body)
	}
}

// TestReloadKeepsMemberAndRefusesRename: a reload with the same data
// directory keeps the running node; one that renames the member fails and
// leaves the old config serving.
func TestReloadKeepsMemberAndRefusesRename(t *testing.T) {
	s := startInproc(t)
	resp, body := s.form("PUT", "/v2/keys/survivor", "value=1")
	s.expect(resp, body, http.StatusCreated)
	_, before := s.do("GET", "/v2/stats/self", "", "")

	port := s.port
	webRoot := t.TempDir()
	caddyDir := t.TempDir()
	if err := caddy.Load(inprocConfig(port, s.dataDir, webRoot, caddyDir, "default", "reloaded", s.upstream), false); err != nil {
		t.Fatalf("reload: %v", err)
	}
	// The old server closes its idle connections, and the listener swap may reset one
	// made meanwhile: the first look tries again on a transport error.
	static := s.getAfterReload("the reloaded config to answer", "/static", func(int, string) bool { return true })
	if static != "reloaded" {
		t.Fatalf("the reload did not take: %q", static)
	}
	resp, body = s.do("GET", "/v2/keys/survivor", "", "")
	s.expect(resp, body, http.StatusOK)
	_, after := s.do("GET", "/v2/stats/self", "", "")
	var a, b raftkv.SelfStats
	_ = json.Unmarshal([]byte(before), &b)
	_ = json.Unmarshal([]byte(after), &a)
	if !a.StartTime.Equal(b.StartTime) || a.ID != b.ID {
		t.Fatalf("the node restarted on reload: %s -> %s", before, after)
	}
	if n, _ := members.References(s.dataDir); n != 1 {
		t.Fatalf("references after reload = %d, want 1", n)
	}

	err := caddy.Load(inprocConfig(port, s.dataDir, webRoot, caddyDir, "renamed", "renamed", s.upstream), false)
	if err == nil || !strings.Contains(err.Error(), "cannot be renamed") {
		t.Fatalf("rename by reload: %v", err)
	}
	// Another data directory: the new config's member would be another
	// one (a new cluster in an empty directory), the running one would
	// stop. So would a rename with data_dir left to its default, which
	// follows the name.
	moved := filepath.Join(t.TempDir(), "moved")
	for _, dir := range []string{moved, ""} {
		err = caddy.Load(inprocConfig(port, dir, webRoot, caddyDir, "other", "moved", s.upstream), false)
		if err == nil || !strings.Contains(err.Error(), "a reload cannot move it") {
			t.Fatalf("data_dir %q by reload: %v", dir, err)
		}
	}
	if _, err := os.Stat(moved); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("the refused load made %s: %v", moved, err)
	}
	if _, body := s.do("GET", "/static", "", ""); body != "reloaded" {
		t.Fatalf("the old config stopped serving: %q", body)
	}
	resp, body = s.do("GET", "/v2/keys/survivor", "", "")
	s.expect(resp, body, http.StatusOK)
}

// TestReloadRolledBackKeepsSettings: a reload that Caddy rolls back (an app
// fails to start after raftkv started: here the HTTP app, on a port taken)
// leaves the member with the settings of the config that stays, not the
// client URLs the refused config advertised. Caddy starts apps in map
// order, so the load is tried until raftkv has started first (about one in
// two tries).
func TestReloadRolledBackKeepsSettings(t *testing.T) {
	s := startInproc(t)
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	var cfg map[string]any
	if err := json.Unmarshal(inprocConfig(s.port, s.dataDir, t.TempDir(), t.TempDir(), "default", "refused", s.upstream), &cfg); err != nil {
		t.Fatal(err)
	}
	apps := cfg["apps"].(map[string]any)
	apps["raftkv"].(map[string]any)["advertise_client_urls"] = []string{"http://refused.example:2379"}
	servers := apps["http"].(map[string]any)["servers"].(map[string]any)
	servers["taken"] = map[string]any{"listen": []string{taken.Addr().String()}, "automatic_https": map[string]any{"disable": true}}
	refused, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}

	want := `[{"id":"` // the member's own URL is the request's: its config sets none
	for try := 0; try < 40; try++ {
		if err := caddy.Load(refused, false); err == nil || !strings.Contains(err.Error(), "address already in use") {
			t.Fatalf("load with a port taken: %v", err)
		}
		// The refused config's listener on the same port closed: a
		// connection made to it meanwhile is reset (README, Reloads).
		body := s.getAfterReload("an answer from the running config", "/v2/members", func(st int, _ string) bool { return st == http.StatusOK })
		if !strings.HasPrefix(body, `{"members":`+want) || !strings.Contains(body, `"clientURLs":["`+s.base+`"]`) {
			t.Fatalf("try %d: after the rolled-back reload, /v2/members = %s, want the client URL %s", try, body, s.base)
		}
	}
	if _, body := s.do("GET", "/static", "", ""); body != "static" {
		t.Fatalf("the running config stopped serving: %q", body)
	}
}

// memberOf is a member around a node that no config made.
func memberOf(n *raftkv.Node) *member {
	m := &member{}
	m.node.Store(n)
	return m
}

// TestNotRunningAnswers503 serves from a member whose node stopped before
// it ran (its start failed, say).
func TestNotRunningAnswers503(t *testing.T) {
	n := raftkv.NewNode(raftkv.Config{DataDir: t.TempDir()})
	if err := n.Stop(); err != nil {
		t.Fatal(err)
	}
	h := &Handler{member: memberOf(n), timeout: time.Second}
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		w.WriteHeader(http.StatusTeapot)
		return nil
	})
	tests := []struct {
		method, path string
		status       int
		body         string
	}{
		{"GET", "/v2/keys/a", 503, `{"errorCode":300,"message":"Raft Internal Error","cause":"etcdserver: server stopped","index":0}` + "\n"},
		{"PUT", "/v2/keys/a", 503, `{"errorCode":300,"message":"Raft Internal Error","cause":"etcdserver: server stopped","index":0}` + "\n"},
		{"GET", "/v2/members", 503, `{"message":"etcdserver: server stopped"}`},
		{"GET", "/v2/stats/self", 503, `{"message":"etcdserver: server stopped"}`},
		{"GET", "/health", 503, `{"health":"false"}` + "\n"},
		{"GET", "/version", 200, versionBody},
		{"PATCH", "/v2/keys/a", 405, "Method Not Allowed\n"},
		{"GET", "/elsewhere", http.StatusTeapot, ""},
	}
	for _, tt := range tests {
		rec := httptest.NewRecorder()
		if err := h.ServeHTTP(rec, httptest.NewRequest(tt.method, tt.path, nil), next); err != nil {
			t.Fatalf("%s %s: %v", tt.method, tt.path, err)
		}
		if rec.Code != tt.status || rec.Body.String() != tt.body {
			t.Errorf("%s %s: %d %q, want %d %q", tt.method, tt.path, rec.Code, rec.Body.String(), tt.status, tt.body)
		}
	}
}

// TestRequestsWaitForTheMemberToStart: Caddy starts its apps in no set
// order, so the HTTP server may serve before the raftkv app has started the
// member: its requests wait until the member is ready, as etcd's wait until
// it has published itself, instead of a 503 "server stopped" that clients
// such as python-etcd raise; /health and /version answer at once.
func TestRequestsWaitForTheMemberToStart(t *testing.T) {
	n := raftkv.NewNode(raftkv.Config{DataDir: t.TempDir(), HeartbeatInterval: 10 * time.Millisecond, ElectionTimeout: 100 * time.Millisecond})
	t.Cleanup(func() { _ = n.Stop() })
	h := &Handler{member: memberOf(n), timeout: 10 * time.Second}
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error { return nil })
	serve := func(method, target string) *httptest.ResponseRecorder {
		rec := httptest.NewRecorder()
		if err := h.ServeHTTP(rec, httptest.NewRequest(method, target, nil), next); err != nil {
			t.Errorf("%s %s: %v", method, target, err)
		}
		return rec
	}
	if rec := serve("GET", "/health"); rec.Code != http.StatusServiceUnavailable {
		t.Fatalf("/health before the start: %d", rec.Code)
	}
	answers := make(chan *httptest.ResponseRecorder, 2)
	go func() { answers <- serve("GET", "/v2/keys/?recursive=true") }()
	go func() { answers <- serve("GET", "/v2/members") }()
	select {
	case rec := <-answers:
		t.Fatalf("answered before the member started: %d %s", rec.Code, rec.Body)
	case <-time.After(200 * time.Millisecond):
	}
	if err := n.Start(); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		select {
		case rec := <-answers:
			if rec.Code != http.StatusOK {
				t.Fatalf("once started: %d %s", rec.Code, rec.Body)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("requests still wait for a member that started")
		}
	}
}

// TestEtcdAloneRunsADefaultMember: a config with the handler and no raftkv
// app gets a working member named "default" under Caddy's data directory.
func TestEtcdAloneRunsADefaultMember(t *testing.T) {
	s := startInprocNamed(t, "")
	resp, body := s.form("PUT", "/v2/keys/alone", "value=1")
	s.expect(resp, body, http.StatusCreated)
	if _, err := os.Stat(filepath.Join(s.dataDir, "member.db")); err != nil {
		t.Fatalf("no member.db in the default data directory: %v", err)
	}
	resp, body = s.do("GET", "/v2/members", "", "")
	s.expect(resp, body, http.StatusOK)
	if !strings.Contains(body, `"name":"default"`) {
		t.Fatalf("members: %s", body)
	}
}

// TestWatchesOutliveReloadsAndEndAtExit opens a long-poll watch and a stream watch on a real
// Caddy, reloads its config (the server they run on is replaced), then stops Caddy (SIGTERM).
// A reload leaves them be: the member goes on, and both get the next event. Caddy waits for
// every response before it exits; at exit the watches must end, as etcd's do when it stops,
// or the process stays until their clients go away.
func TestWatchesOutliveReloadsAndEndAtExit(t *testing.T) {
	p := startEtcaddy(t, etcaddyOpts{})
	type ended struct {
		status int
		body   string
		err    error
	}
	watch := func(path string) <-chan ended {
		out := make(chan ended, 1)
		go func() {
			// The context only bounds a failing run; a passing one ends long before.
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			st, _, body, err := p.tryDo(ctx, "GET", path, nil)
			out <- ended{st, string(body), err}
		}()
		return out
	}
	longPoll := watch("/v2/keys/exit/key?wait=true")
	stream := watch("/v2/keys/exit?wait=true&stream=true&recursive=true")
	var st struct {
		Watchers int `json:"watchers"`
	}
	if !poll(10*time.Second, func() bool {
		_, _, body := p.do(t, "GET", "/v2/stats/store", nil)
		return json.Unmarshal(body, &st) == nil && st.Watchers == 2
	}) {
		t.Fatalf("watchers = %d, want the 2 watches registered", st.Watchers)
	}

	// A reload that adds a site: every server is replaced.
	cfg := reloadCaddyfileText(t, p) + fmt.Sprintf("\nhttp://127.0.0.1:%d {\n\trespond \"other\"\n}\n", freePort(t))
	if status, body, err := reloadLoad(&http.Client{Timeout: time.Minute}, p.AdminURL, cfg); err != nil || status != http.StatusOK {
		t.Fatalf("POST /load: %d %s %v", status, body, err)
	}
	// On a new connection: the replaced server closes the kept-alive ones.
	fresh := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: time.Minute}
	put := func() (*http.Response, error) {
		req, err := http.NewRequest("PUT", p.ClientURL+"/v2/keys/exit/key?value=after+the+reload", nil)
		if err != nil {
			t.Fatal(err)
		}
		return fresh.Do(req)
	}
	resp, err := put()
	if err != nil {
		// A connection the kernel queued on the replaced server's socket
		// can be closed unread (Caddy's SO_REUSEPORT, see reloadClassify):
		// sent again once the key is seen absent, so it is written once.
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		st, _, _, gerr := p.tryDo(ctx, "GET", "/v2/keys/exit/key", nil)
		cancel()
		if gerr != nil || st != http.StatusNotFound {
			t.Fatalf("PUT after the reload: %v; the key then: %d %v", err, st, gerr)
		}
		if resp, err = put(); err != nil {
			t.Fatal(err)
		}
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("PUT after the reload: %s", resp.Status)
	}
	if e := <-longPoll; e.err != nil || e.status != http.StatusOK || !strings.Contains(e.body, `"value":"after the reload"`) {
		t.Errorf("long-poll watch across a reload: %d %q %v; want the event", e.status, e.body, e.err)
	}

	if !p.signal(syscall.SIGTERM, 20*time.Second) {
		t.Fatal("Caddy still runs 20s after SIGTERM with a stream watch open")
	}
	// etcd's exit cuts its watches' connections: the client sees a broken response
	// (and moves on to another member), not a complete one.
	e := <-stream
	if e.err == nil || !errors.Is(e.err, io.ErrUnexpectedEOF) || e.status != http.StatusOK ||
		strings.Count(e.body, "\n") != 1 || !strings.Contains(e.body, `"value":"after the reload"`) {
		t.Errorf("stream watch across a reload, then exit: %d %q %v; want the one event, then a cut connection", e.status, e.body, e.err)
	}
}

// TestHalfClosedClientGetsItsAnswer: a client that closes its side of the connection once
// its request is sent (nc -N, some proxies) still reads the answer, as from etcd, whose
// handlers wait for Raft on a context of their own. net/http ends the request's context
// when it reads the end of the connection: a write that waited on it answered 500 "request
// timed out" and landed all the same.
func TestHalfClosedClientGetsItsAnswer(t *testing.T) {
	s := startInproc(t)
	resp, body := s.form("PUT", "/v2/keys/cas", "value=old")
	s.expect(resp, body, http.StatusCreated)
	tests := []struct {
		method, target, body string
		status               int
	}{
		{"PUT", "/v2/keys/half", "value=1", http.StatusCreated},
		{"POST", "/v2/keys/queue", "value=job", http.StatusCreated},
		{"PUT", "/v2/keys/cas?prevValue=old", "value=new", http.StatusOK},
		{"PUT", "/v2/keys/cas?prevValue=old", "value=newer", http.StatusPreconditionFailed},
		{"DELETE", "/v2/keys/half", "", http.StatusOK},
		{"GET", "/v2/keys/cas?quorum=true", "", http.StatusOK},
	}
	for _, tt := range tests {
		conn, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", s.port))
		if err != nil {
			t.Fatal(err)
		}
		req := fmt.Sprintf("%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n", tt.method, tt.target)
		if tt.body != "" {
			req += fmt.Sprintf("Content-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n", len(tt.body))
		}
		req += "\r\n" + tt.body
		if _, err := io.WriteString(conn, req); err != nil {
			t.Fatal(err)
		}
		if err := conn.(*net.TCPConn).CloseWrite(); err != nil {
			t.Fatal(err)
		}
		_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatalf("%s %s: %v", tt.method, tt.target, err)
		}
		b, _ := io.ReadAll(resp.Body)
		conn.Close()
		if resp.StatusCode != tt.status {
			t.Errorf("%s %s, half-closed: %d %s, want %d", tt.method, tt.target, resp.StatusCode, b, tt.status)
		}
	}
	resp, body = s.do("GET", "/v2/keys/cas", "", "")
	if ev := decodeEvent(t, body); resp.StatusCode != http.StatusOK || ev.Node.Value == nil || *ev.Node.Value != "new" {
		t.Fatalf("after the half-closed CAS: %d %s", resp.StatusCode, body)
	}
}

// TestMembersWithoutHostHeader: a member without advertise_client_urls lists the URL a
// request came in on; an HTTP/1.0 request without a Host header gets the address it was
// sent to, not "http://".
func TestMembersWithoutHostHeader(t *testing.T) {
	s := startInproc(t)
	conn, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", s.port))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := io.WriteString(conn, "GET /v2/machines HTTP/1.0\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	if want := fmt.Sprintf("http://127.0.0.1:%d", s.port); resp.StatusCode != http.StatusOK || string(b) != want {
		t.Fatalf("/v2/machines without a Host header: %d %q, want %q", resp.StatusCode, b, want)
	}
}

// TestWatchUnderEncode: a site with `encode` before `etcd` (compression for
// its other routes): a watch's headers still go out at once, before any
// event, and its events are not compressed, as etcd sends them. Caddy's
// encoder holds headers back until the first body write.
func TestWatchUnderEncode(t *testing.T) {
	s := startInproc(t)
	var cfg map[string]any
	if err := json.Unmarshal(s.config, &cfg); err != nil {
		t.Fatal(err)
	}
	srv := cfg["apps"].(map[string]any)["http"].(map[string]any)["servers"].(map[string]any)["test"].(map[string]any)
	encode := map[string]any{"handle": []any{map[string]any{"handler": "encode", "encodings": map[string]any{"gzip": map[string]any{}}}}}
	srv["routes"] = append([]any{encode}, srv["routes"].([]any)...)
	b, err := json.Marshal(cfg)
	b = bytes.Replace(b, []byte(`"body":"static"`), []byte(`"body":"encoded"`), 1)
	if err != nil {
		t.Fatal(err)
	}
	if err := caddy.Load(b, false); err != nil {
		t.Fatalf("reload with encode: %v", err)
	}
	s.getAfterReload("the config with encode", "/static", func(_ int, body string) bool { return body == "encoded" })

	for i, q := range []string{"wait=true", "wait=true&stream=true"} {
		key := fmt.Sprintf("/v2/keys/enc%d", i)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		req := s.request(ctx, "GET", key+"?"+q, "", "")
		req.Header.Set("Accept-Encoding", "gzip")
		headers := make(chan error, 1)
		var resp *http.Response
		go func() {
			var err error
			resp, err = s.client.Do(req)
			headers <- err
		}()
		// No event yet: the headers alone must arrive.
		select {
		case err := <-headers:
			if err != nil {
				t.Fatalf("%s: %v", q, err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("%s: no headers within 5s of a watch with no event yet", q)
		}
		if ce := resp.Header.Get("Content-Encoding"); ce != "" || resp.Header.Get("X-Etcd-Index") == "" {
			t.Fatalf("%s: headers %v", q, resp.Header)
		}
		r, body := s.form("PUT", key, "value=v")
		s.expect(r, body, http.StatusCreated)
		line, err := bufio.NewReader(resp.Body).ReadString('\n')
		if err != nil || !strings.HasPrefix(line, `{"action":"set"`) {
			t.Fatalf("%s: first event %q, %v", q, line, err)
		}
		resp.Body.Close()
		cancel()
	}
}

// TestLostQuorumAnswersAsEtcd: a member whose cluster lost its quorum (a
// second member added that never starts) answers as etcd 3.4 does: HEAD
// with quorum=true reads locally (only GET becomes a quorum read); adding
// a member fails the strict check, with etcd's bare 500, before its peer
// URL is found in use; an auth write that times out gets etcd's bare 500.
func TestLostQuorumAnswersAsEtcd(t *testing.T) {
	s := startInproc(t)
	r, body := s.form("PUT", "/v2/keys/q", "value=1")
	s.expect(r, body, http.StatusCreated)
	const add = `{"peerURLs":["http://127.0.0.1:29999"]}`
	r, body = s.do("POST", "/v2/members", "application/json", add)
	s.wantStatus(r, body, http.StatusCreated)

	start := time.Now()
	r, body = s.do("HEAD", "/v2/keys/q?quorum=true", "", "")
	s.wantStatus(r, body, http.StatusOK)
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("HEAD ?quorum=true took %v: it waited for a quorum", d)
	}
	r, body = s.do("POST", "/v2/members", "application/json", add)
	s.wantStatus(r, body, http.StatusInternalServerError)
	if body != `{"message":"Internal Server Error"}` {
		t.Fatalf("second add of the same peer URL: %q", body)
	}
	r, body = s.asUser("", "PUT", "/v2/auth/users/x", `{"user":"x","password":"p"}`)
	s.wantStatus(r, body, http.StatusInternalServerError)
	if body != `{"message":"Internal Server Error"}` {
		t.Fatalf("auth write without a quorum: %q", body)
	}
	// Turning auth on starts with a quorum read of the root user, where any
	// failure is etcd's 409; turning it off when it is off is answered from
	// the local view, at once.
	r, body = s.asUser("", "PUT", "/v2/auth/enable", "")
	s.wantStatus(r, body, http.StatusConflict)
	if body != `{"message":"auth: No root user available, please create one"}` {
		t.Fatalf("auth enable without a quorum: %q", body)
	}
	start = time.Now()
	r, body = s.asUser("", "DELETE", "/v2/auth/enable", "")
	s.wantStatus(r, body, http.StatusConflict)
	if body != `{"message":"auth: already disabled"}` {
		t.Fatalf("auth disable without a quorum: %q", body)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("auth disable took %v: it waited for a quorum", d)
	}
}
