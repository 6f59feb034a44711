package caddymodule

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"sort"
	"strconv"
	"strings"

	"go.uber.org/zap"

	"github.com/etcaddy/etcaddy/raftkv"
)

// memberJSON is etcd's httptypes.Member: empty URL lists are [], never
// null.
type memberJSON struct {
	ID         string   `json:"id"`
	Name       string   `json:"name"`
	PeerURLs   []string `json:"peerURLs"`
	ClientURLs []string `json:"clientURLs"`
}

// members lists the cluster's members as /v2/members shows them. This
// member's client URLs are the configured advertise_client_urls or, when
// there are none, the scheme and host the request came in on: etcdctl and
// the Go client replace their endpoints with the members' client URLs, and
// must land back here.
func (h *Handler) members(r *http.Request, n *raftkv.Node) []memberJSON {
	return membersJSON(n, h.advertise, requestURL(r))
}

// membersJSON lists n's members for an answer; this member's client URLs
// are advertise, or else fallback (when not empty).
func membersJSON(n *raftkv.Node, advertise []string, fallback string) []memberJSON {
	self := n.Status().ID
	ms := n.Members()
	out := make([]memberJSON, 0, len(ms))
	for _, m := range ms {
		mj := memberJSON{
			ID:         idString(m.ID),
			Name:       m.Name,
			PeerURLs:   slices.Clone(m.PeerURLs),
			ClientURLs: slices.Clone(m.ClientURLs),
		}
		if m.ID == self {
			switch {
			case len(advertise) > 0:
				mj.ClientURLs = slices.Clone(advertise)
			case len(mj.ClientURLs) == 0 && fallback != "":
				mj.ClientURLs = []string{fallback}
			}
		}
		if mj.PeerURLs == nil {
			mj.PeerURLs = []string{}
		}
		if mj.ClientURLs == nil {
			mj.ClientURLs = []string{}
		}
		out = append(out, mj)
	}
	return out
}

// requestURL is the scheme://host a request was sent to: its Host, or,
// for a request without one (HTTP/1.0), the address it came in on.
func requestURL(r *http.Request) string {
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	host := r.Host
	if host == "" {
		if addr, ok := r.Context().Value(http.LocalAddrContextKey).(net.Addr); ok {
			host = addr.String()
		}
	}
	return scheme + "://" + host
}

// serveMembers is etcd's membersHandler.
func (h *Handler) serveMembers(w http.ResponseWriter, r *http.Request) {
	if !allowMethod(w, r, "GET", "POST", "DELETE", "PUT") {
		return
	}
	n := h.node()
	if n == nil {
		writeMessage(w, http.StatusServiceUnavailable, errNotRunning)
		return
	}
	switch ok, err := h.membersAccess(r, n); {
	case err != nil:
		writeMessage(w, http.StatusServiceUnavailable, errNotRunning)
		return
	case !ok:
		writeMessage(w, http.StatusUnauthorized, errInsufficientCredentials)
		return
	}
	w.Header().Set("X-Etcd-Cluster-Id", idString(n.Status().ClusterID))

	switch r.Method {
	case http.MethodGet:
		switch trimPrefix(r.URL.Path, membersPrefix) {
		case "":
			writeJSON(w, http.StatusOK, struct {
				Members []memberJSON `json:"members"`
			}{h.members(r, n)}, true)
		case "leader":
			leader := idString(n.Status().Leader)
			for _, m := range h.members(r, n) {
				if m.ID == leader {
					writeJSON(w, http.StatusOK, m, true)
					return
				}
			}
			writeMessage(w, http.StatusServiceUnavailable, "During election")
		default:
			writeMessage(w, http.StatusNotFound, "Not found")
		}

	case http.MethodPost:
		urls, ok := readPeerURLs(w, r)
		if !ok {
			return
		}
		// Before AddMember: the new member's ID is made of its peer URLs
		// and the current second, so a second POST of one URL within the
		// same second would be refused as "ID exists" first. After the
		// strict check, which etcd makes before it proposes.
		if err := n.MayAddMember(); err != nil {
			h.writeMembershipError(w, err, "")
			return
		}
		if h.peerURLTaken(r, n, urls) {
			writeMessage(w, http.StatusConflict, raftkv.ErrPeerURLExists.Error())
			return
		}
		ctx, cancel := h.requestContext(r)
		m, err := n.AddMember(ctx, urls)
		cancel()
		if err != nil {
			if errors.Is(err, raftkv.ErrMemberRemoved) {
				// The new ID is one the leader knows removed (AddMember
				// takes the next second's when this member knows it):
				// etcd answers a bare 500, which etcdctl tries elsewhere.
				h.membershipFailed(w, fmt.Errorf("adding a member with a removed ID: %w", err), "")
				return
			}
			h.writeMembershipError(w, err, "")
			return
		}
		// etcd answers with the member as the cluster knows it before it
		// starts: no name, no client URLs yet.
		mj := memberJSON{ID: idString(m.ID), Name: m.Name, PeerURLs: m.PeerURLs, ClientURLs: m.ClientURLs}
		if mj.PeerURLs == nil {
			mj.PeerURLs = []string{}
		}
		if mj.ClientURLs == nil {
			mj.ClientURLs = []string{}
		}
		writeJSON(w, http.StatusCreated, mj, true)

	case http.MethodDelete:
		id, ok := memberIDFromPath(w, r)
		if !ok {
			return
		}
		ctx, cancel := h.requestContext(r)
		err := n.RemoveMember(ctx, parseID(id))
		cancel()
		if err != nil {
			h.writeMembershipError(w, err, id)
			return
		}
		w.WriteHeader(http.StatusNoContent)

	case http.MethodPut:
		id, ok := memberIDFromPath(w, r)
		if !ok {
			return
		}
		urls, ok := readPeerURLs(w, r)
		if !ok {
			return
		}
		ctx, cancel := h.requestContext(r)
		err := n.UpdateMember(ctx, parseID(id), urls)
		cancel()
		if err != nil {
			if errors.Is(err, raftkv.ErrMemberRemoved) {
				// etcd 3.4 answers an update of a removed member with a
				// plain 500, not DELETE's 410.
				h.membershipFailed(w, fmt.Errorf("updating removed member %s: %w", id, err), id)
				return
			}
			h.writeMembershipError(w, err, id)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	}
}

// writeMembershipError answers a failed membership change as etcd's
// membersHandler does: the errors a client can act on with their own
// status and message, anything else (a timeout, a lost quorum, a stopped
// member) as a bare 500.
func (h *Handler) writeMembershipError(w http.ResponseWriter, err error, id string) {
	switch {
	case errors.Is(err, raftkv.ErrMemberNotFound):
		writeMessage(w, http.StatusNotFound, "No such member: "+id)
	case errors.Is(err, raftkv.ErrMemberRemoved):
		writeMessage(w, http.StatusGone, "Member permanently removed: "+id)
	case errors.Is(err, raftkv.ErrPeerURLExists):
		writeMessage(w, http.StatusConflict, raftkv.ErrPeerURLExists.Error())
	case errors.Is(err, raftkv.ErrIDExists):
		writeMessage(w, http.StatusConflict, raftkv.ErrIDExists.Error())
	default:
		h.membershipFailed(w, err, id)
	}
}

// membershipFailed logs a failed membership change and answers etcd's bare
// 500.
func (h *Handler) membershipFailed(w http.ResponseWriter, err error, id string) {
	h.logger.Warn("membership change failed", zap.String("member-id", id), zap.Error(err))
	writeMessage(w, http.StatusInternalServerError, "Internal Server Error")
}

// parseID reads an ID that memberIDFromPath formatted.
func parseID(s string) uint64 {
	id, _ := strconv.ParseUint(s, 16, 64)
	return id
}

// memberIDFromPath is etcd's getID: no ID is 405 (without an Allow
// header), an ID that is not hex is 404. The ID comes back formatted as
// etcd formats it (hex, no leading zeros).
func memberIDFromPath(w http.ResponseWriter, r *http.Request) (string, bool) {
	s := trimPrefix(r.URL.Path, membersPrefix)
	if s == "" {
		http.Error(w, "Method Not Allowed", http.StatusMethodNotAllowed)
		return "", false
	}
	id, err := strconv.ParseUint(s, 16, 64)
	if err != nil {
		writeMessage(w, http.StatusNotFound, "No such member: "+s)
		return "", false
	}
	return idString(id), true
}

// readPeerURLs is etcd's unmarshalRequest of a MemberCreateRequest or
// MemberUpdateRequest: JSON only, {"peerURLs": [...]}, each URL checked.
func readPeerURLs(w http.ResponseWriter, r *http.Request) ([]string, bool) {
	ctype := r.Header.Get("Content-Type")
	// etcd lowercases and trims only when there are parameters.
	if i := strings.Index(ctype, ";"); i != -1 {
		ctype = strings.TrimSpace(strings.ToLower(ctype[:i]))
	}
	if ctype != "application/json" {
		writeMessage(w, http.StatusUnsupportedMediaType,
			fmt.Sprintf("Bad Content-Type %s, accept application/json", ctype))
		return nil, false
	}
	b, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxRequestBytes))
	if err != nil {
		if _, ok := errors.AsType[*http.MaxBytesError](err); ok {
			writeMessage(w, http.StatusRequestEntityTooLarge, causeBodyTooLarge)
			return nil, false
		}
		writeMessage(w, http.StatusBadRequest, err.Error())
		return nil, false
	}
	var req struct {
		PeerURLs []string `json:"peerURLs"`
	}
	if err := json.Unmarshal(b, &req); err != nil {
		writeMessage(w, http.StatusBadRequest, err.Error())
		return nil, false
	}
	urls, err := raftkv.NormalizeURLs(req.PeerURLs)
	if err != nil {
		writeMessage(w, http.StatusBadRequest, err.Error())
		return nil, false
	}
	return urls, true
}

// peerURLTaken reports whether a member already has one of urls (etcd's
// ErrPeerURLexists).
func (h *Handler) peerURLTaken(r *http.Request, n *raftkv.Node, urls []string) bool {
	for _, m := range h.members(r, n) {
		for _, u := range m.PeerURLs {
			if slices.Contains(urls, u) {
				return true
			}
		}
	}
	return false
}

// trimPrefix is etcd's: the prefix and one slash after it go.
func trimPrefix(p, prefix string) string {
	return strings.TrimPrefix(strings.TrimPrefix(p, prefix), "/")
}

// serveMachines is etcd's machinesHandler: every member's client URLs,
// sorted, joined by ", ", as text.
func (h *Handler) serveMachines(w http.ResponseWriter, r *http.Request) {
	if !allowMethod(w, r, "GET", "HEAD") {
		return
	}
	n := h.node()
	if n == nil {
		writeMessage(w, http.StatusServiceUnavailable, errNotRunning)
		return
	}
	var urls []string
	for _, m := range h.members(r, n) {
		urls = append(urls, m.ClientURLs...)
	}
	sort.Strings(urls)
	body := strings.Join(urls, ", ")
	if body != "" {
		// What net/http sniffs for etcd's unlabelled body; set here so that
		// no middleware can change it.
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	}
	_, _ = io.WriteString(w, body)
}
