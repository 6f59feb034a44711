package storage

import "time"

// Actions of v2 events, as they appear in the "action" field.
const (
	ActionGet              = "get"
	ActionSet              = "set"
	ActionCreate           = "create"
	ActionUpdate           = "update"
	ActionDelete           = "delete"
	ActionCompareAndSwap   = "compareAndSwap"
	ActionCompareAndDelete = "compareAndDelete"
	ActionExpire           = "expire"
)

// Event is the result of a v2 operation and what watchers receive. Its JSON
// is etcd's, field for field.
type Event struct {
	Action   string `json:"action"`
	Node     *Node  `json:"node,omitempty"`
	PrevNode *Node  `json:"prevNode,omitempty"`

	// EtcdIndex is the store index after the operation (the X-Etcd-Index
	// header of a non-watch response).
	EtcdIndex uint64 `json:"-"`
	// Refresh marks a TTL refresh: kept in history but never delivered to
	// watchers (etcd 3.4 skips refresh events).
	Refresh bool `json:"-"`
	// removed, for a deleted or expired directory, holds the paths of the
	// nodes it took, until its watchers are notified; nil when nobody
	// watched as it was applied (hub.notify then tells every watcher below).
	removed map[string]struct{}
}

// Index is the modifiedIndex of the event's node: its position in history.
func (e *Event) Index() uint64 { return e.Node.ModifiedIndex }

// Node is a key or directory in etcd's external JSON form. Every field is
// omitted when empty; the root has no key and no indexes.
type Node struct {
	Key           string     `json:"key,omitempty"`
	Value         *string    `json:"value,omitempty"`
	Dir           bool       `json:"dir,omitempty"`
	Expiration    *time.Time `json:"expiration,omitempty"`
	TTL           int64      `json:"ttl,omitempty"`
	Nodes         []*Node    `json:"nodes,omitempty"`
	ModifiedIndex uint64     `json:"modifiedIndex,omitempty"`
	CreatedIndex  uint64     `json:"createdIndex,omitempty"`
}
