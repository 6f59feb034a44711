package caddymodule

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"path"
	"reflect"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"go.uber.org/zap"

	"github.com/etcaddy/etcaddy/raftkv"
	"github.com/etcaddy/etcaddy/storage"
)

const (
	// maxRequestBytes bounds a request body. It is etcd's default
	// --max-request-bytes (1.5 MiB), the largest request etcd lets into
	// its Raft log. etcd 3.4's v2 handler itself reads form bodies up to
	// Go's 10 MB ParseForm limit; etcaddy keeps every log entry within
	// etcd's bound instead, and says so with a 413.
	maxRequestBytes = 3 << 19 // 1.5 MiB

	// maxKeyBytes bounds a key. etcd has no limit of its own short of the
	// URL length; a key is a bbolt key here, and one longer than any
	// sane path is refused rather than stored.
	maxKeyBytes = 8 << 10

	causeBodyTooLarge = "request body is larger than 1.5 MiB (etcd's --max-request-bytes)"
)

// keyRequest is a parsed and validated /v2/keys request.
type keyRequest struct {
	method           string
	key              string // clean, absolute, without the /v2/keys prefix
	value            string
	dir              bool
	prevValue        string
	prevIndex        uint64
	prevExist        *bool
	wait             bool
	waitIndex        uint64
	recursive        bool
	sorted           bool
	quorum           bool
	stream           bool
	refresh          *bool
	ttl              *uint64 // nil: no TTL (absent or empty)
	noValueOnSuccess bool
}

// parseKeyRequest parses and validates a /v2/keys request in exactly the
// order of etcd 3.4's parseKeyRequest (v2http/client.go), so that a request
// with several bad fields gets the same error as from etcd. Fields come
// from r.Form: for PUT and POST a form-urlencoded body's values come first,
// so the body beats the query string, and the first value of a repeated
// field wins. A GET or DELETE body is never read (Go parses bodies only for
// POST, PUT and PATCH). Every error has index 0.
func parseKeyRequest(r *http.Request) (*keyRequest, *storage.Error) {
	var form url.Values
	switch r.Method {
	case http.MethodPost, http.MethodPut, http.MethodPatch:
		if err := r.ParseForm(); err != nil {
			if _, ok := errors.AsType[*http.MaxBytesError](err); ok {
				return nil, storage.NewError(storage.EcodeInvalidForm, causeBodyTooLarge, 0)
			}
			return nil, storage.NewError(storage.EcodeInvalidForm, err.Error(), 0)
		}
		form = r.Form
	default:
		// For any other method ParseForm is url.ParseQuery of the query
		// string (same values, same error) plus maps and copies a read
		// does not need; no query at all is an empty form.
		if r.URL.RawQuery != "" {
			var err error
			if form, err = url.ParseQuery(r.URL.RawQuery); err != nil {
				return nil, storage.NewError(storage.EcodeInvalidForm, err.Error(), 0)
			}
		}
	}
	if !strings.HasPrefix(r.URL.Path, keysPrefix) {
		return nil, storage.NewError(storage.EcodeInvalidForm, "incorrect key prefix", 0)
	}
	// etcd's path.Join("/", rest), without its copy: path.Clean returns
	// an already clean path (what ServeHTTP lets through) as it is.
	key := r.URL.Path[len(keysPrefix):]
	if !strings.HasPrefix(key, "/") {
		key = "/" + key
	}
	kr := &keyRequest{
		method: r.Method,
		key:    path.Clean(key),
	}

	var err error
	if kr.prevIndex, err = formUint(form, "prevIndex"); err != nil {
		return nil, storage.NewError(storage.EcodeIndexNaN, `invalid value for "prevIndex"`, 0)
	}
	if kr.waitIndex, err = formUint(form, "waitIndex"); err != nil {
		return nil, storage.NewError(storage.EcodeIndexNaN, `invalid value for "waitIndex"`, 0)
	}
	for _, f := range []struct {
		name string
		dst  *bool
	}{
		{"recursive", &kr.recursive},
		{"sorted", &kr.sorted},
		{"wait", &kr.wait},
		{"dir", &kr.dir},
		{"quorum", &kr.quorum},
		{"stream", &kr.stream},
	} {
		if *f.dst, err = formBool(form, f.name); err != nil {
			return nil, storage.NewError(storage.EcodeInvalidField, fmt.Sprintf("invalid value for %q", f.name), 0)
		}
	}
	if kr.wait && r.Method != http.MethodGet {
		return nil, storage.NewError(storage.EcodeInvalidField, `"wait" can only be used with GET requests`, 0)
	}

	kr.prevValue = form.Get("prevValue")
	if _, ok := form["prevValue"]; ok && kr.prevValue == "" {
		return nil, storage.NewError(storage.EcodePrevValueRequired, `"prevValue" cannot be empty`, 0)
	}
	if kr.noValueOnSuccess, err = formBool(form, "noValueOnSuccess"); err != nil {
		return nil, storage.NewError(storage.EcodeInvalidField, `invalid value for "noValueOnSuccess"`, 0)
	}

	// An empty ttl is no TTL at all: on an update it removes the key's.
	if form.Get("ttl") != "" {
		ttl, err := formUint(form, "ttl")
		if err != nil {
			return nil, storage.NewError(storage.EcodeTTLNaN, `invalid value for "ttl"`, 0)
		}
		kr.ttl = &ttl
	}

	// prevExist and refresh are tri-state: absent is not false. Their
	// causes are unquoted in etcd, unlike the other fields'.
	if _, ok := form["prevExist"]; ok {
		b, err := formBool(form, "prevExist")
		if err != nil {
			return nil, storage.NewError(storage.EcodeInvalidField, "invalid value for prevExist", 0)
		}
		kr.prevExist = &b
	}
	kr.value = form.Get("value")
	if _, ok := form["refresh"]; ok {
		b, err := formBool(form, "refresh")
		if err != nil {
			return nil, storage.NewError(storage.EcodeInvalidField, "invalid value for refresh", 0)
		}
		kr.refresh = &b
		if b {
			if kr.value != "" {
				return nil, storage.NewError(storage.EcodeRefreshValue, "A value was provided on a refresh", 0)
			}
			if kr.ttl == nil {
				return nil, storage.NewError(storage.EcodeRefreshTTLRequired, "No TTL value set", 0)
			}
		}
	}

	// Checks of etcaddy's own, after all of etcd's: etcd stores any bytes
	// and answers with U+FFFD in their place, which no client can address
	// again; an oversized key would only bloat every listing.
	if !utf8.ValidString(kr.key) {
		return nil, storage.NewError(storage.EcodeInvalidField, "key is not valid UTF-8", 0)
	}
	if len(kr.key) > maxKeyBytes {
		return nil, storage.NewError(storage.EcodeInvalidField, fmt.Sprintf("key is longer than %d bytes", maxKeyBytes), 0)
	}
	return kr, nil
}

// formUint is etcd's getUint64: absent is 0, else the first value must
// parse.
func formUint(form url.Values, key string) (uint64, error) {
	if vals, ok := form[key]; ok {
		return strconv.ParseUint(vals[0], 10, 64)
	}
	return 0, nil
}

// formBool is etcd's getBool: absent is false, else the first value must
// parse with strconv.ParseBool, which refuses an empty value.
func formBool(form url.Values, key string) (bool, error) {
	if vals, ok := form[key]; ok {
		return strconv.ParseBool(vals[0])
	}
	return false, nil
}

// expiration turns a TTL into the absolute expiration, in unix
// nanoseconds, that goes into the Raft log: time enters the state only
// through log entries, decided by the member that got the request.
//
// It is bug-compatible with etcd 3.4, which computes
// now.Add(time.Duration(ttl)*time.Second).UnixNano(): a TTL too large for a
// Duration wraps around (ttl=18446744073709551615 is -1 s: the key expires
// at once and the response says "ttl":-1), and an expiration that lands
// before 2000 makes set and create keep the key forever (the store applies
// etcd's minExpireTime rule). Rejecting such TTLs would be saner, but
// clients that send them get what etcd gives them.
func expiration(ttl *uint64, now time.Time) int64 {
	if ttl == nil {
		return 0
	}
	return now.UnixNano() + int64(time.Duration(*ttl)*time.Second)
}

// storageRequest is the write a parsed request proposes.
func (kr *keyRequest) storageRequest(now time.Time) storage.Request {
	return storage.Request{
		Method:     kr.method,
		Path:       kr.key,
		Val:        kr.value,
		Dir:        kr.dir,
		PrevValue:  kr.prevValue,
		PrevIndex:  kr.prevIndex,
		PrevExist:  kr.prevExist,
		Expiration: expiration(kr.ttl, now),
		Recursive:  kr.recursive,
		Refresh:    kr.refresh != nil && *kr.refresh,
	}
}

// serveKeys is etcd's keysHandler.ServeHTTP. hv holds the response's
// header values (see ServeHTTP).
func (h *Handler) serveKeys(w http.ResponseWriter, r *http.Request, hv *headerValues) {
	switch r.Method {
	case http.MethodHead, http.MethodGet, http.MethodPut, http.MethodPost, http.MethodDelete:
	default:
		allowMethod(w, r, "HEAD", "GET", "PUT", "POST", "DELETE")
		return
	}
	n := h.node()
	if n == nil {
		writeKeyErrorStatus(w, hv, http.StatusServiceUnavailable,
			storage.NewError(storage.EcodeRaftInternal, errNotRunning, 0))
		return
	}
	st := n.Status()
	hv.set(w.Header(), "X-Etcd-Cluster-Id", h.clusterIDText(st.ClusterID))

	if r.Method == http.MethodPut || r.Method == http.MethodPost {
		r.Body = http.MaxBytesReader(w, r.Body, maxRequestBytes)
	}
	kr, perr := parseKeyRequest(r)
	if perr != nil {
		status := perr.StatusCode()
		if perr.Cause == causeBodyTooLarge {
			status = http.StatusRequestEntityTooLarge
		}
		writeKeyErrorStatus(w, hv, status, perr)
		return
	}
	switch ok, err := h.keyAccess(r, n, r.URL.Path[len(keysPrefix):], kr.recursive); {
	case err != nil:
		writeKeyErrorStatus(w, hv, http.StatusServiceUnavailable,
			storage.NewError(storage.EcodeRaftInternal, errNotRunning, 0))
		return
	case !ok:
		writeKeyErrorStatus(w, hv, http.StatusUnauthorized,
			storage.NewError(storage.EcodeUnauthorized, errInsufficientCredentials, 0))
		return
	}

	// Every request that waits on Raft gets etcd's request timeout; a
	// client that goes away ends the wait early (the write may still be
	// applied, as in etcd). A plain read answers from the local store at
	// once, and a watch has no deadline (etcd's is MaxInt64): neither
	// needs the timer.
	var (
		ev  *storage.Event
		err error
	)
	switch r.Method {
	case http.MethodGet, http.MethodHead:
		// etcd turns a quorum GET into a read through Raft (QGET) before
		// it looks at wait: with quorum=true, wait, waitIndex and stream
		// are ignored and the answer comes at once.
		if kr.wait && !kr.quorum {
			h.serveWatch(w, r, n, kr, hv)
			return
		}
		// A HEAD is always a local read in etcd (only GET becomes QGET).
		quorum := kr.quorum && r.Method == http.MethodGet
		ctx := r.Context()
		if quorum {
			var cancel context.CancelFunc
			ctx, cancel = h.requestContext(r)
			defer cancel()
		}
		ev, err = n.Get(ctx, kr.key, kr.recursive, kr.sorted, quorum)
		if quorum {
			st = n.Status()
		}
	default:
		ctx, cancel := h.requestContext(r)
		defer cancel()
		ev, err = n.Do(ctx, kr.storageRequest(time.Now()))
		st = n.Status()
	}
	if err == nil && ev == nil {
		err = errors.New("received response with no Event/Watcher") // etcd's text for the same impossibility
	}
	if err != nil {
		h.writeKeyError(w, hv, err)
		return
	}
	writeKeyEvent(w, hv, ev, st, kr.noValueOnSuccess)
}

// serveWatch is etcd's handleKeyWatch: headers go out at once (a long
// poll's client must see them before any event), then the first matching
// event, or every one with stream=true, each flushed, until the watch ends
// or the client goes away. The request's own goroutine does all of it.
func (h *Handler) serveWatch(w http.ResponseWriter, r *http.Request, n *raftkv.Node, kr *keyRequest, hv *headerValues) {
	wa, err := n.Watch(kr.key, kr.recursive, kr.stream, kr.waitIndex)
	if err != nil {
		h.writeKeyError(w, hv, err)
		return
	}
	defer wa.Remove()
	w = underEncoder(w)
	st := n.Status()
	hdr := w.Header()
	hv.set(hdr, "Content-Type", "application/json")
	hv.set(hdr, "X-Etcd-Index", strconv.FormatUint(wa.StartIndex, 10))
	hv.set(hdr, "X-Raft-Index", strconv.FormatUint(st.RaftIndex, 10))
	hv.set(hdr, "X-Raft-Term", strconv.FormatUint(st.Term, 10))
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	_ = rc.Flush()

	var buf []byte
	for {
		select {
		case <-r.Context().Done():
			return
		case <-processExit.Done():
			abortWatch()
		case ev, ok := <-wa.EventChan:
			if !ok {
				if wa.Ended() {
					abortWatch()
				}
				// A streaming watcher that fell behind (100 events
				// unread): its response ends, and its client can watch
				// again from the last index it saw. etcd's hub drops such
				// a watcher too, but leaves its response open with nothing
				// more to come.
				return
			}
			// An event encoding/json would refuse ends the watch, as
			// json.Encoder's error did.
			if buf, err = appendEvent(buf[:0], ev); err != nil {
				return
			}
			if _, err := w.Write(buf); err != nil {
				return
			}
			if !kr.stream {
				return
			}
			if err := rc.Flush(); err != nil {
				return
			}
		}
	}
}

// underEncoder returns the writer beneath Caddy's encode handler when w is
// one (a site with `encode` before `etcd`), else w. The encoder holds the
// headers back until the first body write and ignores flushes until then,
// where a watch's client (and any proxy's response-header timeout) must
// see them at once, and it would compress the stream, which etcd never
// does. Left alone, it writes nothing more: its status was never set.
func underEncoder(w http.ResponseWriter) http.ResponseWriter {
	for {
		u, ok := w.(interface{ Unwrap() http.ResponseWriter })
		if !ok || reflect.TypeOf(w).String() != "*encode.responseWriter" {
			return w
		}
		w = u.Unwrap()
	}
}

// abortWatch cuts the connection of a watch whose member stopped (removed,
// stopped by a failure) or whose Caddy exits, as an etcd member's exit
// cuts its watchers': the client sees a broken response, not the end of
// an empty one, and moves on to another member as from a member that is
// down (python-etcd with allow_reconnect, the Go client). net/http closes
// the connection (HTTP/1) or resets the stream (HTTP/2, HTTP/3) and logs
// nothing; Caddy's access log, when on, shows the request with duration 0,
// as for its own reverse_proxy's aborts.
func abortWatch() { panic(http.ErrAbortHandler) }

// writeKeyEvent is etcd's writeKeyEvent: 201 for a node created by set or
// create, 200 otherwise; X-Etcd-Index is the store index after the
// operation, X-Raft-* the member's Raft state after it.
func writeKeyEvent(w http.ResponseWriter, hv *headerValues, ev *storage.Event, st raftkv.Status, noValueOnSuccess bool) {
	hdr := w.Header()
	hv.set(hdr, "Content-Type", "application/json")
	hv.set(hdr, "X-Etcd-Index", strconv.FormatUint(ev.EtcdIndex, 10))
	hv.set(hdr, "X-Raft-Index", strconv.FormatUint(st.RaftIndex, 10))
	hv.set(hdr, "X-Raft-Term", strconv.FormatUint(st.Term, 10))
	status := http.StatusOK
	if ev.Action == storage.ActionCreate || (ev.Action == storage.ActionSet && ev.PrevNode == nil) {
		status = http.StatusCreated
	}
	out := ev
	if noValueOnSuccess {
		switch ev.Action {
		case storage.ActionSet, storage.ActionCompareAndSwap, storage.ActionCreate, storage.ActionUpdate:
			// A copy: ev may be the one the store keeps in its history.
			out = &storage.Event{Action: ev.Action}
		}
	}
	// An expiration time.Time cannot marshal: json.Encoder wrote nothing
	// after the headers, and neither does this. It is looked for first: a
	// large listing goes out in pieces as it is encoded (see spillAt).
	if checkTimes(out.Node) != nil || checkTimes(out.PrevNode) != nil {
		w.WriteHeader(status)
		return
	}
	bp := getBuf()
	defer putBuf(bp)
	started := false
	b, _ := appendEventSpilling(*bp, out, func(b []byte) []byte {
		if !started {
			w.WriteHeader(status)
			started = true
		}
		if _, err := w.Write(b); err != nil {
			// The client went away: nothing more to encode.
			panic(http.ErrAbortHandler)
		}
		return b[:0]
	})
	*bp = b
	if started {
		_, _ = w.Write(b)
		return
	}
	// A HEAD response's body is dropped by net/http, which still
	// announces its length, as for etcd.
	writeBody(w, status, b)
}

// writeBody writes a whole body at once. net/http announces its length
// itself when the handler is done, as for etcd (a body too large for its
// buffer goes chunked, as etcd's does): a Content-Length set here would
// be a ninth header, which makes the header map, and the copy net/http
// takes of it, a larger table and costs more than it saves.
func writeBody(w http.ResponseWriter, status int, b []byte) {
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

// writeKeyError writes an error from the node: a v2 error as is, anything
// else as etcd's 500 "Raft Internal Error" with the error's text.
func (h *Handler) writeKeyError(w http.ResponseWriter, hv *headerValues, err error) {
	if e, ok := errors.AsType[*storage.Error](err); ok {
		writeKeyErrorStatus(w, hv, e.StatusCode(), e)
		return
	}
	cause := err.Error()
	if errors.Is(err, raftkv.ErrStopped) {
		cause = errNotRunning
	}
	if !errors.Is(err, raftkv.ErrTimeout) && !errors.Is(err, raftkv.ErrStopped) {
		h.logger.Warn("unexpected v2 response error", zap.Error(err))
	}
	e := storage.NewError(storage.EcodeRaftInternal, cause, 0)
	writeKeyErrorStatus(w, hv, e.StatusCode(), e)
}

// writeKeyErrorStatus is etcd's v2error.Error.WriteTo, with the status
// given: only X-Etcd-Index (the error's index), the JSON and a newline.
func writeKeyErrorStatus(w http.ResponseWriter, hv *headerValues, status int, e *storage.Error) {
	hdr := w.Header()
	hv.set(hdr, "X-Etcd-Index", strconv.FormatUint(e.Index, 10))
	hv.set(hdr, "Content-Type", "application/json")
	bp := getBuf()
	defer putBuf(bp)
	*bp = appendKeyError(*bp, e)
	writeBody(w, status, *bp)
}
