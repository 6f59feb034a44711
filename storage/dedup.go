package storage

import (
	"encoding/binary"
	"fmt"

	bolt "go.etcd.io/bbolt"
	"go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"
)

// dedupKeep is how many applied request IDs are remembered: raftkv retries
// a proposal for a few seconds at most, far fewer entries than this.
var dedupKeep = 10000

// dedup is the set of the last dedupKeep request IDs applied, oldest first.
// Whether an entry is a duplicate decides whether it is applied, so every
// member must compute the same set from the same log: it is a function of
// the applied entries alone (an ID is remembered when its entry is applied
// and was no duplicate, and forgotten dedupKeep IDs later), and it is never
// written per commit. What makes it durable is the log itself plus a seed:
//
//   - the seed (bucketDedup) is the whole set as of some applied index,
//     written by Compact before it deletes entries, and into a received
//     snapshot file, from the leader's seed and log, before its log is
//     dropped (prepareSnapshotFile);
//   - Open replays, on top of the seed, the entries the log still holds
//     after the seed's index up to the applied index.
//
// Compact saves the seed at the applied index and deletes entries at or
// below its compaction index, which raftkv keeps below the applied index,
// so the replay finds every entry it needs. A snapshot file carries its own
// seed and log, from which the leader's set is rebuilt exactly.
type dedup struct {
	ids   []uint64 // remembered IDs, oldest first, from ids[head] on
	head  int      // ids[:head] are forgotten
	known idSet    // the IDs of ids[head:]
}

func newDedup() *dedup { return &dedup{known: newIDSet(dedupKeep + 1)} }

func (d *dedup) has(id uint64) bool { return d.known.has(id) }

// add remembers id, which must not be remembered already, and forgets the
// oldest beyond dedupKeep.
func (d *dedup) add(id uint64) {
	d.ids = append(d.ids, id)
	d.known.add(id)
	for len(d.ids)-d.head > dedupKeep {
		d.known.remove(d.ids[d.head])
		d.head++
	}
	// Reclaim the forgotten prefix once it is as long as what is kept.
	if d.head > 0 && d.head >= len(d.ids)-d.head {
		d.ids = append(d.ids[:0], d.ids[d.head:]...)
		d.head = 0
	}
}

// idSet is a set of IDs in an open-addressing table with linear probing,
// which a FIFO of inserts and deletes at a steady size suits better than a
// map: a lookup is mostly one cache line, and a removal leaves no
// tombstone (the entries after it move back instead). 0 marks an empty
// slot, so the ID 0 is kept apart.
type idSet struct {
	slots []uint64 // a power of two, at least twice the IDs held
	shift uint     // 64 - log2(len(slots))
	zero  bool     // 0 is in the set
}

func newIDSet(n int) idSet {
	size, shift := 16, uint(60)
	for size < 2*n {
		size, shift = size*2, shift-1
	}
	return idSet{slots: make([]uint64, size), shift: shift}
}

// home is the slot where id's probe starts: Fibonacci hashing, since IDs
// differ mostly in their low bits.
func (s *idSet) home(id uint64) int { return int((id * 0x9e3779b97f4a7c15) >> s.shift) }

func (s *idSet) has(id uint64) bool {
	if id == 0 {
		return s.zero
	}
	mask := len(s.slots) - 1
	for i := s.home(id); ; i = (i + 1) & mask {
		switch s.slots[i] {
		case id:
			return true
		case 0:
			return false
		}
	}
}

// add inserts id, which must not be in the set; the table never holds more
// IDs than it was made for, so it always has empty slots.
func (s *idSet) add(id uint64) {
	if id == 0 {
		s.zero = true
		return
	}
	mask := len(s.slots) - 1
	i := s.home(id)
	for s.slots[i] != 0 {
		i = (i + 1) & mask
	}
	s.slots[i] = id
}

func (s *idSet) remove(id uint64) {
	if id == 0 {
		s.zero = false
		return
	}
	mask := len(s.slots) - 1
	i := s.home(id)
	for s.slots[i] != id {
		if s.slots[i] == 0 {
			return
		}
		i = (i + 1) & mask
	}
	// Move back each later entry of the run whose probe would otherwise
	// cross the hole: its home is not cyclically within (i, j].
	for j := (i + 1) & mask; s.slots[j] != 0; j = (j + 1) & mask {
		if h := s.home(s.slots[j]); (j-h)&mask >= (j-i)&mask {
			s.slots[i] = s.slots[j]
			i = j
		}
	}
	s.slots[i] = 0
}

// note is Save's check for one applied request: true if id was applied
// before (it must not be applied again); otherwise id is remembered.
func (d *dedup) note(id uint64) bool {
	if d.has(id) {
		return true
	}
	d.add(id)
	return false
}

// replay notes the requests of the log entries after index from up to
// index to (inclusive), as Save did when it applied them. Raft only commits
// entries it has appended, so the log holds all of them.
func (d *dedup) replay(log *bolt.Bucket, from, to uint64) error {
	if log == nil {
		return nil // a snapshot file has one, but only its meta is checked
	}
	var kb [8]byte
	c := log.Cursor()
	for k, v := c.Seek(logKey(&kb, from+1)); k != nil && binary.BigEndian.Uint64(k) <= to; k, v = c.Next() {
		var e raftpb.Entry
		if err := proto.Unmarshal(v, &e); err != nil {
			return fmt.Errorf("storage: damaged log entry %d: %w", binary.BigEndian.Uint64(k), err)
		}
		if e.GetType() != raftpb.EntryNormal || len(e.GetData()) == 0 {
			continue
		}
		// Save skips undecodable data without remembering anything.
		if r, err := UnmarshalRequest(e.GetData()); err == nil && r.ID != 0 {
			d.note(r.ID)
		}
	}
	return nil
}

// Seed record, under keyDedupSeed in bucketDedup: the applied index it is
// valid at, then the IDs oldest first, all 8 bytes big-endian. A seed
// lives in a bucket of its own: bbolt rewrites a whole leaf when any key in
// it changes, and this value may take tens of pages.
var (
	bucketDedup  = []byte("dedup")
	keyDedupSeed = []byte("seed")
)

// loadDedup rebuilds the set as of applied from a file's seed and log (the
// live file, or a snapshot being installed). A file without a seed starts
// from an empty set at index 0.
func loadDedup(tx *bolt.Tx, applied uint64) (*dedup, error) {
	d := newDedup()
	var seedIndex uint64
	if b := tx.Bucket(bucketDedup); b != nil {
		if v := b.Get(keyDedupSeed); v != nil {
			if len(v)%8 != 0 || len(v) == 0 {
				return nil, fmt.Errorf("storage: damaged applied request IDs (%d bytes)", len(v))
			}
			seedIndex = binary.BigEndian.Uint64(v)
			for v = v[8:]; len(v) > 0; v = v[8:] {
				if id := binary.BigEndian.Uint64(v); !d.has(id) {
					d.add(id)
				}
			}
		}
	}
	if seedIndex > applied {
		return nil, fmt.Errorf("storage: applied request IDs saved at index %d, past the applied index %d", seedIndex, applied)
	}
	if err := d.replay(tx.Bucket(bucketLog), seedIndex, applied); err != nil {
		return nil, err
	}
	return d, nil
}

// saveSeed writes d as the seed valid at applied.
func (d *dedup) saveSeed(tx *bolt.Tx, applied uint64) error {
	kept := d.ids[d.head:]
	v := make([]byte, 8, 8+8*len(kept))
	binary.BigEndian.PutUint64(v, applied)
	for _, id := range kept {
		v = binary.BigEndian.AppendUint64(v, id)
	}
	return tx.Bucket(bucketDedup).Put(keyDedupSeed, v)
}

// saveDedupSeed saves the set as of the applied index, so that the log
// entries up to it may go.
func (s *Store) saveDedupSeed(tx *bolt.Tx) error {
	applied := getUint64(tx.Bucket(bucketMeta), keyApplied)
	if s.dedup == nil {
		d, err := loadDedup(tx, applied)
		if err != nil {
			return err
		}
		s.dedup = d
	}
	return s.dedup.saveSeed(tx, applied)
}
