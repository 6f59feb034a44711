package storage

import (
	"encoding/binary"
	"fmt"

	bolt "go.etcd.io/bbolt"
	"go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// compactChunk bounds the log entries one compaction transaction deletes,
// so that compacting a long log never builds one huge transaction.
var compactChunk = 10000

// RaftState is what a restarting member reads back to rebuild its Raft log.
type RaftState struct {
	HardState *raftpb.HardState        // nil when nothing was ever saved
	Snapshot  *raftpb.SnapshotMetadata // the last snapshot (nil: none); its Index/Term/ConfState
	ConfState *raftpb.ConfState        // the latest applied conf state (nil: none)
	// Entries are the retained log entries, in order: every entry after
	// the compaction point, so the first ones may be at or below
	// Snapshot.Index (Compact keeps a tail for slow followers).
	Entries      []*raftpb.Entry
	Applied      uint64 // the last applied Raft index
	CompactIndex uint64 // the log holds no entry at or below it
}

func logKey(b *[8]byte, index uint64) []byte {
	binary.BigEndian.PutUint64(b[:], index)
	return b[:]
}

// appendLog writes ents, first deleting every saved entry at or above the
// first one's index: Raft replaces a conflicting tail that way. Entries
// are encoded in *buf, then live in ar until the transaction ends.
func appendLog(log *bolt.Bucket, ents []*raftpb.Entry, ar *arena, buf *[]byte) error {
	if len(ents) == 0 {
		return nil
	}
	var kb [8]byte
	first := ents[0].GetIndex()
	c := log.Cursor()
	// Appending at the end is the common case: nothing to truncate.
	if k, _ := c.Last(); k != nil && binary.BigEndian.Uint64(k) >= first {
		for k, _ := c.Seek(logKey(&kb, first)); k != nil; k, _ = c.Seek(logKey(&kb, first)) {
			if err := c.Delete(); err != nil {
				return err
			}
		}
	}
	for i, e := range ents {
		if e.GetIndex() != first+uint64(i) {
			return fmt.Errorf("storage: log entries not contiguous: %d after %d", e.GetIndex(), first+uint64(i)-1)
		}
		*buf = appendEntry((*buf)[:0], e)
		if err := log.Put(logKey(&kb, e.GetIndex()), ar.copy(*buf)); err != nil {
			return err
		}
	}
	return nil
}

// appendEntry appends e in the protobuf wire form proto.Marshal gives it
// (fields in number order, each present one only), which LoadRaft reads
// back with proto.Unmarshal. Written by hand because the generic encoder
// costs more than the rest of an entry's append.
func appendEntry(b []byte, e *raftpb.Entry) []byte {
	if e.Type != nil {
		b = protowire.AppendTag(b, 1, protowire.VarintType)
		b = protowire.AppendVarint(b, uint64(int64(*e.Type))) // an enum is an int32
	}
	if e.Term != nil {
		b = protowire.AppendTag(b, 2, protowire.VarintType)
		b = protowire.AppendVarint(b, *e.Term)
	}
	if e.Index != nil {
		b = protowire.AppendTag(b, 3, protowire.VarintType)
		b = protowire.AppendVarint(b, *e.Index)
	}
	if e.Data != nil {
		b = protowire.AppendTag(b, 4, protowire.BytesType)
		b = protowire.AppendBytes(b, e.Data)
	}
	return append(b, e.ProtoReflect().GetUnknown()...)
}

func putProto(b *bolt.Bucket, key []byte, m proto.Message) error {
	data, err := proto.Marshal(m)
	if err != nil {
		return err
	}
	return b.Put(key, data)
}

// getProto fills m from key; false when the key is absent.
func getProto(b *bolt.Bucket, key []byte, m proto.Message) (bool, error) {
	v := b.Get(key)
	if v == nil {
		return false, nil
	}
	if err := proto.Unmarshal(v, m); err != nil {
		return false, fmt.Errorf("storage: damaged %s: %w", key, err)
	}
	return true, nil
}

// LoadRaft reads back the Raft state saved by Save and Compact.
func (s *Store) LoadRaft() (*RaftState, error) {
	if s.closed.Load() {
		return nil, ErrClosed
	}
	st := &RaftState{}
	err := s.view(func(tx *bolt.Tx) error {
		raft, meta := tx.Bucket(bucketRaft), tx.Bucket(bucketMeta)
		hs, cs, sm := &raftpb.HardState{}, &raftpb.ConfState{}, &raftpb.SnapshotMetadata{}
		if ok, err := getProto(meta, keyHardState, hs); err != nil {
			return err
		} else if ok {
			st.HardState = hs
		}
		if ok, err := getProto(raft, keyConfState, cs); err != nil {
			return err
		} else if ok {
			st.ConfState = cs
		}
		if ok, err := getProto(raft, keySnapshot, sm); err != nil {
			return err
		} else if ok {
			st.Snapshot = sm
		}
		st.Applied = getUint64(meta, keyApplied)
		st.CompactIndex = getUint64(meta, keyCompacted)
		var kb [8]byte
		c := tx.Bucket(bucketLog).Cursor()
		// Entries at or below the compaction point may remain after a
		// crash in the middle of a chunked compaction: they are skipped.
		for k, v := c.Seek(logKey(&kb, st.CompactIndex+1)); k != nil; k, v = c.Next() {
			e := &raftpb.Entry{}
			if err := proto.Unmarshal(v, e); err != nil {
				return fmt.Errorf("storage: damaged log entry %d: %w", binary.BigEndian.Uint64(k), err)
			}
			st.Entries = append(st.Entries, e)
		}
		return nil
	})
	if err != nil {
		return nil, closedErr(err)
	}
	return st, nil
}

// Compact records snap as the latest snapshot and deletes log entries at or
// below compactIndex (compactIndex <= snap.Index; raftkv keeps a tail of
// entries for slow followers).
//
// The snapshot metadata and the new compaction point are written in the
// first transaction, with up to 10,000 deletions; a longer range is deleted
// in further transactions of that size. A crash in between leaves entries
// that LoadRaft skips and the next Compact deletes. The first transaction
// also saves the applied request IDs, which Open could no longer rebuild
// from the entries deleted (see dedup).
func (s *Store) Compact(snap *raftpb.SnapshotMetadata, compactIndex uint64) error {
	if err := s.usable(); err != nil {
		return err
	}
	if snap == nil || compactIndex > snap.GetIndex() {
		return fmt.Errorf("storage: compaction index %d is above the snapshot index %d", compactIndex, snap.GetIndex())
	}
	// bbolt has one writer, and the log must keep what an open transaction
	// applied until it commits: a deferred Save's transaction goes first.
	if err := s.Flush(); err != nil {
		return err
	}
	first := true
	for {
		more := false
		err := s.file().Update(func(tx *bolt.Tx) error {
			if first {
				if err := putProto(tx.Bucket(bucketRaft), keySnapshot, snap); err != nil {
					return err
				}
				meta := tx.Bucket(bucketMeta)
				if compactIndex > getUint64(meta, keyCompacted) {
					if err := putUint64(meta, keyCompacted, compactIndex); err != nil {
						return err
					}
				}
				if err := s.saveDedupSeed(tx); err != nil {
					return err
				}
			}
			// Collect, then delete: calling First after each Delete walks
			// every emptied leaf again (quadratic in the chunk), and
			// deleting under a moving cursor skips keys.
			b := tx.Bucket(bucketLog)
			c := b.Cursor()
			k, _ := c.First()
			if k == nil || binary.BigEndian.Uint64(k) > compactIndex {
				return nil
			}
			keys := make([][]byte, 0, min(compactIndex-binary.BigEndian.Uint64(k)+1, uint64(compactChunk)))
			for ; k != nil && binary.BigEndian.Uint64(k) <= compactIndex; k, _ = c.Next() {
				if len(keys) == compactChunk {
					more = true
					break
				}
				keys = append(keys, k)
			}
			// Newest first, through one cursor: bbolt deletes a key by
			// shifting the rest of its leaf down, which costs nothing for
			// the last key of a leaf.
			for i := len(keys) - 1; i >= 0; i-- {
				if err := seekDelete(c, keys[i]); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return closedErr(err)
		}
		first = false
		if !more {
			return nil
		}
	}
}
