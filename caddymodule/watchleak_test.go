package caddymodule

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

const (
	watchleakTotal = 10000
	watchleakBatch = 500
	// watchleakGoroutineMargin absorbs goroutines that come and go on their
	// own (timers, the admin server's own connection, GC workers).
	watchleakGoroutineMargin = 25
	// watchleakRSSBound is a leak check, not a speed claim: 10,000 leaked
	// watchers with their connections would cost well above it.
	watchleakRSSBound = 64 << 20
)

// watchleakGoroutines reads the member's goroutine count from the pprof
// endpoint on Caddy's admin API.
func watchleakGoroutines(t testing.TB, c *http.Client, adminURL string) int {
	t.Helper()
	status, _, body := crashGet(t, c, adminURL, "/debug/pprof/goroutine?debug=1")
	if status != http.StatusOK {
		t.Fatalf("GET /debug/pprof/goroutine: %d %s", status, crashShort(body))
	}
	line, _, _ := strings.Cut(string(body), "\n")
	n, err := strconv.Atoi(strings.TrimPrefix(line, "goroutine profile: total "))
	if err != nil {
		t.Fatalf("goroutine profile header %q: %v", line, err)
	}
	return n
}

// watchleakRSS returns the resident set size of process pid, in bytes.
func watchleakRSS(t testing.TB, pid int) int64 {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if v, ok := strings.CutPrefix(s.Text(), "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err != nil {
				t.Fatalf("VmRSS %q: %v", v, err)
			}
			return kb << 10
		}
	}
	t.Fatalf("no VmRSS in /proc/%d/status", pid)
	return 0
}

// watchleakWatchers reads "watchers" from /v2/stats/store.
func watchleakWatchers(t testing.TB, c *http.Client, baseURL string) int64 {
	t.Helper()
	status, _, body := crashGet(t, c, baseURL, "/v2/stats/store")
	if status != http.StatusOK {
		t.Fatalf("GET /v2/stats/store: %d %s", status, crashShort(body))
	}
	var stats struct {
		Watchers *int64 `json:"watchers"`
	}
	if err := json.Unmarshal(body, &stats); err != nil || stats.Watchers == nil {
		t.Fatalf("/v2/stats/store has no watchers count: %s", crashShort(body))
	}
	return *stats.Watchers
}

// watchleakPoll polls cond until it holds or d has passed.
func watchleakPoll(t testing.TB, d time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	var state string
	if !poll(d, func() (ok bool) { ok, state = cond(); return ok }) {
		t.Fatalf("%s: not within %v (%s)", what, d, state)
	}
}

// TestWatchersThatComeAndGoLeaveNothing opens 10,000 watches of assorted
// kinds, each abandoned by its client before any event, and checks that the
// member gets back to where it was: no watcher left in the hub, no
// goroutine left behind, memory not grown, and watching still works.
// etcd drops a watcher when its client goes away (CloseNotify); a server that
// forgot to would keep one goroutine and one hub entry per abandoned watch.
func TestWatchersThatComeAndGoLeaveNothing(t *testing.T) {
	p := startEtcaddy(t, etcaddyOpts{})
	ctl := crashClient(2)
	defer ctl.CloseIdleConnections()
	pid := p.Cmd.Process.Pid

	// Warm up: keys to watch, and one watch that fires, so the first-use
	// allocations of the watch path are in the baseline.
	for _, k := range []string{"/wl/a", "/wl/dir/b", "/wl/_hidden"} {
		if _, _, err := crashPut(context.Background(), ctl, p.ClientURL, k, "v"); err != nil {
			t.Fatalf("PUT %s: %v", k, err)
		}
	}
	watchleakFires(t, ctl, p.ClientURL, "/wl/warm")
	_, index, _ := crashGet(t, ctl, p.ClientURL, "/v2/keys/wl")
	if index == 0 {
		t.Fatal("no X-Etcd-Index on GET /v2/keys/wl")
	}
	watchleakPoll(t, 10*time.Second, "warm-up watcher removed", func() (bool, string) {
		n := watchleakWatchers(t, ctl, p.ClientURL)
		return n == 0, fmt.Sprintf("%d watchers", n)
	})
	baseGoroutines := watchleakGoroutines(t, ctl, p.AdminURL)
	baseRSS := watchleakRSS(t, pid)

	// None of these paths is written while they are watched, so no watch
	// may end with an event: each ends only by its client cancelling it.
	paths := []string{
		"/v2/keys/wl/a?wait=true",
		"/v2/keys/wl?wait=true&recursive=true",
		"/v2/keys/wl/dir?wait=true&recursive=true",
		"/v2/keys/wl/missing/deep/key?wait=true",
		fmt.Sprintf("/v2/keys/wl/a?wait=true&waitIndex=%d", index+1),
		"/v2/keys/?wait=true&recursive=true",
		fmt.Sprintf("/v2/keys/wl/dir/b?wait=true&waitIndex=%d", index+100),
		"/v2/keys/wl/_hidden?wait=true",
		"/v2/keys/wl/s?wait=true&stream=true",
		"/v2/keys/wl/dir?wait=true&recursive=true&stream=true",
	}
	wtr := &http.Transport{MaxIdleConnsPerHost: watchleakBatch, MaxConnsPerHost: 0}
	defer wtr.CloseIdleConnections()
	wc := &http.Client{Transport: wtr}

	for b := 0; b < watchleakTotal/watchleakBatch; b++ {
		ctx, cancel := context.WithCancel(context.Background())
		var (
			wg       sync.WaitGroup
			mu       sync.Mutex
			problems []string
		)
		registered := make(chan struct{}, watchleakBatch)
		problem := func(s string) {
			mu.Lock()
			defer mu.Unlock()
			if len(problems) < 5 {
				problems = append(problems, s)
			}
		}
		for i := 0; i < watchleakBatch; i++ {
			path := paths[(b*watchleakBatch+i)%len(paths)]
			wg.Add(1)
			go func() {
				defer wg.Done()
				req, _ := http.NewRequestWithContext(ctx, http.MethodGet, p.ClientURL+path, nil)
				resp, err := wc.Do(req)
				if err != nil {
					problem(fmt.Sprintf("%s: %v", path, err))
					registered <- struct{}{}
					return
				}
				defer resp.Body.Close()
				// etcd flushes a watch's headers as soon as the watcher is
				// registered, so from here the server holds a watcher.
				registered <- struct{}{}
				if resp.StatusCode != http.StatusOK {
					body, _ := io.ReadAll(resp.Body)
					problem(fmt.Sprintf("%s: %d %s", path, resp.StatusCode, crashShort(body)))
					return
				}
				if body, _ := io.ReadAll(resp.Body); len(body) > 0 {
					problem(fmt.Sprintf("%s: an event with nothing written: %s", path, crashShort(body)))
				}
			}()
		}
		timeout := time.NewTimer(60 * time.Second)
		for i := 0; i < watchleakBatch; i++ {
			select {
			case <-registered:
			case <-timeout.C:
				cancel()
				wg.Wait()
				t.Fatalf("batch %d: only %d of %d watches answered with headers within 60s", b, i, watchleakBatch)
			}
		}
		timeout.Stop()
		if n := watchleakWatchers(t, ctl, p.ClientURL); n < watchleakBatch {
			t.Errorf("batch %d: %d watches open but /v2/stats/store counts %d watchers", b, watchleakBatch, n)
		}
		cancel()
		wg.Wait()
		for _, s := range problems {
			t.Errorf("batch %d: %s", b, s)
		}
		if t.Failed() {
			t.FailNow()
		}
	}
	wtr.CloseIdleConnections()

	watchleakPoll(t, 30*time.Second, "watchers back to 0", func() (bool, string) {
		n := watchleakWatchers(t, ctl, p.ClientURL)
		return n == 0, fmt.Sprintf("%d watchers", n)
	})
	watchleakPoll(t, 30*time.Second, "goroutines back to the baseline", func() (bool, string) {
		n := watchleakGoroutines(t, ctl, p.AdminURL)
		return n <= baseGoroutines+watchleakGoroutineMargin, fmt.Sprintf("%d goroutines, baseline %d", n, baseGoroutines)
	})
	rss := watchleakRSS(t, pid)
	t.Logf("%d watches: goroutines %d → %d, RSS %d → %d MiB", watchleakTotal, baseGoroutines, watchleakGoroutines(t, ctl, p.AdminURL), baseRSS>>20, rss>>20)
	if rss-baseRSS > watchleakRSSBound {
		t.Errorf("RSS grew from %d MiB to %d MiB over %d abandoned watches", baseRSS>>20, rss>>20, watchleakTotal)
	}

	watchleakFires(t, ctl, p.ClientURL, "/wl/final")
}

// watchleakFires watches key, writes it once the watch is registered and
// checks the watch returns that write.
func watchleakFires(t testing.TB, c *http.Client, baseURL, key string) {
	t.Helper()
	wc := &http.Client{Transport: &http.Transport{}, Timeout: 30 * time.Second}
	defer wc.CloseIdleConnections()
	resp, err := wc.Get(baseURL + "/v2/keys" + key + "?wait=true")
	if err != nil {
		t.Fatalf("watch %s: %v", key, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("watch %s: %d %s", key, resp.StatusCode, crashShort(b))
	}
	_, node, err := crashPut(context.Background(), c, baseURL, key, "fired")
	if err != nil {
		t.Fatalf("PUT %s: %v", key, err)
	}
	var ev crashResponse
	if err := json.NewDecoder(resp.Body).Decode(&ev); err != nil {
		t.Fatalf("watch %s: reading the event: %v", key, err)
	}
	if ev.Action != "set" || ev.Node.Key != key || ev.Node.Value != "fired" || ev.Node.ModifiedIndex != node.ModifiedIndex {
		t.Errorf("watch %s got %+v, want set %q at index %d", key, ev, "fired", node.ModifiedIndex)
	}
}
