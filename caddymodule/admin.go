package caddymodule

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/etcaddy/etcaddy/raftkv"
)

func init() {
	caddy.RegisterModule(AdminAPI{})
}

// AdminAPI serves the running member on Caddy's admin API (by default
// http://localhost:2019), for operators rather than clients. Caddy adds it
// to every config; it has no options. Every answer is JSON, errors as
// {"error": "..."}:
//
//   - GET /raftkv/status: this member's ID, name, cluster ID, leader, Raft
//     term and indexes, start time and member count.
//   - GET /raftkv/members: the member list, as /v2/members shows it.
//   - POST /raftkv/transfer-leadership[?to=<member ID>][&timeout=<duration>]:
//     the leader hands leadership to another voting member (the most
//     up-to-date one, or the one named by to) and answers once it has
//     moved. A member that does not lead answers 409 and names the leader.
//   - GET /raftkv/snapshot: a consistent copy of the member's member.db,
//     every write it had answered included: a backup that opens as a
//     member's data file.
//
// Without a raftkv app in the running config every route answers 404;
// while the member is not running, 503 (status still answers for a member
// that has stopped, with running false).
type AdminAPI struct {
	logger *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (AdminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.raftkv",
		New: func() caddy.Module { return new(AdminAPI) },
	}
}

// Provision takes the logger. The member is looked up per request (see
// activeApp): Caddy provisions admin modules before the config's apps.
func (a *AdminAPI) Provision(ctx caddy.Context) error {
	// Caddy provisions admin routers outside any module tree, so the
	// logger must be asked for this module by name (as admin.api.pki does).
	a.logger = ctx.Logger(a)
	return nil
}

// Paths of the admin routes.
const (
	adminPrefix       = "/raftkv/"
	adminStatusPath   = adminPrefix + "status"
	adminMembersPath  = adminPrefix + "members"
	adminTransferPath = adminPrefix + "transfer-leadership"
	adminSnapshotPath = adminPrefix + "snapshot"
)

const (
	// transferTimeouts bounds a leader transfer, in election timeouts,
	// when the request gives no timeout: Raft itself gives a transfer up
	// after one election timeout, and the new leader needs one more
	// round trip to make itself known.
	transferTimeouts = 5
	// snapshotWriteTimeout bounds each write of a snapshot download: the
	// copy holds a bbolt read transaction open, which a client that stops
	// reading must not hold for ever (it would hold the member's shutdown).
	snapshotWriteTimeout = 30 * time.Second
)

// Routes returns the admin routes, each behind its method check.
func (a *AdminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{
		{Pattern: adminStatusPath, Handler: a.route(http.MethodGet, a.serveStatus)},
		{Pattern: adminMembersPath, Handler: a.route(http.MethodGet, a.serveMembers)},
		{Pattern: adminTransferPath, Handler: a.route(http.MethodPost, a.serveTransfer)},
		{Pattern: adminSnapshotPath, Handler: a.route(http.MethodGet, a.serveSnapshot)},
		{Pattern: adminPrefix, Handler: caddy.AdminHandlerFunc(serveAdminNotFound)},
	}
}

// route checks the method, then finds the running config's raftkv app.
func (a *AdminAPI) route(method string, serve func(http.ResponseWriter, *http.Request, *App) error) caddy.AdminHandler {
	return caddy.AdminHandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		if r.Method != method {
			w.Header().Set("Allow", method)
			return caddy.APIError{
				HTTPStatus: http.StatusMethodNotAllowed,
				Err:        fmt.Errorf("method %s not allowed on %s: use %s", r.Method, r.URL.Path, method),
			}
		}
		app, err := activeApp()
		if err != nil {
			return err
		}
		return serve(w, r, app)
	})
}

func serveAdminNotFound(_ http.ResponseWriter, r *http.Request) error {
	return caddy.APIError{
		HTTPStatus: http.StatusNotFound,
		Err: fmt.Errorf("no raftkv admin route %s: try %s, %s, %s or %s", r.URL.Path,
			adminStatusPath, adminMembersPath, adminTransferPath, adminSnapshotPath),
	}
}

// activeApp returns the raftkv app of the config Caddy runs now. It is
// looked up at request time: the admin API is rebuilt before the new
// config's apps are provisioned, and with a Caddyfile that has `etcd` but
// no raftkv global option, the app exists only once the handler has asked
// for it. The app's member is the value the members pool holds for the
// app's data directory, the same node across reloads; the app keeps its
// reference on it for as long as its config runs.
func activeApp() (*App, error) {
	v, err := caddy.ActiveContext().AppIfConfigured("raftkv")
	if errors.Is(err, caddy.ErrNotConfigured) {
		return nil, caddy.APIError{
			HTTPStatus: http.StatusNotFound,
			Err:        errors.New("no raftkv member in the running config: add the raftkv global option or the etcd handler"),
		}
	}
	if err != nil {
		return nil, caddy.APIError{HTTPStatus: http.StatusServiceUnavailable, Err: fmt.Errorf("raftkv app: %w", err)}
	}
	app, ok := v.(*App)
	if !ok || app.member == nil {
		return nil, errMemberNotRunning
	}
	return app, nil
}

var errMemberNotRunning = caddy.APIError{
	HTTPStatus: http.StatusServiceUnavailable,
	Err:        errors.New("the raftkv member is not running (starting, stopping, stopped by a failure, or removed from its cluster)"),
}

// runningNode returns the app's node if it runs.
func runningNode(app *App) (*raftkv.Node, error) {
	n := app.member.running()
	if n == nil {
		return nil, errMemberNotRunning
	}
	return n, nil
}

// adminStatus is the answer of GET /raftkv/status.
type adminStatus struct {
	ID           string     `json:"id"`
	Name         string     `json:"name"`
	ClusterID    string     `json:"cluster_id"`
	Leader       string     `json:"leader"` // "" while there is none
	IsLeader     bool       `json:"is_leader"`
	RaftTerm     uint64     `json:"raft_term"`
	RaftIndex    uint64     `json:"raft_index"` // committed, as X-Raft-Index
	AppliedIndex uint64     `json:"applied_index"`
	EtcdIndex    uint64     `json:"etcd_index"` // as X-Etcd-Index
	StartTime    time.Time  `json:"start_time"`
	LeaderSince  *time.Time `json:"leader_since,omitempty"`
	Members      int        `json:"members"`
	Running      bool       `json:"running"`
	Ready        bool       `json:"ready"` // caught up with its cluster: it serves clients
	DataDir      string     `json:"data_dir"`
}

// serveStatus answers GET /raftkv/status. A member that has booted but
// stopped still answers, with running false, so an operator can see which
// member it was.
func (a *AdminAPI) serveStatus(w http.ResponseWriter, _ *http.Request, app *App) error {
	n := app.member.current()
	st := n.Status()
	if st.ID == 0 {
		why := "the raftkv member has not started yet"
		if n.Discovering() {
			why += ": it waits for its discovery service (" + app.Discovery + ")"
		}
		if px := n.Proxy(); px != nil {
			why = "the raftkv member runs as a proxy of its cluster (" + px.Why() + "): it forwards client requests to "
			if eps := px.Endpoints(); len(eps) > 0 {
				urls := make([]string, len(eps))
				for i, u := range eps {
					urls[i] = u.String()
				}
				why += "the members' client URLs " + strings.Join(urls, ",")
			} else {
				why += "the members' client URLs, none known now"
			}
			why += ", found at the peer URLs " + strings.Join(px.PeerURLs(), ",")
		}
		return caddy.APIError{
			HTTPStatus: http.StatusServiceUnavailable,
			Err:        errors.New(why),
		}
	}
	out := adminStatus{
		ID:           idString(st.ID),
		Name:         app.Name,
		ClusterID:    idString(st.ClusterID),
		IsLeader:     st.IsLeader,
		RaftTerm:     st.Term,
		RaftIndex:    st.RaftIndex,
		AppliedIndex: n.AppliedIndex(),
		EtcdIndex:    st.EtcdIndex,
		StartTime:    st.StartTime,
		Members:      len(n.Members()),
		Running:      n.Running(),
		Ready:        n.Running() && n.Ready(),
		DataDir:      app.DataDir,
	}
	if !out.Running {
		// What it knew of the leader when it stopped is no longer so.
		st.Leader, out.IsLeader, st.LeaderSince = 0, false, time.Time{}
	}
	if st.Leader != 0 {
		out.Leader = idString(st.Leader)
	}
	if !st.LeaderSince.IsZero() {
		out.LeaderSince = &st.LeaderSince
	}
	return writeAdminJSON(w, out)
}

// serveMembers answers GET /raftkv/members like GET /v2/members, but
// without a request from a client to take this member's client URLs from
// when none are advertised: they are then [].
func (a *AdminAPI) serveMembers(w http.ResponseWriter, _ *http.Request, app *App) error {
	n, err := runningNode(app)
	if err != nil {
		return err
	}
	// The running config's advertised URLs, as the etcd handler lists them.
	out := membersJSON(n, app.AdvertiseClientURLs, "")
	return writeAdminJSON(w, struct {
		Members []memberJSON `json:"members"`
	}{out})
}

// adminTransfer is the answer of POST /raftkv/transfer-leadership.
type adminTransfer struct {
	PreviousLeader string `json:"previous_leader"`
	Leader         string `json:"leader"`
	RaftTerm       uint64 `json:"raft_term"`
}

// serveTransfer answers POST /raftkv/transfer-leadership: the leader hands
// leadership over and the answer comes once this member knows of the new
// leader.
func (a *AdminAPI) serveTransfer(w http.ResponseWriter, r *http.Request, app *App) error {
	n, err := runningNode(app)
	if err != nil {
		return err
	}
	q := r.URL.Query()
	// The running config's (the member's own may be older: see member.start).
	timeout := transferTimeouts * time.Duration(app.ElectionTimeout)
	if s := q.Get("timeout"); s != "" {
		d, err := caddy.ParseDuration(s)
		if err != nil || d <= 0 {
			return caddy.APIError{
				HTTPStatus: http.StatusBadRequest,
				Err:        fmt.Errorf("timeout=%s: want a positive duration such as 10s", s),
			}
		}
		timeout = d
	}
	var to uint64
	if s := q.Get("to"); s != "" {
		to, err = strconv.ParseUint(s, 16, 64)
		if err != nil || to == 0 {
			return caddy.APIError{
				HTTPStatus: http.StatusBadRequest,
				Err:        fmt.Errorf("to=%s: want a member ID in hex, as /raftkv/members lists them", s),
			}
		}
	}
	st := n.Status()
	switch {
	case st.Leader == 0:
		return caddy.APIError{
			HTTPStatus: http.StatusServiceUnavailable,
			Err:        errors.New("the cluster has no leader (an election is under way): try again"),
		}
	case !st.IsLeader:
		return notLeaderError(n, st)
	case to == st.ID:
		return caddy.APIError{
			HTTPStatus: http.StatusBadRequest,
			Err:        fmt.Errorf("to=%s names this member, which leads already", idString(to)),
		}
	}

	ctx, cancel := context.WithTimeout(r.Context(), timeout)
	defer cancel()
	err = n.TransferLeadershipTo(ctx, to)
	switch {
	case err == nil:
	case errors.Is(err, raftkv.ErrNoTransferee):
		return caddy.APIError{
			HTTPStatus: http.StatusConflict,
			Err:        errors.New("this member is the only voting member of its cluster: there is no other member to hand leadership to"),
		}
	case errors.Is(err, raftkv.ErrTransfereeUnreachable):
		return caddy.APIError{
			HTTPStatus: http.StatusConflict,
			Err:        fmt.Errorf("%w: it could not take over; this member still leads", err),
		}
	case errors.Is(err, raftkv.ErrNotLeader):
		return notLeaderError(n, n.Status())
	case errors.Is(err, raftkv.ErrMemberNotFound):
		return caddy.APIError{
			HTTPStatus: http.StatusBadRequest,
			Err:        fmt.Errorf("to=%s names no other voting member of the cluster", idString(to)),
		}
	case errors.Is(err, raftkv.ErrTimeout):
		// etcd's MoveLeader gives up alike ("leader transfer took too
		// long"), and its gateway answers a deadline with 504.
		return caddy.APIError{
			HTTPStatus: http.StatusGatewayTimeout,
			Err:        fmt.Errorf("leadership did not move within %v; the leader is %s", timeout, leaderText(n.Status())),
		}
	case errors.Is(err, raftkv.ErrStopped):
		return errMemberNotRunning
	default:
		return caddy.APIError{HTTPStatus: http.StatusInternalServerError, Err: fmt.Errorf("leader transfer: %w", err)}
	}
	after := n.Status()
	a.logger.Info("leadership transferred through the admin API",
		zap.String("from", idString(st.ID)), zap.String("to", leaderText(after)))
	return writeAdminJSON(w, adminTransfer{
		PreviousLeader: idString(st.ID),
		Leader:         leaderText(after),
		RaftTerm:       after.Term,
	})
}

// notLeaderError names the leader, so the operator knows whose admin API
// to ask.
func notLeaderError(n *raftkv.Node, st raftkv.Status) error {
	leader := leaderText(st)
	for _, m := range n.Members() {
		if m.ID == st.Leader && m.Name != "" {
			leader += " (" + m.Name + ")"
		}
	}
	return caddy.APIError{
		HTTPStatus: http.StatusConflict,
		Err: fmt.Errorf("this member (%s) is not the leader; the leader is %s: ask its admin API",
			idString(st.ID), leader),
	}
}

func leaderText(st raftkv.Status) string {
	if st.Leader == 0 {
		return "unknown (an election is under way)"
	}
	return idString(st.Leader)
}

// serveSnapshot answers GET /raftkv/snapshot with a copy of member.db,
// streamed from one bbolt read transaction.
func (a *AdminAPI) serveSnapshot(w http.ResponseWriter, r *http.Request, app *App) error {
	n, err := runningNode(app)
	if err != nil {
		return err
	}
	h := w.Header()
	h.Set("Content-Type", "application/octet-stream")
	h.Set("Content-Disposition", `attachment; filename="member.db"`)
	sw := &snapshotWriter{w: w, rc: http.NewResponseController(w)}
	defer sw.clearDeadline()
	_, err = n.Backup(r.Context(), sw)
	if err == nil {
		return nil
	}
	if !sw.wrote {
		// Nothing went out yet: an ordinary JSON error.
		h.Del("Content-Disposition")
		if errors.Is(err, raftkv.ErrStopped) {
			return errMemberNotRunning
		}
		return caddy.APIError{HTTPStatus: http.StatusInternalServerError, Err: fmt.Errorf("snapshot: %w", err)}
	}
	// The copy broke off midway. Ending the handler normally would end the
	// chunked body cleanly and the client would keep a truncated file that
	// looks whole: abort the connection instead.
	a.logger.Warn("snapshot download cut short", zap.String("remote", r.RemoteAddr), zap.Int64("bytes", sw.n), zap.Error(err))
	panic(http.ErrAbortHandler)
}

// snapshotWriter writes a snapshot download, each write under its own
// deadline, and tells whether any byte went out.
type snapshotWriter struct {
	w     io.Writer
	rc    *http.ResponseController
	wrote bool
	n     int64
}

func (s *snapshotWriter) Write(p []byte) (int, error) {
	// Not every ResponseWriter supports deadlines; the download then
	// goes without.
	_ = s.rc.SetWriteDeadline(time.Now().Add(snapshotWriteTimeout))
	s.wrote = true
	k, err := s.w.Write(p)
	s.n += int64(k)
	return k, err
}

// clearDeadline lifts the last write deadline: the connection may carry
// another request, whose answer may take longer.
func (s *snapshotWriter) clearDeadline() {
	if s.wrote {
		_ = s.rc.SetWriteDeadline(time.Time{})
	}
}

func writeAdminJSON(w http.ResponseWriter, v any) error {
	w.Header().Set("Content-Type", "application/json")
	return json.NewEncoder(w).Encode(v)
}

// Interface guards.
var (
	_ caddy.AdminRouter = (*AdminAPI)(nil)
	_ caddy.Provisioner = (*AdminAPI)(nil)
)
