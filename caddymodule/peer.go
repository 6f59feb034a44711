package caddymodule

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/http"
	"os"
	"slices"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/etcaddy/etcaddy/raftkv"
)

func init() {
	caddy.RegisterModule(PeerHandler{})
	httpcaddyfile.RegisterHandlerDirective("raftkv_peer", parsePeerDirective)
	// Like etcd: the peer endpoint answers only /raft and hands the rest
	// on, so a catch-all respond in the same site never hides it.
	httpcaddyfile.RegisterDirectiveOrder("raftkv_peer", httpcaddyfile.Before, "respond")
}

// peerPath is where members send each other Raft messages and snapshots
// (raftkv's peer protocol: /raft, /raft/stream, /raft/snapshot).
const peerPath = "/raft"

// PeerHandler serves the member's peer endpoint: the Raft messages and
// snapshots the other members of the cluster send to this one, on /raft
// and the paths under it. Every other path goes to the next handler.
//
// It belongs in the site of the member's peer URL. Peers authenticate each
// other with mutual TLS: give that site the member's certificate and
// `client_auth` with mode require_and_verify and the cluster's CA as trust
// pool; the raftkv app's peer_cert_file, peer_key_file and
// peer_trusted_ca_file are the client side of the same exchange. raftkv
// itself refuses messages from another cluster or from an unknown member.
type PeerHandler struct {
	// The common names a peer's client certificate may have (etcd's
	// --peer-cert-allowed-cn): a peer whose verified certificate names
	// none of them gets 403, as does one without a certificate. Empty:
	// any certificate the site's client_auth accepts. It needs the site's
	// client_auth to verify the certificates.
	AllowedCN []string `json:"allowed_cn,omitempty"`

	member *member
	// ctx ends when this handler's config is unloaded (a reload): the
	// peer streams it serves end then, and their senders open new ones,
	// served by the new config. Left open, they would keep the old
	// server running for as long as the member does.
	ctx context.Context
}

// CaddyModule returns the Caddy module information.
func (PeerHandler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.raftkv_peer",
		New: func() caddy.Module { return new(PeerHandler) },
	}
}

// Provision gets the member from the raftkv app.
func (h *PeerHandler) Provision(ctx caddy.Context) error {
	v, err := ctx.App("raftkv")
	if err != nil {
		return err
	}
	h.member = v.(*App).member
	h.ctx = ctx
	if srv, ok := ctx.Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server); ok {
		// When Caddy exits, the streams end once its servers stop (the
		// leader has handed over by then: Caddy's "stopping" event comes
		// first, see exitHandover), or Caddy would wait for them.
		srv.RegisterOnShutdown(endPeerStreamsIfExiting)
	}
	return nil
}

// ServeHTTP hands /raft and /raft/... to the node's peer handler.
func (h *PeerHandler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	if r.URL.Path != peerPath && !strings.HasPrefix(r.URL.Path, peerPath+"/") {
		return next.ServeHTTP(w, r)
	}
	// Until the app has started the node (apps start in any order, HTTP
	// may come first) and once it has stopped, peers get a 503 and retry:
	// raftkv reports them unreachable and Raft resends.
	n := h.member.running()
	if n == nil {
		// At once, whatever the body: a peer's stream does not end.
		raftkv.AnswerBeforeBody(w, r)
		w.Header().Set("Retry-After", "1")
		http.Error(w, "raftkv member not running", http.StatusServiceUnavailable)
		return nil
	}
	if len(h.AllowedCN) > 0 && !h.allowedPeer(r) {
		raftkv.AnswerBeforeBody(w, r)
		http.Error(w, "raftkv: the peer's certificate names no allowed common name", http.StatusForbidden)
		return nil
	}
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	defer context.AfterFunc(h.ctx, cancel)()
	n.PeerHandler().ServeHTTP(w, r.WithContext(ctx))
	return nil
}

// allowedPeer reports whether r came with a verified client certificate
// whose common name AllowedCN lists.
func (h *PeerHandler) allowedPeer(r *http.Request) bool {
	if r.TLS == nil || len(r.TLS.VerifiedChains) == 0 || len(r.TLS.VerifiedChains[0]) == 0 {
		return false
	}
	return slices.Contains(h.AllowedCN, r.TLS.VerifiedChains[0][0].Subject.CommonName)
}

func endPeerStreamsIfExiting() {
	if caddy.Exiting() {
		members.Range(func(_, value any) bool {
			if n := value.(*member).current(); n != nil {
				n.EndPeerStreams()
			}
			return true
		})
	}
}

// parsePeerDirective sets up the peer handler. Syntax:
//
//	raftkv_peer [<matcher>] {
//		allowed_cn <common_name>...
//	}
//
// It takes no arguments: TLS and client_auth belong to the site it is in.
func parsePeerDirective(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	handler := new(PeerHandler)
	err := handler.UnmarshalCaddyfile(h.Dispenser)
	return handler, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens; see
// parsePeerDirective for the syntax.
func (h *PeerHandler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	for d.Next() {
		if d.NextArg() {
			return d.ArgErr()
		}
		for d.NextBlock(0) {
			switch d.Val() {
			case "allowed_cn":
				args := d.RemainingArgs()
				if len(args) == 0 {
					return d.ArgErr()
				}
				h.AllowedCN = append(h.AllowedCN, args...)
			default:
				return d.Errf("unrecognized raftkv_peer option %q", d.Val())
			}
		}
	}
	return nil
}

// peerTLSFiles names the files of the client side of peer TLS (etcd's
// --peer-cert-file, --peer-key-file, --peer-trusted-ca-file).
type peerTLSFiles struct {
	cert, key, ca string
}

func (a *App) peerTLSFiles() peerTLSFiles {
	return peerTLSFiles{cert: a.PeerCertFile, key: a.PeerKeyFile, ca: a.PeerTrustedCAFile}
}

func (f peerTLSFiles) empty() bool { return f == peerTLSFiles{} }

// load reads the files into cfg, which the node has not used yet.
func (f peerTLSFiles) load(cfg *tls.Config) error {
	if f.cert != "" {
		pair, err := tls.LoadX509KeyPair(f.cert, f.key)
		if err != nil {
			return fmt.Errorf("peer_cert_file %s, peer_key_file %s: %w", f.cert, f.key, err)
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	if f.ca != "" {
		pem, err := os.ReadFile(f.ca)
		if err != nil {
			return fmt.Errorf("peer_trusted_ca_file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return fmt.Errorf("peer_trusted_ca_file %s holds no PEM certificate", f.ca)
		}
		cfg.RootCAs = pool
	}
	return nil
}

// Interface guards.
var (
	_ caddy.Provisioner           = (*PeerHandler)(nil)
	_ caddyhttp.MiddlewareHandler = (*PeerHandler)(nil)
	_ caddyfile.Unmarshaler       = (*PeerHandler)(nil)
)
