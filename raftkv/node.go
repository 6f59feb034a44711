package raftkv

import (
	"context"
	"errors"
	"time"

	"github.com/etcaddy/etcaddy/storage"
	"go.uber.org/zap"
)

// Errors of Node.
var (
	ErrStopped = errors.New("raftkv: node stopped")
	// ErrTimeout is returned when a request's context ends before its
	// proposal was applied; the handler answers etcd's 500/300
	// "etcdserver: request timed out".
	ErrTimeout = errors.New("etcdserver: request timed out")
)

// Config is a member's configuration. Zero values take etcd's defaults.
type Config struct {
	Name                string              // member name; default "default"
	DataDir             string              // required
	SnapshotCount       uint64              // applied entries between snapshots; default 10000
	HeartbeatInterval   time.Duration       // default 100ms
	ElectionTimeout     time.Duration       // default 1000ms
	InitialCluster      map[string][]string // name -> peer URLs; default {Name: [InitialAdvertisePeerURLs...]} or {Name: ["http://localhost:2380"]}
	InitialClusterState string              // "new" (default) or "existing"
	InitialClusterToken string              // default "etcd-cluster"
	AdvertiseClientURLs []string            // may be empty: the handler then answers with the URL the request came in on
	Logger              *zap.Logger
}

// Node is one running member. Create it with NewNode (cheap, no I/O), then
// Start it; Stop ends it. All methods are safe for concurrent use.
type Node struct {
	cfg Config
	// TODO(raftkv)
}

// NewNode returns a node that has not started: no file is opened.
func NewNode(cfg Config) *Node { return &Node{cfg: cfg} }

// Start opens the store, restores Raft state and starts the Raft loop, the
// ticker and the reaper. Calling Start on a started node does nothing.
func (n *Node) Start() error { panic("not implemented") }

// Stop stops the loop (transferring leadership first when there are other
// members), waits for it and closes the store. Waiting requests get
// ErrStopped. Safe to call more than once.
func (n *Node) Stop() error { panic("not implemented") }

// Running reports whether Start succeeded and Stop has not been called.
func (n *Node) Running() bool { panic("not implemented") }

// Do proposes a write and waits until it is applied on this member, retrying
// a proposal Raft dropped until ctx ends. A v2 failure (412, 404, ...) is
// returned as a *storage.Error; ctx ending gives ErrTimeout.
func (n *Node) Do(ctx context.Context, r storage.Request) (*storage.Event, error) {
	panic("not implemented")
}

// Get reads a key. With quorum it first obtains a read index through Raft
// (a fresh request context per attempt) and waits until this member has
// applied it: linearizable. Without quorum it reads local state.
func (n *Node) Get(ctx context.Context, path string, recursive, sorted, quorum bool) (*storage.Event, error) {
	panic("not implemented")
}

// Watch registers a v2 watcher on this member's store.
func (n *Node) Watch(path string, recursive, stream bool, sinceIndex uint64) (*storage.Watcher, error) {
	panic("not implemented")
}

// Status is a point-in-time view of the member for response headers and
// stats.
type Status struct {
	ID          uint64 // member ID
	ClusterID   uint64
	Leader      uint64 // 0 when there is none
	Term        uint64
	RaftIndex   uint64 // the committed Raft index (X-Raft-Index)
	EtcdIndex   uint64 // the store index (X-Etcd-Index)
	IsLeader    bool
	StartTime   time.Time
	LeaderSince time.Time // when the current leader became known
}

// Status returns the member's current status.
func (n *Node) Status() Status { panic("not implemented") }

// Member is one entry of /v2/members.
type Member struct {
	ID         uint64
	Name       string
	PeerURLs   []string
	ClientURLs []string
}

// Members lists the cluster's members, sorted by ID.
func (n *Node) Members() []Member { panic("not implemented") }

// StoreStats returns /v2/stats/store counters (including live watchers).
func (n *Node) StoreStats() storage.Stats { panic("not implemented") }

// SelfStats returns /v2/stats/self.
func (n *Node) SelfStats() SelfStats { panic("not implemented") }

// SelfStats is etcd's /v2/stats/self shape.
type SelfStats struct {
	Name       string    `json:"name"`
	ID         string    `json:"id"`
	State      string    `json:"state"`
	StartTime  time.Time `json:"startTime"`
	LeaderInfo struct {
		Leader    string    `json:"leader"`
		Uptime    string    `json:"uptime"`
		StartTime time.Time `json:"startTime"`
	} `json:"leaderInfo"`
	RecvAppendRequestCnt uint64  `json:"recvAppendRequestCnt"`
	RecvPkgRate          float64 `json:"recvPkgRate,omitempty"`
	RecvBandwidthRate    float64 `json:"recvBandwidthRate,omitempty"`
	SendAppendRequestCnt uint64  `json:"sendAppendRequestCnt"`
	SendPkgRate          float64 `json:"sendPkgRate,omitempty"`
	SendBandwidthRate    float64 `json:"sendBandwidthRate,omitempty"`
}

// Healthy reports whether the member has a leader and can commit: /health.
func (n *Node) Healthy(ctx context.Context) bool { panic("not implemented") }
