package caddymodule

// The end-to-end harness: real processes on 127.0.0.1 — the Caddy binary with etcaddy compiled
// in, and the real etcd 3.4 as the reference — each started on ports from :0 with its own
// temporary directories, stopped by PID in t.Cleanup, its log dumped when the test fails.

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Absolute paths of the programs the end-to-end tests run, set by TestMain.
var caddyBin, etcdBin, etcdctlBin, pythonBin string

// TestMain finds etcd, etcdctl, a Python with python-etcd, and a Caddy binary with etcaddy
// compiled in: the one $ETCADDY_CADDY_BIN names (./xcaddy.sh test sets it), else one built
// now with ../xcaddy.sh build into a temporary directory. A missing program fails the run:
// the end-to-end tests compare against the real etcd and are never skipped.
func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	var err error
	if etcdBin, err = lookAbs("etcd"); err != nil {
		fmt.Fprintf(os.Stderr, "etcd (3.4, the reference server) is not on PATH: %v\n"+
			"install Debian's etcd-server (./xcaddy.sh test does)\n", err)
		return 1
	}
	if etcdctlBin, err = lookAbs("etcdctl"); err != nil {
		fmt.Fprintf(os.Stderr, "etcdctl is not on PATH: %v\n"+
			"install Debian's etcd-client (./xcaddy.sh test does)\n", err)
		return 1
	}
	if pythonBin, err = findPythonEtcd(); err != nil {
		fmt.Fprintf(os.Stderr, "%v\ninstall Debian's python3-etcd (./xcaddy.sh test does)\n", err)
		return 1
	}
	if bin := os.Getenv("ETCADDY_CADDY_BIN"); bin != "" {
		if caddyBin, err = filepath.Abs(bin); err == nil {
			_, err = os.Stat(caddyBin)
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "ETCADDY_CADDY_BIN=%s: %v\n", bin, err)
			return 1
		}
	} else {
		dir, err := os.MkdirTemp("", "etcaddy-caddy-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		caddyBin = filepath.Join(dir, "caddy")
		build := exec.Command("../xcaddy.sh", "build", "--output", caddyBin)
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		fmt.Fprintln(os.Stderr, "building Caddy with etcaddy (set ETCADDY_CADDY_BIN to reuse one)")
		if err := build.Run(); err != nil {
			fmt.Fprintf(os.Stderr, "../xcaddy.sh build --output %s: %v\n", caddyBin, err)
			return 1
		}
	}
	return m.Run()
}

// findPythonEtcd returns a Python 3 that imports python-etcd (the etcd module): the one
// $ETCADDY_PYTHON names, else python3 on PATH, else Debian's /usr/bin/python3, where the
// python3-etcd package installs it (a python3 on PATH may be another installation).
func findPythonEtcd() (string, error) {
	candidates := []string{"python3", "/usr/bin/python3"}
	if p := os.Getenv("ETCADDY_PYTHON"); p != "" {
		candidates = []string{p}
	}
	var tried []string
	for _, c := range candidates {
		p, err := lookAbs(c)
		if err != nil {
			tried = append(tried, fmt.Sprintf("%s: %v", c, err))
			continue
		}
		out, err := exec.Command(p, "-c", "import etcd").CombinedOutput()
		if err == nil {
			return p, nil
		}
		tried = append(tried, fmt.Sprintf("%s: %v: %s", p, err, bytes.TrimSpace(out)))
	}
	return "", fmt.Errorf("no Python 3 with python-etcd (import etcd): %s", strings.Join(tried, "; "))
}

func lookAbs(name string) (string, error) {
	p, err := exec.LookPath(name)
	if err != nil {
		return "", err
	}
	return filepath.Abs(p)
}

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago: the kernel picks it
// for a listener on :0, which is closed again for the server under test to bind.
func freePort(t testing.TB) int {
	t.Helper()
	portsMu.Lock()
	defer portsMu.Unlock()
	for range 100 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("free port: %v", err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		l.Close()
		// The kernel may hand a closed port out again. Caddy binds with
		// SO_REUSEPORT, so two servers given the same port would share it
		// without an error, each getting part of the other's connections.
		if !portsGiven[port] {
			portsGiven[port] = true
			return port
		}
	}
	t.Fatal("free port: the kernel keeps handing out ports already given")
	return 0
}

// portsGiven are the ports freePort has handed out in this process.
var (
	portsMu    sync.Mutex
	portsGiven = make(map[int]bool)
)

// proc is one server process under test, etcaddy (Caddy) or the reference etcd.
type proc struct {
	// Name is "etcaddy" or "etcd", for messages.
	Name string
	// ClientURL is the base URL of the v2 API, http://127.0.0.1:<port>.
	ClientURL string
	// AdminURL is Caddy's admin endpoint (etcaddy only).
	AdminURL string
	// DataDir is the member's data directory.
	DataDir string
	// Caddyfile is the path of the Caddyfile the process runs (etcaddy only).
	Caddyfile string
	// Cmd is the running command; restart replaces it.
	Cmd *exec.Cmd
	// LogPath collects the process's stdout and stderr, across restarts.
	LogPath string

	t    testing.TB
	path string
	args []string
	env  []string

	mu   sync.Mutex
	done chan struct{} // closed once Cmd has been waited for
}

// etcaddyOpts configures startEtcaddy.
type etcaddyOpts struct {
	// Caddyfile, when set, replaces the generated one; {client_port}, {admin_port} and
	// {data_dir} in it are replaced by the values the harness picked.
	Caddyfile string
	// SnapshotCount is raftkv's snapshot_count and snapshot_catchup_entries (0: the defaults).
	SnapshotCount int
	// DataDir reuses a data directory (a restart in a new process); empty: a new one.
	DataDir string
}

// startEtcaddy runs a single etcaddy member: Caddy with a generated Caddyfile serving the
// etcd handler on http://127.0.0.1:<free port>, the admin API on another free port. It
// returns once /health answers 200 and stops the process when the test ends.
func startEtcaddy(t testing.TB, o etcaddyOpts) *proc {
	t.Helper()
	dir := t.TempDir()
	dataDir := o.DataDir
	if dataDir == "" {
		dataDir = filepath.Join(dir, "data")
	}
	clientPort, adminPort := freePort(t), freePort(t)
	cf := o.Caddyfile
	if cf == "" {
		var raft strings.Builder
		fmt.Fprintf(&raft, "\t\tdata_dir {data_dir}\n")
		if o.SnapshotCount > 0 {
			// The log keeps as many entries behind each snapshot: a
			// compaction every snapshot_count entries.
			fmt.Fprintf(&raft, "\t\tsnapshot_count %d\n\t\tsnapshot_catchup_entries %d\n", o.SnapshotCount, o.SnapshotCount)
		}
		cf = "{\n\tadmin 127.0.0.1:{admin_port}\n\traftkv {\n" + raft.String() + "\t}\n}\n\n" +
			"http://127.0.0.1:{client_port} {\n\tetcd\n}\n"
	}
	cf = strings.NewReplacer(
		"{client_port}", strconv.Itoa(clientPort),
		"{admin_port}", strconv.Itoa(adminPort),
		"{data_dir}", dataDir,
	).Replace(cf)
	cfPath := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(cfPath, []byte(cf), 0o644); err != nil {
		t.Fatal(err)
	}
	// Caddy keeps its autosave, certificates and locks under $HOME / XDG dirs: give each
	// process its own so parallel tests never share them.
	home := filepath.Join(dir, "home")
	env := append(os.Environ(),
		"HOME="+home,
		"XDG_CONFIG_HOME="+filepath.Join(home, "config"),
		"XDG_DATA_HOME="+filepath.Join(home, "data"),
	)
	p := &proc{
		Name:      "etcaddy",
		ClientURL: fmt.Sprintf("http://127.0.0.1:%d", clientPort),
		AdminURL:  fmt.Sprintf("http://127.0.0.1:%d", adminPort),
		DataDir:   dataDir,
		Caddyfile: cfPath,
		LogPath:   filepath.Join(dir, "caddy.log"),
		t:         t,
		path:      caddyBin,
		args:      []string{"run", "--config", cfPath, "--adapter", "caddyfile"},
		env:       env,
	}
	p.launch(t)
	return p
}

// startEtcd runs the reference: a single-member etcd 3.4 with the v2 API on free ports and
// a new data directory. It returns once /health answers 200.
func startEtcd(t testing.TB) *proc {
	t.Helper()
	p := etcdAt(t, fmt.Sprintf("http://127.0.0.1:%d", freePort(t)))
	p.launch(t)
	return p
}

// etcdAt prepares a single-member etcd 3.4 with the v2 API serving clientURL, a free peer
// port and a new data directory; launch or spawn starts it.
func etcdAt(t testing.TB, clientURL string) *proc {
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", freePort(t))
	return etcdProc(t, "etcd", clientURL,
		"--name", "default",
		"--listen-peer-urls", peerURL,
		"--initial-advertise-peer-urls", peerURL,
		"--initial-cluster", "default="+peerURL)
}

// etcdProc prepares an etcd 3.4 with the v2 API serving clientURL, a new data directory,
// and the member's flags in args.
func etcdProc(t testing.TB, name, clientURL string, args ...string) *proc {
	dir := t.TempDir()
	dataDir := filepath.Join(dir, "data")
	return &proc{
		Name:      name,
		ClientURL: clientURL,
		DataDir:   dataDir,
		LogPath:   filepath.Join(dir, "etcd.log"),
		t:         t,
		path:      etcdBin,
		args: append([]string{
			"--enable-v2",
			"--data-dir", dataDir,
			"--listen-client-urls", clientURL,
			"--advertise-client-urls", clientURL,
			"--logger", "zap",
			"--log-outputs", "stderr",
		}, args...),
		env: etcdEnv(),
	}
}

// etcdEnv is the environment of a reference etcd: ours, without ETCD_* variables, which
// would configure it.
func etcdEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "ETCD_") {
			env = append(env, kv)
		}
	}
	return env
}

// launch starts the process for the first time, registers its stop and log dump with the
// test, and waits for /health.
func (p *proc) launch(t testing.TB) {
	t.Helper()
	p.spawn(t)
	if err := p.waitHealthy(30 * time.Second); err != nil {
		t.Fatalf("%s (pid %d) did not become healthy: %v", p.Name, p.Cmd.Process.Pid, err)
	}
}

// spawn starts the process without waiting for it to be healthy, and registers its stop
// (and its log, when the test fails) with the test.
func (p *proc) spawn(t testing.TB) {
	t.Helper()
	t.Cleanup(func() {
		p.stop()
		if t.Failed() {
			t.Logf("%s log (%s), last lines:\n%s", p.Name, p.LogPath, p.logTail(60))
		}
	})
	p.startProcess(t)
}

// start runs p.path with p.args and waits until /health answers 200 (30 s at most).
func (p *proc) start(t testing.TB) {
	t.Helper()
	p.startProcess(t)
	if err := p.waitHealthy(30 * time.Second); err != nil {
		// The cleanup launch registered prints the log tail.
		t.Fatalf("%s (pid %d) did not become healthy: %v", p.Name, p.Cmd.Process.Pid, err)
	}
}

// startProcess runs p.path with p.args, its output appended to p.LogPath, without waiting.
func (p *proc) startProcess(t testing.TB) {
	t.Helper()
	logf, err := os.OpenFile(p.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close() // the child holds its own descriptor
	fmt.Fprintf(logf, "=== %s %s %s\n", time.Now().Format(time.RFC3339Nano), p.path, strings.Join(p.args, " "))
	cmd := exec.Command(p.path, p.args...)
	cmd.Env = p.env
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", p.Name, err)
	}
	done := make(chan struct{})
	p.mu.Lock()
	p.Cmd, p.done = cmd, done
	p.mu.Unlock()
	go func() {
		_ = cmd.Wait()
		close(done)
	}()
}

// waitHealthy polls GET /health until it answers 200, the process exits, or the deadline.
func (p *proc) waitHealthy(timeout time.Duration) error {
	p.mu.Lock()
	done := p.done
	p.mu.Unlock()
	client := &http.Client{Timeout: 2 * time.Second}
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(25 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		resp, err := client.Get(p.ClientURL + "/health")
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Errorf("GET /health: %d %s", resp.StatusCode, bytes.TrimSpace(body))
		} else {
			last = err
		}
		select {
		case <-done:
			return fmt.Errorf("process exited (%v); last: %v", p.exitState(), last)
		case <-deadline.C:
			return fmt.Errorf("no 200 from %s/health within %v; last: %v", p.ClientURL, timeout, last)
		case <-tick.C:
		}
	}
}

func (p *proc) exitState() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.Cmd != nil && p.Cmd.ProcessState != nil {
		return p.Cmd.ProcessState.String()
	}
	return "running"
}

// running reports whether the current process has not exited yet.
func (p *proc) running() bool {
	p.mu.Lock()
	done := p.done
	p.mu.Unlock()
	if done == nil {
		return false
	}
	select {
	case <-done:
		return false
	default:
		return true
	}
}

// signal sends sig to the process by its PID and waits for it to exit (at most wait;
// 0 means no limit). It reports whether the process has exited.
func (p *proc) signal(sig syscall.Signal, wait time.Duration) bool {
	p.mu.Lock()
	cmd, done := p.Cmd, p.done
	p.mu.Unlock()
	if cmd == nil || done == nil {
		return true
	}
	select {
	case <-done:
		return true
	default:
	}
	_ = cmd.Process.Signal(sig)
	if wait == 0 {
		<-done
		return true
	}
	timer := time.NewTimer(wait)
	defer timer.Stop()
	select {
	case <-done:
		return true
	case <-timer.C:
		return false
	}
}

// kill9 sends SIGKILL to the process and waits until it is gone: a crash, with no chance
// to flush or close anything.
func (p *proc) kill9() {
	p.signal(syscall.SIGKILL, 0)
}

// stop asks the process to shut down (SIGTERM), waits 20 s, then kills it. Calling it on a
// stopped process does nothing.
func (p *proc) stop() {
	if !p.signal(syscall.SIGTERM, 20*time.Second) {
		p.t.Logf("%s (pid %d) ignored SIGTERM for 20s: SIGKILL", p.Name, p.Cmd.Process.Pid)
		p.kill9()
	}
}

// restart runs the same command again — same ports, same data directory — after a stop or
// kill9, and waits for /health. The process is still stopped by the cleanup of the test
// that started it.
func (p *proc) restart(t testing.TB) {
	t.Helper()
	if p.running() {
		t.Fatalf("restart %s: still running (pid %d); stop or kill9 it first", p.Name, p.Cmd.Process.Pid)
	}
	p.start(t)
}

// logTail returns the last n lines of the process log.
func (p *proc) logTail(n int) string {
	b, err := os.ReadFile(p.LogPath)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// testClient talks to the servers under test. It never follows redirects (the API's 301s
// are compared as answers) and never asks for compression (bodies are compared as sent).
var testClient = &http.Client{
	Transport: &http.Transport{
		DisableCompression:  true,
		MaxIdleConnsPerHost: 16,
		IdleConnTimeout:     30 * time.Second,
	},
	CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
}

// newRequest builds a request for p: form goes in an urlencoded body for PUT and POST (as
// etcdctl and the Go client send it), in the query string otherwise. path may carry its own
// query string and escapes (%2F stays escaped on the wire).
func (p *proc) newRequest(ctx context.Context, method, path string, form url.Values) (*http.Request, error) {
	u, err := url.Parse(p.ClientURL + path)
	if err != nil {
		return nil, err
	}
	var body io.Reader
	hasBody := (method == http.MethodPut || method == http.MethodPost) && form != nil
	if hasBody {
		body = strings.NewReader(form.Encode())
	} else if len(form) > 0 {
		if u.RawQuery != "" {
			u.RawQuery += "&"
		}
		u.RawQuery += form.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, method, u.String(), body)
	if err != nil {
		return nil, err
	}
	if hasBody {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	return req, nil
}

// tryDo is do without the test: it returns the transport error instead of failing, for
// goroutines and for requests to a server that may be down.
func (p *proc) tryDo(ctx context.Context, method, path string, form url.Values) (int, http.Header, []byte, error) {
	req, err := p.newRequest(ctx, method, path, form)
	if err != nil {
		return 0, nil, nil, err
	}
	return roundTrip(req)
}

// roundTrip sends req with testClient and reads the whole answer.
func roundTrip(req *http.Request) (int, http.Header, []byte, error) {
	resp, err := testClient.Do(req)
	if err != nil {
		return 0, nil, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return resp.StatusCode, resp.Header, body, fmt.Errorf("%s %s: reading body: %w", req.Method, req.URL.Path, err)
	}
	return resp.StatusCode, resp.Header, body, nil
}

// do sends one request to p (form as for newRequest) and returns the whole answer; a
// transport error, or no answer within 30 s, fails the test.
func (p *proc) do(t testing.TB, method, path string, form url.Values) (status int, header http.Header, body []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	status, header, body, err := p.tryDo(ctx, method, path, form)
	if err != nil {
		t.Fatalf("%s: %s %s: %v", p.Name, method, path, err)
	}
	return status, header, body
}

// TestHarnessRestartsEtcd checks the harness itself on the reference: a write survives a
// SIGKILL and a restart on the same ports and data directory, and stop is idempotent.
func TestHarnessRestartsEtcd(t *testing.T) {
	e := startEtcd(t)
	if st, _, body := e.do(t, "PUT", "/v2/keys/harness", url.Values{"value": {"v1"}}); st != http.StatusCreated {
		t.Fatalf("PUT: %d %s", st, body)
	}
	e.kill9()
	if e.running() {
		t.Fatal("still running after kill9")
	}
	e.restart(t)
	st, _, body := e.do(t, "GET", "/v2/keys/harness", nil)
	if st != http.StatusOK || !strings.Contains(string(body), `"value":"v1"`) {
		t.Fatalf("GET after restart: %d %s", st, body)
	}
	e.stop()
	e.stop()
}

// startSubject starts the server the differential and client tests examine: etcaddy, or a
// second real etcd when ETCADDY_E2E_SUBJECT=etcd. The latter checks such a test itself:
// etcd against etcd must show no difference.
func startSubject(t testing.TB) *proc {
	t.Helper()
	switch s := os.Getenv("ETCADDY_E2E_SUBJECT"); s {
	case "", "etcaddy":
		return startEtcaddy(t, etcaddyOpts{})
	case "etcd":
		return startEtcd(t)
	default:
		t.Fatalf("ETCADDY_E2E_SUBJECT=%q: want etcaddy or etcd", s)
		return nil
	}
}

// poll calls cond every 20 ms until it returns true (true) or timeout passes (false).
func poll(timeout time.Duration, cond func() bool) bool {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		if cond() {
			return true
		}
		select {
		case <-deadline.C:
			return cond()
		case <-tick.C:
		}
	}
}
