package raftkv

import (
	"context"
	"crypto/tls"
	"errors"
	"net/http"
)

// Errors of membership changes, worded as etcd's membership package words
// them (the /v2/members handler sends them to clients).
var (
	ErrMemberNotFound = errors.New("membership: member not found")
	ErrMemberRemoved  = errors.New("membership: member removed")
	ErrPeerURLExists  = errors.New("membership: peerURL exists")
	ErrIDExists       = errors.New("membership: ID exists")
)

// PeerConfig is the client side of peer traffic: how this member dials the
// others. The server side is Caddy's: the raftkv_peer handler serves
// Node.PeerHandler in a site whose TLS and client_auth Caddy manages.
type PeerConfig struct {
	// TLS is used for https:// peer URLs: the member's client certificate
	// and the cluster CA it trusts. Nil: the system's defaults.
	TLS *tls.Config
	// H2C speaks HTTP/2 without TLS to http:// peers (only when the peer
	// site is configured for h2c).
	H2C bool
}

// PeerHandler serves this member's peer endpoint (/raft, /raft/snapshot).
// TODO(cluster): implemented by the cluster work.
func (n *Node) PeerHandler() http.Handler { panic("not implemented") }

// AddMember proposes a new member with the given peer URLs (a ConfChange)
// and returns it once the change is applied here. The new member starts
// later with initial_cluster_state existing.
func (n *Node) AddMember(ctx context.Context, peerURLs []string) (Member, error) {
	panic("not implemented")
}

// RemoveMember proposes the removal of a member and returns once applied.
func (n *Node) RemoveMember(ctx context.Context, id uint64) error { panic("not implemented") }

// UpdateMember proposes new peer URLs for a member and returns once applied.
func (n *Node) UpdateMember(ctx context.Context, id uint64, peerURLs []string) error {
	panic("not implemented")
}

// FollowerStats is one follower's entry in /v2/stats/leader.
type FollowerStats struct {
	Latency struct {
		Current           float64 `json:"current"`
		Average           float64 `json:"average"`
		StandardDeviation float64 `json:"standardDeviation"`
		Minimum           float64 `json:"minimum"`
		Maximum           float64 `json:"maximum"`
	} `json:"latency"`
	Counts struct {
		Fail    uint64 `json:"fail"`
		Success uint64 `json:"success"`
	} `json:"counts"`
}

// LeaderStats is /v2/stats/leader; ok is false when this member is not the
// leader.
func (n *Node) LeaderStats() (leader string, followers map[string]FollowerStats, ok bool) {
	panic("not implemented")
}

// TransferLeadership hands leadership to another member if this one leads,
// waiting at most until ctx ends. Stop calls it.
func (n *Node) TransferLeadership(ctx context.Context) error { panic("not implemented") }
