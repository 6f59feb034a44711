package storage

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// openFilesOf counts this process's descriptors open on path (by inode, so
// a file renamed over path since does not count).
func openFilesOf(t *testing.T, path string) int {
	t.Helper()
	want, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, fd := range fds {
		if fi, err := os.Stat(filepath.Join("/proc/self/fd", fd.Name())); err == nil && os.SameFile(fi, want) {
			n++
		}
	}
	return n
}

// A second opener of member.db (another Caddy on the same data_dir) waits
// for the file's lock. If a snapshot install renames a new file over
// member.db and then closes the old one meanwhile, the lock it gets is the
// old file's, which is no longer member.db: it must not go on with it (two
// processes would run as one member, one of them on a state of the past),
// but see the new member.db locked, and fail.
func TestOpenWaitingOnARenamedFileFails(t *testing.T) {
	leader, follower := newTestStore(t), newTestStore(t)
	leader.apply(set("/new", "1"), set("/new2", "2"))
	follower.apply(set("/old", "x"))
	path := receive(t, leader, follower)

	member := filepath.Join(follower.dir, "member.db")
	before := openFilesOf(t, member)
	second := make(chan error, 1)
	go func() {
		s, err := Open(follower.dir)
		if err == nil {
			s.Close()
			err = errors.New("opened")
		}
		second <- err
	}()
	// The second opener has the old file open and waits for its lock.
	deadline := time.Now().Add(5 * time.Second)
	for openFilesOf(t, member) == before {
		if time.Now().After(deadline) {
			t.Fatal("the second Open never opened member.db")
		}
		time.Sleep(time.Millisecond)
	}
	if _, err := follower.Save(snapshotReady(path, 2, 2, 1, 2, 3)); err != nil {
		t.Fatal(err)
	}
	if err := <-second; !errors.Is(err, ErrLocked) {
		t.Fatalf("a second Open waiting while a snapshot was installed: %v, want ErrLocked", err)
	}
}
