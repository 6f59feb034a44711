package caddymodule

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptrace"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// reloadCaddyfile is a member whose site has a route beside the etcd
// handler, so each reload can change something a client sees. route keeps
// the handler order as written: /ping answers, anything else goes to etcd.
const reloadCaddyfile = `{
	admin 127.0.0.1:{admin_port}
	raftkv {
		data_dir {data_dir}
	}
}

http://127.0.0.1:{client_port} {
	route {
		respond /ping "pong 0"
		etcd
	}
}
`

const (
	reloadWriters = 8
	reloadLoads   = 20
)

// reloadReplayable marks the writers' PUTs as safe to replay, so Go's
// transport resends one that went out on a kept-alive connection the
// replaced server closed before reading it. Each reload gracefully shuts
// down the old HTTP server, and Go's Server.Shutdown closes connections
// that are idle between two requests: a client that has just written its
// next request on such a connection reads EOF or a reset. Go's client
// replays idempotent requests in that case and nothing else; a v2 set of a
// fixed value is idempotent, and Idempotency-Key is how a client says so.
// Without it this test sees a few percent of writes fail with EOF on every
// run, from Caddy and net/http rather than from etcaddy. The other loss a
// reload causes below the handler, on new connections, is sorted out by
// reloadClassify.
var reloadReplayable = http.Header{"Idempotency-Key": {"etcaddy-reload-test"}}

// reloadFailure is a write that got no acknowledgement.
type reloadFailure struct {
	writer int
	key    string
	at     time.Time
	status int  // 0: no answer
	reused bool // the last attempt went out on a kept-alive connection, not a new one
	err    error
}

// reloadClassify fails the test for every failed write but one kind, and
// returns how many of that kind there were: a new connection reset before
// the server read the request. Caddy binds each config's listener anew with
// SO_REUSEPORT, so during a reload the kernel spreads new connections over
// the old and the new socket; closing the old one resets the connections
// still queued on it unless net.ipv4.tcp_migrate_req is 1. That loss is
// Caddy's and the kernel's, and it cannot have touched the member: the key
// is checked to be absent. Anything else — an error status, a timeout, a
// write applied but not acknowledged — is the member's, and fails.
func reloadClassify(t *testing.T, c *http.Client, baseURL string, failures []reloadFailure, acked int64) int {
	t.Helper()
	dropped := 0
	var bad []string
	for _, f := range failures {
		reset := errors.Is(f.err, io.EOF) || errors.Is(f.err, io.ErrUnexpectedEOF) || errors.Is(f.err, syscall.ECONNRESET)
		if f.status == 0 && !f.reused && reset {
			status, _, body := crashGet(t, c, baseURL, "/v2/keys"+f.key)
			if status == http.StatusNotFound {
				dropped++
				continue
			}
			bad = append(bad, fmt.Sprintf("writer %d at %s: %v, but GET %s answers %d %s: a reload cut a request the member had taken",
				f.writer, f.at.Format("15:04:05.000"), f.err, f.key, status, crashShort(body)))
			continue
		}
		bad = append(bad, fmt.Sprintf("writer %d at %s (status %d, kept-alive connection %t): %v",
			f.writer, f.at.Format("15:04:05.000"), f.status, f.reused, f.err))
	}
	if len(bad) > 0 {
		if len(bad) > 10 {
			bad = append(bad[:10], fmt.Sprintf("… and %d more", len(bad)-10))
		}
		t.Errorf("%d of %d writes failed across %d reloads:\n%s", len(failures)-dropped, acked+int64(len(failures)), reloadLoads, strings.Join(bad, "\n"))
	}
	return dropped
}

// reloadCaddyfileText returns the Caddyfile the member runs, with the
// placeholders already replaced. proc.Caddyfile is the file's path; its
// text is accepted too so this does not depend on which one the harness keeps.
func reloadCaddyfileText(t testing.TB, p *proc) string {
	t.Helper()
	if b, err := os.ReadFile(p.Caddyfile); err == nil {
		return string(b)
	}
	if strings.Contains(p.Caddyfile, "{") {
		return p.Caddyfile
	}
	t.Fatalf("cannot read the member's Caddyfile %q", p.Caddyfile)
	return ""
}

// reloadCaddyfilePath returns a path to the member's Caddyfile.
func reloadCaddyfilePath(t testing.TB, p *proc) string {
	t.Helper()
	if _, err := os.Stat(p.Caddyfile); err == nil {
		return p.Caddyfile
	}
	path := filepath.Join(t.TempDir(), "Caddyfile")
	if err := os.WriteFile(path, []byte(reloadCaddyfileText(t, p)), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// reloadLoad posts a Caddyfile to the admin API's /load, as `caddy reload`
// does, and returns the status and body.
func reloadLoad(c *http.Client, adminURL, caddyfile string) (int, string, error) {
	req, err := http.NewRequest(http.MethodPost, adminURL+"/load", strings.NewReader(caddyfile))
	if err != nil {
		return 0, "", err
	}
	req.Header.Set("Content-Type", "text/caddyfile")
	resp, err := c.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, crashShort(body), nil
}

// reloadStartTime returns the member's startTime from /v2/stats/self, or ""
// when the member does not report one: a new start time means a new node.
func reloadStartTime(t testing.TB, c *http.Client, baseURL string) string {
	t.Helper()
	status, _, body := crashGet(t, c, baseURL, "/v2/stats/self")
	if status != http.StatusOK {
		return ""
	}
	var self struct {
		StartTime string `json:"startTime"`
	}
	if json.Unmarshal(body, &self) != nil {
		return ""
	}
	return self.StartTime
}

// TestReloadUnderWriteLoadKeepsNode reloads the config 20 times through the
// admin API while 8 clients write, each reload changing a route. A reload
// rebuilds every Caddy app, but the Raft node and its bbolt file must carry
// over (they live in a UsagePool keyed by data directory): no write may
// fail, none may be lost, and the index must go on from where it was. The
// only losses forgiven are the connection-level ones Caddy's listener
// handover causes before a request reaches the member (reloadReplayable,
// reloadClassify); the test logs how many there were.
func TestReloadUnderWriteLoadKeepsNode(t *testing.T) {
	p := startEtcaddy(t, etcaddyOpts{Caddyfile: reloadCaddyfile})
	base := reloadCaddyfileText(t, p)
	if !strings.Contains(base, `"pong 0"`) {
		t.Fatalf("the member's Caddyfile has no pong route:\n%s", base)
	}
	c := crashClient(reloadWriters + 2)
	defer c.CloseIdleConnections()
	admin := &http.Client{Timeout: 60 * time.Second}

	_, first, err := crashPut(context.Background(), c, p.ClientURL, "/reload/first", "first")
	if err != nil {
		t.Fatalf("first write: %v", err)
	}
	startTime := reloadStartTime(t, c, p.ClientURL)

	type ack struct {
		key string
		crashAck
	}
	var (
		mu       sync.Mutex
		acks     = make([][]ack, reloadWriters)
		failures []reloadFailure
		failed   atomic.Int64
		total    atomic.Int64
		resent   atomic.Int64
		stop     atomic.Bool
		wg       sync.WaitGroup
	)
	for w := 0; w < reloadWriters; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for seq := 0; !stop.Load(); seq++ {
				key := fmt.Sprintf("/reload/w%d-%07d", w, seq)
				value := fmt.Sprintf("w%d/%d", w, seq)
				// The transport may call these hooks from its dialing
				// goroutine: atomics.
				var attempts atomic.Int32
				var reused atomic.Bool
				ctx := httptrace.WithClientTrace(context.Background(), &httptrace.ClientTrace{
					ConnectStart: func(string, string) { reused.Store(false) },
					GotConn: func(i httptrace.GotConnInfo) {
						attempts.Add(1)
						reused.Store(i.Reused)
					},
				})
				status, node, err := crashPutHeader(ctx, c, p.ClientURL, key, value, reloadReplayable)
				if attempts.Load() > 1 {
					resent.Add(1)
				}
				if err == nil && (node.Key != key || node.Value != value || node.ModifiedIndex == 0) {
					err = fmt.Errorf("PUT %s = %q answered node %+v", key, value, node)
				}
				if err != nil {
					failed.Add(1)
					mu.Lock()
					failures = append(failures, reloadFailure{
						writer: w, key: key, at: time.Now(), status: status, reused: reused.Load(), err: err,
					})
					mu.Unlock()
					continue
				}
				// Only this goroutine touches acks[w].
				acks[w] = append(acks[w], ack{key, crashAck{Value: value, Index: node.ModifiedIndex}})
				total.Add(1)
			}
		}()
	}
	defer func() {
		stop.Store(true)
		wg.Wait()
	}()

	// waitWrites polls until n more writes than before were acknowledged, so
	// every config in the sequence serves writes before the next replaces it.
	waitWrites := func(what string, n int64) {
		t.Helper()
		target := total.Load() + n
		if !poll(30*time.Second, func() bool { return total.Load() >= target }) {
			mu.Lock()
			defer mu.Unlock()
			var last error
			if len(failures) > 0 {
				last = failures[len(failures)-1].err
			}
			t.Fatalf("%s: writes stalled at %d acknowledged, %d failed; last failure: %v", what, total.Load(), failed.Load(), last)
		}
	}
	waitWrites("before the first reload", reloadWriters)
	for i := 1; i <= reloadLoads; i++ {
		cfg := strings.Replace(base, `"pong 0"`, fmt.Sprintf(`"pong %d"`, i), 1)
		status, body, err := reloadLoad(admin, p.AdminURL, cfg)
		if err != nil {
			t.Fatalf("POST /load #%d: %v", i, err)
		}
		if status != http.StatusOK {
			t.Fatalf("POST /load #%d: %d %s", i, status, body)
		}
		waitWrites(fmt.Sprintf("after reload #%d", i), reloadWriters)
	}
	stop.Store(true)
	wg.Wait()

	dropped := reloadClassify(t, c, p.ClientURL, failures, total.Load())

	// The index went on: every acknowledged write got its own index, above
	// the one before the reloads, rising for each writer. A node rebuilt
	// from scratch or a write applied twice would break one of these.
	acked := map[string]crashAck{"/reload/first": {Value: "first", Index: first.ModifiedIndex}}
	owner := make(map[uint64]string)
	highest := first.ModifiedIndex
	for w, list := range acks {
		var prev uint64
		for _, a := range list {
			if a.Index <= first.ModifiedIndex {
				t.Errorf("writer %d: %s got index %d, not above %d from before the reloads", w, a.key, a.Index, first.ModifiedIndex)
			}
			if a.Index <= prev {
				t.Errorf("writer %d: %s got index %d after %d", w, a.key, a.Index, prev)
			}
			if other, dup := owner[a.Index]; dup {
				t.Errorf("index %d acknowledged for both %s and %s", a.Index, other, a.key)
			}
			owner[a.Index] = a.key
			prev = a.Index
			acked[a.key] = a.crashAck
			highest = max(highest, a.Index)
		}
	}
	crashVerifyAcked(t, c, p.ClientURL, "/reload", acked, highest)
	t.Logf("%d writes acknowledged across %d reloads, index %d → %d; %d resent by the client after the replaced server closed their kept-alive connection; %d new connections reset in the listener handover",
		len(acked), reloadLoads, first.ModifiedIndex, highest, resent.Load(), dropped)

	switch st := reloadStartTime(t, c, p.ClientURL); {
	case startTime == "":
		t.Log("/v2/stats/self reports no startTime: node identity across reloads not checked by it")
	case st != startTime:
		t.Errorf("/v2/stats/self startTime changed from %s to %s: the node was restarted by a reload", startTime, st)
	}

	// A fresh connection, so the answer comes from the config now running.
	fresh := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 10 * time.Second}
	status, _, body := crashGet(t, fresh, p.ClientURL, "/ping")
	if want := fmt.Sprintf("pong %d", reloadLoads); status != http.StatusOK || string(body) != want {
		t.Errorf("GET /ping after the last reload = %d %q, want 200 %q", status, body, want)
	}
}

// TestValidateWhileRunning runs `caddy validate` on the running member's own
// Caddyfile. validate provisions every module in a second process; if
// Provision opened the bbolt file it would wait on the running member's
// lock, so validate must finish, and succeed, while the member runs.
func TestValidateWhileRunning(t *testing.T) {
	p := startEtcaddy(t, etcaddyOpts{})
	c := crashClient(1)
	defer c.CloseIdleConnections()
	if _, _, err := crashPut(context.Background(), c, p.ClientURL, "/validate/before", "x"); err != nil {
		t.Fatalf("write before validate: %v", err)
	}

	const deadline = 60 * time.Second
	ctx, cancel := context.WithTimeout(context.Background(), deadline)
	defer cancel()
	cmd := exec.CommandContext(ctx, caddyBin, "validate", "--config", reloadCaddyfilePath(t, p), "--adapter", "caddyfile")
	if p.Cmd != nil {
		// The same environment (HOME, XDG dirs) as the member, so validate
		// resolves the same default paths.
		cmd.Env = p.Cmd.Env
		cmd.Dir = p.Cmd.Dir
	}
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	cmd.WaitDelay = 5 * time.Second
	err := cmd.Run()
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		t.Fatalf("caddy validate did not finish within %v while the member runs (is Provision waiting on the bbolt lock?):\n%s", deadline, out.String())
	}
	if err != nil {
		t.Fatalf("caddy validate: %v\n%s", err, out.String())
	}

	if _, _, err := crashPut(context.Background(), c, p.ClientURL, "/validate/after", "x"); err != nil {
		t.Fatalf("write after validate: %v", err)
	}
}
