package raftkv

import (
	"bytes"
	"crypto/sha1"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"maps"
	"net"
	"net/url"
	"slices"
	"strings"

	"github.com/etcaddy/etcaddy/storage"
	"go.etcd.io/raft/v3"
	"go.etcd.io/raft/v3/raftpb"
	"go.etcd.io/raft/v3/tracker"
	"go.uber.org/zap"
	"google.golang.org/protobuf/proto"
)

// Meta keys this package keeps in the store's meta bucket. The prefix keeps
// them apart from the store's own bookkeeping.
const (
	metaMemberID  = "raftkv/member_id"
	metaClusterID = "raftkv/cluster_id"
	metaMembers   = "raftkv/members"
	metaIDGen     = "raftkv/id_generation"
	metaRemoved   = "raftkv/removed_members"
	metaVerdicts  = "raftkv/conf_verdicts"
	metaConfIndex = "raftkv/conf_index" // see Node.confIndex
	// metaDiscovery holds the discovery URL this data directory's member
	// registered with (before it registers): its registration found at a
	// later start is its own, not another member's.
	metaDiscovery = "raftkv/discovery_registered"
)

// memberRecord is how a member is persisted and carried in the Context of
// its ConfChange, as etcd carries its Member JSON there.
type memberRecord struct {
	ID         uint64   `json:"id"`
	Name       string   `json:"name"`
	PeerURLs   []string `json:"peerURLs"`
	ClientURLs []string `json:"clientURLs,omitempty"`
	Features   []string `json:"features,omitempty"` // as published; see buildFeatures
}

// attributesContext is the Context of the ConfChangeUpdateNode a member
// proposes after it starts to publish its name and client URLs (etcd's
// publish, which writes the same attributes through its store). Raft
// ignores an update; the member lists of every member apply it in log
// order. A peer URL update (UpdateMember) carries a memberRecord instead.
type attributesContext struct {
	Attributes *memberAttributes `json:"attributes"`
}

type memberAttributes struct {
	Name       string   `json:"name"`
	ClientURLs []string `json:"clientURLs"`
	Features   []string `json:"features,omitempty"`
}

// buildFeatures are what this build can apply beyond the first release's
// entries, published with the member's attributes. A member of an
// earlier build publishes none (and ignores the field in others'), so a
// write only members with a feature can apply waits until every member
// has published it: ClusterHas. Like etcd's cluster version, which gates
// v2 auth during rolling upgrades.
var buildFeatures = []string{FeatureAuth}

// FeatureAuth: v2 auth's AUTHPUT and AUTHDELETE requests.
const FeatureAuth = "auth"

// ClusterHas reports whether every member has published feature (this
// member has every feature of its build). Until a member starts and
// publishes, it has none.
func (n *Node) ClusterHas(feature string) bool {
	n.membersMu.RLock()
	defer n.membersMu.RUnlock()
	for _, m := range n.members {
		if m.ID != n.id && !slices.Contains(m.Features, feature) {
			return false
		}
	}
	return true
}

// NormalizeURLs checks URLs as etcd's types.NewURLs does, with its
// messages, and returns them sorted, so that the same configuration
// written differently hashes to the same ID.
func NormalizeURLs(raw []string) ([]string, error) {
	if len(raw) == 0 {
		return nil, errors.New("no valid URLs given")
	}
	out := make([]string, 0, len(raw))
	for _, in := range raw {
		in = strings.TrimSpace(in)
		u, err := url.Parse(in)
		if err != nil {
			if hostWithColons(in) {
				// Go's url.Parse took such a host before 1.26, and etcd
				// 3.4's check of it then refused it so.
				return nil, fmt.Errorf(`URL address does not have the form "host:port": %s`, in)
			}
			return nil, err
		}
		switch u.Scheme {
		case "http", "https", "unix", "unixs":
		default:
			return nil, fmt.Errorf("URL scheme must be http, https, unix, or unixs: %s", in)
		}
		if _, _, err := net.SplitHostPort(u.Host); err != nil {
			return nil, fmt.Errorf(`URL address does not have the form "host:port": %s`, in)
		}
		if u.Path != "" {
			return nil, fmt.Errorf("URL must not contain a path: %s", in)
		}
		out = append(out, u.String())
	}
	slices.Sort(out)
	return out, nil
}

// hostWithColons reports whether the authority of the URL in has more
// than one colon outside brackets ("http://127.0.0.1:1:1").
func hostWithColons(in string) bool {
	_, rest, ok := strings.Cut(in, "://")
	if !ok {
		return false
	}
	if i := strings.IndexAny(rest, "/?#"); i >= 0 {
		rest = rest[:i]
	}
	if i := strings.LastIndex(rest, "@"); i >= 0 {
		rest = rest[i+1:]
	}
	return !strings.Contains(rest, "[") && strings.Count(rest, ":") > 1
}

// memberID is etcd's computeMemberID for a member of a new cluster: the
// first 8 bytes (big-endian) of sha1(sorted peer URLs joined, then the
// cluster token). Same inputs, same ID as etcd 3.4 gives: the default
// member "http://localhost:2380" in "etcd-cluster" is 8e9e05c52164694d.
func memberID(sortedPeerURLs []string, token string) uint64 {
	b := []byte(strings.Join(sortedPeerURLs, ""))
	b = append(b, token...)
	sum := sha1.Sum(b)
	return binary.BigEndian.Uint64(sum[:8])
}

// clusterID is etcd's RaftCluster.genID: sha1 over the sorted member IDs,
// 8 bytes each, big-endian; the first 8 bytes of the hash.
func clusterID(ids []uint64) uint64 {
	sorted := slices.Clone(ids)
	slices.Sort(sorted)
	b := make([]byte, 8*len(sorted))
	for i, id := range sorted {
		binary.BigEndian.PutUint64(b[8*i:], id)
	}
	sum := sha1.Sum(b)
	return binary.BigEndian.Uint64(sum[:8])
}

// initialMembers builds the bootstrap member list from the configuration,
// sorted by ID.
func initialMembers(cluster map[string][]string, token string) ([]memberRecord, error) {
	if err := checkDuplicateURLs(cluster); err != nil {
		return nil, err
	}
	// No two members share a URL, so none shares an ID.
	members := make([]memberRecord, 0, len(cluster))
	for name, raw := range cluster {
		urls, err := NormalizeURLs(raw)
		if err != nil {
			return nil, fmt.Errorf("raftkv: initial cluster member %q: %w", name, err)
		}
		members = append(members, memberRecord{ID: memberID(urls, token), Name: name, PeerURLs: urls})
	}
	slices.SortFunc(members, func(a, b memberRecord) int { return cmpUint64(a.ID, b.ID) })
	return members, nil
}

// checkDuplicateURLs refuses a peer URL given twice in the initial
// cluster, for one member or two, as etcd does when a member bootstraps or
// joins (checkDuplicateURL). Like etcd, a member that has started once
// reads its members from its data and never looks at the list again.
func checkDuplicateURLs(cluster map[string][]string) error {
	owner := make(map[string]string)
	for _, name := range slices.Sorted(maps.Keys(cluster)) {
		urls, err := NormalizeURLs(cluster[name])
		if err != nil {
			return fmt.Errorf("raftkv: initial cluster member %q: %w", name, err)
		}
		for _, u := range urls {
			if other, dup := owner[u]; dup {
				return fmt.Errorf("raftkv: the initial cluster has a duplicate URL: %s (members %q and %q)", u, other, name)
			}
			owner[u] = name
		}
	}
	return nil
}

func cmpUint64(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

func memberIDs(members []memberRecord) []uint64 {
	ids := make([]uint64, len(members))
	for i, m := range members {
		ids[i] = m.ID
	}
	return ids
}

func encodeMembers(members []memberRecord) []byte {
	b, err := json.Marshal(members)
	if err != nil {
		// A slice of plain structs always marshals.
		panic(err)
	}
	return b
}

func encodeMember(m memberRecord) []byte { return encodeJSON(m) }

// encodeAddContext is the context of an added member's ConfChange: its
// record, and what its proposer's strict check was made against.
func encodeAddContext(m memberRecord, sc strictCheck) []byte {
	return encodeJSON(struct {
		memberRecord
		strictCheck
	}{m, sc})
}

// encodeJSON marshals a value made of plain fields, which always marshals.
func encodeJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

func decodeMembers(b []byte) ([]memberRecord, error) {
	var members []memberRecord
	if err := json.Unmarshal(b, &members); err != nil {
		return nil, fmt.Errorf("raftkv: damaged member list in meta: %w", err)
	}
	return members, nil
}

func putUint64(v uint64) []byte {
	return binary.BigEndian.AppendUint64(nil, v)
}

func getUint64(b []byte) (uint64, bool) {
	if len(b) != 8 {
		return 0, false
	}
	return binary.BigEndian.Uint64(b), true
}

// Members lists the cluster's members, sorted by ID. This member's client
// URLs are the ones it advertises (SetAdvertiseClientURLs); other members'
// are those they published.
func (n *Node) Members() []Member {
	if !n.booted.Load() {
		return nil
	}
	n.membersMu.RLock()
	defer n.membersMu.RUnlock()
	out := make([]Member, 0, len(n.members))
	for _, m := range n.members {
		mm := Member{ID: m.ID, Name: m.Name, PeerURLs: slices.Clone(m.PeerURLs), ClientURLs: slices.Clone(m.ClientURLs)}
		if m.ID == n.id {
			mm.Name = n.cfg.Name
			mm.ClientURLs = n.advertised()
		}
		if mm.ClientURLs == nil {
			// etcd lists an unstarted member with "clientURLs":[], never null.
			mm.ClientURLs = []string{}
		}
		out = append(out, mm)
	}
	return out
}

// findMember returns the index of id in the sorted list.
func findMember(members []memberRecord, id uint64) (int, bool) {
	return slices.BinarySearchFunc(members, id, func(a memberRecord, id uint64) int { return cmpUint64(a.ID, id) })
}

// addMember records a member learnt from an applied ConfChange; it reports
// whether the list changed (and must be persisted). A removed ID never
// comes back: a conf change replayed after a snapshot that already holds
// its later removal must not resurrect it.
func (n *Node) addMember(m memberRecord) bool {
	n.membersMu.Lock()
	defer n.membersMu.Unlock()
	if n.removed[m.ID] {
		return false
	}
	i, found := findMember(n.members, m.ID)
	if found {
		return false
	}
	n.members = slices.Insert(n.members, i, m)
	return true
}

// removeMember drops a member removed by an applied ConfChange and
// remembers its ID for good.
func (n *Node) removeMember(id uint64) bool {
	n.membersMu.Lock()
	defer n.membersMu.Unlock()
	changed := !n.removed[id]
	if n.removed == nil {
		n.removed = make(map[uint64]bool)
	}
	n.removed[id] = true
	if i, found := findMember(n.members, id); found {
		n.members = slices.Delete(n.members, i, i+1)
		changed = true
	}
	return changed
}

// updateMember applies an UpdateNode's context: new peer URLs
// (UpdateMember) or published attributes (name and client URLs).
func (n *Node) updateMember(id uint64, ctx []byte) bool {
	var attrs attributesContext
	var rec memberRecord
	if json.Unmarshal(ctx, &attrs) != nil || attrs.Attributes == nil {
		attrs.Attributes = nil
		if json.Unmarshal(ctx, &rec) != nil || len(rec.PeerURLs) == 0 {
			return false
		}
	}
	n.membersMu.Lock()
	defer n.membersMu.Unlock()
	i, found := findMember(n.members, id)
	if !found {
		return false
	}
	m := &n.members[i]
	if a := attrs.Attributes; a != nil {
		if m.Name == a.Name && slices.Equal(m.ClientURLs, a.ClientURLs) && slices.Equal(m.Features, a.Features) {
			return false
		}
		m.Name, m.ClientURLs, m.Features = a.Name, slices.Clone(a.ClientURLs), slices.Clone(a.Features)
		return true
	}
	if slices.Equal(m.PeerURLs, rec.PeerURLs) {
		return false
	}
	m.PeerURLs = slices.Clone(rec.PeerURLs)
	return true
}

// member returns the record of id.
func (n *Node) member(id uint64) (memberRecord, bool) {
	n.membersMu.RLock()
	defer n.membersMu.RUnlock()
	if i, found := findMember(n.members, id); found {
		return n.members[i], true
	}
	return memberRecord{}, false
}

func (n *Node) isRemoved(id uint64) bool {
	n.membersMu.RLock()
	defer n.membersMu.RUnlock()
	return n.removed[id]
}

func (n *Node) memberSnapshot() []memberRecord {
	n.membersMu.RLock()
	defer n.membersMu.RUnlock()
	return slices.Clone(n.members)
}

// removedIDs lists the removed members, sorted.
func (n *Node) removedIDs() []uint64 {
	n.membersMu.RLock()
	defer n.membersMu.RUnlock()
	ids := make([]uint64, 0, len(n.removed))
	for id := range n.removed {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids
}

func encodeIDs(ids []uint64) []byte {
	b := make([]byte, 0, 8*len(ids))
	for _, id := range ids {
		b = binary.BigEndian.AppendUint64(b, id)
	}
	return b
}

func decodeIDs(b []byte) (map[uint64]bool, error) {
	if len(b)%8 != 0 {
		return nil, fmt.Errorf("raftkv: damaged removed member list in meta")
	}
	out := make(map[uint64]bool, len(b)/8)
	for ; len(b) > 0; b = b[8:] {
		out[binary.BigEndian.Uint64(b)] = true
	}
	return out, nil
}

// saveMembers persists the member list, the removed IDs, the verdicts and
// the index of the last change applied to them, in one commit.
func (n *Node) saveMembers() error {
	members := encodeMembers(n.memberSnapshot())
	return n.store.SetMetas(map[string][]byte{
		metaMembers:   members,
		metaRemoved:   encodeIDs(n.removedIDs()),
		metaVerdicts:  n.loop.verdicts.encode(),
		metaConfIndex: encodeConfIndex(n.confIndex.Load(), members),
	})
}

// encodeConfIndex is the saved conf index (see Node.confIndex): the index,
// and a hash of the encoded member list saved with it.
func encodeConfIndex(at uint64, members []byte) []byte {
	h := fnv.New64a()
	h.Write(members)
	return binary.BigEndian.AppendUint64(putUint64(at), h.Sum64())
}

// decodeConfIndex reads a saved conf index back, 0 (not known) unless it
// was saved with this member list: a version of this package that did
// not keep the index may have changed the list since.
func decodeConfIndex(b, members []byte) uint64 {
	if len(b) != 16 {
		return 0
	}
	if !bytes.Equal(encodeConfIndex(binary.BigEndian.Uint64(b), members), b) {
		return 0
	}
	return binary.BigEndian.Uint64(b)
}

// syncPeers makes the transport address exactly the current members and
// refuse the removed ones.
func (n *Node) syncPeers() {
	if n.tr == nil {
		return
	}
	members := n.memberSnapshot()
	for _, id := range n.removedIDs() {
		if id != n.id {
			n.tr.RemovePeer(id, n.loop.farewells[id])
		}
	}
	clear(n.loop.farewells)
	for _, m := range members {
		if m.ID == n.id {
			continue
		}
		if err := n.tr.AddPeer(m.ID, m.PeerURLs); err != nil {
			n.lg.Warn("cannot address member", zap.String("member-id", idString(m.ID)), zap.Strings("peer-urls", m.PeerURLs), zap.Error(err))
		}
	}
}

// applyConfChanges applies the committed conf changes of a Ready to Raft
// and to the member list, before the Ready is saved. It returns the
// resulting conf state (nil: none in this Ready) and whether it applied any
// (the member list, the verdicts and the conf index are then to be saved).
func (n *Node) applyConfChanges(ents []*raftpb.Entry) (*raftpb.ConfState, bool, error) {
	var cs *raftpb.ConfState
	changed := false
	for _, e := range ents {
		switch e.GetType() {
		case raftpb.EntryConfChange:
			cc := &raftpb.ConfChange{}
			if err := proto.Unmarshal(e.GetData(), cc); err != nil {
				return nil, false, fmt.Errorf("raftkv: damaged conf change at index %d: %w", e.GetIndex(), err)
			}
			if n.resurrects(cc.GetType(), cc.GetNodeId(), e.GetIndex()) {
				cc.NodeId = new(uint64(0))
			}
			cs = n.applyToRaft(cc)
			n.memberConfChange(cc.GetType(), cc.GetNodeId(), cc.GetContext())
			n.confIndex.Store(e.GetIndex())
			changed = true
			if id := cc.GetId(); id != 0 {
				code := refusal(cc)
				if n.loop.verdicts.add(id, code) {
					changed = true
				}
				// Its proposer hears once the Ready is saved.
				n.loop.confApplied = append(n.loop.confApplied,
					result{applied: storage.Applied{Index: e.GetIndex(), ID: id}, err: refusalErr(code)})
			}
		case raftpb.EntryConfChangeV2:
			cc := &raftpb.ConfChangeV2{}
			if err := proto.Unmarshal(e.GetData(), cc); err != nil {
				return nil, false, fmt.Errorf("raftkv: damaged conf change at index %d: %w", e.GetIndex(), err)
			}
			for _, c := range cc.GetChanges() {
				if n.resurrects(c.GetType(), c.GetNodeId(), e.GetIndex()) {
					c.NodeId = new(uint64(0))
				}
			}
			cs = n.applyToRaft(cc)
			for _, c := range cc.GetChanges() {
				n.memberConfChange(c.GetType(), c.GetNodeId(), cc.GetContext())
			}
			n.confIndex.Store(e.GetIndex())
			changed = true
		}
	}
	if cs != nil {
		n.loop.confState = cs
	}
	return cs, changed, nil
}

// applyToRaft applies one conf change to Raft, and on a leader prepares
// what the members it removes should still hear:
//
//   - A leader the change removes steps down there (StepDownOnRemoval), and
//     the others would elect a new one only after an election timeout. It
//     ranks its followers first, and once stepped down hands leadership to
//     the most caught-up one that stays, after this Ready's messages are
//     sent (handOver). Raft leaves this to the application (a TODO in its
//     switchToConfig); etcd leaves the cluster leaderless.
//   - Another member removed is no longer addressed: Raft drops its
//     progress, the transport its queue. Without a word it would learn of
//     its removal only when its election timeout makes it talk, and a
//     client waiting on it (a member removing itself) with it. It gets a
//     last heartbeat (farewell), which carries the commit index Raft would
//     send it, and to which it answers: the answer meets a 410, and the
//     member stops.
func (n *Node) applyToRaft(cc raftpb.ConfChangeI) *raftpb.ConfState {
	var ranked []uint64
	var match map[uint64]uint64
	if st := n.rn.BasicStatus(); st.RaftState == raft.StateLeader {
		// Conf changes are rare: rank the followers in case this one makes
		// the leader step down.
		ranked = n.followersByMatch()
		if t := st.LeadTransferee; t != 0 {
			// A transfer under way picked its member already.
			ranked = append([]uint64{t}, ranked...)
		}
		var removes []uint64
		for _, c := range cc.AsV2().Changes {
			if c.GetType() == raftpb.ConfChangeRemoveNode && c.GetNodeId() != n.id {
				removes = append(removes, c.GetNodeId())
			}
		}
		if len(removes) > 0 {
			// Only members Raft still tracks: a repeated removal finds none.
			match = make(map[uint64]uint64, len(removes))
			n.rn.WithProgress(func(id uint64, _ raft.ProgressType, pr tracker.Progress) {
				if slices.Contains(removes, id) {
					match[id] = pr.Match
				}
			})
		}
	}
	cs := n.rn.ApplyConfChange(cc)
	st := n.rn.BasicStatus()
	if st.RaftState != raft.StateLeader {
		// Stepped down (a joint configuration that leaves it out does not
		// make it step down yet: the change that leaves the joint one does).
		for _, id := range ranked {
			if slices.Contains(cs.GetVoters(), id) {
				n.loop.handoff = id
				break
			}
		}
	}
	for id, m := range match {
		if slices.Contains(cs.GetVoters(), id) || slices.Contains(cs.GetLearners(), id) ||
			slices.Contains(cs.GetVotersOutgoing(), id) {
			continue
		}
		if n.loop.farewells == nil {
			n.loop.farewells = make(map[uint64]*raftpb.Message)
		}
		n.loop.farewells[id] = &raftpb.Message{
			Type:   raftpb.MsgHeartbeat.Enum(),
			From:   new(n.id),
			To:     new(id),
			Term:   new(st.GetTerm()),
			Commit: new(min(m, st.GetCommit())),
		}
	}
	return cs
}

// resurrects reports whether a conf change would add back a member the
// cluster removed. Only a late copy of an add can (AddMember refuses removed
// IDs): its proposer tried again, and both attempts reached the log, the
// removal in between. Raft keeps no record of removals and would make the
// member a voter again, one the member list refuses; such a change is
// applied with node ID 0 instead, which Raft skips, as etcd does with a
// change it refuses at apply time.
func (n *Node) resurrects(t raftpb.ConfChangeType, id, index uint64) bool {
	if (t != raftpb.ConfChangeAddNode && t != raftpb.ConfChangeAddLearnerNode) || id == 0 || !n.isRemoved(id) {
		return false
	}
	n.lg.Warn("ignoring a conf change that adds a removed member", zap.String("member-id", idString(id)), zap.Uint64("index", index))
	return true
}

// memberConfChange reflects one applied change in the member list. An added
// member's record travels in the change's context (etcd's Member JSON).
func (n *Node) memberConfChange(t raftpb.ConfChangeType, id uint64, ctx []byte) bool {
	if id == 0 {
		return false
	}
	switch t {
	case raftpb.ConfChangeAddNode, raftpb.ConfChangeAddLearnerNode:
		var m memberRecord
		if json.Unmarshal(ctx, &m) != nil || m.ID != id {
			m = memberRecord{ID: id}
		}
		return n.addMember(m)
	case raftpb.ConfChangeRemoveNode:
		if id == n.id {
			n.loop.removedSelf = true
		}
		return n.removeMember(id)
	case raftpb.ConfChangeUpdateNode:
		return n.updateMember(id, ctx)
	}
	return false
}

// replaceMembers installs the member list of a received snapshot. Removed
// IDs accumulate: a removal is forever.
func (n *Node) replaceMembers(members []memberRecord, removed map[uint64]bool) {
	slices.SortFunc(members, func(a, b memberRecord) int { return cmpUint64(a.ID, b.ID) })
	n.membersMu.Lock()
	defer n.membersMu.Unlock()
	if n.removed == nil {
		n.removed = make(map[uint64]bool)
	}
	for id := range removed {
		n.removed[id] = true
	}
	n.members = slices.DeleteFunc(members, func(m memberRecord) bool { return n.removed[m.ID] })
}
