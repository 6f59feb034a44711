package raftkv

import (
	"context"
	"errors"
	"testing"
	"time"

	"go.etcd.io/raft/v3/raftpb"
)

// TestStrictReconfigCheck runs etcd's strict reconfiguration check on a
// three-member cluster: a member refuses to add one until it has reached
// every member for a health interval (m0's is an hour), and while a member
// is not started or not reachable; it refuses to remove a reachable member
// when too few others are reachable, or when too few started members would
// be left; a member that is down may always be removed; turned off, the
// check lets a change through.
func TestStrictReconfigCheck(t *testing.T) {
	c := newTestCluster(t, 3, func(cfg *Config) {
		cfg.LooseReconfig = false
		cfg.healthInterval = 200 * time.Millisecond
		if cfg.Name == "m0" {
			cfg.healthInterval = time.Hour
		}
	})
	m0, m1, m2 := c.members[0].n(), c.members[1].n(), c.members[2].n()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// Nothing answers at these; each addition takes a URL of its own: an
	// ID (from the URLs and the second) is never reused once removed.
	const down1, down2, down3, down4, down5, down6 = "http://127.0.0.1:1", "http://127.0.0.1:2",
		"http://127.0.0.1:3", "http://127.0.0.1:4", "http://127.0.0.1:5", "http://127.0.0.1:6"
	waitFor(t, "every member to publish its name", func() bool {
		for _, m := range m1.Members() {
			if m.Name == "" {
				return false
			}
		}
		return true
	})

	// m0 has not reached its peers for an hour.
	if _, err := m0.AddMember(ctx, []string{down1}); !errors.Is(err, ErrUnhealthy) {
		t.Fatalf("adding through m0, whose peers answer since less than its health interval: %v, want ErrUnhealthy", err)
	}
	// As the leader, m0 takes a change its proposer checked against the
	// member list m0 has, and checks one made against another list itself.
	checked := func(at uint64) *raftpb.ConfChange {
		return &raftpb.ConfChange{Type: raftpb.ConfChangeAddNode.Enum(), NodeId: new(uint64(7)),
			Context: encodeAddContext(memberRecord{ID: 7, PeerURLs: []string{down1}}, strictCheck{Strict: true, ConfIndex: at})}
	}
	var at uint64
	waitFor(t, "every member to apply the same membership changes", func() bool {
		at = m0.confIndex.Load()
		return at != 0 && m1.confIndex.Load() == at && m2.confIndex.Load() == at
	})
	if err := m0.strictAgain(checked(at)); err != nil {
		t.Errorf("a change checked against m0's own list: %v, want nil", err)
	}
	for _, other := range []uint64{at - 1, 0} {
		if err := m0.strictAgain(checked(other)); !errors.Is(err, ErrUnhealthy) {
			t.Errorf("a change checked at conf index %d (m0's: %d): %v, want ErrUnhealthy", other, at, err)
		}
	}
	// Off, the check lets it through: four members, three up.
	m0.SetStrictReconfigCheck(false)
	x, err := m0.AddMember(ctx, []string{down1})
	if err != nil {
		t.Fatalf("adding with the check off: %v", err)
	}
	m0.SetStrictReconfigCheck(true)
	// m1 does not reach the new member, once it knows it.
	waitFor(t, "m1 to apply the addition", func() bool { return m1.hasMember(x.ID) })
	if _, err := m1.AddMember(ctx, []string{down2}); !errors.Is(err, ErrUnhealthy) {
		t.Fatalf("adding while a member is unreachable: %v, want ErrUnhealthy", err)
	}
	// A member no one reaches may be removed.
	if err := m1.RemoveMember(ctx, x.ID); err != nil {
		t.Fatalf("removing the member that never started: %v", err)
	}

	// Once m1 has reached both others for its health interval (a follower
	// probes the other follower), it adds; the addition is then removed.
	var y Member
	waitFor(t, "m1 to take an addition", func() bool {
		m, err := m1.AddMember(ctx, []string{down3})
		if errors.Is(err, ErrUnhealthy) {
			return false
		}
		if err != nil {
			t.Fatalf("adding through m1: %v", err)
		}
		y = m
		return true
	})
	if err := m1.RemoveMember(ctx, y.ID); err != nil {
		t.Fatalf("removing the member added through m1: %v", err)
	}

	// m2 goes down: adding, or removing m0 (which m1 reaches), would leave
	// a quorum that needs m2. Removing m2 itself is fine.
	c.stop(c.members[2])
	waitFor(t, "m1 to see m2 down", func() bool { return m1.activeSince(m2.id).IsZero() })
	if _, err := m1.AddMember(ctx, []string{down4}); !errors.Is(err, ErrUnhealthy) {
		t.Errorf("adding while m2 is down: %v, want ErrUnhealthy", err)
	}
	if err := m1.RemoveMember(ctx, m0.id); !errors.Is(err, ErrUnhealthy) {
		t.Errorf("removing m0 while m2 is down: %v, want ErrUnhealthy", err)
	}
	if err := m1.RemoveMember(ctx, m2.id); err != nil {
		t.Fatalf("removing m2, which is down: %v", err)
	}

	// Two members: a third may be added before it starts (two of three
	// started make its quorum), not a fourth; and m0 may not go while the
	// third has not started (one started member of two left).
	if _, err := m1.AddMember(ctx, []string{down5}); err != nil {
		t.Fatalf("adding a third member: %v", err)
	}
	if _, err := m1.AddMember(ctx, []string{down6}); !errors.Is(err, ErrNotEnoughStartedMembers) {
		t.Errorf("adding a fourth member while the third has not started: %v, want ErrNotEnoughStartedMembers", err)
	}
	if err := m1.RemoveMember(ctx, m0.id); !errors.Is(err, ErrNotEnoughStartedMembers) {
		t.Errorf("removing m0 while the third member has not started: %v, want ErrNotEnoughStartedMembers", err)
	}
	if got := len(m1.Members()); got != 3 {
		t.Errorf("%d members at the end, want 3", got)
	}
	put(t, m0, "/still", "writable")
}

// TestStrictReconfigCheckOfConcurrentChanges sends membership changes to
// different members at once, each of which passes the strict check of the
// member asked (the leader holds its own pending change, so nothing is
// applied meanwhile): the leader checks the later ones again, against the
// list the earlier ones made, and refuses them. Without that, three
// additions of members yet to start left three started members of six
// (no quorum), and the removals of two members of four, one of them down,
// left one member up of two.
func TestStrictReconfigCheckOfConcurrentChanges(t *testing.T) {
	strict := func(cfg *Config) {
		cfg.LooseReconfig = false
		cfg.healthInterval = 200 * time.Millisecond
		// The leader's loop is held below: no elections meanwhile.
		cfg.ElectionTimeout = 2 * time.Second
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	t.Run("additions", func(t *testing.T) {
		c := startLedByFirst(t, strict)
		leader := c.waitLeader(c.members...)
		fs := c.followers(leader, c.members...)
		waitCheckable(t, c.members, func(n *Node) error { return n.mayAddMember() })
		add := func(url string) func(*Node) error {
			return func(n *Node) error { _, err := n.AddMember(ctx, []string{url}); return err }
		}
		errs := raceChanges(t, leader.n(), add("http://127.0.0.1:1"),
			[]*Node{fs[0].n(), fs[1].n()}, []func(*Node) error{add("http://127.0.0.1:2"), add("http://127.0.0.1:3")})
		if errs[0] != nil {
			t.Fatalf("the leader's addition: %v", errs[0])
		}
		for i, err := range errs[1:] {
			if !errors.Is(err, ErrUnhealthy) {
				t.Errorf("addition through %s: %v, want ErrUnhealthy from the leader", fs[i].name, err)
			}
		}
		waitSameApplied(t, c.members[0].n(), c.members[1].n(), c.members[2].n())
		for _, m := range c.members {
			if got := len(m.n().Members()); got != 4 {
				t.Errorf("%s lists %d members, want 4", m.name, got)
			}
		}
		put(t, fs[0].n(), "/still", "writable")
		// The index of the last change survives a restart.
		at := fs[0].n().confIndex.Load()
		c.stop(fs[0])
		if got := c.start(fs[0], "new").confIndex.Load(); got != at {
			t.Errorf("after a restart the last membership change is at %d, want %d", got, at)
		}
	})

	t.Run("removals", func(t *testing.T) {
		c := newTestCluster(t, 4, strict)
		leader := c.waitLeader(c.members...)
		fs := c.followers(leader, c.members...)
		down, f1, f2 := fs[2], fs[0], fs[1]
		ups := []*testMember{leader, f1, f2}
		waitCheckable(t, c.members, func(n *Node) error { return n.mayAddMember() })
		c.stop(down)
		// Removing the leader through f2 passes f2's check while f1 is up
		// (three of four reachable, two of three after); the leader's
		// removal of f1 comes first, and leaves the leader and f2 of
		// three: then removing either one breaks the quorum.
		waitCheckable(t, ups, func(n *Node) error {
			if !n.activeSince(down.n().id).IsZero() {
				return errors.New("down still reachable")
			}
			return n.strictRemove(leader.n().id)
		})
		remove := func(id uint64) func(*Node) error {
			return func(n *Node) error { return n.RemoveMember(ctx, id) }
		}
		errs := raceChanges(t, leader.n(), remove(f1.n().id), []*Node{f2.n()}, []func(*Node) error{remove(leader.n().id)})
		if errs[0] != nil {
			t.Fatalf("the leader's removal of %s: %v", f1.name, errs[0])
		}
		if !errors.Is(errs[1], ErrUnhealthy) {
			t.Errorf("removal of the leader through %s: %v, want ErrUnhealthy from the leader", f2.name, errs[1])
		}
		waitSameApplied(t, leader.n(), f2.n())
		for _, m := range []*testMember{leader, f2} {
			if got := len(m.n().Members()); got != 3 {
				t.Errorf("%s lists %d members, want 3", m.name, got)
			}
		}
		put(t, f2.n(), "/still", "writable")
	})
}

// waitCheckable waits until check passes on every member of ms and they
// have all applied the same membership changes.
func waitCheckable(t *testing.T, ms []*testMember, check func(*Node) error) {
	t.Helper()
	waitFor(t, "every member to pass the strict check", func() bool {
		for _, m := range ms {
			if check(m.n()) != nil {
				return false
			}
		}
		return true
	})
	waitFor(t, "the same membership changes applied everywhere", func() bool {
		at := ms[0].n().confIndex.Load()
		for _, m := range ms {
			if m.n().confIndex.Load() != at || at == 0 {
				return false
			}
		}
		return true
	})
}

// raceChanges makes first on the leader ln and holds ln once the change is
// pending; then makes changes[i] on nodes[i], each until it is proposed
// (its member's own checks passed); then lets ln go on. It returns their
// errors, first's first.
func raceChanges(t *testing.T, ln *Node, first func(*Node) error, nodes []*Node, changes []func(*Node) error) []error {
	t.Helper()
	held, unhold := holdWhileConfBusy(t, ln)
	errcs := []chan error{make(chan error, 1)}
	go func() { errcs[0] <- first(ln) }()
	<-held
	for i, n := range nodes {
		errc := make(chan error, 1)
		go func() { errc <- changes[i](n) }()
		errcs = append(errcs, errc)
		waitFor(t, "a change proposed", func() bool {
			select {
			case err := <-errc:
				t.Fatalf("change %d refused by the member asked: %v", i, err)
			default:
			}
			return n.w.len() > 0
		})
	}
	unhold()
	errs := make([]error, len(errcs))
	for i, errc := range errcs {
		errs[i] = <-errc
	}
	return errs
}

// TestReAddWithinTheSecondOfARemoval adds peer URLs again right after
// removing the member that had them: the ID etcd's formula gives (the URLs
// and the second) is the removed one, never reused; the member gets the
// next second's.
func TestReAddWithinTheSecondOfARemoval(t *testing.T) {
	c := newTestCluster(t, 3, nil)
	n := c.members[0].n()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	url := "http://127.0.0.1:1"
	for attempt := 0; ; attempt++ {
		start := time.Now().Unix()
		first, err := n.AddMember(ctx, []string{url})
		if err != nil {
			t.Fatalf("adding: %v", err)
		}
		if err := n.RemoveMember(ctx, first.ID); err != nil {
			t.Fatalf("removing: %v", err)
		}
		again, err := n.AddMember(ctx, []string{url})
		if err != nil {
			t.Fatalf("adding again: %v", err)
		}
		if again.ID == first.ID {
			t.Fatalf("added again with the removed ID %x", first.ID)
		}
		if err := n.RemoveMember(ctx, again.ID); err != nil {
			t.Fatalf("removing again: %v", err)
		}
		if time.Now().Unix() == start {
			return // all within one second: the case at hand
		}
		if attempt == 20 {
			t.Fatal("no add, remove and add again within one second in 20 attempts")
		}
	}
}
