//go:build unix

package raftkv

import (
	"net"
	"testing"
)

// TestPeerPortFreeAfterASelfConnect: a peer dial whose source port is its
// destination's (a member redialling a peer that is down on the same
// machine: the kernel may pick that port) connects to itself, and closing
// it leaves the port in TIME_WAIT. The member must still be able to listen
// on its port when it restarts, as a Go listener (Caddy's too) does with
// SO_REUSEADDR: the dialing socket must have allowed it too.
func TestPeerPortFreeAfterASelfConnect(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().(*net.TCPAddr)
	l.Close()
	d := peerDialer()
	d.LocalAddr = addr // what the kernel may pick; here forced
	c, err := d.Dial("tcp", addr.String())
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	if c.LocalAddr().String() != c.RemoteAddr().String() {
		t.Fatalf("not connected to itself: %v -> %v", c.LocalAddr(), c.RemoteAddr())
	}
	c.Close() // TIME_WAIT on the port
	l, err = net.Listen("tcp", addr.String())
	if err != nil {
		t.Fatalf("the member cannot listen on its port again: %v", err)
	}
	l.Close()
}
