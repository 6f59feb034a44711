package raftkv

import (
	"context"
	"strconv"
	"sync/atomic"
	"testing"

	"github.com/etcaddy/etcaddy/storage"
)

func benchNode(b *testing.B) *Node {
	b.Helper()
	n := NewNode(Config{DataDir: b.TempDir()})
	if err := n.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { n.Stop() })
	ctx := context.Background()
	// The first write waits for the election.
	if _, err := n.Do(ctx, storage.Request{Method: storage.MethodPut, Path: "/bench", Val: "v"}); err != nil {
		b.Fatal(err)
	}
	return n
}

// BenchmarkDoSerial is one client writing: the latency of a durable write.
func BenchmarkDoSerial(b *testing.B) {
	n := benchNode(b)
	ctx := context.Background()
	saves := n.saves.Load()
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		if _, err := n.Do(ctx, storage.Request{Method: storage.MethodPut, Path: "/bench", Val: strconv.Itoa(i)}); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(n.saves.Load()-saves)/float64(b.N), "saves/op")
}

// BenchmarkDoParallel64 is 64 clients writing: batching.
func BenchmarkDoParallel64(b *testing.B) {
	n := benchNode(b)
	ctx := context.Background()
	saves := n.saves.Load()
	var key atomic.Int64
	b.SetParallelism(64)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		k := "/par/" + strconv.FormatInt(key.Add(1), 10)
		for pb.Next() {
			if _, err := n.Do(ctx, storage.Request{Method: storage.MethodPut, Path: k, Val: "v"}); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.ReportMetric(float64(n.saves.Load()-saves)/float64(b.N), "saves/op")
}

// BenchmarkQuorumGetParallel64 is 64 clients reading through ReadIndex.
func BenchmarkQuorumGetParallel64(b *testing.B) {
	n := benchNode(b)
	ctx := context.Background()
	b.SetParallelism(64)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := n.Get(ctx, "/bench", false, false, true); err != nil {
				b.Error(err)
				return
			}
		}
	})
}
