//go:build !linux

package storage

// DropMappedPages does nothing on this system: madvise's MADV_DONTNEED
// semantics for shared file mappings, which the Linux version relies on,
// are Linux's.
func (s *Store) DropMappedPages() error {
	if s.closed.Load() {
		return ErrClosed
	}
	return nil
}
