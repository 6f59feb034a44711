package raftkv

import (
	"strings"
	"testing"
)

// The expected IDs were printed by a real etcd 3.4.23 started with the same
// flags.
func TestMemberAndClusterIDsMatchEtcd(t *testing.T) {
	tests := []struct {
		name    string
		cluster map[string][]string
		token   string
		self    string
		member  uint64
		cid     uint64
	}{
		{
			name:    "default single member",
			cluster: map[string][]string{"default": {"http://localhost:2380"}},
			token:   "etcd-cluster",
			self:    "default",
			member:  0x8e9e05c52164694d,
			cid:     0xcdf818194e3a8c32,
		},
		{
			name: "two members, own token",
			cluster: map[string][]string{
				"a": {"http://127.0.0.1:24801"},
				"b": {"http://127.0.0.1:24802"},
			},
			token:  "tok",
			self:   "a",
			member: 0xa6b899a614adff8f,
			cid:    0x8fa0b00b7a354b4e,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			members, err := initialMembers(tt.cluster, tt.token)
			if err != nil {
				t.Fatal(err)
			}
			var self uint64
			for _, m := range members {
				if m.Name == tt.self {
					self = m.ID
				}
			}
			if self != tt.member {
				t.Errorf("member ID %x, want %x", self, tt.member)
			}
			if got := clusterID(memberIDs(members)); got != tt.cid {
				t.Errorf("cluster ID %x, want %x", got, tt.cid)
			}
			for i := 1; i < len(members); i++ {
				if members[i-1].ID >= members[i].ID {
					t.Errorf("members not sorted by ID: %+v", members)
				}
			}
		})
	}
}

func TestInitialClusterRejectsBadPeerURLs(t *testing.T) {
	for _, urls := range [][]string{
		nil,
		{"ftp://127.0.0.1:2380"},
		{"http://127.0.0.1"},
		{"http://127.0.0.1:2380/path"},
		{"://bad"},
	} {
		if _, err := initialMembers(map[string][]string{"x": urls}, "t"); err == nil {
			t.Errorf("peer URLs %q accepted", urls)
		}
	}
	for _, cluster := range []map[string][]string{
		{"x": {"http://a:1"}, "y": {"http://a:1"}},
		{"x": {"http://a:1"}, "y": {"http://b:1", "http://a:1"}},
		{"x": {"http://a:1", "http://a:1"}, "y": {"http://b:1"}},
	} {
		if _, err := initialMembers(cluster, "t"); err == nil || !strings.Contains(err.Error(), "duplicate URL: http://a:1") {
			t.Errorf("duplicate peer URLs in %v: %v", cluster, err)
		}
	}
}

func TestRequestIDsAreUniqueAcrossBoots(t *testing.T) {
	seen := map[uint64]bool{}
	for gen := uint64(1); gen <= 3; gen++ {
		g := newIDGen(0x8e9e05c52164694d, gen)
		for range 1000 {
			id := g.id()
			if id == 0 || seen[id] {
				t.Fatalf("ID %x repeated or zero", id)
			}
			seen[id] = true
		}
	}
}

func TestRequestIDsDifferForMembersSharingLowBits(t *testing.T) {
	// etcd's idutil would give these two members the same ID prefix.
	a, b := newIDGen(0x1111_0000_0000_abcd, 1), newIDGen(0x2222_0000_0000_abcd, 1)
	if a.id() == b.id() {
		t.Fatalf("members sharing their low 16 bits produce the same request IDs (%x)", a.base)
	}
}

func TestConfVerdictsKeepTheLastOnesAndRoundTrip(t *testing.T) {
	var v confVerdicts
	for i := range maxConfVerdicts + 10 {
		code := ""
		if i%3 == 0 {
			code = refusalCodes[ErrPeerURLExists]
		}
		if !v.add(uint64(i+1), code) {
			t.Fatalf("add %d: reported as seen", i+1)
		}
	}
	if v.add(maxConfVerdicts, "other") {
		t.Fatal("a second verdict for one ID replaced the first")
	}
	got, err := decodeConfVerdicts(v.encode())
	if err != nil {
		t.Fatal(err)
	}
	if len(got.order) != maxConfVerdicts {
		t.Fatalf("%d verdicts kept, want %d", len(got.order), maxConfVerdicts)
	}
	if _, ok := got.get(10); ok {
		t.Error("the oldest verdicts were kept")
	}
	for _, id := range []uint64{11, 12, maxConfVerdicts + 10} {
		want, _ := v.get(id)
		if code, ok := got.get(id); !ok || code != want {
			t.Errorf("verdict of %d: %q %v, want %q", id, code, ok, want)
		}
	}
	if _, err := decodeConfVerdicts([]byte{0, 0, 0}); err == nil {
		t.Error("a damaged encoding decoded")
	}
}

// TestConfIndexIsTrustedWithItsMemberListOnly reads a saved conf index back
// only with the member list it was saved with: a list changed since (by a
// version that did not keep the index) or an index without its list's hash
// leaves it unknown.
func TestConfIndexIsTrustedWithItsMemberListOnly(t *testing.T) {
	list := encodeMembers([]memberRecord{{ID: 1, Name: "a", PeerURLs: []string{"http://a:1"}}})
	other := encodeMembers([]memberRecord{{ID: 1, Name: "a", PeerURLs: []string{"http://a:1"}}, {ID: 2, PeerURLs: []string{"http://b:1"}}})
	saved := encodeConfIndex(42, list)
	if got := decodeConfIndex(saved, list); got != 42 {
		t.Errorf("with its list: %d, want 42", got)
	}
	if got := decodeConfIndex(saved, other); got != 0 {
		t.Errorf("with another list: %d, want 0", got)
	}
	if got := decodeConfIndex(putUint64(42), list); got != 0 {
		t.Errorf("without a hash: %d, want 0", got)
	}
	if got := decodeConfIndex(nil, list); got != 0 {
		t.Errorf("none saved: %d, want 0", got)
	}
}
