// Package raftkv is the replicated state machine behind the v2 API: it
// drives a go.etcd.io/raft/v3 node over a storage.Store, turns client
// requests into proposals and waits for them to be applied, serves
// linearizable reads through ReadIndex, runs the leader's TTL reaper, takes
// snapshots and compacts the log, and keeps the member's stats.
//
// One goroutine owns the Raft node (loop.go); everything else talks to it
// through channels. Each Ready is saved in one bbolt transaction before any
// message leaves and before any waiter hears of its result: raftkv never
// acknowledges a write that is not durable and applied. raftkv knows nothing
// of Caddy or HTTP request parsing.
package raftkv
