package caddymodule

// End-to-end tests of the admin.api.raftkv routes on real Caddy processes: one member, a
// config without a member and its reloads, and a three-member cluster whose leadership
// moves.

import (
	"context"
	"encoding/json"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/etcaddy/etcaddy/storage"
)

// adminDo sends one request to p's admin API and returns the whole answer; a transport
// error fails the test.
func adminDo(t testing.TB, p *proc, method, path string) (int, http.Header, []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	status, header, body, err := adminTry(ctx, p, method, path)
	if err != nil {
		t.Fatalf("%s admin: %s %s: %v", p.Name, method, path, err)
	}
	return status, header, body
}

func adminTry(ctx context.Context, p *proc, method, path string) (int, http.Header, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, method, p.AdminURL+path, nil)
	if err != nil {
		return 0, nil, nil, err
	}
	return roundTrip(req)
}

// adminStatusOf GETs /raftkv/status from p; ok is false when p does not answer 200.
func adminStatusOf(p *proc) (adminStatus, bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	status, _, body, err := adminTry(ctx, p, "GET", adminStatusPath)
	if err != nil || status != http.StatusOK {
		return adminStatus{}, false
	}
	var st adminStatus
	if json.Unmarshal(body, &st) != nil {
		return adminStatus{}, false
	}
	return st, true
}

// mustAdminStatus is adminStatusOf that fails the test.
func mustAdminStatus(t testing.TB, p *proc) adminStatus {
	t.Helper()
	status, _, body := adminDo(t, p, "GET", adminStatusPath)
	if status != http.StatusOK {
		t.Fatalf("%s: GET %s: %d %s", p.Name, adminStatusPath, status, body)
	}
	var st adminStatus
	if err := json.Unmarshal(body, &st); err != nil {
		t.Fatalf("%s: GET %s: %v in %s", p.Name, adminStatusPath, err, body)
	}
	return st
}

// wantAdminError checks an admin answer is status with a JSON error containing each of
// want, and returns the message.
func wantAdminError(t testing.TB, what string, status int, header http.Header, body []byte, wantStatus int, want ...string) string {
	t.Helper()
	var e struct {
		Error string `json:"error"`
	}
	if status != wantStatus || json.Unmarshal(body, &e) != nil || e.Error == "" {
		t.Fatalf("%s: got %d %s, want %d and a JSON error", what, status, body, wantStatus)
	}
	if ct := header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("%s: Content-Type %q", what, ct)
	}
	for _, w := range want {
		if !strings.Contains(e.Error, w) {
			t.Errorf("%s: error %q does not mention %q", what, e.Error, w)
		}
	}
	return e.Error
}

// TestAdminSingleMember: status, member list, snapshot and the refusals of one member.
func TestAdminSingleMember(t *testing.T) {
	p := startEtcaddy(t, etcaddyOpts{})

	before := mustAdminStatus(t, p)
	if _, err := strconv.ParseUint(before.ID, 16, 64); err != nil || before.ID == "0" {
		t.Errorf("id %q is not a hex member ID", before.ID)
	}
	if _, err := strconv.ParseUint(before.ClusterID, 16, 64); err != nil || before.ClusterID == "0" {
		t.Errorf("cluster_id %q is not a hex cluster ID", before.ClusterID)
	}
	if before.Name != "default" || before.Leader != before.ID || !before.IsLeader || !before.Running || !before.Ready ||
		before.Members != 1 || before.RaftTerm == 0 || before.RaftIndex == 0 || before.StartTime.IsZero() ||
		before.DataDir != p.DataDir {
		t.Errorf("status of a lone running member: %+v", before)
	}
	// The same member as the v2 API's.
	_, _, self := p.do(t, "GET", "/v2/stats/self", nil)
	var ss struct {
		ID string `json:"id"`
	}
	if err := json.Unmarshal(self, &ss); err != nil || ss.ID != before.ID {
		t.Errorf("/v2/stats/self says id %q (%v), the admin API %q", ss.ID, err, before.ID)
	}

	if st, _, body := p.do(t, "PUT", "/v2/keys/admin/backup", url.Values{"value": {"kept"}}); st != http.StatusCreated {
		t.Fatalf("PUT: %d %s", st, body)
	}
	after := mustAdminStatus(t, p)
	if after.EtcdIndex <= before.EtcdIndex || after.RaftIndex <= before.RaftIndex || after.AppliedIndex <= before.AppliedIndex {
		t.Errorf("after a PUT: before %+v, after %+v", before, after)
	}

	t.Run("members", func(t *testing.T) {
		status, _, body := adminDo(t, p, "GET", adminMembersPath)
		var r struct {
			Members []memberInfo `json:"members"`
		}
		if status != http.StatusOK || json.Unmarshal(body, &r) != nil {
			t.Fatalf("GET %s: %d %s", adminMembersPath, status, body)
		}
		if len(r.Members) != 1 || r.Members[0].ID != before.ID || r.Members[0].Name != "default" ||
			len(r.Members[0].PeerURLs) != 1 || r.Members[0].ClientURLs == nil {
			t.Errorf("members: %s", body)
		}
	})

	t.Run("snapshot", func(t *testing.T) {
		status, header, body := adminDo(t, p, "GET", adminSnapshotPath)
		if status != http.StatusOK {
			t.Fatalf("GET %s: %d %s", adminSnapshotPath, status, crashShort(body))
		}
		if ct := header.Get("Content-Type"); ct != "application/octet-stream" {
			t.Errorf("Content-Type %q", ct)
		}
		if cd := header.Get("Content-Disposition"); cd != `attachment; filename="member.db"` {
			t.Errorf("Content-Disposition %q", cd)
		}
		dir := t.TempDir()
		path := filepath.Join(dir, "member.db")
		if err := os.WriteFile(path, body, 0o600); err != nil {
			t.Fatal(err)
		}
		// A bbolt file with the keyspace in it...
		db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
		if err != nil {
			t.Fatalf("the snapshot (%d bytes) does not open with bbolt: %v", len(body), err)
		}
		err = db.View(func(tx *bolt.Tx) error {
			b := tx.Bucket([]byte("keys"))
			if b == nil {
				t.Error("no keys bucket")
				return nil
			}
			if k, _ := b.Cursor().First(); k == nil {
				t.Error("the keys bucket is empty")
			}
			return nil
		})
		if cerr := db.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			t.Fatal(err)
		}
		// ...that a member opens as its data file, with the key written.
		st, err := storage.Open(dir)
		if err != nil {
			t.Fatalf("storage.Open on the snapshot: %v", err)
		}
		defer st.Close()
		ev, err := st.Get("/admin/backup", false, false, time.Now())
		if err != nil || ev.Node == nil || ev.Node.Value == nil || *ev.Node.Value != "kept" {
			t.Fatalf("GET /admin/backup from the snapshot: %+v, %v", ev, err)
		}
		if st.Index() < after.EtcdIndex {
			t.Errorf("the snapshot's etcd index %d is behind the status's %d", st.Index(), after.EtcdIndex)
		}
	})

	t.Run("transfer without another member", func(t *testing.T) {
		status, header, body := adminDo(t, p, "POST", adminTransferPath)
		wantAdminError(t, "POST "+adminTransferPath, status, header, body, http.StatusConflict, "only voting member")
		if st := mustAdminStatus(t, p); !st.IsLeader {
			t.Errorf("the lone member no longer leads: %+v", st)
		}
	})

	t.Run("bad requests", func(t *testing.T) {
		for _, tc := range []struct {
			method, path string
			status       int
			allow        string
			want         string
		}{
			{"POST", adminStatusPath, http.StatusMethodNotAllowed, "GET", "use GET"},
			{"DELETE", adminMembersPath, http.StatusMethodNotAllowed, "GET", "use GET"},
			{"GET", adminTransferPath, http.StatusMethodNotAllowed, "POST", "use POST"},
			{"PUT", adminSnapshotPath, http.StatusMethodNotAllowed, "GET", "use GET"},
			{"GET", "/raftkv/nothing", http.StatusNotFound, "", adminStatusPath},
			{"POST", adminTransferPath + "?to=xyz", http.StatusBadRequest, "", "to=xyz"},
			{"POST", adminTransferPath + "?to=" + before.ID, http.StatusBadRequest, "", "leads already"},
			{"POST", adminTransferPath + "?timeout=soon", http.StatusBadRequest, "", "timeout=soon"},
		} {
			status, header, body := adminDo(t, p, tc.method, tc.path)
			wantAdminError(t, tc.method+" "+tc.path, status, header, body, tc.status, tc.want)
			if tc.allow != "" && header.Get("Allow") != tc.allow {
				t.Errorf("%s %s: Allow %q, want %q", tc.method, tc.path, header.Get("Allow"), tc.allow)
			}
		}
	})
}

// TestAdminFollowsConfigLoads: without a raftkv app the routes answer 404; a load that adds
// the etcd handler alone (whose app the handler creates with the defaults) brings the member
// up on the admin API, and a load that drops it answers 404 again.
func TestAdminFollowsConfigLoads(t *testing.T) {
	const noMember = `{
	admin 127.0.0.1:{admin_port}
}

http://127.0.0.1:{client_port} {
	respond "no member here"
}
`
	p := startEtcaddy(t, etcaddyOpts{Caddyfile: noMember})
	for _, path := range []string{adminStatusPath, adminMembersPath, adminSnapshotPath} {
		status, header, body := adminDo(t, p, "GET", path)
		wantAdminError(t, "GET "+path+" without a member", status, header, body, http.StatusNotFound, "no raftkv member")
	}
	status, header, body := adminDo(t, p, "POST", adminTransferPath)
	wantAdminError(t, "POST "+adminTransferPath+" without a member", status, header, body, http.StatusNotFound, "no raftkv member")

	base := reloadCaddyfileText(t, p)
	withMember := strings.Replace(base, `respond "no member here"`, "etcd", 1)
	if status, body, err := reloadLoad(testClient, p.AdminURL, withMember); err != nil || status != http.StatusOK {
		t.Fatalf("POST /load with the etcd handler: %d %s %v", status, body, err)
	}
	var st adminStatus
	if !poll(20*time.Second, func() bool {
		var ok bool
		st, ok = adminStatusOf(p)
		return ok && st.Running && st.IsLeader
	}) {
		t.Fatalf("no running leader on the admin API after the load: %+v", st)
	}
	if st.Name != "default" || !strings.HasPrefix(st.DataDir, filepath.Dir(p.Caddyfile)) {
		t.Errorf("the default member: %+v", st)
	}
	if status, _, body := p.do(t, "PUT", "/v2/keys/loaded", url.Values{"value": {"yes"}}); status != http.StatusCreated {
		t.Fatalf("PUT after the load: %d %s", status, body)
	}

	// A reload that keeps the member keeps the node: same start time, same index or later.
	forced := strings.Replace(withMember, "\tetcd\n", "\troute {\n\t\trespond /ping pong\n\t\tetcd\n\t}\n", 1)
	if status, body, err := reloadLoad(testClient, p.AdminURL, forced); err != nil || status != http.StatusOK {
		t.Fatalf("POST /load with a route beside etcd: %d %s %v", status, body, err)
	}
	again := mustAdminStatus(t, p)
	if !again.StartTime.Equal(st.StartTime) || again.ID != st.ID || again.EtcdIndex <= st.EtcdIndex {
		t.Errorf("after a reload: before %+v, after %+v", st, again)
	}

	if status, body, err := reloadLoad(testClient, p.AdminURL, base); err != nil || status != http.StatusOK {
		t.Fatalf("POST /load without the member: %d %s %v", status, body, err)
	}
	status, header, body = adminDo(t, p, "GET", adminStatusPath)
	wantAdminError(t, "GET "+adminStatusPath+" after the member was dropped", status, header, body, http.StatusNotFound, "no raftkv member")
}

// TestAdminTransferLeadershipInCluster: in a three-member cluster a follower refuses to
// transfer and names the leader; the leader hands over to the member of its choice, then to
// the one the request names, every member reports the new leader, and writes go on.
func TestAdminTransferLeadershipInCluster(t *testing.T) {
	c := startCluster(t, 3, nil)
	ms := c.members

	status, _, body := adminDo(t, ms[0].proc, "GET", adminMembersPath)
	var r struct {
		Members []memberInfo `json:"members"`
	}
	if status != http.StatusOK || json.Unmarshal(body, &r) != nil || len(r.Members) != 3 {
		t.Fatalf("GET %s: %d %s", adminMembersPath, status, body)
	}
	for _, m := range r.Members {
		if m.Name == "" || len(m.ClientURLs) != 1 || m.ClientURLs[0] != c.byName(m.Name).ClientURL {
			t.Errorf("member %+v", m)
		}
	}

	leader, followers := adminLeader(t, ms)
	status, header, body := adminDo(t, followers[0], "POST", adminTransferPath)
	wantAdminError(t, "transfer on a follower", status, header, body, http.StatusConflict,
		"not the leader", leader.status.ID, leader.Name)

	// The leader's choice.
	status, _, body = adminDo(t, leader.proc, "POST", adminTransferPath)
	var moved adminTransfer
	if status != http.StatusOK || json.Unmarshal(body, &moved) != nil {
		t.Fatalf("transfer on the leader %s: %d %s", leader.Name, status, body)
	}
	if moved.PreviousLeader != leader.status.ID || moved.Leader == leader.status.ID || moved.Leader == "" {
		t.Fatalf("transfer on the leader %s (%s): %+v", leader.Name, leader.status.ID, moved)
	}
	next := adminAgreedLeader(t, ms, moved.Leader)
	if next.status.ID != moved.Leader {
		t.Fatalf("members agree on %s, the transfer answered %s", next.status.ID, moved.Leader)
	}
	adminPutEverywhere(t, ms, "/admin/after-first")

	// The member the request names: the old leader, now a follower.
	status, _, body = adminDo(t, next.proc, "POST", adminTransferPath+"?to="+leader.status.ID+"&timeout=10s")
	if status != http.StatusOK || json.Unmarshal(body, &moved) != nil || moved.Leader != leader.status.ID {
		t.Fatalf("transfer from %s to %s: %d %s", next.Name, leader.Name, status, body)
	}
	adminAgreedLeader(t, ms, leader.status.ID)
	adminPutEverywhere(t, ms, "/admin/after-second")

	// A transferee that is not a member.
	cur, _ := adminLeader(t, ms)
	status, header, body = adminDo(t, cur.proc, "POST", adminTransferPath+"?to=1234")
	wantAdminError(t, "transfer to a stranger", status, header, body, http.StatusBadRequest, "1234")

	// A transferee that is down cannot take over: refused, and the leader leads on (a
	// transfer Raft kept under way would drop every write for an election timeout).
	var down *testMember
	for _, m := range ms {
		if m.proc != cur.proc {
			down = m
			break
		}
	}
	downStatus, ok := adminStatusOf(down.proc)
	if !ok {
		t.Fatalf("no status from %s", down.Name)
	}
	down.proc.stop()
	status, header, body = adminDo(t, cur.proc, "POST", adminTransferPath+"?to="+downStatus.ID+"&timeout=10s")
	wantAdminError(t, "transfer to a stopped member", status, header, body, http.StatusConflict,
		"not reachable", downStatus.ID)
	var up []*testMember
	for _, m := range ms {
		if m != down {
			up = append(up, m)
		}
	}
	adminAgreedLeader(t, up, cur.status.ID)
	adminPutEverywhere(t, up, "/admin/after-refusal")
}

// adminMember is a member with the status it reported.
type adminMember struct {
	*testMember
	status adminStatus
}

// adminLeader finds the member whose admin API says it leads, and the others.
func adminLeader(t *testing.T, ms []*testMember) (adminMember, []*proc) {
	t.Helper()
	var leader adminMember
	var followers []*proc
	if !poll(10*time.Second, func() bool {
		followers = followers[:0]
		found := false
		for _, m := range ms {
			st, ok := adminStatusOf(m.proc)
			if !ok {
				return false
			}
			if st.IsLeader {
				leader, found = adminMember{m, st}, true
			} else {
				followers = append(followers, m.proc)
			}
		}
		return found
	}) {
		t.Fatalf("no member of %v reports itself the leader", names(ms))
	}
	return leader, followers
}

// adminAgreedLeader waits until every member's status names leader as the leader, and
// returns that member.
func adminAgreedLeader(t *testing.T, ms []*testMember, leader string) adminMember {
	t.Helper()
	var found adminMember
	var last []adminStatus
	if !poll(10*time.Second, func() bool {
		last = last[:0]
		ok := true
		for _, m := range ms {
			st, answered := adminStatusOf(m.proc)
			last = append(last, st)
			if !answered || st.Leader != leader || st.IsLeader != (st.ID == leader) {
				ok = false
			}
			if st.ID == leader {
				found = adminMember{m, st}
			}
		}
		return ok && found.testMember != nil
	}) {
		t.Fatalf("the members do not all report %s as the leader: %+v", leader, last)
	}
	return found
}

// adminPutEverywhere writes a key through each member and reads it back by quorum.
func adminPutEverywhere(t *testing.T, ms []*testMember, dir string) {
	t.Helper()
	acked := make(map[string]crashAck)
	for _, m := range ms {
		key := dir + "/" + m.Name
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		status, node, err := crashPut(ctx, testClient, m.ClientURL, key, "via "+m.Name)
		cancel()
		if err != nil || status/100 != 2 {
			t.Fatalf("%s: PUT %s: %d %v", m.Name, key, status, err)
		}
		acked[key] = crashAck{Value: "via " + m.Name, Index: node.ModifiedIndex}
	}
	for _, m := range ms {
		checkAcked(t, m, dir, acked)
	}
}
