package storage

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// DropMappedPages lets go of the pages of member.db this process has
// mapped. bbolt reads through a shared, read-only mapping of the file, and
// a page once read stays in the process's resident set although it is a
// clean page of the kernel's page cache: copy-on-write commits move pages
// around the file, so in time every page of it counts in the member's RSS.
// MADV_DONTNEED removes the mapping's page table entries only; the pages
// stay in the page cache (evictable under memory pressure as ever), and
// the next read of one maps it again with a minor fault. Nothing changes
// for readers, which see the file's current contents either way.
func (s *Store) DropMappedPages() error {
	if s.closed.Load() {
		return ErrClosed
	}
	// A read transaction holds bbolt's mmap lock: while it is open the
	// mapping can be neither moved by a remap nor unmapped by Close, so
	// the advice cannot land on memory that is no longer the mapping.
	db := s.file()
	tx, err := db.Begin(false)
	if err != nil {
		return closedErr(err)
	}
	defer tx.Rollback()
	// tx.Size is the file's high-water mark, within the mapping; pages
	// past it were never read.
	if _, _, errno := unix.Syscall(unix.SYS_MADVISE, db.Info().Data, uintptr(tx.Size()), unix.MADV_DONTNEED); errno != 0 {
		return fmt.Errorf("storage: madvise: %w", errno)
	}
	return nil
}
