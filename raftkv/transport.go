package raftkv

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"math"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/etcaddy/etcaddy/storage"
	"go.etcd.io/raft/v3"
	"go.etcd.io/raft/v3/raftpb"
	"go.uber.org/zap"
	"google.golang.org/protobuf/proto"
)

// The peer protocol. A member streams Raft messages to each peer in the
// body of long POSTs to <peerURL>/raft/stream, two at a time: one for
// appends, one for every other message (see lane). Each message is a
// frame: a 4-byte big-endian length, then the proto-encoded
// raftpb.Message. The receiver answers 200 at once and reads frames for as
// long as the sender writes them, as etcd's rafthttp streams do: a message
// costs a write on an open connection, not a request. Each member also
// asks each peer for the messages meant for it, one GET of
// <peerURL>/raft/stream?lane=messages|appends per lane, whose answer the
// peer keeps open and writes the same frames to while it cannot open a
// stream itself (see lane.write): messages flow between two members when
// either can dial the other, as with etcd, whose members dial the peers
// whose messages they read. Likewise each member keeps a GET of each peer's
// <peerURL>/raft/snapshot waiting, which the peer answers with a snapshot
// it cannot POST (offerSnapshot). A batch of frames POSTed to
// <peerURL>/raft is delivered whole and answered 204; members use it, with
// no frame, to probe a peer (reachability, its round trip). A snapshot goes to <peerURL>/raft/snapshot
// as one streamed body: the MsgSnap's frame (its metadata, no data), then
// the leader's member.db as WriteSnapshot writes it, its SHA-256 in a
// trailer. Every request carries the cluster ID and both member IDs
// (hexadecimal, as etcd writes IDs); the receiver answers 204 when it took
// the messages.
//
// Peers authenticate with mutual TLS: the client side takes a *tls.Config
// here; the server side is peerHandler, served by Caddy with its own TLS
// and client_auth.
const (
	peerRaftPath        = "/raft"
	peerStreamPath      = "/raft/stream"
	peerSnapshotPath    = "/raft/snapshot"
	peerMembersPath     = "/raft/members"
	headerPeerClusterID = "X-Etcaddy-Cluster-Id"
	headerPeerFrom      = "X-Etcaddy-From"
	headerPeerTo        = "X-Etcaddy-To"
	trailerSnapshotHash = "X-Etcaddy-Snapshot-Sha256"
	peerContentType     = "application/x-etcaddy-raft"
	pullLaneParam       = "lane"
)

// laneNames name the lanes in a pull's request (pullLaneParam).
var laneNames = [2]string{laneMessages: "messages", laneAppends: "appends"}

// Limits of the peer transport.
const (
	// peerQueueMessages and peerQueueBytes bound what waits for one peer
	// on its appends' lane, peerQueueMessages and peerMsgQueueBytes on
	// its other messages' lane (see lane). Beyond them messages are
	// dropped and the peer reported unreachable, as etcd does when its
	// sending buffer is full: Raft retransmits.
	peerQueueMessages = 4096
	peerQueueBytes    = 64 << 20
	peerMsgQueueBytes = 16 << 20
	// peerBatchBytes is how much one write to a peer's stream carries (at
	// least one message).
	peerBatchBytes = 4 << 20
	// peerMaxFrame is the largest message a member accepts: well above
	// MaxSizePerMsg (1 MiB), which a single large entry may exceed.
	peerMaxFrame = 64 << 20
	// peerMaxBody bounds a batch request's body.
	peerMaxBody = 2 * peerMaxFrame
	// peerMaxSnapFrame bounds a snapshot's metadata frame.
	peerMaxSnapFrame = 4 << 20
	// peerRequestTimeout ends a probe that hangs, and a stream that takes
	// no streamPiece for this long (StreamStall), so that a stalled peer
	// fills its own queue instead of holding messages forever.
	peerRequestTimeout = 5 * time.Second
	// streamPiece is how much of a batch must go through within
	// StreamStall: a slow link that makes progress is not a stalled one,
	// however large the batch (etcd's deadline is per write to the
	// connection, too).
	streamPiece     = 256 << 10
	peerDialTimeout = time.Second
	// pullRetryMin and pullRetryMax bound the wait before a pull is asked
	// for again: pullRetryMin after one that was answered, doubling after
	// each that was not (etcd's stream readers dial again every 100 ms).
	pullRetryMin = 100 * time.Millisecond
	pullRetryMax = time.Second
	// pullRefusedWait is the wait after a peer that serves no pulls (a
	// member of an older version: 405) refused one.
	pullRefusedWait = 10 * time.Second
)

// transportConfig configures a peerTransport.
type transportConfig struct {
	ID        uint64 // this member
	ClusterID uint64
	// TLS is the client side of mutual TLS for https:// peers (nil: the
	// system roots, no client certificate).
	TLS *tls.Config
	// H2C sends to http:// peers over HTTP/2 without TLS (prior
	// knowledge): the peer's server must accept h2c (Caddy: protocols
	// h1 h2c). Without it http:// peers get HTTP/1.1 keep-alive; https://
	// peers always negotiate HTTP/2.
	H2C bool
	// Snapshot writes this member's snapshot (storage.Store.WriteSnapshot).
	Snapshot func(w io.Writer) (int64, error)
	// ReportUnreachable and ReportSnapshot hand feedback to Raft without
	// blocking (Node.reportUnreachable, Node.reportSnapshot).
	ReportUnreachable func(to uint64)
	ReportSnapshot    func(to uint64, status raft.SnapshotStatus)
	// Removed, if set, is called when a peer answers 410 Gone: the
	// cluster removed this member (etcd stops such a member).
	Removed func()
	Logger  *zap.Logger
	// SnapshotStall is how long a snapshot transfer may go without
	// progress (zero: defaultSnapshotStall); see sendSnapshot.
	SnapshotStall time.Duration
	// StreamStall is how long a stream may take no streamPiece of a batch
	// before it is cut (zero: peerRequestTimeout).
	StreamStall time.Duration
	// ProbeIdle is how often an empty batch probes each peer (zero:
	// never), so that every member knows which peers it reaches
	// (activeSince), followers too: they send to the leader only. The
	// probes' round trips are the latency of /v2/stats/leader.
	ProbeIdle time.Duration
	// SentAppends, if set, samples each MsgApp sent, with its encoded size
	// (the send rates of /v2/stats/self).
	SentAppends *rateQueue
}

// defaultSnapshotStall: a connection that takes no byte of a snapshot for
// this long, or a peer that does not answer this long after the last one,
// is taken for dead.
const defaultSnapshotStall = 30 * time.Second

// peerTransport sends Raft messages to the other members over HTTP. Each
// peer has a bounded queue and its own goroutines, so Send never blocks the
// Raft loop and a slow or dead peer slows nobody else.
type peerTransport struct {
	cfg    transportConfig
	lg     *zap.Logger
	client *http.Client
	// appClient carries the appends' streams: a connection of their own
	// (see lane).
	appClient *http.Client
	wg        sync.WaitGroup

	mu      sync.RWMutex
	peers   map[uint64]*peer
	removed map[uint64]bool
	retired []*peer // removed peers, possibly still sending their last messages
	stopped bool

	// recv reads what peers write to this member's pulls; nil: this
	// member does not pull (setReceiver).
	recv *peerHandler
	// epoch is what peer.heard counts from.
	epoch time.Time
}

// peerState is what a receiving member knows of a sender.
type peerState int

const (
	peerUnknown peerState = iota
	peerKnown
	peerRemoved
)

// newPeerTransport returns a transport with no peers yet.
func newPeerTransport(cfg transportConfig) *peerTransport {
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	return &peerTransport{
		cfg:       cfg,
		lg:        cfg.Logger,
		client:    newPeerClient(cfg.TLS, cfg.H2C),
		appClient: newPeerClient(cfg.TLS, cfg.H2C),
		peers:     make(map[uint64]*peer),
		removed:   make(map[uint64]bool),
		epoch:     time.Now(),
	}
}

// setReceiver links the transport with this member's peer handler, before
// any peer is added: the transport then asks each peer for the messages
// meant for this member (runPull) and hands them to h, and h serves the
// peers' own such requests from the transport (servePull).
func (t *peerTransport) setReceiver(h *peerHandler) {
	t.recv = h
	h.out = t
}

func (t *peerTransport) streamStall() time.Duration {
	if t.cfg.StreamStall > 0 {
		return t.cfg.StreamStall
	}
	return peerRequestTimeout
}

func (t *peerTransport) snapshotStall() time.Duration {
	if t.cfg.SnapshotStall > 0 {
		return t.cfg.SnapshotStall
	}
	return defaultSnapshotStall
}

// newPeerClient is the HTTP client members dial each other with.
func newPeerClient(tlsCfg *tls.Config, h2c bool) *http.Client {
	var protocols http.Protocols
	protocols.SetHTTP2(true)
	if h2c {
		// Without HTTP1, Go speaks h2c to http:// URLs.
		protocols.SetUnencryptedHTTP2(true)
	} else {
		protocols.SetHTTP1(true)
	}
	var tlsConfig *tls.Config
	if tlsCfg != nil {
		tlsConfig = tlsCfg.Clone()
	}
	rt := &http.Transport{
		// Peers talk directly: a proxy from the environment is not meant
		// for them (etcd's peer transport dials directly as well).
		Proxy:               nil,
		DialContext:         peerDialer().DialContext,
		TLSClientConfig:     tlsConfig,
		TLSHandshakeTimeout: 5 * time.Second,
		ForceAttemptHTTP2:   true,
		Protocols:           &protocols,
		MaxIdleConnsPerHost: 4,
		IdleConnTimeout:     90 * time.Second,
		// A silent HTTP/2 connection is probed, so a peer that vanished
		// without a FIN is noticed instead of hanging every stream.
		HTTP2: &http.HTTP2Config{SendPingTimeout: 10 * time.Second, PingTimeout: 5 * time.Second},
	}
	return &http.Client{Transport: rt}
}

// peerDialer dials peers. Its sockets allow their address to be reused
// (see reuseAddr): a redial to a member that is down, on the same machine,
// can get that member's own port as its source port (the kernel's pick),
// connect to itself, and be closed by Go's dialer, which then leaves the
// port in TIME_WAIT for a minute; without SO_REUSEADDR on it, the member
// could not listen on its port when it restarts.
func peerDialer() *net.Dialer {
	return &net.Dialer{Timeout: peerDialTimeout, KeepAlive: 30 * time.Second, Control: reuseAddr}
}

// peer is one member this one sends to.
type peer struct {
	id     uint64
	t      *peerTransport
	ctx    context.Context // ended by Stop, and once a removed peer's queue is sent
	cancel context.CancelFunc
	// retiring is closed by RemovePeer: the peer takes no more messages,
	// and its senders end once they have sent what was queued (a removed
	// member's farewell) or after peerRequestTimeout.
	retiring  chan struct{}
	lanes     [2]*lane     // laneMessages, laneAppends
	lanesDone atomic.Int32 // lanes that sent all a retiring peer's messages
	snapc     chan []byte  // encoded MsgSnap (metadata only)
	// snapPoll hands a snapshot to the peer's waiting poll (offerSnapshot,
	// serveSnapshotPoll).
	snapPoll chan *snapshotJob

	mu   sync.Mutex
	urls []string
	pick int
	// kept is the URL the peer answered on when its URLs were changed to
	// ones without it: it is used until it fails. etcd's members keep the
	// connections they have across a member update, so that the member
	// can be restarted on its new URL afterwards (etcd's documented order)
	// without being cut off in between.
	kept     string
	failing  bool
	lastFail string
	stats    followerCounters
	// activeSince is when the peer last became reachable: the first
	// answered POST after a failed one (zero while it fails, or before it
	// ever answered). etcd's rafthttp ActiveSince.
	activeSince time.Time
	// viaPulled is set once messages went over the peer's pulls in this
	// outage (logged once).
	viaPulled bool
	// heard is when the peer's last request or message reached this
	// member, heardFrom when the run of them that ended with it began:
	// nanoseconds since the transport's epoch (a monotonic clock).
	heard, heardFrom atomic.Int64
}

// The lanes of a peer.
const (
	laneMessages = iota
	laneAppends
)

// lane is one of a peer's two streams, with its queue and sender. A
// leader's appends (MsgApp, in batches of up to peerBatchBytes) go on one,
// every other message on the other, each stream on a connection of its
// own: on a slow link, heartbeats, votes and read index rounds do not wait
// behind a batch of entries, which could take longer than an election
// timeout (etcd's rafthttp has a stream of its own for appends, msgappv2,
// beside its message stream; two HTTP/2 streams on one connection would
// share its flow control window and socket buffers). Raft needs no order
// between the two: a heartbeat's commit index is capped by what the
// follower acknowledged, and Raft's leader transfer sends MsgTimeoutNow
// once the target acknowledged the whole log. A removed leader's
// MsgTimeoutNow (handOver) must come after the entries that carry its
// removal's commit: it goes with the appends. Snapshots have their own
// requests (runSnapshots).
type lane struct {
	p        *peer
	client   *http.Client
	queue    chan []byte // encoded messages
	queued   atomic.Int64
	maxBytes int64
	// taken counts the messages run took from the queue; mu guards the
	// rest, which enqueue keeps: how many it put in, and the last MsgApp
	// with entries among them and its number (see twinQueued).
	taken    atomic.Uint64
	mu       sync.Mutex
	enqueued uint64
	lastApp  appKey
	lastAt   uint64
	// stream is the open stream to the peer, opened and ended by run; a
	// failed probe cuts it.
	stream atomic.Pointer[peerStream]
	// pulled is the stream the peer opened to this member for the lane's
	// messages (servePull), if any: run writes to it while the peer
	// cannot be reached on its URL.
	pulled atomic.Pointer[peerStream]
}

// lane returns the lane messages of type mt go on.
func (p *peer) lane(mt raftpb.MessageType) *lane {
	if mt == raftpb.MsgApp || mt == raftpb.MsgTimeoutNow {
		return p.lanes[laneAppends]
	}
	return p.lanes[laneMessages]
}

// followerCounters are the numbers behind a follower's /v2/stats/leader
// entry: message batches that went out on the peer's streams or did not,
// and the round-trip times of the probes it answered, in milliseconds.
type followerCounters struct {
	success, fail          uint64
	samples                uint64
	current, min, max, sum float64
	sumSquares             float64
}

func (c *followerCounters) sample(d time.Duration) {
	ms := float64(d) / float64(time.Millisecond)
	c.samples++
	c.current = ms
	c.sum += ms
	c.sumSquares += ms * ms
	if c.samples == 1 || ms < c.min {
		c.min = ms
	}
	c.max = max(c.max, ms)
}

func (c *followerCounters) stats() FollowerStats {
	var s FollowerStats
	s.Counts.Success, s.Counts.Fail = c.success, c.fail
	if c.samples > 0 {
		n := float64(c.samples)
		avg := c.sum / n
		s.Latency.Current, s.Latency.Average = c.current, avg
		s.Latency.StandardDeviation = math.Sqrt(max(0, c.sumSquares/n-avg*avg))
		s.Latency.Minimum, s.Latency.Maximum = c.min, c.max
	}
	return s
}

// followerStats returns each peer's counters, by member ID.
func (t *peerTransport) followerStats() map[uint64]FollowerStats {
	t.mu.RLock()
	defer t.mu.RUnlock()
	out := make(map[uint64]FollowerStats, len(t.peers))
	for id, p := range t.peers {
		p.mu.Lock()
		out[id] = p.stats.stats()
		p.mu.Unlock()
	}
	return out
}

// checkPeerURLs parses a member's peer URLs.
func checkPeerURLs(urls []string) ([]string, error) {
	if len(urls) == 0 {
		return nil, errors.New("raftkv: a peer needs at least one URL")
	}
	out := make([]string, len(urls))
	for i, s := range urls {
		u, err := url.Parse(s)
		if err != nil {
			return nil, fmt.Errorf("raftkv: peer URL %q: %w", s, err)
		}
		if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return nil, fmt.Errorf("raftkv: peer URL %q: want http:// or https://host:port", s)
		}
		out[i] = strings.TrimSuffix(u.String(), "/")
	}
	return out, nil
}

// AddPeer starts sending to member id at urls (the first one that
// answers). Adding a known member updates its URLs; a removed one stays
// removed (member IDs are never reused).
func (t *peerTransport) AddPeer(id uint64, urls []string) error {
	clean, err := checkPeerURLs(urls)
	if err != nil {
		return err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	switch {
	case t.stopped:
		return ErrStopped
	case id == 0 || id == t.cfg.ID:
		return fmt.Errorf("raftkv: %s cannot be a peer", idString(id))
	case t.removed[id]:
		return fmt.Errorf("raftkv: member %s was removed from the cluster", idString(id))
	}
	if p := t.peers[id]; p != nil {
		p.setURLs(clean)
		return nil
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := &peer{id: id, t: t, ctx: ctx, cancel: cancel, urls: clean, retiring: make(chan struct{}),
		snapc: make(chan []byte, 1), snapPoll: make(chan *snapshotJob)}
	p.lanes[laneMessages] = &lane{p: p, client: t.client, queue: make(chan []byte, peerQueueMessages), maxBytes: peerMsgQueueBytes}
	p.lanes[laneAppends] = &lane{p: p, client: t.appClient, queue: make(chan []byte, peerQueueMessages), maxBytes: peerQueueBytes}
	t.peers[id] = p
	t.wg.Add(4)
	for _, l := range p.lanes {
		go l.run()
	}
	go p.runSnapshots()
	go p.runProbes()
	if t.recv != nil {
		t.wg.Add(len(p.lanes) + 1)
		for ln := range p.lanes {
			go p.runPull(ln)
		}
		go p.runSnapshotPoll()
	}
	return nil
}

// UpdatePeer replaces a member's peer URLs.
func (t *peerTransport) UpdatePeer(id uint64, urls []string) error {
	clean, err := checkPeerURLs(urls)
	if err != nil {
		return err
	}
	t.mu.RLock()
	p := t.peers[id]
	t.mu.RUnlock()
	if p == nil {
		return fmt.Errorf("raftkv: no peer %s", idString(id))
	}
	p.setURLs(clean)
	return nil
}

// RemovePeer stops sending to a member once what is queued for it, and
// last (nil: nothing more), is sent (within peerRequestTimeout), and
// refuses its messages from now on (410, as etcd answers a removed
// member): an answer to last meets the 410.
func (t *peerTransport) RemovePeer(id uint64, last *raftpb.Message) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if p := t.peers[id]; p != nil {
		if last != nil {
			if data, err := proto.Marshal(last); err == nil {
				key, isApp := appKeyOf(last)
				p.lane(last.GetType()).enqueue(data, key, isApp)
			}
		}
		close(p.retiring)
		time.AfterFunc(peerRequestTimeout, p.cancel)
		delete(t.peers, id)
		t.retired = slices.DeleteFunc(t.retired, func(r *peer) bool { return r.ctx.Err() != nil })
		t.retired = append(t.retired, p)
	}
	t.removed[id] = true
}

// peerStatus tells peerHandler whether a sender may talk to this member.
func (t *peerTransport) peerStatus(id uint64) peerState {
	t.mu.RLock()
	defer t.mu.RUnlock()
	switch {
	case t.removed[id]:
		return peerRemoved
	case t.peers[id] != nil:
		return peerKnown
	}
	return peerUnknown
}

// activeSince is when peer id last became reachable from this member; zero
// when it is not reachable now, or not a peer.
func (t *peerTransport) activeSince(id uint64) time.Time {
	t.mu.RLock()
	p := t.peers[id]
	t.mu.RUnlock()
	if p == nil {
		return time.Time{}
	}
	p.mu.Lock()
	since := p.activeSince
	p.mu.Unlock()
	if since.IsZero() {
		since = p.pulledSince()
	}
	return since
}

// pulledSince is when the peer's pulls, of both lanes, have been open
// since: a member that cannot be dialed but dials this one is reachable
// all the same (etcd's streams count whichever side dialed). Zero when
// either is not open.
func (p *peer) pulledSince() time.Time {
	if !p.heardLately() {
		return time.Time{}
	}
	var since time.Time
	if p.t.cfg.ProbeIdle > 0 {
		since = p.t.epoch.Add(time.Duration(p.heardFrom.Load()))
	}
	for _, l := range p.lanes {
		s := l.pulled.Load()
		if s == nil || s.ended() {
			return time.Time{}
		}
		if s.since.After(since) {
			since = s.since
		}
	}
	return since
}

// heardLately reports whether the peer's requests or messages reach this
// member: one came within heardWindow. A pull's connection may die
// without a word (the peer lost power), and writes to it go into buffers
// for a long while: the peer's own probes and messages tell. Without
// probes (ProbeIdle 0) nothing tells, and every pull counts.
func (p *peer) heardLately() bool {
	if p.t.cfg.ProbeIdle <= 0 {
		return true
	}
	return time.Since(p.t.epoch) < time.Duration(p.heard.Load())+p.t.heardWindow()
}

// heardWindow is how long a peer may go unheard: three probe intervals,
// and at least one interval and the longest a probe may take (its answer
// may be slow; the next one starts only then).
func (t *peerTransport) heardWindow() time.Duration {
	return max(3*t.cfg.ProbeIdle, t.cfg.ProbeIdle+peerRequestTimeout)
}

// heardPeer is member id as a peer that requests and messages come from
// (peerHandler), a member retiring too (its last messages may go to its
// pulls); nil when it is neither.
func (t *peerTransport) heardPeer(id uint64) *peer {
	t.mu.RLock()
	defer t.mu.RUnlock()
	if p := t.peers[id]; p != nil {
		return p
	}
	for _, r := range t.retired {
		if r.id == id {
			return r
		}
	}
	return nil
}

// hear records that a request or message of the peer reached this member.
// Nil: no peer, nothing to record.
func (p *peer) hear() {
	if p == nil {
		return
	}
	now := int64(time.Since(p.t.epoch))
	if last := p.heard.Swap(now); last == 0 || time.Duration(now-last) >= p.t.heardWindow() {
		p.heardFrom.Store(now) // a new run
	}
}

// Stop ends every peer's goroutines and in-flight requests and waits for
// them. Send does nothing afterwards.
func (t *peerTransport) Stop() {
	t.mu.Lock()
	t.stopped = true
	for id, p := range t.peers {
		p.cancel()
		delete(t.peers, id)
	}
	for _, p := range t.retired {
		p.cancel()
	}
	t.retired = nil
	t.mu.Unlock()
	t.wg.Wait()
	t.client.CloseIdleConnections()
	t.appClient.CloseIdleConnections()
}

// Send queues messages for their peers and returns at once. It runs on the
// Raft loop, which is why messages are encoded here: Raft must not change
// them under a concurrent encoder (reference §1.1). A full queue drops the
// message and reports the peer unreachable; a message for a member this
// transport does not know is dropped (Raft stops addressing removed ones).
func (t *peerTransport) Send(msgs []*raftpb.Message) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	var now time.Time
	for _, m := range msgs {
		p := t.peers[m.GetTo()]
		if p == nil {
			if ce := t.lg.Check(zap.DebugLevel, "message to an unknown member dropped"); ce != nil {
				ce.Write(zap.String("to", idString(m.GetTo())), zap.Stringer("type", m.GetType()))
			}
			continue
		}
		if m.GetType() == raftpb.MsgSnap {
			p.queueSnapshot(m)
			continue
		}
		l := p.lane(m.GetType())
		key, isApp := appKeyOf(m)
		if isApp && l.twinQueued(key) {
			continue
		}
		data, err := proto.Marshal(m)
		if err != nil {
			t.lg.Error("encoding a Raft message", zap.Error(err), zap.Stringer("type", m.GetType()))
			continue
		}
		if !l.enqueue(data, key, isApp) {
			t.cfg.ReportUnreachable(p.id)
			continue
		}
		if m.GetType() == raftpb.MsgApp && t.cfg.SentAppends != nil {
			if now.IsZero() {
				now = time.Now()
			}
			t.cfg.SentAppends.add(now, len(data))
		}
	}
}

// appKey names the entries a MsgApp carries: a leader never changes the
// entries of its log in its term, so two MsgApps with the same key carry
// the same entries after the same one.
type appKey struct{ term, index, logTerm, first, last uint64 }

// appKeyOf is m's appKey, and whether m is a MsgApp with entries.
func appKeyOf(m *raftpb.Message) (appKey, bool) {
	ents := m.GetEntries()
	if m.GetType() != raftpb.MsgApp || len(ents) == 0 {
		return appKey{}, false
	}
	return appKey{m.GetTerm(), m.GetIndex(), m.GetLogTerm(), ents[0].GetIndex(), ents[len(ents)-1].GetIndex()}, true
}

// twinQueued reports whether a MsgApp with key waits in the queue already,
// which Send then leaves out: a leader probing a follower (Raft's probe
// state, after an election or a lost message) sends its probe again after
// every heartbeat answer until the probe's own answer comes, and on a
// slow link, where heartbeats overtake the probe on their own lane, that
// is one copy of up to 1 MiB of entries a heartbeat interval, each of
// which would take the link as long as the first. The copy left out
// differs at most in its commit index, which heartbeats and the next
// append carry too; Raft takes it for sent, and the twin's answer settles
// what it expects of it.
func (l *lane) twinQueued(key appKey) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return key == l.lastApp && l.taken.Load() < l.lastAt
}

// enqueue queues data, a message with the given appKey when isApp, and
// reports whether it was taken.
func (l *lane) enqueue(data []byte, key appKey, isApp bool) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := int64(len(data))
	if l.queued.Load()+n > l.maxBytes {
		return false
	}
	select {
	case l.queue <- data:
		l.queued.Add(n)
		l.enqueued++
		if isApp {
			l.lastApp, l.lastAt = key, l.enqueued
		}
		return true
	default:
		return false
	}
}

// queueSnapshot hands a MsgSnap to the peer's snapshot goroutine, which
// streams it beside the message batches: heartbeats keep flowing during a
// long transfer. The message goes without its Data, which names a file
// on this member only.
func (p *peer) queueSnapshot(m *raftpb.Message) {
	mm := proto.Clone(m).(*raftpb.Message)
	if mm.Snapshot != nil {
		mm.Snapshot.Data = nil
	}
	data, err := proto.Marshal(mm)
	if err == nil {
		select {
		case p.snapc <- data:
			return
		default:
			err = errors.New("a snapshot is already being sent")
		}
	}
	p.t.lg.Warn("snapshot not sent", zap.String("to", idString(p.id)), zap.Error(err))
	p.t.cfg.ReportSnapshot(p.id, raft.SnapshotFailure)
}

func (p *peer) setURLs(urls []string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if cur := p.currentURL(); !p.failing && !p.activeSince.IsZero() && !slices.Contains(urls, cur) {
		p.kept = cur
	} else if slices.Contains(urls, p.kept) {
		p.kept = ""
	}
	p.urls, p.pick = urls, 0
}

func (p *peer) url() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.currentURL()
}

// currentURL is the URL the next request goes to. p.mu held.
func (p *peer) currentURL() string {
	if p.kept != "" {
		return p.kept
	}
	return p.urls[p.pick%len(p.urls)]
}

// failed moves on to the peer's next URL and logs once per outage.
func (p *peer) failed(u string, err error) {
	p.mu.Lock()
	switch {
	case u == p.kept:
		p.kept = "" // the member moved to its new URLs
	case p.urls[p.pick%len(p.urls)] == u:
		p.pick++
	}
	first := !p.failing
	p.failing, p.lastFail = true, err.Error()
	p.activeSince = time.Time{}
	p.mu.Unlock()
	if first {
		p.t.lg.Warn("peer unreachable", zap.String("peer", idString(p.id)), zap.String("url", u), zap.Error(err))
	}
}

// reached records that the peer answered: a probe, or a stream it took.
func (p *peer) reached() {
	p.mu.Lock()
	was := p.failing
	p.failing = false
	if p.activeSince.IsZero() {
		p.activeSince = time.Now()
	}
	p.viaPulled = false
	p.mu.Unlock()
	if was {
		p.t.lg.Info("peer reachable again", zap.String("peer", idString(p.id)))
	}
}

// lost handles a request to the peer that failed: nothing when this member
// stops, when the peer was removed, or when the peer says this member was
// (checkGone); otherwise the peer is marked unreachable, and so is it for
// Raft when messages were lost (not for a probe).
func (p *peer) lost(u string, err error, messages bool) {
	if p.ctx.Err() != nil {
		return // stopping: nobody to tell
	}
	select {
	case <-p.retiring:
		return // removed: a last word that did not get through
	default:
	}
	if p.t.checkGone(err) {
		return // the peer is up: no outage
	}
	p.failed(u, err)
	if messages {
		p.t.cfg.ReportUnreachable(p.id)
	}
}

// run writes the lane's queue to its stream in batches: whatever
// accumulated while the previous write was under way goes in the next
// one, up to peerBatchBytes.
func (l *lane) run() {
	p := l.p
	defer p.t.wg.Done()
	for {
		var first []byte
		select {
		case first = <-l.queue:
		case <-p.retiring:
			select {
			case first = <-l.queue:
			default:
				l.endStream() // all sent, and delivered if the peer is up
				l.endPulled(true)
				if p.lanesDone.Add(1) == int32(len(p.lanes)) {
					p.cancel() // the snapshot sender and the probes end too
				}
				return
			}
		case <-p.ctx.Done():
			l.endStream()
			l.endPulled(false)
			return
		}
		body := appendPeerFrame(nil, first)
		l.queued.Add(-int64(len(first)))
		l.taken.Add(1)
	batch:
		for len(body) < peerBatchBytes {
			select {
			case data := <-l.queue:
				body = appendPeerFrame(body, data)
				l.queued.Add(-int64(len(data)))
				l.taken.Add(1)
			default:
				break batch
			}
		}
		l.write(body)
	}
}

// write sends a batch on the lane's stream, opening one when there is none
// or the last one ended (the peer restarted, or its site was reloaded). A
// batch that does not go through is lost: the peer is reported
// unreachable, and Raft resends what matters.
func (l *lane) write(body []byte) {
	p := l.p
	s := l.pulledInstead()
	if s == nil {
		s = l.stream.Load()
		if s != nil && s.ended() {
			s.end()
			s = nil
		}
		if s == nil {
			s = p.openStream(l.client)
			l.stream.Store(s)
		}
	}
	err := s.write(body)
	p.mu.Lock()
	if err == nil {
		p.stats.success++
	} else {
		p.stats.fail++
	}
	p.mu.Unlock()
	switch {
	case err == nil:
	case s.pulled:
		l.pulled.CompareAndSwap(s, nil)
		s.cancel()
		if p.ctx.Err() == nil {
			p.t.cfg.ReportUnreachable(p.id)
		}
	default:
		// The stream's end reports it (openStream), with its cause.
		l.stream.Store(nil)
		s.end()
		s.cancel()
	}
}

// pulledInstead returns the lane's pulled stream when the batch goes there:
// the peer's URL failed this member's last request to it (a stream, a
// probe, a snapshot), and the peer has a pull open and is heard from (see
// heardLately). Once a probe gets through again, streams to the URL take
// over.
func (l *lane) pulledInstead() *peerStream {
	s := l.pulled.Load()
	p := l.p
	if s == nil || s.ended() || !p.heardLately() {
		return nil
	}
	p.mu.Lock()
	use := p.failing
	first := use && !p.viaPulled
	if use {
		p.viaPulled = true
	}
	p.mu.Unlock()
	if !use {
		return nil
	}
	if first {
		p.t.lg.Info("sending to the peer over the streams it opened to this member, as its URL cannot be reached",
			zap.String("peer", idString(p.id)))
	}
	return s
}

// endPulled ends the lane's pulled stream after what was written to it,
// and with wait, waits until it has gone out (or the peer's context
// ends: the pull's handler ends with it).
func (l *lane) endPulled(wait bool) {
	if s := l.pulled.Swap(nil); s != nil {
		s.end()
		if wait {
			select {
			case <-s.done:
			case <-l.p.ctx.Done(): // RemovePeer's deadline, or Stop
			}
		}
	}
}

// endStream closes the lane's stream after what was written to it, and
// waits until the peer has read it (or the peer's context ends).
func (l *lane) endStream() {
	if s := l.stream.Swap(nil); s != nil {
		s.end()
		<-s.done
	}
}

// peerStream is one open stream to a peer: the body of a POST that stays
// open while run writes batches of frames to it.
type peerStream struct {
	// pulled: the body of this member's answer to the peer's pull
	// (servePull), open since since.
	pulled bool
	since  time.Time
	url    string
	pw     *io.PipeWriter
	cancel context.CancelFunc
	stall  *time.Timer   // cuts a write that does not go through
	stallD time.Duration // the transport's streamStall
	done   chan struct{} // closed when the request has ended
}

// errStreamEnded is how a stream the peer ended (a restart, a reload of
// its site) shows to the next write, which opens another.
var errStreamEnded = errors.New("the peer ended the stream")

// errStreamStalled cuts a stream that took no streamPiece for StreamStall.
var errStreamStalled = errors.New("the peer stopped taking messages")

// errStreamUnanswered cuts a stream the peer did not answer within
// peerRequestTimeout.
var errStreamUnanswered = errors.New("the peer did not answer the stream within " + peerRequestTimeout.String())

// openStream starts a POST whose body is the stream; its answer is read on
// a goroutine of its own, which ends the stream with the request's error
// and reports it: the one place a stream's failure is reported, whichever
// side saw it first (a write fails only once the stream has ended or is
// being cut).
func (p *peer) openStream(client *http.Client) *peerStream {
	u := p.url()
	ctx, cancelCause := context.WithCancelCause(p.ctx)
	pr, pw := io.Pipe()
	// stop ends the request, and the body's reader: an HTTP/1 client
	// waiting for the next bytes of the body would not notice the
	// request's end until they came.
	stop := func(cause error) {
		cancelCause(cause)
		pr.CloseWithError(cause)
	}
	cancel := func() { stop(context.Canceled) }
	s := &peerStream{url: u, pw: pw, cancel: cancel, done: make(chan struct{}), stallD: p.t.streamStall()}
	s.armStall(stop)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u+peerStreamPath, pr)
	if err != nil {
		pr.CloseWithError(err)
		close(s.done)
		cancel()
		p.lost(u, err, true)
		return s
	}
	p.t.setHeaders(req.Header, p.id)
	p.t.wg.Add(1)
	go func() {
		defer p.t.wg.Done()
		defer close(s.done)
		defer cancel()
		// The peer's answer must come within peerRequestTimeout: a
		// handler that answers without reading the body (not the peer
		// endpoint: another route, a member that does not stream) would
		// have net/http read up to 256 KiB of it first, swallowing the
		// messages meanwhile.
		answer := time.AfterFunc(peerRequestTimeout, func() { stop(errStreamUnanswered) })
		err := p.runStream(client, req, answer)
		if ctx.Err() != nil && !errors.Is(context.Cause(ctx), context.Canceled) {
			err = context.Cause(ctx) // stalled, or unanswered
		}
		pr.CloseWithError(err)
		// Messages in flight may be lost, whoever ended the stream.
		// Refused or broken, the peer is unreachable; ended by the peer
		// (a restart, a reload), it is up: Raft resends all the same.
		if errors.Is(err, errStreamEnded) {
			select {
			case <-p.retiring:
			default:
				if p.ctx.Err() == nil {
					p.t.cfg.ReportUnreachable(p.id)
				}
			}
		} else {
			p.lost(u, err, true)
		}
	}()
	return s
}

// runStream sends the stream's request and reads its answer: 200, sent at
// once when the peer takes the stream, then nothing until the peer ends
// it. Any other answer is the peer's refusal (checkGone, lost).
func (p *peer) runStream(client *http.Client, req *http.Request, answer *time.Timer) error {
	resp, err := client.Do(req)
	answer.Stop()
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return &peerStatusError{status: resp.Status, code: resp.StatusCode, msg: strings.TrimSpace(string(msg))}
	}
	p.reached()
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		return err
	}
	return errStreamEnded
}

// armStall sets up the stall timer, stopped: when a write lets it fire, it
// closes the stream's body and calls cut with the cause.
func (s *peerStream) armStall(cut func(error)) {
	s.stall = time.AfterFunc(s.stallD, func() {
		err := fmt.Errorf("%w for %v", errStreamStalled, s.stallD)
		s.pw.CloseWithError(err)
		cut(err)
	})
	s.stall.Stop()
}

// write writes one batch; it fails when the stream has ended, or when the
// peer takes no streamPiece of it for StreamStall (its connection full).
func (s *peerStream) write(b []byte) error {
	for len(b) > 0 {
		n := min(len(b), streamPiece)
		s.stall.Reset(s.stallD)
		_, err := s.pw.Write(b[:n])
		if !s.stall.Stop() {
			err = errStreamStalled // the stall closed the pipe
		}
		if err != nil {
			return err
		}
		b = b[n:]
	}
	return nil
}

func (s *peerStream) ended() bool { return isClosed(s.done) }

// end closes the stream's body: the peer reads what is left, and the
// request ends.
func (s *peerStream) end() {
	s.stall.Stop()
	s.pw.Close()
}

// runProbes probes the peer every ProbeIdle with an empty batch, beside
// the streams: its answer tells that the peer is up (activeSince) and how
// long a round trip to it takes (/v2/stats/leader), and a 410 that this
// member was removed.
func (p *peer) runProbes() {
	defer p.t.wg.Done()
	d := p.t.cfg.ProbeIdle
	if d <= 0 {
		return
	}
	t := time.NewTimer(0) // the first probe at once
	defer t.Stop()
	for {
		select {
		case <-t.C:
			p.probe()
			t.Reset(d)
		case <-p.retiring:
			return
		case <-p.ctx.Done():
			return
		}
	}
}

// runPull keeps a pull of lane ln's messages open to the peer: a GET of
// its /raft/stream whose answer the peer writes the messages for this
// member to while it cannot open a stream to this member (a one-way
// firewall, a peer URL of this member that it cannot reach). A pull that
// ends is asked for again at once, one refused or failed after a wait.
func (p *peer) runPull(ln int) {
	defer p.t.wg.Done()
	p.keepAsking(func() pullResult { return p.pull(ln) })
}

// keepAsking runs ask (a pull, a snapshot poll) again and again, waiting
// between two as nextPullWait says, until the peer is retired or this
// member stops.
func (p *peer) keepAsking(ask func() pullResult) {
	wait := pullRetryMin
	for {
		wait = nextPullWait(wait, ask())
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-p.retiring:
			t.Stop()
			return
		case <-p.ctx.Done():
			t.Stop()
			return
		}
	}
}

// ask GETs path of the peer, a pull or a poll (what names it in the log),
// with client: the request ends when the peer is retired or this member
// stops, and, with answerWithin, when no answer came that soon. It returns
// the answer (nil: none) and what ends the request, for the caller to call
// when done with it.
func (p *peer) ask(client *http.Client, path, what string, answerWithin time.Duration) (*http.Response, context.Context, context.CancelFunc) {
	u := p.url()
	ctx, cancel := context.WithCancel(p.ctx)
	go func() {
		select {
		case <-p.retiring:
			cancel()
		case <-ctx.Done():
		}
	}()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u+path, nil)
	if err != nil {
		return nil, ctx, cancel
	}
	p.t.setHeaders(req.Header, p.id)
	req.Header.Del("Content-Type")
	req.Header.Set("Accept", peerContentType)
	if answerWithin > 0 {
		answer := time.AfterFunc(answerWithin, cancel)
		defer answer.Stop()
	}
	resp, err := client.Do(req)
	if err != nil {
		p.t.lg.Debug(what+" failed", zap.String("peer", idString(p.id)), zap.String("url", u), zap.Error(err))
		return nil, ctx, cancel
	}
	return resp, ctx, cancel
}

// refused reads the peer's refusal of a pull or a poll (what names it in
// the log): a 410 tells this member it was removed (checkGone).
func (p *peer) refused(resp *http.Response, what string) pullResult {
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	err := &peerStatusError{status: resp.Status, code: resp.StatusCode, msg: strings.TrimSpace(string(msg))}
	if !p.t.checkGone(err) {
		p.t.lg.Debug(what+" refused", zap.String("peer", idString(p.id)), zap.String("url", resp.Request.URL.String()), zap.Error(err))
	}
	return pullRefusal(resp.StatusCode)
}

// pullResult is how a pull or a snapshot poll went.
type pullResult int

const (
	pullAnswered pullResult = iota // the peer took it (and it has ended)
	pullFailed                     // no answer, or a refusal that may pass (503 stopping, 403 not known yet)
	pullRefused                    // the peer serves no pulls (pullRefusal)
)

// nextPullWait is the wait before the next pull, after one that waited
// wait and went as r went.
func nextPullWait(wait time.Duration, r pullResult) time.Duration {
	switch r {
	case pullAnswered:
		return pullRetryMin
	case pullRefused:
		return pullRefusedWait
	}
	return min(2*wait, pullRetryMax)
}

// pullRefusal is the pullResult of an answer other than the one expected:
// refused when the peer serves no pulls at all (an older member: 405;
// another handler: 404), failed otherwise (a member that does not know
// this one yet, 403, learns it soon).
func pullRefusal(status int) pullResult {
	if status == http.StatusMethodNotAllowed || status == http.StatusNotFound {
		return pullRefused
	}
	return pullFailed
}

// pull asks the peer for lane ln's messages and delivers what it writes
// until the answer ends, the peer is retired or this member stops. Its
// failures are not the peer's outage (probes and streams tell that): a
// peer that does not serve pulls sends its messages on streams of its own.
func (p *peer) pull(ln int) pullResult {
	resp, _, cancel := p.ask(p.lanes[ln].client, peerStreamPath+"?"+pullLaneParam+"="+laneNames[ln], "pull", peerRequestTimeout)
	defer cancel()
	if resp == nil {
		return pullFailed
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != peerContentType {
		return p.refused(resp, "pull")
	}
	p.t.recv.readStream(resp.Body, p.id, p)
	return pullAnswered
}

func appendPeerFrame(b, data []byte) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

func (t *peerTransport) setHeaders(h http.Header, to uint64) {
	h.Set("Content-Type", peerContentType)
	h.Set(headerPeerClusterID, idString(t.cfg.ClusterID))
	h.Set(headerPeerFrom, idString(t.cfg.ID))
	h.Set(headerPeerTo, idString(to))
}

// probe POSTs an empty batch and records the answer.
func (p *peer) probe() {
	u := p.url()
	ctx, cancel := context.WithTimeout(p.ctx, peerRequestTimeout)
	defer cancel()
	start := time.Now()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u+peerRaftPath, http.NoBody)
	if err == nil {
		p.t.setHeaders(req.Header, p.id)
		err = p.t.do(req)
	}
	if err != nil {
		// A peer that does not answer its probe does not take its
		// stream either, whatever the writes to it say (something
		// else answers there, or the connection is dead): cut them,
		// so that the next batch opens another and a failure shows.
		if !p.t.checkGoneErr(err) {
			for _, l := range p.lanes {
				if s := l.stream.Load(); s != nil {
					s.cancel()
				}
			}
		}
		p.lost(u, err, false)
		return
	}
	rtt := time.Since(start)
	p.mu.Lock()
	p.stats.sample(rtt)
	p.mu.Unlock()
	p.reached()
}

// peerStatusError is a peer's answer other than 204.
type peerStatusError struct {
	status string
	code   int
	msg    string
}

func (e *peerStatusError) Error() string { return e.status + ": " + e.msg }

// checkGoneErr reports whether err is a peer's 410.
func (t *peerTransport) checkGoneErr(err error) bool {
	se, ok := errors.AsType[*peerStatusError](err)
	return ok && se.code == http.StatusGone
}

// checkGone tells the member it was removed when a peer answers 410, as
// etcd's rafthttp does ("the member has been permanently removed from the
// cluster"), and reports whether it did.
func (t *peerTransport) checkGone(err error) bool {
	if !t.checkGoneErr(err) {
		return false
	}
	if t.cfg.Removed != nil {
		t.cfg.Removed()
	}
	return true
}

// do runs a request and turns any answer but 204 into an error carrying
// the peer's explanation.
func (t *peerTransport) do(req *http.Request) error {
	resp, err := t.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	if resp.StatusCode != http.StatusNoContent {
		return &peerStatusError{status: resp.Status, code: resp.StatusCode, msg: strings.TrimSpace(string(msg))}
	}
	return nil
}

func (p *peer) runSnapshots() {
	defer p.t.wg.Done()
	for {
		select {
		case frame := <-p.snapc:
			p.sendSnapshot(frame)
		case <-p.ctx.Done():
			return
		}
	}
}

var errSnapshotAbandoned = errors.New("raftkv: snapshot request ended")

// sendSnapshot streams the metadata frame and this member's snapshot to the
// peer through a pipe: the file is read once, in one read transaction, and
// never copied in memory. Raft hears how it ended. A transfer that makes no
// progress for SnapshotStall is abandoned: Raft waits for the report before
// it tries that follower again, so a connection that hangs without an
// error must not keep it waiting for ever.
func (p *peer) sendSnapshot(frame []byte) {
	if p.offerSnapshot(frame) {
		return
	}
	u := p.url()
	ctx, cancel := context.WithCancel(p.ctx)
	defer cancel()
	pr, pw := io.Pipe()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u+peerSnapshotPath, pr)
	if err != nil {
		p.t.cfg.ReportSnapshot(p.id, raft.SnapshotFailure)
		return
	}
	var progress atomic.Int64 // when the connection last took bytes (UnixNano)
	progress.Store(time.Now().UnixNano())
	stall := p.t.snapshotStall()
	stalled, done := make(chan struct{}), make(chan struct{})
	defer close(done)
	go func() {
		t := time.NewTimer(stall)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				idle := time.Since(time.Unix(0, progress.Load()))
				if idle >= stall {
					close(stalled)
					cancel()
					return
				}
				t.Reset(stall - idle)
			}
		}
	}()
	p.t.setHeaders(req.Header, p.id)
	req.Trailer = http.Header{trailerSnapshotHash: nil}
	written := make(chan int64, 1)
	go func() {
		var n int64
		w := progressWriter{w: pw, at: &progress}
		_, err := w.Write(appendPeerFrame(nil, frame))
		if err == nil {
			h := sha256.New()
			n, err = p.t.cfg.Snapshot(io.MultiWriter(w, h))
			if err == nil {
				// Read by the HTTP client after the body's EOF, which
				// the Close below comes before.
				req.Trailer.Set(trailerSnapshotHash, hex.EncodeToString(h.Sum(nil)))
			}
		}
		pw.CloseWithError(err)
		written <- n
	}()
	err = p.t.do(req)
	// The client may have stopped reading early: unblock the writer.
	pr.CloseWithError(errSnapshotAbandoned)
	n := <-written
	if err != nil {
		select {
		case <-stalled:
			err = fmt.Errorf("no progress for %v", stall)
		default:
		}
		if p.ctx.Err() == nil {
			p.t.lg.Warn("sending a snapshot failed", zap.String("to", idString(p.id)), zap.String("url", u), zap.Error(err))
			p.mu.Lock()
			p.stats.fail++
			p.mu.Unlock()
			p.failed(u, err)
			p.t.cfg.ReportUnreachable(p.id)
			p.t.checkGone(err)
		}
		p.t.cfg.ReportSnapshot(p.id, raft.SnapshotFailure)
		return
	}
	p.t.lg.Info("snapshot sent", zap.String("to", idString(p.id)), zap.Int64("bytes", n))
	p.t.cfg.ReportSnapshot(p.id, raft.SnapshotFinish)
}

// snapshotJob is a snapshot handed to a peer's poll: the MsgSnap's frame,
// and where the poll's handler says how sending it went.
type snapshotJob struct {
	frame []byte
	done  chan error
}

// offerSnapshot hands the snapshot to the peer's poll for one (GET
// /raft/snapshot), when the peer's URL failed this member's last request
// to it and a poll waits: the poll's answer carries it (servePull's
// counterpart for snapshots, which etcd sends only to the peer's URL). It
// reports whether it did, and Raft hears how it went: finished once the
// whole file went out (the peer may still refuse it; Raft then finds the
// follower still behind and sends another).
func (p *peer) offerSnapshot(frame []byte) bool {
	p.mu.Lock()
	failing := p.failing
	p.mu.Unlock()
	if !failing {
		return false
	}
	job := &snapshotJob{frame: frame, done: make(chan error, 1)}
	select {
	case p.snapPoll <- job:
	default:
		return false
	}
	if err := <-job.done; err != nil {
		if p.ctx.Err() == nil {
			p.t.lg.Warn("sending a snapshot in answer to the peer's poll failed", zap.String("to", idString(p.id)), zap.Error(err))
			p.mu.Lock()
			p.stats.fail++
			p.mu.Unlock()
			p.t.cfg.ReportUnreachable(p.id)
		}
		p.t.cfg.ReportSnapshot(p.id, raft.SnapshotFailure)
		return true
	}
	p.t.lg.Info("snapshot sent in answer to the peer's poll", zap.String("to", idString(p.id)))
	p.t.cfg.ReportSnapshot(p.id, raft.SnapshotFinish)
	return true
}

// answerContext is the context of an answer to peer p's pull or poll: r's,
// ended too when this member stops (ended, halted) or p's context ends.
// Call stop when the answer is done.
func answerContext(r *http.Request, p *peer, ended, halted <-chan struct{}) (ctx context.Context, stop func()) {
	ctx, cancel := context.WithCancel(r.Context())
	unhook := context.AfterFunc(p.ctx, cancel)
	go func() {
		select {
		case <-ended:
		case <-halted:
		case <-ctx.Done():
		}
		cancel()
	}()
	return ctx, func() {
		unhook()
		cancel()
	}
}

// askedBy is the peer a pull or a poll comes from; nil, answered 403,
// when it is no peer (removed meanwhile: checkHeaders let it through).
func (t *peerTransport) askedBy(w http.ResponseWriter, from uint64) *peer {
	t.mu.RLock()
	p := t.peers[from]
	t.mu.RUnlock()
	if p == nil {
		http.Error(w, "member "+idString(from)+" is not a member of this cluster", http.StatusForbidden)
	}
	return p
}

// serveSnapshotPoll answers member from's poll for a snapshot (GET
// /raft/snapshot) once this member has one for it that it cannot POST
// (offerSnapshot): with what a POST's body would be, the MsgSnap's frame
// then the file, its SHA-256 in a trailer. Until then the poll waits; it
// gets 204 when this member stops or from is retired. A transfer that
// makes no progress for SnapshotStall is cut.
func (t *peerTransport) serveSnapshotPoll(w http.ResponseWriter, r *http.Request, from uint64, ended, halted <-chan struct{}) {
	p := t.askedBy(w, from)
	if p == nil {
		return
	}
	rc := http.NewResponseController(w)
	// A poll waits: the site's timeouts are for requests.
	_ = rc.SetReadDeadline(time.Time{})
	_ = rc.SetWriteDeadline(time.Time{})
	ctx, stop := answerContext(r, p, ended, halted)
	defer stop()
	var job *snapshotJob
	select {
	case job = <-p.snapPoll:
	case <-ctx.Done():
	case <-p.retiring:
	}
	if job == nil {
		w.WriteHeader(http.StatusNoContent) // a reload, a stop: poll again
		return
	}
	job.done <- t.writeSnapshotAnswer(ctx, w, rc, job.frame)
}

// writeSnapshotAnswer writes a poll's answer: the frame, then this member's
// snapshot, its SHA-256 in the trailer. It is cut when ctx ends.
func (t *peerTransport) writeSnapshotAnswer(ctx context.Context, w http.ResponseWriter, rc *http.ResponseController, frame []byte) error {
	w.Header().Set("Content-Type", peerContentType)
	w.Header().Set("Trailer", trailerSnapshotHash)
	w.WriteHeader(http.StatusOK)
	var progress atomic.Int64 // when the connection last took bytes (UnixNano)
	progress.Store(time.Now().UnixNano())
	stall := t.snapshotStall()
	var stalled atomic.Bool
	stop, watched := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(watched)
		tm := time.NewTimer(stall)
		defer tm.Stop()
		for {
			select {
			case <-stop:
				return
			case <-ctx.Done():
			case <-tm.C:
				idle := time.Since(time.Unix(0, progress.Load()))
				if idle < stall {
					tm.Reset(stall - idle)
					continue
				}
				stalled.Store(true)
			}
			_ = rc.SetWriteDeadline(time.Now())
			return
		}
	}()
	defer func() {
		close(stop)
		<-watched
	}()
	pw := progressWriter{w: w, at: &progress}
	h := sha256.New()
	_, err := pw.Write(appendPeerFrame(nil, frame))
	if err == nil {
		_, err = t.cfg.Snapshot(io.MultiWriter(pw, h))
	}
	if err == nil {
		w.Header().Set(trailerSnapshotHash, hex.EncodeToString(h.Sum(nil)))
		err = rc.Flush()
	}
	if err != nil && stalled.Load() {
		err = fmt.Errorf("no progress for %v: %w", stall, err)
	}
	return err
}

// runSnapshotPoll keeps a poll for a snapshot open to the peer (GET
// /raft/snapshot), which the peer answers with one when it cannot POST it
// to this member (offerSnapshot).
func (p *peer) runSnapshotPoll() {
	defer p.t.wg.Done()
	p.keepAsking(p.pollSnapshot)
}

// pollSnapshot polls the peer once, and takes the snapshot it answers
// with, if any.
func (p *peer) pollSnapshot() pullResult {
	resp, ctx, cancel := p.ask(p.t.client, peerSnapshotPath, "snapshot poll", 0)
	defer cancel()
	if resp == nil {
		return pullFailed
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusNoContent:
		return pullAnswered
	case resp.StatusCode == http.StatusOK && resp.Header.Get("Content-Type") == peerContentType:
		status, msg := p.t.recv.receiveSnapshot(resp.Body, func() string { return resp.Trailer.Get(trailerSnapshotHash) }, p.id)
		if status != http.StatusNoContent && ctx.Err() == nil {
			p.t.lg.Warn("snapshot in answer to a poll not taken", zap.String("from", idString(p.id)), zap.Int("status", status), zap.String("why", msg))
		}
		return pullAnswered
	}
	return p.refused(resp, "snapshot poll")
}

// progressWriter notes the time of every write that went through: on a
// pipe, the moment the HTTP client took the bytes.
type progressWriter struct {
	w  io.Writer
	at *atomic.Int64
}

func (pw progressWriter) Write(b []byte) (int, error) {
	n, err := pw.w.Write(b)
	if n > 0 {
		pw.at.Store(time.Now().UnixNano())
	}
	return n, err
}

// snapshotReceiver stores an incoming snapshot: storage.Store.
type snapshotReceiver interface {
	ReceiveSnapshot(r io.Reader, index uint64) (string, error)
}

// peerHandler is the receiving side of the peer protocol, an http.Handler
// for Caddy's peer site (which authenticates members with client_auth):
// POST /raft, /raft/stream and /raft/snapshot, and the peers' pulls and
// polls (GET /raft/stream, /raft/snapshot), which the transport serves
// (out). It never blocks on Raft: deliver must
// not block (Node.receive drops when its queue is full, as a lossy network
// would).
type peerHandler struct {
	id        uint64 // this member
	clusterID uint64
	status    func(from uint64) peerState // peerTransport.peerStatus
	deliver   func(*raftpb.Message)
	snapshots snapshotReceiver
	lg        *zap.Logger
	snapBusy  chan struct{} // one snapshot received at a time
	// members, if set, lists the cluster for GET /raft/members: a member
	// joining with initial cluster state "existing" learns its ID, the
	// cluster ID and its peers there, as etcd's joining member reads its
	// peers' /members.
	members func() []memberRecord
	// recvAppends, if set, samples each MsgApp received, with its encoded
	// size (the receive rates of /v2/stats/self).
	recvAppends *rateQueue
	// ended and halted, once closed, end the streams being read and the
	// pulls being served: the process exits (EndPeerStreams) or the
	// member's loop has ended. Nil: never.
	ended, halted <-chan struct{}
	// out serves the peers' pulls (GET /raft/stream); nil: they get 405
	// (setReceiver).
	out *peerTransport
}

func newPeerHandler(id, clusterID uint64, status func(uint64) peerState, deliver func(*raftpb.Message), snapshots snapshotReceiver, lg *zap.Logger) *peerHandler {
	if lg == nil {
		lg = zap.NewNop()
	}
	return &peerHandler{id: id, clusterID: clusterID, status: status, deliver: deliver,
		snapshots: snapshots, lg: lg, snapBusy: make(chan struct{}, 1)}
}

// AnswerBeforeBody lets a handler answer a peer's request before it has
// read the body, which for a stream does not end (full duplex). An HTTP/1
// connection closes after the answer: what is left of the body is no
// request, and Go's server, reading on for the next one while the body's
// own read is pending, panics and resets the connection (golang/go#68560),
// which a peer that sends its next request on it sees fail.
func AnswerBeforeBody(w http.ResponseWriter, r *http.Request) {
	_ = http.NewResponseController(w).EnableFullDuplex()
	if r.ProtoMajor == 1 {
		w.Header().Set("Connection", "close")
	}
}

// closeOnError closes an HTTP/1 connection after an error answer, which may
// leave the body unread: with full duplex on (a stream's refusal, or the
// site's enable_full_duplex) Go's server would otherwise read on for the
// next request while the body's read is pending (see AnswerBeforeBody).
type closeOnError struct{ http.ResponseWriter }

func (c closeOnError) WriteHeader(code int) {
	if code >= http.StatusBadRequest {
		c.Header().Set("Connection", "close")
	}
	c.ResponseWriter.WriteHeader(code)
}

// Unwrap gives http.ResponseController the connection's writer.
func (c closeOnError) Unwrap() http.ResponseWriter { return c.ResponseWriter }

func (h *peerHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.ProtoMajor == 1 {
		w = closeOnError{w}
	}
	if r.URL.Path == peerMembersPath && h.members != nil {
		h.serveMembers(w, r)
		return
	}
	if r.URL.Path != peerRaftPath && r.URL.Path != peerStreamPath && r.URL.Path != peerSnapshotPath {
		http.NotFound(w, r)
		return
	}
	if r.URL.Path == peerStreamPath {
		// An answer goes out at once, before the body is read: a
		// refusal too (HTTP/1 would otherwise read the body first, and a
		// stream's does not end).
		AnswerBeforeBody(w, r)
	}
	pull := r.URL.Path == peerStreamPath && r.Method == http.MethodGet && h.out != nil
	poll := r.URL.Path == peerSnapshotPath && r.Method == http.MethodGet && h.out != nil
	if r.Method != http.MethodPost && !pull && !poll {
		w.Header().Set("Allow", http.MethodPost)
		if r.URL.Path != peerRaftPath && h.out != nil {
			w.Header().Set("Allow", "GET, POST")
		}
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	from, removed, ok := h.checkHeaders(w, r)
	if !ok {
		return
	}
	sender := h.sender(from)
	sender.hear()
	if (pull || poll) && (isClosed(h.ended) || isClosed(h.halted)) {
		// Stopping: the pull would end at once, and be asked for again.
		w.Header().Set("Retry-After", "1")
		http.Error(w, "member stopping", http.StatusServiceUnavailable)
		return
	}
	switch {
	case pull:
		ln := slices.Index(laneNames[:], r.URL.Query().Get(pullLaneParam))
		if ln < 0 {
			http.Error(w, fmt.Sprintf("%s must be one of %q", pullLaneParam, laneNames), http.StatusBadRequest)
			return
		}
		h.out.servePull(w, r, from, ln, h.ended, h.halted)
		return
	case poll:
		h.out.serveSnapshotPoll(w, r, from, h.ended, h.halted)
		return
	}
	switch r.URL.Path {
	case peerSnapshotPath:
		h.serveSnapshot(w, r, from)
	case peerStreamPath:
		h.serveStream(w, r, from, sender)
	default:
		h.serveBatch(w, r, from, removed)
	}
}

// serveStream takes a member's stream: 200 at once, then every frame as it
// comes, delivered in order, until the sender ends the stream, it breaks,
// or this member stops (the request's context ends, or ended or halted is
// closed): a read deadline in the past then ends the wait for the next
// frame. A bad frame ends the stream; the frames before it were delivered.
// A member removed while its stream is open is heard no more, but for a
// MsgTimeoutNow (see serveBatch); its probes hear 410. Each frame is
// heard from sender (see readStream).
func (h *peerHandler) serveStream(w http.ResponseWriter, r *http.Request, from uint64, sender *peer) {
	rc := http.NewResponseController(w) // full duplex, closing (ServeHTTP)
	w.WriteHeader(http.StatusOK)
	if err := rc.Flush(); err != nil {
		return
	}
	// A stream lasts: the site's read and write timeouts (Caddy's
	// `timeouts`) are for requests, and would cut it.
	_ = rc.SetReadDeadline(time.Time{})
	_ = rc.SetWriteDeadline(time.Time{})
	// The goroutine that cuts the read ends before the handler returns:
	// the writer must not be used after that.
	stop, cut := make(chan struct{}), make(chan struct{})
	defer func() {
		close(stop)
		<-cut
	}()
	go func() {
		defer close(cut)
		select {
		case <-stop:
			return
		case <-r.Context().Done():
		case <-h.ended:
		case <-h.halted:
		}
		_ = rc.SetReadDeadline(time.Now())
	}()
	h.readStream(r.Body, from, sender)
}

// sender is member from as a peer of this member's transport, whose
// requests and messages are heard (peer.hear); nil without a transport.
func (h *peerHandler) sender(from uint64) *peer {
	if h.out == nil {
		return nil
	}
	return h.out.heardPeer(from)
}

// readStream delivers the frames of a stream from member from, in order,
// until it ends or breaks (the caller ends it by making its reads fail);
// each is heard from sender (nil: not recorded).
// A bad frame ends it; the frames before it were delivered. A member
// removed while its stream is open is heard no more, but for a
// MsgTimeoutNow (see serveBatch).
func (h *peerHandler) readStream(body io.Reader, from uint64, sender *peer) {
	for {
		frame, err := readPeerFrame(body, peerMaxFrame)
		if err != nil {
			if err != io.EOF {
				h.lg.Debug("peer stream ended", zap.String("from", idString(from)), zap.Error(err))
			}
			return
		}
		sender.hear()
		m, err := h.decodeMessage(frame, from)
		if err != nil {
			h.lg.Warn("bad message in a peer stream", zap.String("from", idString(from)), zap.Error(err))
			return
		}
		if h.status(from) == peerRemoved && m.GetType() != raftpb.MsgTimeoutNow {
			continue
		}
		h.deliver(m)
	}
}

// servePull answers member from's pull of lane ln (GET /raft/stream): 200
// at once, then whatever this member writes to it (lane.write: while from
// cannot be reached on its URL), until the pull ends, breaks or stalls
// (StreamStall, as a stream), from is removed or retired, or this member
// stops (ended, halted). A newer pull of the same lane replaces it.
func (t *peerTransport) servePull(w http.ResponseWriter, r *http.Request, from uint64, ln int, ended, halted <-chan struct{}) {
	p := t.askedBy(w, from)
	if p == nil {
		return
	}
	rc := http.NewResponseController(w)
	w.Header().Set("Content-Type", peerContentType)
	w.WriteHeader(http.StatusOK)
	if err := rc.Flush(); err != nil {
		return
	}
	// A pull lasts: the site's timeouts are for requests.
	_ = rc.SetReadDeadline(time.Time{})
	_ = rc.SetWriteDeadline(time.Time{})
	pr, pw := io.Pipe()
	cutc := make(chan struct{})
	cutOnce := sync.OnceFunc(func() { close(cutc) })
	cut := func(err error) {
		pr.CloseWithError(err)
		cutOnce()
	}
	s := &peerStream{pulled: true, since: time.Now(), url: r.RemoteAddr, pw: pw,
		cancel: func() { cut(errStreamEnded) }, done: make(chan struct{}), stallD: t.streamStall()}
	s.armStall(cut)
	// The goroutine that cuts a write ends before the handler returns:
	// the writer must not be used after that.
	ctx, stopCtx := answerContext(r, p, ended, halted)
	defer stopCtx()
	stop, watched := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(watched)
		select {
		case <-stop:
			return
		case <-ctx.Done():
		case <-cutc:
		}
		pr.CloseWithError(errStreamEnded)
		_ = rc.SetWriteDeadline(time.Now())
	}()
	l := p.lanes[ln]
	if old := l.pulled.Swap(s); old != nil {
		old.cancel()
	}
	defer func() {
		l.pulled.CompareAndSwap(s, nil)
		close(stop)
		<-watched
		pr.CloseWithError(errStreamEnded)
		close(s.done)
	}()
	// A pull mostly waits: its buffer grows to a streamPiece once one read
	// fills it.
	buf := make([]byte, 4<<10)
	for {
		n, err := pr.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				pr.CloseWithError(werr)
				return
			}
			if werr := rc.Flush(); werr != nil {
				pr.CloseWithError(werr)
				return
			}
		}
		if err != nil {
			return
		}
		if n == len(buf) && len(buf) < streamPiece {
			buf = make([]byte, streamPiece)
		}
	}
}

// serveMembers answers the member list with the cluster ID in a header.
func (h *peerHandler) serveMembers(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set(headerPeerClusterID, idString(h.clusterID))
	w.Write(encodeMembers(h.members()))
}

// checkHeaders refuses what is not for this member or comes from no
// member: etcd answers 412 for a cluster ID mismatch and 410 to a removed
// member; an unknown sender gets 403. A removed member's message batch is
// let through with removed true: serveBatch takes its last word (see
// handOver) and answers 410 all the same.
func (h *peerHandler) checkHeaders(w http.ResponseWriter, r *http.Request) (from uint64, removed, ok bool) {
	cid, err := strconv.ParseUint(r.Header.Get(headerPeerClusterID), 16, 64)
	if err != nil || cid != h.clusterID {
		h.lg.Warn("peer request from another cluster refused",
			zap.String("cluster-id", idString(h.clusterID)),
			zap.String("request-cluster-id", r.Header.Get(headerPeerClusterID)),
			zap.String("remote-addr", r.RemoteAddr))
		http.Error(w, fmt.Sprintf("cluster ID mismatch: this member belongs to cluster %s, the request to %q",
			idString(h.clusterID), r.Header.Get(headerPeerClusterID)), http.StatusPreconditionFailed)
		return 0, false, false
	}
	to, err := strconv.ParseUint(r.Header.Get(headerPeerTo), 16, 64)
	if err != nil || to != h.id {
		http.Error(w, fmt.Sprintf("to field mismatch: this member is %s, the request is for %q",
			idString(h.id), r.Header.Get(headerPeerTo)), http.StatusPreconditionFailed)
		return 0, false, false
	}
	from, err = strconv.ParseUint(r.Header.Get(headerPeerFrom), 16, 64)
	if err != nil || from == 0 {
		http.Error(w, "missing or malformed "+headerPeerFrom, http.StatusBadRequest)
		return 0, false, false
	}
	switch h.status(from) {
	case peerKnown:
		return from, false, true
	case peerRemoved:
		if r.URL.Path == peerRaftPath {
			return from, true, true
		}
		http.Error(w, removedText(from), http.StatusGone)
	default:
		h.lg.Warn("peer request from an unknown member refused", zap.String("from", idString(from)), zap.String("remote-addr", r.RemoteAddr))
		http.Error(w, "member "+idString(from)+" is not a member of this cluster", http.StatusForbidden)
	}
	return 0, false, false
}

// readPeerFrame reads one frame; io.EOF only at a frame boundary.
func readPeerFrame(r io.Reader, limit int) ([]byte, error) {
	var n [4]byte
	if _, err := io.ReadFull(r, n[:]); err != nil {
		if err == io.ErrUnexpectedEOF {
			return nil, errors.New("truncated frame length")
		}
		return nil, err
	}
	size := binary.BigEndian.Uint32(n[:])
	if uint64(size) > uint64(limit) {
		return nil, fmt.Errorf("frame of %d bytes exceeds the limit of %d", size, limit)
	}
	// A frame's memory follows the bytes that arrive, not the length its
	// first four bytes claim: up to peerFrameAlloc at once, then doubling
	// as they come, up to the frame's size. A request cut short (or one
	// that lies) costs about twice what it sent, and a whole frame ends in
	// a buffer of its size.
	b := make([]byte, 0, min(int(size), peerFrameAlloc))
	for len(b) < int(size) {
		if len(b) == cap(b) {
			nb := make([]byte, len(b), min(2*len(b), int(size)))
			copy(nb, b)
			b = nb
		}
		k, err := io.ReadFull(r, b[len(b):min(cap(b), int(size))])
		b = b[:len(b)+k]
		if err != nil {
			return nil, fmt.Errorf("truncated frame (%d of %d bytes): %w", len(b), size, err)
		}
	}
	return b, nil
}

// peerFrameAlloc is the most readPeerFrame allocates for a frame before
// its bytes arrive.
const peerFrameAlloc = 4 << 20

// decodeMessage decodes one frame of a batch or a stream from member from,
// refusing what does not belong there (checkPeerMessage; a snapshot, which
// has a path of its own), and samples the MsgApps received.
func (h *peerHandler) decodeMessage(frame []byte, from uint64) (*raftpb.Message, error) {
	m := &raftpb.Message{}
	if err := proto.Unmarshal(frame, m); err != nil {
		return nil, err
	}
	if err := h.checkPeerMessage(m, from); err != nil {
		return nil, err
	}
	switch m.GetType() {
	case raftpb.MsgSnap:
		return nil, errors.New("snapshots go to " + peerSnapshotPath)
	case raftpb.MsgApp:
		if h.recvAppends != nil {
			h.recvAppends.add(time.Now(), len(frame))
		}
	}
	return m, nil
}

// checkPeerMessage accepts only what a member may send over the wire, from
// the member the headers name, to this member.
func (h *peerHandler) checkPeerMessage(m *raftpb.Message, from uint64) error {
	switch {
	case m.GetFrom() != from:
		return fmt.Errorf("message from %s in a request from %s", idString(m.GetFrom()), idString(from))
	case m.GetTo() != h.id:
		return fmt.Errorf("message to %s sent to %s", idString(m.GetTo()), idString(h.id))
	case raft.IsLocalMsg(m.GetType()):
		return fmt.Errorf("local message %s", m.GetType())
	}
	return nil
}

// serveBatch decodes the whole batch before delivering any of it, so a bad
// request delivers nothing. From a removed member it delivers only
// MsgTimeoutNow: a leader removed hands leadership over with it (handOver),
// often after the receiver has applied the removal; it can start an
// election, nothing more.
func (h *peerHandler) serveBatch(w http.ResponseWriter, r *http.Request, from uint64, removed bool) {
	body := http.MaxBytesReader(w, r.Body, peerMaxBody)
	fail := func(msg string, status int) {
		if removed {
			msg, status = removedText(from), http.StatusGone
		}
		http.Error(w, msg, status)
	}
	var msgs []*raftpb.Message
	for {
		frame, err := readPeerFrame(body, peerMaxFrame)
		if err == io.EOF {
			break
		}
		if err != nil {
			status := http.StatusBadRequest
			if _, ok := errors.AsType[*http.MaxBytesError](err); ok {
				status = http.StatusRequestEntityTooLarge
			}
			fail("bad message batch: "+err.Error(), status)
			return
		}
		m, err := h.decodeMessage(frame, from)
		if err != nil {
			fail("bad message batch: "+err.Error(), http.StatusBadRequest)
			return
		}
		msgs = append(msgs, m)
	}
	for _, m := range msgs {
		if !removed || m.GetType() == raftpb.MsgTimeoutNow {
			h.deliver(m)
		}
	}
	if removed {
		http.Error(w, removedText(from), http.StatusGone)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// removedText is the body of the 410 a removed member hears.
func removedText(from uint64) string {
	return "member " + idString(from) + " was removed from the cluster"
}

// serveSnapshot streams the snapshot into the store, then hands Raft the
// MsgSnap with the received file's path as its Data (the convention
// storage.Ready documents).
func (h *peerHandler) serveSnapshot(w http.ResponseWriter, r *http.Request, from uint64) {
	status, msg := h.receiveSnapshot(r.Body, func() string { return r.Trailer.Get(trailerSnapshotHash) }, from)
	if status != http.StatusNoContent {
		http.Error(w, msg, status)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// receiveSnapshot reads a snapshot from member from — the MsgSnap's frame,
// then the file, whose SHA-256 want gives once body has ended — into the
// store, and hands Raft the MsgSnap. It returns the answer for the
// sender: 204, or an error status and what went wrong.
func (h *peerHandler) receiveSnapshot(body io.Reader, want func() string, from uint64) (int, string) {
	select {
	case h.snapBusy <- struct{}{}:
		defer func() { <-h.snapBusy }()
	default:
		// The sender reports a failure to Raft, which retries later.
		return http.StatusServiceUnavailable, "another snapshot is being received"
	}
	frame, err := readPeerFrame(body, peerMaxSnapFrame)
	if err != nil {
		return http.StatusBadRequest, "bad snapshot: " + err.Error()
	}
	m := &raftpb.Message{}
	if err := proto.Unmarshal(frame, m); err != nil {
		return http.StatusBadRequest, "bad snapshot: " + err.Error()
	}
	if err := h.checkPeerMessage(m, from); err != nil {
		return http.StatusBadRequest, "bad snapshot: " + err.Error()
	}
	if m.GetType() != raftpb.MsgSnap || m.GetSnapshot().GetMetadata().GetIndex() == 0 {
		return http.StatusBadRequest, "bad snapshot: not a snapshot message"
	}
	hv := &hashedBody{r: body, h: sha256.New(), want: want}
	path, err := h.snapshots.ReceiveSnapshot(hv, m.GetSnapshot().GetMetadata().GetIndex())
	switch {
	case errors.Is(err, storage.ErrSnapshotInvalid):
		// A stream cut short (the leader stopped, the connection broke) or
		// damaged: the leader sends another one later.
		h.lg.Warn("snapshot refused", zap.String("from", idString(from)),
			zap.Uint64("index", m.GetSnapshot().GetMetadata().GetIndex()), zap.Error(err))
		return http.StatusBadRequest, "bad snapshot: " + err.Error()
	case errors.Is(err, storage.ErrClosed):
		return http.StatusServiceUnavailable, "member stopping"
	case err != nil:
		h.lg.Error("receiving a snapshot", zap.String("from", idString(from)), zap.Error(err))
		return http.StatusInternalServerError, "receiving the snapshot failed"
	}
	m.Snapshot.Data = []byte(path)
	h.lg.Info("snapshot received", zap.String("from", idString(from)),
		zap.Uint64("index", m.GetSnapshot().GetMetadata().GetIndex()))
	h.deliver(m)
	return http.StatusNoContent, ""
}

// hashedBody checks the snapshot's SHA-256 trailer when the body ends, so a
// stream damaged or cut short on the way fails before the file is kept.
type hashedBody struct {
	r    io.Reader
	h    hash.Hash
	want func() string
}

var errSnapshotHash = errors.New("snapshot checksum mismatch")

func (b *hashedBody) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	b.h.Write(p[:n])
	if err == io.EOF && hex.EncodeToString(b.h.Sum(nil)) != b.want() {
		return n, errSnapshotHash
	}
	return n, err
}
