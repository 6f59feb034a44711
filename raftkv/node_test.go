package raftkv

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/etcaddy/etcaddy/storage"
	"go.etcd.io/raft/v3/raftpb"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"google.golang.org/protobuf/proto"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// startNode starts a member on dir and stops it when the test ends.
func startNode(t *testing.T, dir string, edit func(*Config), hooks ...func(*Node)) *Node {
	t.Helper()
	cfg := Config{
		DataDir: dir,
		Logger:  zaptest.NewLogger(t, zaptest.Level(zap.InfoLevel)),
	}
	if edit != nil {
		edit(&cfg)
	}
	n := NewNode(cfg)
	for _, h := range hooks {
		h(n)
	}
	if err := n.Start(); err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		if err := n.Stop(); err != nil {
			t.Errorf("Stop: %v", err)
		}
	})
	waitFor(t, "leader", func() bool { return n.Status().IsLeader })
	return n
}

// waitFor polls cond until it holds or 10 s pass.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	waitForWithin(t, 10*time.Second, what, cond)
}

// waitOnEach waits, member by member, until cond holds on each of ms (what
// and the member's name say which did not).
func waitOnEach(t *testing.T, ms []*testMember, what string, cond func(m *testMember) bool) {
	t.Helper()
	for _, m := range ms {
		waitFor(t, what+" on "+m.name, func() bool { return cond(m) })
	}
}

// waitForWithin polls cond until it holds or limit passes.
func waitForWithin(t *testing.T, limit time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.NewTimer(limit)
	defer deadline.Stop()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-deadline.C:
			t.Fatalf("timed out waiting for %s", what)
		case <-tick.C:
		}
	}
}

func put(t *testing.T, n *Node, key, val string) *storage.Event {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ev, err := n.Do(ctx, storage.Request{Method: storage.MethodPut, Path: key, Val: val})
	if err != nil {
		t.Fatalf("PUT %s: %v", key, err)
	}
	return ev
}

func value(t *testing.T, ev *storage.Event) string {
	t.Helper()
	if ev == nil || ev.Node == nil || ev.Node.Value == nil {
		t.Fatalf("event without a value: %+v", ev)
	}
	return *ev.Node.Value
}

func TestSingleMemberElectsItselfAndServesWrites(t *testing.T) {
	n := startNode(t, t.TempDir(), nil)

	ev := put(t, n, "/foo", "bar")
	if ev.Action != storage.ActionSet || value(t, ev) != "bar" {
		t.Fatalf("PUT answered %+v", ev)
	}
	got, err := n.Get(context.Background(), "/foo", false, false, false)
	if err != nil || value(t, got) != "bar" {
		t.Fatalf("Get = %+v, %v", got, err)
	}

	// etcd's defaults give these IDs to a member named "default" with peer
	// URL http://localhost:2380 in cluster "etcd-cluster".
	st := n.Status()
	if st.ID != 0x8e9e05c52164694d || st.ClusterID != 0xcdf818194e3a8c32 {
		t.Errorf("IDs = %x/%x, want etcd's 8e9e05c52164694d/cdf818194e3a8c32", st.ID, st.ClusterID)
	}
	if st.Leader != st.ID || st.Term == 0 || st.RaftIndex == 0 || st.EtcdIndex == 0 {
		t.Errorf("Status = %+v", st)
	}
	ms := n.Members()
	if len(ms) != 1 || ms[0].ID != st.ID || ms[0].Name != "default" || ms[0].PeerURLs[0] != "http://localhost:2380" || ms[0].ClientURLs == nil {
		t.Errorf("Members = %+v", ms)
	}
	ss := n.SelfStats()
	if ss.State != "StateLeader" || ss.ID != "8e9e05c52164694d" || ss.LeaderInfo.Leader != ss.ID || ss.Name != "default" {
		t.Errorf("SelfStats = %+v", ss)
	}
	js, err := json.Marshal(ss)
	if err != nil {
		t.Fatal(err)
	}
	for _, field := range []string{`"state":"StateLeader"`, `"leaderInfo":{"leader":"8e9e05c52164694d","uptime":"`, `"recvAppendRequestCnt":0`, `"sendAppendRequestCnt":0`} {
		if !strings.Contains(string(js), field) {
			t.Errorf("self stats %s lack %s", js, field)
		}
	}
	if strings.Contains(string(js), "Rate") {
		t.Errorf("a single member's self stats carry rates: %s", js)
	}
	if s := n.StoreStats(); s.SetSuccess == 0 {
		t.Errorf("StoreStats = %+v", s)
	}
	if !n.Healthy(context.Background()) {
		t.Error("Healthy = false")
	}
}

func TestJoinWithoutReachablePeersFails(t *testing.T) {
	// Joining needs the member list from a peer; none answers here.
	dir := t.TempDir()
	n := NewNode(Config{DataDir: dir, InitialClusterState: "existing", InitialCluster: map[string][]string{
		"default": {"http://127.0.0.1:1"},
		"other":   {"http://127.0.0.1:2"},
	}})
	if err := n.Start(); err == nil {
		t.Fatal("Start succeeded without any peer to join")
	}
	if n.Running() {
		t.Fatal("Running after a failed Start")
	}
	if err := n.Stop(); err != nil {
		t.Fatal(err)
	}
	// The failed Start closed the store again.
	st, err := storage.Open(dir)
	if err != nil {
		t.Fatalf("data directory still locked: %v", err)
	}
	st.Close()
}

// TestDuplicatePeerURLsRefusedOnlyWhenFresh: as etcd, a member refuses an
// initial cluster that gives a peer URL twice when it bootstraps or joins,
// and a member that has started once never looks at the list again.
func TestDuplicatePeerURLsRefusedOnlyWhenFresh(t *testing.T) {
	dir := t.TempDir()
	for _, cfg := range []Config{
		{DataDir: dir, InitialCluster: map[string][]string{"default": {"http://127.0.0.1:2380", "http://127.0.0.1:2380"}}},
		{DataDir: dir, InitialClusterState: "existing", InitialCluster: map[string][]string{
			"default": {"http://127.0.0.1:1"},
			"other":   {"http://127.0.0.1:1"},
		}},
	} {
		n := NewNode(cfg)
		if err := n.Start(); err == nil || !strings.Contains(err.Error(), "duplicate URL: http://127.0.0.1:") {
			t.Errorf("Start with %v: %v, want a duplicate URL refused", cfg.InitialCluster, err)
		}
		if err := n.Stop(); err != nil {
			t.Fatal(err)
		}
	}

	n := startNode(t, dir, nil)
	if _, err := n.Do(context.Background(), storage.Request{Method: storage.MethodPut, Path: "/kept", Val: "v"}); err != nil {
		t.Fatal(err)
	}
	if err := n.Stop(); err != nil {
		t.Fatal(err)
	}
	n = startNode(t, dir, func(c *Config) {
		c.InitialCluster = map[string][]string{"default": {"http://localhost:2380"}, "stale": {"http://localhost:2380"}}
	})
	if ev, err := n.Get(context.Background(), "/kept", false, false, false); err != nil || value(t, ev) != "v" {
		t.Fatalf("after a restart with a stale initial cluster: %+v, %v", ev, err)
	}
}

func TestConcurrentWritesAreBatched(t *testing.T) {
	n := startNode(t, t.TempDir(), nil)
	const clients = 64
	before := n.saves.Load()
	var wg sync.WaitGroup
	start := make(chan struct{})
	errs := make(chan error, clients)
	for i := range clients {
		wg.Go(func() {
			<-start
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, err := n.Do(ctx, storage.Request{Method: storage.MethodPut, Path: "/k" + strconv.Itoa(i), Val: "v"})
			errs <- err
		})
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	saves := n.saves.Load() - before
	t.Logf("%d writes in %d saves", clients, saves)
	if saves >= clients {
		t.Fatalf("%d writes took %d saves: proposals were not batched", clients, saves)
	}
	for i := range clients {
		ev, err := n.Get(context.Background(), "/k"+strconv.Itoa(i), false, false, false)
		if err != nil || value(t, ev) != "v" {
			t.Fatalf("Get /k%d = %+v, %v", i, ev, err)
		}
	}
}

func TestIndexAndDataSurviveRestart(t *testing.T) {
	dir := t.TempDir()
	n := NewNode(Config{DataDir: dir})
	if err := n.Start(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "leader", func() bool { return n.Status().IsLeader })
	for i := range 10 {
		put(t, n, "/persist", strconv.Itoa(i))
	}
	before := n.Status()
	if err := n.Stop(); err != nil {
		t.Fatal(err)
	}

	n2 := startNode(t, dir, nil)
	after := n2.Status()
	if after.ID != before.ID || after.ClusterID != before.ClusterID {
		t.Errorf("identity changed: %x/%x -> %x/%x", before.ID, before.ClusterID, after.ID, after.ClusterID)
	}
	if after.EtcdIndex != before.EtcdIndex {
		t.Errorf("etcd index %d after restart, %d before", after.EtcdIndex, before.EtcdIndex)
	}
	if after.Term <= before.Term {
		t.Errorf("term %d after restart, %d before: the restarted member did not hold a new election", after.Term, before.Term)
	}
	ev, err := n2.Get(context.Background(), "/persist", false, false, false)
	if err != nil || value(t, ev) != "9" {
		t.Fatalf("Get after restart = %+v, %v", ev, err)
	}
	ev = put(t, n2, "/persist", "10")
	if ev.Node.ModifiedIndex != before.EtcdIndex+1 {
		t.Errorf("first write after restart at index %d, want %d", ev.Node.ModifiedIndex, before.EtcdIndex+1)
	}
}

func TestQuorumGetReturnsAcknowledgedWrite(t *testing.T) {
	n := startNode(t, t.TempDir(), nil)
	for i := range 20 {
		put(t, n, "/q", strconv.Itoa(i))
		ev, err := n.Get(context.Background(), "/q", false, false, true)
		if err != nil || value(t, ev) != strconv.Itoa(i) {
			t.Fatalf("quorum Get after write %d = %+v, %v", i, ev, err)
		}
	}

	// Concurrent quorum reads beside a writer: every read sees at least the
	// last value acknowledged before it began.
	var acked atomic.Int64
	acked.Store(19)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for i := 20; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_, err := n.Do(ctx, storage.Request{Method: storage.MethodPut, Path: "/q", Val: strconv.Itoa(i)})
			cancel()
			if err != nil {
				t.Errorf("PUT: %v", err)
				return
			}
			acked.Store(int64(i))
		}
	})
	rounds := n.readRounds.Load()
	var readers sync.WaitGroup
	for range 16 {
		readers.Go(func() {
			for range 50 {
				floor := acked.Load()
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				ev, err := n.Get(ctx, "/q", false, false, true)
				cancel()
				if err != nil {
					t.Errorf("quorum Get: %v", err)
					return
				}
				if v, _ := strconv.ParseInt(value(t, ev), 10, 64); v < floor {
					t.Errorf("quorum Get returned %d after %d was acknowledged", v, floor)
					return
				}
			}
		})
	}
	readers.Wait()
	close(stop)
	wg.Wait()
	// Reads that arrive while a round is in flight share the next one.
	if r := n.readRounds.Load() - rounds; r >= 16*50 {
		t.Errorf("%d quorum reads took %d ReadIndex rounds", 16*50, r)
	} else {
		t.Logf("%d quorum reads in %d ReadIndex rounds", 16*50, r)
	}
}

func TestTTLKeyExpiresThroughReaper(t *testing.T) {
	n := startNode(t, t.TempDir(), nil)
	w, err := n.Watch("/ttl", false, false, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Remove()
	deadline := time.Now().Add(500 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := n.Do(ctx, storage.Request{Method: storage.MethodPut, Path: "/ttl", Val: "x", Expiration: deadline.UnixNano()}); err != nil {
		t.Fatal(err)
	}
	// The watcher's first event is the set; watch again after it for the
	// expiry.
	select {
	case ev := <-w.EventChan:
		if ev == nil || ev.Action != storage.ActionSet {
			t.Fatalf("first event %+v, want set", ev)
		}
		w2, err := n.Watch("/ttl", false, false, ev.Index()+1)
		if err != nil {
			t.Fatal(err)
		}
		defer w2.Remove()
		select {
		case ev := <-w2.EventChan:
			late := time.Since(deadline)
			if ev == nil || ev.Action != storage.ActionExpire {
				t.Fatalf("event %+v, want expire", ev)
			}
			if late > time.Second {
				t.Errorf("key expired %v after its deadline", late)
			}
			t.Logf("expired %v after the deadline", late)
		case <-time.After(5 * time.Second):
			t.Fatal("no expire event")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no set event")
	}
	_, err = n.Get(context.Background(), "/ttl", false, false, false)
	var se *storage.Error
	if !errors.As(err, &se) || se.ErrorCode != storage.EcodeKeyNotFound {
		t.Fatalf("Get after expiry: %v, want 100", err)
	}
}

func TestRetriedProposalIsAppliedOnce(t *testing.T) {
	n := startNode(t, t.TempDir(), nil)
	put(t, n, "/queue/seed", "x") // the directory exists; its index is known
	before := n.Status().EtcdIndex

	// Two attempts of one request, as Do makes when the first attempt's
	// fate is unknown: both reach the log; the store must apply one.
	r := storage.Request{ID: n.ids.id(), Method: storage.MethodPost, Path: "/queue", Val: "job"}
	p := proposal{data: r.Marshal(), c: newWaitChan()}
	n.w.register(r.ID, p.c)
	n.propc <- p
	n.propc <- p
	var res result
	select {
	case res = <-p.c:
	case <-time.After(5 * time.Second):
		t.Fatal("no outcome")
	}
	if res.dropped || res.applied.Event == nil || res.applied.Event.Action != storage.ActionCreate {
		t.Fatalf("outcome %+v", res)
	}
	// A later write orders after both attempts.
	put(t, n, "/after", "y")
	if got := n.Status().EtcdIndex; got != before+2 {
		t.Errorf("etcd index went from %d to %d, want +2 (one create, one set)", before, got)
	}
	ev, err := n.Get(context.Background(), "/queue", true, true, false)
	if err != nil {
		t.Fatal(err)
	}
	if len(ev.Node.Nodes) != 2 {
		t.Errorf("/queue has %d children, want 2 (seed and one job)", len(ev.Node.Nodes))
	}
	if n.w.len() != 0 {
		t.Errorf("%d waiters left", n.w.len())
	}
}

func TestSnapshotCompactionAndRestart(t *testing.T) {
	dir := t.TempDir()
	edit := func(c *Config) { c.SnapshotCount, c.SnapshotCatchUpEntries = 10, 10 }
	n := NewNode(Config{DataDir: dir, SnapshotCount: 10, SnapshotCatchUpEntries: 10})
	if err := n.Start(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "leader", func() bool { return n.Status().IsLeader })
	for i := range 45 {
		put(t, n, "/snap/"+strconv.Itoa(i%7), strconv.Itoa(i))
	}
	before := n.Status()
	if err := n.Stop(); err != nil {
		t.Fatal(err)
	}

	st, err := storage.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	rs, err := st.LoadRaft()
	if err != nil {
		t.Fatal(err)
	}
	if rs.Snapshot == nil || rs.Snapshot.GetIndex() < 40 || len(rs.Snapshot.GetConfState().GetVoters()) != 1 {
		t.Errorf("snapshot %v, want one at index >= 40 with the member as voter", rs.Snapshot)
	}
	// The log was compacted behind the snapshot, keeping a catch-up tail.
	if len(rs.Entries) == 0 || rs.Entries[0].GetIndex() <= 1 || rs.Entries[0].GetIndex() > rs.Snapshot.GetIndex()+1 {
		t.Errorf("log of %d entries from %v around snapshot %d", len(rs.Entries), rs.Entries, rs.Snapshot.GetIndex())
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}

	n2 := startNode(t, dir, edit)
	after := n2.Status()
	if after.EtcdIndex != before.EtcdIndex {
		t.Errorf("etcd index %d after restart, %d before", after.EtcdIndex, before.EtcdIndex)
	}
	for k := range 7 {
		ev, err := n2.Get(context.Background(), "/snap/"+strconv.Itoa(k), false, false, true)
		if err != nil {
			t.Fatal(err)
		}
		// The last of the 45 writes to key k.
		want := 0
		for i := range 45 {
			if i%7 == k {
				want = i
			}
		}
		if value(t, ev) != strconv.Itoa(want) {
			t.Errorf("/snap/%d = %s, want %d", k, value(t, ev), want)
		}
	}
	// Past another snapshot after the restart.
	for i := range 15 {
		put(t, n2, "/more", strconv.Itoa(i))
	}
}

func TestDoAfterStopReturnsErrStopped(t *testing.T) {
	n := NewNode(Config{DataDir: t.TempDir()})
	if _, err := n.Do(context.Background(), storage.Request{Method: storage.MethodPut, Path: "/a"}); !errors.Is(err, ErrStopped) {
		t.Fatalf("Do before Start = %v", err)
	}
	if err := n.Start(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "leader", func() bool { return n.Status().IsLeader })
	if err := n.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := n.Stop(); err != nil {
		t.Fatalf("second Stop: %v", err)
	}
	if _, err := n.Do(context.Background(), storage.Request{Method: storage.MethodPut, Path: "/a"}); !errors.Is(err, ErrStopped) {
		t.Fatalf("Do after Stop = %v", err)
	}
	if _, err := n.Get(context.Background(), "/a", false, false, true); !errors.Is(err, ErrStopped) {
		t.Fatalf("Get after Stop = %v", err)
	}
	if n.Running() || n.Healthy(context.Background()) {
		t.Fatal("stopped node reports running or healthy")
	}
	if err := n.Start(); !errors.Is(err, ErrStopped) {
		t.Fatalf("Start after Stop = %v", err)
	}
}

// startHeldNode starts a node whose loop, once started, holds its next
// Save until unhold is called (at the latest when the test ends); held
// receives once the loop is held.
func startHeldNode(t *testing.T, edit func(*Config)) (n *Node, held <-chan struct{}, unhold func()) {
	t.Helper()
	var hold atomic.Bool
	heldc := make(chan struct{}, 1)
	release := make(chan struct{})
	n = startNode(t, t.TempDir(), edit, func(n *Node) {
		n.loop.beforeSave = func() {
			if hold.Load() {
				select {
				case heldc <- struct{}{}:
				default:
				}
				<-release
			}
		}
	})
	var releaseOnce sync.Once
	unhold = func() { releaseOnce.Do(func() { close(release) }) }
	t.Cleanup(unhold) // runs before startNode's Stop, even on failure
	hold.Store(true)
	return n, heldc, unhold
}

func TestStopAnswersWaitingRequests(t *testing.T) {
	n, _, unhold := startHeldNode(t, nil)
	errc := make(chan error, 1)
	go func() {
		_, err := n.Do(context.Background(), storage.Request{Method: storage.MethodPut, Path: "/held", Val: "x"})
		errc <- err
	}()
	waitFor(t, "the waiter", func() bool { return n.w.len() == 1 })
	stopped := make(chan error, 1)
	go func() { stopped <- n.Stop() }()
	unhold()
	if err := <-stopped; err != nil {
		t.Fatal(err)
	}
	// Stop may land before or after the held Ready was saved: the caller
	// gets its answer or ErrStopped, never silence.
	if err := <-errc; err != nil && !errors.Is(err, ErrStopped) {
		t.Fatalf("Do during Stop = %v", err)
	}
}

func TestDoTimeoutDoesNotLeakWaiter(t *testing.T) {
	n, _, unhold := startHeldNode(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err := n.Do(ctx, storage.Request{Method: storage.MethodPut, Path: "/slow", Val: "x"})
	if !errors.Is(err, ErrTimeout) {
		t.Fatalf("Do = %v, want ErrTimeout", err)
	}
	if l := n.w.len(); l != 0 {
		t.Fatalf("%d waiters left after timeout", l)
	}
	unhold()
	// The loop goes on: the timed-out write still lands, later ones work.
	put(t, n, "/fast", "y")
	if _, err := n.Get(context.Background(), "/slow", false, false, true); err != nil {
		t.Fatalf("the timed-out write was lost: %v", err)
	}
	ctx2, cancel2 := context.WithCancel(context.Background())
	cancel2()
	if _, err := n.Do(ctx2, storage.Request{Method: storage.MethodPut, Path: "/x"}); !errors.Is(err, ErrTimeout) {
		t.Fatalf("Do with a done context = %v", err)
	}
}

func TestProposalDroppedWithoutLeaderIsRetried(t *testing.T) {
	// A fresh member that waits out its election timeout has no leader for
	// a while: Raft drops the proposal and Do must retry it once the member
	// has elected itself.
	n := NewNode(Config{
		DataDir:         t.TempDir(),
		ElectionTimeout: 500 * time.Millisecond,
		Logger:          zaptest.NewLogger(t, zaptest.Level(zap.InfoLevel)),
	})
	n.loop.noFastCampaign = true
	if err := n.Start(); err != nil {
		t.Fatal(err)
	}
	defer n.Stop()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ev, err := n.Do(ctx, storage.Request{Method: storage.MethodPut, Path: "/early", Val: "1"})
	if err != nil || value(t, ev) != "1" {
		t.Fatalf("Do = %+v, %v", ev, err)
	}
	if n.drops.Load() == 0 {
		t.Error("the proposal was not dropped: the test did not test the retry")
	}
}

func TestTransportReportsReachTheLoop(t *testing.T) {
	// No transport runs yet; the report path must at least be harmless for
	// an unknown peer.
	n := startNode(t, t.TempDir(), nil)
	n.reportUnreachable(42)
	n.reportSnapshot(42, 2)
	n.receive(&raftpb.Message{Type: raftpb.MsgAppResp.Enum(), From: new(uint64(42)), To: new(n.id), Term: new(uint64(1))})
	put(t, n, "/still", "ok")
}

func ExampleNode() {
	dir, err := os.MkdirTemp("", "raftkv-example")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer os.RemoveAll(dir)
	n := NewNode(Config{DataDir: dir})
	if err := n.Start(); err != nil {
		fmt.Println(err)
		return
	}
	defer n.Stop()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ev, err := n.Do(ctx, storage.Request{Method: storage.MethodPut, Path: "/message", Val: "hello"})
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(ev.Action, *ev.Node.Value)
	// Output: set hello
}

func TestConfChangeWaitsForThePendingOne(t *testing.T) {
	// Raft keeps one conf change pending at a time and silently turns a
	// second one, proposed while the first is unapplied, into an empty
	// entry. The leader must hold the second until the first is applied:
	// with an election timeout far beyond the test's deadline, a proposer
	// waiting out two of them (the general retry) would fail the test.
	n, held, unhold := startHeldNode(t, func(c *Config) { c.ElectionTimeout = time.Hour })
	putc := make(chan error, 1)
	go func() {
		_, err := n.Do(context.Background(), storage.Request{Method: storage.MethodPut, Path: "/held", Val: "x"})
		putc <- err
	}()
	// With the loop held in a Save, three conf changes queue up: the loop
	// then takes them at once, the others while the first is pending.
	<-held
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	names := []string{"first", "second", "third"}
	errc := make(chan error, len(names))
	for _, name := range names {
		data, err := json.Marshal(attributesContext{Attributes: &memberAttributes{Name: name, ClientURLs: []string{}}})
		if err != nil {
			t.Fatal(err)
		}
		cc := &raftpb.ConfChange{Type: raftpb.ConfChangeUpdateNode.Enum(), NodeId: new(n.id), Context: data}
		go func() { errc <- n.changeMembership(ctx, cc) }()
	}
	// The held Save may be the write's or one left from the election,
	// with the write queued too: either way the changes are all queued.
	waitFor(t, "the conf changes queued", func() bool {
		return len(n.propc) >= len(names) && n.w.len() == len(names)+1
	})
	unhold()
	for range names {
		if err := <-errc; err != nil {
			t.Fatalf("conf change: %v", err)
		}
	}
	if err := <-putc; err != nil {
		t.Fatalf("the held write: %v", err)
	}
	if m, _ := n.member(n.id); !slices.Contains(names, m.Name) {
		t.Fatalf("member name %q after the changes", m.Name)
	}
}

func TestLateAddOfRemovedMemberIsIgnored(t *testing.T) {
	// An add whose proposer tried again can reach the log twice, and the
	// member can be removed in between. Raft keeps no record of removals:
	// applying the late copy would make the removed member a voter (here a
	// learner, which a single voter can add without losing its quorum)
	// that the member list refuses.
	n := startNode(t, t.TempDir(), nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	const ghost = 0x5eed
	add, err := json.Marshal(memberRecord{ID: ghost, PeerURLs: []string{"http://127.0.0.1:1"}})
	if err != nil {
		t.Fatal(err)
	}
	change := func(typ raftpb.ConfChangeType) {
		t.Helper()
		cc := &raftpb.ConfChange{Type: typ.Enum(), NodeId: new(uint64(ghost)), Context: add}
		if err := n.changeMembership(ctx, cc); err != nil {
			t.Fatalf("%v: %v", typ, err)
		}
	}
	learners := func() []uint64 {
		got := make(chan []uint64, 1)
		n.ctrlc <- func() { got <- slices.Clone(n.loop.confState.GetLearners()) }
		return <-got
	}
	change(raftpb.ConfChangeAddLearnerNode)
	if !n.hasMember(ghost) || !slices.Contains(learners(), ghost) {
		t.Fatalf("added: member %v, learners %v", n.hasMember(ghost), learners())
	}
	change(raftpb.ConfChangeRemoveNode)
	// The late copy: the leader refuses it as it enters the log (judgeConf);
	// were it in the log already, the apply would skip it (resurrects).
	cc := &raftpb.ConfChange{Type: raftpb.ConfChangeAddLearnerNode.Enum(), NodeId: new(uint64(ghost)), Context: add}
	if err := n.changeMembership(ctx, cc); !errors.Is(err, ErrMemberRemoved) {
		t.Fatalf("the late add: %v, want %v", err, ErrMemberRemoved)
	}
	if n.hasMember(ghost) || slices.Contains(learners(), ghost) {
		t.Fatalf("after the refused add: member %v, learners %v", n.hasMember(ghost), learners())
	}
	// A copy already in the log when the removal was judged (or written
	// before leaders judged): stepped into Raft past the judge, applied
	// as node 0.
	before := n.AppliedIndex()
	n.ctrlc <- func() {
		if err := n.rn.ProposeConfChange(&raftpb.ConfChange{Type: raftpb.ConfChangeAddLearnerNode.Enum(),
			NodeId: new(uint64(ghost)), Context: add, Id: new(n.ids.id())}); err != nil {
			t.Errorf("ProposeConfChange: %v", err)
		}
	}
	waitFor(t, "the unjudged copy applied", func() bool { return n.AppliedIndex() > before })
	if n.hasMember(ghost) || slices.Contains(learners(), ghost) {
		t.Fatalf("after the late add: member %v, learners %v", n.hasMember(ghost), learners())
	}
}

func TestSoleVoterQuorumReadIsLocal(t *testing.T) {
	// The only voter needs no read index round for a quorum read: nobody
	// else can have committed anything. With a second voter it must ask.
	n := startNode(t, t.TempDir(), nil)
	put(t, n, "/k", "v")
	before := n.readRounds.Load()
	ev, err := n.Get(context.Background(), "/k", false, false, true)
	if err != nil || value(t, ev) != "v" {
		t.Fatalf("quorum GET = %+v, %v", ev, err)
	}
	if got := n.readRounds.Load(); got != before {
		t.Fatalf("%d read index rounds for a sole voter's quorum read", got-before)
	}
}

// A cluster bootstrapped with one member knows that member's features from the start: no
// publish goes through Raft for them, and members that join later copy its list.
func TestSingleMemberKnowsItsFeaturesWithoutPublishing(t *testing.T) {
	n := startNode(t, t.TempDir(), nil)
	m, ok := n.member(n.id)
	if !ok || !slices.Equal(m.Features, buildFeatures) {
		t.Fatalf("own record %+v", m)
	}
	lo, _ := n.ms.FirstIndex()
	hi, _ := n.ms.LastIndex()
	ents, err := n.ms.Entries(lo, hi+1, math.MaxUint64)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		var cc raftpb.ConfChange
		if e.GetType() == raftpb.EntryConfChange && proto.Unmarshal(e.GetData(), &cc) == nil &&
			cc.GetType() == raftpb.ConfChangeUpdateNode {
			t.Fatalf("a member update in the log of a fresh single member: index %d", e.GetIndex())
		}
	}
}

// TestTicksDueMakesUpDroppedTicks: a ticker event counts the tick periods
// since the last tick counted, at least one (an early event) and at most a
// heartbeat interval's; after a longer stall counting starts from the event.
func TestTicksDueMakesUpDroppedTicks(t *testing.T) {
	const ms = time.Millisecond
	var l loopState
	start := time.Now()
	for _, ev := range []struct {
		at   time.Duration
		want int
	}{
		{0, 1},
		{10 * ms, 1},
		{23 * ms, 1},   // a little late
		{50 * ms, 3},   // two dropped
		{52 * ms, 1},   // early
		{70 * ms, 1},   // on time again
		{500 * ms, 10}, // a long stall: a heartbeat interval's worth
		{510 * ms, 1},  // counted from the stall's end
		{540 * ms, 3},
	} {
		if got := l.ticksDue(start.Add(ev.at), 10*ms); got != ev.want {
			t.Errorf("event at %v: %d ticks, want %d", ev.at, got, ev.want)
		}
	}
}
