package storage

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// damageFixture writes a member.db with trees several pages deep in its
// buckets (keys, log, history, expiry) and values spanning overflow pages,
// and returns its bytes, page size and number of pages in use (bbolt
// grows the file ahead of use).
func damageFixture(t *testing.T) ([]byte, int, int) {
	t.Helper()
	ts := newTestStore(t)
	for i := range 12 {
		var reqs []Request
		for j := range 25 {
			r := set(fmt.Sprintf("/dir%d/key%04d", j%7, i*25+j), strings.Repeat("v", 100+(i*j)%300))
			if j%5 == 0 {
				r.Expiration = testClock.Add(time.Hour).UnixNano()
			}
			reqs = append(reqs, r)
		}
		ts.apply(reqs...)
	}
	ts.apply(set("/big", strings.Repeat("B", 3*os.Getpagesize())))
	if err := ts.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(ts.dir, "member.db"))
	if err != nil {
		t.Fatal(err)
	}
	ts.open() // for the Cleanup's Close
	if err := checkFile(mustOpen(t, filepath.Join(ts.dir, "member.db")), int64(len(b))); err != nil {
		t.Fatalf("a healthy file: %v", err)
	}
	ps, hwm := os.Getpagesize(), 0
	for _, m := range []int{0, ps} {
		if meta, ok := parseMeta(b[m+pageHeaderSize:]); ok {
			hwm = max(hwm, int(meta.pgid))
		}
	}
	// Only the pages in use: a file cut behind them is whole (see
	// TestOpenRefusesTruncatedFiles), and each case writes less.
	return b[:hwm*ps], ps, hwm
}

func mustOpen(t *testing.T, path string) *os.File {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// openDamaged writes b as the member.db of data directory dir and opens it.
// Open either refuses it or serves it whole; a damaged page it would read
// must never take the process down (bbolt walks the pages at open on a
// goroutine no recover reaches: a crash there ends this test binary).
func openDamaged(t *testing.T, dir string, b []byte) error {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, "member.db"), b, 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := Open(dir)
	if err != nil {
		return err
	}
	defer s.Close()
	// Whatever Open took for whole must read as such.
	if _, err := s.Get("/", true, true, testClock); err != nil {
		return err
	}
	return nil
}

func TestOpenRefusesDamagedPages(t *testing.T) {
	orig, ps, hwm := damageFixture(t)
	dir := t.TempDir()
	rnd := rand.New(rand.NewPCG(1, 2))
	refused := 0
	for i := range hwm {
		b := append([]byte(nil), orig...)
		page := b[i*ps : (i+1)*ps]
		for k := range page {
			page[k] = byte(rnd.Uint32())
		}
		// Pages 0 and 1 are the meta pages, and bbolt falls back to the
		// other; free pages are nobody's. A page of a tree is ErrDamaged;
		// the continuation of a long value has no header to check, and its
		// garbage fails where the value is decoded.
		if err := openDamaged(t, dir, b); err != nil {
			refused++
		}
	}
	if refused < hwm/2 {
		t.Fatalf("%d of %d overwritten pages refused", refused, hwm)
	}
	t.Logf("%d pages in use, %d overwritten ones refused", hwm, refused)
}

func TestOpenRefusesDamagedElements(t *testing.T) {
	orig, ps, hwm := damageFixture(t)
	dir := t.TempDir()
	rnd := rand.New(rand.NewPCG(3, 4))
	refused := 0
	for i := 2; i < hwm; i++ {
		for range 3 {
			// Garble the element headers behind an intact page header:
			// positions and sizes that point anywhere.
			b := append([]byte(nil), orig...)
			for range 4 {
				b[i*ps+pageHeaderSize+rnd.IntN(4*pageElementSize)] ^= byte(1 + rnd.IntN(255))
			}
			if err := openDamaged(t, dir, b); err != nil {
				refused++
			}
		}
	}
	if refused == 0 {
		t.Fatal("no garbled page refused")
	}
}

func TestOpenRefusesTruncatedFiles(t *testing.T) {
	orig, ps, hwm := damageFixture(t)
	dir := t.TempDir()
	for _, n := range []int{ps * 2, ps*2 + 100, ps * hwm / 3, ps*hwm/2 + 7, ps*hwm - 1, ps * (hwm - 1)} {
		err := openDamaged(t, dir, orig[:n])
		if err == nil || (n > ps*2 && !errors.Is(err, ErrDamaged)) {
			t.Errorf("cut to %d bytes (%d pages in use): %v, want ErrDamaged", n, hwm, err)
		}
	}
	// A file cut behind its last page in use (bbolt grows files ahead of
	// use) is whole.
	if err := openDamaged(t, dir, orig[:ps*hwm]); err != nil {
		t.Errorf("cut to its pages in use: %v", err)
	}
}

func TestOpenRefusesAFileAnotherOpenHolds(t *testing.T) {
	ts := newTestStore(t)
	start := time.Now()
	_, err := Open(ts.dir)
	if !errors.Is(err, ErrLocked) {
		t.Fatalf("second Open: %v, want ErrLocked", err)
	}
	if d := time.Since(start); d < lockTimeout {
		t.Fatalf("gave up after %v, before the %v it waits", d, lockTimeout)
	}
	// The first one goes on.
	ts.mustDo(set("/a", "1"))
}

// TestOpenRefusesAnEmptyBranchPage: a branch page whose count is zero passes bbolt's own
// walk (it sees no children) but its cursor reads element 0 regardless, and the first
// lookup through it panicked inside Open's first transaction.
func TestOpenRefusesAnEmptyBranchPage(t *testing.T) {
	orig, ps, hwm := damageFixture(t)
	dir := t.TempDir()
	// The pages in use: a freed copy of a branch page is nobody's.
	path := filepath.Join(dir, "member.db")
	if err := os.WriteFile(path, orig, 0o600); err != nil {
		t.Fatal(err)
	}
	c := &fileCheck{f: mustOpen(t, path), size: int64(len(orig))}
	if err := c.readMeta(); err != nil {
		t.Fatal(err)
	}
	if err := c.walkBucket(c.root, nil); err != nil {
		t.Fatal(err)
	}
	branches := 0
	for i := 2; i < hwm; i++ {
		p := orig[i*ps:]
		if c.seen[i/64]&(1<<(i%64)) == 0 || binary.NativeEndian.Uint16(p[8:]) != branchPageFlag {
			continue
		}
		branches++
		b := append([]byte(nil), orig...)
		binary.NativeEndian.PutUint16(b[i*ps+10:], 0)
		if err := openDamaged(t, dir, b); !errors.Is(err, ErrDamaged) {
			t.Errorf("branch page %d emptied: %v, want ErrDamaged", i, err)
		}
	}
	if branches == 0 {
		t.Fatal("the fixture has no branch page")
	}
}

// TestOpenTakesAFileBboltNeverCommittedTo: bbolt writes a freelist page when it creates a
// file; a member that stopped before its first commit leaves one behind, which is whole.
func TestOpenTakesAFileBboltNeverCommittedTo(t *testing.T) {
	dir := t.TempDir()
	db, err := bolt.Open(filepath.Join(dir, "member.db"), 0o600, &bolt.Options{NoFreelistSync: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	s, err := Open(dir)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestOpenRefusesAFreelistNamingPagesInUse: a synced freelist (bbolt reads
// it at open instead of walking the tree) that names a page the tree
// reaches would have bbolt hand that page out again; Open refuses it.
func TestOpenRefusesAFreelistNamingPagesInUse(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "member.db")
	db, err := bolt.Open(path, 0o600, &bolt.Options{NoFreelistSync: false})
	if err != nil {
		t.Fatal(err)
	}
	for round := range 3 {
		err := db.Update(func(tx *bolt.Tx) error {
			b, err := tx.CreateBucketIfNotExists([]byte("b"))
			if err != nil {
				return err
			}
			for i := range 200 {
				if round == 2 && i%2 == 0 {
					if err := b.Delete(fmt.Appendf(nil, "k%04d", i)); err != nil {
						return err
					}
					continue
				}
				if err := b.Put(fmt.Appendf(nil, "k%04d", i), []byte(strings.Repeat("v", 100))); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := checkFile(mustOpen(t, path), int64(len(b))); err != nil {
		t.Fatalf("a healthy file with a synced freelist: %v", err)
	}
	ps := os.Getpagesize()
	var m boltMeta
	for _, off := range []int{0, ps} {
		if mm, ok := parseMeta(b[off+pageHeaderSize:]); ok && mm.txid >= m.txid {
			m = mm
		}
	}
	fl := b[int(m.freelist)*ps:]
	if m.freelist == noFreelist || le.Uint16(fl[10:]) == 0 || le.Uint16(fl[10:]) == 0xFFFF {
		t.Fatalf("the fixture has no short synced freelist to damage (meta %+v)", m)
	}
	// The freelist's first ID becomes the root bucket's page.
	le.PutUint64(fl[pageHeaderSize:], m.root)
	err = openDamaged(t, t.TempDir(), b)
	if !errors.Is(err, ErrDamaged) || !strings.Contains(err.Error(), "both in the freelist and in use") {
		t.Fatalf("Open of a freelist naming the root's page: %v", err)
	}
}

// A read that finds the tree without its keys or meta bucket (which no file
// this store opens lacks) says the store is damaged, instead of crashing
// the goroutine that asked.
func TestGetOnATreeWithoutItsBucketsIsDamaged(t *testing.T) {
	ts := newTestStore(t)
	if err := ts.file().Update(func(tx *bolt.Tx) error { return tx.DeleteBucket(bucketMeta) }); err != nil {
		t.Fatal(err)
	}
	if _, err := ts.Get("/", true, false, testClock); !errors.Is(err, ErrDamaged) {
		t.Fatalf("Get: %v, want ErrDamaged", err)
	}
}
