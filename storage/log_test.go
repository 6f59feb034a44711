package storage

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
	"go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"
)

func termEntry(index, term uint64, data string) *raftpb.Entry {
	return &raftpb.Entry{Index: proto.Uint64(index), Term: proto.Uint64(term),
		Type: raftpb.EntryNormal.Enum(), Data: []byte(data)}
}

func logIndexes(t *testing.T, st *RaftState) string {
	t.Helper()
	s := ""
	for _, e := range st.Entries {
		s += fmt.Sprintf("%d/%d ", e.GetIndex(), e.GetTerm())
	}
	return s
}

func TestLogAppendTruncateCompact(t *testing.T) {
	ts := newTestStore(t)
	if st, err := ts.LoadRaft(); err != nil || st.HardState != nil || len(st.Entries) != 0 || st.Snapshot != nil {
		t.Fatalf("fresh state: %+v %v", st, err)
	}
	var ents []*raftpb.Entry
	for i := uint64(1); i <= 5; i++ {
		ents = append(ents, termEntry(i, 1, ""))
	}
	hs := &raftpb.HardState{Term: proto.Uint64(1), Vote: proto.Uint64(7), Commit: proto.Uint64(3)}
	cs := &raftpb.ConfState{Voters: []uint64{7}}
	if _, err := ts.Save(Ready{HardState: hs, Entries: ents, ConfState: cs}); err != nil {
		t.Fatal(err)
	}
	// A new leader's entries replace the conflicting tail.
	if _, err := ts.Save(Ready{Entries: []*raftpb.Entry{termEntry(4, 2, ""), termEntry(5, 2, ""), termEntry(6, 2, "")}}); err != nil {
		t.Fatal(err)
	}
	if _, err := ts.Save(Ready{Entries: []*raftpb.Entry{termEntry(3, 3, "")}}); err != nil {
		t.Fatal(err)
	}
	ts.reopen()
	st, err := ts.LoadRaft()
	if err != nil {
		t.Fatal(err)
	}
	if got := logIndexes(t, st); got != "1/1 2/1 3/3 " {
		t.Fatalf("log after truncation: %s", got)
	}
	if !proto.Equal(st.HardState, hs) || !proto.Equal(st.ConfState, cs) {
		t.Fatalf("hard state %v, conf state %v", st.HardState, st.ConfState)
	}
	for i := uint64(4); i <= 12; i++ {
		if _, err := ts.Save(Ready{Entries: []*raftpb.Entry{termEntry(i, 3, "")}}); err != nil {
			t.Fatal(err)
		}
	}
	compactChunk = 3 // several transactions
	t.Cleanup(func() { compactChunk = 10000 })
	snap := &raftpb.SnapshotMetadata{Index: proto.Uint64(10), Term: proto.Uint64(3), ConfState: cs}
	if err := ts.Compact(snap, 8); err != nil {
		t.Fatal(err)
	}
	if err := ts.Compact(snap, 11); err == nil {
		t.Fatal("compacting past the snapshot was accepted")
	}
	ts.reopen()
	st, err = ts.LoadRaft()
	if err != nil {
		t.Fatal(err)
	}
	if got := logIndexes(t, st); got != "9/3 10/3 11/3 12/3 " || st.CompactIndex != 8 {
		t.Fatalf("log after compaction: %s (compacted %d)", got, st.CompactIndex)
	}
	if !proto.Equal(st.Snapshot, snap) {
		t.Fatalf("snapshot %v", st.Snapshot)
	}
}

func TestSaveRefusesASnapshot(t *testing.T) {
	ts := newTestStore(t)
	snap := &raftpb.Snapshot{Metadata: &raftpb.SnapshotMetadata{Index: proto.Uint64(5), Term: proto.Uint64(1)}}
	_, err := ts.Save(Ready{Snapshot: snap, Committed: []*raftpb.Entry{entry(1, &Request{Method: MethodPut, Path: "/a"})}})
	if !errors.Is(err, ErrSnapshotUnsupported) || err.Error() != "storage: installing a snapshot from the leader is not supported yet" {
		t.Fatalf("got %v", err)
	}
	if ts.AppliedIndex() != 0 || ts.Index() != 0 {
		t.Fatal("a refused Ready was applied")
	}
}

func TestSaveSkipsNoOpsConfChangesAndAppliedEntries(t *testing.T) {
	ts := newTestStore(t)
	cc := &raftpb.Entry{Index: proto.Uint64(2), Term: proto.Uint64(1), Type: raftpb.EntryConfChange.Enum(), Data: []byte("x")}
	ents := []*raftpb.Entry{entry(1, nil), cc, entry(3, &Request{ID: 9, Method: MethodPut, Path: "/a", Val: "1"}),
		{Index: proto.Uint64(4), Term: proto.Uint64(1), Data: []byte{7, 7}}}
	out, err := ts.Save(Ready{Entries: ents, Committed: ents})
	if err != nil {
		t.Fatal(err)
	}
	if len(out) != 2 || out[0].Index != 3 || out[0].ID != 9 || out[0].Event == nil {
		t.Fatalf("results %+v", out)
	}
	// A request that does not decode is skipped alike on every member.
	if out[1].Index != 4 || out[1].Err == nil || out[1].Err.ErrorCode != EcodeRaftInternal {
		t.Fatalf("undecodable entry: %+v", out[1])
	}
	if ts.AppliedIndex() != 4 || ts.Index() != 1 {
		t.Fatalf("applied %d, index %d", ts.AppliedIndex(), ts.Index())
	}
	// Replayed committed entries (a restart) are not applied again.
	out, err = ts.Save(Ready{Committed: ents})
	if err != nil || len(out) != 0 || ts.Index() != 1 {
		t.Fatalf("replay: %+v %v", out, err)
	}
}

func TestFailedSavePublishesNothing(t *testing.T) {
	ts := newTestStore(t)
	ts.mustDo(set("/a", "1"))
	w := mustWatch(t, ts, "/", true, true, 0)
	before := ts.Stats()
	// The second entry leaves a gap: the whole transaction is refused.
	ents := []*raftpb.Entry{entry(2, &Request{Method: MethodPut, Path: "/x", Val: "x"}),
		entry(4, &Request{Method: MethodPut, Path: "/y", Val: "y"})}
	if _, err := ts.Save(Ready{Entries: ents[:1], Committed: ents}); err == nil {
		t.Fatal("a gap in committed entries was accepted")
	}
	wantNothing(t, w)
	if ts.Index() != 1 || ts.AppliedIndex() != 1 || ts.Stats() != before {
		t.Fatalf("index %d applied %d stats %+v", ts.Index(), ts.AppliedIndex(), ts.Stats())
	}
	if _, err := ts.get("/x", false, false); err == nil {
		t.Fatal("a failed Save left a key")
	}
	if st, _ := ts.LoadRaft(); len(st.Entries) != 1 {
		t.Fatalf("a failed Save appended %d entries", len(st.Entries))
	}
}

func TestStatePersistsAcrossReopen(t *testing.T) {
	ts := newTestStore(t)
	exp := testClock.Add(time.Minute).UnixNano()
	ts.apply(set("/a", "1"), Request{Method: MethodPut, Path: "/t", Val: "t", Expiration: exp}, set("/a", "2"))
	ts.mustDo(Request{Method: MethodPut, Path: "/a", Refresh: true, PrevExist: boolp(true)})
	ts.reopen()
	if ts.Index() != 4 || ts.AppliedIndex() != 4 {
		t.Fatalf("index %d applied %d", ts.Index(), ts.AppliedIndex())
	}
	if next, ok := ts.NextExpiration(); !ok || next.UnixNano() != exp {
		t.Fatalf("NextExpiration %v %v", next, ok)
	}
	// History, refresh flags included, is back.
	w := mustWatch(t, ts, "/a", false, false, 4)
	wantNothing(t, w)
	w2 := mustWatch(t, ts, "/t", false, false, 1)
	e := next(t, w2)
	wantJSON(t, e, `{"action":"set","node":{"key":"/t","value":"t","expiration":"2026-01-02T03:05:05Z","ttl":60,"modifiedIndex":2,"createdIndex":2}}`)
	if e.EtcdIndex != 4 {
		t.Fatalf("EtcdIndex of a historical event: %d", e.EtcdIndex)
	}
	ts.mustDo(set("/a", "3"))
	if e := next(t, w); e.Index() != 5 {
		t.Fatalf("live event %d", e.Index())
	}
	// The expiry index survived: SYNC finds the key.
	ts.mustDo(Request{Method: MethodSync, Time: exp})
	if _, err := ts.get("/t", false, false); err == nil {
		t.Fatal("TTL key not expired after reopen")
	}
	if ts.Index() != 6 {
		t.Fatalf("index %d", ts.Index())
	}
}

func TestDuplicateRequestsAreAppliedOnce(t *testing.T) {
	ts := newTestStore(t)
	r := Request{ID: 42, Method: MethodPost, Path: "/q", Val: "job"}
	out := ts.apply(r, r)
	if out[0].Duplicate || out[0].Event == nil || !out[1].Duplicate || out[1].Event != nil || out[1].Err != nil {
		t.Fatalf("results %+v", out)
	}
	ts.reopen()
	if out := ts.apply(r); !out[0].Duplicate || ts.Index() != 1 {
		t.Fatalf("after reopen: %+v, index %d", out, ts.Index())
	}
	// Only the most recent IDs are kept.
	dedupKeep = 3
	t.Cleanup(func() { dedupKeep = 10000 })
	ts.apply(Request{ID: 1, Method: MethodPut, Path: "/x"}, Request{ID: 2, Method: MethodPut, Path: "/x"},
		Request{ID: 3, Method: MethodPut, Path: "/x"})
	if out := ts.apply(r); out[0].Duplicate {
		t.Fatal("an ID beyond the kept window is still remembered")
	}
	if out := ts.apply(Request{ID: 3, Method: MethodPut, Path: "/x"}); !out[0].Duplicate {
		t.Fatal("a recent ID was forgotten")
	}
}

// dupPattern applies requests with IDs drawn from a small range, so that
// some are duplicates and some are forgotten and applied again, and
// reports which were duplicates.
func dupPattern(ts *tstore, from, n int) string {
	s := ""
	for i := from; i < from+n; i++ {
		id := uint64(i*2654435761>>7)%6 + 1
		out := ts.apply(Request{ID: id, Method: MethodPut, Path: "/x", Val: fmt.Sprint(i)})
		if out[0].Duplicate {
			s += "d"
		} else {
			s += "."
		}
	}
	return s
}

// The remembered IDs decide what is applied, so a member that restarts,
// even after its log was compacted, must decide exactly as one that did
// not.
func TestDuplicatesAreDecidedAlikeAfterReopenAndCompaction(t *testing.T) {
	dedupKeep = 4
	t.Cleanup(func() { dedupKeep = 10000 })
	a, b := newTestStore(t), newTestStore(t)
	for round := range 6 {
		pa, pb := dupPattern(a, round*9, 9), dupPattern(b, round*9, 9)
		if pa != pb || !strings.Contains(pa, "d") || !strings.Contains(pa, ".") {
			t.Fatalf("round %d: %s, restarted member %s", round, pa, pb)
		}
		applied := b.AppliedIndex()
		switch round % 3 {
		case 0:
			b.reopen()
		case 1:
			// Compact everything applied: only the saved IDs remain.
			snap := &raftpb.SnapshotMetadata{Index: proto.Uint64(applied), Term: proto.Uint64(1)}
			if err := b.Compact(snap, applied); err != nil {
				t.Fatal(err)
			}
			b.reopen()
		case 2:
			// Compact part of it: saved IDs, then the rest of the log.
			snap := &raftpb.SnapshotMetadata{Index: proto.Uint64(applied - 3), Term: proto.Uint64(1)}
			if err := b.Compact(snap, applied-5); err != nil {
				t.Fatal(err)
			}
			dupPattern(a, 100, 2)
			dupPattern(b, 100, 2)
			b.reopen()
		}
	}
}

func TestFailedSaveForgetsItsRequestIDs(t *testing.T) {
	ts := newTestStore(t)
	ts.apply(Request{ID: 1, Method: MethodPut, Path: "/a"})
	ents := []*raftpb.Entry{entry(2, &Request{ID: 2, Method: MethodPut, Path: "/b"}),
		entry(4, &Request{ID: 3, Method: MethodPut, Path: "/c"})}
	if _, err := ts.Save(Ready{Entries: ents[:1], Committed: ents}); err == nil {
		t.Fatal("a gap in committed entries was accepted")
	}
	out := ts.apply(Request{ID: 2, Method: MethodPut, Path: "/b"}, Request{ID: 1, Method: MethodPut, Path: "/a"})
	if out[0].Duplicate || out[0].Event == nil || !out[1].Duplicate {
		t.Fatalf("after a failed Save: %+v", out)
	}
}

// The oldest events are deleted in batches, and Open still loads only the
// newest historySize of them.
func TestOldEventsAreDeletedInBatches(t *testing.T) {
	ts := newTestStore(t)
	stored := func() (n int, first uint64) {
		t.Helper()
		err := ts.view(func(tx *bolt.Tx) error {
			c := tx.Bucket(bucketEvents).Cursor()
			for k, _ := c.First(); k != nil; k, _ = c.Next() {
				if n == 0 {
					first = binary.BigEndian.Uint64(k)
				}
				n++
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		return n, first
	}
	for i := 1; i <= historySize+eventSlack; i++ {
		ts.mustDo(set("/k", fmt.Sprint(i)))
	}
	if n, first := stored(); n != historySize+eventSlack || first != 1 {
		t.Fatalf("%d events stored from %d", n, first)
	}
	ts.reopen()
	_, err := ts.Watch("/k", false, false, eventSlack)
	wantErr(t, err, EcodeEventIndexCleared,
		fmt.Sprintf("the requested history has been cleared [%d/%d]", eventSlack+1, eventSlack), historySize+eventSlack)
	ts.mustDo(set("/k", "next"))
	if n, first := stored(); n != historySize || first != eventSlack+2 {
		t.Fatalf("after the batch: %d events stored from %d", n, first)
	}
	if e := next(t, mustWatch(t, ts, "/k", false, false, eventSlack+2)); e.Node.ModifiedIndex != eventSlack+2 {
		t.Fatalf("oldest kept event %s", jsonOf(t, e))
	}
}

// TestAppendEntryMatchesProto: the hand-written log encoding is the bytes
// proto.Marshal gives, so the file reads back as any protobuf reader expects.
func TestAppendEntryMatchesProto(t *testing.T) {
	withUnknown := termEntry(9, 2, "x")
	withUnknown.ProtoReflect().SetUnknown([]byte{0x28, 0x07}) // field 5, varint 7
	for _, e := range []*raftpb.Entry{
		{},
		termEntry(1, 1, ""),
		termEntry(1<<63, 1<<40, strings.Repeat("v", 300)),
		{Index: proto.Uint64(0), Term: proto.Uint64(0), Data: []byte{}},
		{Index: proto.Uint64(7), Type: raftpb.EntryConfChangeV2.Enum(), Data: []byte{1, 2}},
		{Type: raftpb.EntryType(-1).Enum()},
		withUnknown,
	} {
		want, err := proto.MarshalOptions{Deterministic: true}.Marshal(e)
		if err != nil {
			t.Fatal(err)
		}
		got := appendEntry(nil, e)
		if string(got) != string(want) {
			t.Fatalf("%v: got %x, want %x", e, got, want)
		}
		var back raftpb.Entry
		if err := proto.Unmarshal(got, &back); err != nil || !proto.Equal(&back, e) {
			t.Fatalf("%v: read back %v, %v", e, &back, err)
		}
	}
}

// TestDeferredApplyCommitsLater drives Ready.Defer as a cluster member
// does: entries appended by one Save, applied by a later one that leaves
// its transaction open. Nothing of the apply is visible until it commits —
// with the next Save, with Flush, or when a reader asks for it — and a
// crash before the commit loses nothing: the log still holds the entries.
func TestDeferredApplyCommitsLater(t *testing.T) {
	ts := newTestStore(t)
	ts.mustDo(set("/a", "1"))
	w := mustWatch(t, ts, "/", true, true, 0)
	ents := []*raftpb.Entry{entry(2, &Request{Method: MethodPut, Path: "/x", Val: "x"}),
		entry(3, &Request{Method: MethodPut, Path: "/y", Val: "y"}),
		entry(4, &Request{Method: MethodPut, Path: "/z", Val: "z"})}
	if _, err := ts.Save(Ready{Entries: ents}); err != nil {
		t.Fatal(err)
	}
	commit := func(i uint64) *raftpb.HardState {
		return &raftpb.HardState{Term: proto.Uint64(1), Commit: proto.Uint64(i)}
	}

	out, err := ts.Save(Ready{HardState: commit(2), Committed: ents[:1], Defer: true})
	if err != nil || len(out) != 1 || out[0].Event == nil || out[0].Event.Index() != 2 {
		t.Fatalf("deferred Save: %+v %v", out, err)
	}
	if !ts.Deferred() || ts.AppliedIndex() != 1 || ts.Index() != 1 {
		t.Fatalf("deferred %v applied %d index %d", ts.Deferred(), ts.AppliedIndex(), ts.Index())
	}
	wantNothing(t, w)

	// A reader that starts now must see /x: it asks for the commit and
	// waits for it.
	got := make(chan error, 1)
	go func() {
		_, err := ts.get("/x", false, false)
		got <- err
	}()
	<-ts.FlushRequests()
	select {
	case err := <-got:
		t.Fatalf("the read did not wait for the commit: %v", err)
	default:
	}
	if err := ts.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := <-got; err != nil {
		t.Fatalf("read after the commit: %v", err)
	}
	if e := next(t, w); e.Index() != 2 || ts.AppliedIndex() != 2 || ts.Deferred() {
		t.Fatalf("event %d applied %d deferred %v", e.Index(), ts.AppliedIndex(), ts.Deferred())
	}

	// The next Save that must commit carries a deferred apply with it.
	if _, err := ts.Save(Ready{HardState: commit(3), Committed: ents[1:2], Defer: true}); err != nil {
		t.Fatal(err)
	}
	next5 := entry(5, &Request{Method: MethodPut, Path: "/w", Val: "w"})
	if _, err := ts.Save(Ready{Entries: []*raftpb.Entry{next5}, Defer: true}); err != nil {
		t.Fatal(err)
	}
	if ts.Deferred() || ts.AppliedIndex() != 3 {
		t.Fatalf("an append left the apply deferred: deferred %v applied %d", ts.Deferred(), ts.AppliedIndex())
	}
	if e := next(t, w); e.Index() != 3 {
		t.Fatalf("event %d", e.Index())
	}

	// A crash with an apply still open: the apply is lost, the entry is
	// not, and applying it again gives the same result.
	if _, err := ts.Save(Ready{HardState: commit(4), Committed: ents[2:], Defer: true}); err != nil {
		t.Fatal(err)
	}
	ts.reopen()
	if ts.AppliedIndex() != 3 {
		t.Fatalf("applied %d after reopening", ts.AppliedIndex())
	}
	st, err := ts.LoadRaft()
	if err != nil || len(st.Entries) != 5 {
		t.Fatalf("log after reopening: %d entries, %v", len(st.Entries), err)
	}
	out, err = ts.Save(Ready{HardState: commit(4), Committed: ents[2:]})
	if err != nil || len(out) != 1 || out[0].Event == nil || out[0].Event.Index() != 4 {
		t.Fatalf("applying again: %+v %v", out, err)
	}

	// Compaction and SetMeta commit a deferred apply before they write.
	if _, err := ts.Save(Ready{HardState: commit(5), Committed: []*raftpb.Entry{next5}, Defer: true}); err != nil {
		t.Fatal(err)
	}
	if err := ts.SetMeta("k", []byte("v")); err != nil || ts.Deferred() || ts.AppliedIndex() != 5 {
		t.Fatalf("SetMeta: %v, deferred %v, applied %d", err, ts.Deferred(), ts.AppliedIndex())
	}
}
