package raftkv

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"slices"

	"go.etcd.io/raft/v3/raftpb"
	"go.uber.org/zap"
	"google.golang.org/protobuf/proto"
)

// Membership changes are checked by the leader as they enter its log, the
// checks etcd makes when it applies one (ValidateConfigurationChange):
// AddMember's own checks run before the change is proposed, so two
// concurrent additions of one peer URL (in the same second: of one ID, which
// hashes the URLs and the time) would both pass them. The leader holds a change
// until every earlier one is applied (proposeConf), so it judges each
// against the membership all earlier changes made. A refused change still
// enters the log, with node ID 0, which Raft skips (as etcd skips a change
// it refuses), and its refusal in the context: every member applies it
// alike, and its proposer, on whichever member, hears why. The verdict is
// in the log, so replaying the log never judges again.
//
// The leader also recognizes a copy of a change applied before (its
// proposer tried again and both attempts reached the log): the copy is
// turned into a no-op too. Without that, a late copy of an UpdateNode
// would undo a newer update.

// refusalCodes name the refusals in the log and in the saved verdicts.
var refusalCodes = map[error]string{
	ErrMemberRemoved:  "member-removed",
	ErrIDExists:       "id-exists",
	ErrPeerURLExists:  "peer-url-exists",
	ErrMemberNotFound: "member-not-found",
	ErrLastMember:     "last-member",
	// The leader's strict check (strictAgain).
	ErrUnhealthy:               "unhealthy",
	ErrNotEnoughStartedMembers: "not-enough-started-members",
}

// refusedCopy is the code of a copy of an applied change: its proposer has
// succeeded.
const refusedCopy = "applied-before"

// confRefusal is the context of a refused change.
type confRefusal struct {
	Refused string `json:"refused"`
}

// refusalErr is what the proposer of a change refused with code hears.
func refusalErr(code string) error {
	if code == "" || code == refusedCopy {
		return nil
	}
	for err, c := range refusalCodes {
		if c == code {
			return err
		}
	}
	return fmt.Errorf("raftkv: membership change refused (%s)", code)
}

// refusal returns the refusal an applied change carries, "" for none.
func refusal(cc *raftpb.ConfChange) string {
	if cc.GetNodeId() != 0 || len(cc.GetContext()) == 0 {
		return ""
	}
	var r confRefusal
	if json.Unmarshal(cc.GetContext(), &r) != nil {
		return ""
	}
	return r.Refused
}

// confConflict checks cc against this member's membership as etcd checks a
// change: the member must be known (not removed) to be removed or updated,
// and new to be added; a peer URL may belong to one member; the last member
// stays. AddMember, UpdateMember and RemoveMember check before proposing;
// the leader checks again as the change enters its log (judgeConf).
func (n *Node) confConflict(cc *raftpb.ConfChange) error {
	id := cc.GetNodeId()
	switch cc.GetType() {
	case raftpb.ConfChangeAddNode, raftpb.ConfChangeAddLearnerNode:
		switch {
		case n.isRemoved(id):
			return ErrMemberRemoved
		case n.hasMember(id):
			return ErrIDExists
		}
		var m memberRecord
		if json.Unmarshal(cc.GetContext(), &m) == nil && n.peerURLUsed(m.PeerURLs, 0) {
			return ErrPeerURLExists
		}
	case raftpb.ConfChangeRemoveNode:
		if err := n.knownMember(id); err != nil {
			return err
		}
		if len(n.memberSnapshot()) == 1 {
			return ErrLastMember
		}
	case raftpb.ConfChangeUpdateNode:
		if err := n.knownMember(id); err != nil {
			return err
		}
		var attrs attributesContext
		if json.Unmarshal(cc.GetContext(), &attrs) == nil && attrs.Attributes != nil {
			return nil
		}
		var m memberRecord
		if json.Unmarshal(cc.GetContext(), &m) == nil && n.peerURLUsed(m.PeerURLs, id) {
			return ErrPeerURLExists
		}
	}
	return nil
}

// judgeConf returns why the leader refuses cc, "" when it takes it.
func (n *Node) judgeConf(cc *raftpb.ConfChange) string {
	if id := cc.GetId(); id != 0 {
		if code, ok := n.loop.verdicts.get(id); ok {
			if code == "" {
				return refusedCopy
			}
			return code
		}
	}
	if cc.GetNodeId() == 0 {
		return ""
	}
	if err := n.confConflict(cc); err != nil {
		return refusalCodes[err]
	}
	// What Raft itself needs: a voter. A removal of the last one panics it,
	// at every restart after; the member list above counts learners too.
	voters := n.loop.confState.GetVoters()
	if cc.GetType() == raftpb.ConfChangeRemoveNode && len(voters) == 1 && voters[0] == cc.GetNodeId() &&
		len(n.loop.confState.GetVotersOutgoing()) == 0 {
		return refusalCodes[ErrLastMember]
	}
	if err := n.strictAgain(cc); err != nil {
		return refusalCodes[err]
	}
	return ""
}

// refused is cc as it enters the log when refused with code.
func (n *Node) refused(cc *raftpb.ConfChange, code string) *raftpb.ConfChange {
	if code != refusedCopy {
		n.lg.Info("refusing a membership change", zap.Stringer("type", cc.GetType()),
			zap.String("member-id", idString(cc.GetNodeId())), zap.String("reason", code))
	}
	out := proto.Clone(cc).(*raftpb.ConfChange)
	out.NodeId = new(uint64(0))
	out.Context, _ = json.Marshal(confRefusal{Refused: code})
	return out
}

// judged is h as the leader steps it: refused changes rewritten. The
// proposer's own ConfChange is left alone (a retry sends it again, and is
// judged again). ok is false for a message with a conf entry that does not
// decode, which Raft's leader would panic on: it must not be stepped.
// ConfChangeV2 entries pass unjudged: nothing here proposes them but Raft
// itself, to leave a joint configuration.
func (n *Node) judged(h heldConf) (_ heldConf, ok bool) {
	if h.m == nil {
		if code := n.judgeConf(h.p.cc); code != "" {
			h.p.cc = n.refused(h.p.cc, code)
		}
		return h, true
	}
	var ents []*raftpb.Entry
	for i, e := range h.m.GetEntries() {
		if e.GetType() == raftpb.EntryConfChangeV2 {
			if proto.Unmarshal(e.GetData(), &raftpb.ConfChangeV2{}) != nil {
				return h, false
			}
			continue
		}
		if e.GetType() != raftpb.EntryConfChange {
			continue
		}
		cc := &raftpb.ConfChange{}
		if proto.Unmarshal(e.GetData(), cc) != nil {
			return h, false
		}
		code := n.judgeConf(cc)
		if code == "" {
			continue
		}
		data, err := proto.Marshal(n.refused(cc, code))
		if err != nil {
			continue
		}
		if ents == nil {
			ents = slices.Clone(h.m.GetEntries())
		}
		ne := proto.Clone(e).(*raftpb.Entry)
		ne.Data = data
		ents[i] = ne
	}
	if ents != nil {
		m := proto.Clone(h.m).(*raftpb.Message)
		m.Entries = ents
		h.m = m
	}
	return h, true
}

// confVerdicts remembers what became of the last maxConfVerdicts changes
// this member applied, by request ID: "" when applied, else the refusal.
// Owned by the loop; persisted with the member list.
type confVerdicts struct {
	m     map[uint64]string
	order []uint64
}

const maxConfVerdicts = 1024

func (v *confVerdicts) get(id uint64) (string, bool) {
	code, ok := v.m[id]
	return code, ok
}

// add records the verdict of id's first application; it reports whether
// that is new.
func (v *confVerdicts) add(id uint64, code string) bool {
	if _, ok := v.m[id]; ok {
		return false
	}
	if v.m == nil {
		v.m = make(map[uint64]string)
	}
	if len(v.order) >= maxConfVerdicts {
		delete(v.m, v.order[0])
		v.order = v.order[1:]
	}
	v.m[id] = code
	v.order = append(v.order, id)
	return true
}

// encode writes the verdicts oldest first: ID, code length, code.
func (v *confVerdicts) encode() []byte {
	var b []byte
	for _, id := range v.order {
		code := v.m[id]
		b = binary.BigEndian.AppendUint64(b, id)
		b = append(b, byte(len(code)))
		b = append(b, code...)
	}
	return b
}

func decodeConfVerdicts(b []byte) (confVerdicts, error) {
	var v confVerdicts
	for len(b) > 0 {
		if len(b) < 9 || len(b) < 9+int(b[8]) {
			return confVerdicts{}, fmt.Errorf("raftkv: damaged membership verdicts in meta")
		}
		v.add(binary.BigEndian.Uint64(b), string(b[9:9+int(b[8])]))
		b = b[9+int(b[8]):]
	}
	return v, nil
}
