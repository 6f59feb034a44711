// Package storage holds one member's durable state in a single bbolt file:
// the etcd v2 keyspace (directories, values, TTLs), the v2 auth data (what
// etcd keeps under /2: opaque values here, see auth.go), the last 1000
// events for watches, and the Raft log, hard state and snapshot metadata.
//
// It applies committed v2 requests exactly as etcd 3.4's v2 store does and
// hands the resulting events to the watcher hub. It knows nothing of HTTP,
// Caddy or how entries were agreed on: the Raft node in package raftkv calls
// Save once per Ready, from one goroutine. It must never apply an entry twice
// or acknowledge one that is not durable.
//
// Where it knowingly differs from etcd 3.4:
//   - listings always come sorted byte-wise (etcd's unsorted order is Go
//     map order, which clients must not rely on);
//   - a watcher gets each event at most once (etcd may hand a streaming
//     watcher a deleted directory's event twice);
//   - a watcher below a deleted or expired directory is notified even when
//     no node existed at its own path, which is what etcd's history scan
//     already does for it;
//   - a streaming watch answered from history gets every matching event of
//     the history, then live ones (etcd sends the first one, then nothing);
//   - a path longer than 16000 bytes cannot be created (error 209).
package storage
