package caddymodule

import (
	"context"
	"fmt"
	"io/fs"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// lossyFS is a FUSE file system over a real directory that can lose power: it
// passes every operation through to the directory (so a process on the mount
// reads, maps and writes real files; locks stay the kernel's own), and it
// remembers each file's writes and size changes since that file's last fsync
// or fdatasync. powerCut puts every such file back the way a disk may hold it
// after power fails: its synced contents, with any subset of the later
// writes, each cut into 4 KiB pieces that persist or not independently of
// the others and of their order. It is no stand-in for a part of etcaddy: it
// is the disk under it, the one part a test cannot unplug here (no
// device-mapper in this kernel). A directory's changes (files created,
// renamed, removed, directories made) are kept the same way until the
// directory's fsync, and a power cut keeps a random prefix of them, in order,
// as a journaling file system replays its journal. What it does not model:
// renames between directories and directories removed survive at once, and
// the kernel's page cache above the mount is not what is lost (the process
// is killed first).
//
// That page cache is kept as a local file system keeps its own: every change
// to a file of the mount comes through the mount (the directory under it is
// touched only while it is unmounted, by powerCut), so the kernel's pages are
// always the file's, and it is told so: each open keeps them
// (FOPEN_KEEP_CACHE) and a changed mtime does not drop them (explicit data
// cache control). FUSE's default drops a file's pages at each open and at
// each mtime it sees change, and a write goes out to the server after its
// bytes went into the page: a page dropped in between and faulted in again
// through a mapping is read from the server before the write reaches it, and
// the mapping keeps the old bytes. A member's bbolt file, mapped, written and
// opened again to stream a snapshot, then read stale pages (missing keys, a
// freelist that handed out a page in use) from a file that held together:
// TestLossyFSMappingSeesEveryWrite.
type lossyFS struct {
	backing, mnt string
	server       *fuse.Server

	stash   string // hard links to the files a pending rename or unlink replaced
	stashed int

	mu    sync.Mutex
	files map[uint64]*lossyFile   // by the backing file's inode number
	dirs  map[string][]lossyDirOp // by the backing directory's path: changes since its last fsync
	off   bool                    // the power is off: nothing more reaches the disk
}

// lossyDirOp is a change to a directory, with what undoes it: a file created
// at to (from empty), a directory made at to (mkdir), renamed from from to
// to, or removed from from. stash, when set, is a hard link to the file the
// change took away (the one removed, or the one a rename replaced).
type lossyDirOp struct {
	from, to, stash string
	mkdir           bool
}

// lossyFile is what one file went through since its last sync.
type lossyFile struct {
	ops   []lossyOp
	undos []lossyOp // before each op, what it replaced: the synced contents come back by undoing them in reverse
}

// lossyOp is a write (data at off) or a size change (size, data nil). As an
// undo it is the bytes a write replaced and the size before it.
type lossyOp struct {
	off  int64
	data []byte
	size int64 // the size the file had (undo) or gets (a size change); -1: unchanged
}

// mountLossyFS mounts a lossyFS of backing at mnt until the test ends.
func mountLossyFS(t testing.TB, backing, mnt string) *lossyFS {
	t.Helper()
	lossySweep.Do(func() { detachDeadLossyMounts(t) })
	l := &lossyFS{backing: backing, mnt: mnt, stash: t.TempDir(),
		files: make(map[uint64]*lossyFile), dirs: make(map[string][]lossyDirOp)}
	l.mount(t)
	t.Cleanup(func() {
		if err := l.unmount(); err != nil {
			t.Errorf("the lossy file system: %v", err)
		}
	})
	return l
}

func (l *lossyFS) mount(t testing.TB) {
	t.Helper()
	root := &lossyNode{LoopbackNode: &gofs.LoopbackNode{RootData: &gofs.LoopbackRoot{Path: l.backing}}, l: l}
	zero := time.Duration(0)
	server, err := gofs.Mount(l.mnt, root, &gofs.Options{
		// No attribute cache: a size the file system reports is the backing file's.
		AttrTimeout: &zero, EntryTimeout: &zero,
		MountOptions: fuse.MountOptions{
			FsName: "lossyfs", Name: "lossyfs",
			// The test runs as root (as CI does): the mount syscall itself, no fusermount.
			DirectMount: true, DirectMountStrict: true,
			// The kernel's pages of a file stay its own (see lossyFS).
			ExplicitDataCacheControl: true,
		},
	})
	if err != nil {
		t.Fatalf("mounting the lossy file system at %s (needs root and /dev/fuse): %v", l.mnt, err)
	}
	l.server = server
}

var lossySweep sync.Once

// detachDeadLossyMounts detaches the lossy file systems a test process that
// was killed left mounted (its cleanup never ran): their server is gone, so
// every access to them fails with ENOTCONN. Those of a test process that
// still runs answer, and are left alone.
func detachDeadLossyMounts(t testing.TB) {
	info, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Logf("looking for dead lossy file systems: %v", err)
		return
	}
	for _, line := range strings.Split(string(info), "\n") {
		// mount ID, parent ID, major:minor, root, mount point, options,
		// optional fields up to "-", then the file system type.
		fields := strings.Fields(line)
		sep := slices.Index(fields, "-")
		if len(fields) < 5 || sep < 0 || sep+1 >= len(fields) || fields[sep+1] != "fuse.lossyfs" {
			continue
		}
		mnt := unescapeMountinfo(fields[4])
		var st syscall.Stat_t
		if err := syscall.Stat(mnt, &st); err != syscall.ENOTCONN {
			continue
		}
		if err := syscall.Unmount(mnt, syscall.MNT_DETACH); err != nil {
			t.Logf("detaching the dead lossy file system at %s: %v", mnt, err)
			continue
		}
		t.Logf("detached the dead lossy file system at %s (left by a test process that was killed)", mnt)
	}
}

// unescapeMountinfo undoes mountinfo's octal escapes (\040 for a space).
func unescapeMountinfo(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// unmount unmounts the file system. It fails while the kernel still has a
// file of the mount open (a killed process's files close asynchronously):
// it tries for a while, then detaches the mount (it goes once unused) and
// returns the error.
func (l *lossyFS) unmount() error {
	if l.server == nil {
		return nil
	}
	var err error
	if !poll(30*time.Second, func() bool { err = l.server.Unmount(); return err == nil }) {
		if derr := syscall.Unmount(l.mnt, syscall.MNT_DETACH); derr != nil {
			return fmt.Errorf("unmounting %s: %v; detaching it: %v", l.mnt, err, derr)
		}
		l.server = nil
		return fmt.Errorf("unmounting %s: %v (detached)", l.mnt, err)
	}
	l.server = nil
	return nil
}

// powerOff cuts the power: from now on every write and sync of the mount
// fails (EIO) and changes nothing, and a sync under way when it came does not
// complete. Kill the process on the mount right after, then call powerCut.
func (l *lossyFS) powerOff() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.off = true
}

// powerCut is what the power failure left: the process on the mount must be
// dead, and powerOff called before its death. It unmounts, puts every file
// with unsynced changes back to what the disk may hold, and mounts again. rng
// decides which pieces made it, but when there were any, one at least is lost.
// It returns how many pieces of writes were lost and how many survived.
func (l *lossyFS) powerCut(t testing.TB, rng *rand.Rand) (lost, kept int) {
	t.Helper()
	if err := l.unmount(); err != nil {
		t.Fatalf("the lossy file system stays busy after its process died: %v", err)
	}
	// The directories first: the files' contents are put back by inode
	// wherever their names end up.
	l.mu.Lock()
	// In a fixed order, so that the seed a test logs replays the cut.
	for _, dir := range slices.Sorted(maps.Keys(l.dirs)) {
		ops := l.dirs[dir]
		keep := rng.IntN(len(ops) + 1)
		for i := len(ops) - 1; i >= keep; i-- {
			lossyUndoDirOp(t, ops[i])
		}
	}
	l.dirs = make(map[string][]lossyDirOp)
	l.mu.Unlock()
	paths := make(map[uint64]string)
	err := filepath.WalkDir(l.backing, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		var st syscall.Stat_t
		if err := syscall.Lstat(p, &st); err != nil {
			return err
		}
		paths[st.Ino] = p
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	// The pieces, file by file in the order they were made, and which persist.
	type piece struct {
		ino uint64
		op  lossyOp
	}
	var pieces []piece
	inos := slices.Sorted(maps.Keys(l.files))
	for _, ino := range inos {
		lf := l.files[ino]
		if _, ok := paths[ino]; !ok {
			continue // removed since
		}
		for _, op := range lf.ops {
			if op.data == nil {
				pieces = append(pieces, piece{ino, op})
				continue
			}
			for start := op.off; start < op.off+int64(len(op.data)); {
				end := min((start/4096+1)*4096, op.off+int64(len(op.data)))
				pieces = append(pieces, piece{ino, lossyOp{off: start, data: op.data[start-op.off : end-op.off], size: -1}})
				start = end
			}
		}
	}
	persists := make([]bool, len(pieces))
	for i := range persists {
		persists[i] = rng.IntN(2) == 0
	}
	// One piece of data at least is lost when any was unsynced (a size
	// change alone may change nothing).
	var data []int
	lostData := false
	for i, pc := range pieces {
		if pc.op.data != nil {
			data = append(data, i)
			lostData = lostData || !persists[i]
		}
	}
	if len(data) > 0 && !lostData {
		persists[data[rng.IntN(len(data))]] = false
	}
	for _, ino := range inos {
		lf := l.files[ino]
		p, ok := paths[ino]
		if !ok || len(lf.ops) == 0 {
			continue
		}
		f, err := os.OpenFile(p, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		for i := len(lf.undos) - 1; i >= 0; i-- {
			lossyApply(t, f, lf.undos[i])
		}
		for i, pc := range pieces {
			if pc.ino != ino {
				continue
			}
			switch {
			case !persists[i] && pc.op.data != nil:
				lost++
			case persists[i]:
				if pc.op.data != nil {
					kept++
				}
				lossyApply(t, f, pc.op)
			}
		}
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
	}
	l.files = make(map[uint64]*lossyFile)
	l.off = false
	l.mount(t)
	return lost, kept
}

// lossyUndoDirOp puts a directory back as it was before op.
func lossyUndoDirOp(t testing.TB, op lossyDirOp) {
	t.Helper()
	var err error
	switch {
	case op.mkdir: // made, with everything made in it since
		err = os.RemoveAll(op.to)
	case op.from == "": // created
		err = os.Remove(op.to)
	case op.to == "": // removed
		err = os.Link(op.stash, op.from)
	default: // renamed
		if err = os.Rename(op.to, op.from); err == nil && op.stash != "" {
			err = os.Link(op.stash, op.to)
		}
	}
	if err != nil && !os.IsNotExist(err) {
		t.Fatalf("putting the directory back before %+v: %v", op, err)
	}
}

// changeDir makes a change to the directory dir (backing paths) by do, and
// records it as op once done. keep, when set, is a file the change takes
// away: it gets a hard link in the stash first. With the power off, nothing
// is done (EIO).
func (l *lossyFS) changeDir(dir string, op lossyDirOp, keep string, do func() syscall.Errno) syscall.Errno {
	l.mu.Lock()
	if l.off {
		l.mu.Unlock()
		return syscall.EIO
	}
	if keep != "" {
		l.stashed++
		stash := filepath.Join(l.stash, strconv.Itoa(l.stashed))
		if err := os.Link(keep, stash); err == nil {
			op.stash = stash
		} else if !os.IsNotExist(err) {
			l.mu.Unlock()
			return gofs.ToErrno(err)
		}
	}
	l.mu.Unlock()
	if errno := do(); errno != 0 {
		if op.stash != "" {
			os.Remove(op.stash)
		}
		return errno
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	// A change the power cut overtook persisted: it is left out.
	if !l.off && op != (lossyDirOp{}) {
		l.dirs[dir] = append(l.dirs[dir], op)
	}
	return 0
}

// lossySyncTime is how long a sync takes, as a disk's cache flush takes a
// while: a power cut (the kill) that lands meanwhile finds the sync not done,
// so most cuts of a member under load find a commit's writes unsynced.
const lossySyncTime = 2 * time.Millisecond

// sync is a sync(2) of a file or directory: after lossySyncTime, done notes
// what it made durable, unless the power went off first (EIO).
func (l *lossyFS) sync(done func()) syscall.Errno {
	time.Sleep(lossySyncTime) // the device's work, not a wait for a condition
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.off {
		return syscall.EIO
	}
	done()
	return 0
}

// lossyApply does op to f: a write, then a size change when op has one.
func lossyApply(t testing.TB, f *os.File, op lossyOp) {
	t.Helper()
	if len(op.data) > 0 {
		if _, err := f.WriteAt(op.data, op.off); err != nil {
			t.Fatal(err)
		}
	}
	if op.size >= 0 {
		if err := f.Truncate(op.size); err != nil {
			t.Fatal(err)
		}
	}
}

// record notes that fd (a backing file) is about to get op, with what op
// replaces as its undo.
func (l *lossyFS) record(fd int, op lossyOp) syscall.Errno {
	var st syscall.Stat_t
	if err := syscall.Fstat(fd, &st); err != nil {
		return gofs.ToErrno(err)
	}
	undo := lossyOp{off: op.off, size: -1}
	end := op.off + int64(len(op.data))
	if op.data == nil { // a size change: the bytes a shrink cuts off
		undo.off, end = op.size, st.Size
	}
	if end > st.Size {
		undo.size = st.Size // the write or growth extends the file
		end = st.Size
	}
	if op.data == nil && op.size != st.Size {
		undo.size = st.Size
	}
	if end > undo.off {
		undo.data = make([]byte, end-undo.off)
		if _, err := syscall.Pread(fd, undo.data, undo.off); err != nil {
			return gofs.ToErrno(err)
		}
	}
	if op.data != nil {
		op.data = append([]byte(nil), op.data...)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.off {
		return syscall.EIO
	}
	lf := l.files[st.Ino]
	if lf == nil {
		lf = &lossyFile{}
		l.files[st.Ino] = lf
	}
	lf.ops = append(lf.ops, op)
	lf.undos = append(lf.undos, undo)
	return 0
}

// lossyNode is the loopback node, with its files opened as lossyHandles.
type lossyNode struct {
	*gofs.LoopbackNode
	l *lossyFS
}

var (
	_ gofs.NodeWrapChilder = (*lossyNode)(nil)
	_ gofs.NodeOpener      = (*lossyNode)(nil)
	_ gofs.NodeCreater     = (*lossyNode)(nil)
	_ gofs.NodeMkdirer     = (*lossyNode)(nil)
	_ gofs.NodeSetattrer   = (*lossyNode)(nil)
	_ gofs.NodeUnlinker    = (*lossyNode)(nil)
	_ gofs.NodeRenamer     = (*lossyNode)(nil)
	_ gofs.NodeTmpfiler    = (*lossyNode)(nil)
	_ gofs.NodeLinker      = (*lossyNode)(nil)
	_ gofs.NodeMknoder     = (*lossyNode)(nil)
	_ gofs.NodeSymlinker   = (*lossyNode)(nil)

	_ gofs.NodeOpendirHandler = (*lossyNode)(nil)
)

func (n *lossyNode) WrapChild(ctx context.Context, ops gofs.InodeEmbedder) gofs.InodeEmbedder {
	return &lossyNode{LoopbackNode: ops.(*gofs.LoopbackNode), l: n.l}
}

func (n *lossyNode) Open(ctx context.Context, flags uint32) (gofs.FileHandle, uint32, syscall.Errno) {
	fh, fl, errno := n.LoopbackNode.Open(ctx, flags)
	if errno != 0 {
		return nil, 0, errno
	}
	return &lossyHandle{f: fh.(*gofs.LoopbackFile), l: n.l}, fl | fuse.FOPEN_KEEP_CACHE, 0
}

// dir is the node's path in the backing directory.
func (n *lossyNode) dir() string { return filepath.Join(n.RootData.Path, n.Path(nil)) }

func (n *lossyNode) Create(ctx context.Context, name string, flags, mode uint32, out *fuse.EntryOut) (*gofs.Inode, gofs.FileHandle, uint32, syscall.Errno) {
	p := filepath.Join(n.dir(), name)
	_, err := os.Lstat(p)
	op := lossyDirOp{to: p} // a file made now is gone again if the directory is not synced
	if !os.IsNotExist(err) {
		op = lossyDirOp{} // an open of one that is there: no change
	}
	var (
		in *gofs.Inode
		fh gofs.FileHandle
		fl uint32
	)
	errno := n.l.changeDir(n.dir(), op, "", func() (errno syscall.Errno) {
		in, fh, fl, errno = n.LoopbackNode.Create(ctx, name, flags, mode, out)
		return errno
	})
	if errno != 0 {
		return nil, nil, 0, errno
	}
	return in, &lossyHandle{f: fh.(*gofs.LoopbackFile), l: n.l}, fl | fuse.FOPEN_KEEP_CACHE, 0
}

func (n *lossyNode) Unlink(ctx context.Context, name string) syscall.Errno {
	p := filepath.Join(n.dir(), name)
	return n.l.changeDir(n.dir(), lossyDirOp{from: p}, p, func() syscall.Errno {
		return n.LoopbackNode.Unlink(ctx, name)
	})
}

// Mkdir records the directory made: until its parent is synced, a power cut
// may take it away, and all that was made in it since.
func (n *lossyNode) Mkdir(ctx context.Context, name string, mode uint32, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	var in *gofs.Inode
	errno := n.l.changeDir(n.dir(), lossyDirOp{to: filepath.Join(n.dir(), name), mkdir: true}, "", func() (errno syscall.Errno) {
		in, errno = n.LoopbackNode.Mkdir(ctx, name, mode, out)
		return errno
	})
	return in, errno
}

// Rename records a rename within one directory (the only kind etcaddy makes);
// one between directories survives at once.
func (n *lossyNode) Rename(ctx context.Context, name string, newParent gofs.InodeEmbedder, newName string, flags uint32) syscall.Errno {
	do := func() syscall.Errno { return n.LoopbackNode.Rename(ctx, name, newParent, newName, flags) }
	if np, ok := newParent.(*lossyNode); ok && np.dir() == n.dir() && flags == 0 {
		from, to := filepath.Join(n.dir(), name), filepath.Join(n.dir(), newName)
		return n.l.changeDir(n.dir(), lossyDirOp{from: from, to: to}, to, do)
	}
	return do()
}

// The ways to make a file that the model does not follow are refused:
// etcaddy uses none of them.

func (n *lossyNode) Tmpfile(ctx context.Context, flags, mode uint32, out *fuse.EntryOut) (*gofs.Inode, gofs.FileHandle, uint32, syscall.Errno) {
	return nil, nil, 0, syscall.ENOTSUP
}

func (n *lossyNode) Link(ctx context.Context, target gofs.InodeEmbedder, name string, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	return nil, syscall.ENOTSUP
}

func (n *lossyNode) Mknod(ctx context.Context, name string, mode, dev uint32, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	return nil, syscall.ENOTSUP
}

func (n *lossyNode) Symlink(ctx context.Context, target, name string, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	return nil, syscall.ENOTSUP
}

// OpendirHandle hands out the loopback's directory stream with its fsync
// recorded instead of done.
func (n *lossyNode) OpendirHandle(ctx context.Context, flags uint32) (gofs.FileHandle, uint32, syscall.Errno) {
	fh, fl, errno := n.LoopbackNode.OpendirHandle(ctx, flags)
	if errno != 0 {
		return nil, 0, errno
	}
	return &lossyDirHandle{ds: fh, dir: n.dir(), l: n.l}, fl, 0
}

// lossyDirHandle is an open directory of a lossyFS.
type lossyDirHandle struct {
	ds  gofs.FileHandle // the loopback's directory stream
	dir string
	l   *lossyFS
}

var (
	_ gofs.FileReaddirenter = (*lossyDirHandle)(nil)
	_ gofs.FileSeekdirer    = (*lossyDirHandle)(nil)
	_ gofs.FileReleasedirer = (*lossyDirHandle)(nil)
	_ gofs.FileFsyncdirer   = (*lossyDirHandle)(nil)
)

func (h *lossyDirHandle) Readdirent(ctx context.Context) (*fuse.DirEntry, syscall.Errno) {
	return h.ds.(gofs.FileReaddirenter).Readdirent(ctx)
}

func (h *lossyDirHandle) Seekdir(ctx context.Context, off uint64) syscall.Errno {
	return h.ds.(gofs.FileSeekdirer).Seekdir(ctx, off)
}

func (h *lossyDirHandle) Releasedir(ctx context.Context, flags uint32) {
	h.ds.(gofs.FileReleasedirer).Releasedir(ctx, flags)
}

// Fsyncdir makes the directory's changes durable (and drops the links the
// stash kept for undoing them).
func (h *lossyDirHandle) Fsyncdir(ctx context.Context, flags uint32) syscall.Errno {
	return h.l.sync(func() {
		for _, op := range h.l.dirs[h.dir] {
			if op.stash != "" {
				os.Remove(op.stash)
			}
		}
		delete(h.l.dirs, h.dir)
	})
}

// Setattr records a size change made by path (truncate(2)); one made through
// an open file (ftruncate(2)) comes to the lossyHandle.
func (n *lossyNode) Setattr(ctx context.Context, fh gofs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if size, ok := in.GetSize(); ok && fh == nil {
		fd, err := syscall.Open(filepath.Join(n.RootData.Path, n.Path(nil)), syscall.O_RDONLY, 0)
		if err != nil {
			return gofs.ToErrno(err)
		}
		errno := n.l.record(fd, lossyOp{off: int64(size), size: int64(size)})
		syscall.Close(fd)
		if errno != 0 {
			return errno
		}
	}
	return n.LoopbackNode.Setattr(ctx, fh, in, out)
}

// lossyHandle is an open file of a lossyFS: the loopback file, with its writes,
// size changes and syncs recorded. It offers the kernel no passthrough, so
// every write comes through Write.
type lossyHandle struct {
	f *gofs.LoopbackFile
	l *lossyFS
}

var (
	_ gofs.FileReader    = (*lossyHandle)(nil)
	_ gofs.FileWriter    = (*lossyHandle)(nil)
	_ gofs.FileFsyncer   = (*lossyHandle)(nil)
	_ gofs.FileSetattrer = (*lossyHandle)(nil)
	_ gofs.FileGetattrer = (*lossyHandle)(nil)
	_ gofs.FileFlusher   = (*lossyHandle)(nil)
	_ gofs.FileReleaser  = (*lossyHandle)(nil)
	_ gofs.FileLseeker   = (*lossyHandle)(nil)
)

// fd is the backing file's descriptor (the loopback file hands it out as
// its passthrough descriptor; passthrough itself stays off).
func (h *lossyHandle) fd() (int, syscall.Errno) {
	fd, ok := h.f.PassthroughFd()
	if !ok {
		return -1, syscall.EBADF
	}
	return fd, 0
}

func (h *lossyHandle) Read(ctx context.Context, buf []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	return h.f.Read(ctx, buf, off)
}

func (h *lossyHandle) Write(ctx context.Context, data []byte, off int64) (uint32, syscall.Errno) {
	fd, errno := h.fd()
	if errno != 0 {
		return 0, errno
	}
	if errno := h.l.record(fd, lossyOp{off: off, data: data, size: -1}); errno != 0 {
		return 0, errno
	}
	return h.f.Write(ctx, data, off)
}

// Fsync is fsync(2) and fdatasync(2) alike: the file's data is on the disk.
// The backing file is not synced: the test's own disk never loses power.
func (h *lossyHandle) Fsync(ctx context.Context, flags uint32) syscall.Errno {
	fd, errno := h.fd()
	if errno != 0 {
		return errno
	}
	var st syscall.Stat_t
	if err := syscall.Fstat(fd, &st); err != nil {
		return gofs.ToErrno(err)
	}
	return h.l.sync(func() { delete(h.l.files, st.Ino) })
}

func (h *lossyHandle) Setattr(ctx context.Context, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if size, ok := in.GetSize(); ok {
		fd, errno := h.fd()
		if errno != 0 {
			return errno
		}
		if errno := h.l.record(fd, lossyOp{off: int64(size), size: int64(size)}); errno != 0 {
			return errno
		}
	}
	return h.f.Setattr(ctx, in, out)
}

func (h *lossyHandle) Getattr(ctx context.Context, out *fuse.AttrOut) syscall.Errno {
	return h.f.Getattr(ctx, out)
}

func (h *lossyHandle) Flush(ctx context.Context) syscall.Errno { return h.f.Flush(ctx) }

func (h *lossyHandle) Release(ctx context.Context) syscall.Errno { return h.f.Release(ctx) }

func (h *lossyHandle) Lseek(ctx context.Context, off uint64, whence uint32) (uint64, syscall.Errno) {
	return h.f.Lseek(ctx, off, whence)
}
