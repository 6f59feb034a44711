package storage

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// mappedRSS returns how much of this process's mapping of path is
// resident, from /proc/self/smaps, in bytes.
func mappedRSS(t *testing.T, path string) int64 {
	t.Helper()
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var rss int64
	in := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) == 0 {
			continue
		}
		if strings.Contains(fields[0], "-") && !strings.HasSuffix(fields[0], ":") {
			// A mapping's first line: range, perms, offset, dev, inode, path.
			in = len(fields) >= 6 && fields[5] == path
			continue
		}
		if in && fields[0] == "Rss:" {
			kb, err := strconv.ParseInt(fields[1], 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			rss += kb << 10
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return rss
}

func TestDropMappedPagesLeavesTheDataReadable(t *testing.T) {
	ts := newTestStore(t)
	path := filepath.Join(ts.dir, "member.db")
	value := strings.Repeat("v", 256)
	const keys = 4000
	for i := 0; i < keys; i += 100 {
		var reqs []Request
		for j := i; j < i+100; j++ {
			reqs = append(reqs, set(fmt.Sprintf("/d%02d/k%d", j%10, j), value))
		}
		ts.apply(reqs...)
	}
	// Reading every key maps every page of the keyspace.
	for i := range keys {
		if e := ts.mustGet(fmt.Sprintf("/d%02d/k%d", i%10, i), false); e.Node.Value == nil || *e.Node.Value != value {
			t.Fatalf("k%d: %+v", i, e.Node)
		}
	}
	before := mappedRSS(t, path)
	if before < 1<<20 {
		t.Fatalf("only %d bytes of member.db resident after reading %d keys of %d bytes", before, keys, len(value))
	}
	if err := ts.DropMappedPages(); err != nil {
		t.Fatal(err)
	}
	if after := mappedRSS(t, path); after > 64<<10 {
		t.Fatalf("%d bytes of member.db still resident after DropMappedPages (%d before)", after, before)
	}
	// The pages come back from the file as they are read, and writes go on.
	for i := range keys {
		if e := ts.mustGet(fmt.Sprintf("/d%02d/k%d", i%10, i), false); e.Node.Value == nil || *e.Node.Value != value {
			t.Fatalf("k%d after the drop: %+v", i, e.Node)
		}
	}
	ts.mustDo(set("/d00/k0", "new"))
	if e := ts.mustGet("/d00/k0", false); *e.Node.Value != "new" {
		t.Fatalf("after a write: %+v", e.Node)
	}
	ts.reopen()
	if e := ts.mustGet("/d00/k0", false); *e.Node.Value != "new" {
		t.Fatalf("after reopening: %+v", e.Node)
	}
	if err := ts.Close(); err != nil {
		t.Fatal(err)
	}
	if err := ts.DropMappedPages(); err != ErrClosed {
		t.Fatalf("DropMappedPages on a closed store: %v, want ErrClosed", err)
	}
}
