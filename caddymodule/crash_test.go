package caddymodule

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// crashWriters is how many clients write at once while the process is killed:
// enough that several proposals share each Ready (one fsync), so a crash can
// land between the commit of a batch and the replies to its proposers.
const crashWriters = 16

// crashRounds is how many kill -9 / restart cycles one data directory goes
// through.
const crashRounds = 5

// crashAck is a write the server acknowledged: after any crash its key must
// read back with this value and this modifiedIndex.
type crashAck struct {
	Value string
	Index uint64
}

// crashNode is the part of a v2 node these tests read.
type crashNode struct {
	Key           string      `json:"key"`
	Value         string      `json:"value"`
	Dir           bool        `json:"dir"`
	Nodes         []crashNode `json:"nodes"`
	ModifiedIndex uint64      `json:"modifiedIndex"`
	CreatedIndex  uint64      `json:"createdIndex"`
}

// crashResponse is a v2 key response (an event or a get).
type crashResponse struct {
	Action string    `json:"action"`
	Node   crashNode `json:"node"`
}

// crashClient returns an HTTP client tuned for n concurrent callers to one
// server, with its own connection pool so a test's idle connections to a
// killed process are not reused by another test.
func crashClient(n int) *http.Client {
	return &http.Client{
		Transport: &http.Transport{
			DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
			MaxIdleConns:        n,
			MaxIdleConnsPerHost: n,
			IdleConnTimeout:     30 * time.Second,
		},
		Timeout: 30 * time.Second,
	}
}

// crashPut sets key to value (a plain v2 set, form in the body as etcdctl
// sends it) and returns the status and the decoded node. err is a transport
// or decoding error: the write is then not acknowledged.
func crashPut(ctx context.Context, c *http.Client, baseURL, key, value string) (int, crashNode, error) {
	return crashPutHeader(ctx, c, baseURL, key, value, nil)
}

// crashPutHeader is crashPut with extra request headers.
func crashPutHeader(ctx context.Context, c *http.Client, baseURL, key, value string, h http.Header) (int, crashNode, error) {
	form := url.Values{"value": {value}}
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, baseURL+"/v2/keys"+key, strings.NewReader(form.Encode()))
	if err != nil {
		return 0, crashNode{}, err
	}
	for k, v := range h {
		req.Header[k] = v
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	resp, err := c.Do(req)
	if err != nil {
		return 0, crashNode{}, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		// A body cut short by the kill: the client never saw the answer.
		return resp.StatusCode, crashNode{}, err
	}
	if resp.StatusCode/100 != 2 {
		return resp.StatusCode, crashNode{}, fmt.Errorf("PUT %s: %d %s", key, resp.StatusCode, crashShort(body))
	}
	var r crashResponse
	if err := json.Unmarshal(body, &r); err != nil {
		return resp.StatusCode, crashNode{}, fmt.Errorf("PUT %s: decoding %q: %w", key, body, err)
	}
	return resp.StatusCode, r.Node, nil
}

// crashGet GETs path (with its query) and returns status, X-Etcd-Index and body.
func crashGet(t testing.TB, c *http.Client, baseURL, path string) (int, uint64, []byte) {
	t.Helper()
	resp, err := c.Get(baseURL + path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: reading body: %v", path, err)
	}
	var index uint64
	if h := resp.Header.Get("X-Etcd-Index"); h != "" {
		index, err = strconv.ParseUint(h, 10, 64)
		if err != nil {
			t.Fatalf("GET %s: X-Etcd-Index %q: %v", path, h, err)
		}
	}
	return resp.StatusCode, index, body
}

// crashShort shortens a body for an error message.
func crashShort(b []byte) string {
	const limit = 300
	s := strings.TrimSpace(string(b))
	if len(s) > limit {
		return s[:limit] + "…"
	}
	return s
}

// crashFlatten collects every file under n, by key.
func crashFlatten(n crashNode, into map[string]crashNode) {
	if !n.Dir {
		into[n.Key] = n
		return
	}
	for _, c := range n.Nodes {
		crashFlatten(c, into)
	}
}

// crashVerifyAcked reads the directory dir recursively and checks that every
// acknowledged write is there with its value and modifiedIndex, and that the
// store index has not gone back below the highest acknowledged one. It
// returns the store index it read.
func crashVerifyAcked(t testing.TB, c *http.Client, baseURL, dir string, acked map[string]crashAck, highest uint64) uint64 {
	t.Helper()
	status, etcdIndex, body := crashGet(t, c, baseURL, "/v2/keys"+dir+"?recursive=true")
	if status != http.StatusOK {
		t.Fatalf("GET %s recursive after restart: %d %s", dir, status, crashShort(body))
	}
	var r crashResponse
	if err := json.Unmarshal(body, &r); err != nil {
		t.Fatalf("GET %s recursive: decoding: %v", dir, err)
	}
	got := make(map[string]crashNode, len(acked))
	crashFlatten(r.Node, got)
	var missing, wrong int
	for key, a := range acked {
		n, ok := got[key]
		switch {
		case !ok:
			missing++
			if missing <= 5 {
				st, _, b := crashGet(t, c, baseURL, "/v2/keys"+key)
				t.Errorf("acknowledged write lost: %s = %q at index %d; GET now answers %d %s", key, a.Value, a.Index, st, crashShort(b))
			}
		case n.Value != a.Value || n.ModifiedIndex != a.Index:
			wrong++
			if wrong <= 5 {
				t.Errorf("acknowledged write changed: %s = %q at index %d, now %q at index %d", key, a.Value, a.Index, n.Value, n.ModifiedIndex)
			}
		}
	}
	if missing+wrong > 0 {
		t.Errorf("%d of %d acknowledged writes lost, %d changed", missing, len(acked), wrong)
	}
	if etcdIndex < highest {
		t.Errorf("X-Etcd-Index after restart is %d, below the highest acknowledged index %d", etcdIndex, highest)
	}
	return etcdIndex
}

// crashRound runs crashWriters writers on p until the process is killed
// after delay of writing, and returns the writes it acknowledged. Writers
// write each key once, so every acknowledged write stays the latest value of
// its key.
func crashRound(t *testing.T, p *proc, c *http.Client, round int, delay time.Duration) map[string]crashAck {
	t.Helper()
	return crashRoundOn(t, []string{p.ClientURL}, c, round, delay, p.kill9)
}

// crashRoundOn is crashRound for writers spread over the client URLs urls (writer w writes
// to urls[w%len(urls)]), ended by kill, which must leave none of them running.
func crashRoundOn(t *testing.T, urls []string, c *http.Client, round int, delay time.Duration, kill func()) map[string]crashAck {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	var (
		mu       sync.Mutex
		acks     = make(map[string]crashAck)
		failures []string
		killed   atomic.Bool
		firstAck = make(chan struct{})
		once     sync.Once
		wg       sync.WaitGroup
	)
	fail := func(msg string) {
		mu.Lock()
		defer mu.Unlock()
		if len(failures) < 10 {
			failures = append(failures, msg)
		}
	}
	for w := 0; w < crashWriters; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for seq := 0; ctx.Err() == nil; seq++ {
				key := fmt.Sprintf("/crash/r%d/w%02d-%07d", round, w, seq)
				value := fmt.Sprintf("r%d/w%d/%d", round, w, seq)
				_, node, err := crashPut(ctx, c, urls[w%len(urls)], key, value)
				if err != nil {
					// After the kill every error is expected: the request
					// was in flight or the process is gone. Before it, an
					// error is a bug of the live server.
					if !killed.Load() {
						fail(fmt.Sprintf("writer %d before the kill: %v", w, err))
					}
					return
				}
				if node.Key != key || node.Value != value || node.ModifiedIndex == 0 {
					fail(fmt.Sprintf("writer %d: PUT %s = %q answered node %+v", w, key, value, node))
					return
				}
				mu.Lock()
				acks[key] = crashAck{Value: value, Index: node.ModifiedIndex}
				mu.Unlock()
				once.Do(func() { close(firstAck) })
			}
		}()
	}

	// The clock starts at the first acknowledged write, not at the start
	// of the writers, so a slow start cannot turn a round into a no-op.
	select {
	case <-firstAck:
	case <-time.After(30 * time.Second):
		killed.Store(true)
		cancel()
		wg.Wait()
		t.Fatalf("round %d: no write acknowledged within 30s; failures: %v", round, failures)
	}
	// A timer, not a condition: the random moment of the kill is what this
	// test varies.
	timer := time.NewTimer(delay)
	<-timer.C
	killed.Store(true)
	kill()
	cancel()
	wg.Wait()
	c.CloseIdleConnections()

	for _, f := range failures {
		t.Errorf("round %d: %s", round, f)
	}
	return acks
}

// crashRestartAndCheck restarts p after a crash, checks every acknowledged write (see
// crashVerifyAcked), and writes once more, which must get a higher index than any before;
// that write joins acked. It returns the highest acknowledged index, and ends the test
// when anything failed.
func crashRestartAndCheck(t *testing.T, p *proc, c *http.Client, round int, acked map[string]crashAck, highest uint64) uint64 {
	t.Helper()
	p.restart(t)
	etcdIndex := crashVerifyAcked(t, c, p.ClientURL, "/crash", acked, highest)
	key := fmt.Sprintf("/crash/after/r%d", round)
	_, node, err := crashPut(context.Background(), c, p.ClientURL, key, "after")
	if err != nil {
		t.Fatalf("round %d: write after restart: %v", round, err)
	}
	if node.ModifiedIndex <= etcdIndex || node.ModifiedIndex <= highest {
		t.Errorf("round %d: write after restart got index %d; store index was %d, highest acknowledged %d", round, node.ModifiedIndex, etcdIndex, highest)
	}
	acked[key] = crashAck{Value: "after", Index: node.ModifiedIndex}
	if t.Failed() {
		t.FailNow()
	}
	return max(highest, node.ModifiedIndex)
}

// TestKill9DuringWritesLosesNoAcknowledgedWrite kills the process with
// SIGKILL while 16 clients write, restarts it on the same data directory and
// checks that every write it acknowledged is there with its modifiedIndex,
// that the store index did not go back, and that new writes get higher
// indexes. The compacting variant snapshots and truncates the Raft log every
// few entries, so restarts also recover from a snapshot plus a log suffix.
func TestKill9DuringWritesLosesNoAcknowledgedWrite(t *testing.T) {
	for _, tc := range []struct {
		name          string
		snapshotCount int
	}{
		{name: "default"},
		{name: "compacting", snapshotCount: 50},
	} {
		t.Run(tc.name, func(t *testing.T) {
			seed := uint64(time.Now().UnixNano())
			t.Logf("seed %d", seed)
			rng := rand.New(rand.NewPCG(seed, seed>>32))

			p := startEtcaddy(t, etcaddyOpts{SnapshotCount: tc.snapshotCount})
			c := crashClient(crashWriters)
			defer c.CloseIdleConnections()

			acked := make(map[string]crashAck)
			var highest uint64
			for round := 0; round < crashRounds; round++ {
				delay := 100*time.Millisecond + time.Duration(rng.Int64N(int64(700*time.Millisecond)))
				roundAcks := crashRound(t, p, c, round, delay)
				for k, a := range roundAcks {
					acked[k] = a
					highest = max(highest, a.Index)
				}
				t.Logf("round %d: killed after %v of writing, %d writes acknowledged, highest index %d", round, delay.Round(time.Millisecond), len(roundAcks), highest)

				highest = crashRestartAndCheck(t, p, c, round, acked, highest)
			}
			if tc.snapshotCount > 0 {
				// The variant is only worth its time if the log was compacted:
				// raftkv logs each snapshot it takes.
				log, err := os.ReadFile(p.LogPath)
				if err != nil {
					t.Fatal(err)
				}
				n := strings.Count(string(log), "snapshot taken")
				if n == 0 {
					t.Errorf("no \"snapshot taken\" in the member's log with snapshot_count %d: the crashes did not cross a compaction", tc.snapshotCount)
				}
				t.Logf("%d snapshots taken across %d crashes", n, crashRounds)
			}
		})
	}
}
