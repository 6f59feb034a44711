//go:build !windows

package storage

import "os"

// syncDir makes the names in dir (files made, renamed or removed there)
// durable: bbolt's syncs cover a file's contents, not its directory entry.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
