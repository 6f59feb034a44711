package storage

import (
	"fmt"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
)

// historySize is etcd's newWatchHub(1000): the events kept for waitIndex.
const historySize = 1000

// watchBuffer is the per-watcher channel size (etcd's 100): a streaming
// watcher that falls this far behind is dropped rather than slowing Save.
const watchBuffer = 100

// Watcher receives the events of one v2 watch.
type Watcher struct {
	// EventChan yields matching events in index order; it is closed when
	// the watch ends (after one event unless streaming, on Remove, on
	// Close, or when a streaming watcher falls 100 events behind).
	EventChan <-chan *Event
	// StartIndex is the store index when the watch was registered.
	StartIndex uint64

	hub       *hub
	ch        chan *Event
	recursive bool
	stream    bool
	since     uint64
	node      *watchNode // nil unless registered for live events
	lastSent  uint64     // index of the last event sent, so none goes twice
	done      bool       // ch is closed
}

// Remove unregisters the watcher and closes its channel; safe to call more
// than once and after the watch ended.
func (w *Watcher) Remove() {
	w.hub.mu.Lock()
	w.hub.end(w)
	w.hub.mu.Unlock()
}

// Ended reports whether the store no longer serves watches (EndWatches,
// Close): a watch that ends then ended because its member is gone, not in
// its own course (an event, Remove, a streaming watcher that fell behind),
// or would have ended so at once.
func (w *Watcher) Ended() bool {
	w.hub.mu.Lock()
	defer w.hub.mu.Unlock()
	return w.hub.closed
}

// watchNode is one path component in the hub's tree of watched paths, so
// that an event finds its watchers by walking its key's ancestors, and a
// deleted directory finds the watchers below it, without looking at any
// other watcher.
type watchNode struct {
	parent   *watchNode
	name     string
	children map[string]*watchNode
	watchers map[*Watcher]struct{}
}

// hub is the watcher hub: live watchers and the event history. Everything
// in it is guarded by mu; Save publishes under it, so a watch registers
// either before an event (and gets it live) or after (and finds it in
// history), never between.
type hub struct {
	mu      sync.Mutex
	closed  bool
	index   uint64 // the store index of the last published event
	history history
	root    watchNode
	count   atomic.Int64 // registered watchers, for Stats
	scratch []*Watcher
}

func newHub(index uint64, events []*Event) *hub {
	h := &hub{index: index}
	h.history.events = make([]*Event, historySize)
	for _, e := range events {
		h.history.add(e)
	}
	return h
}

// history is the ring of the last historySize events (etcd's EventHistory).
type history struct {
	events []*Event
	start  int // position of the oldest event
	n      int
}

func (h *history) add(e *Event) {
	if h.n < len(h.events) {
		h.events[(h.start+h.n)%len(h.events)] = e
		h.n++
		return
	}
	h.events[h.start] = e
	h.start = (h.start + 1) % len(h.events)
}

func (h *history) at(i int) *Event { return h.events[(h.start+i)%len(h.events)] }

// startIndex is etcd's EventHistory.StartIndex: 0 while empty.
func (h *history) startIndex() uint64 {
	if h.n == 0 {
		return 0
	}
	return h.at(0).Index()
}

func (h *history) lastIndex() uint64 {
	if h.n == 0 {
		return 0
	}
	return h.at(h.n - 1).Index()
}

// first returns the position of the first event at or after index.
func (h *history) first(index uint64) int {
	return sort.Search(h.n, func(i int) bool { return h.at(i).Index() >= index })
}

// historyMatch is etcd's EventHistory.scan test: the key itself, anything
// below it when recursive, or a deleted or expired directory whose key is
// a string prefix of the watched key (etcd compares strings, not path
// components; kept as is). Hidden keys are not filtered here, as in etcd
// (etcd-io/etcd#1677). Refresh events are never matched.
func historyMatch(e *Event, key string, recursive bool) bool {
	if e.Refresh {
		return false
	}
	if e.Node.Key == key {
		return true
	}
	if recursive {
		prefix := key
		if !strings.HasSuffix(prefix, "/") {
			prefix += "/"
		}
		if strings.HasPrefix(e.Node.Key, prefix) {
			return true
		}
	}
	return (e.Action == ActionDelete || e.Action == ActionExpire) && e.PrevNode != nil && e.PrevNode.Dir &&
		strings.HasPrefix(key, e.PrevNode.Key)
}

// Watch registers a watcher as etcd's v2 store does: sinceIndex 0 means
// "from the next event"; a sinceIndex still in the 1000-event history is
// answered from it first; one older than the history gives error 401.
// The returned watcher's StartIndex is the store index at registration.
//
// A streaming watch answered from history gets every matching event of the
// history from sinceIndex on, then live events (etcd sends only the first
// historical one and then nothing more).
func (s *Store) Watch(path string, recursive, stream bool, sinceIndex uint64) (*Watcher, error) {
	if err := s.settle(); err != nil {
		return nil, err
	}
	key := cleanPath(path)
	h := s.hub
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return nil, ErrClosed
	}
	storeIndex := h.index
	if sinceIndex == 0 {
		sinceIndex = storeIndex + 1
	}
	// The history check comes first: a path under a file may be watched.
	if start := h.history.startIndex(); sinceIndex < start {
		return nil, NewError(EcodeEventIndexCleared,
			fmt.Sprintf("the requested history has been cleared [%d/%d]", start, sinceIndex), storeIndex)
	}
	ch := make(chan *Event, watchBuffer)
	w := &Watcher{EventChan: ch, StartIndex: storeIndex, hub: h, ch: ch,
		recursive: recursive, stream: stream, since: sinceIndex}
	if last := h.history.lastIndex(); sinceIndex <= last {
		for i := h.history.first(sinceIndex); i < h.history.n; i++ {
			e := h.history.at(i)
			if !historyMatch(e, key, recursive) {
				continue
			}
			ne := *e
			ne.EtcdIndex = storeIndex
			if !h.send(w, &ne) || !stream {
				return w, nil
			}
		}
		w.since = last + 1
	}
	n := &h.root
	forEachComponent(key, func(name string) {
		child := n.children[name]
		if child == nil {
			if n.children == nil {
				n.children = make(map[string]*watchNode)
			}
			child = &watchNode{parent: n, name: name}
			n.children[name] = child
		}
		n = child
	})
	if n.watchers == nil {
		n.watchers = make(map[*Watcher]struct{})
	}
	n.watchers[w] = struct{}{}
	w.node = n
	h.count.Add(1)
	return w, nil
}

// forEachComponent calls fn with each component of the clean path p.
func forEachComponent(p string, fn func(string)) {
	for rest := p[1:]; rest != ""; {
		i := strings.IndexByte(rest, '/')
		if i < 0 {
			fn(rest)
			return
		}
		fn(rest[:i])
		rest = rest[i+1:]
	}
}

// send delivers e without ever blocking: a full buffer drops the watcher
// (etcd closes the watch the same way). A non-streaming watcher ends after
// its one event. It reports whether the watcher still wants events.
func (h *hub) send(w *Watcher, e *Event) bool {
	if w.done {
		return false
	}
	select {
	case w.ch <- e:
		w.lastSent = e.Index()
		if !w.stream {
			h.end(w)
			return false
		}
		return true
	default:
		h.end(w)
		return false
	}
}

// end unregisters w and closes its channel, once.
func (h *hub) end(w *Watcher) {
	if w.done {
		return
	}
	w.done = true
	close(w.ch)
	n := w.node
	if n == nil {
		return
	}
	w.node = nil
	delete(n.watchers, w)
	h.count.Add(-1)
	// Prune the branch so that the tree only holds watched paths.
	for n.parent != nil && len(n.watchers) == 0 && len(n.children) == 0 {
		delete(n.parent.children, n.name)
		n = n.parent
	}
	if len(n.watchers) == 0 {
		n.watchers = nil
	}
	if len(n.children) == 0 {
		n.children = nil
	}
}

// publish adds a committed Save's events to the history and notifies the
// watchers, in index order, then makes index the store's index.
func (h *hub) publish(events []*Event, index uint64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, e := range events {
		h.history.add(e)
		// Auth writes' events (keys without a leading "/") are history
		// only: no watcher can match them.
		if !h.closed && !e.Refresh && h.count.Load() > 0 && strings.HasPrefix(e.Node.Key, "/") {
			h.notify(e)
		}
		e.removed = nil // the history keeps the event a while
	}
	h.index = index
}

// notify delivers e to the live watchers it concerns, as etcd's watcherHub
// does: watchers at the key itself; recursive watchers at an ancestor,
// unless a component of the key below the watched path is hidden ("_");
// and, for a deleted or expired directory, the watchers at each node it
// took (etcd's Remove callback names the nodes that were there: a watcher
// of a key that did not exist under the directory waits on). Each watcher
// gets an event once, although etcd may hand a stream watcher a
// directory's delete twice.
func (h *hub) notify(e *Event) {
	key := e.Node.Key
	idx := e.Index()
	targets := h.scratch[:0]
	// depth is the number of components of key; a watcher at depth d
	// skips e when a component at depth d or below is hidden, that is
	// when lastHidden >= d.
	depth, lastHidden := 0, -1
	forEachComponent(key, func(name string) {
		if name != "" && name[0] == '_' {
			lastHidden = depth
		}
		depth++
	})
	n, d, pos := &h.root, 0, 1
	for {
		original := d == depth
		for w := range n.watchers {
			if idx >= w.since && (original || (w.recursive && lastHidden < d)) {
				targets = append(targets, w)
			}
		}
		if original {
			break
		}
		name := key[pos:]
		if i := strings.IndexByte(name, '/'); i >= 0 {
			name, pos = name[:i], pos+i+1
		} else {
			pos = len(key)
		}
		if n = n.children[name]; n == nil {
			break
		}
		d++
	}
	if n != nil && e.Node.Dir && (e.Action == ActionDelete || e.Action == ActionExpire) {
		var walk func(n *watchNode, dir string)
		walk = func(n *watchNode, dir string) {
			for _, c := range n.children {
				p := joinPath(dir, c.name)
				if _, took := e.removed[p]; took || e.removed == nil {
					for w := range c.watchers {
						if idx >= w.since {
							targets = append(targets, w)
						}
					}
				}
				walk(c, p)
			}
		}
		walk(n, key)
	}
	for _, w := range targets {
		if w.lastSent != idx { // each watcher gets each event once
			h.send(w, e)
		}
	}
	clear(targets)
	h.scratch = targets[:0]
}

// close ends every watcher and refuses new ones.
func (h *hub) close() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.closed = true
	var walk func(*watchNode)
	walk = func(n *watchNode) {
		for _, c := range n.children {
			walk(c)
		}
		for w := range n.watchers {
			h.end(w)
		}
	}
	walk(&h.root)
}
