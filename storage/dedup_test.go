package storage

import (
	"math/rand/v2"
	"testing"
)

// TestIDSetMatchesMap: the open-addressing set agrees with a map through
// a FIFO of inserts and removals, with colliding and zero IDs.
func TestIDSetMatchesMap(t *testing.T) {
	const keep = 100
	s := newIDSet(keep + 1)
	want := map[uint64]bool{}
	var fifo []uint64
	rng := rand.New(rand.NewPCG(1, 2))
	for range 20000 {
		// Few distinct values, so that re-adds, probes across the table's
		// end and removals in the middle of runs all happen.
		id := rng.Uint64N(400)
		if rng.IntN(2) == 0 {
			id <<= 40
		}
		if got := s.has(id); got != want[id] {
			t.Fatalf("has(%d) = %v, want %v", id, got, want[id])
		}
		if want[id] {
			continue
		}
		s.add(id)
		want[id] = true
		fifo = append(fifo, id)
		if len(fifo) > keep {
			s.remove(fifo[0])
			delete(want, fifo[0])
			fifo = fifo[1:]
		}
	}
	for id := range want {
		if !s.has(id) {
			t.Fatalf("%d lost", id)
		}
	}
}

func BenchmarkDedupNote(b *testing.B) {
	d := newDedup()
	base := uint64(0xabcdef12) << 32
	for i := range uint64(dedupKeep) {
		d.note(base | i)
	}
	id := uint64(dedupKeep)
	b.ReportAllocs()
	for b.Loop() {
		id++
		d.note(base | id)
	}
}
