package caddymodule

// Cluster tests under crashes beyond the register check: a streaming watch
// on a follower that must see every write through leader changes, and a
// five-member cluster that must keep committing with two members down.

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// watchedEvent is an event a watcher received.
type watchedEvent struct {
	Action string
	Node   crashNode
}

// streamWatcher follows a recursive streaming watch on one member and, when
// the stream ends, resumes it from the index after the last event it saw,
// as an etcd v2 client does: etcd ends a stream whose reader falls behind.
type streamWatcher struct {
	m   *testMember
	dir string

	mu      sync.Mutex
	events  []watchedEvent
	resumes int
	err     error              // why the watcher gave up
	cancel  context.CancelFunc // ends the current request
}

// maxWatchResumes bounds the resumptions: a stream that ends at once each
// time would otherwise spin.
const maxWatchResumes = 200

// run watches from waitIndex until ctx ends or the watch cannot go on.
func (w *streamWatcher) run(ctx context.Context, waitIndex uint64) {
	for attempt := 0; ; attempt++ {
		w.mu.Lock()
		if n := len(w.events); n > 0 {
			waitIndex = w.events[n-1].Node.ModifiedIndex + 1
		}
		if attempt > 0 {
			w.resumes++
		}
		w.mu.Unlock()
		if attempt > maxWatchResumes {
			w.fail(fmt.Errorf("the stream ended %d times", attempt))
			return
		}
		path := fmt.Sprintf("/v2/keys%s?wait=true&recursive=true&stream=true&waitIndex=%d", w.dir, waitIndex)
		rctx, rcancel := context.WithCancel(ctx)
		w.mu.Lock()
		w.cancel = rcancel
		w.mu.Unlock()
		req, err := w.m.newRequest(rctx, http.MethodGet, path, nil)
		if err != nil {
			rcancel()
			w.fail(err)
			return
		}
		// testClient has no overall timeout: the stream lasts the test.
		resp, err := testClient.Do(req)
		if err != nil {
			rcancel()
			if ctx.Err() == nil {
				w.fail(fmt.Errorf("GET %s: %v", path, err))
			}
			return
		}
		if resp.StatusCode != http.StatusOK {
			var body [512]byte
			n, _ := resp.Body.Read(body[:])
			resp.Body.Close()
			rcancel()
			// 400 errorCode 401 would mean the history moved past waitIndex.
			w.fail(fmt.Errorf("GET %s: %d %s", path, resp.StatusCode, crashShort(body[:n])))
			return
		}
		dec := json.NewDecoder(resp.Body)
		for {
			var ev watchedEvent
			if err := dec.Decode(&ev); err != nil {
				break
			}
			w.mu.Lock()
			w.events = append(w.events, ev)
			w.mu.Unlock()
		}
		resp.Body.Close()
		rcancel()
		if ctx.Err() != nil {
			return
		}
	}
}

// cut ends the current watch request, as a client connection lost would:
// the watcher resumes from the index after the last event it saw.
func (w *streamWatcher) cut() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.cancel != nil {
		w.cancel()
	}
}

func (w *streamWatcher) fail(err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.err = err
}

// seenUpTo reports whether the watcher has an event at index or later, and
// its error if it gave up.
func (w *streamWatcher) seenUpTo(index uint64) (bool, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := len(w.events)
	return n > 0 && w.events[n-1].Node.ModifiedIndex >= index, w.err
}

// etcdIndex reads X-Etcd-Index from a GET of / on m.
func etcdIndex(t *testing.T, m *testMember) uint64 {
	t.Helper()
	st, h, body := m.do(t, "GET", "/v2/keys/?quorum=true", nil)
	idx, err := strconv.ParseUint(h.Get("X-Etcd-Index"), 10, 64)
	if st != http.StatusOK || err != nil {
		t.Fatalf("%s: GET /: %d X-Etcd-Index %q %s", m.Name, st, h.Get("X-Etcd-Index"), crashShort(body))
	}
	return idx
}

// TestFollowerWatchSeesEveryEventThroughLeaderChanges follows a recursive
// streaming watch on a follower while writers put keys through the other
// members and the leader is killed with SIGKILL and restarted, twice. etcd
// promises a watcher every event in order, none twice (api_guarantees; the
// Jepsen watch workload): the watcher must see every acknowledged write
// once, in increasing modifiedIndex, with its value, and exactly what a
// quorum read of the directory shows at the end.
func TestFollowerWatchSeesEveryEventThroughLeaderChanges(t *testing.T) {
	const (
		dir     = "/watch"
		writers = 4
		// perPhase writes go out between two faults; five phases give 500.
		perPhase = 100
	)
	c := startCluster(t, 3, nil)
	ms := c.members
	leader := agreedLeader(t, ms, "", 10*time.Second)
	var watched *testMember
	var others []*testMember
	for _, m := range ms {
		if watched == nil && m.Name != leader.Name {
			watched = m
		} else {
			others = append(others, m)
		}
	}
	t.Logf("leader %s; watching on %s", leader.Name, watched.Name)

	w := &streamWatcher{m: watched, dir: dir}
	wctx, wcancel := context.WithCancel(context.Background())
	var wwg sync.WaitGroup
	defer func() {
		wcancel()
		wwg.Wait()
	}()
	start := etcdIndex(t, watched) + 1
	wwg.Go(func() { w.run(wctx, start) })

	// Writers take one token per write, so that the test decides how many
	// writes go out between two faults; each key is written once.
	client := crashClient(writers)
	defer client.CloseIdleConnections()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer func() {
		cancel()
		wg.Wait()
	}()
	tokens := make(chan struct{}, 5*perPhase)
	var (
		mu       sync.Mutex
		acked    = make(map[string]crashAck)
		finished atomic.Int64
		granted  int64
		seq      atomic.Int64
	)
	for i := range writers {
		wg.Go(func() {
			for {
				select {
				case <-ctx.Done():
					return
				case <-tokens:
				}
				n := seq.Add(1)
				key := fmt.Sprintf("%s/k%06d", dir, n)
				value := fmt.Sprintf("value %d by writer %d", n, i)
				// Through a member other than the watched one; a refused
				// connection (that member is down) sent nothing, so the
				// write goes to the other one.
				for try := 0; ctx.Err() == nil; try++ {
					m := others[(int(n)+try)%len(others)]
					rctx, rcancel := context.WithTimeout(ctx, 15*time.Second)
					_, node, err := crashPut(rctx, client, m.ClientURL, key, value)
					rcancel()
					if err == nil {
						mu.Lock()
						acked[key] = crashAck{Value: value, Index: node.ModifiedIndex}
						mu.Unlock()
					}
					if err == nil || !linNeverSent(err) {
						// Acknowledged, or indeterminate: it may exist,
						// and then the watcher and the final read have it.
						break
					}
				}
				finished.Add(1)
			}
		})
	}
	grant := func(n int) {
		granted += int64(n)
		for range n {
			tokens <- struct{}{}
		}
	}
	awaitWrites := func(what string) {
		t.Helper()
		if !poll(45*time.Second, func() bool { return finished.Load() >= granted }) {
			t.Fatalf("%s: %d of %d writes finished", what, finished.Load(), granted)
		}
	}

	grant(perPhase)
	awaitWrites("before the first kill")
	changes := 0
	cur := leader
	for cycle := 1; cycle <= 2; cycle++ {
		victim := c.byName(cur.Name)
		if victim == watched {
			// The watched member leads: kill another, never the watched one.
			victim = others[0]
		}
		victim.kill9()
		t.Logf("cycle %d: killed %s (leader %s)", cycle, victim.Name, cur.Name)
		// The watch is also cut once per cycle, while writes flow: what
		// happens until it resumes must come from the follower's history.
		cut := time.AfterFunc(time.Duration(cycle)*100*time.Millisecond, w.cut)
		defer cut.Stop()
		// Writes go out during the election, and wait for its end.
		grant(perPhase)
		var survivors []*testMember
		for _, m := range ms {
			if m != victim {
				survivors = append(survivors, m)
			}
		}
		not := ""
		if victim.Name == cur.Name {
			not = cur.ID
		}
		next := agreedLeader(t, survivors, not, 10*time.Second)
		if next.ID != cur.ID {
			changes++
		}
		t.Logf("cycle %d: leader %s", cycle, next.Name)
		cur = next
		awaitWrites(fmt.Sprintf("cycle %d, %s down", cycle, victim.Name))
		victim.restart(t)
		cur = agreedLeader(t, ms, "", 15*time.Second)
		grant(perPhase)
		awaitWrites(fmt.Sprintf("cycle %d, %s back", cycle, victim.Name))
	}
	cancel()
	wg.Wait()
	t.Logf("%d leader changes; %d writes, %d acknowledged", changes, granted, len(acked))
	if len(acked) < 300 {
		t.Fatalf("only %d writes acknowledged", len(acked))
	}

	// What the directory holds at the end, read with quorum on the watched
	// member; the watcher must reach its last index.
	final := quorumKeys(t, watched, dir)
	var last uint64
	for _, n := range final {
		last = max(last, n.ModifiedIndex)
	}
	var werr error
	if !poll(30*time.Second, func() bool {
		var done bool
		done, werr = w.seenUpTo(last)
		return done || werr != nil
	}) || werr != nil {
		t.Fatalf("the watcher never reached index %d: %v", last, werr)
	}
	wcancel()
	wwg.Wait()

	w.mu.Lock()
	events, resumes := w.events, w.resumes
	w.mu.Unlock()
	t.Logf("watcher: %d events, %d resumptions", len(events), resumes)
	if resumes < 2 {
		t.Errorf("the watch was cut twice, yet resumed %d times", resumes)
	}
	seen := make(map[string]crashNode, len(events))
	prev := start - 1
	bad := 0
	complain := func(format string, args ...any) {
		if bad++; bad <= 10 {
			t.Errorf(format, args...)
		}
	}
	for i, ev := range events {
		n := ev.Node
		if n.ModifiedIndex <= prev {
			complain("event %d (%s %s) at index %d, after index %d", i, ev.Action, n.Key, n.ModifiedIndex, prev)
		}
		prev = n.ModifiedIndex
		if ev.Action != "set" {
			complain("event %d: action %q on %s", i, ev.Action, n.Key)
		}
		if _, dup := seen[n.Key]; dup {
			complain("event %d: %s seen twice", i, n.Key)
		}
		seen[n.Key] = n
	}
	for key, a := range acked {
		n, ok := seen[key]
		if !ok || n.Value != a.Value || n.ModifiedIndex != a.Index {
			complain("acknowledged %s = %q at index %d: watcher saw %+v (present %v)", key, a.Value, a.Index, n, ok)
		}
	}
	for key, f := range final {
		n, ok := seen[key]
		if !ok || n.Value != f.Value || n.ModifiedIndex != f.ModifiedIndex {
			complain("quorum read has %s = %q at index %d: watcher saw %+v (present %v)", key, f.Value, f.ModifiedIndex, n, ok)
		}
	}
	for key, n := range seen {
		if _, ok := final[key]; !ok {
			complain("watcher saw %s = %q at index %d, which the quorum read does not have", key, n.Value, n.ModifiedIndex)
		}
	}
	if bad > 0 {
		t.Errorf("%d problems in %d events (%d acknowledged writes, %d keys at the end)", bad, len(events), len(acked), len(final))
	}
}

// TestFiveMemberClusterSurvivesTwoFailures kills two of five members, the
// leader among them, with SIGKILL while clients write to every member: the
// three left still form a quorum, elect a leader and commit; once both are
// restarted, every member has every acknowledged write.
func TestFiveMemberClusterSurvivesTwoFailures(t *testing.T) {
	const dir = "/five"
	c := startCluster(t, 5, nil)
	ms := c.members
	old := agreedLeader(t, ms, "", 10*time.Second)
	// The leader and one follower go down.
	victims := []*testMember{c.byName(old.Name)}
	var survivors []*testMember
	for _, m := range ms {
		switch {
		case m.Name == old.Name:
		case len(victims) == 1:
			victims = append(victims, m)
		default:
			survivors = append(survivors, m)
		}
	}

	const writers = 8
	client := crashClient(writers)
	defer client.CloseIdleConnections()
	ctx, cancel := context.WithCancel(context.Background())
	var (
		mu     sync.Mutex
		acked  = make(map[string]crashAck)
		nAcked atomic.Int64
		wg     sync.WaitGroup
	)
	defer func() {
		cancel()
		wg.Wait()
	}()
	for w := range writers {
		wg.Go(func() {
			for seq := 0; ctx.Err() == nil; seq++ {
				m := ms[(w+seq)%len(ms)]
				key := fmt.Sprintf("%s/w%d-%06d", dir, w, seq)
				value := fmt.Sprintf("%d/%d via %s", w, seq, m.Name)
				rctx, rcancel := context.WithTimeout(ctx, 15*time.Second)
				_, node, err := crashPut(rctx, client, m.ClientURL, key, value)
				rcancel()
				if err != nil {
					// Not acknowledged (a member down, a request cut by the
					// kill): the write may or may not exist.
					continue
				}
				mu.Lock()
				acked[key] = crashAck{Value: value, Index: node.ModifiedIndex}
				mu.Unlock()
				nAcked.Add(1)
			}
		})
	}
	waitAcks := func(n int64, what string) {
		t.Helper()
		if !poll(30*time.Second, func() bool { return nAcked.Load() >= n }) {
			t.Fatalf("%s: only %d writes acknowledged", what, nAcked.Load())
		}
	}
	waitAcks(100, "five members")

	for _, v := range victims {
		v.kill9()
	}
	t.Logf("killed %v (leader %s)", names(victims), old.Name)
	next := agreedLeader(t, survivors, old.ID, 10*clusterElectionTimeout)
	t.Logf("%s leads %v", next.Name, names(survivors))
	waitAcks(nAcked.Load()+100, "three members")
	// Each of the three left takes a write of its own.
	for _, m := range survivors {
		key := dir + "/direct-" + m.Name
		value := "with two down, via " + m.Name
		rctx, rcancel := context.WithTimeout(context.Background(), 15*time.Second)
		_, node, err := crashPut(rctx, client, m.ClientURL, key, value)
		rcancel()
		if err != nil {
			t.Fatalf("%s, with %v down: %v", m.Name, names(victims), err)
		}
		mu.Lock()
		acked[key] = crashAck{Value: value, Index: node.ModifiedIndex}
		mu.Unlock()
	}

	for _, v := range victims {
		v.restart(t)
	}
	agreedLeader(t, ms, "", 15*time.Second)
	waitAcks(nAcked.Load()+100, "after the restarts")
	cancel()
	wg.Wait()
	t.Logf("%d writes acknowledged", len(acked))
	for _, m := range ms {
		checkAcked(t, m, dir, acked)
	}
}
