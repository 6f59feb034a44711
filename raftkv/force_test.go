package raftkv

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/etcaddy/etcaddy/storage"
	"go.etcd.io/raft/v3/raftpb"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"google.golang.org/protobuf/proto"
)

// TestForceNewClusterRecoversALostMajority loses two of three members for
// good and brings the third back with ForceNewCluster: it leads a cluster
// of its own, with every committed write and none of the write its log
// held uncommitted; a removed member that comes back is refused and stops;
// later starts, with or without the setting, keep the cluster as it is.
func TestForceNewClusterRecoversALostMajority(t *testing.T) {
	force := false
	c := startLedByFirst(t, func(cfg *Config) {
		if cfg.Name == "m0" {
			// It goes on leading without its quorum (CheckQuorum would
			// make it step down after an election timeout): the write
			// below enters its log and is never committed.
			cfg.ElectionTimeout = time.Hour
			cfg.ForceNewCluster = force
		}
	})
	m0, m1, m2 := c.members[0], c.members[1], c.members[2]
	for i := range 10 {
		put(t, m0.n(), fmt.Sprintf("/k/%d", i), fmt.Sprint(i))
	}
	waitSameApplied(t, m0.n(), m1.n(), m2.n())
	committed := m0.n().Status().RaftIndex
	// A backup of another member, restored at the end.
	backup := filepath.Join(t.TempDir(), "backup.db")
	f, err := os.Create(backup)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m1.n().Backup(context.Background(), f); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	c.stop(m1)
	c.stop(m2)
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	_, err = m0.n().Do(ctx, storage.Request{Method: storage.MethodPut, Path: "/lost", Val: "x"})
	cancel()
	if err == nil {
		t.Fatal("a write committed with two of three members down")
	}
	// etcd's etcd_server_proposals_failed_total and _pending count it.
	if mt := m0.n().Metrics(); mt.ProposalsFailed == 0 || mt.ProposalsPending != 0 {
		t.Errorf("metrics after a proposal that timed out: %d failed, %d pending", mt.ProposalsFailed, mt.ProposalsPending)
	}
	c.stop(m0)
	st, err := storage.Open(m0.dir)
	if err != nil {
		t.Fatal(err)
	}
	rs, err := st.LoadRaft()
	st.Close()
	if err != nil {
		t.Fatal(err)
	}
	last := rs.Entries[len(rs.Entries)-1].GetIndex()
	if rs.HardState.GetCommit() != committed || last <= committed {
		t.Fatalf("m0's log: commit %d, last index %d; want commit %d and an uncommitted entry after it", rs.HardState.GetCommit(), last, committed)
	}

	// A crash after the forced start saved its removals, before it applied
	// any: the next start (the setting still on) finds them committed, and
	// still campaigns once it has applied them (its election timeout is an
	// hour: only that campaign makes it lead).
	force = true
	crashed := NewNode(c.config(m0, "new"))
	crashed.loop.beforeSave = func() { panic("a crash before the first Save (test)") }
	m0.node.Store(crashed)
	if err := crashed.Start(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the forced start to crash", crashed.Failed)
	if err := crashed.Stop(); err != nil {
		t.Fatal(err)
	}
	n := c.start(m0, "new")
	waitFor(t, "m0 leading a cluster of its own", func() bool {
		st := n.Status()
		return st.Leader == n.id && len(n.Members()) == 1 && n.Members()[0].ID == n.id
	})
	for i := range 10 {
		ev, err := quorumGet(t, n, fmt.Sprintf("/k/%d", i))
		if err != nil || value(t, ev) != fmt.Sprint(i) {
			t.Fatalf("/k/%d after the forced start: %+v, %v", i, ev, err)
		}
	}
	var se *storage.Error
	if _, err := quorumGet(t, n, "/lost"); !errors.As(err, &se) || se.ErrorCode != storage.EcodeKeyNotFound {
		t.Fatalf("the uncommitted write after the forced start: %v, want key not found", err)
	}
	if !n.isRemoved(m1.n().id) || !n.isRemoved(m2.n().id) {
		t.Error("the other members are not recorded as removed")
	}
	before := put(t, n, "/after", "1").Node.ModifiedIndex

	// A removed member that comes back hears it was removed, and stops.
	force = false
	back := c.start(m1, "new")
	waitFor(t, "the removed member to stop", func() bool { return !back.Running() })
	if back.Failed() || !back.gone.Load() {
		t.Fatal("the member that came back stopped, but not as a removed member")
	}
	if _, err := quorumGet(t, n, "/after"); err != nil {
		t.Fatalf("the forced member after a removed one came back: %v", err)
	}

	// Later starts keep the cluster of one: without the setting, and with
	// it left on (nothing to do).
	for _, f := range []bool{false, true} {
		c.stop(m0)
		force = f
		n = c.start(m0, "new")
		waitFor(t, "m0 leading again", func() bool { return n.Status().Leader == n.id })
		if got := n.Members(); len(got) != 1 {
			t.Fatalf("members after a restart (force_new_cluster %v): %+v", f, got)
		}
		if ev, err := quorumGet(t, n, "/after"); err != nil || value(t, ev) != "1" {
			t.Fatalf("/after after a restart: %+v, %v", ev, err)
		}
		if ev := put(t, n, fmt.Sprintf("/again/%v", f), "2"); ev.Node.ModifiedIndex <= before {
			t.Fatalf("the store index went back: %d after %d", ev.Node.ModifiedIndex, before)
		}
	}

	// The backup, as member.db of an empty data directory, starts a
	// cluster of its own too, with what the backup held (the old cluster
	// gone: m0 would refuse the member it removed).
	c.stop(m0)
	restored := newTestMember(t, "m1")
	b, err := os.ReadFile(backup)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(restored.dir, "member.db"), b, 0o600); err != nil {
		t.Fatal(err)
	}
	force = false
	c.edit = func(cfg *Config) { cfg.ForceNewCluster = true }
	n = c.start(restored, "new")
	waitFor(t, "the restored member leading a cluster of its own", func() bool {
		return n.Status().Leader == n.id && len(n.Members()) == 1
	})
	if n.id != m1.n().id {
		t.Errorf("the restored member has ID %s, the backup was of %s", idString(n.id), idString(m1.n().id))
	}
	for i := range 10 {
		if ev, err := quorumGet(t, n, fmt.Sprintf("/k/%d", i)); err != nil || value(t, ev) != fmt.Sprint(i) {
			t.Fatalf("/k/%d on the restored member: %+v, %v", i, ev, err)
		}
	}
	if _, err := quorumGet(t, n, "/after"); !errors.As(err, &se) || se.ErrorCode != storage.EcodeKeyNotFound {
		t.Fatalf("a write after the backup, on the restored member: %v, want key not found", err)
	}
	put(t, n, "/restored", "3")
}

// TestForceNewClusterAfterTheStoreAppliedAhead forces a member whose store
// applied past its saved commit index, as after the install of a snapshot
// whose file was ahead (its saved conf state is then the one as of the
// commit index): a member added in between is a member too, and is removed
// with the others.
func TestForceNewClusterAfterTheStoreAppliedAhead(t *testing.T) {
	force := false
	c := startLedByFirst(t, func(cfg *Config) {
		if cfg.Name == "m0" {
			cfg.ElectionTimeout = time.Hour // it leads only if it campaigns alone
			cfg.ForceNewCluster = force
		}
	})
	m0 := c.members[0]
	put(t, m0.n(), "/before", "1")
	waitSameApplied(t, m0.n(), c.members[1].n(), c.members[2].n())
	commit := m0.n().Status().RaftIndex
	csc := make(chan *raftpb.ConfState, 1)
	m0.n().ctrlc <- func() { csc <- proto.Clone(m0.n().loop.confState).(*raftpb.ConfState) }
	cs := <-csc
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	added, err := m0.n().AddMember(ctx, []string{"http://127.0.0.1:1"}) // never started
	if err != nil {
		t.Fatal(err)
	}
	put(t, m0.n(), "/after", "2")
	for _, m := range c.members {
		c.stop(m)
	}
	st, rs := openRaft(t, m0.dir)
	hs := proto.Clone(rs.HardState).(*raftpb.HardState)
	hs.Commit = new(commit)
	_, err = st.Save(storage.Ready{HardState: hs, ConfState: cs})
	applied := st.AppliedIndex()
	st.Close()
	if err != nil {
		t.Fatal(err)
	}
	if applied <= commit {
		t.Fatalf("the store applied %d, not past the commit index %d", applied, commit)
	}
	refuseForcedStartWithShortLog(t, m0.dir, commit, applied)

	force = true
	n := c.start(m0, "new")
	waitFor(t, "m0 leading a cluster of its own", func() bool {
		return n.Status().Leader == n.id && len(n.Members()) == 1
	})
	if !n.isRemoved(added.ID) {
		t.Error("the member added after the saved commit index is not removed")
	}
	for key, want := range map[string]string{"/before": "1", "/after": "2"} {
		if ev, err := quorumGet(t, n, key); err != nil || value(t, ev) != want {
			t.Fatalf("%s after the forced start: %+v, %v", key, ev, err)
		}
	}
	put(t, n, "/forced", "3")
}

// refuseForcedStartWithShortLog copies the member.db of dir, whose store
// applied up to applied past the saved commit index commit, cuts the
// copy's log right after commit (as a crash after installing a snapshot
// whose file was ahead of the log leaves it), and checks that a forced
// start on it is refused, naming a way out, and saves nothing.
func refuseForcedStartWithShortLog(t *testing.T, dir string, commit, applied uint64) {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(dir, "member.db"))
	if err != nil {
		t.Fatal(err)
	}
	short := t.TempDir()
	if err := os.WriteFile(filepath.Join(short, "member.db"), data, 0o600); err != nil {
		t.Fatal(err)
	}
	st, rs := openRaft(t, short)
	// One entry after the commit index replaces the log's tail.
	_, err = st.Save(storage.Ready{Entries: []*raftpb.Entry{{
		Term: new(rs.HardState.GetTerm()), Index: new(commit + 1), Type: raftpb.EntryNormal.Enum(),
	}}})
	st.Close()
	if err != nil {
		t.Fatal(err)
	}
	n := NewNode(Config{
		Name:            "m0",
		DataDir:         short,
		ForceNewCluster: true,
		Logger:          zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)),
	})
	err = n.Start()
	n.Stop()
	want := fmt.Sprintf("the member's log ends at %d, before the index %d it applied", commit+1, applied)
	if err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), "GET /raftkv/snapshot") {
		t.Fatalf("a forced start on a log that ends before the applied index: %v, want an error containing %q", err, want)
	}
	// Nothing saved: the log still ends where it did, with the same commit.
	st, rs = openRaft(t, short)
	defer st.Close()
	if k := len(rs.Entries); k == 0 || rs.Entries[k-1].GetIndex() != commit+1 || rs.HardState.GetCommit() != commit {
		t.Errorf("after the refused forced start: commit %d, %d entries, want commit %d and the log ending at %d",
			rs.HardState.GetCommit(), len(rs.Entries), commit, commit+1)
	}
}

// openRaft opens the store in dir and loads its Raft state; the caller
// closes the store.
func openRaft(t *testing.T, dir string) (*storage.Store, *storage.RaftState) {
	t.Helper()
	st, err := storage.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	rs, err := st.LoadRaft()
	if err != nil {
		st.Close()
		t.Fatal(err)
	}
	return st, rs
}
