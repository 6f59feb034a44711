package storage

import (
	"fmt"
	"testing"

	"go.etcd.io/raft/v3/raftpb"
)

// BenchmarkSaveBatch measures one Save (one commit) carrying 100 sets.
func BenchmarkSaveBatch(b *testing.B) {
	s, err := Open(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	idx := uint64(0)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		ents := make([]*raftpb.Entry, 100)
		for j := range ents {
			idx++
			ents[j] = entry(idx, &Request{ID: idx, Method: MethodPut, Path: fmt.Sprintf("/bench/k%d", j), Val: "value"})
		}
		if _, err := s.Save(Ready{Entries: ents, Committed: ents}); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkGetListing measures a one-level listing of a 1000-child directory.
func BenchmarkGetListing(b *testing.B) {
	s, err := Open(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	ents := make([]*raftpb.Entry, 1000)
	for j := range ents {
		ents[j] = entry(uint64(j+1), &Request{Method: MethodPut, Path: fmt.Sprintf("/d/k%04d/sub", j), Val: "v"})
	}
	if _, err := s.Save(Ready{Entries: ents, Committed: ents}); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := s.Get("/d", false, true, testClock); err != nil {
			b.Fatal(err)
		}
	}
}
