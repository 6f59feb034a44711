//go:build linux || darwin || freebsd || netbsd || openbsd || dragonfly

package storage

import (
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"
)

// openChecked is bbolt's OpenFile for member.db: it takes the file's lock,
// as bbolt would next (bbolt's own flock on the same descriptor then
// succeeds at once), and checks the file's pages under it (checkFile)
// before bbolt walks them.
func openChecked(name string, flag int, perm os.FileMode) (*os.File, error) {
	f, err := os.OpenFile(name, flag, perm)
	if err != nil {
		return nil, err
	}
	if err := lockFile(f, lockTimeout); err != nil {
		f.Close()
		return nil, err
	}
	if err := checkOpenFile(f); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// lockFile takes an exclusive flock on f, trying until timeout has passed.
func lockFile(f *os.File, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
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
