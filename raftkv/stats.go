package raftkv

import (
	"strconv"
	"sync"
	"time"

	"github.com/etcaddy/etcaddy/storage"
)

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

// SelfStats returns /v2/stats/self. As in etcd, the state is
// "StateLeader" or "StateFollower" (a candidate reports as a follower), and
// the leader info tells since when the current leader is known.
func (n *Node) SelfStats() SelfStats {
	if !n.booted.Load() {
		return SelfStats{State: "StateFollower"}
	}
	now := time.Now()
	s := SelfStats{
		Name:                 n.cfg.Name,
		ID:                   idString(n.id),
		State:                "StateFollower",
		StartTime:            n.startTime,
		RecvAppendRequestCnt: n.recvAppends.Load(),
		SendAppendRequestCnt: n.sendAppends.Load(),
	}
	s.RecvPkgRate, s.RecvBandwidthRate = n.recvRate.rates(now)
	s.SendPkgRate, s.SendBandwidthRate = n.sendRate.rates(now)
	lead := n.leader.Load()
	if lead != 0 && lead == n.id {
		s.State = "StateLeader"
	}
	if lead != 0 {
		s.LeaderInfo.Leader = idString(lead)
	}
	if ns := n.leaderSince.Load(); ns != 0 {
		s.LeaderInfo.StartTime = time.Unix(0, ns)
	}
	s.LeaderInfo.Uptime = time.Since(s.LeaderInfo.StartTime).String()
	return s
}

// Metrics is the member's state for monitoring, what etcd exports as
// etcd_server_has_leader, etcd_server_leader_changes_seen_total and the
// like (caddymodule names them so).
type Metrics struct {
	ID            uint64 // 0 before the member knows its identity
	HasLeader     bool
	IsLeader      bool
	LeaderChanges uint64 // leaders this member has seen since it started, as etcd counts them: a new one after none counts too
	Committed     uint64 // the committed Raft index
	Applied       uint64 // the applied Raft index
	Watchers      uint64 // watches open on this member
	// Proposals made on this member (writes, membership changes) waiting
	// for their outcome, and those that failed (timed out, or the member
	// stopped), as etcd counts them.
	ProposalsPending int64
	ProposalsFailed  uint64
}

// Metrics returns the member's Metrics.
func (n *Node) Metrics() Metrics {
	if !n.booted.Load() {
		return Metrics{}
	}
	lead := n.leader.Load()
	return Metrics{
		ID:               n.id,
		HasLeader:        lead != 0,
		IsLeader:         lead != 0 && lead == n.id,
		LeaderChanges:    n.leaderNews.Load(),
		Committed:        n.committed.Load(),
		Applied:          n.applied.Load(),
		ProposalsPending: n.proposalsPending.Load(),
		ProposalsFailed:  n.proposalsFailed.Load(),
		Watchers:         n.StoreStats().Watchers,
	}
}

// StoreStats returns /v2/stats/store counters (including live watchers).
func (n *Node) StoreStats() storage.Stats {
	if !n.running.Load() {
		return storage.Stats{}
	}
	return n.store.Stats()
}

// idString formats a member or cluster ID as etcd's types.ID does:
// lowercase hex without padding.
func idString(id uint64) string { return strconv.FormatUint(id, 16) }

// rateSamples is how many messages a rateQueue remembers (etcd's
// queueCapacity).
const rateSamples = 200

// rateQueue is etcd's statsQueue: the last rateSamples append messages
// sent (or received), whose number and size per second over the time they
// span are /v2/stats/self's send (recv) PkgRate and BandwidthRate. Both are
// 0, and left out, when the last message is over a second old.
type rateQueue struct {
	mu    sync.Mutex
	at    [rateSamples]int64 // unix nanoseconds
	size  [rateSamples]int
	next  int // where the next sample goes
	n     int // samples held
	bytes int // their total size
}

func (q *rateQueue) add(now time.Time, size int) {
	q.mu.Lock()
	if q.n == rateSamples {
		q.bytes -= q.size[q.next]
	} else {
		q.n++
	}
	q.at[q.next], q.size[q.next] = now.UnixNano(), size
	q.bytes += size
	q.next = (q.next + 1) % rateSamples
	q.mu.Unlock()
}

func (q *rateQueue) rates(now time.Time) (pkg, bandwidth float64) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.n == 0 {
		return 0, 0
	}
	last := q.at[(q.next+rateSamples-1)%rateSamples]
	if now.UnixNano()-last > int64(time.Second) {
		q.n, q.bytes = 0, 0
		return 0, 0
	}
	first := q.at[(q.next+rateSamples-q.n)%rateSamples]
	span := float64(last - first)
	if span <= 0 {
		return 0, 0
	}
	return float64(q.n) / span * float64(time.Second), float64(q.bytes) / span * float64(time.Second)
}
