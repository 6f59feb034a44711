package storage

// Methods of a Request, as etcd's v2 server names them.
const (
	MethodPut    = "PUT"
	MethodPost   = "POST"
	MethodDelete = "DELETE"
	MethodQGet   = "QGET" // not used: quorum reads go through ReadIndex
	MethodSync   = "SYNC" // the leader's "expire what is due at Time"
)

// Request is one v2 write as it travels in a Raft log entry. Every field is
// decided by the member that received the client request, before it is
// proposed, so every member applies it alike: in particular the expiration
// is absolute, never a TTL.
//
// Dispatch follows etcd 3.4's apply_v2.go: PUT with PrevExist=false is
// create; PUT with PrevValue or PrevIndex>0 is compare-and-swap; PUT with
// PrevExist=true is update; other PUTs are set. POST creates an in-order key
// under Path. DELETE with PrevValue or PrevIndex>0 is compare-and-delete.
type Request struct {
	// ID identifies the proposal, so that a retried proposal is applied
	// once and its waiter finds its result. Zero for entries nobody awaits.
	ID         uint64
	Method     string
	Path       string // the key, cleaned, starting with "/", without the /v2/keys prefix
	Val        string
	Dir        bool
	PrevValue  string
	PrevIndex  uint64
	PrevExist  *bool
	Expiration int64 // unix nanoseconds; 0 means no TTL
	Recursive  bool
	Refresh    bool
	Time       int64 // SYNC: the leader's clock, unix nanoseconds
}

// Marshal encodes r for a Raft log entry (a compact binary form, versioned
// by its first byte).
func (r *Request) Marshal() []byte { panic("not implemented") }

// UnmarshalRequest decodes what Marshal encoded; damaged input is an error,
// never a panic.
func UnmarshalRequest(data []byte) (*Request, error) { panic("not implemented") }
