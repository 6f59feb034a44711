package raftkv

import (
	"strconv"
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
	s := SelfStats{
		Name:                 n.cfg.Name,
		ID:                   idString(n.id),
		State:                "StateFollower",
		StartTime:            n.startTime,
		RecvAppendRequestCnt: n.recvAppends.Load(),
		SendAppendRequestCnt: n.sendAppends.Load(),
	}
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
