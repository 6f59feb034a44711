package raftkv

import (
	"context"
	"errors"
	"testing"
	"time"
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
