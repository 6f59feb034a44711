//go:build !(linux || darwin || freebsd || netbsd || openbsd || dragonfly)

package storage

import "os"

// openChecked is bbolt's OpenFile for member.db. Here bbolt's own lock is
// the only one, and it comes after this call: the pages are not checked
// before bbolt reads them (checkFile), since another process could still
// be writing them.
func openChecked(name string, flag int, perm os.FileMode) (*os.File, error) {
	return os.OpenFile(name, flag, perm)
}

// installByRename is false here: where a file that is open cannot be
// renamed over or away (Windows), a snapshot's state is copied into
// member.db instead, inside the Raft loop (see snapshotInstall).
var installByRename = false
