package raftkv

import (
	"cmp"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"slices"
	"strconv"
	"time"

	"github.com/etcaddy/etcaddy/storage"
	"go.etcd.io/raft/v3"
	"go.etcd.io/raft/v3/raftpb"
	"go.etcd.io/raft/v3/tracker"
	"go.uber.org/zap"
)

// Errors of membership changes, worded as etcd's membership package words
// them (the /v2/members handler sends them to clients).
var (
	ErrMemberNotFound = errors.New("membership: member not found")
	ErrMemberRemoved  = errors.New("membership: member removed")
	ErrPeerURLExists  = errors.New("membership: peerURL exists")
	ErrIDExists       = errors.New("membership: ID exists")
	// ErrLastMember refuses to remove the only voter: Raft cannot run
	// without one.
	ErrLastMember = errors.New("raftkv: cannot remove the last member of the cluster")
	// ErrNoTransferee is returned by TransferLeadership when there is no
	// other voter to hand leadership to.
	ErrNoTransferee = errors.New("raftkv: no other voting member to transfer leadership to")
	// ErrTransfereeUnreachable is returned by TransferLeadership when the
	// member to hand leadership to does not answer this one (stopped, or
	// cut off): it could not take over, and the cluster would wait an
	// election timeout for nothing.
	ErrTransfereeUnreachable = errors.New("raftkv: the member to transfer leadership to is not reachable")
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

// PeerHandler serves this member's peer endpoint: POST /raft (message
// batches), POST /raft/snapshot (snapshots) and GET /raft/members (the
// member list a joining member reads). It may be taken before Start; until
// the member runs it answers 503.
func (n *Node) PeerHandler() http.Handler { return peerEntry{n} }

type peerEntry struct{ n *Node }

func (e peerEntry) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h := e.n.peerH.Load()
	if h == nil {
		// At once, whatever the body: a peer's stream does not end.
		AnswerBeforeBody(w, r)
		http.Error(w, "member not running", http.StatusServiceUnavailable)
		return
	}
	h.ServeHTTP(w, r)
}

// AddMember proposes a new member with the given peer URLs (a ConfChange)
// and returns it once the change is applied here. The new member starts
// later with initial_cluster_state existing.
//
// Its ID is etcd's for a member added at run time: the hash of its sorted
// peer URLs, the cluster token and the current Unix time. Changes are
// checked against this member's list as etcd checks them: a peer URL in
// use gives ErrPeerURLExists, before the change is proposed and again
// when the leader takes it (judgeConf), so of two concurrent additions of
// one peer URL one fails. The strict reconfiguration check may refuse it
// (SetStrictReconfigCheck).
func (n *Node) AddMember(ctx context.Context, peerURLs []string) (Member, error) {
	urls, err := NormalizeURLs(peerURLs)
	if err != nil {
		return Member{}, err
	}
	if err := n.checkRunning(); err != nil {
		return Member{}, err
	}
	n.confMu.Lock()
	defer n.confMu.Unlock()
	// The removed IDs are never reused: the same peer URLs added again
	// within the second of their removal take the next second's ID (etcd's
	// add fails with a 500 then).
	var id uint64
	for sec := time.Now().Unix(); id == 0 || n.isRemoved(id); sec++ {
		id = memberID(urls, n.cfg.InitialClusterToken+strconv.FormatInt(sec, 10))
	}
	m := memberRecord{ID: id, PeerURLs: urls}
	// etcd's order: the strict check before it proposes, the conflicts
	// when it applies.
	sc, err := n.checkStrict(n.strictAdd)
	if err != nil {
		return Member{}, err
	}
	cc := &raftpb.ConfChange{Type: raftpb.ConfChangeAddNode.Enum(), NodeId: new(id), Context: encodeAddContext(m, sc)}
	if err := n.confConflict(cc); err != nil {
		return Member{}, err
	}
	if err := n.changeMembership(ctx, cc); err != nil {
		return Member{}, err
	}
	return Member{ID: id, PeerURLs: urls, ClientURLs: []string{}}, nil
}

// RemoveMember proposes the removal of a member and returns once applied.
// Removing the leader first hands leadership to another member, so the
// cluster does not wait out an election timeout. The strict
// reconfiguration check may refuse it (SetStrictReconfigCheck).
func (n *Node) RemoveMember(ctx context.Context, id uint64) error {
	if err := n.checkRunning(); err != nil {
		return err
	}
	n.confMu.Lock()
	defer n.confMu.Unlock()
	cc := &raftpb.ConfChange{Type: raftpb.ConfChangeRemoveNode.Enum(), NodeId: new(id)}
	if err := n.confConflict(cc); err != nil {
		return err
	}
	sc, err := n.checkStrict(func() error { return n.strictRemove(id) })
	if err != nil {
		return err
	}
	if sc.Strict {
		cc.Context = encodeJSON(sc)
	}
	if id == n.leader.Load() && id == n.id {
		tctx, cancel := context.WithTimeout(ctx, n.cfg.ElectionTimeout)
		if err := n.TransferLeadership(tctx); err != nil {
			n.lg.Warn("leadership transfer before removing the leader failed", zap.Error(err))
		}
		cancel()
	}
	err = n.changeMembership(ctx, cc)
	if errors.Is(err, ErrStopped) && id == n.id && n.gone.Load() {
		// The others applied it and stopped talking to this member before
		// it saw the commit: it learnt of its removal from their 410s.
		return nil
	}
	return err
}

// knownMember refuses a change to a member the cluster removed or never
// had, with etcd's errors.
func (n *Node) knownMember(id uint64) error {
	switch {
	case n.isRemoved(id):
		return ErrMemberRemoved
	case !n.hasMember(id):
		return ErrMemberNotFound
	}
	return nil
}

// UpdateMember proposes new peer URLs for a member and returns once applied.
func (n *Node) UpdateMember(ctx context.Context, id uint64, peerURLs []string) error {
	urls, err := NormalizeURLs(peerURLs)
	if err != nil {
		return err
	}
	if err := n.checkRunning(); err != nil {
		return err
	}
	n.confMu.Lock()
	defer n.confMu.Unlock()
	m := memberRecord{ID: id, PeerURLs: urls}
	cc := &raftpb.ConfChange{Type: raftpb.ConfChangeUpdateNode.Enum(), NodeId: new(id), Context: encodeMember(m)}
	if err := n.confConflict(cc); err != nil {
		return err
	}
	return n.changeMembership(ctx, cc)
}

func (n *Node) checkRunning() error {
	if !n.running.Load() {
		return ErrStopped
	}
	return nil
}

func (n *Node) hasMember(id uint64) bool {
	_, ok := n.member(id)
	return ok
}

// peerURLUsed reports whether a member other than except already has one
// of urls.
func (n *Node) peerURLUsed(urls []string, except uint64) bool {
	for _, m := range n.memberSnapshot() {
		if m.ID == except {
			continue
		}
		for _, u := range m.PeerURLs {
			if slices.Contains(urls, u) {
				return true
			}
		}
	}
	return false
}

// changeMembership proposes cc and waits until this member has applied it.
// The leader holds a change while another is pending (see proposeConf), so
// Raft does not turn it into an empty entry, and hands the changes it holds
// to the new leader when it loses leadership; an attempt lost otherwise is
// proposed again (same ID) after two election timeouts, until ctx ends, not
// at once on a leader change as data is: the copies a fast retry leaves in
// the log are judged only by the leader that takes them, against the
// verdicts it has seen (judgeConf). A copy that reaches the log after the
// first one is applied is turned into a no-op there.
//
// It returns the leader's refusal when the change conflicts with one that
// entered the log first (judgeConf): ErrIDExists, ErrPeerURLExists,
// ErrMemberNotFound, ErrMemberRemoved.
func (n *Node) changeMembership(ctx context.Context, cc *raftpb.ConfChange) error {
	if ctx.Err() != nil {
		return ErrTimeout
	}
	cc.Id = new(n.ids.id())
	n.lg.Info("proposing a membership change", zap.Stringer("type", cc.GetType()), zap.String("member-id", idString(cc.GetNodeId())))
	res, err := n.submit(ctx, cc.GetId(), proposal{cc: cc, c: newWaitChan()})
	if err != nil {
		return err
	}
	return res.err
}

// publish proposes this member's name, client URLs and features once it
// runs, when the cluster's record of them differs, as etcd publishes its
// attributes after start: every member's /v2/members then lists its client
// URLs. It retries until it succeeds or the member stops. Each attempt
// proposes the URLs advertised then, so a publish that a later change of
// them (SetAdvertiseClientURLs, which starts another) overtakes ends with
// the same record.
func (n *Node) publish() {
	defer n.bg.Done()
	for n.bgCtx.Err() == nil {
		want := memberAttributes{Name: n.cfg.Name, ClientURLs: n.advertised(), Features: slices.Clone(buildFeatures)}
		if want.ClientURLs == nil {
			want.ClientURLs = []string{}
		}
		epoch, changed := n.retryEpoch.wait(), n.leaderChanged.wait()
		if m, ok := n.member(n.id); ok {
			if m.Name == want.Name && slices.Equal(m.ClientURLs, want.ClientURLs) && slices.Equal(m.Features, want.Features) {
				return
			}
			if n.leader.Load() != 0 {
				ctxData, err := json.Marshal(attributesContext{Attributes: &want})
				if err != nil {
					n.lg.Error("encoding member attributes", zap.Error(err))
					return
				}
				ctx, cancel := context.WithTimeout(n.bgCtx, 10*n.cfg.ElectionTimeout)
				cc := &raftpb.ConfChange{Type: raftpb.ConfChangeUpdateNode.Enum(), NodeId: new(n.id), Context: ctxData}
				n.confMu.Lock()
				err = n.changeMembership(ctx, cc)
				n.confMu.Unlock()
				cancel()
				if errors.Is(err, ErrStopped) || n.bgCtx.Err() != nil {
					return
				}
				if err != nil {
					n.lg.Warn("publishing member attributes failed; retrying", zap.Error(err))
				}
				continue
			}
		}
		// Not a member yet (a joining member catching up), or no leader:
		// look again when a leader is known, or after an election timeout.
		select {
		case <-epoch:
		case <-changed:
		case <-n.bgCtx.Done():
			return
		}
	}
}

// LeaderStats is /v2/stats/leader; ok is false when this member is not the
// leader. Latency is the round-trip time, in milliseconds, of the message
// batches (appends and heartbeats) POSTed to each follower; the counts are
// those batches that succeeded or failed.
func (n *Node) LeaderStats() (leader string, followers map[string]FollowerStats, ok bool) {
	if !n.running.Load() || n.leader.Load() != n.id {
		return "", nil, false
	}
	stats := n.tr.followerStats()
	followers = make(map[string]FollowerStats)
	for _, m := range n.memberSnapshot() {
		if m.ID != n.id {
			followers[idString(m.ID)] = stats[m.ID]
		}
	}
	return idString(n.id), followers, true
}

// TransferLeadership hands leadership to another member if this one leads,
// waiting at most until ctx ends. Stop calls it. The transferee is the
// voter whose log is furthest along, so the hand-over is quickest.
func (n *Node) TransferLeadership(ctx context.Context) error {
	err := n.transferLeadership(ctx, 0)
	if errors.Is(err, ErrNotLeader) {
		return nil
	}
	return err
}

// transferLeadership hands leadership to the voter to (0: the reachable one
// whose log is furthest along) and waits until this member knows of another
// leader. Raft gives a transfer up when the transferee has not taken over
// within an election timeout; this member then leads on and the wait lasts
// until ctx ends, or until the transferee stops answering.
func (n *Node) transferLeadership(ctx context.Context, to uint64) error {
	if err := n.checkRunning(); err != nil {
		return err
	}
	if n.leader.Load() != n.id {
		return ErrNotLeader
	}
	changed := n.leaderChanged.wait()
	type choice struct {
		to  uint64
		err error
	}
	picked := make(chan choice, 1)
	pick := func() {
		// Raft's TransferLeader must run on the loop goroutine, which
		// also knows for sure whether this member still leads.
		if n.rn.BasicStatus().RaftState != raft.StateLeader {
			picked <- choice{err: ErrNotLeader}
			return
		}
		var best uint64
		for _, id := range n.followersByMatch() {
			if to == 0 || id == to {
				best = id
				break
			}
		}
		switch {
		case best != 0 && n.activeSince(best).IsZero():
			picked <- choice{err: fmt.Errorf("%w: %s", ErrTransfereeUnreachable, idString(best))}
		case best != 0:
			n.rn.TransferLeader(best)
			n.lg.Info("transferring leadership", zap.String("from", idString(n.id)), zap.String("to", idString(best)))
			picked <- choice{to: best}
		case to != 0:
			picked <- choice{err: fmt.Errorf("%w: %s is not another voting member", ErrMemberNotFound, idString(to))}
		default:
			picked <- choice{err: ErrNoTransferee}
		}
	}
	select {
	case n.ctrlc <- pick:
	case <-ctx.Done():
		return ErrTimeout
	case <-n.donec:
		return ErrStopped
	}
	var c choice
	select {
	case c = <-picked:
	case <-n.donec: // the loop ended (a panic in pick, say)
		return ErrStopped
	}
	if c.err != nil {
		return c.err
	}
	// A transferee that stops answering (it was stopping too) cannot take
	// over: look every heartbeat, and give up when two looks in a row find
	// it unreachable (one failed request alone may be a blip).
	tick := time.NewTicker(n.cfg.HeartbeatInterval)
	defer tick.Stop()
	unreachable := 0
	for {
		if l := n.leader.Load(); l != n.id && l != 0 {
			return nil
		}
		select {
		case <-changed:
			changed = n.leaderChanged.wait()
		case <-tick.C:
			if !n.activeSince(c.to).IsZero() {
				unreachable = 0
				continue
			}
			if unreachable++; unreachable >= 2 {
				n.abortTransfer(ctx, c.to)
				return fmt.Errorf("%w: %s", ErrTransfereeUnreachable, idString(c.to))
			}
		case <-ctx.Done():
			return ErrTimeout
		case <-n.donec:
			return ErrStopped
		}
	}
}

// joinMembers learns the cluster a member joins with initial cluster state
// "existing", as etcd does (GetClusterFromRemotePeers): it asks the peers
// of the initial cluster for the member list, finds itself there by its
// peer URLs (AddMember must have added it) and takes the cluster ID from
// the answer.
func (n *Node) joinMembers(st *storage.Store) error {
	mine, ok := n.cfg.InitialCluster[n.cfg.Name]
	if !ok {
		return fmt.Errorf("raftkv: couldn't find local name %q in the initial cluster configuration", n.cfg.Name)
	}
	if err := checkDuplicateURLs(n.cfg.InitialCluster); err != nil {
		return err
	}
	myURLs, err := NormalizeURLs(mine)
	if err != nil {
		return fmt.Errorf("raftkv: initial cluster member %q: %w", n.cfg.Name, err)
	}
	ask := n.otherInitialPeerURLs()
	if len(ask) == 0 {
		return errors.New("raftkv: joining an existing cluster needs the other members in the initial cluster")
	}
	client := newPeerClient(n.cfg.Peer.TLS, n.cfg.Peer.H2C)
	defer client.CloseIdleConnections()
	var lastErr error
	for _, u := range ask {
		members, cid, err := fetchMembers(context.Background(), client, u, 5*time.Second)
		if err != nil {
			lastErr = err
			continue
		}
		var self *memberRecord
		for i := range members {
			if slices.Equal(members[i].PeerURLs, myURLs) {
				self = &members[i]
			}
		}
		if self == nil {
			// The same endpoints spelled otherwise (an address for a name,
			// as DNS SRV records may give them): etcd compares resolved.
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			for i := range members {
				if self == nil && sameURLsResolved(ctx, n.resolver(), members[i].PeerURLs, myURLs) {
					self = &members[i]
				}
			}
			cancel()
		}
		if self == nil {
			// This peer may not have applied the addition yet: ask the next.
			var listed []string
			for _, m := range members {
				listed = append(listed, m.PeerURLs...)
			}
			lastErr = fmt.Errorf("raftkv: the cluster at %s has no member with peer URLs %v (it has %v): add it first (member add)", u, myURLs, listed)
			continue
		}
		if err := n.checkJoinList(members); err != nil {
			return err
		}
		n.id, n.clusterID = self.ID, cid
		slices.SortFunc(members, func(a, b memberRecord) int { return cmpUint64(a.ID, b.ID) })
		n.members = members
		if err := n.saveIdentity(st); err != nil {
			return err
		}
		n.lg.Info("joining an existing cluster", zap.String("member-id", idString(n.id)),
			zap.String("cluster-id", idString(cid)), zap.Int("members", len(members)))
		return nil
	}
	return fmt.Errorf("raftkv: cannot fetch the cluster's members from %v: %w", ask, lastErr)
}

// checkJoinList is etcd's ValidateClusterAndAssignIDs: the initial cluster
// a member joins with must list the cluster's members as they are, each
// with its peer URLs (spelled otherwise where they resolve to the same
// endpoints), or the member does not start. A list out of step with the
// cluster (a member replaced or moved since, one left out) is a
// configuration that no longer describes it.
func (n *Node) checkJoinList(members []memberRecord) error {
	if len(members) != len(n.cfg.InitialCluster) {
		return fmt.Errorf("raftkv: the initial cluster does not match the cluster this member joins: member count is unequal (%d in initial_cluster, %d in the cluster)",
			len(n.cfg.InitialCluster), len(members))
	}
	var local [][]string
	for _, name := range slices.Sorted(maps.Keys(n.cfg.InitialCluster)) {
		urls, err := NormalizeURLs(n.cfg.InitialCluster[name])
		if err != nil {
			return fmt.Errorf("raftkv: initial cluster member %q: %w", name, err)
		}
		local = append(local, urls)
	}
	// Spelled alike first; only what is left is looked up (etcd gives the
	// lookups of a join's URLs 30 s in all).
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	same := []func(a, b []string) bool{
		slices.Equal[[]string],
		func(a, b []string) bool { return sameURLsResolved(ctx, n.resolver(), a, b) },
	}
	matched := make([]bool, len(local))
	found := make([]bool, len(members))
	for _, eq := range same {
		for i, m := range members {
			for j, urls := range local {
				if !found[i] && !matched[j] && eq(m.PeerURLs, urls) {
					found[i], matched[j] = true, true
				}
			}
		}
	}
	for i, m := range members {
		if !found[i] {
			return fmt.Errorf("raftkv: the initial cluster does not match the cluster this member joins: no match found for existing member (%s, %v)",
				idString(m.ID), m.PeerURLs)
		}
	}
	return nil
}

// otherInitialPeerURLs lists the peer URLs of the initial cluster's other
// members, sorted: whom a starting member asks about the cluster.
func (n *Node) otherInitialPeerURLs() []string {
	var urls []string
	for name, u := range n.cfg.InitialCluster {
		if name != n.cfg.Name {
			urls = append(urls, u...)
		}
	}
	slices.Sort(urls)
	return urls
}

// fetchMembers reads a peer's GET /raft/members, waiting at most timeout,
// or until ctx ends.
func fetchMembers(ctx context.Context, client *http.Client, peerURL string, timeout time.Duration) ([]memberRecord, uint64, error) {
	return fetchMembersAt(ctx, client, peerURL+peerMembersPath, headerPeerClusterID, timeout)
}

// etcdMembersPath is an etcd member's peer endpoint that lists the
// cluster's members (the same JSON as GET /raft/members), which an etcd
// proxy reads.
const etcdMembersPath = "/members"

// fetchMembersAt reads a member list from u, the cluster ID from the
// header clusterHeader.
func fetchMembersAt(ctx context.Context, client *http.Client, u, clusterHeader string, timeout time.Duration) ([]memberRecord, uint64, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, 0, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, 0, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return nil, 0, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, 0, fmt.Errorf("%s: %s", resp.Status, body)
	}
	cid, err := strconv.ParseUint(resp.Header.Get(clusterHeader), 16, 64)
	if err != nil {
		return nil, 0, fmt.Errorf("%s: no cluster ID in the answer", u)
	}
	members, err := decodeMembers(body)
	if err != nil {
		return nil, 0, err
	}
	return members, cid, nil
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

// abortTransfer ends a transfer to member to that Raft still has under
// way: while one is, the leader drops every proposal.
func (n *Node) abortTransfer(ctx context.Context, to uint64) {
	abort := func() {
		if n.rn.BasicStatus().LeadTransferee == to {
			n.rn.TransferLeader(n.id) // aborts the transfer, and asks for nothing
			n.lg.Info("leadership transfer given up: the transferee does not answer", zap.String("to", idString(to)))
		}
	}
	select {
	case n.ctrlc <- abort:
	case <-ctx.Done():
	case <-n.donec:
	}
}

// followersByMatch lists the voters other than this leader: those heard
// from lately (Raft's RecentActive) that also answer this member's messages
// now first, the most caught-up first among them. Loop goroutine only.
func (n *Node) followersByMatch() []uint64 {
	type follower struct {
		id, match uint64
		active    bool
	}
	var fs []follower
	n.rn.WithProgress(func(id uint64, typ raft.ProgressType, pr tracker.Progress) {
		if id != n.id && !pr.IsLearner && typ == raft.ProgressTypePeer {
			fs = append(fs, follower{id, pr.Match, pr.RecentActive && !n.activeSince(id).IsZero()})
		}
	})
	slices.SortStableFunc(fs, func(a, b follower) int {
		if a.active != b.active {
			if a.active {
				return -1
			}
			return 1
		}
		return cmp.Compare(b.match, a.match)
	})
	ids := make([]uint64, len(fs))
	for i, f := range fs {
		ids[i] = f.id
	}
	return ids
}

// handOver asks member to to campaign at once (Raft's MsgTimeoutNow, as a
// leadership transfer ends): a leader just removed, which stepped down
// when it applied its removal, sends it after the messages that carry the
// removal's commit. The receiver campaigns without pre-vote and despite
// its leader lease, once it has applied that commit (stepTimeoutNow).
func (n *Node) handOver(to uint64) {
	n.lg.Info("handing leadership over after this member's removal", zap.String("to", idString(to)))
	n.send([]*raftpb.Message{{
		Type: raftpb.MsgTimeoutNow.Enum(),
		From: new(n.id),
		To:   new(to),
		Term: new(n.rn.BasicStatus().GetTerm()),
	}})
}
