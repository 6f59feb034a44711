//go:build !linux

package caddymodule

// tcpListeners cannot count listening sockets here (Linux reads
// /proc/net/tcp): ok is false.
func tcpListeners(port int) (n int, ok bool) { return 0, false }
