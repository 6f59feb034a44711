package storage

import (
	"errors"
	"os/signal"
	"strings"
	"syscall"
	"testing"

	bolt "go.etcd.io/bbolt"
	"go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"
)

// limitFileSize makes every write at or past the file's current size fail
// (EFBIG), as a full disk would, until the returned func runs. The limit
// is the test process's: nothing else in this package writes meanwhile.
func limitFileSize(t *testing.T, s *Store) func() {
	t.Helper()
	signal.Ignore(syscall.SIGXFSZ)
	var size int64
	if err := s.view(func(tx *bolt.Tx) error { size = tx.Size(); return nil }); err != nil {
		t.Fatal(err)
	}
	var old syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_FSIZE, &old); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &syscall.Rlimit{Cur: uint64(size), Max: old.Max}); err != nil {
		t.Fatal(err)
	}
	return func() {
		if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &old); err != nil {
			t.Fatal(err)
		}
	}
}

// TestFailedCommitOfAnsweredWritesFailsTheStore: a deferred Save hands out
// the result of a write (its client is answered), then the commit that
// would make it visible fails (the disk is full). A read waiting for that
// commit must not be served the state before the answered write: it gets
// an error, and so does every read and write after it, until the file is
// opened again, which applies the write from the log.
func TestFailedCommitOfAnsweredWritesFailsTheStore(t *testing.T) {
	ts := newTestStore(t)
	ts.mustDo(set("/k", "old"))
	// A value that makes the commit grow the file.
	big := strings.Repeat("n", 300<<10)
	ent := entry(2, &Request{Method: MethodPut, Path: "/k", Val: big, ID: 42})
	if _, err := ts.Save(Ready{Entries: []*raftpb.Entry{ent}}); err != nil {
		t.Fatal(err)
	}
	out, err := ts.Save(Ready{HardState: &raftpb.HardState{Term: proto.Uint64(1), Commit: proto.Uint64(2)},
		Committed: []*raftpb.Entry{ent}, Defer: true})
	if err != nil || len(out) != 1 || out[0].Event == nil {
		t.Fatalf("deferred Save: %+v, %v", out, err)
	}

	restore := limitFileSize(t, ts.Store)
	read := make(chan error, 1)
	go func() {
		e, err := ts.get("/k", false, false)
		if err == nil && *e.Node.Value != big {
			err = errors.New("read " + *e.Node.Value + " after the write of the big value was answered")
		} else if err == nil {
			err = errors.New("read the answered write although its commit failed")
		}
		read <- err
	}()
	<-ts.FlushRequests() // the reader waits for the answered write
	ferr := ts.Flush()
	restore()
	if ferr == nil {
		t.Fatal("the commit did not fail: the file-size limit did not take")
	}
	if err := <-read; !errors.Is(err, ErrClosed) {
		t.Fatalf("the waiting read: %v, want the store's failure", err)
	}
	if _, err := ts.get("/k", false, false); !errors.Is(err, ErrClosed) {
		t.Fatalf("a read after the failure: %v", err)
	}
	if _, err := ts.Watch("/k", false, false, 0); !errors.Is(err, ErrClosed) {
		t.Fatalf("a watch after the failure: %v", err)
	}
	ent3 := entry(3, &Request{Method: MethodPut, Path: "/z", Val: "z"})
	if _, err := ts.Save(Ready{Entries: []*raftpb.Entry{ent3}}); !errors.Is(err, ErrClosed) {
		t.Fatalf("a Save after the failure: %v", err)
	}

	// Opened again, the store applies the committed entry from its log,
	// as a member does when it restarts.
	ts.reopen()
	if ts.AppliedIndex() != 1 {
		t.Fatalf("applied index after reopening = %d, want 1", ts.AppliedIndex())
	}
	if _, err := ts.Save(Ready{HardState: &raftpb.HardState{Term: proto.Uint64(1), Commit: proto.Uint64(2)},
		Committed: []*raftpb.Entry{ent}}); err != nil {
		t.Fatal(err)
	}
	if e := ts.mustGet("/k", false); *e.Node.Value != big || e.Node.ModifiedIndex != 2 {
		t.Fatalf("after applying again: modifiedIndex %d, value of %d bytes", e.Node.ModifiedIndex, len(*e.Node.Value))
	}
}
