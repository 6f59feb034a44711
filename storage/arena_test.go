package storage

import (
	"bytes"
	"testing"
)

// The arena hands out copies that stay intact until reset, however many
// chunks a transaction fills, and after a reset fills the same chunks again
// instead of allocating.
func TestArenaReusesItsChunksAfterReset(t *testing.T) {
	var a arena
	val := bytes.Repeat([]byte("v"), 1000)
	fill := func() [][]byte {
		out := make([][]byte, 0, 50)
		for i := range 50 { // three chunks and a bit
			val[0] = byte(i)
			out = append(out, a.copy(val))
		}
		return out
	}
	check := func(got [][]byte) {
		t.Helper()
		for i, v := range got {
			if v[0] != byte(i) || len(v) != len(val) || !bytes.Equal(v[1:], val[1:]) {
				t.Fatalf("copy %d changed before the reset", i)
			}
		}
	}
	check(fill())
	a.reset()
	check(fill())
	if n := testing.AllocsPerRun(10, func() { a.reset(); fill() }); n > 1 {
		// fill's own slice of results allocates; the copies must not.
		t.Fatalf("%.0f allocations per transaction after the first", n)
	}
	if big := a.copy(make([]byte, arenaChunk)); len(big) != arenaChunk {
		t.Fatalf("a big value: %d bytes", len(big))
	}
}
