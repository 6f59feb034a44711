package storage

import (
	"fmt"
	"testing"
	"time"

	"go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"
)

// next receives one event or fails when none is ready: events are handed
// over inside Save, so a delivered one is already in the channel.
func next(t *testing.T, w *Watcher) *Event {
	t.Helper()
	select {
	case e, ok := <-w.EventChan:
		if !ok {
			t.Fatal("watch ended")
		}
		return e
	default:
		t.Fatal("no event")
	}
	return nil
}

func wantNothing(t *testing.T, w *Watcher) {
	t.Helper()
	select {
	case e, ok := <-w.EventChan:
		if ok {
			t.Fatalf("unexpected event %s", jsonOf(t, e))
		}
		t.Fatal("watch ended")
	default:
	}
}

func wantClosed(t *testing.T, w *Watcher) {
	t.Helper()
	select {
	case e, ok := <-w.EventChan:
		if ok {
			t.Fatalf("unexpected event %s", jsonOf(t, e))
		}
	default:
		t.Fatal("watch still open")
	}
}

func mustWatch(t *testing.T, ts *tstore, p string, recursive, stream bool, since uint64) *Watcher {
	t.Helper()
	w, err := ts.Watch(p, recursive, stream, since)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.Remove)
	return w
}

// TestWatchReplaysEtcdTranscript follows the reference's captured watches:
// /w/k at 1, then /w/_hid (2), /w/k (3), /w/k2 (4), delete /w (5), each
// watch registered at index 1.
func TestWatchReplaysEtcdTranscript(t *testing.T) {
	ts := newTestStore(t)
	ts.mustDo(set("/w/k", "1"))
	watchers := []struct {
		name      string
		path      string
		recursive bool
		stream    bool
		since     uint64
		want      []uint64
	}{
		{name: "56 non-recursive on the dir gets its delete", path: "/w", want: []uint64{5}},
		{name: "57 recursive skips the hidden child", path: "/w", recursive: true, want: []uint64{3}},
		{name: "non-recursive on the key", path: "/w/k", want: []uint64{3}},
		{name: "57 direct watch on a hidden key", path: "/w/_hid", want: []uint64{2}},
		{name: "53 a past waitIndex answers from history", path: "/w", recursive: true, since: 1, want: []uint64{1}},
		{name: "59 stream gets every event, the dir delete once", path: "/w", recursive: true, stream: true, want: []uint64{3, 4, 5}},
		{name: "59 stream on the root", path: "/", recursive: true, stream: true, want: []uint64{3, 4, 5}},
		// etcd notifies the nodes a removed directory took, and /w/k/sub
		// was none (checked against etcd 3.4): its watcher waits on.
		{name: "60 a path under a file may be watched", path: "/w/k/sub", want: nil},
		{name: "54 a future waitIndex waits for it", path: "/w", recursive: true, since: 4, want: []uint64{4}},
		{name: "56 a watched key in a deleted dir", path: "/w/k2", want: []uint64{4}},
	}
	ws := make([]*Watcher, len(watchers))
	for i, tw := range watchers {
		ws[i] = mustWatch(t, ts, tw.path, tw.recursive, tw.stream, tw.since)
		if ws[i].StartIndex != 1 {
			t.Fatalf("%s: StartIndex %d", tw.name, ws[i].StartIndex)
		}
	}
	ts.apply(set("/w/_hid", "h"), set("/w/k", "2"), set("/w/k2", "3"),
		Request{Method: MethodDelete, Path: "/w", Recursive: true})
	for i, tw := range watchers {
		var got []uint64
		for len(ws[i].EventChan) > 0 {
			e := <-ws[i].EventChan
			got = append(got, e.Index())
		}
		if fmt.Sprint(got) != fmt.Sprint(tw.want) {
			t.Errorf("%s: got events %v, want %v", tw.name, got, tw.want)
		}
		if !tw.stream && len(tw.want) > 0 {
			wantClosed(t, ws[i])
		}
	}
	wantJSON(t, <-mustWatch(t, ts, "/w", false, false, 5).EventChan,
		`{"action":"delete","node":{"key":"/w","dir":true,"modifiedIndex":5,"createdIndex":1},"prevNode":{"key":"/w","dir":true,"modifiedIndex":1,"createdIndex":1}}`)
}

func TestWatchWithoutIndexWaitsForTheNextEvent(t *testing.T) {
	ts := newTestStore(t)
	ts.mustDo(set("/a", "1"))
	w := mustWatch(t, ts, "/a", false, false, 0)
	if w.StartIndex != 1 {
		t.Fatalf("StartIndex %d", w.StartIndex)
	}
	wantNothing(t, w)
	ts.mustDo(set("/a", "2"))
	// 52: the event's index is past the registration index.
	if e := next(t, w); e.Index() != 2 || e.EtcdIndex != 2 {
		t.Fatalf("got %s", jsonOf(t, e))
	}
	wantClosed(t, w)
}

func TestWatchHistoryHidesNothing(t *testing.T) {
	ts := newTestStore(t)
	ts.apply(set("/d/_h", "h"), set("/d/k", "k"))
	// 58: the history scan returns a hidden key's event.
	w := mustWatch(t, ts, "/d", true, false, 1)
	if e := next(t, w); e.Node.Key != "/d/_h" || e.EtcdIndex != 2 {
		t.Fatalf("got %s (EtcdIndex %d)", jsonOf(t, e), e.EtcdIndex)
	}
	// A watch rooted inside a hidden dir sees its children live.
	w2 := mustWatch(t, ts, "/_h2", true, false, 0)
	ts.mustDo(set("/_h2/x", "x"))
	if e := next(t, w2); e.Node.Key != "/_h2/x" {
		t.Fatalf("got %s", jsonOf(t, e))
	}
	// Hidden components deeper down are skipped live.
	w3 := mustWatch(t, ts, "/", true, false, 0)
	ts.apply(set("/a/_b/c", "x"), set("/a/b/c", "y"))
	if e := next(t, w3); e.Node.Key != "/a/b/c" {
		t.Fatalf("got %s", jsonOf(t, e))
	}
}

func TestWatchHistoryCleared(t *testing.T) {
	ts := newTestStore(t)
	reqs := make([]Request, 1100)
	for i := range reqs {
		reqs[i] = set("/other", fmt.Sprint(i))
	}
	ts.apply(reqs...)
	_, err := ts.Watch("/foo", false, false, 43)
	wantErr(t, err, EcodeEventIndexCleared, "the requested history has been cleared [101/43]", 1100)
	for _, reopen := range []bool{false, true} {
		if reopen {
			ts.reopen()
		}
		// 55: history starts 999 events back; the error carries the
		// current index.
		_, err := ts.Watch("/foo", false, false, 43)
		wantErr(t, err, EcodeEventIndexCleared,
			fmt.Sprintf("the requested history has been cleared [%d/43]", ts.Index()-999), ts.Index())
		// 60: the history check comes before any path check.
		ts.mustDo(set("/f1", "f"))
		_, err = ts.Watch("/f1/sub", false, false, 1)
		wantErr(t, err, EcodeEventIndexCleared,
			fmt.Sprintf("the requested history has been cleared [%d/1]", ts.Index()-999), ts.Index())
		w := mustWatch(t, ts, "/other", false, false, 193)
		if e := next(t, w); e.Index() != 193 {
			t.Fatalf("got %d", e.Index())
		}
	}
}

func TestStreamingWatcherIsDroppedWhenFull(t *testing.T) {
	ts := newTestStore(t)
	w := mustWatch(t, ts, "/k", false, true, 0)
	reqs := make([]Request, watchBuffer+5)
	for i := range reqs {
		reqs[i] = set("/k", fmt.Sprint(i))
	}
	ts.apply(reqs...) // never blocks although nobody reads
	n := 0
	for range w.EventChan {
		n++
	}
	if n != watchBuffer {
		t.Fatalf("%d events before the drop", n)
	}
	if ts.Stats().Watchers != 0 {
		t.Fatal("dropped watcher still counted")
	}
	if w.Ended() {
		t.Fatal("a dropped watcher says the store ended it")
	}
}

func TestStreamingWatchFromHistoryContinuesLive(t *testing.T) {
	ts := newTestStore(t)
	ts.apply(set("/s/a", "1"), set("/x", "x"), set("/s/b", "2"))
	w := mustWatch(t, ts, "/s", true, true, 1)
	ts.mustDo(set("/s/c", "3"))
	for _, want := range []uint64{1, 3, 4} {
		if e := next(t, w); e.Index() != want {
			t.Fatalf("got %d, want %d", e.Index(), want)
		}
	}
	wantNothing(t, w)
}

func TestRemovedWatchersLeaveNothingBehind(t *testing.T) {
	ts := newTestStore(t)
	ws := make([]*Watcher, 10000)
	for i := range ws {
		w, err := ts.Watch(fmt.Sprintf("/k/%d/x%d", i%100, i), i%2 == 0, i%3 == 0, 0)
		if err != nil {
			t.Fatal(err)
		}
		ws[i] = w
	}
	if got := ts.Stats().Watchers; got != 10000 {
		t.Fatalf("%d watchers", got)
	}
	ts.mustDo(set("/k/5/x5", "v")) // ends the non-streaming watcher there
	for _, w := range ws {
		w.Remove()
		w.Remove() // twice is harmless
	}
	h := ts.hub
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.root.children) != 0 || len(h.root.watchers) != 0 || h.count.Load() != 0 {
		t.Fatalf("hub not empty: %d children, %d watchers, count %d",
			len(h.root.children), len(h.root.watchers), h.count.Load())
	}
	for _, w := range ws {
		if _, ok := <-w.EventChan; ok {
			if _, ok := <-w.EventChan; ok {
				t.Fatal("channel of a removed watcher still open")
			}
		}
	}
}

func TestCloseEndsWatchersAndRefusesCalls(t *testing.T) {
	ts := newTestStore(t)
	ts.mustDo(set("/a", "1"))
	w := mustWatch(t, ts, "/a", true, true, 0)
	if err := ts.SetMeta("id", []byte{1}); err != nil {
		t.Fatal(err)
	}
	if err := ts.Close(); err != nil {
		t.Fatal(err)
	}
	wantClosed(t, w)
	if !w.Ended() {
		t.Fatal("a watcher Close ended does not say so")
	}
	w.Remove()
	if _, err := ts.Watch("/a", false, false, 0); err != ErrClosed {
		t.Fatalf("Watch: %v", err)
	}
	if _, err := ts.get("/a", false, false); err != ErrClosed {
		t.Fatalf("Get: %v", err)
	}
	if _, err := ts.Save(Ready{Committed: []*raftEntry{entry(2, &Request{Method: MethodPut, Path: "/b"})}}); err != ErrClosed {
		t.Fatalf("Save: %v", err)
	}
	if _, err := ts.LoadRaft(); err != ErrClosed {
		t.Fatalf("LoadRaft: %v", err)
	}
	if err := ts.SetMeta("x", nil); err != ErrClosed {
		t.Fatalf("SetMeta: %v", err)
	}
	if ts.Meta("id") != nil {
		t.Fatal("Meta after Close")
	}
	if err := ts.Close(); err != ErrClosed {
		t.Fatalf("second Close: %v", err)
	}
	ts.open() // the cleanup closes this one
	if got := ts.Meta("id"); len(got) != 1 || got[0] != 1 {
		t.Fatalf("Meta after reopen: %v", got)
	}
}

// TestWatchersRegisteredDuringSavesMissNothing races watch registrations
// and reads against Saves: every watcher must see the events after its
// StartIndex contiguously, neither skipped (registered between commit and
// publish) nor repeated.
func TestWatchersRegisteredDuringSavesMissNothing(t *testing.T) {
	ts := newTestStore(t)
	const writes = 300
	done := make(chan struct{})
	errs := make(chan error, 8) // room for an error and the exit of each reader
	for g := 0; g < 4; g++ {
		go func() {
			defer func() { errs <- nil }()
			for {
				select {
				case <-done:
					return
				default:
				}
				if _, err := ts.Get("/k", false, false, testClock); err != nil && ts.Index() > 0 {
					if e, ok := err.(*Error); !ok || e.ErrorCode != EcodeKeyNotFound {
						errs <- err
						return
					}
				}
				w, err := ts.Watch("/k", false, true, 0)
				if err != nil {
					errs <- err
					return
				}
				want := w.StartIndex + 1
				for i := 0; i < 5; i++ {
					var e *Event
					var ok bool
					select {
					case e, ok = <-w.EventChan:
					case <-done:
					}
					if !ok {
						break
					}
					if e.Index() != want {
						errs <- fmt.Errorf("watcher from %d got %d, want %d", w.StartIndex, e.Index(), want)
						w.Remove()
						return
					}
					want++
					if want > writes {
						break
					}
				}
				w.Remove()
			}
		}()
	}
	for i := 0; i < writes; i++ {
		ts.mustDo(set("/k", fmt.Sprint(i)))
	}
	close(done)
	for g := 0; g < 4; g++ {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
}

// TestRemovedDirectoryWakesWatchersOfItsNodesOnly deletes, then expires, a
// directory with watchers below it. As in etcd, whose Remove calls back for
// each node it takes, the watchers at nodes that were there get the event;
// a watcher of a key that did not exist under the directory waits on, and
// gets the later creation of that key.
func TestRemovedDirectoryWakesWatchersOfItsNodesOnly(t *testing.T) {
	for _, expire := range []bool{false, true} {
		t.Run(fmt.Sprintf("expire=%v", expire), func(t *testing.T) {
			ts := newTestStore(t)
			exp := testClock.Add(time.Second).UnixNano()
			if expire {
				ts.mustDo(Request{Method: MethodPut, Path: "/d", Dir: true, Expiration: exp})
			} else {
				ts.mustDo(mkdir("/d"))
			}
			ts.mustDo(set("/d/x", "x"))
			ts.mustDo(set("/d/y/z", "z"))
			ts.mustDo(set("/d/_h", "h"))
			took := map[string]*Watcher{
				"/d/x":   mustWatch(t, ts, "/d/x", false, false, 0),
				"/d/y/z": mustWatch(t, ts, "/d/y/z", false, false, 0),
				"/d/y":   mustWatch(t, ts, "/d/y", true, false, 0),
				"/d/_h":  mustWatch(t, ts, "/d/_h", false, false, 0),
			}
			missing := map[string]*Watcher{
				"/d/none":        mustWatch(t, ts, "/d/none", false, false, 0),
				"/d/y/none":      mustWatch(t, ts, "/d/y/none", true, false, 0),
				"/d/x/under":     mustWatch(t, ts, "/d/x/under", false, false, 0),
				"/d/none/deeper": mustWatch(t, ts, "/d/none/deeper", false, false, 0),
			}
			action := ActionDelete
			if expire {
				action = ActionExpire
				ts.do(Request{Method: MethodSync, Time: exp})
			} else {
				ts.mustDo(Request{Method: MethodDelete, Path: "/d", Recursive: true})
			}
			for p, w := range took {
				if e := next(t, w); e.Action != action || e.Node.Key != "/d" {
					t.Errorf("watcher at %s: %s", p, jsonOf(t, e))
				}
			}
			for p, w := range missing {
				t.Run(p, func(t *testing.T) { wantNothing(t, w) })
			}
			ts.mustDo(set("/d/none", "later"))
			if e := next(t, missing["/d/none"]); e.Action != ActionSet || e.Node.Key != "/d/none" {
				t.Errorf("watcher at /d/none after the key was created: %s", jsonOf(t, e))
			}
		})
	}
}

// TestWatchAfterAnAnswerMissesItsEvent: a client answered for the write at
// index 2 (a deferred Save's result) starts a watch without waitIndex. It
// waits for the next event, from index 3 on, even when it starts while the
// commit that makes index 2 visible is under way: it must not be handed
// event 2.
func TestWatchAfterAnAnswerMissesItsEvent(t *testing.T) {
	ts := newTestStore(t)
	ts.mustDo(set("/k", "1"))
	ent := entry(2, &Request{Method: MethodPut, Path: "/k", Val: "2"})
	if _, err := ts.Save(Ready{Entries: []*raftpb.Entry{ent}}); err != nil {
		t.Fatal(err)
	}
	if _, err := ts.Save(Ready{HardState: &raftpb.HardState{Term: proto.Uint64(1), Commit: proto.Uint64(2)},
		Committed: []*raftpb.Entry{ent}, Defer: true}); err != nil {
		t.Fatal(err)
	}
	wc := make(chan *Watcher, 1)
	ts.beforePublish = func() {
		// The file holds index 2 now; the watch, started after the
		// answer, waits for it to be visible (or, wrongly, registers
		// at once: give it the time to).
		go func() {
			w, err := ts.Watch("/k", false, false, 0)
			if err != nil {
				t.Error(err)
			}
			wc <- w
		}()
		select {
		case w := <-wc:
			wc <- w
		case <-time.After(100 * time.Millisecond):
		}
	}
	if err := ts.Flush(); err != nil {
		t.Fatal(err)
	}
	ts.beforePublish = nil
	w := <-wc
	if w == nil {
		return
	}
	defer w.Remove()
	// Events are handed over inside commit: one would be in the channel.
	select {
	case e := <-w.EventChan:
		t.Fatalf("a watch started after the answer for index 2 got event %d (its start index %d)", e.Index(), w.StartIndex)
	default:
	}
	if w.StartIndex != 2 {
		t.Fatalf("start index %d, want 2", w.StartIndex)
	}
}
