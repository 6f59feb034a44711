// Package storage holds one member's durable state in a single bbolt file:
// the etcd v2 keyspace (directories, values, TTLs), the last 1000 events for
// watches, and the Raft log, hard state and snapshot metadata.
//
// It applies committed v2 requests exactly as etcd 3.4's v2 store does and
// hands the resulting events to the watcher hub. It knows nothing of HTTP,
// Caddy or how entries were agreed on: the Raft node in package raftkv calls
// Save once per Ready, from one goroutine. It must never apply an entry twice
// or acknowledge one that is not durable.
package storage
