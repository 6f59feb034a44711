package caddymodule

import (
	"io"
	"net/http"

	"github.com/etcaddy/etcaddy/raftkv"
)

// versionBody is what etcd 3.4.23 answers on /version. Clients read it:
// etcdctl and the Go client check the server and cluster versions before
// they use an API, so etcaddy names the etcd release whose v2 API it
// reproduces.
const versionBody = `{"etcdserver":"3.4.23","etcdcluster":"3.4.0"}`

// serveVersion is etcd's /version: JSON written without a newline.
func serveVersion(w http.ResponseWriter, r *http.Request) {
	if !allowMethod(w, r, "GET") {
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = io.WriteString(w, versionBody)
}

// serveHealth is etcd 3.4's /health: {"health":"true"} when the member has
// a leader and a round through Raft succeeds, else 503 {"health":"false"}.
// ?serializable=true checks only that a leader is known. etcd sets no
// Content-Type; net/http sniffs text/plain, which is set here so that no
// middleware changes it.
func (h *Handler) serveHealth(w http.ResponseWriter, r *http.Request) {
	if !allowMethod(w, r, "GET") {
		return
	}
	healthy := false
	if n := h.node(); n != nil {
		if r.URL.Query().Get("serializable") == "true" { // etcd compares the string
			healthy = n.Status().Leader != 0
		} else {
			ctx, cancel := h.requestContext(r)
			healthy = n.Healthy(ctx)
			cancel()
		}
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	if !healthy {
		// etcd answers with http.Error: nosniff, and a newline.
		w.Header().Set("X-Content-Type-Options", "nosniff")
		w.WriteHeader(http.StatusServiceUnavailable)
		_, _ = io.WriteString(w, `{"health":"false"}`+"\n")
		return
	}
	_, _ = io.WriteString(w, `{"health":"true"}`)
}

// serveStatsSelf is etcd's /v2/stats/self.
func (h *Handler) serveStatsSelf(w http.ResponseWriter, r *http.Request) {
	h.serveNodeStats(w, r, func(n *raftkv.Node) any { return n.SelfStats() })
}

// serveStatsStore is etcd's /v2/stats/store: the store's operation
// counters since the member started, and its live watchers.
func (h *Handler) serveStatsStore(w http.ResponseWriter, r *http.Request) {
	h.serveNodeStats(w, r, func(n *raftkv.Node) any { return n.StoreStats() })
}

// serveNodeStats answers a GET with the running node's stats, written as
// etcd writes them (json.Marshal: no trailing newline).
func (h *Handler) serveNodeStats(w http.ResponseWriter, r *http.Request, stats func(*raftkv.Node) any) {
	if !allowMethod(w, r, "GET") {
		return
	}
	n := h.node()
	if n == nil {
		writeMessage(w, http.StatusServiceUnavailable, errNotRunning)
		return
	}
	writeJSON(w, http.StatusOK, stats(n), false)
}

// leaderStats is etcd's /v2/stats/leader shape.
type leaderStats struct {
	Leader    string                          `json:"leader"`
	Followers map[string]raftkv.FollowerStats `json:"followers"`
}

// serveStatsLeader is etcd's /v2/stats/leader: served by the leader only;
// other members answer 403 "not current leader", as etcd's do.
func (h *Handler) serveStatsLeader(w http.ResponseWriter, r *http.Request) {
	if !allowMethod(w, r, "GET") {
		return
	}
	n := h.node()
	if n == nil {
		writeMessage(w, http.StatusServiceUnavailable, errNotRunning)
		return
	}
	leader, followers, ok := n.LeaderStats()
	if !ok {
		writeMessage(w, http.StatusForbidden, "not current leader")
		return
	}
	if followers == nil {
		// A cluster of one: etcd writes "followers":{}, never null.
		followers = map[string]raftkv.FollowerStats{}
	}
	writeJSON(w, http.StatusOK, leaderStats{Leader: leader, Followers: followers}, false)
}
