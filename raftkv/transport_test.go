package raftkv

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/etcaddy/etcaddy/storage"
	"go.etcd.io/raft/v3"
	"go.etcd.io/raft/v3/raftpb"
	"go.uber.org/goleak"
	"google.golang.org/protobuf/proto"
)

const (
	peerTestCluster  = 0xc1
	peerTestLeader   = 1
	peerTestFollower = 2
)

// peerFeedback records what the transport reports to Raft.
type peerFeedback struct {
	mu          sync.Mutex
	unreachable int
	snapshots   []raft.SnapshotStatus
}

func (f *peerFeedback) reportUnreachable(uint64) { f.mu.Lock(); f.unreachable++; f.mu.Unlock() }

func (f *peerFeedback) reportSnapshot(_ uint64, s raft.SnapshotStatus) {
	f.mu.Lock()
	f.snapshots = append(f.snapshots, s)
	f.mu.Unlock()
}

func (f *peerFeedback) counts() (int, []raft.SnapshotStatus) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.unreachable, append([]raft.SnapshotStatus(nil), f.snapshots...)
}

// peerNoLeaks checks, when t ends, that it left no goroutine running. The
// goroutines already running when it starts are not its own: a test
// before it that failed with some left is reported once, by itself and by
// TestMain's check, not again by every test after it.
func peerNoLeaks(t *testing.T) {
	before := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, before) })
}

// peerTestReceiver is member 2 of cluster peerTestCluster, which knows member 1.
type peerTestReceiver struct {
	srv      *httptest.Server
	h        *peerHandler
	got      chan *raftpb.Message
	requests atomic.Int64
	proto    atomic.Int64 // ProtoMajor of the last request
	// gate, when set, holds the first request until release closes it;
	// entered is closed when that request arrives. With holdBody, the
	// request is answered and its body's reads are held instead.
	gate, entered chan struct{}
	holdBody      bool
	once          sync.Once
	release       func()
}

// gatedBody is a request body whose reads wait for the gate.
type gatedBody struct {
	io.ReadCloser
	gate <-chan struct{}
	done <-chan struct{}
}

func (b gatedBody) Read(p []byte) (int, error) {
	select {
	case <-b.gate:
	case <-b.done:
		return 0, errors.New("request ended")
	}
	return b.ReadCloser.Read(p)
}

type peerServerMode int

const (
	peerPlainHTTP1 peerServerMode = iota
	peerPlainH2C
	peerMutualTLS
)

func newPeerTestReceiver(t *testing.T, mode peerServerMode, store snapshotReceiver, ca *peerTestCA) *peerTestReceiver {
	t.Helper()
	r := &peerTestReceiver{got: make(chan *raftpb.Message, 2*peerQueueMessages)}
	status := func(id uint64) peerState {
		switch id {
		case peerTestLeader:
			return peerKnown
		case 3:
			return peerRemoved
		}
		return peerUnknown
	}
	r.h = newPeerHandler(peerTestFollower, peerTestCluster, status, func(m *raftpb.Message) { r.got <- m }, store, nil)
	r.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		r.requests.Add(1)
		r.proto.Store(int64(req.ProtoMajor))
		if r.gate != nil {
			first := false
			r.once.Do(func() { first = true })
			switch {
			case first && r.holdBody:
				close(r.entered)
				req.Body = gatedBody{ReadCloser: req.Body, gate: r.gate, done: req.Context().Done()}
			case first:
				close(r.entered)
				select {
				case <-r.gate:
				case <-req.Context().Done():
				}
			}
		}
		r.h.ServeHTTP(w, req)
	}))
	switch mode {
	case peerPlainHTTP1:
		r.srv.Start()
	case peerPlainH2C:
		r.srv.Config.Protocols = new(http.Protocols)
		r.srv.Config.Protocols.SetHTTP1(true)
		r.srv.Config.Protocols.SetUnencryptedHTTP2(true)
		r.srv.Start()
	case peerMutualTLS:
		r.srv.EnableHTTP2 = true
		r.srv.TLS = &tls.Config{
			Certificates: []tls.Certificate{ca.issue(t, "member2", x509.ExtKeyUsageServerAuth)},
			ClientAuth:   tls.RequireAndVerifyClientCert,
			ClientCAs:    ca.pool,
		}
		r.srv.StartTLS()
	}
	t.Cleanup(r.srv.Close)
	return r
}

// next returns the next message delivered, or fails the test when none
// comes within 10 s; what names it in the failure.
func (r *peerTestReceiver) next(t *testing.T, what string) *raftpb.Message {
	t.Helper()
	select {
	case m := <-r.got:
		return m
	case <-time.After(10 * time.Second):
		t.Fatalf("%s never arrived", what)
		return nil
	}
}

// hold makes the receiver hold its first request until release; a test
// that ends before it releases the request (a failure) does at its end,
// or closing the server would wait for that request for ever (net/http
// notices a client that went away only once the body was read).
func (r *peerTestReceiver) hold(t *testing.T) {
	r.gate, r.entered = make(chan struct{}), make(chan struct{})
	r.release = sync.OnceFunc(func() { close(r.gate) })
	t.Cleanup(r.release)
}

func newPeerTestTransport(t *testing.T, cfg transportConfig, fb *peerFeedback) *peerTransport {
	t.Helper()
	if cfg.ID == 0 {
		cfg.ID = peerTestLeader
	}
	if cfg.ClusterID == 0 {
		cfg.ClusterID = peerTestCluster
	}
	cfg.ReportUnreachable, cfg.ReportSnapshot = fb.reportUnreachable, fb.reportSnapshot
	if cfg.Snapshot == nil {
		cfg.Snapshot = func(io.Writer) (int64, error) { return 0, fmt.Errorf("no snapshot here") }
	}
	tr := newPeerTransport(cfg)
	t.Cleanup(tr.Stop)
	return tr
}

func peerApp(index uint64) *raftpb.Message {
	return &raftpb.Message{Type: raftpb.MsgApp.Enum(), From: new(uint64(peerTestLeader)), To: new(uint64(peerTestFollower)),
		Term: new(uint64(1)), Index: new(index),
		Entries: []*raftpb.Entry{{Index: new(index + 1), Term: new(uint64(1)), Data: []byte(fmt.Sprint("entry ", index+1))}}}
}

func TestPeerBatchesArriveInOrder(t *testing.T) {
	ca := newPeerTestCA(t)
	for name, mode := range map[string]peerServerMode{"http/1.1": peerPlainHTTP1, "h2c": peerPlainH2C, "mutual TLS h2": peerMutualTLS} {
		t.Run(name, func(t *testing.T) {
			peerNoLeaks(t)
			r := newPeerTestReceiver(t, mode, nil, ca)
			r.hold(t)
			fb := &peerFeedback{}
			cfg := transportConfig{H2C: mode == peerPlainH2C}
			if mode == peerMutualTLS {
				cfg.TLS = &tls.Config{RootCAs: ca.pool,
					Certificates: []tls.Certificate{ca.issue(t, "member1", x509.ExtKeyUsageClientAuth)}}
			}
			tr := newPeerTestTransport(t, cfg, fb)
			if err := tr.AddPeer(peerTestFollower, []string{r.srv.URL}); err != nil {
				t.Fatal(err)
			}
			const total = 1000
			tr.Send([]*raftpb.Message{peerApp(0)})
			<-r.entered
			// Everything sent while the peer does not read yet goes on the
			// same stream, in order.
			for i := uint64(1); i < total; i += 100 {
				var msgs []*raftpb.Message
				for j := i; j < min(i+100, total); j++ {
					msgs = append(msgs, peerApp(j))
				}
				tr.Send(msgs)
			}
			r.release()
			for i := range uint64(total) {
				m := r.next(t, fmt.Sprint("message ", i))
				if m.GetIndex() != i || m.GetType() != raftpb.MsgApp || string(m.GetEntries()[0].GetData()) != fmt.Sprint("entry ", i+1) {
					t.Fatalf("message %d: %v", i, m)
				}
			}
			if n := r.requests.Load(); n != 1 {
				t.Errorf("%d messages took %d requests, want one stream", total, n)
			}
			want := int64(1)
			if mode != peerPlainHTTP1 {
				want = 2
			}
			if got := r.proto.Load(); got != want {
				t.Errorf("HTTP/%d, want HTTP/%d", got, want)
			}
			if n, _ := fb.counts(); n != 0 {
				t.Errorf("%d unreachable reports", n)
			}
		})
	}
}

// peerHeartbeat is the leader's heartbeat with commit index commit.
func peerHeartbeat(commit uint64) *raftpb.Message {
	return &raftpb.Message{Type: raftpb.MsgHeartbeat.Enum(), From: new(uint64(peerTestLeader)), To: new(uint64(peerTestFollower)),
		Term: new(uint64(1)), Commit: new(commit)}
}

// peerBigApp is a MsgApp of about size bytes.
func peerBigApp(index uint64, size int) *raftpb.Message {
	m := peerApp(index)
	m.Entries[0].Data = bytes.Repeat([]byte{'x'}, size)
	return m
}

// stalledPeer is a transport sending to a peer that has taken one message's
// stream and reads nothing until r.gate is closed.
func stalledPeer(t *testing.T) (*peerTestReceiver, *peerFeedback, *peerTransport) {
	t.Helper()
	r := newPeerTestReceiver(t, peerPlainHTTP1, nil, nil)
	r.hold(t)
	fb := &peerFeedback{}
	tr := newPeerTestTransport(t, transportConfig{}, fb)
	if err := tr.AddPeer(peerTestFollower, []string{r.srv.URL}); err != nil {
		t.Fatal(err)
	}
	tr.Send([]*raftpb.Message{peerApp(0)})
	<-r.entered
	return r, fb, tr
}

func TestPeerSendNeverBlocksOnAStalledPeer(t *testing.T) {
	peerNoLeaks(t)
	// The peer takes the stream and reads nothing until released, which
	// comes after Send: encoding 128 MiB under the race detector may take
	// longer than a stream may stall or wait for its answer (5 s) on a
	// loaded machine, so the stream is answered and may stall for longer.
	r := newPeerTestReceiver(t, peerPlainHTTP1, nil, nil)
	r.hold(t)
	r.holdBody = true
	fb := &peerFeedback{}
	tr := newPeerTestTransport(t, transportConfig{StreamStall: 10 * time.Minute}, fb)
	if err := tr.AddPeer(peerTestFollower, []string{r.srv.URL}); err != nil {
		t.Fatal(err)
	}
	tr.Send([]*raftpb.Message{peerApp(0)})
	<-r.entered
	// The peer reads nothing: its connection fills, then the queue
	// (peerQueueBytes), and the rest is dropped and reported at once,
	// without Send waiting.
	const n, size = 64, 2 << 20 // twice the queue: more than any connection buffers
	var msgs []*raftpb.Message
	for i := range uint64(n) {
		msgs = append(msgs, peerBigApp(i+1, size))
	}
	tr.Send(msgs)
	dropped, _ := fb.counts()
	if dropped == 0 || dropped > n-peerQueueBytes/size {
		t.Fatalf("%d unreachable reports for %d messages of %d bytes", dropped, n, size)
	}
	r.release()
	// Up to 64 MiB through HTTP and the race detector's instrumented
	// decoding, on a shared machine: 10 s was not always enough.
	waitForWithin(t, time.Minute, "the queue to drain", func() bool { return len(r.got) == 1+n-dropped })
	if u, _ := fb.counts(); u != dropped {
		t.Fatalf("%d more unreachable reports once the peer read", u-dropped)
	}
}

// TestPeerMessagesPassStalledAppends: the peer takes nothing of the
// stream its appends go on; heartbeats go on a stream of their own and
// arrive all the same, and the appends once the peer reads them.
func TestPeerMessagesPassStalledAppends(t *testing.T) {
	peerNoLeaks(t)
	r, fb, tr := stalledPeer(t)
	tr.Send([]*raftpb.Message{peerBigApp(1, 2<<20), peerHeartbeat(0)})
	if m := r.next(t, "the heartbeat"); m.GetType() != raftpb.MsgHeartbeat {
		t.Fatalf("got %v %d, want the heartbeat", m.GetType(), m.GetIndex())
	}
	r.release()
	for i := range uint64(2) {
		if m := r.next(t, "an append"); m.GetType() != raftpb.MsgApp || m.GetIndex() != i {
			t.Fatalf("got %v %d, want MsgApp %d", m.GetType(), m.GetIndex(), i)
		}
	}
	if n, _ := fb.counts(); n != 0 {
		t.Fatalf("%d unreachable reports", n)
	}
}

// TestPeerQueuedProbeIsNotQueuedAgain: a MsgApp carrying the entries of
// one still waiting in the appends' queue (a probe sent again after a
// heartbeat answer) is not queued again; once the first went out, a copy
// is, and other appends always are.
func TestPeerQueuedProbeIsNotQueuedAgain(t *testing.T) {
	peerNoLeaks(t)
	r, fb, tr := stalledPeer(t)
	// More than the connection holds: what follows waits in the queue.
	const big = 24
	for i := range uint64(big) {
		tr.Send([]*raftpb.Message{peerBigApp(i+1, 2<<20)})
	}
	probe := peerApp(100)
	tr.Send([]*raftpb.Message{probe})
	tr.Send([]*raftpb.Message{probe})
	tr.mu.RLock()
	l := tr.peers[peerTestFollower].lanes[laneAppends]
	tr.mu.RUnlock()
	l.mu.Lock()
	waiting := l.enqueued - l.taken.Load()
	l.mu.Unlock()
	if waiting == 0 {
		t.Fatal("the connection took 48 MiB the peer does not read: nothing waits in the queue")
	}
	tr.Send([]*raftpb.Message{peerApp(101)})
	r.release()
	var got []uint64
	for len(got) == 0 || got[len(got)-1] != 101 {
		got = append(got, r.next(t, "the appends").GetIndex())
	}
	want := []uint64{0}
	for i := range uint64(big) {
		want = append(want, i+1)
	}
	want = append(want, 100, 101)
	if !slices.Equal(got, want) {
		t.Fatalf("got appends %v, want %v", got, want)
	}
	// The last one went out: a copy of it is sent.
	tr.Send([]*raftpb.Message{peerApp(101)})
	if m := r.next(t, "the append sent again"); m.GetIndex() != 101 {
		t.Fatalf("got append %d, want 101", m.GetIndex())
	}
	if n, _ := fb.counts(); n != 0 {
		t.Fatalf("%d unreachable reports", n)
	}
}

// TestPeerSlowLinkIsNotAStall: a batch that takes longer than StreamStall
// to go through a link that goes on taking pieces of it is not cut; one
// that takes nothing for StreamStall is. (In-process: the kernel's socket
// buffers would decide when the writer sees progress.)
func TestPeerSlowLinkIsNotAStall(t *testing.T) {
	for _, slow := range []bool{true, false} {
		pr, pw := io.Pipe()
		s := &peerStream{pw: pw, stallD: time.Second, done: make(chan struct{})}
		s.armStall(func(error) {})
		var read atomic.Int64
		stop, stopped := make(chan struct{}), make(chan struct{})
		go func() {
			defer close(stopped)
			// 64 KiB every 25 ms (the sleep is the link's bandwidth): a
			// streamPiece every 100 ms; none at all once stalled.
			p := make([]byte, 64<<10)
			for {
				select {
				case <-stop:
					return
				case <-time.After(25 * time.Millisecond):
				}
				if !slow && read.Load() >= 1<<20 {
					continue
				}
				n, err := pr.Read(p)
				read.Add(int64(n))
				if err != nil {
					return
				}
			}
		}()
		start := time.Now()
		err := s.write(make([]byte, 4<<20))
		took := time.Since(start)
		close(stop)
		pr.CloseWithError(io.EOF)
		<-stopped
		switch {
		case slow && err != nil:
			t.Fatalf("a link taking 64 KiB each 25 ms: %v after %v, %d bytes read", err, took, read.Load())
		case slow && took < 1500*time.Millisecond:
			t.Fatalf("4 MiB took %v: the link was not slower than StreamStall", took)
		case !slow && !errors.Is(err, errStreamStalled):
			t.Fatalf("a link that stopped after 1 MiB: %v after %v", err, took)
		}
	}
}

// TestPeerStalledStreamIsCut: a peer that takes nothing for
// peerRequestTimeout has its stream cut and is reported unreachable; the
// next messages go on a new stream.
func TestPeerStalledStreamIsCut(t *testing.T) {
	peerNoLeaks(t)
	r, fb, tr := stalledPeer(t)
	for i := range uint64(24) {
		tr.Send([]*raftpb.Message{peerBigApp(i+1, 2<<20)})
	}
	waitFor(t, "the stalled stream reported", func() bool { n, _ := fb.counts(); return n > 0 })
	r.release()
	tr.Send([]*raftpb.Message{peerApp(100)})
	waitFor(t, "a message on a new stream", func() bool {
		for len(r.got) > 0 {
			if m := <-r.got; m.GetIndex() == 100 {
				return true
			}
		}
		return false
	})
	if n := r.requests.Load(); n < 2 {
		t.Fatalf("%d requests, want a second stream", n)
	}
}

// TestPeerUnansweredStreamIsCut: something other than the peer endpoint
// answers the stream (a route of the peer's site, a member that does not
// stream) without reading its body, while probes get through: net/http
// reads the body before that answer goes out, swallowing the messages. The
// stream is cut when no answer comes within peerRequestTimeout, and the peer
// reported unreachable.
func TestPeerUnansweredStreamIsCut(t *testing.T) {
	peerNoLeaks(t)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == peerStreamPath {
			http.NotFound(w, r)
			return
		}
		_, _ = io.Copy(io.Discard, r.Body)
		w.WriteHeader(http.StatusNoContent)
	}))
	t.Cleanup(srv.Close)
	fb := &peerFeedback{}
	tr := newPeerTestTransport(t, transportConfig{ProbeIdle: 100 * time.Millisecond}, fb)
	if err := tr.AddPeer(peerTestFollower, []string{srv.URL}); err != nil {
		t.Fatal(err)
	}
	tr.Send([]*raftpb.Message{peerApp(0)})
	waitFor(t, "an unreachable report", func() bool { n, _ := fb.counts(); return n > 0 })
}

func TestPeerDeadPeerIsReportedUnreachable(t *testing.T) {
	peerNoLeaks(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := "http://" + l.Addr().String()
	l.Close()
	fb := &peerFeedback{}
	tr := newPeerTestTransport(t, transportConfig{}, fb)
	if err := tr.AddPeer(peerTestFollower, []string{dead}); err != nil {
		t.Fatal(err)
	}
	tr.Send([]*raftpb.Message{peerApp(0)})
	waitFor(t, "an unreachable report", func() bool { n, _ := fb.counts(); return n > 0 })
	snap := &raftpb.Message{Type: raftpb.MsgSnap.Enum(), From: new(uint64(peerTestLeader)), To: new(uint64(peerTestFollower)),
		Snapshot: &raftpb.Snapshot{Metadata: &raftpb.SnapshotMetadata{Index: new(uint64(5)), Term: new(uint64(1))}}}
	tr.Send([]*raftpb.Message{snap})
	waitFor(t, "a snapshot failure", func() bool {
		_, s := fb.counts()
		return len(s) == 1 && s[0] == raft.SnapshotFailure
	})
	// Removed, the peer is neither sent to nor listened to.
	tr.RemovePeer(peerTestFollower, nil)
	waitFor(t, "the removed peer's sender to end", func() bool {
		tr.mu.RLock()
		defer tr.mu.RUnlock()
		return len(tr.retired) == 1 && tr.retired[0].ctx.Err() != nil
	})
	tr.Send([]*raftpb.Message{peerApp(1)})
	if st := tr.peerStatus(peerTestFollower); st != peerRemoved {
		t.Fatalf("status %v", st)
	}
	if err := tr.AddPeer(peerTestFollower, []string{dead}); err == nil {
		t.Fatal("a removed member was added back")
	}
}

func peerFrames(msgs ...*raftpb.Message) []byte {
	var b []byte
	for _, m := range msgs {
		data, err := proto.Marshal(m)
		if err != nil {
			panic(err)
		}
		b = appendPeerFrame(b, data)
	}
	return b
}

func TestPeerHandlerRefuses(t *testing.T) {
	peerNoLeaks(t)
	r := newPeerTestReceiver(t, peerPlainHTTP1, nil, nil)
	good := peerFrames(peerApp(1))
	hup := peerApp(1)
	hup.Type = raftpb.MsgHup.Enum()
	forged := peerApp(1)
	forged.From = new(uint64(7))
	snap := peerApp(1)
	snap.Type = raftpb.MsgSnap.Enum()
	headers := func(cluster, from, to string) http.Header {
		return http.Header{headerPeerClusterID: {cluster}, headerPeerFrom: {from}, headerPeerTo: {to}}
	}
	ok := headers("c1", "1", "2")
	cases := []struct {
		name   string
		method string
		path   string
		h      http.Header
		body   []byte
		status int
		msg    string
	}{
		{"accepted", "POST", "/raft", ok, good, 204, ""},
		{"wrong method", "GET", "/raft", ok, nil, 405, "method not allowed"},
		{"wrong path", "POST", "/raft/other", ok, good, 404, ""},
		{"other cluster", "POST", "/raft", headers("c2", "1", "2"), good, 412, "cluster ID mismatch: this member belongs to cluster c1"},
		{"no cluster", "POST", "/raft", headers("", "1", "2"), good, 412, "cluster ID mismatch"},
		{"not for this member", "POST", "/raft", headers("c1", "1", "9"), good, 412, "to field mismatch"},
		{"unknown sender", "POST", "/raft", headers("c1", "7", "2"), good, 403, "member 7 is not a member of this cluster"},
		{"removed sender", "POST", "/raft", headers("c1", "3", "2"), good, 410, "member 3 was removed from the cluster"},
		{"bad sender", "POST", "/raft", headers("c1", "zz", "2"), good, 400, "malformed"},
		{"garbage", "POST", "/raft", ok, []byte("\x00\x00\x00\x05hello"), 400, "bad message batch"},
		{"truncated length", "POST", "/raft", ok, append(good, 0, 0), 400, "truncated frame length"},
		{"truncated frame", "POST", "/raft", ok, good[:len(good)-3], 400, "truncated frame"},
		{"huge frame", "POST", "/raft", ok, []byte{0xff, 0xff, 0xff, 0xff}, 400, "exceeds the limit"},
		{"large frame cut short", "POST", "/raft", ok, append([]byte{0x03, 0x00, 0x00, 0x00}, good...), 400, "truncated frame"},
		{"forged sender", "POST", "/raft", ok, peerFrames(peerApp(1), forged), 400, "message from 7 in a request from 1"},
		{"local message", "POST", "/raft", ok, peerFrames(hup), 400, "local message MsgHup"},
		{"snapshot in a batch", "POST", "/raft", ok, peerFrames(snap), 400, "snapshots go to /raft/snapshot"},
		{"snapshot without metadata", "POST", "/raft/snapshot", ok, peerFrames(peerApp(1)), 400, "not a snapshot message"},
		{"snapshot garbage", "POST", "/raft/snapshot", ok, []byte("garbage"), 400, "bad snapshot"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			req, err := http.NewRequest(c.method, r.srv.URL+c.path, bytes.NewReader(c.body))
			if err != nil {
				t.Fatal(err)
			}
			req.Header = c.h
			resp, err := r.srv.Client().Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != c.status || !strings.Contains(string(body), c.msg) {
				t.Fatalf("%d %q, want %d %q", resp.StatusCode, body, c.status, c.msg)
			}
			want := 0
			if c.status == 204 {
				want = 1
			}
			if len(r.got) != want {
				t.Fatalf("%d messages delivered", len(r.got))
			}
			for len(r.got) > 0 {
				<-r.got
			}
		})
	}

	// A removed member's last word: of its batch, only the MsgTimeoutNow
	// (a removed leader handing leadership over) is delivered; it hears
	// 410 all the same.
	timeoutNow := &raftpb.Message{Type: raftpb.MsgTimeoutNow.Enum(), From: new(uint64(3)), To: new(uint64(peerTestFollower)), Term: new(uint64(1))}
	app := peerApp(1)
	app.From = new(uint64(3))
	req, err := http.NewRequest("POST", r.srv.URL+"/raft", bytes.NewReader(peerFrames(app, timeoutNow)))
	if err != nil {
		t.Fatal(err)
	}
	req.Header = headers("c1", "3", "2")
	resp, err := r.srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusGone || len(r.got) != 1 {
		t.Fatalf("removed member's batch: %d, %d messages delivered", resp.StatusCode, len(r.got))
	}
	if m := <-r.got; m.GetType() != raftpb.MsgTimeoutNow {
		t.Fatalf("removed member's batch delivered %v", m.GetType())
	}
	r.srv.Client().CloseIdleConnections()

	// Streams: 200, then every frame up to a bad one, which ends it; a
	// removed member's stream is refused; refusals come before the body.
	stream := func(h http.Header, body []byte) (int, string) {
		t.Helper()
		// A new connection each: a stream ended early leaves its
		// connection to be closed.
		r.srv.Client().CloseIdleConnections()
		req, err := http.NewRequest("POST", r.srv.URL+"/raft/stream", bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header = h
		resp, err := r.srv.Client().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp.StatusCode, string(b)
	}
	if code, _ := stream(ok, peerFrames(peerApp(1), peerApp(2), forged, peerApp(3))); code != 200 || len(r.got) != 2 {
		t.Fatalf("stream with a forged message: %d, %d messages delivered, want 200 and the two before it", code, len(r.got))
	}
	for len(r.got) > 0 {
		<-r.got
	}
	// (Refused streams send no body here: a refusal cuts the connection,
	// and a body still in flight would make the kernel answer it with a
	// reset that can overtake the refusal.)
	if code, msg := stream(headers("c1", "3", "2"), nil); code != 410 || !strings.Contains(msg, "was removed") || len(r.got) != 0 {
		t.Fatalf("removed member's stream: %d %q, %d messages delivered", code, msg, len(r.got))
	}
	if code, msg := stream(headers("c2", "1", "2"), nil); code != 412 || len(r.got) != 0 {
		t.Fatalf("stream from another cluster: %d %q, %d messages delivered", code, msg, len(r.got))
	}
	r.srv.Client().CloseIdleConnections()

	// Through the transport: a member of another cluster is refused and
	// reported unreachable.
	fb := &peerFeedback{}
	tr := newPeerTestTransport(t, transportConfig{ClusterID: 0xc2}, fb)
	if err := tr.AddPeer(peerTestFollower, []string{r.srv.URL}); err != nil {
		t.Fatal(err)
	}
	tr.Send([]*raftpb.Message{peerApp(0)})
	waitFor(t, "an unreachable report", func() bool { n, _ := fb.counts(); return n > 0 })
	if len(r.got) != 0 {
		t.Fatal("a message from another cluster was delivered")
	}
}

// TestPeerFrameMemoryFollowsItsBytes: a frame whose length claims 48 MiB
// but whose request ends after a few bytes costs at most peerFrameAlloc,
// not 48 MiB; a large frame that arrives whole is read as sent, into a
// buffer of its own size.
func TestPeerFrameMemoryFollowsItsBytes(t *testing.T) {
	claim := []byte{0x03, 0x00, 0x00, 0x00} // 48 MiB
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	_, err := readPeerFrame(bytes.NewReader(append(claim, "short"...)), peerMaxFrame)
	runtime.ReadMemStats(&after)
	if err == nil || !strings.Contains(err.Error(), "truncated frame") {
		t.Fatalf("a frame cut short: %v", err)
	}
	if got := after.TotalAlloc - before.TotalAlloc; got > peerFrameAlloc+1<<20 {
		t.Errorf("a frame cut short allocated %d bytes", got)
	}

	for _, size := range []int{0, 1000, peerFrameAlloc, peerFrameAlloc + 1000, 2*peerFrameAlloc + 3, 8 << 20} {
		big := bytes.Repeat([]byte{'x'}, size)
		if size > 0 {
			big[size-1] = 'y'
		}
		frame, err := readPeerFrame(bytes.NewReader(appendPeerFrame(nil, big)), peerMaxFrame)
		if err != nil || !bytes.Equal(frame, big) || cap(frame) != len(frame) {
			t.Fatalf("a frame of %d bytes: %d bytes read in a buffer of %d, %v", size, len(frame), cap(frame), err)
		}
	}
}

// openPeerTestStore opens a real store holding keys set by committed entries.
func openPeerTestStore(t *testing.T, keys ...string) *storage.Store {
	t.Helper()
	st, err := storage.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	if len(keys) == 0 {
		return st
	}
	var ents []*raftpb.Entry
	for i, k := range keys {
		r := storage.Request{Method: storage.MethodPut, Path: k, Val: "value of " + k}
		ents = append(ents, &raftpb.Entry{Index: new(uint64(i + 1)), Term: new(uint64(1)),
			Type: raftpb.EntryNormal.Enum(), Data: r.Marshal()})
	}
	if _, err := st.Save(storage.Ready{Entries: ents, Committed: ents,
		HardState: &raftpb.HardState{Term: new(uint64(1)), Commit: new(uint64(len(ents)))}}); err != nil {
		t.Fatal(err)
	}
	return st
}

func TestPeerSnapshotStreamsIntoTheFollowersStore(t *testing.T) {
	peerNoLeaks(t)
	var keys []string
	for i := range 2000 {
		keys = append(keys, fmt.Sprintf("/dir%d/key%d", i%10, i))
	}
	leader, follower := openPeerTestStore(t, keys...), openPeerTestStore(t, "/stale")
	r := newPeerTestReceiver(t, peerPlainHTTP1, follower, nil)
	fb := &peerFeedback{}
	tr := newPeerTestTransport(t, transportConfig{Snapshot: leader.WriteSnapshot}, fb)
	if err := tr.AddPeer(peerTestFollower, []string{r.srv.URL}); err != nil {
		t.Fatal(err)
	}
	meta := &raftpb.SnapshotMetadata{Index: new(uint64(1500)), Term: new(uint64(1)),
		ConfState: &raftpb.ConfState{Voters: []uint64{peerTestLeader, peerTestFollower}}}
	tr.Send([]*raftpb.Message{{Type: raftpb.MsgSnap.Enum(), From: new(uint64(peerTestLeader)), To: new(uint64(peerTestFollower)),
		Term: new(uint64(1)), Snapshot: &raftpb.Snapshot{Metadata: meta, Data: []byte("a path on the leader")}}})
	var m *raftpb.Message
	select {
	case m = <-r.got:
	case <-time.After(10 * time.Second):
		t.Fatal("no snapshot delivered")
	}
	waitFor(t, "the snapshot report", func() bool {
		_, s := fb.counts()
		return len(s) == 1 && s[0] == raft.SnapshotFinish
	})
	if m.GetType() != raftpb.MsgSnap || !proto.Equal(m.GetSnapshot().GetMetadata(), meta) || !strings.Contains(string(m.GetSnapshot().GetData()), "/snap.tmp-1500-") {
		t.Fatalf("delivered %v", m)
	}
	// What Raft would hand back in the next Ready.
	if _, err := follower.Save(storage.Ready{Snapshot: m.GetSnapshot(),
		HardState: &raftpb.HardState{Term: new(uint64(1)), Commit: new(uint64(1500))}}); err != nil {
		t.Fatal(err)
	}
	ev, err := follower.Get("/dir7/key1997", false, false, time.Now())
	if err != nil || *ev.Node.Value != "value of /dir7/key1997" || follower.Index() != 2000 || follower.AppliedIndex() != 2000 {
		t.Fatalf("after install: %+v %v, index %d", ev, err, follower.Index())
	}
	if _, err := follower.Get("/stale", false, false, time.Now()); err == nil {
		t.Fatal("the follower's old keys survived the snapshot")
	}
}

// A peer that stops taking a snapshot without closing the connection must
// not keep Raft waiting for the report for ever: the transfer is abandoned
// once it has made no progress for SnapshotStall.
func TestPeerStalledSnapshotIsReportedFailed(t *testing.T) {
	peerNoLeaks(t)
	r := newPeerTestReceiver(t, peerPlainHTTP1, openPeerTestStore(t), nil)
	r.hold(t) // the receiver reads nothing
	fb := &peerFeedback{}
	// More than the connection's buffers hold, written for as long as
	// they take it.
	zeros := make([]byte, 1<<20)
	snapshot := func(w io.Writer) (int64, error) {
		var n int64
		for range 256 {
			k, err := w.Write(zeros)
			n += int64(k)
			if err != nil {
				return n, err
			}
		}
		return n, nil
	}
	const stall = 300 * time.Millisecond
	tr := newPeerTestTransport(t, transportConfig{Snapshot: snapshot, SnapshotStall: stall}, fb)
	if err := tr.AddPeer(peerTestFollower, []string{r.srv.URL}); err != nil {
		t.Fatal(err)
	}
	meta := &raftpb.SnapshotMetadata{Index: new(uint64(10)), Term: new(uint64(1)),
		ConfState: &raftpb.ConfState{Voters: []uint64{peerTestLeader, peerTestFollower}}}
	start := time.Now()
	tr.Send([]*raftpb.Message{{Type: raftpb.MsgSnap.Enum(), From: new(uint64(peerTestLeader)), To: new(uint64(peerTestFollower)),
		Term: new(uint64(1)), Snapshot: &raftpb.Snapshot{Metadata: meta}}})
	<-r.entered
	waitFor(t, "the snapshot failure report", func() bool {
		_, s := fb.counts()
		return len(s) == 1 && s[0] == raft.SnapshotFailure
	})
	if d := time.Since(start); d < stall {
		t.Fatalf("reported after %v, before the connection stalled for %v", d, stall)
	}
	r.release()
}

func TestPeerSnapshotRefusesDamagedStreams(t *testing.T) {
	peerNoLeaks(t)
	leader, follower := openPeerTestStore(t, "/a"), openPeerTestStore(t)
	r := newPeerTestReceiver(t, peerPlainHTTP1, follower, nil)
	var db bytes.Buffer
	if _, err := leader.WriteSnapshot(&db); err != nil {
		t.Fatal(err)
	}
	meta := peerFrames(&raftpb.Message{Type: raftpb.MsgSnap.Enum(), From: new(uint64(peerTestLeader)), To: new(uint64(peerTestFollower)),
		Snapshot: &raftpb.Snapshot{Metadata: &raftpb.SnapshotMetadata{Index: new(uint64(1)), Term: new(uint64(1))}}})
	damaged := bytes.Clone(db.Bytes())
	damaged[len(damaged)-100] ^= 0xff
	for _, c := range []struct {
		name string
		body []byte
		hash string
	}{
		{"no checksum", db.Bytes(), ""},
		{"damaged on the way", damaged, peerSHA256(db.Bytes())},
		{"not a database", []byte(strings.Repeat("x", 10000)), peerSHA256([]byte(strings.Repeat("x", 10000)))},
	} {
		t.Run(c.name, func(t *testing.T) {
			req, err := http.NewRequest("POST", r.srv.URL+peerSnapshotPath, io.MultiReader(bytes.NewReader(meta), bytes.NewReader(c.body)))
			if err != nil {
				t.Fatal(err)
			}
			req.Header = http.Header{headerPeerClusterID: {"c1"}, headerPeerFrom: {"1"}, headerPeerTo: {"2"}}
			req.Trailer = http.Header{trailerSnapshotHash: {c.hash}}
			resp, err := r.srv.Client().Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 400 || !strings.Contains(string(body), "bad snapshot") {
				t.Fatalf("%d %s", resp.StatusCode, body)
			}
			if len(r.got) != 0 {
				t.Fatal("a damaged snapshot was delivered")
			}
		})
	}
	r.srv.Client().CloseIdleConnections()
}

func peerSHA256(b []byte) string {
	sum := sha256.Sum256(b)
	return fmt.Sprintf("%x", sum)
}

// peerTestCA issues the certificates of a test cluster's mutual TLS.
type peerTestCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
}

func newPeerTestCA(t *testing.T) *peerTestCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "etcaddy test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &peerTestCA{cert: cert, key: key, pool: pool}
}

func (ca *peerTestCA) issue(t *testing.T, name string, usage x509.ExtKeyUsage) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{usage},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// TestPeerRemovedGetsItsLastMessage removes a peer with a last message (a
// leader's farewell heartbeat): the message is delivered after the peer
// was removed, and the peer's sender ends.
func TestPeerRemovedGetsItsLastMessage(t *testing.T) {
	peerNoLeaks(t)
	r := newPeerTestReceiver(t, peerPlainHTTP1, nil, nil)
	tr := newPeerTestTransport(t, transportConfig{}, &peerFeedback{})
	if err := tr.AddPeer(peerTestFollower, []string{r.srv.URL}); err != nil {
		t.Fatal(err)
	}
	last := peerHeartbeat(7)
	tr.Send([]*raftpb.Message{peerApp(1)})
	tr.RemovePeer(peerTestFollower, last)
	if st := tr.peerStatus(peerTestFollower); st != peerRemoved {
		t.Fatalf("status %v", st)
	}
	// The two go on different lanes: either may come first.
	got := []raftpb.MessageType{r.next(t, "a message").GetType(), r.next(t, "a message").GetType()}
	slices.Sort(got)
	if want := []raftpb.MessageType{raftpb.MsgApp, raftpb.MsgHeartbeat}; !slices.Equal(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	waitFor(t, "the removed peer's senders to end", func() bool {
		tr.mu.RLock()
		defer tr.mu.RUnlock()
		return len(tr.retired) == 1 && tr.retired[0].ctx.Err() != nil
	})
	// Ended by its lanes once both had sent all, not by RemovePeer's
	// timer (peerRequestTimeout).
	if p := tr.retired[0]; p.lanesDone.Load() != int32(len(p.lanes)) {
		t.Fatalf("%d of %d lanes sent all before the peer's end", p.lanesDone.Load(), len(p.lanes))
	}
}

// TestPeerUpdateKeepsTheURLItAnswersOn changes a peer's URLs while it
// answers on its old one. As etcd's members keep their connections across a
// member update, messages go on to the old URL until it fails (the member
// restarted on its new one), then to the new URL.
func TestPeerUpdateKeepsTheURLItAnswersOn(t *testing.T) {
	peerNoLeaks(t)
	old := newPeerTestReceiver(t, peerPlainHTTP1, nil, nil)
	moved := newPeerTestReceiver(t, peerPlainHTTP1, nil, nil)
	fb := &peerFeedback{}
	tr := newPeerTestTransport(t, transportConfig{}, fb)
	if err := tr.AddPeer(peerTestFollower, []string{old.srv.URL}); err != nil {
		t.Fatal(err)
	}
	receive := func(r *peerTestReceiver, index uint64) {
		t.Helper()
		if m := r.next(t, fmt.Sprint("message ", index)); m.GetIndex() != index {
			t.Fatalf("message %d, want %d", m.GetIndex(), index)
		}
	}
	tr.Send([]*raftpb.Message{peerApp(0)})
	receive(old, 0)
	waitFor(t, "the peer answering", func() bool { return !tr.activeSince(peerTestFollower).IsZero() })

	if err := tr.UpdatePeer(peerTestFollower, []string{moved.srv.URL}); err != nil {
		t.Fatal(err)
	}
	tr.Send([]*raftpb.Message{peerApp(1)})
	receive(old, 1)
	if n := moved.requests.Load(); n != 0 {
		t.Fatalf("the new URL got %d requests while the old one answers", n)
	}

	// The member restarts on its new URL: the old one fails once, and the
	// peer moves on.
	// (httptest's Close waits for open requests: the stream is one.)
	old.srv.Listener.Close()
	old.srv.CloseClientConnections()
	old.srv.Close()
	index := uint64(2)
	waitFor(t, "a message at the new URL", func() bool {
		tr.Send([]*raftpb.Message{peerApp(index)})
		index++
		select {
		case <-moved.got:
			return true
		case <-time.After(50 * time.Millisecond):
			return false
		}
	})
}

// syncBuffer is a bytes.Buffer for a server's error log.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestPeerRefusalBeforeTheBodyClosesTheConnection: a refusal that answers
// before reading the body (a member not running; a stream from another
// cluster; any refusal on a site with full duplex on) closes an HTTP/1
// connection. Kept open, Go's server read on from
// it for the next request while the unread body's read was pending: it
// panicked and reset the connection (golang/go#68560), so that the peer's
// next request on it could fail.
func TestPeerRefusalBeforeTheBodyClosesTheConnection(t *testing.T) {
	stopped := NewNode(Config{DataDir: t.TempDir()}) // never started
	running := newPeerHandler(peerTestFollower, peerTestCluster, func(uint64) peerState { return peerKnown },
		func(*raftpb.Message) {}, nil, nil)
	// A site with Caddy's enable_full_duplex: every request full duplex.
	fullDuplex := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_ = http.NewResponseController(w).EnableFullDuplex()
		running.ServeHTTP(w, r)
	})
	for _, tc := range []struct {
		name    string
		h       http.Handler
		path    string
		cluster string
		status  int
	}{
		{"member not running", stopped.PeerHandler(), peerStreamPath, "c1", http.StatusServiceUnavailable},
		{"stream from another cluster", running, peerStreamPath, "c2", http.StatusPreconditionFailed},
		{"full duplex batch from another cluster", fullDuplex, peerRaftPath, "c2", http.StatusPreconditionFailed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var errs syncBuffer
			srv := httptest.NewUnstartedServer(tc.h)
			srv.Config.ErrorLog = log.New(&errs, "", 0)
			srv.Start()
			for i := range 5 {
				req, err := http.NewRequest(http.MethodPost, srv.URL+tc.path, bytes.NewReader(peerFrames(peerHeartbeat(1))))
				if err != nil {
					t.Fatal(err)
				}
				req.Header = http.Header{headerPeerClusterID: {tc.cluster}, headerPeerFrom: {"1"}, headerPeerTo: {"2"}}
				resp, err := srv.Client().Do(req)
				if err != nil {
					t.Fatalf("request %d: %v", i, err)
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != tc.status || !resp.Close {
					t.Fatalf("request %d: %d, Connection: close %v; want %d and the connection closed", i, resp.StatusCode, resp.Close, tc.status)
				}
			}
			srv.Close()
			if strings.Contains(errs.String(), "panic") {
				t.Fatalf("the server panicked:\n%s", errs.String())
			}
		})
	}
}

// pullTestMember is one member of a two-member cluster in this process: its
// transport, its peer handler (with the transport's pulls linked, as a Node
// has them) and its peer site, over h2c.
type pullTestMember struct {
	tr  *peerTransport
	h   *peerHandler
	srv *httptest.Server
	fb  *peerFeedback
	got chan *raftpb.Message
}

func newPullTestMember(t *testing.T, id uint64) *pullTestMember {
	t.Helper()
	return newPullTestMemberWith(t, transportConfig{ID: id, H2C: true, ProbeIdle: 50 * time.Millisecond}, nil)
}

// newPullTestMemberWith is newPullTestMember with its transport's config,
// and the store it receives snapshots into.
func newPullTestMemberWith(t *testing.T, cfg transportConfig, store snapshotReceiver) *pullTestMember {
	t.Helper()
	id := cfg.ID
	m := &pullTestMember{fb: &peerFeedback{}, got: make(chan *raftpb.Message, 1024)}
	// The site first: its Close, which waits for the requests it serves,
	// then runs after the transports' Stop has ended the pulls.
	var h atomic.Pointer[peerHandler]
	m.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.Load().ServeHTTP(w, r)
	}))
	m.srv.Config.Protocols = new(http.Protocols)
	m.srv.Config.Protocols.SetHTTP1(true)
	m.srv.Config.Protocols.SetUnencryptedHTTP2(true)
	m.srv.Start()
	t.Cleanup(m.srv.Close)
	m.tr = newPeerTestTransport(t, cfg, m.fb)
	m.h = newPeerHandler(id, peerTestCluster, m.tr.peerStatus, func(msg *raftpb.Message) { m.got <- msg }, store, nil)
	m.tr.setReceiver(m.h)
	h.Store(m.h)
	return m
}

// expect fails the test unless the next messages m gets are want, in order.
func (m *pullTestMember) expect(t *testing.T, want ...*raftpb.Message) {
	t.Helper()
	for _, w := range want {
		select {
		case got := <-m.got:
			if !proto.Equal(got, w) {
				t.Fatalf("got %v, want %v", got, w)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("%v never arrived", w)
		}
	}
}

// A member that cannot dial its peer reaches it all the same over the
// streams the peer opened to it (its pulls), as etcd's members read their
// messages on streams they dial themselves; once the peer's URL answers
// again, streams to it take over.
func TestPeerUnreachableURLIsReachedOverItsPulls(t *testing.T) {
	peerNoLeaks(t)
	m1 := newPullTestMember(t, peerTestLeader)
	m2 := newPullTestMember(t, peerTestFollower)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := "http://" + l.Addr().String()
	l.Close()
	// m1 knows a URL of m2's where nothing answers; m2 reaches m1.
	if err := m1.tr.AddPeer(peerTestFollower, []string{dead}); err != nil {
		t.Fatal(err)
	}
	if err := m2.tr.AddPeer(peerTestLeader, []string{m1.srv.URL}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "m1 to see m2 reachable (its pulls open)", func() bool { return !m1.tr.activeSince(peerTestFollower).IsZero() })
	m1.tr.mu.RLock()
	p := m1.tr.peers[peerTestFollower]
	m1.tr.mu.RUnlock()
	waitFor(t, "m1's probes of m2 to fail", func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		return p.failing
	})
	var want []*raftpb.Message
	for i := range uint64(100) {
		want = append(want, peerApp(i), peerHeartbeat(i))
	}
	m1.tr.Send(want)
	// Each lane keeps its order; the two lanes interleave as they come.
	var apps, beats []*raftpb.Message
	for range want {
		select {
		case got := <-m2.got:
			if got.GetType() == raftpb.MsgApp {
				apps = append(apps, got)
			} else {
				beats = append(beats, got)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("%d of %d messages arrived over m2's pulls", len(apps)+len(beats), len(want))
		}
	}
	for i := range apps {
		if !proto.Equal(apps[i], want[2*i]) || !proto.Equal(beats[i], want[2*i+1]) {
			t.Fatalf("message %d: got %v and %v, want %v and %v", i, apps[i], beats[i], want[2*i], want[2*i+1])
		}
	}
	// The other way, m2 dials m1.
	back := &raftpb.Message{Type: raftpb.MsgAppResp.Enum(), From: new(uint64(peerTestFollower)), To: new(uint64(peerTestLeader)),
		Term: new(uint64(1)), Index: new(uint64(100))}
	m2.tr.Send([]*raftpb.Message{back})
	m1.expect(t, back)

	// m2's URL fixed: a probe gets through, and m1 streams to it.
	if err := m1.tr.UpdatePeer(peerTestFollower, []string{m2.srv.URL}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "m1's probes of m2 to get through", func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		return !p.failing
	})
	m1.tr.Send([]*raftpb.Message{peerApp(100)})
	m2.expect(t, peerApp(100))
	if s := p.lanes[laneAppends].stream.Load(); s == nil || s.ended() {
		t.Fatal("m1 sent to m2's fixed URL without a stream of its own")
	}
}

// A pull is refused as a stream is: from another cluster, from an unknown
// or removed member, or for no lane.
func TestPeerPullRefusals(t *testing.T) {
	peerNoLeaks(t)
	m1 := newPullTestMember(t, peerTestLeader)
	if err := m1.tr.AddPeer(peerTestFollower, []string{"http://127.0.0.1:1"}); err != nil {
		t.Fatal(err)
	}
	m1.tr.RemovePeer(3, nil)
	get := func(lane string, cluster, from uint64) (int, string) {
		t.Helper()
		req, err := http.NewRequest(http.MethodGet, m1.srv.URL+peerStreamPath+"?lane="+lane, nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set(headerPeerClusterID, idString(cluster))
		req.Header.Set(headerPeerFrom, idString(from))
		req.Header.Set(headerPeerTo, idString(peerTestLeader))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	for _, c := range []struct {
		lane          string
		cluster, from uint64
		status        int
		says          string
	}{
		{"appends", 0xc2, peerTestFollower, http.StatusPreconditionFailed, "cluster ID mismatch"},
		{"appends", peerTestCluster, 7, http.StatusForbidden, "not a member of this cluster"},
		{"appends", peerTestCluster, 3, http.StatusGone, "was removed"},
		{"", peerTestCluster, peerTestFollower, http.StatusBadRequest, `lane must be one of ["messages" "appends"]`},
		{"all", peerTestCluster, peerTestFollower, http.StatusBadRequest, `lane must be one of`},
	} {
		if status, body := get(c.lane, c.cluster, c.from); status != c.status || !strings.Contains(body, c.says) {
			t.Errorf("lane %q, cluster %x, from %x: %d %q, want %d %q", c.lane, c.cluster, c.from, status, body, c.status, c.says)
		}
	}
	http.DefaultClient.CloseIdleConnections()
}

// A pull whose member stops reading it (its connection full) is cut as a
// stalled stream is: the messages written to it are reported lost, and the
// pull ends, so that the next pull starts afresh.
func TestPeerStalledPullIsCut(t *testing.T) {
	peerNoLeaks(t)
	m1 := newPullTestMemberWith(t, transportConfig{ID: peerTestLeader, ProbeIdle: 50 * time.Millisecond, StreamStall: 200 * time.Millisecond}, nil)
	if err := m1.tr.AddPeer(peerTestFollower, []string{"http://127.0.0.1:1"}); err != nil {
		t.Fatal(err)
	}
	m1.tr.mu.RLock()
	p := m1.tr.peers[peerTestFollower]
	m1.tr.mu.RUnlock()
	// Member 2's pull, by hand over HTTP/1: the answer's head is read, then
	// nothing.
	conn, err := net.Dial("tcp", strings.TrimPrefix(m1.srv.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprintf(conn, "GET %s?lane=appends HTTP/1.1\r\nHost: member1\r\n%s: %s\r\n%s: %s\r\n%s: %s\r\n\r\n", peerStreamPath,
		headerPeerClusterID, idString(peerTestCluster), headerPeerFrom, idString(peerTestFollower), headerPeerTo, idString(peerTestLeader))
	head := make([]byte, 12)
	if _, err := io.ReadFull(conn, head); err != nil || string(head) != "HTTP/1.1 200" {
		t.Fatalf("the pull's answer: %q, %v", head, err)
	}
	probeByHand(t, m1.srv.URL, peerTestFollower, peerTestLeader)
	l := p.lanes[laneAppends]
	waitFor(t, "the pull to be open and the peer's URL to fail", func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		return l.pulled.Load() != nil && p.failing
	})
	s := l.pulled.Load()
	for i := range uint64(24) {
		m1.tr.Send([]*raftpb.Message{peerBigApp(i+1, 2<<20)})
	}
	waitFor(t, "the stalled pull reported", func() bool { n, _ := m1.fb.counts(); return n > 0 })
	waitFor(t, "the stalled pull to end", s.ended)
	if l.pulled.Load() == s {
		t.Fatal("the stalled pull is still the lane's")
	}
}

// A member that cannot dial its peer sends it a snapshot all the same, in
// answer to the peer's poll for one (GET /raft/snapshot), over HTTP/2 and
// HTTP/1 (the file's SHA-256 in the answer's trailer either way).
func TestPeerSnapshotReachesAnUnreachableURLOverItsPoll(t *testing.T) {
	for _, h2c := range []bool{true, false} {
		t.Run(fmt.Sprint("h2c=", h2c), func(t *testing.T) {
			peerNoLeaks(t)
			var keys []string
			for i := range 2000 {
				keys = append(keys, fmt.Sprintf("/dir%d/key%d", i%10, i))
			}
			leader, follower := openPeerTestStore(t, keys...), openPeerTestStore(t, "/stale")
			m1 := newPullTestMemberWith(t, transportConfig{ID: peerTestLeader, H2C: h2c, ProbeIdle: 50 * time.Millisecond,
				Snapshot: leader.WriteSnapshot}, nil)
			m2 := newPullTestMemberWith(t, transportConfig{ID: peerTestFollower, H2C: h2c, ProbeIdle: 50 * time.Millisecond}, follower)
			if err := m1.tr.AddPeer(peerTestFollower, []string{"http://127.0.0.1:1"}); err != nil {
				t.Fatal(err)
			}
			if err := m2.tr.AddPeer(peerTestLeader, []string{m1.srv.URL}); err != nil {
				t.Fatal(err)
			}
			meta := &raftpb.SnapshotMetadata{Index: new(uint64(1500)), Term: new(uint64(1)),
				ConfState: &raftpb.ConfState{Voters: []uint64{peerTestLeader, peerTestFollower}}}
			snap := &raftpb.Message{Type: raftpb.MsgSnap.Enum(), From: new(uint64(peerTestLeader)), To: new(uint64(peerTestFollower)),
				Term: new(uint64(1)), Snapshot: &raftpb.Snapshot{Metadata: meta, Data: []byte("a path on the leader")}}
			// As Raft does, the leader sends the snapshot again after each
			// failure: the first ones may go to the dead URL, before m1
			// knows it fails or before m2's poll waits.
			deadline := time.Now().Add(20 * time.Second)
			for {
				_, before := m1.fb.counts()
				m1.tr.Send([]*raftpb.Message{snap})
				var s []raft.SnapshotStatus
				waitFor(t, "a snapshot report", func() bool { _, s = m1.fb.counts(); return len(s) > len(before) })
				if s[len(s)-1] == raft.SnapshotFinish {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("%d snapshots failed in 20 s", len(s))
				}
			}
			var m *raftpb.Message
			select {
			case m = <-m2.got:
			case <-time.After(10 * time.Second):
				t.Fatal("no snapshot delivered")
			}
			if m.GetType() != raftpb.MsgSnap || !proto.Equal(m.GetSnapshot().GetMetadata(), meta) {
				t.Fatalf("delivered %v", m)
			}
			if _, err := follower.Save(storage.Ready{Snapshot: m.GetSnapshot(),
				HardState: &raftpb.HardState{Term: new(uint64(1)), Commit: new(uint64(1500))}}); err != nil {
				t.Fatal(err)
			}
			ev, err := follower.Get("/dir7/key1997", false, false, time.Now())
			if err != nil || *ev.Node.Value != "value of /dir7/key1997" || follower.Index() != 2000 {
				t.Fatalf("after install: %+v %v, index %d", ev, err, follower.Index())
			}
		})
	}
}

// probeByHand sends member from's probes to member to at url every 50 ms
// until the test ends, as a transport does.
func probeByHand(t *testing.T, url string, from, to uint64) {
	t.Helper()
	stop, done := make(chan struct{}), make(chan struct{})
	t.Cleanup(func() {
		close(stop)
		<-done
	})
	cl := &http.Client{Transport: &http.Transport{}}
	go func() {
		defer close(done)
		defer cl.CloseIdleConnections()
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			req, _ := http.NewRequest(http.MethodPost, url+peerRaftPath, http.NoBody)
			req.Header.Set(headerPeerClusterID, idString(peerTestCluster))
			req.Header.Set(headerPeerFrom, idString(from))
			req.Header.Set(headerPeerTo, idString(to))
			if resp, err := cl.Do(req); err == nil {
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
			select {
			case <-tick.C:
			case <-stop:
				return
			}
		}
	}()
}

// A member that pulls but is not heard from (its probes stop coming: it
// lost power, and its pulls' connections linger) is not reachable for
// their sake, and what is sent to it is not written to them.
func TestPeerPullOfAMemberNotHeardFrom(t *testing.T) {
	peerNoLeaks(t)
	m1 := newPullTestMember(t, peerTestLeader)
	if err := m1.tr.AddPeer(peerTestFollower, []string{"http://127.0.0.1:1"}); err != nil {
		t.Fatal(err)
	}
	m1.tr.mu.RLock()
	p := m1.tr.peers[peerTestFollower]
	m1.tr.mu.RUnlock()
	// Member 2's pulls, by hand: their answers are read by nobody.
	for _, lane := range laneNames {
		conn, err := net.Dial("tcp", strings.TrimPrefix(m1.srv.URL, "http://"))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		fmt.Fprintf(conn, "GET %s?lane=%s HTTP/1.1\r\nHost: member1\r\n%s: %s\r\n%s: %s\r\n%s: %s\r\n\r\n", peerStreamPath, lane,
			headerPeerClusterID, idString(peerTestCluster), headerPeerFrom, idString(peerTestFollower), headerPeerTo, idString(peerTestLeader))
	}
	waitFor(t, "both pulls open", func() bool {
		return p.lanes[laneMessages].pulled.Load() != nil && p.lanes[laneAppends].pulled.Load() != nil
	})
	waitFor(t, "member 2 unreachable once not heard from", func() bool { return m1.tr.activeSince(peerTestFollower).IsZero() })
	before, _ := m1.fb.counts()
	m1.tr.Send([]*raftpb.Message{peerHeartbeat(1)})
	waitFor(t, "the heartbeat reported lost", func() bool { n, _ := m1.fb.counts(); return n > before })
	// Its probes come again: it is reachable through its pulls.
	probeByHand(t, m1.srv.URL, peerTestFollower, peerTestLeader)
	waitFor(t, "member 2 reachable again", func() bool { return !m1.tr.activeSince(peerTestFollower).IsZero() })
}
