//go:build linux

package caddymodule

import (
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"

	"github.com/caddyserver/caddy/v2"

	"github.com/etcaddy/etcaddy/storage"
)

// TestReloadStartsAMemberAFailureStopped fills the disk under a running member: its bbolt
// file descriptor is made to write to /dev/full, so the next commit fails with ENOSPC, as on
// a full file system. The member stops (the write is refused, /health says 503) and Caddy
// goes on serving the rest; a forced reload of the same config then starts the member again
// from its file (the new node opens it anew), with every acknowledged write. Linux only:
// /proc/self/fd, /dev/full and dup3.
func TestReloadStartsAMemberAFailureStopped(t *testing.T) {
	s := startInproc(t)
	resp, body := s.form("PUT", "/v2/keys/kept", "value=1")
	s.expect(resp, body, http.StatusCreated)

	db, err := filepath.EvalSymlinks(filepath.Join(s.dataDir, "member.db"))
	if err != nil {
		t.Fatal(err)
	}
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	dbFD := -1
	for _, e := range fds {
		if target, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && target == db {
			if dbFD, err = strconv.Atoi(e.Name()); err != nil {
				t.Fatal(err)
			}
		}
	}
	if dbFD < 0 {
		t.Fatalf("no open file descriptor on %s", db)
	}
	full, err := os.OpenFile("/dev/full", os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer full.Close()
	if err := syscall.Dup3(int(full.Fd()), dbFD, syscall.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}

	resp, body = s.form("PUT", "/v2/keys/lost", "value=2")
	s.expectKeyError(resp, body, http.StatusInternalServerError, storage.EcodeRaftInternal, errNotRunning)
	resp, body = s.do("GET", "/health", "", "")
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("/health of a stopped member: %d %s", resp.StatusCode, body)
	}
	if _, body := s.do("GET", "/static", "", ""); body != "static" {
		t.Fatalf("the rest of the site stopped too: %q", body)
	}

	// The same config: Caddy skips a load of the config it runs unless forced, as
	// `caddy reload --force` forces it.
	if err := caddy.Load(s.config, true); err != nil {
		t.Fatalf("reload: %v", err)
	}
	s.waitFor("the member to be healthy again", func() bool {
		resp, _ := s.do("GET", "/health", "", "")
		return resp.StatusCode == http.StatusOK
	})
	resp, body = s.do("GET", "/v2/keys/kept", "", "")
	s.expect(resp, body, http.StatusOK)
	if ev := decodeEvent(t, body); ev.Node.Value == nil || *ev.Node.Value != "1" {
		t.Fatalf("GET /kept after the restart: %s", body)
	}
	resp, body = s.do("GET", "/v2/keys/lost", "", "")
	s.expectKeyError(resp, body, http.StatusNotFound, storage.EcodeKeyNotFound, "/lost")
	resp, body = s.form("PUT", "/v2/keys/lost", "value=3")
	s.expect(resp, body, http.StatusCreated)
	if n, _ := members.References(s.dataDir); n != 1 {
		t.Fatalf("references after the reload = %d, want 1", n)
	}
}
