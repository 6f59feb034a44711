//go:build !unix

package raftkv

import "syscall"

// reuseAddr is nil where SO_REUSEADDR means something else (Windows lets
// it take over a port in use).
var reuseAddr func(network, address string, c syscall.RawConn) error
