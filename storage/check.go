package storage

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"os"
	"time"
)

// ErrDamaged is returned by Open for a member.db whose pages do not hold
// together: a file cut short, pages overwritten, a tree that points
// outside itself.
var ErrDamaged = errors.New("storage: member.db is damaged")

// ErrLocked is returned by Open when another process holds member.db.
var ErrLocked = errors.New("storage: member.db is in use by another process (another Caddy serving the same data_dir?)")

// How long Open waits for another process to let go of member.db.
const (
	lockTimeout = time.Second
	lockRetry   = 50 * time.Millisecond
)

// checkOpenFile checks f (checkFile) unless it is empty: bbolt makes a new
// database of an empty file.
func checkOpenFile(f *os.File) error {
	info, err := f.Stat()
	if err != nil {
		return err
	}
	if info.Size() == 0 {
		return nil
	}
	return checkFile(f, info.Size())
}

// checkFile walks every page of the bbolt file f, of size bytes, that its
// meta page reaches, reading the file with pread, and reports the first page that
// does not hold together (see ErrDamaged).
//
// bbolt does the same walk when it opens a file whose freelist it rebuilds
// (NoFreelistSync), and bbolt's Tx.Check does it too, but on a goroutine of
// its own that reads the pages through the memory mapping: a damaged page
// there panics, or faults (SIGBUS past the end of a cut file), beyond any
// recover, and takes the whole process down, Caddy and every site in it.
// This walk goes first, reads nothing through the mapping, and turns the
// same damage into an error. It checks what bbolt's walk relies on: each
// page inside the file and below the high-water mark, labelled with its own
// ID, a branch or a leaf, reached once, its elements inside it, keys in
// order; buckets within leaves are walked too, inline ones included.
//
// The format is bbolt's (version 2), in the machine's byte order as bbolt
// writes it.
func checkFile(f *os.File, size int64) error {
	c := &fileCheck{f: f, size: size}
	if err := c.readMeta(); err != nil {
		return err
	}
	if err := c.walkBucket(c.root, nil); err != nil {
		return err
	}
	// A freelist bbolt reads at open must name no page the tree reaches:
	// bbolt would hand that page out again, and the next commit that
	// writes there would damage the tree.
	for _, id := range c.free {
		if id < firstNonMetaPage || id >= c.hwm {
			return fmt.Errorf("%w: the freelist names page %d, outside the pages in use (%d)", ErrDamaged, id, c.hwm)
		}
		if c.seen[id/64]&(1<<(id%64)) != 0 {
			return fmt.Errorf("%w: page %d is both in the freelist and in use", ErrDamaged, id)
		}
	}
	return nil
}

// Layout of bbolt's pages (internal/common of go.etcd.io/bbolt).
const (
	boltMagic        = 0xED0CDAED
	boltVersion      = 2
	pageHeaderSize   = 16 // id uint64, flags uint16, count uint16, overflow uint32
	pageElementSize  = 16 // branch: pos, ksize uint32, pgid uint64; leaf: flags, pos, ksize, vsize uint32
	metaChecksumEnd  = 56 // the meta's checksum covers its first 56 bytes
	metaSize         = 64
	inBucketSize     = 16 // root pgid uint64, sequence uint64
	branchPageFlag   = 0x01
	leafPageFlag     = 0x02
	freelistPageFlag = 0x10
	noFreelist       = 1<<64 - 1 // the meta's freelist with NoFreelistSync
	bucketLeafFlag   = 0x01
	minBoltPageSize  = 1 << 10
	maxBoltPageSize  = 1 << 24 // the largest page size bbolt looks for a meta page at
	firstNonMetaPage = 2
)

type fileCheck struct {
	f        *os.File
	size     int64
	pageSize int64
	hwm      uint64 // the meta's page high-water mark: pages below it exist
	root     uint64 // root page of the root bucket
	seen     []uint64
	free     []uint64 // the IDs a synced freelist names
	buf      []byte
}

var le = binary.NativeEndian

// readMeta picks the meta page bbolt would: the valid one of the two with
// the higher transaction ID.
func (c *fileCheck) readMeta() error {
	head := make([]byte, pageHeaderSize+metaSize)
	if _, err := c.f.ReadAt(head, 0); err != nil {
		return fmt.Errorf("%w: reading its first meta page: %v", ErrDamaged, err)
	}
	m0, ok0 := parseMeta(head[pageHeaderSize:])
	// The second meta page sits one page in: its size comes from the first
	// meta when that one is valid, else every size bbolt allows is tried.
	sizes := []int64{int64(m0.pageSize)}
	if !ok0 {
		sizes = sizes[:0]
		for s := int64(minBoltPageSize); s <= maxBoltPageSize; s *= 2 {
			sizes = append(sizes, s)
		}
	}
	var m1 boltMeta
	ok1 := false
	for _, s := range sizes {
		if _, err := c.f.ReadAt(head, s); err != nil {
			continue
		}
		if m, ok := parseMeta(head[pageHeaderSize:]); ok && int64(m.pageSize) == s {
			m1, ok1 = m, true
			break
		}
	}
	var m boltMeta
	switch {
	case ok0 && ok1:
		m = m0
		if m1.txid > m0.txid {
			m = m1
		}
	case ok0:
		m = m0
	case ok1:
		m = m1
	default:
		return fmt.Errorf("%w: neither meta page is valid", ErrDamaged)
	}
	c.pageSize = int64(m.pageSize)
	if c.pageSize < minBoltPageSize || c.pageSize > maxBoltPageSize {
		return fmt.Errorf("%w: page size %d", ErrDamaged, m.pageSize)
	}
	c.hwm, c.root = m.pgid, m.root
	if c.hwm < firstNonMetaPage || int64(c.hwm) > c.size/c.pageSize {
		return fmt.Errorf("%w: its meta page counts %d pages of %d bytes, the file holds %d bytes",
			ErrDamaged, c.hwm, c.pageSize, c.size)
	}
	c.seen = make([]uint64, (c.hwm+63)/64)
	if m.freelist != noFreelist {
		// A file bbolt made but never committed to holds the freelist page
		// of its creation, which bbolt reads at open.
		if err := c.checkFreelist(m.freelist); err != nil {
			return err
		}
	}
	return nil
}

// checkFreelist checks the freelist page id: inside the file, labelled as
// a freelist, its count of page IDs inside it; it keeps the IDs, which
// checkFile checks against the tree once walked.
func (c *fileCheck) checkFreelist(id uint64) error {
	if id < firstNonMetaPage || id >= c.hwm {
		return fmt.Errorf("%w: freelist page %d is out of bounds (the file has %d)", ErrDamaged, id, c.hwm)
	}
	p, err := c.readPage(id)
	if err != nil {
		return err
	}
	if flags := le.Uint16(p[8:]); flags != freelistPageFlag {
		return fmt.Errorf("%w: freelist page %d has type %#x", ErrDamaged, id, flags)
	}
	// A count of 0xFFFF means the real count is the first ID's slot.
	n, at := uint64(le.Uint16(p[10:])), uint64(pageHeaderSize)
	if n == 0xFFFF {
		if len(p) < pageHeaderSize+8 {
			return fmt.Errorf("%w: freelist page %d is cut short", ErrDamaged, id)
		}
		n, at = le.Uint64(p[pageHeaderSize:]), pageHeaderSize+8
	}
	if n > (uint64(len(p))-at)/8 {
		return fmt.Errorf("%w: freelist page %d counts %d pages, more than it holds", ErrDamaged, id, n)
	}
	c.free = make([]uint64, n)
	for i := range c.free {
		c.free[i] = le.Uint64(p[at+uint64(i)*8:])
	}
	return nil
}

type boltMeta struct {
	pageSize             uint32
	root, freelist, pgid uint64
	txid                 uint64
}

func parseMeta(b []byte) (boltMeta, bool) {
	if le.Uint32(b[0:]) != boltMagic || le.Uint32(b[4:]) != boltVersion {
		return boltMeta{}, false
	}
	h := fnv.New64a()
	h.Write(b[:metaChecksumEnd])
	if h.Sum64() != le.Uint64(b[metaChecksumEnd:]) {
		return boltMeta{}, false
	}
	return boltMeta{
		pageSize: le.Uint32(b[8:]),
		root:     le.Uint64(b[16:]),
		freelist: le.Uint64(b[32:]),
		pgid:     le.Uint64(b[40:]),
		txid:     le.Uint64(b[48:]),
	}, true
}

// walkBucket checks the tree of a bucket whose root page is root, or, for
// root 0, the inline page that follows the bucket header in value.
func (c *fileCheck) walkBucket(root uint64, inline []byte) error {
	if root == 0 {
		if len(inline) < pageHeaderSize {
			return fmt.Errorf("%w: an inline bucket of %d bytes", ErrDamaged, len(inline))
		}
		return c.walkElements(inline, 0, nil, nil)
	}
	return c.walkPage(root, nil, nil)
}

// walkPage checks page id and the subtree below it, whose keys must lie in
// [lo, hi) (nil: unbounded).
func (c *fileCheck) walkPage(id uint64, lo, hi []byte) error {
	if id < firstNonMetaPage || id >= c.hwm {
		return fmt.Errorf("%w: page %d is out of bounds (the file has %d)", ErrDamaged, id, c.hwm)
	}
	p, err := c.readPage(id)
	if err != nil {
		return err
	}
	return c.walkElements(p, id, lo, hi)
}

// readPage reads page id with its overflow pages and marks them reached.
// The bytes are valid until the next readPage.
func (c *fileCheck) readPage(id uint64) ([]byte, error) {
	ps := c.pageSize
	c.buf = growTo(c.buf, int(ps))
	if _, err := c.f.ReadAt(c.buf, int64(id)*ps); err != nil {
		return nil, fmt.Errorf("%w: reading page %d: %v", ErrDamaged, id, err)
	}
	if got := le.Uint64(c.buf); got != id {
		return nil, fmt.Errorf("%w: page %d says it is page %d", ErrDamaged, id, got)
	}
	overflow := uint64(le.Uint32(c.buf[12:]))
	if overflow >= c.hwm-id {
		return nil, fmt.Errorf("%w: page %d runs %d pages past the end", ErrDamaged, id, overflow)
	}
	for i := id; i <= id+overflow; i++ {
		if c.seen[i/64]&(1<<(i%64)) != 0 {
			return nil, fmt.Errorf("%w: page %d is reached twice", ErrDamaged, i)
		}
		c.seen[i/64] |= 1 << (i % 64)
	}
	if overflow > 0 {
		// Below the high-water mark, so inside the file (readMeta).
		c.buf = growTo(c.buf, int(int64(overflow+1)*ps))
		if _, err := c.f.ReadAt(c.buf, int64(id)*ps); err != nil {
			return nil, fmt.Errorf("%w: reading page %d: %v", ErrDamaged, id, err)
		}
	}
	return c.buf, nil
}

// hasBucket reports whether leaf page p holds a bucket.
func hasBucket(p []byte, count int) bool {
	for i := range count {
		if le.Uint32(p[pageHeaderSize+i*pageElementSize:])&bucketLeafFlag != 0 {
			return true
		}
	}
	return false
}

func growTo(b []byte, n int) []byte {
	if cap(b) < n {
		return make([]byte, n)
	}
	return b[:n]
}

// walkElements checks the elements of page p (id 0: an inline page) and
// walks what they point to.
func (c *fileCheck) walkElements(p []byte, id uint64, lo, hi []byte) error {
	flags, count := le.Uint16(p[8:]), int(le.Uint16(p[10:]))
	if pageHeaderSize+count*pageElementSize > len(p) {
		return fmt.Errorf("%w: page %d counts %d elements, more than it holds", ErrDamaged, id, count)
	}
	switch flags {
	case branchPageFlag:
		if id == 0 {
			return fmt.Errorf("%w: an inline bucket holds a branch page", ErrDamaged)
		}
		if count == 0 {
			// bbolt never writes one, and its cursor reads element 0 of a
			// branch page without looking at the count.
			return fmt.Errorf("%w: branch page %d is empty", ErrDamaged, id)
		}
	case leafPageFlag:
	default:
		return fmt.Errorf("%w: page %d has type %#x, neither branch nor leaf", ErrDamaged, id, flags)
	}
	if id != 0 && (flags == branchPageFlag || hasBucket(p, count)) {
		p = bytes.Clone(p) // the walk below reads other pages into c.buf
	}
	var prev []byte
	for i := range count {
		at := pageHeaderSize + i*pageElementSize
		e := p[at : at+pageElementSize]
		var key, value []byte
		var child uint64
		var elemFlags uint32
		if flags == branchPageFlag {
			pos, ksize := uint64(le.Uint32(e[0:])), uint64(le.Uint32(e[4:]))
			child = le.Uint64(e[8:])
			if uint64(at)+pos+ksize > uint64(len(p)) {
				return fmt.Errorf("%w: page %d: element %d lies outside it", ErrDamaged, id, i)
			}
			key = p[uint64(at)+pos : uint64(at)+pos+ksize]
		} else {
			elemFlags = le.Uint32(e[0:])
			pos, ksize, vsize := uint64(le.Uint32(e[4:])), uint64(le.Uint32(e[8:])), uint64(le.Uint32(e[12:]))
			if uint64(at)+pos+ksize+vsize > uint64(len(p)) {
				return fmt.Errorf("%w: page %d: element %d lies outside it", ErrDamaged, id, i)
			}
			key = p[uint64(at)+pos : uint64(at)+pos+ksize]
			value = p[uint64(at)+pos+ksize : uint64(at)+pos+ksize+vsize]
		}
		if len(key) == 0 {
			return fmt.Errorf("%w: page %d: key %d is empty", ErrDamaged, id, i) // bbolt refuses empty keys
		}
		if (prev != nil && bytes.Compare(prev, key) >= 0) || (lo != nil && bytes.Compare(key, lo) < 0) ||
			(hi != nil && bytes.Compare(key, hi) >= 0) {
			return fmt.Errorf("%w: page %d: key %d is out of order", ErrDamaged, id, i)
		}
		prev = key
		switch {
		case flags == branchPageFlag:
			next := hi
			if i+1 < count {
				ne := p[at+pageElementSize:]
				npos, nksize := uint64(le.Uint32(ne[0:])), uint64(le.Uint32(ne[4:]))
				if uint64(at+pageElementSize)+npos+nksize > uint64(len(p)) {
					return fmt.Errorf("%w: page %d: element %d lies outside it", ErrDamaged, id, i+1)
				}
				next = p[uint64(at+pageElementSize)+npos : uint64(at+pageElementSize)+npos+nksize]
			}
			if err := c.walkPage(child, key, next); err != nil {
				return err
			}
		case elemFlags&bucketLeafFlag != 0:
			if len(value) < inBucketSize {
				return fmt.Errorf("%w: page %d: bucket %d has a header of %d bytes", ErrDamaged, id, i, len(value))
			}
			root := le.Uint64(value)
			if root != 0 && id == 0 {
				return fmt.Errorf("%w: an inline bucket holds a bucket", ErrDamaged)
			}
			if err := c.walkBucket(root, value[inBucketSize:]); err != nil {
				return err
			}
		}
	}
	return nil
}
