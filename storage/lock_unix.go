//go:build linux || darwin || freebsd || netbsd || openbsd || dragonfly

package storage

import (
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"
)

// installByRename: a snapshot is installed by renaming the received file
// over member.db while both are open (see snapshotInstall).
var installByRename = true

// openChecked is bbolt's OpenFile for member.db: it takes the file's lock,
// as bbolt would next (bbolt's own flock on the same descriptor then
// succeeds at once), and checks the file's pages under it (checkFile)
// before bbolt walks them.
//
// The lock must be the one on the file that is member.db when it is
// taken: a snapshot install renames another file over member.db and then
// closes the old one, whose lock a process that opened it earlier and
// waits would get. Such a lock is let go and the name opened again.
func openChecked(name string, flag int, perm os.FileMode) (*os.File, error) {
	deadline := time.Now().Add(lockTimeout)
	for {
		f, err := os.OpenFile(name, flag, perm)
		if err != nil {
			return nil, err
		}
		if err := lockFile(f, deadline); err != nil {
			f.Close()
			return nil, err
		}
		if same, err := isNamed(f, name); err != nil || !same {
			f.Close()
			if err != nil {
				return nil, err
			}
			if time.Now().After(deadline) {
				return nil, fmt.Errorf("%w: %s", ErrLocked, name)
			}
			// Renamed over while this process waited: lock the new one,
			// which must exist (no empty file in place of one moved away).
			flag &^= os.O_CREATE
			continue
		}
		if err := checkOpenFile(f); err != nil {
			f.Close()
			return nil, err
		}
		return f, nil
	}
}

// isNamed reports whether f is the file name names now.
func isNamed(f *os.File, name string) (bool, error) {
	held, err := f.Stat()
	if err != nil {
		return false, err
	}
	named, err := os.Stat(name)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return os.SameFile(held, named), nil
}

// lockFile takes an exclusive flock on f, trying until deadline.
func lockFile(f *os.File, deadline time.Time) error {
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			return fmt.Errorf("locking %s: %w", f.Name(), err)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%w: %s", ErrLocked, f.Name())
		}
		time.Sleep(lockRetry) // flock has no wait with a deadline: poll
	}
}
