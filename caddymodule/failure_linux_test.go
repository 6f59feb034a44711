//go:build linux

package caddymodule

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

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
	// Writers run through the failure and the reload: a write is acknowledged (2xx) or
	// refused with etcd's error; none acknowledged may be missing afterwards.
	load := startFailureLoad(s, 4)
	load.waitAcked(s, 20)

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

	// 500 when this write is the one the disk refused (or was in flight then), 503 when a
	// writer's already stopped the member.
	resp, body = s.form("PUT", "/v2/keys/lost", "value=2")
	if resp.StatusCode != http.StatusServiceUnavailable {
		s.expectKeyError(resp, body, http.StatusInternalServerError, storage.EcodeRaftInternal, errNotRunning)
	} else if e := decodeError(t, body); e.ErrorCode != storage.EcodeRaftInternal || e.Cause != errNotRunning {
		t.Fatalf("PUT /lost on the stopped member: %d %s", resp.StatusCode, body)
	}
	resp, body = s.do("GET", "/health", "", "")
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("/health of a stopped member: %d %s", resp.StatusCode, body)
	}
	if _, body := s.do("GET", "/static", "", ""); body != "static" {
		t.Fatalf("the rest of the site stopped too: %q", body)
	}

	// The same config, but for Raft timings that only a new start applies: the
	// member starts with the config being loaded (the operator may have
	// changed what stopped it). Caddy skips a load of the config it runs
	// unless forced, as `caddy reload --force` forces it.
	var cfg map[string]any
	if err := json.Unmarshal(s.config, &cfg); err != nil {
		t.Fatal(err)
	}
	app := cfg["apps"].(map[string]any)["raftkv"].(map[string]any)
	app["heartbeat_interval"], app["election_timeout"] = "20ms", "200ms"
	retuned, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := caddy.Load(retuned, true); err != nil {
		t.Fatalf("reload: %v", err)
	}
	// The writers have their own client.
	s.getAfterReload("the member to be healthy again", "/health", func(st int, _ string) bool { return st == http.StatusOK })
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
	members.Range(func(key, value any) bool {
		if m := value.(*member); key == s.dataDir && m.cfg.HeartbeatInterval != 20*time.Millisecond {
			t.Errorf("the member started again with heartbeat %v, not the reloaded config's 20ms", m.cfg.HeartbeatInterval)
		}
		return true
	})

	acked, refused := load.stop(t, s)
	if refused == 0 {
		t.Error("no write was refused while the member was stopped: the writers never met the failure")
	}
	for key, value := range acked {
		resp, body := s.do("GET", "/v2/keys"+key, "", "")
		s.expect(resp, body, http.StatusOK)
		if ev := decodeEvent(t, body); ev.Node.Value == nil || *ev.Node.Value != value {
			t.Fatalf("acknowledged write %s=%s reads %s", key, value, body)
		}
	}
	t.Logf("%d writes acknowledged, %d refused", len(acked), refused)
}

// failureLoad is writers that PUT fresh keys until stopped.
type failureLoad struct {
	stopc   chan struct{}
	wg      sync.WaitGroup
	mu      sync.Mutex
	acked   map[string]string
	refused int
	wrong   []string // answers that are neither an acknowledgement nor etcd's refusal
	acks    atomic.Int64
	client  *http.Client // the writers' own: the test's requests keep theirs
}

func startFailureLoad(s *inproc, writers int) *failureLoad {
	l := &failureLoad{stopc: make(chan struct{}), acked: map[string]string{}, client: &http.Client{Transport: &http.Transport{}}}
	for w := range writers {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for i := 0; ; i++ {
				select {
				case <-l.stopc:
					return
				default:
				}
				key, value := fmt.Sprintf("/load/%d/%d", w, i), fmt.Sprintf("v%d", i)
				ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
				req := s.request(ctx, "PUT", "/v2/keys"+key, formType, "value="+value)
				resp, err := l.client.Do(req)
				if err != nil {
					// A connection the reload reset before its request was read.
					cancel()
					continue
				}
				b, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				cancel()
				l.mu.Lock()
				switch {
				case err != nil:
				case resp.StatusCode == http.StatusCreated:
					l.acked[key] = value
					l.acks.Add(1)
				case resp.StatusCode/100 == 5 && strings.Contains(string(b), `"cause":"etcdserver: server stopped"`):
					// 500 for a write in flight when the member stopped, 503 after.
					l.refused++
				default:
					l.wrong = append(l.wrong, fmt.Sprintf("PUT %s: %d %s", key, resp.StatusCode, b))
				}
				l.mu.Unlock()
			}
		}()
	}
	return l
}

// waitAcked waits until the writers have had n more writes acknowledged.
func (l *failureLoad) waitAcked(s *inproc, n int64) {
	s.t.Helper()
	base := l.acks.Load()
	s.waitFor(fmt.Sprintf("%d more acknowledged writes", n), func() bool { return l.acks.Load() >= base+n })
}

// stop lets the writers make 20 more acknowledged writes (the member is back), stops them and
// returns what they saw.
func (l *failureLoad) stop(t *testing.T, s *inproc) (map[string]string, int) {
	t.Helper()
	l.waitAcked(s, 20)
	close(l.stopc)
	l.wg.Wait()
	l.client.CloseIdleConnections()
	if len(l.wrong) > 0 {
		t.Fatalf("answers that are neither 201 nor etcd's refusal: %v", l.wrong)
	}
	return l.acked, l.refused
}
