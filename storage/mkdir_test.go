package storage

import (
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// TestMkdirAllNamesTheParentsToSync checks the directories whose entries Open
// syncs after making a data directory: the parent of each level it made.
func TestMkdirAllNamesTheParentsToSync(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, "a", "b", "c")
	made, err := mkdirAll(dir)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{filepath.Join(root, "a", "b"), filepath.Join(root, "a"), root}
	if !slices.Equal(made, want) {
		t.Errorf("mkdirAll(%s) = %q, want %q", dir, made, want)
	}
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() || fi.Mode().Perm() != 0o700 {
		t.Errorf("%s: %v %v", dir, fi, err)
	}
	// Made already: nothing to sync but the directory itself, which Open does.
	if made, err := mkdirAll(dir); err != nil || len(made) != 0 {
		t.Errorf("mkdirAll of an existing directory = %q, %v", made, err)
	}
	s, err := Open(filepath.Join(root, "x", "y"))
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
}
