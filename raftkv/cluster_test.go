package raftkv

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/etcaddy/etcaddy/storage"
	"go.etcd.io/raft/v3/raftpb"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/protobuf/proto"
)

// testMember is one member of an in-process cluster: a real bbolt file and
// a real HTTP server (httptest on 127.0.0.1:0) serving its peer endpoint.
// The server outlives the Node, so a restarted member keeps its peer URL.
type testMember struct {
	name string
	dir  string
	srv  *httptest.Server
	url  string
	node atomic.Pointer[Node]
	// refuseFrom, when not "", is the hex ID of a member whose messages
	// this one's peer endpoint refuses (a link cut one way).
	refuseFrom atomic.Value
	// bandwidth, when not 0, is how many bytes a second each stream to
	// m's peer endpoint carries (a slow link; a slow member only, see
	// newSlowTestMember).
	bandwidth atomic.Int64
}

func (m *testMember) n() *Node { return m.node.Load() }

// refuses reports whether m's peer endpoint refuses member from (hex ID).
func (m *testMember) refuses(from string) bool {
	cut, _ := m.refuseFrom.Load().(string)
	return cut != "" && cut == from
}

// testMembers holds the live testMembers, for a peer endpoint to find the
// member that pulls from it.
var testMembers sync.Map // *testMember -> struct{}

// testMemberByID is the testMember running the member with hex ID id, or nil.
func testMemberByID(id string) *testMember {
	var found *testMember
	testMembers.Range(func(k, _ any) bool {
		m := k.(*testMember)
		if n := m.n(); n != nil && idString(n.Status().ID) == id {
			found = m
			return false
		}
		return true
	})
	return found
}

// testCutWriter is a pull's answer on the simulated network: its writes fail
// once the link to the puller is cut.
type testCutWriter struct {
	http.ResponseWriter
	cut func() bool
}

func (w testCutWriter) Write(p []byte) (int, error) {
	if w.cut() {
		return 0, errors.New("cut off (test)")
	}
	return w.ResponseWriter.Write(p)
}

// Unwrap gives http.ResponseController the connection's writer.
func (w testCutWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// testStreamBody is a peer stream's body on the simulated network: it fails
// once the link from its sender is cut, and what the sender wrote comes
// out oneWay after it arrived (the sleep is the network's delay, not a
// wait for a condition), however much follows it, up to 4096 reads of
// it in flight (then the sender's writes wait, as on a full connection);
// when m.bandwidth is set, a read arrives once the link has carried what
// came before it and itself at that many bytes a second. Its handler
// calls stop when it returns.
type testStreamBody struct {
	io.ReadCloser
	m      *testMember
	from   string
	oneWay time.Duration
	chunks chan testChunk
	done   chan struct{} // closed by stop: the handler returned
	buf    []byte
	err    error
}

type testChunk struct {
	data []byte
	at   time.Time
	err  error
}

func newTestStreamBody(body io.ReadCloser, m *testMember, from string, oneWay time.Duration) *testStreamBody {
	b := &testStreamBody{ReadCloser: body, m: m, from: from, oneWay: oneWay, done: make(chan struct{})}
	if oneWay > 0 {
		b.chunks = make(chan testChunk, 4096)
		go func() {
			var free time.Time // when the link has carried what came so far
			for {
				p := make([]byte, 32<<10)
				n, err := body.Read(p)
				at := time.Now()
				if bw := m.bandwidth.Load(); bw > 0 {
					if free.After(at) {
						at = free
					}
					at = at.Add(time.Duration(n) * time.Second / time.Duration(bw))
					free = at
				}
				select {
				case b.chunks <- testChunk{data: p[:n], at: at, err: err}:
				case <-b.done:
					return
				}
				if err != nil {
					return
				}
			}
		}()
	}
	return b
}

// stop ends the reads of the delay line: nobody takes them any more.
func (b *testStreamBody) stop() { close(b.done) }

func (b *testStreamBody) Read(p []byte) (int, error) {
	if b.m.refuses(b.from) {
		return 0, errors.New("cut off (test)")
	}
	if b.chunks == nil {
		// A read that was waiting when the link was cut must not hand
		// over what came after the cut.
		n, err := b.ReadCloser.Read(p)
		if b.m.refuses(b.from) {
			return 0, errors.New("cut off (test)")
		}
		return n, err
	}
	for len(b.buf) == 0 && b.err == nil {
		c := <-b.chunks
		time.Sleep(time.Until(c.at.Add(b.oneWay)))
		b.buf, b.err = c.data, c.err
	}
	if b.m.refuses(b.from) {
		return 0, errors.New("cut off (test)")
	}
	if len(b.buf) == 0 {
		return 0, b.err
	}
	n := copy(p, b.buf)
	b.buf = b.buf[n:]
	return n, nil
}

// testCluster is a set of members that share an initial cluster.
type testCluster struct {
	t       *testing.T
	members []*testMember
	edit    func(*Config) // applied to every member's config
}

func newTestMember(t *testing.T, name string) *testMember {
	return newSlowTestMember(t, name, 0)
}

// newSlowTestMember is a member whose peer endpoint is oneWay away: every
// message batch it receives reaches it oneWay late, and its answer takes
// oneWay more (a network round trip of 2*oneWay; the sleeps are the
// simulated network, not waits for a condition).
func newSlowTestMember(t *testing.T, name string, oneWay time.Duration) *testMember {
	return newSimTestMember(t, name, oneWay, false)
}

// newSimTestMember is newSlowTestMember whose peer endpoint also speaks
// h2c when h2c is set.
func newSimTestMember(t *testing.T, name string, oneWay time.Duration, h2c bool) *testMember {
	m := &testMember{name: name, dir: t.TempDir()}
	m.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// Answers go out before a stream's body is read (see
		// peerHandler.ServeHTTP).
		_ = http.NewResponseController(w).EnableFullDuplex()
		n := m.n()
		if n == nil {
			AnswerBeforeBody(w, r) // refused: the body is not read
			http.Error(w, "no member here", http.StatusServiceUnavailable)
			return
		}
		from := r.Header.Get(headerPeerFrom)
		if m.refuses(from) {
			AnswerBeforeBody(w, r) // refused: the body is not read
			http.Error(w, "cut off (test)", http.StatusServiceUnavailable)
			return
		}
		if r.Method == http.MethodGet && (r.URL.Path == peerStreamPath || r.URL.Path == peerSnapshotPath) {
			// A pull carries this member's messages to the member that
			// asks, a snapshot poll its snapshot: they are cut with the
			// link from this member to that one. Both are looked up at
			// each write: a pull may come before either has booted (and
			// has an ID to be found by), and last.
			cut := func() bool {
				puller := testMemberByID(from)
				return puller != nil && puller.refuses(idString(n.Status().ID))
			}
			if cut() {
				http.Error(w, "cut off (test)", http.StatusServiceUnavailable)
				return
			}
			w = testCutWriter{ResponseWriter: w, cut: cut}
		} else if r.URL.Path == peerStreamPath {
			// A stream is cut when its sender is, and each read of it
			// arrives oneWay late.
			b := newTestStreamBody(r.Body, m, from, oneWay)
			defer b.stop()
			r.Body = b
		} else if oneWay > 0 && r.Method == http.MethodPost {
			time.Sleep(oneWay)
			defer time.Sleep(oneWay)
		}
		n.PeerHandler().ServeHTTP(w, r)
	}))
	if h2c {
		m.srv.Config.Protocols = new(http.Protocols)
		m.srv.Config.Protocols.SetHTTP1(true)
		m.srv.Config.Protocols.SetUnencryptedHTTP2(true)
	}
	m.srv.Start()
	t.Cleanup(m.srv.Close)
	m.url = m.srv.URL
	testMembers.Store(m, struct{}{})
	t.Cleanup(func() { testMembers.Delete(m) })
	return m
}

// newTestCluster starts size members bootstrapping one cluster.
func newTestCluster(t *testing.T, size int, edit func(*Config)) *testCluster {
	return newSlowTestCluster(t, size, 0, edit)
}

// newSlowTestCluster is newTestCluster with every member oneWay away (see
// newSlowTestMember).
func newSlowTestCluster(t *testing.T, size int, oneWay time.Duration, edit func(*Config)) *testCluster {
	return newSimTestCluster(t, size, oneWay, false, edit)
}

// newSimTestCluster is newSlowTestCluster whose members speak h2c to each
// other when h2c is set.
func newSimTestCluster(t *testing.T, size int, oneWay time.Duration, h2c bool, edit func(*Config)) *testCluster {
	c := &testCluster{t: t, edit: func(cfg *Config) {
		cfg.Peer.H2C = h2c
		if edit != nil {
			edit(cfg)
		}
	}}
	for i := range size {
		c.members = append(c.members, newSimTestMember(t, fmt.Sprintf("m%d", i), oneWay, h2c))
	}
	for _, m := range c.members {
		c.start(m, "new")
	}
	c.waitLeader(c.members...)
	return c
}

func (c *testCluster) initialCluster() map[string][]string {
	ic := make(map[string][]string)
	for _, m := range c.members {
		ic[m.name] = []string{m.url}
	}
	return ic
}

// start runs a (new) Node for m on its data directory.
func (c *testCluster) start(m *testMember, state string) *Node {
	c.t.Helper()
	n := NewNode(c.config(m, state))
	m.node.Store(n)
	if err := n.Start(); err != nil {
		c.t.Fatalf("Start %s: %v", m.name, err)
	}
	c.t.Cleanup(func() {
		if err := n.Stop(); err != nil {
			c.t.Errorf("Stop %s: %v", m.name, err)
		}
	})
	return n
}

// config is m's configuration, with c.edit applied.
func (c *testCluster) config(m *testMember, state string) Config {
	cfg := Config{
		Name:                m.name,
		DataDir:             m.dir,
		HeartbeatInterval:   20 * time.Millisecond,
		ElectionTimeout:     200 * time.Millisecond,
		InitialCluster:      c.initialCluster(),
		InitialClusterState: state,
		AdvertiseClientURLs: []string{"http://" + m.name + ".example:2379"},
		Logger:              zaptest.NewLogger(c.t, zaptest.Level(zap.WarnLevel)).Named(m.name),
		// Membership tests change members at once, and leave the strict
		// reconfiguration check to TestStrictReconfigCheck (and the
		// Caddy tests, which keep etcd's default).
		LooseReconfig:  true,
		healthInterval: 100 * time.Millisecond,
	}
	if c.edit != nil {
		c.edit(&cfg)
	}
	return cfg
}

// stop stops m's Node.
func (c *testCluster) stop(m *testMember) {
	c.t.Helper()
	if err := m.n().Stop(); err != nil {
		c.t.Fatalf("Stop %s: %v", m.name, err)
	}
}

// waitLeader waits until every given member knows the same running leader,
// one of them, and returns it.
func (c *testCluster) waitLeader(ms ...*testMember) *testMember {
	c.t.Helper()
	// Members with long election timeouts may need two elections (a
	// member whose first timeout runs out before its peers are up, a split
	// vote), each up to twice the timeout: more than waitFor's 10 s at 3 s.
	within := 10 * time.Second
	for _, m := range ms {
		within = max(within, 6*m.n().cfg.ElectionTimeout)
	}
	var leader *testMember
	waitForWithin(c.t, within, "a leader every member agrees on", func() bool {
		leader = nil
		lead := ms[0].n().Status().Leader
		if lead == 0 {
			return false
		}
		for _, m := range ms {
			if m.n().Status().Leader != lead {
				return false
			}
			if m.n().Status().ID == lead && m.n().Running() {
				leader = m
			}
		}
		return leader != nil
	})
	return leader
}

func (c *testCluster) followers(leader *testMember, ms ...*testMember) []*testMember {
	var out []*testMember
	for _, m := range ms {
		if m != leader {
			out = append(out, m)
		}
	}
	return out
}

func quorumGet(t *testing.T, n *Node, key string) (*storage.Event, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return n.Get(ctx, key, false, false, true)
}

// waitLocal waits until n's own state holds key = val.
func waitLocal(t *testing.T, n *Node, key, val string) {
	t.Helper()
	waitFor(t, key+" applied on "+n.cfg.Name, func() bool {
		ev, err := n.Get(context.Background(), key, false, false, false)
		return err == nil && ev.Node.Value != nil && *ev.Node.Value == val
	})
}

func TestClusterReplicatesAndFailsOver(t *testing.T) {
	c := newTestCluster(t, 3, nil)
	all := c.members
	leader := c.waitLeader(all...)
	followers := c.followers(leader, all...)

	// A write on a follower goes through the leader; a quorum read on
	// every member sees it at once.
	ev := put(t, followers[0].n(), "/from-follower", "1")
	for _, m := range all {
		got, err := quorumGet(t, m.n(), "/from-follower")
		if err != nil || value(t, got) != "1" {
			t.Fatalf("quorum GET on %s = %+v, %v", m.name, got, err)
		}
		if got.Node.ModifiedIndex != ev.Node.ModifiedIndex {
			t.Fatalf("%s: modifiedIndex %d, the write had %d", m.name, got.Node.ModifiedIndex, ev.Node.ModifiedIndex)
		}
	}

	// Every member publishes its name and client URLs: every member lists
	// everyone's.
	waitOnEach(t, all, "published attributes", func(m *testMember) bool {
		ms := m.n().Members()
		if len(ms) != 3 {
			return false
		}
		for _, mm := range ms {
			if len(mm.ClientURLs) != 1 || mm.ClientURLs[0] != "http://"+mm.Name+".example:2379" {
				return false
			}
		}
		return true
	})

	// Stats and health as a follower and as the leader.
	f := followers[1].n()
	if !f.Healthy(context.Background()) {
		t.Error("a follower with a leader is not healthy")
	}
	ss := f.SelfStats()
	if ss.State != "StateFollower" || ss.LeaderInfo.Leader != idString(leader.n().Status().ID) {
		t.Errorf("follower self stats = %+v", ss)
	}
	if _, _, ok := f.LeaderStats(); ok {
		t.Error("a follower answered leader stats")
	}
	lid, fs, ok := leader.n().LeaderStats()
	if !ok || lid != idString(leader.n().Status().ID) || len(fs) != 2 {
		t.Fatalf("LeaderStats = %q, %v, %v", lid, fs, ok)
	}
	for id, s := range fs {
		if s.Counts.Success == 0 || s.Latency.Maximum <= 0 {
			t.Errorf("follower %s stats = %+v", id, s)
		}
	}
	if ss := leader.n().SelfStats(); ss.State != "StateLeader" {
		t.Errorf("leader self stats = %+v", ss)
	}

	// Stopping the leader hands leadership over: the others elect a new
	// one and go on serving writes from either member.
	old := leader.n().Status().ID
	c.stop(leader)
	next := c.waitLeader(followers...)
	if next.n().Status().ID == old {
		t.Fatal("the stopped leader is still the leader")
	}
	for _, m := range followers {
		put(t, m.n(), "/after-"+m.name, "2")
	}
	for _, m := range followers {
		for _, k := range followers {
			got, err := quorumGet(t, m.n(), "/after-"+k.name)
			if err != nil || value(t, got) != "2" {
				t.Fatalf("quorum GET on %s = %+v, %v", m.name, got, err)
			}
		}
	}

	// The old leader comes back on its data directory and catches up.
	n := c.start(leader, "new")
	waitLocal(t, n, "/after-"+followers[1].name, "2")
	c.waitLeader(all...)
}

// TestClusterSlowLinkKeepsItsLeader: a follower behind a slow link gets
// 4 MiB of entries, which take it about 20 election timeouts to receive.
// Heartbeats go on a stream and a connection of their own: it keeps its
// leader all along, where heartbeats waiting behind the entries would have
// it start a pre-vote with no leader meanwhile (PreVote keeps the others'
// term; the follower still answers no writes or quorum reads until it
// hears again). The simulated link slows each stream's reads, not a
// connection's: it cannot show what two streams on one connection would
// share (its socket buffers), only that both protocols keep the lanes.
func TestClusterSlowLinkKeepsItsLeader(t *testing.T) {
	for name, h2c := range map[string]bool{"http/1.1": false, "h2c": true} {
		t.Run(name, func(t *testing.T) { testSlowLinkKeepsItsLeader(t, h2c) })
	}
}

func testSlowLinkKeepsItsLeader(t *testing.T, h2c bool) {
	// etcd's default election timeout (1 s), not the 200 ms of the other
	// tests: the leader's Saves of these 512 KiB entries stall its loop
	// for 300-550 ms under -race on a loaded machine, and followers keep
	// Raft's clock to wall time; the test is about the slow link.
	c := newSimTestCluster(t, 3, time.Millisecond, h2c, func(cfg *Config) { cfg.ElectionTimeout = time.Second })
	leader := c.waitLeader(c.members...)
	slow := c.followers(leader, c.members...)[0]
	lead := leader.n().Status().ID
	slow.bandwidth.Store(1 << 20) // per stream: 4 s for the entries
	val := strings.Repeat("x", 512<<10)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := range 8 {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, err := leader.n().Do(ctx, storage.Request{Method: storage.MethodPut, Path: fmt.Sprint("/big/", i), Val: val})
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("PUT: %v", err)
		}
	}
	// The other follower made the writes commit; the slow one receives
	// them now: 4 s at the link's rate, but under -race beside the other
	// packages' tests (a CI run at 014792f took over 10 s) it can take
	// longer, and the test is about the leader kept meanwhile, not the rate.
	lost, saw := false, uint64(0)
	waitForWithin(t, time.Minute, "the entries on the slow follower", func() bool {
		if l := slow.n().Status().Leader; l != lead && !lost {
			lost, saw = true, l
		}
		for i := range 8 {
			ev, err := slow.n().Get(context.Background(), fmt.Sprint("/big/", i), false, false, false)
			if err != nil || ev.Node.Value == nil || len(*ev.Node.Value) != len(val) {
				return false
			}
		}
		return true
	})
	if lost {
		t.Fatalf("the slow follower lost its leader %x while the entries came (it saw %x)", lead, saw)
	}
	if l := slow.n().Status().Leader; l != lead {
		t.Fatalf("leader %x, want %x", l, lead)
	}
}

func TestClusterAddMemberCatchesUpBySnapshot(t *testing.T) {
	c := newTestCluster(t, 3, func(cfg *Config) { cfg.SnapshotCount, cfg.SnapshotCatchUpEntries = 8, 8 })
	leader := c.waitLeader(c.members...)
	follower := c.followers(leader, c.members...)[0]
	for i := range 40 {
		put(t, c.members[i%3].n(), fmt.Sprintf("/k%d", i), fmt.Sprint(i))
	}

	// Membership errors, as etcd's.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := follower.n().AddMember(ctx, []string{leader.url}); !errors.Is(err, ErrPeerURLExists) {
		t.Errorf("AddMember with a used peer URL = %v", err)
	}
	if err := follower.n().RemoveMember(ctx, 12345); !errors.Is(err, ErrMemberNotFound) {
		t.Errorf("RemoveMember of an unknown ID = %v", err)
	}
	if err := follower.n().UpdateMember(ctx, 12345, []string{"http://127.0.0.1:9"}); !errors.Is(err, ErrMemberNotFound) {
		t.Errorf("UpdateMember of an unknown ID = %v", err)
	}

	// Added through a follower (the conf change is forwarded), then
	// started with state "existing": the log it needs is compacted, so it
	// catches up by snapshot.
	joiner := newTestMember(t, "m3")
	verdictIDs := func(n *Node) []uint64 {
		got := make(chan []uint64, 1)
		n.ctrlc <- func() { got <- slices.Clone(n.loop.verdicts.order) }
		return <-got
	}
	// The members' publishes, applied long before the snapshot's index.
	early := verdictIDs(leader.n())
	if len(early) < 3 {
		t.Fatalf("the leader has %d membership verdicts, want the 3 publishes at least", len(early))
	}
	added, err := follower.n().AddMember(ctx, []string{joiner.url})
	if err != nil {
		t.Fatalf("AddMember: %v", err)
	}
	c.members = append(c.members, joiner)
	waitOnEach(t, c.members[:3], "the new member listed", func(m *testMember) bool {
		return slices.ContainsFunc(m.n().Members(), func(mm Member) bool { return mm.ID == added.ID })
	})
	n := c.start(joiner, "existing")
	if n.Status().ID != added.ID || n.Status().ClusterID != leader.n().Status().ClusterID {
		t.Fatalf("joined as %s of cluster %s, want %s of %s", idString(n.Status().ID), idString(n.Status().ClusterID),
			idString(added.ID), idString(leader.n().Status().ClusterID))
	}
	waitLocal(t, n, "/k39", "39")
	// The counter moves just after the install's data is visible.
	waitFor(t, "a snapshot installed", func() bool { return n.installs.Load() > 0 })
	// It recognizes copies of the changes in the snapshot, were it to lead.
	if got := verdictIDs(n); slices.ContainsFunc(early, func(id uint64) bool { return !slices.Contains(got, id) }) {
		t.Errorf("the joiner's verdicts %x lack some of the snapshot's %x", got, early)
	}
	c.waitLeader(c.members...)
	put(t, n, "/from-joiner", "x")
	for _, m := range c.members {
		got, err := quorumGet(t, m.n(), "/from-joiner")
		if err != nil || value(t, got) != "x" {
			t.Fatalf("quorum GET on %s = %+v, %v", m.name, got, err)
		}
	}
	waitFor(t, "the new member's attributes published", func() bool {
		for _, mm := range leader.n().Members() {
			if mm.ID == added.ID {
				return mm.Name == "m3" && len(mm.ClientURLs) == 1
			}
		}
		return false
	})

	// Its peer URL can change (here to the same server by another name).
	newURL := strings.Replace(joiner.url, "127.0.0.1", "localhost", 1)
	if err := leader.n().UpdateMember(ctx, added.ID, []string{newURL}); err != nil {
		t.Fatalf("UpdateMember: %v", err)
	}
	waitOnEach(t, c.members, "updated peer URLs", func(m *testMember) bool {
		for _, mm := range m.n().Members() {
			if mm.ID == added.ID {
				return slices.Equal(mm.PeerURLs, []string{newURL})
			}
		}
		return false
	})
	put(t, leader.n(), "/after-update", "y")
	waitLocal(t, n, "/after-update", "y")
}

func TestClusterRemoveFollowerAndLeader(t *testing.T) {
	c := newTestCluster(t, 3, nil)
	leader := c.waitLeader(c.members...)
	followers := c.followers(leader, c.members...)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	put(t, leader.n(), "/a", "1")

	// A follower removed (through the leader) learns it and stops.
	gone := followers[0]
	goneID := gone.n().Status().ID
	if err := leader.n().RemoveMember(ctx, goneID); err != nil {
		t.Fatalf("RemoveMember(follower): %v", err)
	}
	waitFor(t, "the removed follower stops", func() bool { return !gone.n().Running() })
	if err := leader.n().RemoveMember(ctx, goneID); !errors.Is(err, ErrMemberRemoved) {
		t.Errorf("removing it again = %v, want ErrMemberRemoved", err)
	}
	put(t, followers[1].n(), "/b", "2")

	// The leader removes itself: it hands leadership over first, and the
	// last member goes on alone.
	lid := leader.n().Status().ID
	if err := leader.n().RemoveMember(ctx, lid); err != nil {
		t.Fatalf("RemoveMember(leader): %v", err)
	}
	last := followers[1]
	waitFor(t, "the removed leader stops", func() bool { return !leader.n().Running() })
	c.waitLeader(last)
	if got := last.n().Members(); len(got) != 1 || got[0].ID != last.n().Status().ID {
		t.Fatalf("members after both removals = %+v", got)
	}
	put(t, last.n(), "/c", "3")
	if err := last.n().RemoveMember(ctx, last.n().Status().ID); !errors.Is(err, ErrLastMember) {
		t.Errorf("removing the last member = %v", err)
	}

	// The removals are remembered across a restart: the removed members'
	// messages are still refused (410).
	c.stop(last)
	n := c.start(last, "new")
	c.waitLeader(last)
	if !n.isRemoved(goneID) || !n.isRemoved(lid) || n.tr.peerStatus(goneID) != peerRemoved {
		t.Error("the removed members were forgotten across a restart")
	}
	put(t, n, "/d", "4")
}

// downThrough40Writes stops a follower of c while the others apply 40
// writes, starts it again and waits until it has them all.
func (c *testCluster) downThrough40Writes(t *testing.T) (*testMember, *Node) {
	t.Helper()
	leader := c.waitLeader(c.members...)
	down := c.followers(leader, c.members...)[0]
	put(t, leader.n(), "/before", "0")
	waitLocal(t, down.n(), "/before", "0")
	c.stop(down)

	up := c.followers(down, c.members...)
	for i := range 40 {
		put(t, up[i%2].n(), fmt.Sprintf("/k%d", i), fmt.Sprint(i))
	}
	n := c.start(down, "new")
	waitLocal(t, n, "/k39", "39")
	return down, n
}

func TestClusterMemberDownCatchesUpBySnapshot(t *testing.T) {
	c := newTestCluster(t, 3, func(cfg *Config) { cfg.SnapshotCount, cfg.SnapshotCatchUpEntries = 8, 8 })
	down, n := c.downThrough40Writes(t)
	// The counter moves just after the install's data is visible.
	waitFor(t, "a snapshot installed", func() bool { return n.installs.Load() > 0 })
	c.waitLeader(c.members...)
	put(t, n, "/after", "1")
	for _, m := range c.members {
		got, err := quorumGet(t, m.n(), "/after")
		if err != nil || value(t, got) != "1" {
			t.Fatalf("quorum GET on %s = %+v, %v", m.name, got, err)
		}
	}

	// Restarted again, it restores from its installed snapshot.
	c.stop(down)
	n = c.start(down, "new")
	waitLocal(t, n, "/after", "1")
	put(t, n, "/again", "2")
}

// With a small snapshot_count, the log still keeps the default 5000
// entries behind each snapshot, as etcd does: a follower down for many
// snapshots' worth of writes, but fewer than that, catches up from the log.
func TestClusterMemberDownCatchesUpFromTheLogBehindSnapshots(t *testing.T) {
	c := newTestCluster(t, 3, func(cfg *Config) { cfg.SnapshotCount = 8 })
	_, n := c.downThrough40Writes(t)
	if k := n.installs.Load(); k != 0 {
		t.Fatalf("%d snapshots installed: the leader's log did not reach back 40 entries", k)
	}
}

func TestClusterGrowsFromOneMember(t *testing.T) {
	// The common path: a single member, then `member add` and a second
	// process started with state "existing". The log is not compacted: the
	// new member replays it from the first entry, bootstrap conf changes
	// included.
	c := newTestCluster(t, 1, nil)
	first := c.members[0]
	put(t, first.n(), "/one", "1")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for i := 1; i <= 2; i++ {
		m := newTestMember(t, fmt.Sprintf("m%d", i))
		added, err := c.members[i-1].n().AddMember(ctx, []string{m.url})
		if err != nil {
			t.Fatalf("AddMember %s: %v", m.name, err)
		}
		c.members = append(c.members, m)
		n := c.start(m, "existing")
		if n.Status().ID != added.ID {
			t.Fatalf("%s joined as %s, want %s", m.name, idString(n.Status().ID), idString(added.ID))
		}
		waitLocal(t, n, "/one", "1")
		if n.installs.Load() != 0 {
			t.Errorf("%s needed a snapshot though the log was whole", m.name)
		}
		c.waitLeader(c.members...)
		put(t, n, fmt.Sprintf("/from-%s", m.name), "x")
	}
	rounds := first.n().readRounds.Load()
	for _, m := range c.members {
		if got := m.n().Members(); len(got) != 3 {
			t.Fatalf("%s lists %d members", m.name, len(got))
		}
		for _, k := range []string{"/from-m1", "/from-m2"} {
			got, err := quorumGet(t, m.n(), k)
			if err != nil || value(t, got) != "x" {
				t.Fatalf("quorum GET %s on %s = %+v, %v", k, m.name, got, err)
			}
		}
	}
	if first.n().readRounds.Load() == rounds {
		t.Fatal("the first member, no longer the only voter, answered quorum reads without a read index")
	}
}

func TestJoinRefusesAnInitialClusterOutOfStep(t *testing.T) {
	// etcd's ValidateClusterAndAssignIDs: a member joining with an initial
	// cluster that does not list the cluster's members as they are (one
	// left out, one with a URL it does not have) does not start; with the
	// list right, it joins.
	c := newTestCluster(t, 2, nil)
	leader := c.waitLeader(c.members...)
	joiner := newTestMember(t, "joiner")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := leader.n().AddMember(ctx, []string{joiner.url}); err != nil {
		t.Fatalf("AddMember: %v", err)
	}
	// The joiner reads the member list from whichever member it reaches,
	// and a follower applies the addition after the leader answered.
	waitOnEach(t, c.members, "the joiner listed", func(m *testMember) bool {
		return slices.ContainsFunc(m.n().Members(), func(mm Member) bool { return slices.Contains(mm.PeerURLs, joiner.url) })
	})
	c.members = append(c.members, joiner)
	right := c.initialCluster()
	for _, tc := range []struct {
		name string
		edit func(map[string][]string)
		want string
	}{
		{"a member left out", func(ic map[string][]string) { delete(ic, c.members[0].name) }, "member count is unequal"},
		{"a member's URL wrong", func(ic map[string][]string) { ic[c.members[0].name] = []string{"http://127.0.0.1:1"} }, "no match found for existing member"},
	} {
		cfg := c.config(joiner, "existing")
		cfg.InitialCluster = maps.Clone(right)
		tc.edit(cfg.InitialCluster)
		n := NewNode(cfg)
		err := n.Start()
		if err == nil {
			n.Stop()
			t.Fatalf("%s: the joiner started", tc.name)
		}
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: Start: %v, want an error saying %q", tc.name, err, tc.want)
		}
	}
	n := c.start(joiner, "existing")
	c.waitLeader(c.members...)
	put(t, n, "/joined", "x")
}

func TestClusterWritesSurviveLeaderStop(t *testing.T) {
	// Writers on every member while the leader stops (transferring
	// leadership, during which Raft drops proposals): every acknowledged
	// write is there afterwards, once, on both remaining members.
	c := newTestCluster(t, 3, nil)
	leader := c.waitLeader(c.members...)
	rest := c.followers(leader, c.members...)
	type ack struct {
		key   string
		index uint64
	}
	acks := make(chan ack, 300)
	var wg sync.WaitGroup
	stopped := make(chan struct{})
	for _, m := range c.members {
		wg.Go(func() {
			for i := range 30 {
				if i == 10 && m != leader {
					<-stopped // the rest write after the stop
				}
				key := fmt.Sprintf("/w/%s/%d", m.name, i)
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				ev, err := m.n().Do(ctx, storage.Request{Method: storage.MethodPut, Path: key, Val: key})
				cancel()
				if errors.Is(err, ErrStopped) {
					return
				}
				if err != nil {
					t.Errorf("PUT %s: %v", key, err)
					return
				}
				acks <- ack{key, ev.Node.ModifiedIndex}
			}
		})
	}
	waitFor(t, "some writes", func() bool { return len(acks) >= 10 })
	c.stop(leader)
	close(stopped)
	wg.Wait()
	close(acks)
	c.waitLeader(rest...)
	seen := make(map[uint64]string)
	for a := range acks {
		if other, dup := seen[a.index]; dup {
			t.Fatalf("%s and %s acknowledged at the same index %d", a.key, other, a.index)
		}
		seen[a.index] = a.key
		for _, m := range rest {
			got, err := quorumGet(t, m.n(), a.key)
			if err != nil || value(t, got) != a.key || got.Node.ModifiedIndex != a.index {
				t.Fatalf("%s on %s = %+v, %v; acknowledged at %d", a.key, m.name, got, err, a.index)
			}
		}
	}
	if len(seen) < 40 {
		t.Fatalf("only %d writes acknowledged", len(seen))
	}
}

func TestClusterForwardedConfChangeWaitsForThePendingOne(t *testing.T) {
	// A follower's conf change reaches the leader while the leader's own is
	// in its log unapplied. Raft would turn it into an empty entry, which
	// its proposer would notice only after two election timeouts: the
	// leader must hold it until its own is applied, then propose it. The
	// leader's log shows which: in its term, no empty entry but its first.
	c := startLedByFirst(t, func(cfg *Config) { cfg.ElectionTimeout = 2 * time.Second })
	leader := c.waitLeader(c.members...)
	ln := leader.n()
	follower := c.followers(leader, c.members...)[0].n()

	// Hold the leader's loop once a conf change of its own is pending.
	held, unhold := holdWhileConfBusy(t, ln)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	update := func(n *Node, name string) <-chan error {
		errc := make(chan error, 1)
		data, err := json.Marshal(attributesContext{Attributes: &memberAttributes{Name: name, ClientURLs: []string{}}})
		if err != nil {
			t.Fatal(err)
		}
		cc := &raftpb.ConfChange{Type: raftpb.ConfChangeUpdateNode.Enum(), NodeId: new(n.id), Context: data}
		go func() { errc <- n.changeMembership(ctx, cc) }()
		return errc
	}
	own := update(ln, "leader-renamed")
	<-held
	forwarded := update(follower, "follower-renamed")
	// The held leader sends no heartbeat, so what reaches it now is the
	// follower's forwarded proposal.
	waitFor(t, "the forwarded conf change at the leader", func() bool { return len(ln.recvc) > 0 })
	unhold()
	for _, errc := range []<-chan error{own, forwarded} {
		if err := <-errc; err != nil {
			t.Fatalf("conf change: %v", err)
		}
	}
	for _, m := range c.members {
		waitFor(t, "both renames on "+m.name, func() bool {
			a, _ := m.n().member(ln.id)
			b, _ := m.n().member(follower.id)
			return a.Name == "leader-renamed" && b.Name == "follower-renamed"
		})
	}
	term := ln.Status().Term
	lo, _ := ln.ms.FirstIndex()
	hi, _ := ln.ms.LastIndex()
	ents, err := ln.ms.Entries(lo, hi+1, math.MaxUint64)
	if err != nil {
		t.Fatal(err)
	}
	empty := 0
	for _, e := range ents {
		if e.GetTerm() == term && e.GetType() == raftpb.EntryNormal && len(e.GetData()) == 0 {
			empty++
		}
	}
	if empty != 1 {
		t.Fatalf("%d empty entries in the leader's term %d, want 1 (its own): a conf change was turned into one", empty, term)
	}
}

// holdWhileConfBusy makes ln's loop stop before its next Save while a conf
// change is pending in its log: held receives once it is stopped there;
// unhold lets it go for good (also at cleanup).
func holdWhileConfBusy(t *testing.T, ln *Node) (held <-chan struct{}, unhold func()) {
	var hold atomic.Bool
	heldc := make(chan struct{}, 1)
	release := make(chan struct{})
	var releaseOnce sync.Once
	unhold = func() {
		hold.Store(false)
		releaseOnce.Do(func() { close(release) })
	}
	t.Cleanup(unhold)
	ln.ctrlc <- func() {
		ln.loop.beforeSave = func() {
			if hold.Load() && ln.confBusy() {
				select {
				case heldc <- struct{}{}:
				default:
				}
				<-release
			}
		}
	}
	hold.Store(true)
	return heldc, unhold
}

// startLedByFirst starts three members with long election timeouts (edit
// sets them) and has the first one campaign, rather than wait one out: it
// does once every member has applied the bootstrap conf changes (Raft
// refuses to campaign before).
func startLedByFirst(t *testing.T, edit func(*Config)) *testCluster {
	c := &testCluster{t: t, edit: edit}
	for i := range 3 {
		c.members = append(c.members, newTestMember(t, fmt.Sprintf("m%d", i)))
	}
	for _, m := range c.members {
		c.start(m, "new")
	}
	waitFor(t, "the bootstrap applied", func() bool {
		for _, m := range c.members {
			if m.n().AppliedIndex() < 3 {
				return false
			}
		}
		return true
	})
	first := c.members[0].n()
	first.ctrlc <- func() {
		if err := first.rn.Campaign(); err != nil {
			t.Errorf("campaign: %v", err)
		}
	}
	if leader := c.waitLeader(c.members...); leader != c.members[0] {
		t.Fatalf("%s leads, not the first member", leader.name)
	}
	// Each member publishes its client URLs once it knows the leader: a
	// conf change each, done before the test begins (the names come from
	// the initial cluster already). A publish still in flight would put an
	// entry in some logs and not yet in others.
	waitFor(t, "every member's client URLs on every member", func() bool {
		for _, m := range c.members {
			for _, mm := range m.n().memberSnapshot() {
				if mm.Name == "" || len(mm.ClientURLs) == 0 {
					return false
				}
			}
		}
		return true
	})
	return c
}

// waitSameApplied waits until the nodes have applied the same index: with
// nothing proposed meanwhile, none of them has entries the others lack.
func waitSameApplied(t *testing.T, nodes ...*Node) {
	t.Helper()
	waitFor(t, "the same applied index on every member", func() bool {
		for _, n := range nodes[1:] {
			if n.AppliedIndex() != nodes[0].AppliedIndex() || n.Status().RaftIndex != nodes[0].Status().RaftIndex {
				return false
			}
		}
		return true
	})
}

// observedLogs returns a config edit that records each member's log lines
// (Info and up) beside its usual logger, and a count of a member's lines
// whose message contains a snippet.
func observedLogs() (observe func(*Config), count func(name, snippet string) int) {
	logs := make(map[string]*observer.ObservedLogs)
	var mu sync.Mutex
	observe = func(cfg *Config) {
		core, observed := observer.New(zap.InfoLevel)
		mu.Lock()
		logs[cfg.Name] = observed
		mu.Unlock()
		cfg.Logger = zap.New(zapcore.NewTee(cfg.Logger.Core(), core)).Named(cfg.Name)
	}
	count = func(name, snippet string) int {
		mu.Lock()
		defer mu.Unlock()
		return logs[name].FilterMessageSnippet(snippet).Len()
	}
	return observe, count
}

// TestClusterStoppedLeaderHandsOver: a leader's Stop transfers leadership before
// its loop ends, which needs the others' answers (the streams into the member
// stay open until then). On this harness it passed also when they were cut as
// Stop began: the answers raced with the cut and mostly got through.
func TestClusterStoppedLeaderHandsOver(t *testing.T) {
	observe, count := observedLogs()
	c := startLedByFirst(t, observe)
	leader := c.members[0]
	put(t, leader.n(), "/before", "1")
	c.stop(leader)
	failed := count(leader.name, "transfer on stop failed")
	started := count(leader.name, "transferring leadership")
	if started == 0 || failed > 0 {
		t.Fatalf("leader's Stop: %d transfers started, %d failed", started, failed)
	}
	c.waitLeader(c.members[1:]...)
}

// TestClusterRemovedLeaderHandsOver removes the leader through a follower.
// The leader steps down when it applies its removal; rather than leave the
// others to wait out an election timeout, it asks the most caught-up of
// them to campaign at once (MsgTimeoutNow), which that one does after
// applying the removal. The followers' logs show the election came from
// the hand-over: Raft logs the MsgTimeoutNow it acts on.
func TestClusterRemovedLeaderHandsOver(t *testing.T) {
	observe, count := observedLogs()
	c := startLedByFirst(t, func(cfg *Config) {
		cfg.ElectionTimeout = 2 * time.Second
		observe(cfg)
	})
	leader := c.members[0]
	followers := c.members[1:]
	put(t, leader.n(), "/before", "1")

	// An election its own timeout starts begins with a pre-vote; one a
	// MsgTimeoutNow starts does not. Counted from the removal on.
	preVotes := func(name string) int { return count(name, "became pre-candidate") }
	preVotedBefore := map[string]int{}
	for _, m := range followers {
		preVotedBefore[m.name] = preVotes(m.name)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := followers[0].n().RemoveMember(ctx, leader.n().Status().ID); err != nil {
		t.Fatalf("RemoveMember(leader) through a follower: %v", err)
	}
	now := c.waitLeader(followers...)
	preVoted := preVotes(now.name) - preVotedBefore[now.name]
	took := count(now.name, "received MsgTimeoutNow")
	handed := count(leader.name, "handing leadership over after this member's removal")
	if took == 0 || preVoted != 0 || handed != 1 {
		t.Errorf("%s was elected without the removed leader's hand-over (MsgTimeoutNow received: %d; pre-votes: %d; hand-overs sent: %d)",
			now.name, took, preVoted, handed)
	}
	for _, m := range followers {
		put(t, m.n(), "/after/"+m.name, "2")
	}
	// The new leader first: its own stop hands leadership to the other.
	c.stop(now)
}

// TestClusterProposalLostWithItsLeaderIsRetried forwards a follower's
// proposal to a leader that cannot act on it (its loop is held), then has
// another member take over. The leader a proposal went to may lose it
// without a word; the follower proposes it again as soon as it learns of
// the new leader. Its election timeout is an hour, so the fallback (no
// answer in two election timeouts) cannot be what answers it.
func TestClusterProposalLostWithItsLeaderIsRetried(t *testing.T) {
	c := startLedByFirst(t, func(cfg *Config) {
		cfg.ElectionTimeout = 2 * time.Second
		if cfg.Name == "m1" {
			cfg.ElectionTimeout = time.Hour
		}
	})
	leader, proposer, next := c.members[0].n(), c.members[1].n(), c.members[2].n()
	put(t, leader, "/before", "1")
	// The member asked to take over must win the proposer's vote: its log
	// must be as long as the proposer's, who never campaigns itself.
	waitSameApplied(t, leader, proposer, next)

	// The leader's loop is held: it takes the messages that reach it
	// itself, and says when the proposal is among them; on release it
	// steps them all, as it would have.
	release := make(chan struct{})
	var releaseOnce sync.Once
	unhold := func() { releaseOnce.Do(func() { close(release) }) }
	t.Cleanup(unhold)
	gotProp := make(chan struct{})
	leader.ctrlc <- func() {
		var taken []*raftpb.Message
		for {
			select {
			case m := <-leader.recvc:
				taken = append(taken, m)
				if m.GetType() == raftpb.MsgProp && m.GetFrom() == proposer.id {
					close(gotProp)
				}
			case <-release:
				for _, m := range taken {
					leader.step(m)
				}
				return
			}
		}
	}

	errc := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_, err := proposer.Do(ctx, storage.Request{Method: storage.MethodPut, Path: "/lost", Val: "found"})
		errc <- err
	}()
	select {
	case <-gotProp:
	case <-time.After(10 * time.Second):
		t.Fatal("the proposal never reached the held leader")
	}
	term := next.Status().Term
	next.ctrlc <- func() {
		next.step(&raftpb.Message{Type: raftpb.MsgTimeoutNow.Enum(), From: new(leader.id), To: new(next.id), Term: new(term)})
	}
	if err := <-errc; err != nil {
		t.Fatalf("the proposal the old leader held: %v", err)
	}
	if got := next.Status().Leader; got != next.id {
		t.Errorf("leader %x, want %x", got, next.id)
	}
	unhold()
	for _, n := range []*Node{proposer, next} {
		waitLocal(t, n, "/lost", "found")
	}
	// The member with the hour-long timeout first, while it follows: a
	// leader's stop waits up to an election timeout for a hand-over.
	c.stop(c.members[1])
}

// TestClusterRemovedFollowerHearsAtOnce has a follower remove itself. The
// leader that applies the removal addresses it no more, and the removed
// member would learn of it only when its own election timeout made it
// talk: an hour here. The leader's last heartbeat (farewell) tells it
// first, so the removal answers and the member stops.
func TestClusterRemovedFollowerHearsAtOnce(t *testing.T) {
	c := startLedByFirst(t, func(cfg *Config) {
		cfg.ElectionTimeout = 2 * time.Second
		if cfg.Name == "m2" {
			cfg.ElectionTimeout = time.Hour
		}
	})
	leader, gone := c.members[0].n(), c.members[2].n()
	put(t, leader, "/before", "1")
	// A watch open on the member: no event will reach it once the member
	// is removed, and its client must learn so, to move to another one.
	w, err := gone.Watch("/never", false, true, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Remove()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := gone.RemoveMember(ctx, gone.id); err != nil {
		t.Fatalf("a follower removing itself: %v", err)
	}
	waitFor(t, "the removed member to stop serving", func() bool { return !gone.Running() })
	waitFor(t, "the removed member's watch to end", func() bool { return watchEnded(w) })
	if !w.Ended() {
		t.Error("the removed member's watch ended, but not as one its member stopped serving")
	}
	if gone.Failed() {
		t.Error("a removed member says a failure stopped it")
	}
	if got := leader.Members(); len(got) != 2 || slices.ContainsFunc(got, func(m Member) bool { return m.ID == gone.id }) {
		t.Errorf("members after the removal: %+v", got)
	}
	put(t, c.members[1].n(), "/after", "2")
}

// TestClusterConcurrentAddsOfOnePeerURL adds one peer URL through every
// member at once. Each proposer's own check passes (none has applied any of
// the additions yet); the leader, which takes them one after the other,
// refuses all but the first, as etcd refuses them when it applies them.
func TestClusterConcurrentAddsOfOnePeerURL(t *testing.T) {
	c := startLedByFirst(t, func(cfg *Config) { cfg.ElectionTimeout = 2 * time.Second })
	leader := c.waitLeader(c.members...)
	ln := leader.n()

	// Hold the leader's loop once its own addition is pending, until the
	// followers' additions have reached it.
	held, unhold := holdWhileConfBusy(t, ln)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	const url = "http://127.0.0.1:9"
	add := func(n *Node) <-chan error {
		errc := make(chan error, 1)
		go func() {
			_, err := n.AddMember(ctx, []string{url})
			errc <- err
		}()
		return errc
	}
	errcs := []<-chan error{add(ln)}
	<-held
	for _, f := range c.followers(leader, c.members...) {
		errcs = append(errcs, add(f.n()))
		// Its own check passed (nothing is applied while the leader is
		// held): the refusal, if any, must come from the leader.
		waitFor(t, "the addition proposed on "+f.name, func() bool { return f.n().w.len() > 0 })
	}
	unhold()
	var ok, refused int
	for _, errc := range errcs {
		switch err := <-errc; {
		case err == nil:
			ok++
		case errors.Is(err, ErrIDExists), errors.Is(err, ErrPeerURLExists):
			refused++
		default:
			t.Errorf("AddMember: %v", err)
		}
	}
	if ok != 1 || refused != 2 {
		t.Fatalf("%d additions succeeded and %d were refused, want 1 and 2", ok, refused)
	}
	codes := make(chan []string, 1)
	ln.ctrlc <- func() {
		var cs []string
		for _, id := range ln.loop.verdicts.order {
			if code := ln.loop.verdicts.m[id]; code == refusalCodes[ErrIDExists] || code == refusalCodes[ErrPeerURLExists] {
				cs = append(cs, code)
			}
		}
		codes <- cs
	}
	if cs := <-codes; len(cs) != 2 {
		t.Errorf("the leader's log holds refusals %v, want two", cs)
	}
	waitSameApplied(t, c.members[0].n(), c.members[1].n(), c.members[2].n())
	for _, m := range c.members {
		with := 0
		for _, mm := range m.n().Members() {
			if slices.Contains(mm.PeerURLs, url) {
				with++
			}
		}
		if with != 1 {
			t.Errorf("%s lists %d members with %s, want 1", m.name, with, url)
		}
		voters := make(chan int, 1)
		m.n().ctrlc <- func() { voters <- len(m.n().loop.confState.GetVoters()) }
		if v := <-voters; v != 4 {
			t.Errorf("%s: %d voters in Raft, want 4", m.name, v)
		}
	}
}

// TestClusterLateCopyOfUpdateIsANoOp proposes a peer URL update a second
// time with the same request ID (a proposer's retry whose first attempt
// made it after all) after a newer update: the copy must not undo it.
func TestClusterLateCopyOfUpdateIsANoOp(t *testing.T) {
	c := startLedByFirst(t, nil)
	leader := c.waitLeader(c.members...)
	ln := leader.n()
	target := c.followers(leader, c.members...)[0]
	tid := target.n().id
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	first := &raftpb.ConfChange{Type: raftpb.ConfChangeUpdateNode.Enum(), NodeId: new(tid),
		Context: encodeMember(memberRecord{ID: tid, PeerURLs: []string{"http://127.0.0.1:9"}}), Id: new(ln.ids.id())}
	submit := func() error {
		res, err := ln.submit(ctx, first.GetId(), proposal{cc: first, c: newWaitChan()})
		if err != nil {
			return err
		}
		return res.err
	}
	if err := submit(); err != nil {
		t.Fatalf("first update: %v", err)
	}
	if err := ln.UpdateMember(ctx, tid, []string{target.url}); err != nil {
		t.Fatalf("second update: %v", err)
	}
	if err := submit(); err != nil {
		t.Fatalf("the copy of the first update: %v, want it taken as applied before", err)
	}
	if rec, _ := ln.member(tid); !slices.Equal(rec.PeerURLs, []string{target.url}) {
		t.Fatalf("the leader has %v for %s, want %s: the late copy undid the newer update", rec.PeerURLs, target.name, target.url)
	}
	waitSameApplied(t, c.members[0].n(), c.members[1].n(), c.members[2].n())
	for _, m := range c.members {
		if rec, _ := m.n().member(tid); !slices.Equal(rec.PeerURLs, []string{target.url}) {
			t.Errorf("%s has %v for %s, want %s: the late copy undid the newer update", m.name, rec.PeerURLs, target.name, target.url)
		}
	}
}

// TestClusterRemovalOfTheLastVoterIsRefused removes every member, the
// leader last, past the proposer's own checks (as concurrent removals
// through different members pass them: each sees three members). The
// leader must refuse the removal that would leave no voter: Raft panics on
// it, and at every restart after.
func TestClusterRemovalOfTheLastVoterIsRefused(t *testing.T) {
	c := startLedByFirst(t, nil)
	leader := c.waitLeader(c.members...)
	ln := leader.n()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	remove := func(id uint64) error {
		return ln.changeMembership(ctx, &raftpb.ConfChange{Type: raftpb.ConfChangeRemoveNode.Enum(), NodeId: new(id)})
	}
	for _, f := range c.followers(leader, c.members...) {
		if err := remove(f.n().id); err != nil {
			t.Fatalf("removing %s: %v", f.name, err)
		}
	}
	if err := remove(ln.id); !errors.Is(err, ErrLastMember) {
		t.Fatalf("removing the last voter: %v, want %v", err, ErrLastMember)
	}
	voters := make(chan int, 1)
	ln.ctrlc <- func() { voters <- len(ln.loop.confState.GetVoters()) }
	if v := <-voters; v != 1 {
		t.Fatalf("%d voters, want 1", v)
	}
	put(t, ln, "/still-writable", "yes")
}

// TestClusterStopOfTheLastLeaderDoesNotWait stops the followers, then the
// leader. Raft still counts the followers as recently active (the leader's
// check-quorum round, one election timeout, has not come), but they no
// longer answer: handing leadership to one of them cannot succeed, and
// Stop must not wait the leader's election timeout (a minute here) for it.
func TestClusterStopOfTheLastLeaderDoesNotWait(t *testing.T) {
	c := startLedByFirst(t, func(cfg *Config) {
		cfg.ElectionTimeout = 2 * time.Second
		if cfg.Name == "m0" {
			cfg.ElectionTimeout = time.Minute
		}
	})
	leader := c.members[0].n()
	put(t, leader, "/before", "1")
	c.stop(c.members[1])
	c.stop(c.members[2])
	stopped := make(chan error, 1)
	go func() { stopped <- leader.Stop() }()
	select {
	case err := <-stopped:
		if err != nil {
			t.Fatalf("Stop: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the last leader's Stop still waits after 20s: it is handing leadership to a stopped member")
	}
}

// TestLeaderElectedDuringADrainJudgesConfChanges has a member win its
// election while the loop takes in messages, and receive a forwarded conf
// change in the same pass, before the Ready that reports the election. The
// change (a member with this member's own peer URL) must be judged, and
// refused, as any change the leader takes: loop.lead learns of the election
// only at that Ready, so the loop asks Raft whether it leads.
func TestLeaderElectedDuringADrainJudgesConfChanges(t *testing.T) {
	n := NewNode(Config{
		DataDir:         t.TempDir(),
		ElectionTimeout: time.Hour, // it campaigns when the test says so
		Logger:          zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)),
	})
	n.loop.noFastCampaign = true
	if err := n.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Stop() })
	waitFor(t, "the bootstrap applied", func() bool { return n.AppliedIndex() >= 1 })
	self := n.Members()[0]
	const newID = 0x1234
	cc := &raftpb.ConfChange{
		Id:      new(n.ids.id()),
		Type:    raftpb.ConfChangeAddNode.Enum(),
		NodeId:  new(uint64(newID)),
		Context: encodeMember(memberRecord{ID: newID, PeerURLs: self.PeerURLs}),
	}
	data, err := proto.Marshal(cc)
	if err != nil {
		t.Fatal(err)
	}
	// Raft campaigns only once it has applied the bootstrap conf change
	// (Advance after the Ready that applied it).
	waitFor(t, "Raft to have applied the bootstrap", func() bool {
		applied := make(chan uint64)
		n.ctrlc <- func() { applied <- n.rn.BasicStatus().Applied }
		return <-applied >= 1
	})
	done := make(chan error, 1)
	n.ctrlc <- func() {
		if err := n.rn.Campaign(); err != nil {
			done <- err
			return
		}
		// The election's Readies (votes to itself, hard state; nothing to
		// persist that the next Ready does not supersede), handled here so
		// that Raft leads before the loop's next Ready tells it so, as when
		// the last vote arrives among the messages the loop takes in.
		for i := 0; i < 10 && !n.raftLeads() && n.rn.HasReady(); i++ {
			rd := n.rn.Ready()
			if len(rd.Entries) > 0 || len(rd.CommittedEntries) > 0 {
				done <- fmt.Errorf("an election Ready with entries: %+v", rd)
				return
			}
			n.rn.Advance(rd)
		}
		if !n.raftLeads() || n.loop.lead == n.id {
			done <- fmt.Errorf("the test needs Raft to lead before the loop knows it: %+v, loop.lead %x", n.rn.BasicStatus(), n.loop.lead)
			return
		}
		n.step(&raftpb.Message{
			Type:    raftpb.MsgProp.Enum(),
			From:    new(uint64(newID)),
			To:      new(n.id),
			Entries: []*raftpb.Entry{{Type: raftpb.EntryConfChange.Enum(), Data: data}},
		})
		done <- nil
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the leader's first entry and the change applied", func() bool {
		return n.AppliedIndex() >= 3
	})
	if ms := n.Members(); len(ms) != 1 {
		t.Fatalf("members after a change with a peer URL in use: %+v; want it refused", ms)
	}
	put(t, n, "/after", "1") // still its own quorum
}

// TestClusterExpiresKeysWithNothingElseGoingOn writes keys with a short TTL
// to a three-member cluster, one at a time, and nothing else: each must go
// on every member. The leader applies a lone write in a Ready of its own,
// whose bbolt transaction commits later (deferred apply); its reaper must
// count that write's expiration all the same.
func TestClusterExpiresKeysWithNothingElseGoingOn(t *testing.T) {
	c := newTestCluster(t, 3, nil)
	for i := range 4 {
		key := fmt.Sprintf("/ttl/%d", i)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := c.members[i%3].n().Do(ctx, storage.Request{Method: storage.MethodPut, Path: key, Val: "v",
			Expiration: time.Now().Add(200 * time.Millisecond).UnixNano()})
		cancel()
		if err != nil {
			t.Fatalf("PUT %s: %v", key, err)
		}
		for _, m := range c.members {
			waitFor(t, key+" expired on "+m.name, func() bool {
				_, err := m.n().Get(context.Background(), key, false, false, false)
				var verr *storage.Error
				return errors.As(err, &verr) && verr.ErrorCode == storage.EcodeKeyNotFound
			})
		}
	}
}

// TestClusterRestartWithEmptyDataDirIsRefused restarts a member of a running
// cluster on an empty data directory with its first configuration (state
// new). It would bootstrap a log the others' commit index is far past, and
// Raft would panic as soon as the leader spoke to it; like etcd ("member …
// has already been bootstrapped") it must refuse to start instead.
func TestClusterRestartWithEmptyDataDirIsRefused(t *testing.T) {
	c := startLedByFirst(t, nil)
	put(t, c.members[0].n(), "/before", "1")
	m := c.members[2]
	// etcd's test: the cluster lists the member with the client URLs it
	// published when it first ran.
	waitFor(t, m.name+"'s client URLs on the others", func() bool {
		for _, o := range c.members[:2] {
			if !slices.ContainsFunc(o.n().memberSnapshot(), func(r memberRecord) bool {
				return r.ID == m.n().id && len(r.ClientURLs) > 0
			}) {
				return false
			}
		}
		return true
	})
	c.stop(m)
	m.dir = t.TempDir()
	n := NewNode(c.config(m, "new"))
	m.node.Store(n)
	err := n.Start()
	if err == nil {
		n.Stop()
		t.Fatal("a member with an emptied data directory started")
	}
	if !strings.Contains(err.Error(), "has already been bootstrapped") || !strings.Contains(err.Error(), idString(n.id)) {
		t.Fatalf("Start: %v; want etcd's refusal naming the member", err)
	}
	put(t, c.members[0].n(), "/after", "2")
}

// TestLoopPanicStopsTheMemberOnly panics on the loop goroutine, as Raft does
// on a state it cannot go on from: the member stops serving, the process
// (Caddy, and every other site in it) goes on, and Stop still works.
func TestLoopPanicStopsTheMemberOnly(t *testing.T) {
	dir := t.TempDir()
	n := startNode(t, dir, nil)
	put(t, n, "/before", "1")
	n.ctrlc <- func() { panic("a state Raft cannot go on from (test)") }
	waitFor(t, "the loop to end", func() bool {
		select {
		case <-n.donec:
			return true
		default:
			return false
		}
	})
	if n.Running() {
		t.Error("the member still says it runs")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := n.Do(ctx, storage.Request{Method: storage.MethodPut, Path: "/after", Val: "2"}); !errors.Is(err, ErrStopped) {
		t.Errorf("a write after the panic: %v, want ErrStopped", err)
	}
	if !n.Failed() {
		t.Fatal("a member a panic stopped does not say it failed")
	}
	// The dead node gives its file back; a new one starts the member again.
	if err := n.Stop(); err != nil {
		t.Fatalf("Stop of the failed node: %v", err)
	}
	if n.Failed() {
		t.Error("a stopped node still says it failed")
	}
	again := startNode(t, dir, nil)
	if ev, err := again.Get(ctx, "/before", false, false, true); err != nil || ev.Node.Value == nil || *ev.Node.Value != "1" {
		t.Fatalf("the member started again: GET /before = %+v, %v", ev, err)
	}
	put(t, again, "/after", "2")
}

// watchEnded reports whether w's channel is closed, taking an event that
// may still be in it.
func watchEnded(w *storage.Watcher) bool {
	select {
	case _, open := <-w.EventChan:
		return !open
	default:
		return false
	}
}

// TestRemovalEndsWatchesWhileTheLoopLingers: a member that applied its own
// removal keeps its Raft loop an election timeout more (see removedBy), but
// its watches end at once, so that their clients move to another member now.
func TestRemovalEndsWatchesWhileTheLoopLingers(t *testing.T) {
	n := startNode(t, t.TempDir(), nil)
	w, err := n.Watch("/k", false, true, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Remove()
	n.ctrlc <- func() { n.removedBy("a test", time.Hour) }
	waitFor(t, "the watch to end", func() bool { return watchEnded(w) })
	if !w.Ended() || n.Running() || n.Failed() {
		t.Errorf("after the removal: watch ended by the store %v, running %v, failed %v; want true, false, false", w.Ended(), n.Running(), n.Failed())
	}
	select {
	case <-n.donec:
		t.Error("the loop ended at once; it should linger")
	default:
	}
}

// TestSelfStatsRates checks etcd's send and receive rates of append
// messages: the last samples' count and size per second over the time they
// span, nothing once the last is over a second old.
func TestSelfStatsRates(t *testing.T) {
	var q rateQueue
	t0 := time.Unix(1000, 0)
	if p, b := q.rates(t0); p != 0 || b != 0 {
		t.Fatalf("empty queue: %v %v", p, b)
	}
	for i, size := range []int{10, 20, 30} {
		q.add(t0.Add(time.Duration(i)*100*time.Millisecond), size)
	}
	if p, b := q.rates(t0.Add(250 * time.Millisecond)); math.Abs(p-15) > 1e-9 || math.Abs(b-300) > 1e-9 {
		t.Errorf("3 messages, 60 bytes over 200ms: %v/s %vB/s, want 15 and 300", p, b)
	}
	if p, b := q.rates(t0.Add(1300 * time.Millisecond)); p != 0 || b != 0 {
		t.Errorf("a second after the last message: %v %v", p, b)
	}
	for i := range 2 * rateSamples {
		q.add(t0.Add(2*time.Second+time.Duration(i)*time.Millisecond), 1)
	}
	if p, b := q.rates(t0.Add(2400 * time.Millisecond)); p < 1000 || p > 1010 || math.Abs(b-p) > 1e-9 {
		t.Errorf("the last %d of 1 ms apart: %v/s %vB/s, want about 1000", rateSamples, p, b)
	}

	// A cluster's leader sends appends, its followers receive them. Each
	// look follows fresh writes: the rates are gone a second after them.
	c := newTestCluster(t, 3, nil)
	leader := c.waitLeader(c.members...)
	i := 0
	waitFor(t, "the leader's send rates and the followers' receive rates", func() bool {
		for range 3 {
			put(t, leader.n(), fmt.Sprintf("/rate/%d", i), "v")
			i++
		}
		if s := leader.n().SelfStats(); s.SendPkgRate <= 0 || s.SendBandwidthRate <= 0 {
			return false
		}
		for _, f := range c.followers(leader, c.members...) {
			if s := f.n().SelfStats(); s.RecvPkgRate <= 0 || s.RecvBandwidthRate <= 0 {
				return false
			}
		}
		return true
	})
}

// Every member publishes the features of its build with its attributes; ClusterHas holds on
// a member once every other member has published the feature, and no longer once one
// publishes attributes without it (a member of an earlier build restarting).
func TestClusterHasFeaturesOnceEveryMemberPublishedThem(t *testing.T) {
	c := newTestCluster(t, 3, nil)
	c.waitLeader(c.members...)
	for _, m := range c.members {
		waitFor(t, "every member's features on "+m.name, func() bool { return m.n().ClusterHas(FeatureAuth) })
	}
	if c.members[0].n().ClusterHas("time-travel") {
		t.Fatal("a feature nobody has")
	}
	old := c.members[2].n()
	data, err := json.Marshal(attributesContext{Attributes: &memberAttributes{Name: c.members[2].name, ClientURLs: []string{}}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := old.changeMembership(ctx, &raftpb.ConfChange{Type: raftpb.ConfChangeUpdateNode.Enum(), NodeId: new(old.id), Context: data}); err != nil {
		t.Fatal(err)
	}
	for _, m := range c.members[:2] {
		waitFor(t, "the old build's attributes on "+m.name, func() bool { return !m.n().ClusterHas(FeatureAuth) })
	}
	if !old.ClusterHas(FeatureAuth) {
		t.Fatal("a member doubts its own features")
	}
}

// TestClusterLearnsChangedClientURLs: a member whose advertised client URLs
// change while it runs (a Caddy reload) publishes them, and every member
// lists them; a change back, and a quick change after it that overtakes
// its publish, end with the last URLs everywhere.
func TestClusterLearnsChangedClientURLs(t *testing.T) {
	c := newTestCluster(t, 3, nil)
	c.waitLeader(c.members...)
	m := c.members[1]
	clientURLs := func(on *testMember) []string {
		for _, mm := range on.n().Members() {
			if mm.Name == m.name {
				return mm.ClientURLs
			}
		}
		return nil
	}
	original := clientURLs(m)
	for _, urls := range [][]string{{"https://moved.example:2379"}, original, {"https://a.example:1", "https://b.example:2"}} {
		m.n().SetAdvertiseClientURLs(urls)
		if len(urls) == 2 {
			m.n().SetAdvertiseClientURLs(urls[1:])
			urls = urls[1:]
		}
		for _, on := range c.members {
			waitFor(t, fmt.Sprintf("%v on %s", urls, on.name), func() bool { return slices.Equal(clientURLs(on), urls) })
		}
	}
}

// TestEndRequestsEndsWaitsWithoutAQuorum: a member that lost its quorum
// holds writes and quorum reads until their deadline; EndRequests (Caddy
// exiting) ends them at once with ErrStopped, and those that come after,
// while the node itself goes on.
func TestEndRequestsEndsWaitsWithoutAQuorum(t *testing.T) {
	c := newTestCluster(t, 3, nil)
	c.stop(c.members[1])
	c.stop(c.members[2])
	n := c.members[0].n()
	ctx, cancel := context.WithTimeout(context.Background(), time.Hour)
	defer cancel()
	errc := make(chan error, 2)
	go func() {
		_, err := n.Do(ctx, storage.Request{Method: storage.MethodPut, Path: "/held", Val: "1"})
		errc <- err
	}()
	go func() {
		_, err := n.Get(ctx, "/held", false, false, true)
		errc <- err
	}()
	select {
	case err := <-errc:
		t.Fatalf("a request without a quorum ended on its own: %v", err)
	case <-time.After(4 * c.config(c.members[0], "new").ElectionTimeout):
		// Held through two retry epochs: they wait for a quorum.
	}
	n.EndRequests()
	for range 2 {
		select {
		case err := <-errc:
			if !errors.Is(err, ErrStopped) {
				t.Fatalf("got %v, want ErrStopped", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("EndRequests left a request waiting")
		}
	}
	if _, err := n.Do(ctx, storage.Request{Method: storage.MethodPut, Path: "/later", Val: "1"}); !errors.Is(err, ErrStopped) {
		t.Fatalf("a write after EndRequests: %v", err)
	}
	if !n.Running() {
		t.Fatal("EndRequests stopped the node")
	}
}

// TestRestartedMemberIsReadyOnceCaughtUp: a member that restarts serves its clients only
// once it has applied what the cluster had committed when it asked (a leader's read index),
// as etcd serves none before it has published itself: with its peers down it is not ready,
// whatever its file holds; with a quorum back, it is, and holds every write.
func TestRestartedMemberIsReadyOnceCaughtUp(t *testing.T) {
	c := newTestCluster(t, 3, nil)
	ev := put(t, c.members[0].n(), "/before", "1")
	for _, m := range c.members {
		c.stop(m)
	}
	n := c.start(c.members[0], "new")
	ctx, cancel := context.WithTimeout(context.Background(), 4*c.config(c.members[0], "new").ElectionTimeout)
	err := n.WaitReady(ctx)
	cancel()
	if !errors.Is(err, ErrTimeout) || n.Ready() {
		t.Fatalf("ready without a quorum: %v", err)
	}
	c.start(c.members[1], "new")
	ctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := n.WaitReady(ctx); err != nil {
		t.Fatalf("not ready with a quorum back: %v", err)
	}
	got, err := n.Get(ctx, "/before", false, false, false)
	if err != nil || got.Node.ModifiedIndex != ev.Node.ModifiedIndex || n.Status().EtcdIndex < ev.Node.ModifiedIndex {
		t.Fatalf("ready at etcd index %d without the write at %d: %+v %v", n.Status().EtcdIndex, ev.Node.ModifiedIndex, got, err)
	}
	c.stop(c.members[0])
	if err := n.WaitReady(ctx); err != nil {
		t.Fatalf("a ready member that stopped: %v", err)
	}
	// Without a quorum it cannot become ready before the Stop below (with
	// one, it may under load: its peer still leads, a round trip away).
	c.stop(c.members[1])
	again := c.start(c.members[0], "new")
	if err := again.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := again.WaitReady(ctx); !errors.Is(err, ErrStopped) {
		t.Fatalf("a member stopped before it was ready: %v", err)
	}
}

// TestReadIndexOverSlowLinks: with a 300 ms round trip between members (a
// cluster across regions, tuned as etcd's guide says: heartbeat about the
// round trip, election timeout ten times it), a follower's read index
// takes two round trips (to the leader, the leader's heartbeat round, the
// answer back), longer than readRetry. An answer to an attempt that a
// retry replaced still counts for its round: otherwise every answer comes
// too late, and followers never become ready nor serve a quorum read.
func TestReadIndexOverSlowLinks(t *testing.T) {
	c := newSlowTestCluster(t, 3, 150*time.Millisecond, func(cfg *Config) {
		cfg.HeartbeatInterval = 300 * time.Millisecond
		cfg.ElectionTimeout = 3 * time.Second
	})
	leader := c.waitLeader(c.members...)
	put(t, leader.n(), "/k", "v")
	for _, f := range c.followers(leader, c.members...) {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		err := f.n().WaitReady(ctx)
		if err == nil {
			var ev *storage.Event
			ev, err = f.n().Get(ctx, "/k", false, false, true)
			if err == nil && *ev.Node.Value != "v" {
				t.Errorf("follower %s: quorum GET /k = %q", f.name, *ev.Node.Value)
			}
		}
		cancel()
		if err != nil {
			t.Errorf("follower %s: %v (read index rounds asked: %d)", f.name, err, f.n().readRounds.Load())
		}
	}
}

// TestRetryAfterOriginalForgottenIsNotAppliedTwice: a follower whose
// forwarded write committed, but who does not hear from the leader (the
// link to it cut one way), proposes the write again when it hears a leader
// again. By then more requests than the store remembers (storage's dedup)
// were applied after the first copy: a copy proposed then would be applied
// as a new write (here a second in-order key). Catching up from the log,
// the follower applies the first copy before it would retry, and answers
// with it; catching up by snapshot (the leader compacted its log), which
// answers nobody, it gives up with a timeout.
func TestRetryAfterOriginalForgottenIsNotAppliedTwice(t *testing.T) {
	for _, tc := range []struct {
		name          string
		snapshotCount uint64
	}{{"log", 100000}, {"snapshot", 2000}} {
		t.Run(tc.name, func(t *testing.T) {
			c := newTestCluster(t, 3, func(cfg *Config) { cfg.SnapshotCount, cfg.SnapshotCatchUpEntries = tc.snapshotCount, tc.snapshotCount })
			leader := c.waitLeader(c.members...)
			f := c.followers(leader, c.members...)[0]
			f.refuseFrom.Store(idString(leader.n().Status().ID))

			done := make(chan error, 1)
			go func() {
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
				defer cancel()
				_, err := f.n().Do(ctx, storage.Request{Method: storage.MethodPost, Path: "/q", Val: "once"})
				done <- err
			}()
			var posted uint64 // the POST's index
			waitFor(t, "the in-order key on the leader", func() bool {
				ev, err := leader.n().Get(context.Background(), "/q", false, false, false)
				if err != nil || len(ev.Node.Nodes) != 1 {
					return false
				}
				posted = ev.Node.Nodes[0].ModifiedIndex
				return true
			})
			const writes = 10100 // more than the store remembers
			var next atomic.Int64
			var wg sync.WaitGroup
			for range 32 {
				wg.Go(func() {
					for i := next.Add(1); i <= writes; i = next.Add(1) {
						ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
						_, err := leader.n().Do(ctx, storage.Request{Method: storage.MethodPut, Path: fmt.Sprintf("/w/%d", i%100), Val: "x"})
						cancel()
						if err != nil {
							t.Errorf("write %d: %v", i, err)
							return
						}
					}
				})
			}
			wg.Wait()
			f.refuseFrom.Store("")
			err := <-done
			if tc.name == "snapshot" && errors.Is(err, ErrTimeout) {
				err = nil
			}
			if err != nil {
				t.Fatalf("the follower's write: %v", err)
			}
			// Every write moves the store index by one: the POST's once,
			// and the PUTs after it. (Not the leader's index when the last
			// answer came: an answer may go out before the batch it came
			// from is committed, and Status shows committed batches only.)
			want := posted + writes
			for _, m := range c.members {
				waitFor(t, m.name+" at the leader's index", func() bool { return m.n().Status().EtcdIndex >= want })
				ev, err := m.n().Get(context.Background(), "/q", false, false, false)
				if err != nil {
					t.Fatal(err)
				}
				if len(ev.Node.Nodes) != 1 {
					t.Errorf("%s: one POST left %d in-order keys", m.name, len(ev.Node.Nodes))
				}
			}
			for _, m := range c.members {
				if got := m.n().Status().EtcdIndex; got != want {
					t.Errorf("%s: store index %d, want %d (the POST at %d and %d writes): a late copy applied", m.name, got, want, posted, writes)
				}
			}
		})
	}
}

// TestSnapshotReportOutlastsAFullReportQueue: the report of a failed
// snapshot transfer comes while the leader's loop is stalled with its
// report queue full (a slow disk, peers failing at once). Raft leaves a
// follower's snapshot state only on that report: dropped, the follower
// would get nothing more from this leader. It must still catch up.
func TestSnapshotReportOutlastsAFullReportQueue(t *testing.T) {
	var refuse atomic.Bool
	var leaderNode atomic.Pointer[Node]
	c := &testCluster{t: t, edit: func(cfg *Config) {
		cfg.SnapshotCount, cfg.SnapshotCatchUpEntries = 8, 8
		cfg.ElectionTimeout = 2 * time.Second
	}}
	for i := range 3 {
		m := &testMember{name: fmt.Sprintf("m%d", i), dir: t.TempDir()}
		m.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			_ = http.NewResponseController(w).EnableFullDuplex()
			n := m.n()
			if n == nil {
				AnswerBeforeBody(w, r) // refused: the body is not read
				http.Error(w, "no member here", http.StatusServiceUnavailable)
				return
			}
			if r.URL.Path == peerSnapshotPath && refuse.CompareAndSwap(true, false) {
				// The leader's loop stalls (a stand-in for a slow disk)
				// with its report queue full until the sender has
				// reported that this snapshot was refused (it waits in
				// the overflow; dropped, the stall ends at a deadline
				// well below the election timeout, so that no new
				// leader comes to the follower's rescue).
				ln := leaderNode.Load()
				stalled := make(chan struct{})
				ln.ctrlc <- func() {
					for full := false; !full; {
						select {
						case ln.reportc <- report{to: 0xdead, unreachable: true}:
						default:
							full = true
						}
					}
					close(stalled)
					deadline := time.Now().Add(300 * time.Millisecond)
					tick := time.NewTicker(5 * time.Millisecond)
					defer tick.Stop()
					for !ln.snapReported.Load() && time.Now().Before(deadline) {
						<-tick.C
					}
				}
				<-stalled
				AnswerBeforeBody(w, r) // refused: the body is not read
				http.Error(w, "refused (test)", http.StatusServiceUnavailable)
				return
			}
			n.PeerHandler().ServeHTTP(w, r)
		}))
		t.Cleanup(m.srv.Close)
		m.url = m.srv.URL
		c.members = append(c.members, m)
	}
	for _, m := range c.members {
		c.start(m, "new")
	}
	leader := c.waitLeader(c.members...)
	leaderNode.Store(leader.n())
	f := c.followers(leader, c.members...)[0]
	c.stop(f)
	for i := range 40 {
		put(t, leader.n(), fmt.Sprintf("/k%d", i), fmt.Sprint(i))
	}
	refuse.Store(true)
	n := c.start(f, "new")
	waitFor(t, "the follower to catch up after a refused snapshot", func() bool {
		ev, err := n.localGet("/k39", false, false)
		return err == nil && ev.Node.Value != nil
	})
	if refuse.Load() {
		t.Fatal("no snapshot was refused: the test missed its path")
	}
}

// TestRemovedMemberQuietsItsTransport: a removed member whose process goes
// on (Caddy serves other sites; nobody calls Stop) stops its transport a
// while after its loop ended: no more probes of its former peers, and its
// peer endpoint takes nothing more.
func TestRemovedMemberQuietsItsTransport(t *testing.T) {
	c := newTestCluster(t, 3, nil)
	leader := c.waitLeader(c.members...)
	gone := c.followers(leader, c.members...)[0].n()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := leader.n().RemoveMember(ctx, gone.id); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the removed member's transport to stop", func() bool {
		gone.tr.mu.RLock()
		defer gone.tr.mu.RUnlock()
		return gone.tr.stopped && len(gone.tr.peers) == 0 && gone.peerH.Load() == nil
	})
}

// clusterWithFollowers starts three members, writes /a through the leader
// and waits until the first follower has it.
func clusterWithFollowers(t *testing.T) (c *testCluster, leader *testMember, followers []*testMember) {
	t.Helper()
	c = newTestCluster(t, 3, nil)
	leader = c.waitLeader(c.members...)
	put(t, leader.n(), "/a", "1")
	followers = c.followers(leader, c.members...)
	waitLocal(t, followers[0].n(), "/a", "1")
	return c, leader, followers
}

// receivedSnapshot streams ln's member.db into fn's store as a snapshot
// received for index, and returns its file.
func receivedSnapshot(t *testing.T, ln, fn *Node, index uint64) string {
	t.Helper()
	pr, pw := io.Pipe()
	go func() {
		_, err := ln.store.WriteSnapshot(pw)
		pw.CloseWithError(err)
	}()
	path, err := fn.store.ReceiveSnapshot(pr, index)
	if err != nil {
		t.Fatal(err)
	}
	return path
}

// snapMessage is a MsgSnap from ln to fn of the received file path.
func snapMessage(ln, fn *Node, path string, index, term uint64, voters ...uint64) *raftpb.Message {
	return &raftpb.Message{
		Type: raftpb.MsgSnap.Enum(), From: proto.Uint64(ln.id), To: proto.Uint64(fn.id), Term: proto.Uint64(term),
		Snapshot: &raftpb.Snapshot{Data: []byte(path), Metadata: &raftpb.SnapshotMetadata{
			Index: proto.Uint64(index), Term: proto.Uint64(term), ConfState: &raftpb.ConfState{Voters: voters}}},
	}
}

// waitGone waits until the file at path is removed; what names it.
func waitGone(t *testing.T, what, path string) {
	t.Helper()
	waitFor(t, what+" removed", func() bool {
		_, err := os.Stat(path)
		return errors.Is(err, os.ErrNotExist)
	})
}

// A snapshot Raft ignores (at or below its commit index: another copy of
// one already installed) has its received file removed at once, not at the
// member's next local snapshot.
func TestIgnoredSnapshotFileGoesAtOnce(t *testing.T) {
	_, leader, fs := clusterWithFollowers(t)
	f := fs[0]
	ln, fn := leader.n(), f.n()
	// At most what the leader's file holds (ln.applied may count an apply
	// whose transaction is still open, which a copy of the file lacks),
	// and at most the follower's Raft commit index, so that Raft ignores it.
	index := min(fn.applied.Load(), ln.store.AppliedIndex())

	path := receivedSnapshot(t, ln, fn, index)
	term := ln.term.Load()
	fn.receive(snapMessage(ln, fn, path, index, term, ln.id))
	waitGone(t, "the ignored snapshot's file", path)
	if k := fn.installs.Load(); k != 0 {
		t.Fatalf("%d snapshots installed", k)
	}
	put(t, fn, "/b", "2")
}

// A snapshot Raft refuses for another reason than its index (here: its conf
// state leaves this member out) has its file removed at the next Ready.
func TestSnapshotRaftRefusesGoesAtTheNextReady(t *testing.T) {
	_, leader, fs := clusterWithFollowers(t)
	f, other := fs[0], fs[1]
	ln, fn := leader.n(), f.n()

	// f stops hearing the leader; the leader's file gets ahead of f's commit.
	f.refuseFrom.Store(idString(ln.id))
	defer f.refuseFrom.Store("")
	for i := range 3 {
		put(t, ln, "/b", fmt.Sprint(i))
	}
	index := ln.store.AppliedIndex()
	commitc := make(chan uint64)
	fn.ctrlc <- func() { commitc <- fn.rn.BasicStatus().GetCommit() }
	if commit := <-commitc; commit >= index {
		t.Fatalf("follower commit %d, leader's file applied %d: the cut did not hold", commit, index)
	}
	path := receivedSnapshot(t, ln, fn, index)
	term := ln.term.Load()
	fn.receive(snapMessage(ln, fn, path, index, term, ln.id, other.n().id))
	waitGone(t, "the refused snapshot's file", path)
	if k := fn.installs.Load(); k != 0 {
		t.Fatalf("%d snapshots installed", k)
	}
	f.refuseFrom.Store("")
	waitLocal(t, fn, "/b", "2")
}

// A snapshot that arrives after the loop ended has its file removed at once:
// nothing would ever take it.
func TestSnapshotAfterTheLoopEndedGoesAtOnce(t *testing.T) {
	c, leader, fs := clusterWithFollowers(t)
	f := fs[0]
	ln, fn := leader.n(), f.n()
	index := ln.store.AppliedIndex()
	path := receivedSnapshot(t, ln, fn, index)
	c.stop(f)
	term := ln.term.Load()
	fn.receive(snapMessage(ln, fn, path, index+100, term+1, ln.id, fn.id))
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the file of a snapshot received after the loop ended: %v", err)
	}
}

// TestElectionTimeoutKeepsToTheClockWhenTheLoopStalls: followers whose
// loops stall 90 ms at every fourth tick (as a loop busy with Saves on a
// loaded disk, whose time.Ticker drops the ticks it could not deliver)
// still campaign within two election timeouts of their leader going
// silent: Raft's clock counts the ticks the ticker dropped. Counting one
// tick per ticker event, 4 in 120 ms, the first campaign would come after
// three election timeouts at least. (The campaign, not the new leader: two
// followers whose clocks move in such bursts may campaign at once and
// split their votes, and Raft draws new timeouts then, as it should.)
func TestElectionTimeoutKeepsToTheClockWhenTheLoopStalls(t *testing.T) {
	const electionTimeout = time.Second
	c := startLedByFirst(t, func(cfg *Config) {
		cfg.ElectionTimeout, cfg.HeartbeatInterval = electionTimeout, 100*time.Millisecond
	})
	leader, followers := c.members[0].n(), []*Node{c.members[1].n(), c.members[2].n()}
	term := leader.Status().Term
	stall := func(d time.Duration) {
		for _, f := range followers {
			done := make(chan struct{})
			f.ctrlc <- func() {
				f.loop.afterTick = nil
				if d > 0 {
					// Not at every tick: the loop takes the tick that came
					// meanwhile, and then goes on to its Ready.
					var ticks int
					f.loop.afterTick = func() {
						if ticks++; ticks%4 == 0 {
							time.Sleep(d)
						}
					}
				}
				close(done)
			}
			<-done
		}
	}
	// Under the most ticks made up at once (100 ms), an oversleep too.
	stall(90 * time.Millisecond)
	t.Cleanup(func() { stall(0) })

	// The leader's loop is held: it sends nothing, and drops what reaches it.
	release, held := make(chan struct{}), make(chan time.Time, 1)
	var releaseOnce sync.Once
	unhold := func() { releaseOnce.Do(func() { close(release) }) }
	t.Cleanup(unhold)
	leader.ctrlc <- func() {
		held <- time.Now()
		for {
			select {
			case <-leader.recvc:
			case <-release:
				return
			}
		}
	}
	silent := <-held
	var campaigned, elected time.Duration
	waitForWithin(t, 10*electionTimeout, "a follower's campaign (a new term)", func() bool {
		for _, f := range followers {
			if f.Status().Term > term {
				campaigned = time.Since(silent)
				return true
			}
		}
		return false
	})
	waitForWithin(t, 10*electionTimeout, "a new leader both followers agree on", func() bool {
		a, b := followers[0].Status().Leader, followers[1].Status().Leader
		if a == 0 || a != b || a == leader.id {
			return false
		}
		elected = time.Since(silent)
		return true
	})
	t.Logf("first campaign after %v; new leader %s after %v", campaigned.Round(time.Millisecond),
		idString(followers[0].Status().Leader), elected.Round(time.Millisecond))
	// Raft draws each follower's timeout between one and two election
	// timeouts from its last heartbeat; the rest is the pre-vote's round
	// trip (to a follower that may be stalled) and the polls. Without the
	// ticks made up it is three to six.
	if campaigned >= 5*electionTimeout/2 {
		t.Errorf("first campaign after %v: more than two election timeouts (%v) and the pre-vote's and polls' slack", campaigned, electionTimeout)
	}
	unhold()
	c.waitLeader(c.members...)
}
