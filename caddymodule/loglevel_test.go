package caddymodule

import (
	"encoding/json"
	"net/http"
	"os"
	"strings"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// TestMemberLevelFiltersOnTopOfCaddys checks the member's log level: it
// lets through what it and the level of the core it wraps (Caddy's) both
// do, also in loggers derived with fields.
func TestMemberLevelFiltersOnTopOfCaddys(t *testing.T) {
	core, logs := observer.New(zapcore.InfoLevel)
	lvl := zap.NewAtomicLevelAt(zapcore.DebugLevel)
	lg := withMemberLevel(zap.New(core), lvl)
	derived := lg.Named("raft").With(zap.String("k", "v"))

	lg.Debug("below Caddy's level")
	lg.Info("info at debug")
	lvl.SetLevel(zapcore.WarnLevel)
	lg.Info("info at warn")
	derived.Info("derived info at warn")
	derived.Warn("derived warn at warn")
	if lg.Core().Enabled(zapcore.InfoLevel) || !lg.Core().Enabled(zapcore.ErrorLevel) {
		t.Error("Enabled does not follow the member's level")
	}
	lvl.SetLevel(zapcore.DebugLevel)
	if lg.Core().Enabled(zapcore.DebugLevel) {
		t.Error("Enabled lets through what the wrapped core does not")
	}
	var got []string
	for _, e := range logs.All() {
		got = append(got, e.Message)
	}
	if want := []string{"info at debug", "derived warn at warn"}; strings.Join(got, "|") != strings.Join(want, "|") {
		t.Errorf("logged %q, want %q", got, want)
	}
}

// TestConfigLocalLogSetsTheMembersLevel runs etcd's PUT /config/local/log
// against a real Caddy: a warning the member logs (a refused membership
// change) goes out at the default level, not once the level is ERROR, and
// again once it is INFO. (Its answers are compared with etcd's in
// TestDifferentialAgainstEtcd.)
func TestConfigLocalLogSetsTheMembersLevel(t *testing.T) {
	p := startEtcaddy(t, etcaddyOpts{})
	_, _, body := p.do(t, "GET", "/v2/members", nil)
	var ms struct {
		Members []struct{ ID string }
	}
	if err := json.Unmarshal(body, &ms); err != nil || len(ms.Members) != 1 {
		t.Fatalf("members %s: %v", body, err)
	}
	const warning = "membership change failed"
	count := func(what string) int {
		b, err := os.ReadFile(p.LogPath)
		if err != nil {
			t.Fatal(err)
		}
		return strings.Count(string(b), what)
	}
	// Removing the only member fails, with a warning logged before the
	// answer goes out.
	refused := func() {
		t.Helper()
		if status, _, body := p.do(t, "DELETE", "/v2/members/"+ms.Members[0].ID, nil); status != http.StatusInternalServerError {
			t.Fatalf("removing the only member: %d %s", status, body)
		}
	}
	setLevel := func(body string) {
		t.Helper()
		req, err := http.NewRequest("PUT", p.ClientURL+"/config/local/log", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/json")
		status, _, rbody, err := roundTrip(req)
		if err != nil || status != http.StatusNoContent {
			t.Fatalf("PUT /config/local/log %s: %d %s %v", body, status, rbody, err)
		}
	}
	refused()
	if n := count(warning); n != 1 {
		t.Fatalf("%d warnings at the default level, want 1:\n%s", n, p.logTail(20))
	}
	setLevel(`{"Level":"ERROR"}`)
	refused()
	if n := count(warning); n != 1 {
		t.Errorf("%d warnings after the level was set to ERROR, want still 1:\n%s", n, p.logTail(20))
	}
	setLevel(`{"Level":"info"}`)
	refused()
	if n := count(warning); n != 2 {
		t.Errorf("%d warnings after the level was set to INFO, want 2:\n%s", n, p.logTail(20))
	}
	// The change is logged before it takes effect, as etcd logs it: the
	// one to ERROR, not the one from it.
	if n := count("log level of the member set"); n != 1 {
		t.Errorf("%d level changes logged, want 1:\n%s", n, p.logTail(20))
	}
}
