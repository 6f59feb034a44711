package caddymodule

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"path"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/etcaddy/etcaddy/raftkv"
)

func init() {
	caddy.RegisterModule(Handler{})
}

// Handler serves etcd's v2 HTTP API from the member the raftkv app runs:
// /v2/keys, /v2/members, /v2/machines, /v2/stats/{self,store,leader},
// /version and /health, answering as etcd 3.4 does (status codes, headers,
// JSON, CORS). Any other path goes to the next handler, so the API shares a
// site with reverse_proxy, file_server and the rest.
//
// If the config has no raftkv app, one with the defaults is created: the
// handler alone gives a working single-member cluster.
type Handler struct {
	// The origins a browser may call the API from (etcd's --cors): the
	// CORS headers name the request's Origin when it is one of them,
	// exactly as the browser sends it (https://app.example.com), and are
	// left out otherwise. "*" allows every origin. Default: "*", as etcd.
	CORS []string `json:"cors,omitempty"`

	// A host name a client's certificate must be valid for (etcd's
	// --client-cert-allowed-hostname): a request without a verified
	// client certificate valid for it gets 403. It needs the site's
	// client_auth to verify the certificates.
	ClientCertAllowedHostname string `json:"client_cert_allowed_hostname,omitempty"`

	// A certificate revocation list, PEM (one or more CRL blocks) or DER
	// (etcd's --client-crl-file): a request with a client certificate it
	// revokes gets 403. Read when the config loads.
	ClientCRLFile string `json:"client_crl_file,omitempty"`

	revoked    map[string]bool     // serial numbers ClientCRLFile revokes
	corsAny    bool                // CORS is empty or holds "*"
	corsOrigin map[string]struct{} // the origins CORS lists
	member     *member
	timeout    time.Duration
	advertise  []string
	logger     *zap.Logger
	clusterIDs *clusterIDCache // nil: formatted on every response
}

// clusterIDCache keeps the hex form of the last cluster ID sent in
// X-Etcd-Cluster-Id: it changes only with the member, and formatting it
// was an allocation on every request.
type clusterIDCache struct{ p atomic.Pointer[clusterIDText] }

type clusterIDText struct {
	id   uint64
	text string
}

// clusterIDText returns idString(id), from the cache when it holds id.
func (h *Handler) clusterIDText(id uint64) string {
	c := h.clusterIDs
	if c == nil {
		return idString(id)
	}
	if t := c.p.Load(); t != nil && t.id == id {
		return t.text
	}
	t := &clusterIDText{id: id, text: idString(id)}
	c.p.Store(t)
	return t.text
}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.etcd",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision gets the member from the raftkv app.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	h.corsAny = len(h.CORS) == 0 || slices.Contains(h.CORS, "*")
	h.corsOrigin = make(map[string]struct{}, len(h.CORS))
	for _, o := range h.CORS {
		h.corsOrigin[o] = struct{}{}
		if u, err := url.Parse(o); err == nil && (u.Scheme == "http" && u.Port() == "80" || u.Scheme == "https" && u.Port() == "443") {
			// etcd 3.4's --cors takes only host:port, so it is written so
			// there; browsers leave a default port out of Origin.
			h.logger.Warn("a cors origin with its scheme's default port never matches what a browser sends; leave the port out",
				zap.String("origin", o))
		}
	}
	h.clusterIDs = new(clusterIDCache)
	revoked, err := provisionCertChecks(ctx, "etcd: client_crl_file", h.ClientCRLFile,
		"etcd: client_cert_allowed_hostname", h.ClientCertAllowedHostname != "")
	if err != nil {
		return err
	}
	h.revoked = revoked
	v, err := ctx.App("raftkv")
	if err != nil {
		return err
	}
	app := v.(*App)
	h.member = app.member
	h.logger = withMemberLevel(h.logger, h.member.logLevel)
	h.timeout = app.requestTimeout()
	h.advertise = app.AdvertiseClientURLs
	if srv, ok := ctx.Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server); ok {
		srv.RegisterOnShutdown(endWatchesIfExiting)
	}
	return nil
}

// processExit ends once Caddy exits (caddy.Exiting) and a server with an
// etcd handler, or the raftkv app, begins to stop: open watches end then,
// as etcd's do when it stops, and so do requests waiting for Raft
// (Node.EndRequests) and requests a proxy forwards. Caddy waits for every response before it exits (its
// grace period is unlimited by default), so a watch would otherwise hold
// the process until its client goes away, and a write to a member without
// a quorum until its timeout. A server stopped by a config reload leaves
// them be: the member goes on, and they end with their event.
var (
	processExit, endProcess = context.WithCancel(context.Background())
	processExitOnce         sync.Once
)

func endWatchesIfExiting() {
	if caddy.Exiting() {
		processExitOnce.Do(func() {
			endProcess()
			members.Range(func(_, value any) bool {
				value.(*member).current().EndRequests()
				return true
			})
		})
	}
}

// Paths of etcd's client API (v2http/client.go).
const (
	keysPrefix     = "/v2/keys"
	membersPrefix  = "/v2/members"
	machinesPath   = "/v2/machines"
	statsPrefix    = "/v2/stats/"
	versionPath    = "/version"
	healthPath     = "/health"
	statsSelfPath  = statsPrefix + "self"
	statsStorePath = statsPrefix + "store"
	statsLeadPath  = statsPrefix + "leader"
	authPrefix     = "/v2/auth"
	authEnablePath = authPrefix + "/enable"
	v2Prefix       = "/v2/"
)

type endpoint int

const (
	epNone endpoint = iota
	epKeys
	epMembers
	epMachines
	epStatsSelf
	epStatsStore
	epStatsLeader
	epVersion
	epHealth
	epAuthEnable
	epAuth
	epConfigLog
	epV2Unknown
)

// endpointOf maps a path to the endpoint that etcd's ServeMux routes it to.
func endpointOf(p string) endpoint {
	switch {
	case p == keysPrefix || strings.HasPrefix(p, keysPrefix+"/"):
		return epKeys
	case p == membersPrefix || strings.HasPrefix(p, membersPrefix+"/"):
		return epMembers
	case p == machinesPath:
		return epMachines
	case p == statsSelfPath:
		return epStatsSelf
	case p == statsStorePath:
		return epStatsStore
	case p == statsLeadPath:
		return epStatsLeader
	case p == versionPath:
		return epVersion
	case p == healthPath:
		return epHealth
	case p == authEnablePath:
		return epAuthEnable
	case p == authPrefix || strings.HasPrefix(p, authPrefix+"/"):
		return epAuth
	case p == configLogPath:
		return epConfigLog
	case p == "/v2" || strings.HasPrefix(p, v2Prefix):
		// etcd's ServeMux owns all of /v2/: an unknown path there is its
		// plain 404, not the next handler's business.
		return epV2Unknown
	}
	return epNone
}

// inAPI reports whether an unclean path is one of the API's, so that its
// cleaning redirect is ours to send even when the clean path is not (etcd
// redirects /v2/keys/.. to /v2).
func inAPI(p string) bool {
	for _, prefix := range []string{v2Prefix, versionPath, healthPath, configLogPath} {
		if strings.HasPrefix(p, prefix) {
			return true
		}
	}
	return false
}

// ServeHTTP serves the API's paths and passes every other one to next.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	clean := cleanPath(r.URL.Path)
	ep := endpointOf(clean)
	if ep == epNone && (clean == r.URL.Path || !inAPI(r.URL.Path)) {
		return next.ServeHTTP(w, r)
	}

	w = closeUnlessBodyRead(w, r)

	// etcd's --proxy readonly wraps its CORS handler: every request but a
	// GET gets a bare 501, OPTIONS too.
	if n := h.member.current(); n != nil && r.Method != http.MethodGet {
		if px := n.Proxy(); px != nil && px.ReadOnly() {
			delete(w.Header(), "Server")
			w.WriteHeader(http.StatusNotImplemented)
			return nil
		}
	}

	// etcd 3.4's --cors (default '*') wraps the whole client handler: every
	// response carries these headers (for an allowed origin), and any
	// OPTIONS request is answered before routing, with them alone.
	//
	// The header keys below are canonical already, so they are assigned
	// without Header.Set's canonicalization, and every value of the
	// response shares one allocation. Each value gets a slice of its own
	// whose capacity ends at its length: an Add elsewhere reallocates
	// instead of overwriting a neighbour, and a middleware that edits
	// values in place (Caddy's header replace does) edits only this
	// response's copy.
	hv := new(headerValues)
	hdr := w.Header()
	// etcd sends no Server header; Caddy set one before routing.
	delete(hdr, "Server")
	if origin, ok := h.corsOriginFor(r); ok {
		hv.set(hdr, "Access-Control-Allow-Origin", origin)
		hv.set(hdr, "Access-Control-Allow-Methods", "POST, GET, OPTIONS, PUT, DELETE")
		hv.set(hdr, "Access-Control-Allow-Headers", "accept, content-type, authorization")
	}
	if !h.corsAny {
		// The answer depends on Origin: caches must keep it apart (etcd
		// sends no Vary).
		hdr.Add("Vary", "Origin")
	}
	if r.Method == http.MethodOptions {
		w.WriteHeader(http.StatusOK)
		return nil
	}

	// etcd's --client-crl-file and --client-cert-allowed-hostname end the
	// TLS handshake; here the request gets 403.
	if h.revoked != nil || h.ClientCertAllowedHostname != "" {
		if why := refuseCert(r, nil, h.ClientCertAllowedHostname, h.revoked); why != "" {
			writeMessage(w, http.StatusForbidden, "etcd: "+why)
			return nil
		}
	}

	// etcd's ServeMux redirects an unclean path (//, /./, /../, and what
	// %2F decodes into) before any handler or method check runs.
	if clean != r.URL.Path {
		redirectClean(w, r, clean)
		return nil
	}

	switch ep {
	case epVersion, epHealth, epV2Unknown:
	default:
		// As etcd, a member serves no client request before it has caught
		// up with its cluster (raftkv.Node.becomeReady): the request waits,
		// as it would for an etcd that has not published itself yet, until
		// then, until its client gives up (or half-closes its connection),
		// or until the member stops or Caddy exits. Whatever ended the
		// wait, the endpoint answers: a member that is not ready is one
		// that does not run to it (node), so 503.
		if n := h.member.current(); n != nil {
			_ = n.WaitReady(r.Context())
		}
	}
	if n := h.member.current(); n != nil {
		if px := n.Proxy(); px != nil {
			h.serveProxied(w, r, px)
			return nil
		}
	}
	switch ep {
	case epKeys:
		h.serveKeys(w, r, hv)
	case epMembers:
		h.serveMembers(w, r)
	case epMachines:
		h.serveMachines(w, r)
	case epStatsSelf:
		h.serveStatsSelf(w, r)
	case epStatsStore:
		h.serveStatsStore(w, r)
	case epStatsLeader:
		h.serveStatsLeader(w, r)
	case epVersion:
		serveVersion(w, r)
	case epHealth:
		h.serveHealth(w, r)
	case epAuthEnable:
		h.serveAuthEnable(w, r)
	case epAuth:
		h.serveAuth(w, r)
	case epConfigLog:
		h.serveConfigLog(w, r)
	case epV2Unknown:
		http.Error(w, "404 page not found", http.StatusNotFound)
	}
	return nil
}

// headerValues holds the values of the headers one response sets on its
// way through the v2 keys API: three CORS headers, then Content-Type,
// X-Etcd-Cluster-Id, X-Etcd-Index, X-Raft-Index and X-Raft-Term.
type headerValues struct {
	vals [8]string
	n    int
}

// set sets hdr[key] (a canonical key) to v alone, in the next free slot;
// once all are used, in a slice of its own.
func (hv *headerValues) set(hdr http.Header, key, v string) {
	if hv.n == len(hv.vals) {
		hdr[key] = []string{v}
		return
	}
	i := hv.n
	hv.n++
	hv.vals[i] = v
	hdr[key] = hv.vals[i : i+1 : i+1]
}

// requestContext bounds a request's wait for Raft (a write, a quorum read,
// a membership or auth change) by the request timeout, as etcd's handlers
// do, from context.Background: the client going away does not end it.
// net/http ends r.Context() when it reads the end of the connection, and a
// client that half-closes its side once its request is sent (nc -N, some
// proxies) would otherwise get a 500 for a write that goes on and lands.
func (h *Handler) requestContext(r *http.Request) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(r.Context()), h.timeout)
}

// node returns the member's node when it runs and is ready to serve
// clients (see ServeHTTP). Until the raftkv app has started it (apps start
// in random order, and HTTP may come first) and it has caught up with its
// cluster, and once a shutdown, a removal or a failure has stopped it,
// there is none.
func (h *Handler) node() *raftkv.Node {
	if n := h.member.running(); n != nil && n.Ready() {
		return n
	}
	return nil
}

// cleanPath is Go's ServeMux path cleaning: path.Clean, keeping a
// trailing slash.
func cleanPath(p string) string {
	if p == "" {
		return "/"
	}
	if p[0] != '/' {
		p = "/" + p
	}
	np := path.Clean(p)
	if p[len(p)-1] == '/' && np != "/" {
		np += "/"
	}
	return np
}

// redirectClean answers 301 to the clean path exactly as etcd's ServeMux
// did: query kept, the short HTML body (with the extra newline of the Go
// release etcd 3.4.23 was built with) on GET only, its Content-Type on GET
// and HEAD.
func redirectClean(w http.ResponseWriter, r *http.Request, clean string) {
	loc := (&url.URL{Path: clean, RawQuery: r.URL.RawQuery}).String()
	h := w.Header()
	h.Set("Location", loc)
	if r.Method == http.MethodGet || r.Method == http.MethodHead {
		h.Set("Content-Type", "text/html; charset=utf-8")
	}
	w.WriteHeader(http.StatusMovedPermanently)
	if r.Method == http.MethodGet {
		_, _ = w.Write([]byte("<a href=\"" + htmlReplacer.Replace(loc) + "\">Moved Permanently</a>.\n\n"))
	}
}

var htmlReplacer = strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;", `"`, "&#34;", "'", "&#39;")

// allowMethod answers 405 with an Allow header, as etcd's allowMethod does,
// unless the request's method is one of methods.
func allowMethod(w http.ResponseWriter, r *http.Request, methods ...string) bool {
	for _, m := range methods {
		if r.Method == m {
			return true
		}
	}
	w.Header().Set("Allow", strings.Join(methods, ","))
	http.Error(w, "Method Not Allowed", http.StatusMethodNotAllowed)
	return false
}

// writeMessage writes the {"message": ...} error of etcd's non-key
// endpoints (httptypes.HTTPError: json.Marshal, no newline).
func writeMessage(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, struct {
		Message string `json:"message"`
	}{msg}, false)
}

// writeJSON writes v as JSON. etcd writes some bodies with json.Encoder
// (a trailing newline) and others with json.Marshal (none); newline says
// which.
func writeJSON(w http.ResponseWriter, status int, v any, newline bool) {
	b, err := json.Marshal(v)
	if err != nil {
		http.Error(w, "Internal Server Error", http.StatusInternalServerError)
		return
	}
	b = legacyEscapes(b)
	if newline {
		b = append(b, '\n')
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

// idString formats a member or cluster ID as etcd's types.ID does:
// lowercase hex, not padded.
func idString(id uint64) string { return strconv.FormatUint(id, 16) }

// errNotRunning is the cause sent while the member does not run; the text
// is etcd's ErrStopped.
const errNotRunning = "etcdserver: server stopped"

// Validate checks the CORS origins: "*", or scheme://host[:port] as a
// browser sends it in Origin.
func (h *Handler) Validate() error {
	for _, o := range h.CORS {
		if err := checkOrigin(o); err != nil {
			return fmt.Errorf("cors: %v", err)
		}
	}
	return nil
}

// checkOrigin accepts "*" and an origin as browsers serialize it.
func checkOrigin(o string) error {
	if o == "*" {
		return nil
	}
	u, err := url.Parse(o)
	switch {
	case err != nil:
		return err
	case u.Scheme == "" || u.Host == "" || u.User != nil || u.RawQuery != "" || u.Fragment != "" || u.Opaque != "":
		return fmt.Errorf("%q is not an origin (scheme://host[:port], or *)", o)
	case u.Path != "" || u.ForceQuery || strings.HasSuffix(o, "#"):
		return fmt.Errorf("%q has a path: an origin is scheme://host[:port], as a browser sends it", o)
	case strings.HasSuffix(u.Host, ":"):
		return fmt.Errorf("%q has an empty port", o)
	case o != strings.ToLower(o):
		return fmt.Errorf("%q: browsers send origins in lowercase", o)
	}
	return nil
}

// corsOriginFor returns the Access-Control-Allow-Origin value r gets, as
// etcd's access controller gives it: "*" when every origin is allowed,
// r's Origin when it is listed, none otherwise.
func (h *Handler) corsOriginFor(r *http.Request) (string, bool) {
	if h.corsAny {
		return "*", true
	}
	origin := r.Header.Get("Origin")
	_, ok := h.corsOrigin[origin] // Validate refused "": a request without Origin gets none
	return origin, ok
}

// Interface guards.
var (
	_ caddy.Validator             = (*Handler)(nil)
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)
