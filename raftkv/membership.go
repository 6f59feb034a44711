package raftkv

import (
	"crypto/sha1"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net"
	"net/url"
	"slices"
	"strings"

	"go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"
)

// Meta keys this package keeps in the store's meta bucket. The prefix keeps
// them apart from the store's own bookkeeping.
const (
	metaMemberID  = "raftkv/member_id"
	metaClusterID = "raftkv/cluster_id"
	metaMembers   = "raftkv/members"
	metaIDGen     = "raftkv/id_generation"
)

// memberRecord is how a member is persisted and carried in the Context of
// its ConfChange, as etcd carries its Member JSON there.
type memberRecord struct {
	ID         uint64   `json:"id"`
	Name       string   `json:"name"`
	PeerURLs   []string `json:"peerURLs"`
	ClientURLs []string `json:"clientURLs,omitempty"`
}

// normalizeURLs parses and sorts peer URLs as etcd's types.NewURLs does, so
// that the same configuration written differently hashes to the same ID.
func normalizeURLs(raw []string) ([]string, error) {
	if len(raw) == 0 {
		return nil, fmt.Errorf("no valid URLs given")
	}
	out := make([]string, 0, len(raw))
	for _, s := range raw {
		u, err := url.Parse(strings.TrimSpace(s))
		if err != nil {
			return nil, err
		}
		switch u.Scheme {
		case "http", "https", "unix", "unixs":
		default:
			return nil, fmt.Errorf("URL scheme must be http, https, unix, or unixs: %s", s)
		}
		if _, _, err := net.SplitHostPort(u.Host); err != nil {
			return nil, fmt.Errorf(`URL address does not have the form "host:port": %s`, s)
		}
		if u.Path != "" {
			return nil, fmt.Errorf("URL must not contain a path: %s", s)
		}
		out = append(out, u.String())
	}
	slices.Sort(out)
	return out, nil
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
	members := make([]memberRecord, 0, len(cluster))
	seen := make(map[uint64]string, len(cluster))
	for name, raw := range cluster {
		urls, err := normalizeURLs(raw)
		if err != nil {
			return nil, fmt.Errorf("raftkv: initial cluster member %q: %w", name, err)
		}
		id := memberID(urls, token)
		if other, dup := seen[id]; dup {
			return nil, fmt.Errorf("raftkv: initial cluster members %q and %q have the same peer URLs", other, name)
		}
		seen[id] = name
		members = append(members, memberRecord{ID: id, Name: name, PeerURLs: urls})
	}
	slices.SortFunc(members, func(a, b memberRecord) int { return cmpUint64(a.ID, b.ID) })
	return members, nil
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

func encodeMember(m memberRecord) []byte {
	b, err := json.Marshal(m)
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
// URLs are the configured AdvertiseClientURLs; other members' are those
// they published.
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
			mm.ClientURLs = slices.Clone(n.cfg.AdvertiseClientURLs)
		}
		if mm.ClientURLs == nil {
			// etcd lists an unstarted member with "clientURLs":[], never null.
			mm.ClientURLs = []string{}
		}
		out = append(out, mm)
	}
	return out
}

// addMember records a member learnt from an applied ConfChange; it reports
// whether the list changed (and must be persisted).
func (n *Node) addMember(m memberRecord) bool {
	n.membersMu.Lock()
	defer n.membersMu.Unlock()
	i, found := slices.BinarySearchFunc(n.members, m.ID, func(a memberRecord, id uint64) int { return cmpUint64(a.ID, id) })
	if found {
		return false
	}
	n.members = slices.Insert(n.members, i, m)
	return true
}

// removeMember drops a member removed by an applied ConfChange.
func (n *Node) removeMember(id uint64) bool {
	n.membersMu.Lock()
	defer n.membersMu.Unlock()
	i, found := slices.BinarySearchFunc(n.members, id, func(a memberRecord, id uint64) int { return cmpUint64(a.ID, id) })
	if !found {
		return false
	}
	n.members = slices.Delete(n.members, i, i+1)
	return true
}

func (n *Node) memberSnapshot() []memberRecord {
	n.membersMu.RLock()
	defer n.membersMu.RUnlock()
	return slices.Clone(n.members)
}

// applyConfChanges applies the committed conf changes of a Ready to Raft
// and to the member list, before the Ready is saved. It returns the
// resulting conf state (nil: none in this Ready) and whether the member list
// changed.
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
			cs = n.rn.ApplyConfChange(cc)
			if n.memberConfChange(cc.GetType(), cc.GetNodeId(), cc.GetContext()) {
				changed = true
			}
		case raftpb.EntryConfChangeV2:
			cc := &raftpb.ConfChangeV2{}
			if err := proto.Unmarshal(e.GetData(), cc); err != nil {
				return nil, false, fmt.Errorf("raftkv: damaged conf change at index %d: %w", e.GetIndex(), err)
			}
			cs = n.rn.ApplyConfChange(cc)
			for _, c := range cc.GetChanges() {
				if n.memberConfChange(c.GetType(), c.GetNodeId(), cc.GetContext()) {
					changed = true
				}
			}
		}
	}
	if cs != nil {
		n.loop.confState = cs
	}
	return cs, changed, nil
}

// memberConfChange reflects one applied change in the member list. An added
// member's record travels in the change's context (etcd's Member JSON).
func (n *Node) memberConfChange(t raftpb.ConfChangeType, id uint64, ctx []byte) bool {
	switch t {
	case raftpb.ConfChangeAddNode, raftpb.ConfChangeAddLearnerNode:
		var m memberRecord
		if json.Unmarshal(ctx, &m) != nil || m.ID != id {
			m = memberRecord{ID: id}
		}
		return n.addMember(m)
	case raftpb.ConfChangeRemoveNode:
		return n.removeMember(id)
	}
	return false
}
