// Package dnstest is a DNS server for tests: it answers SRV and A queries
// from records a test sets, over UDP and TCP, and fails on demand. It
// stands in for the DNS of a site, which a test cannot change.
package dnstest

import (
	"context"
	"net"
	"strings"
	"sync"
	"testing"

	"github.com/miekg/dns"
)

// SRV is one SRV record's target and port. Records are served in the
// order set, with priority and weight 0, which Go's resolver keeps.
type SRV struct {
	Target string
	Port   uint16
}

// Server serves the records set on it until the test ends.
type Server struct {
	// UDPAddr and TCPAddr are where it listens (the same address when
	// Start was given a port).
	UDPAddr, TCPAddr string

	mu      sync.Mutex
	srv     map[string][]SRV
	a       map[string][]net.IP
	fail    map[string]int
	queries map[string]int

	udp, tcp *dns.Server
}

// Start serves on addr (host:port; port 0 picks a free one for each of UDP
// and TCP) until t ends.
func Start(t testing.TB, addr string) *Server {
	t.Helper()
	s, err := Listen(addr)
	if err != nil {
		t.Fatalf("dnstest: %v", err)
	}
	t.Cleanup(s.Close)
	return s
}

// Listen serves on addr until Close.
func Listen(addr string) (*Server, error) {
	s := &Server{
		srv:     make(map[string][]SRV),
		a:       make(map[string][]net.IP),
		fail:    make(map[string]int),
		queries: make(map[string]int),
	}
	pc, err := net.ListenPacket("udp", addr)
	if err != nil {
		return nil, err
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		pc.Close()
		return nil, err
	}
	s.UDPAddr, s.TCPAddr = pc.LocalAddr().String(), l.Addr().String()
	h := dns.HandlerFunc(s.answer)
	s.udp = &dns.Server{PacketConn: pc, Handler: h}
	s.tcp = &dns.Server{Listener: l, Handler: h}
	up := make(chan struct{}, 2)
	s.udp.NotifyStartedFunc = func() { up <- struct{}{} }
	s.tcp.NotifyStartedFunc = func() { up <- struct{}{} }
	go func() { _ = s.udp.ActivateAndServe() }()
	go func() { _ = s.tcp.ActivateAndServe() }()
	<-up
	<-up
	return s, nil
}

// Close stops the server.
func (s *Server) Close() {
	_ = s.udp.Shutdown()
	_ = s.tcp.Shutdown()
}

func key(name string) string { return strings.ToLower(dns.Fqdn(name)) }

// SetSRV makes name's SRV records recs (none: the name has none).
func (s *Server) SetSRV(name string, recs ...SRV) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.srv[key(name)] = recs
}

// SetA makes name's A records ips.
func (s *Server) SetA(name string, ips ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var parsed []net.IP
	for _, ip := range ips {
		parsed = append(parsed, net.ParseIP(ip))
	}
	s.a[key(name)] = parsed
}

// FailNext answers the next n queries for name with SERVFAIL.
func (s *Server) FailNext(name string, n int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.fail[key(name)] = n
}

// Queries is how many queries for name (any type) it has answered.
func (s *Server) Queries(name string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.queries[key(name)]
}

// Resolver is a Go resolver that asks this server only.
func (s *Server) Resolver() *net.Resolver {
	return &net.Resolver{
		PreferGo: true,
		Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			if strings.HasPrefix(network, "tcp") {
				return d.DialContext(ctx, network, s.TCPAddr)
			}
			return d.DialContext(ctx, network, s.UDPAddr)
		},
	}
}

func (s *Server) answer(w dns.ResponseWriter, r *dns.Msg) {
	m := new(dns.Msg)
	m.SetReply(r)
	m.Authoritative = true
	s.mu.Lock()
	for _, q := range r.Question {
		k := strings.ToLower(q.Name)
		s.queries[k]++
		if s.fail[k] > 0 {
			s.fail[k]--
			m.Rcode = dns.RcodeServerFailure
			continue
		}
		srv, hasSRV := s.srv[k]
		a, hasA := s.a[k]
		if !hasSRV && !hasA {
			m.Rcode = dns.RcodeNameError
			continue
		}
		hdr := dns.RR_Header{Name: q.Name, Class: dns.ClassINET, Ttl: 0}
		switch q.Qtype {
		case dns.TypeSRV:
			for _, rec := range srv {
				h := hdr
				h.Rrtype = dns.TypeSRV
				m.Answer = append(m.Answer, &dns.SRV{Hdr: h, Priority: 0, Weight: 0, Port: rec.Port, Target: dns.Fqdn(rec.Target)})
			}
		case dns.TypeA:
			for _, ip := range a {
				if ip4 := ip.To4(); ip4 != nil {
					h := hdr
					h.Rrtype = dns.TypeA
					m.Answer = append(m.Answer, &dns.A{Hdr: h, A: ip4})
				}
			}
		}
	}
	s.mu.Unlock()
	_ = w.WriteMsg(m)
}
