package storage

import (
	"fmt"
	"testing"

	"go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"
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

// BenchmarkSaveSerial measures one Save per set, as a lone client's writes
// reach the store: the per-commit cost. pages/op is bbolt's page writes.
func BenchmarkSaveSerial(b *testing.B) {
	s, err := Open(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	save := func(i int) {
		idx := s.AppliedIndex() + 1
		ents := []*raftpb.Entry{entry(idx, &Request{ID: idx, Method: MethodPut, Path: "/bench", Val: fmt.Sprint(i)})}
		hs := &raftpb.HardState{Term: proto.Uint64(2), Vote: proto.Uint64(1), Commit: proto.Uint64(idx)}
		if _, err := s.Save(Ready{HardState: hs, Entries: ents, Committed: ents}); err != nil {
			b.Fatal(err)
		}
	}
	// A log and a history of realistic depth.
	for i := range 3000 {
		save(i)
	}
	before := s.file().Stats()
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		save(i)
	}
	after := s.file().Stats()
	b.ReportMetric(float64(after.TxStats.GetWrite()-before.TxStats.GetWrite())/float64(b.N), "pages/op")
}
