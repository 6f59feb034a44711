package caddymodule

// The real clients against etcaddy, each compared with the same client against the real
// etcd 3.4: etcdctl (v2 API), go.etcd.io/etcd/client/v2 and python-etcd.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	client "go.etcd.io/etcd/client/v2"
)

// ctlResult is what one etcdctl run printed and returned.
type ctlResult struct {
	code           int
	stdout, stderr string
}

func (r ctlResult) String() string {
	return fmt.Sprintf("exit %d\n  stdout: %q\n  stderr: %q", r.code, r.stdout, r.stderr)
}

// etcdctlEnv is the environment etcdctl runs in: the v2 API, and no ETCDCTL_* setting of
// the caller's that would change what it sends.
func etcdctlEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "ETCDCTL_") {
			env = append(env, kv)
		}
	}
	return append(env, "ETCDCTL_API=2")
}

// etcdctlCmd builds `etcdctl --endpoints <server> args…` with ${…} expanded for s.
func (s *diffSide) etcdctlCmd(ctx context.Context, args []string) (*exec.Cmd, error) {
	full := []string{"--endpoints", s.p.ClientURL}
	for _, a := range args {
		e, err := s.expand(a)
		if err != nil {
			return nil, err
		}
		full = append(full, e)
	}
	cmd := exec.CommandContext(ctx, etcdctlBin, full...)
	cmd.Env = etcdctlEnv()
	return cmd, nil
}

// etcdctl runs etcdctl to completion (20 s at most).
func (s *diffSide) etcdctl(args []string) ctlResult { return s.runEtcdctl("", 20*time.Second, args) }

// runEtcdctl runs etcdctl with stdin on its standard input, for limit at most.
func (s *diffSide) runEtcdctl(stdin string, limit time.Duration, args []string) ctlResult {
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	cmd, err := s.etcdctlCmd(ctx, args)
	if err != nil {
		return ctlResult{code: -1, stderr: err.Error()}
	}
	cmd.Stdin = strings.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err = cmd.Run()
	res := ctlResult{stdout: out.String(), stderr: errb.String()}
	var exit *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &exit):
		res.code = exit.ExitCode()
	default:
		res.code = -1
		res.stderr += err.Error()
	}
	if ctx.Err() != nil {
		res.stderr += fmt.Sprintf("\n(killed: no exit within %v)", limit)
	}
	return res
}

var (
	ctlIndexLine = regexp.MustCompile(`^(Created-Index|Modified-Index|Index): (\d+)$`)
	ctlErrIndex  = regexp.MustCompile(`\[(\d+)\]$`)
	ctlTTLLine   = regexp.MustCompile(`^TTL: ([1-9]\d*)$`)
	ctlEnvIndex  = regexp.MustCompile(`index=(\d+)`)
	// etcdctl prints a member ID with %x: up to 16 digits, fewer when it has leading zeros.
	memberID     = regexp.MustCompile(`(^|member )[0-9a-f]{1,16}(: name=| is )`)
	peerURLsText = regexp.MustCompile(`peerURLs=\S+`)
)

// normCtl rewrites what differs between two servers in etcdctl's output: indexes (relative
// to the server's start), positive TTLs (counted a moment apart), member IDs and URLs;
// -o json lines are normalized as JSON. unordered sorts the lines (listings without --sort).
func (s *diffSide) normCtl(text string, unordered bool) string {
	rel := func(line string, re *regexp.Regexp, format func(sm []string, n int64) string) string {
		return re.ReplaceAllStringFunc(line, func(m string) string {
			sm := re.FindStringSubmatch(m)
			n, _ := strconv.ParseUint(sm[len(sm)-1], 10, 64)
			return format(sm, s.rel(n))
		})
	}
	lines := strings.Split(text, "\n")
	for i, l := range lines {
		if strings.HasPrefix(l, "{") {
			var v any
			dec := json.NewDecoder(strings.NewReader(l))
			dec.UseNumber()
			if dec.Decode(&v) == nil {
				b, _ := json.Marshal(hideTTL(s.normJSON("", v, cmpExact)))
				lines[i] = string(b)
				continue
			}
		}
		l = rel(l, ctlIndexLine, func(sm []string, n int64) string { return fmt.Sprintf("%s: %d", sm[1], n) })
		l = rel(l, ctlErrIndex, func(_ []string, n int64) string { return fmt.Sprintf("[%d]", n) })
		l = rel(l, ctlEnvIndex, func(_ []string, n int64) string { return fmt.Sprintf("index=%d", n) })
		l = ctlTTLLine.ReplaceAllString(l, "TTL: <positive>")
		l = s.relText(l)
		l = memberID.ReplaceAllString(l, "${1}<member-id>${2}")
		lines[i] = peerURLsText.ReplaceAllString(l, "peerURLs=<peer-url>")
	}
	if unordered {
		body := lines
		if n := len(body); n > 0 && body[n-1] == "" {
			body = body[:n-1]
		}
		sort.Strings(body)
	}
	return strings.Join(lines, "\n")
}

// hideTTL replaces positive "ttl" values: the two servers count them a moment apart.
func hideTTL(v any) any {
	switch x := v.(type) {
	case map[string]any:
		for k, e := range x {
			if n, ok := e.(json.Number); ok && k == "ttl" && n.String() != "0" {
				x[k] = "<positive>"
			} else {
				x[k] = hideTTL(e)
			}
		}
	case []any:
		for i, e := range x {
			x[i] = hideTTL(e)
		}
	}
	return v
}

var extendedModifiedIndex = regexp.MustCompile(`(?m)^Modified-Index: (\d+)$`)

// ctlStep is one etcdctl run of the script.
type ctlStep struct {
	args      []string
	unordered bool   // compare lines as a set (ls without --sort)
	save      string // with -o extended: save Modified-Index as ${save.index}
}

func ctl(args ...string) ctlStep { return ctlStep{args: args} }

// TestEtcdctlMatchesEtcd runs etcdctl (ETCDCTL_API=2) against etcd and against etcaddy, the
// same commands in the same order, and compares exit codes, output and error texts.
func TestEtcdctlMatchesEtcd(t *testing.T) {
	d := newDiffer(t, startEtcd(t), startSubject(t))

	compare := func(desc string, unordered bool, res [2]ctlResult) {
		t.Helper()
		var norm [2]ctlResult
		for i, s := range d.sides() {
			norm[i] = ctlResult{code: res[i].code, stdout: s.normCtl(res[i].stdout, unordered), stderr: s.normCtl(res[i].stderr, false)}
		}
		if d.transcript != nil {
			fmt.Fprintf(d.transcript, "### etcdctl %s\n--- %s: %s\n--- %s: %s\n", desc, d.ref.p.Name, res[0], d.sub.p.Name, res[1])
		}
		if norm[0] != norm[1] {
			t.Errorf("etcdctl %s differs:\n  %s (normalized): %s\n  %s (normalized): %s\n  %s (raw): %s\n  %s (raw): %s",
				desc, d.ref.p.Name, norm[0], d.sub.p.Name, norm[1], d.ref.p.Name, res[0], d.sub.p.Name, res[1])
		}
	}
	run := func(st ctlStep) {
		t.Helper()
		var res [2]ctlResult
		for i, s := range d.sides() {
			res[i] = s.etcdctl(st.args)
			if st.save != "" {
				if m := extendedModifiedIndex.FindStringSubmatch(res[i].stdout); m != nil {
					s.vars[st.save+".index"] = m[1]
				}
			}
		}
		compare(strings.Join(st.args, " "), st.unordered, res)
	}

	steps := []ctlStep{
		ctl("set", "/foo", "bar"),
		ctl("get", "/foo"),
		ctl("-o", "simple", "get", "/foo"),
		ctl("-o", "extended", "get", "/foo"),
		ctl("-o", "json", "get", "/foo"),
		ctl("get", "--quorum", "/foo"),
		ctl("update", "/foo", "baz"),
		ctl("-o", "extended", "update", "/foo", "qux"),
		ctl("update", "/nokey", "v"),
		ctl("mk", "/foo", "x"),
		ctl("mk", "/new", "v"),
		ctl("-o", "json", "mk", "/new2", "v"),
		ctl("get", "/nokey"),
		ctl("-o", "json", "get", "/nokey"),
		ctl("mk", "--in-order", "/queue", "job1"),
		{args: []string{"-o", "extended", "mk", "--in-order", "/queue", "job2"}, save: "job2"},
		ctl("-o", "json", "mk", "--in-order", "--ttl", "300", "/queue", "job3"),
		ctl("ls", "--sort", "/queue"),
		ctl("-o", "extended", "ls", "--sort", "/queue"),
		ctl("mkdir", "/dir"),
		ctl("mkdir", "/dir"),
		ctl("mkdir", "/foo"),
		ctl("setdir", "/dir2"),
		ctl("setdir", "/dir2"),
		ctl("setdir", "--ttl", "300", "/dir3"),
		ctl("updatedir", "--ttl", "300", "/dir2"),
		ctl("-o", "extended", "updatedir", "--ttl", "200", "/dir2"),
		ctl("updatedir", "/nodir"),
		ctl("get", "/dir2"),
		ctl("set", "/dir/a", "one"),
		ctl("set", "/dir/sub/b", "two"),
		ctl("set", "/dir/_hidden", "h"),
		ctl("set", "/dir/sub/c", "three"),
		ctl("set", "/dir/a/under", "x"),
		{args: []string{"ls", "/dir"}, unordered: true},
		{args: []string{"ls", "--recursive", "/dir"}, unordered: true},
		{args: []string{"ls", "-p", "/dir"}, unordered: true},
		ctl("ls", "--recursive", "--sort", "-p", "/"),
		ctl("ls", "--sort", "-p", "/"),
		ctl("ls", "--recursive", "--sort", "/dir"),
		ctl("-o", "json", "ls", "--sort", "/dir"),
		ctl("-o", "extended", "ls", "--sort", "--recursive", "/dir"),
		ctl("ls", "/nodir"),
		ctl("ls", "/foo"),
		ctl("rmdir", "/dir"),
		ctl("rm", "/dir"),
		ctl("rm", "--dir", "/dir"),
		ctl("rmdir", "/dir2"),
		ctl("rmdir", "/foo"),
		ctl("rm", "--recursive", "/dir"),
		ctl("rm", "--recursive", "/dir"),
		ctl("rm", "/dir3"),
		ctl("rm", "--dir", "/dir3"),
		ctl("rm", "/nokey"),
		ctl("set", "/cas", "one"),
		ctl("set", "--swap-with-value", "one", "/cas", "two"),
		ctl("set", "--swap-with-value", "nope", "/cas", "three"),
		{args: []string{"-o", "extended", "get", "/cas"}, save: "cas"},
		ctl("set", "--swap-with-index", "${cas.index}", "/cas", "three"),
		ctl("set", "--swap-with-index", "${cas.index}", "/cas", "four"),
		ctl("set", "--swap-with-index", "${cas.index}", "--swap-with-value", "nope", "/cas", "four"),
		ctl("set", "--swap-with-value", "x", "/nokey", "y"),
		ctl("rm", "--with-value", "wrong", "/cas"),
		ctl("rm", "--with-index", "${cas.index}", "/cas"),
		ctl("rm", "--with-value", "three", "/cas"),
		ctl("set", "/cad", "v"),
		{args: []string{"-o", "extended", "get", "/cad"}, save: "cad"},
		ctl("rm", "--with-index", "${cad.index}", "/cad"),
		ctl("set", "--ttl", "300", "/ttlk", "v"),
		ctl("-o", "extended", "get", "/ttlk"),
		ctl("-o", "json", "get", "/ttlk"),
		ctl("mk", "--ttl", "300", "/ttlk2", "v"),
		ctl("set", "/ttlk", "w"),
		ctl("-o", "extended", "get", "/ttlk"),
		ctl("rm", "/ttlk2"),
		ctl("-o", "extended", "rm", "/ttlk"),
		ctl("-o", "json", "rm", "/new2"),
		ctl("set", "/", "root"),
		ctl("rm", "--recursive", "/"),
		ctl("get", "/dir/a/under"),
		ctl("--debug", "get", "/foo"),
		ctl("--debug", "set", "/foo", "dbg"),
		ctl("--debug", "-o", "extended", "rm", "/foo"),
		ctl("--debug", "get", "/foo"),
		ctl("--no-sync", "get", "/new"),
		ctl("member", "list"),
		ctl("cluster-health"),
	}
	for _, st := range steps {
		run(st)
	}

	// watch: one event, with the set sent once the watcher is registered (etcd counts it in
	// /v2/stats/store), then recursive and --after-index variants.
	watchOnce := func(args []string, trigger []string) {
		t.Helper()
		var res [2]ctlResult
		for i, s := range d.sides() {
			bg := s.startEtcdctl(t, args)
			s.waitWatchers(t, 1)
			if r := s.etcdctl(trigger); r.code != 0 {
				t.Errorf("%s: etcdctl %s: %s", s.p.Name, strings.Join(trigger, " "), r)
			}
			res[i] = bg.wait(10 * time.Second)
		}
		compare(strings.Join(args, " ")+" (then "+strings.Join(trigger, " ")+")", false, res)
	}
	watchOnce([]string{"watch", "/wk"}, []string{"set", "/wk", "v1"})
	watchOnce([]string{"-o", "extended", "watch", "/wk"}, []string{"set", "/wk", "v2"})
	watchOnce([]string{"-o", "json", "watch", "/wk"}, []string{"rm", "/wk"})
	watchOnce([]string{"watch", "--recursive", "/wr"}, []string{"set", "/wr/a/b", "deep"})
	run(ctlStep{args: []string{"-o", "extended", "set", "/wa", "first"}, save: "wa"})
	run(ctl("set", "/wa", "second"))
	run(ctl("set", "/wa", "third"))
	run(ctl("watch", "--after-index", "${wa.index}", "/wa"))
	run(ctl("-o", "extended", "watch", "--after-index", "${wa.index+1}", "/wa"))

	// watch --forever: several events in order, then etcdctl is killed (by its PID).
	{
		var res [2]ctlResult
		for i, s := range d.sides() {
			bg := s.startEtcdctl(t, []string{"watch", "--forever", "--recursive", "/wf"})
			s.waitWatchers(t, 1)
			for _, v := range []string{"a", "b", "c"} {
				s.etcdctl([]string{"set", "/wf/" + v, "v-" + v})
			}
			bg.waitOutput(t, "v-c\n", 10*time.Second)
			res[i] = bg.kill()
		}
		compare("watch --forever --recursive /wf", false, res)
	}

	// exec-watch: the command sees the event in its environment; killed by PID afterwards.
	{
		var res [2]ctlResult
		for i, s := range d.sides() {
			out := filepath.Join(t.TempDir(), "exec-watch.out")
			bg := s.startEtcdctl(t, []string{"exec-watch", "--recursive", "/ew", "--", "sh", "-c",
				`echo "action=$ETCD_WATCH_ACTION key=$ETCD_WATCH_KEY value=$ETCD_WATCH_VALUE index=$ETCD_WATCH_MODIFIED_INDEX" >> ` + out})
			s.waitWatchers(t, 1)
			s.etcdctl([]string{"set", "/ew/one", "1st"})
			waitFileLines(t, out, 1)
			s.etcdctl([]string{"set", "/ew/two", "2nd"})
			waitFileLines(t, out, 2)
			s.etcdctl([]string{"rm", "/ew/one"})
			waitFileLines(t, out, 3)
			r := bg.kill()
			b, _ := os.ReadFile(out)
			r.stdout += string(b)
			res[i] = r
		}
		compare("exec-watch --recursive /ew -- sh -c …", false, res)
	}
}

// bgEtcdctl is an etcdctl process running in the background (watch, exec-watch).
type bgEtcdctl struct {
	cmd    *exec.Cmd
	mu     sync.Mutex
	stdout bytes.Buffer
	stderr bytes.Buffer
	done   chan struct{}
}

type lockedWriter struct {
	mu *sync.Mutex
	b  *bytes.Buffer
}

func (w lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

// startEtcdctl starts etcdctl in the background; the test's cleanup kills it by PID.
func (s *diffSide) startEtcdctl(t *testing.T, args []string) *bgEtcdctl {
	t.Helper()
	cmd, err := s.etcdctlCmd(context.Background(), args)
	if err != nil {
		t.Fatal(err)
	}
	bg := &bgEtcdctl{cmd: cmd, done: make(chan struct{})}
	cmd.Stdout = lockedWriter{&bg.mu, &bg.stdout}
	cmd.Stderr = lockedWriter{&bg.mu, &bg.stderr}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		_ = cmd.Wait()
		close(bg.done)
	}()
	t.Cleanup(func() { bg.kill() })
	return bg
}

func (bg *bgEtcdctl) result() ctlResult {
	bg.mu.Lock()
	defer bg.mu.Unlock()
	code := -1
	if st := bg.cmd.ProcessState; st != nil {
		code = st.ExitCode()
	}
	return ctlResult{code: code, stdout: bg.stdout.String(), stderr: bg.stderr.String()}
}

// wait waits for etcdctl to exit by itself; after d it is killed and the result says so.
func (bg *bgEtcdctl) wait(d time.Duration) ctlResult {
	select {
	case <-bg.done:
		return bg.result()
	case <-time.After(d):
		r := bg.kill()
		r.stderr += fmt.Sprintf("\n(killed: no exit within %v)", d)
		return r
	}
}

// kill ends etcdctl by its PID (SIGKILL) and returns what it printed; exit code -1.
func (bg *bgEtcdctl) kill() ctlResult {
	_ = bg.cmd.Process.Kill()
	<-bg.done
	r := bg.result()
	r.code = -1 // killed on purpose: the code says nothing about the server
	return r
}

// waitOutput polls until etcdctl's stdout ends with suffix.
func (bg *bgEtcdctl) waitOutput(t *testing.T, suffix string, d time.Duration) {
	t.Helper()
	var out string
	if !poll(d, func() bool {
		bg.mu.Lock()
		out = bg.stdout.String()
		bg.mu.Unlock()
		return strings.HasSuffix(out, suffix)
	}) {
		t.Errorf("etcdctl %v: stdout %q does not end with %q after %v", bg.cmd.Args, out, suffix, d)
	}
}

// waitFileLines polls until the file has at least n lines (10 s at most).
func waitFileLines(t *testing.T, path string, n int) {
	t.Helper()
	var b []byte
	if !poll(10*time.Second, func() bool {
		b, _ = os.ReadFile(path)
		return bytes.Count(b, []byte("\n")) >= n
	}) {
		t.Errorf("%s: %d lines after 10s, want %d: %q", path, bytes.Count(b, []byte("\n")), n, b)
	}
}

// waitWatchers polls /v2/stats/store until it counts n watchers: then a watch a client
// started is registered and the next write reaches it.
func (s *diffSide) waitWatchers(t *testing.T, n int) {
	t.Helper()
	var st int
	var body []byte
	var err error
	if !poll(10*time.Second, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		st, _, body, err = s.p.tryDo(ctx, "GET", "/v2/stats/store", nil)
		var stats struct {
			Watchers *int `json:"watchers"`
		}
		return err == nil && st == http.StatusOK && json.Unmarshal(body, &stats) == nil && stats.Watchers != nil && *stats.Watchers >= n
	}) {
		t.Errorf("%s: /v2/stats/store did not count %d watcher(s) within 10s (last: %d %s %v); going on",
			s.p.Name, n, st, bytes.TrimSpace(body), err)
	}
}

// recorder collects one server's normalized results of the Go client script.
type recorder struct {
	s     *diffSide
	lines []string
}

func (r *recorder) node(n *client.Node) string {
	if n == nil {
		return "nil"
	}
	var b strings.Builder
	fmt.Fprintf(&b, "{key=%s", r.s.relText(n.Key))
	if n.Dir {
		b.WriteString(" dir")
	} else {
		fmt.Fprintf(&b, " value=%q", n.Value)
	}
	if n.Expiration != nil {
		b.WriteString(" expiration")
	}
	if n.TTL > 0 {
		b.WriteString(" ttl>0")
	} else if n.TTL < 0 {
		b.WriteString(" ttl<0")
	}
	fmt.Fprintf(&b, " created=%d modified=%d", r.s.rel(n.CreatedIndex), r.s.rel(n.ModifiedIndex))
	if n.Nodes != nil {
		b.WriteString(" nodes=[")
		for i, c := range n.Nodes {
			if i > 0 {
				b.WriteString(" ")
			}
			b.WriteString(r.node(c))
		}
		b.WriteString("]")
	}
	b.WriteString("}")
	return b.String()
}

// add records the outcome of one call; unordered sorts each listing (no Sort option).
func (r *recorder) add(op string, resp *client.Response, err error, unordered bool) {
	if err != nil {
		var ce client.Error
		if errors.As(err, &ce) {
			r.lines = append(r.lines, fmt.Sprintf("%s -> error %d %q cause=%q index=%d", op, ce.Code, ce.Message, r.s.relText(ce.Cause), r.s.rel(ce.Index)))
		} else {
			r.lines = append(r.lines, fmt.Sprintf("%s -> error %v", op, r.s.relText(err.Error())))
		}
		return
	}
	if unordered && resp.Node != nil {
		sortNodes(resp.Node)
	}
	r.lines = append(r.lines, fmt.Sprintf("%s -> %s node=%s prev=%s index=%d", op, resp.Action, r.node(resp.Node), r.node(resp.PrevNode), r.s.rel(resp.Index)))
}

func sortNodes(n *client.Node) {
	sort.Sort(n.Nodes)
	for _, c := range n.Nodes {
		sortNodes(c)
	}
}

// goClientScript drives one server through the Go v2 client; every outcome is recorded.
// Later calls use this server's own earlier answers (indexes, in-order keys).
func goClientScript(t *testing.T, s *diffSide, r *recorder) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	c, err := client.New(client.Config{
		Endpoints:               []string{s.p.ClientURL},
		Transport:               client.DefaultTransport,
		HeaderTimeoutPerRequest: 10 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Sync(ctx); err != nil {
		r.lines = append(r.lines, "sync -> error "+err.Error())
	}
	r.lines = append(r.lines, "endpoints after sync: "+s.relText(strings.Join(c.Endpoints(), ",")))
	k := client.NewKeysAPI(c)
	// rec(op)(call) records the outcome of call under op and returns its response.
	rec := func(op string) func(*client.Response, error) *client.Response {
		return func(resp *client.Response, err error) *client.Response {
			r.add(op, resp, err, false)
			return resp
		}
	}

	rec("Set /a")(k.Set(ctx, "/a", "one", nil))
	rec("Get /a")(k.Get(ctx, "/a", nil))
	a := rec("Set /a again")(k.Set(ctx, "/a", "two", nil))
	rec("Get /a quorum")(k.Get(ctx, "/a", &client.GetOptions{Quorum: true}))
	rec("Get /missing")(k.Get(ctx, "/missing", nil))
	rec("Update /a")(k.Update(ctx, "/a", "three"))
	rec("Update /missing")(k.Update(ctx, "/missing", "x"))
	rec("Create /a")(k.Create(ctx, "/a", "x"))
	rec("Create /b")(k.Create(ctx, "/b", "bee"))
	rec("Set PrevExist /c")(k.Set(ctx, "/c", "x", &client.SetOptions{PrevExist: client.PrevExist}))
	rec("Set PrevNoExist /c")(k.Set(ctx, "/c", "x", &client.SetOptions{PrevExist: client.PrevNoExist}))
	rec("Set PrevValue ok")(k.Set(ctx, "/a", "four", &client.SetOptions{PrevValue: "three"}))
	rec("Set PrevValue bad")(k.Set(ctx, "/a", "five", &client.SetOptions{PrevValue: "nope"}))
	if a != nil {
		rec("Set PrevIndex stale")(k.Set(ctx, "/a", "five", &client.SetOptions{PrevIndex: a.Node.ModifiedIndex}))
	}
	if cur := rec("Get /a for index")(k.Get(ctx, "/a", nil)); cur != nil {
		rec("Set PrevIndex ok")(k.Set(ctx, "/a", "five", &client.SetOptions{PrevIndex: cur.Node.ModifiedIndex}))
		rec("Delete PrevIndex stale")(k.Delete(ctx, "/a", &client.DeleteOptions{PrevIndex: cur.Node.ModifiedIndex}))
	}
	rec("Set PrevExist+PrevValue")(k.Set(ctx, "/a", "six", &client.SetOptions{PrevExist: client.PrevExist, PrevValue: "five"}))
	rec("Set NoValueOnSuccess")(k.Set(ctx, "/a", "seven", &client.SetOptions{NoValueOnSuccess: true}))
	rec("Set TTL")(k.Set(ctx, "/ttl", "t", &client.SetOptions{TTL: 300 * time.Second}))
	rec("Get TTL")(k.Get(ctx, "/ttl", nil))
	rec("Set Refresh")(k.Set(ctx, "/ttl", "", &client.SetOptions{TTL: 400 * time.Second, Refresh: true, PrevExist: client.PrevExist}))
	rec("Set Refresh missing")(k.Set(ctx, "/nottl", "", &client.SetOptions{TTL: 10 * time.Second, Refresh: true, PrevExist: client.PrevExist}))
	rec("Set Refresh no TTL")(k.Set(ctx, "/ttl", "", &client.SetOptions{Refresh: true, PrevExist: client.PrevExist}))
	rec("Set clears TTL")(k.Set(ctx, "/ttl", "plain", &client.SetOptions{PrevExist: client.PrevExist}))
	rec("Set Dir")(k.Set(ctx, "/d", "", &client.SetOptions{Dir: true}))
	rec("Set Dir again")(k.Set(ctx, "/d", "", &client.SetOptions{Dir: true}))
	rec("Set Dir TTL")(k.Set(ctx, "/d", "", &client.SetOptions{Dir: true, TTL: 300 * time.Second, PrevExist: client.PrevExist}))
	rec("Set /d/x")(k.Set(ctx, "/d/x", "x", nil))
	rec("Set /d/y/z")(k.Set(ctx, "/d/y/z", "z", nil))
	rec("Set /d/_h")(k.Set(ctx, "/d/_h", "h", nil))
	rec("Get /d")(k.Get(ctx, "/d", &client.GetOptions{Sort: true}))
	rec("Get /d recursive sorted")(k.Get(ctx, "/d", &client.GetOptions{Recursive: true, Sort: true}))
	resp, err := k.Get(ctx, "/d", &client.GetOptions{Recursive: true})
	r.add("Get /d recursive", resp, err, true)
	rec("Get / recursive sorted")(k.Get(ctx, "/", &client.GetOptions{Recursive: true, Sort: true}))
	rec("Set under a file")(k.Set(ctx, "/d/x/deeper", "v", nil))
	q1 := rec("CreateInOrder")(k.CreateInOrder(ctx, "/q", "job1", nil))
	rec("CreateInOrder TTL")(k.CreateInOrder(ctx, "/q", "job2", &client.CreateInOrderOptions{TTL: 300 * time.Second}))
	rec("Get /q sorted")(k.Get(ctx, "/q", &client.GetOptions{Sort: true, Recursive: true}))
	if q1 != nil {
		rec("Get first in-order")(k.Get(ctx, q1.Node.Key, nil))
	}
	rec("Delete dir plain")(k.Delete(ctx, "/d", nil))
	rec("Delete dir Dir")(k.Delete(ctx, "/d", &client.DeleteOptions{Dir: true}))
	rec("Delete PrevValue bad")(k.Delete(ctx, "/b", &client.DeleteOptions{PrevValue: "nope"}))
	rec("Delete PrevValue ok")(k.Delete(ctx, "/b", &client.DeleteOptions{PrevValue: "bee"}))
	rec("Delete missing")(k.Delete(ctx, "/b", nil))
	rec("Delete dir Recursive")(k.Delete(ctx, "/d", &client.DeleteOptions{Recursive: true}))
	rec("Delete /q Recursive")(k.Delete(ctx, "/q", &client.DeleteOptions{Recursive: true, Dir: true}))
	rec("Set root")(k.Set(ctx, "/", "x", nil))
	rec("Delete /ttl")(k.Delete(ctx, "/ttl", nil))

	// A watcher from a known index receives every later event on /w, in order.
	start, err := k.Set(ctx, "/w/start", "s", nil)
	r.add("Set /w/start", start, err, false)
	if err != nil {
		return
	}
	w := k.Watcher("/w", &client.WatcherOptions{AfterIndex: start.Index, Recursive: true})
	rec("Set /w/a")(k.Set(ctx, "/w/a", "1", nil))
	rec("Update /w/a")(k.Update(ctx, "/w/a", "2"))
	rec("CreateInOrder /w/q")(k.CreateInOrder(ctx, "/w/q", "job", nil))
	rec("Set /w/_hidden")(k.Set(ctx, "/w/_hidden", "h", nil))
	rec("Delete /w/a")(k.Delete(ctx, "/w/a", nil))
	rec("Delete /w")(k.Delete(ctx, "/w", &client.DeleteOptions{Recursive: true}))
	for i := 0; i < 6; i++ {
		wctx, wcancel := context.WithTimeout(ctx, 10*time.Second)
		resp, err := w.Next(wctx)
		wcancel()
		rec(fmt.Sprintf("Watcher(AfterIndex) event %d", i+1))(resp, err)
		if err != nil {
			break
		}
	}

	// A live watcher (AfterIndex 0) gets the next change once it is registered.
	live := k.Watcher("/live", nil)
	type next struct {
		resp *client.Response
		err  error
	}
	got := make(chan next, 1)
	go func() {
		wctx, wcancel := context.WithTimeout(ctx, 20*time.Second)
		defer wcancel()
		resp, err := live.Next(wctx)
		got <- next{resp, err}
	}()
	s.waitWatchers(t, 1)
	rec("Set /live")(k.Set(ctx, "/live", "now", nil))
	n := <-got
	rec("live Watcher event")(n.resp, n.err)
}

// TestGoClientMatchesEtcd runs the same go.etcd.io/etcd/client/v2 script against etcd and
// against etcaddy and compares the outcomes call by call.
func TestGoClientMatchesEtcd(t *testing.T) {
	compareScripts(t, newDiffer(t, startEtcd(t), startSubject(t)), goClientScript)
}

// compareScripts runs script against both sides of d and compares what each recorded, call
// by call.
func compareScripts(t *testing.T, d *differ, script func(*testing.T, *diffSide, *recorder)) {
	t.Helper()
	var recs [2]*recorder
	for i, s := range d.sides() {
		recs[i] = &recorder{s: s}
		script(t, s, recs[i])
	}
	n := max(len(recs[0].lines), len(recs[1].lines))
	for i := 0; i < n; i++ {
		var a, b string
		if i < len(recs[0].lines) {
			a = recs[0].lines[i]
		}
		if i < len(recs[1].lines) {
			b = recs[1].lines[i]
		}
		if d.transcript != nil {
			fmt.Fprintf(d.transcript, "### call %d\n--- %s: %s\n--- %s: %s\n", i+1, d.ref.p.Name, a, d.sub.p.Name, b)
		}
		if a != b {
			t.Errorf("call %d differs:\n  %s: %s\n  %s: %s", i+1, d.ref.p.Name, a, d.sub.p.Name, b)
		}
	}
	if testing.Verbose() {
		t.Logf("%d calls compared", n)
	}
}

// TestPythonEtcdMatchesEtcd runs the same python-etcd script (testdata/python_etcd.py: keys,
// directories, compare-and-swap, TTL and refresh, in-order keys, watches, etcd.Lock, the
// cluster properties the client reads) against etcd and against etcaddy and compares the
// transcripts line by line.
func TestPythonEtcdMatchesEtcd(t *testing.T) { comparePythonScript(t, "python_etcd.py") }

// TestPythonEtcdAuthMatchesEtcd: python-etcd's auth classes, and clients with credentials.
func TestPythonEtcdAuthMatchesEtcd(t *testing.T) { comparePythonScript(t, "python_etcd_auth.py") }

// comparePythonScript runs testdata/<name> with python-etcd against a fresh etcd and a fresh
// etcaddy and compares what it printed, line by line.
func comparePythonScript(t *testing.T, name string) {
	t.Helper()
	script, err := filepath.Abs(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	d := newDiffer(t, startEtcd(t), startSubject(t))
	var out [2][]string
	for i, s := range d.sides() {
		u, err := url.Parse(s.p.ClientURL)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		cmd := exec.CommandContext(ctx, pythonBin, script, u.Hostname(), u.Port())
		// python-etcd sends sets in their iteration order: the same on both sides.
		cmd.Env = append(os.Environ(), "PYTHONHASHSEED=0")
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		stdout, err := cmd.Output()
		cancel()
		if err != nil {
			t.Fatalf("%s: python-etcd script: %v\nstdout:\n%s\nstderr:\n%s", s.p.Name, err, stdout, stderr.Bytes())
		}
		out[i] = strings.Split(strings.TrimRight(string(stdout), "\n"), "\n")
	}
	for i := range max(len(out[0]), len(out[1])) {
		var a, b string
		if i < len(out[0]) {
			a = out[0][i]
		}
		if i < len(out[1]) {
			b = out[1][i]
		}
		if d.transcript != nil {
			fmt.Fprintf(d.transcript, "### line %d\n--- %s: %s\n--- %s: %s\n", i+1, d.ref.p.Name, a, d.sub.p.Name, b)
		}
		if a != b {
			t.Errorf("line %d differs:\n  %s: %s\n  %s: %s", i+1, d.ref.p.Name, a, d.sub.p.Name, b)
		}
	}
	if testing.Verbose() {
		t.Logf("%d lines compared", len(out[0]))
	}
}
