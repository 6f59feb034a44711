package caddymodule

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
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

	// A host name a peer's client certificate must be valid for (etcd's
	// --peer-cert-allowed-hostname): a peer whose verified certificate is
	// not gets 403. Not with allowed_cn, as etcd. It needs the site's
	// client_auth to verify the certificates.
	AllowedHostname string `json:"allowed_hostname,omitempty"`

	// A certificate revocation list, PEM (one or more CRL blocks) or DER
	// (etcd's --peer-crl-file): a peer whose client certificate's serial
	// number it revokes gets 403, verified or not, as with etcd. Read when
	// the config loads; a reload reads it again (etcd reads it at every
	// connection).
	CRLFile string `json:"crl_file,omitempty"`

	revoked map[string]bool // serial numbers the CRL revokes

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

// Provision gets the member from the raftkv app, and reads the CRL.
func (h *PeerHandler) Provision(ctx caddy.Context) error {
	if len(h.AllowedCN) > 0 && h.AllowedHostname != "" {
		return fmt.Errorf("raftkv_peer: allowed_cn and allowed_hostname are mutually exclusive (cn=%q, hostname=%q), as in etcd", h.AllowedCN, h.AllowedHostname)
	}
	if slices.Contains(h.AllowedCN, "") {
		return errors.New("raftkv_peer: allowed_cn has an empty name, which would let in any certificate without one")
	}
	revoked, err := provisionCertChecks(ctx, "raftkv_peer: crl_file", h.CRLFile,
		"raftkv_peer: allowed_cn and allowed_hostname", len(h.AllowedCN) > 0 || h.AllowedHostname != "")
	if err != nil {
		return err
	}
	h.revoked = revoked
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
	if why := h.refusePeer(r); why != "" {
		raftkv.AnswerBeforeBody(w, r)
		http.Error(w, "raftkv: "+why, http.StatusForbidden)
		return nil
	}
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	defer context.AfterFunc(h.ctx, cancel)()
	n.PeerHandler().ServeHTTP(w, r.WithContext(ctx))
	return nil
}

// refusePeer says why r's client certificate may not reach the member
// (allowed_cn, allowed_hostname, crl_file), or "".
func (h *PeerHandler) refusePeer(r *http.Request) string {
	return refuseCert(r, h.AllowedCN, h.AllowedHostname, h.revoked)
}

// refuseCert says why r's client certificate is refused, or "": revoked
// (checked, as etcd checks its CRL, against any certificate presented), or
// with allowedCN or allowedHost set, no verified certificate with one of
// those common names or valid for that host name.
func refuseCert(r *http.Request, allowedCN []string, allowedHost string, revoked map[string]bool) string {
	if r.TLS != nil {
		for _, c := range r.TLS.PeerCertificates {
			if revoked[c.SerialNumber.String()] {
				return "the client certificate is revoked"
			}
		}
	}
	if len(allowedCN) == 0 && allowedHost == "" {
		return ""
	}
	if r.TLS == nil || len(r.TLS.VerifiedChains) == 0 || len(r.TLS.VerifiedChains[0]) == 0 {
		return "no verified client certificate"
	}
	leaf := r.TLS.VerifiedChains[0][0]
	if len(allowedCN) > 0 && !slices.Contains(allowedCN, leaf.Subject.CommonName) {
		return "the client certificate names no allowed common name"
	}
	if allowedHost != "" && leaf.VerifyHostname(allowedHost) != nil {
		return "the client certificate is not valid for the allowed host name"
	}
	return ""
}

// provisionCertChecks reads crlFile, when one is given (crlOpt names it in
// errors), and returns the serial numbers it revokes; when checksNames, it
// warns if no TLS connection policy of the site verifies client
// certificates, which the name checks (namesOpt) need.
func provisionCertChecks(ctx caddy.Context, crlOpt, crlFile, namesOpt string, checksNames bool) (map[string]bool, error) {
	var revoked map[string]bool
	if crlFile != "" {
		var err error
		if revoked, err = readCRL(crlFile); err != nil {
			return nil, fmt.Errorf("%s: %w", crlOpt, err)
		}
	}
	if checksNames {
		if srv, _ := ctx.Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server); !verifiesClients(srv) {
			ctx.Logger().Warn(namesOpt + " check verified client certificates, and no TLS connection policy of this site verifies them " +
				"(client_auth with a trust pool, in mode require_and_verify or verify_if_given): every request will get 403")
		}
	}
	return revoked, nil
}

// verifiesClients reports whether a TLS connection policy of srv verifies
// client certificates against a CA (Caddy's client_auth with a trust pool
// or CA certificates, in mode require_and_verify, verify_if_given, or the
// default with a CA).
func verifiesClients(srv *caddyhttp.Server) bool {
	if srv == nil {
		return false
	}
	for _, cp := range srv.TLSConnPolicies {
		ca := cp.ClientAuthentication
		if ca == nil {
			continue
		}
		//lint:ignore SA1019 configs may still use the older fields, which Caddy honours
		hasCA := len(ca.CARaw) > 0 || len(ca.TrustedCACerts) > 0 || len(ca.TrustedCACertPEMFiles) > 0
		switch ca.Mode {
		case "require_and_verify", "verify_if_given":
			return true
		case "":
			if hasCA {
				return true
			}
		}
	}
	return false
}

// readCRL reads a certificate revocation list (PEM or DER) and returns
// the serial numbers it revokes.
func readCRL(path string) (map[string]bool, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	ders := [][]byte{b}
	if block, rest := pem.Decode(b); block != nil {
		// PEM: every CRL block in the file (a CA's and an intermediate's).
		ders = nil
		for ; block != nil; block, rest = pem.Decode(rest) {
			if block.Type == "X509 CRL" {
				ders = append(ders, block.Bytes)
			}
		}
		if len(ders) == 0 {
			return nil, errors.New("no X509 CRL block in the PEM file")
		}
	}
	revoked := make(map[string]bool)
	for _, der := range ders {
		crl, err := x509.ParseRevocationList(der)
		if err != nil {
			return nil, err
		}
		for _, e := range crl.RevokedCertificateEntries {
			revoked[e.SerialNumber.String()] = true
		}
	}
	return revoked, nil
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
//		allowed_hostname <host>
//		crl_file <crl.pem>
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
			switch opt := d.Val(); opt {
			case "allowed_cn":
				args := d.RemainingArgs()
				if len(args) == 0 {
					return d.ArgErr()
				}
				h.AllowedCN = append(h.AllowedCN, args...)
			case "allowed_hostname", "crl_file":
				var v string
				if !d.Args(&v) || d.NextArg() {
					return d.ArgErr()
				}
				if opt == "allowed_hostname" {
					h.AllowedHostname = v
				} else {
					h.CRLFile = v
				}
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
