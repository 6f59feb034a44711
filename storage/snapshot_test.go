package storage

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	bolt "go.etcd.io/bbolt"
	"go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"
)

// receive streams leader's snapshot into follower through a pipe, as the
// peer transport does: neither side ever holds the whole file.
func receive(t *testing.T, leader, follower *tstore) string {
	t.Helper()
	return receiveAt(t, leader, follower, leader.AppliedIndex())
}

// receiveAt is receive for a snapshot of the given index (a leader's file
// may be ahead of the snapshot it is sent for).
func receiveAt(t *testing.T, leader, follower *tstore, index uint64) string {
	t.Helper()
	pr, pw := io.Pipe()
	go func() {
		_, err := leader.WriteSnapshot(pw)
		pw.CloseWithError(err)
	}()
	path, err := follower.ReceiveSnapshot(pr, index)
	if err != nil {
		t.Fatal(err)
	}
	return path
}

func snapshotReady(path string, index, term uint64, voters ...uint64) Ready {
	return Ready{
		Snapshot: &raftpb.Snapshot{Data: []byte(path), Metadata: &raftpb.SnapshotMetadata{
			Index: proto.Uint64(index), Term: proto.Uint64(term),
			ConfState: &raftpb.ConfState{Voters: voters},
		}},
		HardState: &raftpb.HardState{Term: proto.Uint64(term), Commit: proto.Uint64(index)},
	}
}

func TestSnapshotInstallReplacesTheFollowersState(t *testing.T) {
	leader, follower := newTestStore(t), newTestStore(t)
	exp := testClock.Add(3600e9).UnixNano()
	leader.apply(set("/a", "1"), mkdir("/d"), set("/a", "2"))
	leader.apply(Request{ID: 77, Method: MethodPut, Path: "/d/x", Val: "ttl", Expiration: exp})
	leader.apply(Request{Method: MethodDelete, Path: "/a"}, set("/b", "3"))
	// The follower holds a divergent past of its own: all of it must go.
	follower.apply(set("/old", "x"), set("/old2", "y"))
	if _, err := follower.Save(Ready{Entries: []*raftpb.Entry{termEntry(3, 1, ""), termEntry(4, 1, "")}}); err != nil {
		t.Fatal(err)
	}

	if err := leader.SetMeta("members", []byte("leader's list")); err != nil {
		t.Fatal(err)
	}
	if err := follower.SetMeta("id", []byte("follower")); err != nil {
		t.Fatal(err)
	}
	path := receive(t, leader, follower)
	if filepath.Dir(path) != follower.dir || !strings.HasPrefix(filepath.Base(path), "snap.tmp-6-") {
		t.Fatalf("received at %s", path)
	}
	if applied, v, err := SnapshotMeta(path, "members", "id"); err != nil || applied != 6 || string(v[0]) != "leader's list" || v[1] != nil {
		t.Fatalf("SnapshotMeta = %d, %q, %v", applied, v, err)
	}
	// Raft's snapshot is at 4; the file is at the leader's applied index 6.
	if _, err := follower.Save(snapshotReady(path, 4, 2, 1, 2, 3)); err != nil {
		t.Fatal(err)
	}
	check := func() {
		t.Helper()
		if follower.Index() != 6 || follower.AppliedIndex() != 6 {
			t.Fatalf("index %d, applied %d", follower.Index(), follower.AppliedIndex())
		}
		wantJSON(t, follower.mustGet("/", true),
			`{"action":"get","node":{"dir":true,"nodes":[`+
				`{"key":"/b","value":"3","modifiedIndex":6,"createdIndex":6},`+
				`{"key":"/d","dir":true,"nodes":[{"key":"/d/x","value":"ttl","expiration":"2026-01-02T04:04:05Z","ttl":3600,"modifiedIndex":4,"createdIndex":4}],"modifiedIndex":2,"createdIndex":2}]}}`)
		if next, ok := follower.NextExpiration(); !ok || next.UnixNano() != exp {
			t.Fatalf("NextExpiration %v %v", next, ok)
		}
		// The history is the leader's.
		w := mustWatch(t, follower, "/a", false, false, 1)
		if e := next(t, w); e.Action != "set" || e.Node.ModifiedIndex != 1 || e.EtcdIndex != 6 {
			t.Fatalf("history: %s", jsonOf(t, e))
		}
		st, err := follower.LoadRaft()
		if err != nil {
			t.Fatal(err)
		}
		if len(st.Entries) != 0 || st.Snapshot.GetIndex() != 4 || st.Snapshot.GetTerm() != 2 ||
			st.CompactIndex != 4 || st.Applied != 6 || st.HardState.GetCommit() != 4 ||
			fmt.Sprint(st.ConfState.GetVoters()) != "[1 2 3]" {
			t.Fatalf("raft state after install: %+v", st)
		}
		if _, err := os.Stat(path); !os.IsNotExist(err) {
			t.Fatalf("snapshot file left behind: %v", err)
		}
		// Member values stay this member's own.
		if string(follower.Meta("id")) != "follower" || follower.Meta("members") != nil {
			t.Fatalf("meta after install: %q %q", follower.Meta("id"), follower.Meta("members"))
		}
	}
	check()
	follower.reopen()
	check()

	// Raft hands out 5 and 6 again (already in the file: skipped), then 7;
	// request 77 was applied by the leader, so it is a duplicate here.
	ents := []*raftpb.Entry{
		entry(5, &Request{ID: 77, Method: MethodPut, Path: "/d/x", Val: "again"}),
		entry(6, nil),
		entry(7, &Request{ID: 77, Method: MethodPut, Path: "/d/x", Val: "again"}),
		entry(8, &Request{ID: 78, Method: MethodPut, Path: "/c", Val: "4"}),
	}
	out, err := follower.Save(Ready{Entries: ents, Committed: ents,
		HardState: &raftpb.HardState{Term: proto.Uint64(2), Commit: proto.Uint64(8)}})
	if err != nil {
		t.Fatal(err)
	}
	if len(out) != 2 || !out[0].Duplicate || out[0].Index != 7 || out[1].Event.Node.ModifiedIndex != 7 {
		t.Fatalf("after install: %+v", out)
	}
	if st, _ := follower.LoadRaft(); logIndexes(t, st) != "5/1 6/1 7/1 8/1 " {
		t.Fatalf("log after install: %s", logIndexes(t, st))
	}
}

func TestSnapshotInstallCatchesWatchersUp(t *testing.T) {
	leader, follower := newTestStore(t), newTestStore(t)
	follower.apply(set("/x", "0"))
	// Registered at index 1, waiting for index 2 on.
	onA := mustWatch(t, follower, "/a", false, true, 0)
	onX := mustWatch(t, follower, "/x", false, false, 0)
	leader.apply(set("/x", "0"), set("/a", "1"), set("/a", "2"))
	if _, err := follower.Save(snapshotReady(receive(t, leader, follower), 3, 1, 1)); err != nil {
		t.Fatal(err)
	}
	// The stream gets what it missed, in order, then stays open.
	for _, v := range []string{"1", "2"} {
		if e := next(t, onA); e.Node.Value == nil || *e.Node.Value != v || e.EtcdIndex != 3 {
			t.Fatalf("caught up with %s", jsonOf(t, e))
		}
	}
	wantNothing(t, onA)
	follower.apply(set("/a", "3"))
	if e := next(t, onA); *e.Node.Value != "3" {
		t.Fatalf("live after install: %s", jsonOf(t, e))
	}
	wantNothing(t, onX) // nothing happened to /x after index 1

	// A watcher whose next index fell out of the snapshot's history cannot
	// be caught up: it ends, and watching again says 401.
	leader2, follower2 := newTestStore(t), newTestStore(t)
	follower2.apply(set("/y", "0"))
	lost := mustWatch(t, follower2, "/y", false, true, 0)
	var reqs []Request
	for i := range historySize + 10 {
		reqs = append(reqs, set("/y", fmt.Sprint(i)))
	}
	leader2.apply(reqs...)
	if _, err := follower2.Save(snapshotReady(receive(t, leader2, follower2), 5, 1, 1)); err != nil {
		t.Fatal(err)
	}
	wantClosed(t, lost)
	_, err := follower2.Watch("/y", false, false, 2)
	wantErr(t, err, EcodeEventIndexCleared, "the requested history has been cleared [11/2]", historySize+10)
}

func TestReceiveSnapshotRefusesBadStreams(t *testing.T) {
	leader, follower := newTestStore(t), newTestStore(t)
	leader.apply(set("/a", "1"))
	var good bytes.Buffer
	if _, err := leader.WriteSnapshot(&good); err != nil {
		t.Fatal(err)
	}
	cases := map[string]io.Reader{
		"empty":     strings.NewReader(""),
		"garbage":   strings.NewReader(strings.Repeat("not a bbolt file ", 1000)),
		"truncated": bytes.NewReader(good.Bytes()[:good.Len()/2]),
		"cut off":   io.MultiReader(bytes.NewReader(good.Bytes()[:100]), iotestErrReader{}),
	}
	for name, r := range cases {
		t.Run(name, func(t *testing.T) {
			if _, err := follower.ReceiveSnapshot(r, 1); !errors.Is(err, ErrSnapshotInvalid) {
				t.Fatalf("got %v", err)
			}
			ents, err := os.ReadDir(follower.dir)
			if err != nil {
				t.Fatal(err)
			}
			for _, e := range ents {
				if strings.HasPrefix(e.Name(), "snap") {
					t.Fatalf("%s left behind", e.Name())
				}
			}
		})
	}
	// A bbolt file that is not a member.db.
	other := filepath.Join(t.TempDir(), "other.db")
	db, err := bolt.Open(other, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(other)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := follower.ReceiveSnapshot(f, 1); !errors.Is(err, ErrSnapshotInvalid) || !strings.Contains(err.Error(), "no meta bucket") {
		t.Fatalf("a bbolt file without buckets: %v", err)
	}
}

type iotestErrReader struct{}

func (iotestErrReader) Read([]byte) (int, error) { return 0, errors.New("connection reset") }

func TestSaveRefusesSnapshotsItDidNotReceive(t *testing.T) {
	leader, follower := newTestStore(t), newTestStore(t)
	leader.apply(set("/a", "1"), set("/a", "2"), set("/a", "3"))
	follower.apply(set("/mine", "1"), set("/mine", "2"))
	path := receive(t, leader, follower)

	elsewhere := filepath.Join(t.TempDir(), "snap.tmp")
	if _, err := follower.Save(snapshotReady(elsewhere, 1, 1, 1)); err == nil || !strings.Contains(err.Error(), "is not one this store received") {
		t.Fatalf("a file elsewhere: %v", err)
	}
	if _, err := follower.Save(snapshotReady("", 1, 1, 1)); !errors.Is(err, ErrSnapshotUnsupported) {
		t.Fatalf("no file: %v", err)
	}
	// The leader's file is at index 3: it cannot stand for snapshot 5.
	if _, err := follower.Save(snapshotReady(path, 5, 1, 1)); err == nil || !strings.Contains(err.Error(), "older than snapshot 5") {
		t.Fatalf("stale file: %v", err)
	}
	// Nothing changed.
	if follower.Index() != 2 {
		t.Fatalf("index %d", follower.Index())
	}
	follower.mustGet("/mine", false)
	if _, err := follower.Save(snapshotReady(path, 3, 1, 1)); err != nil {
		t.Fatal(err)
	}
	follower.mustGet("/a", false)
}

func TestOpenRemovesLeftoverSnapshots(t *testing.T) {
	leader, follower := newTestStore(t), newTestStore(t)
	leader.apply(set("/a", "1"))
	path := receive(t, leader, follower)
	if err := os.WriteFile(filepath.Join(follower.dir, "snap.tmp.123"), []byte("partial"), 0o600); err != nil {
		t.Fatal(err)
	}
	follower.reopen()
	for _, p := range []string{path, filepath.Join(follower.dir, "snap.tmp.123")} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Fatalf("%s: %v", p, err)
		}
	}
}

// TestSnapshotBehindTheLiveStateKeepsIt: a follower installs a file ahead
// of its snapshot index (applied 10 for snapshot 5), then a snapshot with a
// higher index (7) whose file is behind what it applied (8: a new leader
// that had applied less). The live state stays: reads and the store index
// do not go back, entries 8-10 that Raft hands out again are skipped, a
// streaming watcher sees no event twice, and the request IDs of those
// entries, whose log is gone, are still known after a restart.
func TestSnapshotBehindTheLiveStateKeepsIt(t *testing.T) {
	a, b, f := newTestStore(t), newTestStore(t), newTestStore(t)
	var reqs []Request
	for i := 1; i <= 10; i++ {
		reqs = append(reqs, Request{ID: uint64(100 + i), Method: MethodPut, Path: "/k", Val: fmt.Sprint(i)})
	}
	a.apply(reqs...)
	b.apply(reqs[:8]...)
	w := mustWatch(t, f, "/", true, true, 0)
	if _, err := f.Save(snapshotReady(receive(t, a, f), 5, 1, 1)); err != nil {
		t.Fatal(err)
	}
	for i := uint64(1); i <= 10; i++ {
		if got := next(t, w).Index(); got != i {
			t.Fatalf("event %d after the first install, want %d", got, i)
		}
	}
	if _, err := f.Save(snapshotReady(receive(t, b, f), 7, 1, 1)); err != nil {
		t.Fatal(err)
	}
	check := func(when string) {
		t.Helper()
		e := f.mustGet("/k", false)
		if f.AppliedIndex() != 10 || f.Index() != 10 || *e.Node.Value != "10" || e.Node.ModifiedIndex != 10 {
			t.Fatalf("%s: applied %d, index %d, /k = %q at %d; want all at 10", when, f.AppliedIndex(), f.Index(), *e.Node.Value, e.Node.ModifiedIndex)
		}
	}
	check("after the second install")
	var ents []*raftpb.Entry
	for i := uint64(8); i <= 10; i++ {
		ents = append(ents, entry(i, &reqs[i-1]))
	}
	if _, err := f.Save(Ready{HardState: &raftpb.HardState{Term: proto.Uint64(1), Commit: proto.Uint64(10)}, Entries: ents, Committed: ents}); err != nil {
		t.Fatal(err)
	}
	check("after entries 8-10 came again")
	select {
	case e := <-w.EventChan:
		t.Fatalf("the watcher got event %d again", e.Index())
	default:
	}
	w.Remove()
	f.reopen()
	check("after a restart")
	out := f.apply(reqs[9]) // entry 11, a late copy of request 110
	if !out[0].Duplicate {
		t.Fatalf("a copy of a request applied before the second install was applied again: %+v", out[0])
	}
}

// TestSecondReceivedSnapshotKeepsTheFirstsFile: a second snapshot arrives
// while Raft has yet to take the first one's message (both wait in its
// queue). Each has a file of its own: the first installs with its own
// file, and once it is installed the second one's file, which Raft can no
// longer take, is gone too.
func TestSecondReceivedSnapshotKeepsTheFirstsFile(t *testing.T) {
	a, b, f := newTestStore(t), newTestStore(t), newTestStore(t)
	for i := range 6 {
		a.apply(set("/k", fmt.Sprint(i+1)))
	}
	for i := range 4 {
		b.apply(set("/k", fmt.Sprint(i+1)))
	}
	first := receive(t, a, f)
	second := receive(t, b, f)
	if first == second {
		t.Fatalf("both snapshots received at %s", first)
	}
	if _, err := f.Save(snapshotReady(first, 6, 1, 1)); err != nil {
		t.Fatal(err)
	}
	if e := f.mustGet("/k", false); *e.Node.Value != "6" {
		t.Fatalf("/k = %q after the first install", *e.Node.Value)
	}
	for _, p := range []string{first, second} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s after the install: %v", p, err)
		}
	}
}

// TestQueuedSnapshotAboveTheInstalledOneKeepsItsFile: two snapshots wait
// in Raft's queue, A's (index 5, its file applied to 10) and B's (index 7,
// its file applied to 8). Raft takes A's first; its commit index is then
// 5, so it takes B's too (7 > 5): installing A must not remove B's file.
func TestQueuedSnapshotAboveTheInstalledOneKeepsItsFile(t *testing.T) {
	a, b, f := newTestStore(t), newTestStore(t), newTestStore(t)
	for i := 1; i <= 10; i++ {
		a.apply(set("/k", fmt.Sprint(i)))
	}
	for i := 1; i <= 8; i++ {
		b.apply(set("/k", fmt.Sprint(i)))
	}
	first := receiveAt(t, a, f, 5)
	second := receiveAt(t, b, f, 7)
	if _, err := f.Save(snapshotReady(first, 5, 1, 1)); err != nil {
		t.Fatal(err)
	}
	if _, err := f.Save(snapshotReady(second, 7, 1, 1)); err != nil {
		t.Fatalf("Raft's next Ready (snapshot 7, above its commit index 5): %v", err)
	}
	if e := f.mustGet("/k", false); *e.Node.Value != "10" {
		t.Fatalf("/k = %q", *e.Node.Value)
	}
}

// TestDropReceivedSnapshots: the files of snapshots Raft did not take go
// once its commit index passes theirs; a later one stays.
func TestDropReceivedSnapshots(t *testing.T) {
	a, f := newTestStore(t), newTestStore(t)
	for i := 1; i <= 9; i++ {
		a.apply(set("/k", fmt.Sprint(i)))
	}
	old, later := receiveAt(t, a, f, 3), receiveAt(t, a, f, 9)
	f.DropReceivedSnapshots(5)
	if _, err := os.Stat(old); !os.IsNotExist(err) {
		t.Errorf("%s: %v", old, err)
	}
	if _, err := os.Stat(later); err != nil {
		t.Errorf("%s: %v", later, err)
	}
	// The decoded history of the file that went goes with it.
	var kept []string
	f.histories.Range(func(k, _ any) bool { kept = append(kept, k.(string)); return true })
	if len(kept) != 1 || kept[0] != later {
		t.Errorf("histories kept for %v, want only %s", kept, later)
	}
}

// The install renames the received file over member.db rather than copying
// its state in (what held the Raft loop for seconds on a big snapshot). A
// read begun on the old file, a snapshot being streamed to a peer, goes on
// against it to the end; reads after the install see the new one.
func TestSnapshotInstallSwapsInTheReceivedFile(t *testing.T) {
	leader, follower := newTestStore(t), newTestStore(t)
	leader.apply(set("/new", "1"), set("/new2", "2"))
	follower.apply(set("/old", "x"))

	pr, pw := io.Pipe()
	streamed := make(chan error, 1)
	go func() {
		_, err := follower.WriteSnapshot(pw)
		pw.CloseWithError(err)
		streamed <- err
	}()
	first := make([]byte, 1)
	if _, err := io.ReadFull(pr, first); err != nil {
		t.Fatal(err)
	}

	path := receive(t, leader, follower)
	received, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := follower.Save(snapshotReady(path, 2, 2, 1, 2, 3)); err != nil {
		t.Fatal(err)
	}
	live, err := os.Stat(filepath.Join(follower.dir, "member.db"))
	if err != nil {
		t.Fatal(err)
	}
	if !os.SameFile(received, live) {
		t.Fatal("member.db is not the received file")
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("received file still under its own name: %v", err)
	}
	wantJSON(t, follower.mustGet("/", true),
		`{"action":"get","node":{"dir":true,"nodes":[`+
			`{"key":"/new","value":"1","modifiedIndex":1,"createdIndex":1},`+
			`{"key":"/new2","value":"2","modifiedIndex":2,"createdIndex":2}]}}`)

	// The stream begun before the install is the old file, whole.
	rest, err := io.ReadAll(pr)
	if err != nil {
		t.Fatal(err)
	}
	if err := <-streamed; err != nil {
		t.Fatal(err)
	}
	old := filepath.Join(t.TempDir(), "old.db")
	if err := os.WriteFile(old, append(first, rest...), 0o600); err != nil {
		t.Fatal(err)
	}
	db, err := bolt.Open(old, 0o600, &bolt.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := db.View(func(tx *bolt.Tx) error {
		// The follower applied one entry, the leader two.
		if v := getUint64(tx.Bucket(bucketMeta), keyApplied); v != 1 {
			return fmt.Errorf("the streamed copy's applied index is %d", v)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}

	// Writes after the install land in the new member.db, and a reopen
	// finds them there.
	follower.apply(set("/after", "3"))
	follower.reopen()
	if e := follower.mustGet("/after", false); e.Node.ModifiedIndex != 3 {
		t.Fatalf("after reopen: %s", jsonOf(t, e))
	}
}

// A file whose state is older than the snapshot it comes for cannot be
// installed: it is refused as it arrives, like a bad stream, rather than
// stopping the Raft loop when Raft hands it out.
func TestReceiveSnapshotRefusesAFileOlderThanItsIndex(t *testing.T) {
	leader, follower := newTestStore(t), newTestStore(t)
	leader.apply(set("/a", "1"), set("/b", "2"))
	pr, pw := io.Pipe()
	go func() {
		_, err := leader.WriteSnapshot(pw)
		pw.CloseWithError(err)
	}()
	_, err := follower.ReceiveSnapshot(pr, 3)
	pr.Close()
	if !errors.Is(err, ErrSnapshotInvalid) || !strings.Contains(err.Error(), "applied index 2 is older than snapshot 3") {
		t.Fatalf("ReceiveSnapshot of a file at 2 for snapshot 3: %v", err)
	}
	if left, _ := filepath.Glob(filepath.Join(follower.dir, "snap.tmp*")); len(left) != 0 {
		t.Fatalf("left behind: %v", left)
	}
}

// Where an open file cannot be renamed over (installByRename is false:
// Windows), the install copies the file's state into member.db instead;
// the install tests run that way too.
func TestSnapshotInstallByCopy(t *testing.T) {
	was := installByRename
	installByRename = false
	t.Cleanup(func() { installByRename = was })
	for name, test := range map[string]func(*testing.T){
		"ReplacesTheFollowersState": TestSnapshotInstallReplacesTheFollowersState,
		"CatchesWatchersUp":         TestSnapshotInstallCatchesWatchersUp,
		"CarriesAuthData":           TestSnapshotInstallCarriesAuthData,
		"BehindTheLiveStateKeepsIt": TestSnapshotBehindTheLiveStateKeepsIt,
		"SecondKeepsTheFirstsFile":  TestSecondReceivedSnapshotKeepsTheFirstsFile,
		"QueuedAboveKeepsItsFile":   TestQueuedSnapshotAboveTheInstalledOneKeepsItsFile,
	} {
		t.Run(name, test)
	}
}
