package caddymodule

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// lossyMapperEnv names the file a child process of
// TestLossyFSMappingSeesEveryWrite maps and writes.
const lossyMapperEnv = "ETCADDY_LOSSY_MAPPER"

// A child of TestLossyFSMappingSeesEveryWrite does its work and exits
// before any test starts: the file system it reads is served by its parent,
// and a process must not fault in pages of a FUSE file system it serves
// itself (a thread stuck in the fault holds up the Go runtime the server
// needs).
func init() {
	if file := os.Getenv(lossyMapperEnv); file != "" {
		os.Exit(lossyMapper(file))
	}
}

// lossyMapperResult is what the child reports on its standard output.
type lossyMapperResult struct {
	Writes, Reads, Opens, Stale int64
	Example                     string // the first stale read
}

// TestLossyFSMappingSeesEveryWrite checks that the lossy disk keeps the
// page cache above it as a local file system does, the way a member uses
// its file: a child process maps a file of the mount, writes pages of it
// with pwrite and reads them through the mapping while the file is opened
// again and its attributes read (a member opens member.db again to stream a
// snapshot, and stats it as it grows). Every read through the mapping must
// show at least the last write that returned before it. With FUSE's
// default cache handling it does not: each open and each mtime seen to
// change drop the file's pages, and a page faulted in again before a write
// under way reaches the server is the old one, for good.
func TestLossyFSMappingSeesEveryWrite(t *testing.T) {
	mnt := t.TempDir()
	mountLossyFS(t, t.TempDir(), mnt)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	child := exec.CommandContext(ctx, os.Args[0]) // killed by its PID if it overstays
	child.Env = append(os.Environ(), lossyMapperEnv+"="+filepath.Join(mnt, "mapped"))
	var stderr bytes.Buffer
	child.Stderr = &stderr
	out, err := child.Output()
	if err != nil {
		t.Fatalf("the mapping process: %v\n%s", err, stderr.String())
	}
	var r lossyMapperResult
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("the mapping process's report %q: %v", out, err)
	}
	t.Logf("%d writes, %d reads through the mapping, %d opens and stats meanwhile, %d stale", r.Writes, r.Reads, r.Opens, r.Stale)
	if r.Reads == 0 || r.Opens == 0 {
		t.Fatalf("the mapping process read %d times and opened the file %d times while writing: no test", r.Reads, r.Opens)
	}
	if r.Stale != 0 {
		t.Fatalf("%d reads through the mapping showed a page older than a write that had returned, first: %s", r.Stale, r.Example)
	}
}

// lossyMapper is the child's work: writes to file while another goroutine
// reads it through a mapping and a third opens and stats it. It reports a
// lossyMapperResult and returns the exit code.
func lossyMapper(file string) int {
	const (
		pages     = 64
		page      = 4096
		writes    = 5000
		syncEvery = 256 // the lossy disk keeps each write until a sync
	)
	fail := func(err error) int {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	f, err := os.OpenFile(file, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fail(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(make([]byte, pages*page), 0); err != nil {
		return fail(err)
	}
	m, err := syscall.Mmap(int(f.Fd()), 0, pages*page, syscall.PROT_READ, syscall.MAP_SHARED)
	if err != nil {
		return fail(err)
	}
	defer syscall.Munmap(m)

	var (
		written [pages]atomic.Uint64 // per page, the version of its last write that returned
		done    = make(chan struct{})
		r       lossyMapperResult
		wg      sync.WaitGroup
		werr    error // the writer's
		oerr    error // the opener's
	)
	wg.Add(3)
	go func() { // the writer: version v into a random page, whole
		defer wg.Done()
		defer close(done)
		buf := make([]byte, page)
		for v := uint64(1); v <= writes; v++ {
			i := rand.IntN(pages)
			for j := 0; j < page; j += 8 {
				binary.LittleEndian.PutUint64(buf[j:], v)
			}
			if _, werr = f.WriteAt(buf, int64(i*page)); werr != nil {
				return
			}
			written[i].Store(v)
			r.Writes++
			if v%syncEvery == 0 {
				if werr = f.Sync(); werr != nil {
					return
				}
			}
		}
	}()
	// whileWriting runs step again and again until the writer is done or
	// step says stop.
	whileWriting := func(step func() bool) {
		defer wg.Done()
		for {
			select {
			case <-done:
				return
			default:
			}
			if !step() {
				return
			}
		}
	}
	go whileWriting(func() bool { // the reader, through the mapping
		i := rand.IntN(pages)
		want := written[i].Load()
		first := binary.LittleEndian.Uint64(m[i*page:])
		last := binary.LittleEndian.Uint64(m[i*page+page-8:])
		r.Reads++
		if min(first, last) < want {
			if r.Stale == 0 {
				r.Example = fmt.Sprintf("page %d: version %d at its start, %d at its end, after version %d was written", i, first, last, want)
			}
			r.Stale++
		}
		return true
	})
	go whileWriting(func() bool { // the file opened again and its attributes read, as a member does
		g, err := os.Open(file)
		if err != nil {
			oerr = err
			return false
		}
		g.Close()
		if _, oerr = os.Stat(file); oerr != nil {
			return false
		}
		r.Opens++
		return true
	})
	wg.Wait()
	if err := errors.Join(werr, oerr); err != nil {
		return fail(err)
	}
	if err := json.NewEncoder(os.Stdout).Encode(r); err != nil {
		return fail(err)
	}
	return 0
}
