package caddymodule

import (
	"fmt"
	"os"
	"strings"
)

// tcpListeners counts the sockets listening on TCP port port of 127.0.0.1
// or of every IPv4 address, from /proc/net/tcp; ok is false when that
// cannot be read.
func tcpListeners(port int) (n int, ok bool) {
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		return 0, false
	}
	suffix := fmt.Sprintf(":%04X", port)
	for line := range strings.Lines(string(b)) {
		f := strings.Fields(line)
		// sl local_address rem_address st ...; st 0A is LISTEN.
		if len(f) < 4 || f[3] != "0A" || !strings.HasSuffix(f[1], suffix) {
			continue
		}
		if addr := strings.TrimSuffix(f[1], suffix); addr == "0100007F" || addr == "00000000" {
			n++
		}
	}
	return n, true
}
