package caddymodule

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestProxyReadTimeoutAsEtcd: a proxy with a read timeout (etcd's
// --proxy-read-timeout, raftkv's proxy_read_timeout) in front of a member
// that stops answering (SIGSTOP) answers 502 once the timeout passes, 503
// while it leaves the member out (the failure wait), and the member's
// answers again once it is back; a watch through it that waits longer than
// the timeout ends with an empty 200. etcd's proxy and etcaddy's alike.
func TestProxyReadTimeoutAsEtcd(t *testing.T) {
	const readTimeout, failureWait = 700 * time.Millisecond, 2 * time.Second

	e := startEtcd(t)
	epeer := e.args[slices.Index(e.args, "--initial-advertise-peer-urls")+1]
	ep := etcdProc(t, "etcd proxy", fmt.Sprintf("http://127.0.0.1:%d", freePort(t)),
		"--proxy", "on", "--initial-cluster", "default="+epeer,
		"--proxy-read-timeout", fmt.Sprint(readTimeout.Milliseconds()),
		"--proxy-failure-wait", fmt.Sprint(failureWait.Milliseconds()))
	ep.spawn(t)
	if !poll(20*time.Second, func() bool {
		st, _, body, err := ep.tryDo(context.Background(), "GET", "/v2/config/local/proxy", nil)
		return err == nil && st == http.StatusOK && strings.Contains(string(body), e.ClientURL)
	}) {
		t.Fatalf("etcd's proxy never found its member:\n%s", ep.logTail(20))
	}
	want := proxyTimeoutScript(t, e, ep, failureWait)
	ep.stop()

	c := &testCluster{t: t}
	m := c.newTestMember("m1")
	c.writeCaddyfile(m, []*testMember{m}, "new")
	m.launch(t)
	p := c.newTestMember("p")
	if err := os.WriteFile(p.Caddyfile, []byte(proxyCaddyfile(p, "on", m,
		"proxy_read_timeout "+readTimeout.String(), "proxy_failure_wait "+failureWait.String())), 0o644); err != nil {
		t.Fatal(err)
	}
	p.launch(t)
	compareAnswers(t, want, proxyTimeoutScript(t, m.proc, p.proc, failureWait))
}

// proxyTimeoutScript sends the same requests to a proxy with a read
// timeout of a one-member cluster, stopping the member (SIGSTOP) in
// between.
func proxyTimeoutScript(t *testing.T, member, proxy *proc, failureWait time.Duration) []fallbackAnswer {
	t.Helper()
	var out []fallbackAnswer
	ask := func(method, path string, form url.Values) int {
		t.Helper()
		// Longer than any timeout of either proxy: a proxy that would
		// wait on a stopped member for ever fails here.
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		st, h, body, err := proxy.tryDo(ctx, method, path, form)
		if err != nil {
			t.Fatalf("%s %s through %s: %v", method, path, proxy.Name, err)
		}
		b := strings.ReplaceAll(string(body), member.ClientURL, "<member>")
		b = indexFields.ReplaceAllString(b, `"$1":N`)
		out = append(out, fallbackAnswer{st, h.Get("Content-Type") + " cors=" + h.Get("Access-Control-Allow-Origin"), b})
		return st
	}
	ask("PUT", "/v2/keys/rt", url.Values{"value": {"1"}})
	// Nothing happens to the key: the watch ends at the read timeout.
	ask("GET", "/v2/keys/rt?wait=true", nil)

	if err := syscall.Kill(member.Cmd.Process.Pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	resume := func() { _ = syscall.Kill(member.Cmd.Process.Pid, syscall.SIGCONT) }
	t.Cleanup(resume)
	ask("GET", "/v2/keys/rt", nil) // 502: the member does not answer
	ask("GET", "/v2/keys/rt", nil) // 503: and is left out
	resume()

	// Back once the failure wait is over.
	if !poll(failureWait+15*time.Second, func() bool {
		n := len(out)
		if ask("GET", "/v2/keys/rt", nil) == http.StatusOK {
			return true
		}
		out = out[:n]
		return false
	}) {
		t.Fatalf("%s does not answer through %s after SIGCONT", member.Name, proxy.Name)
	}
	return out
}
