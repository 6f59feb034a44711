//go:build unix

package raftkv

import "syscall"

// reuseAddr sets SO_REUSEADDR on a socket before it connects (see
// peerDialer).
func reuseAddr(_, _ string, c syscall.RawConn) error {
	var err error
	if cerr := c.Control(func(fd uintptr) {
		err = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1)
	}); cerr != nil {
		return cerr
	}
	return err
}
