package caddymodule

import (
	"io"
	"net/http"
	"strings"
	"sync/atomic"
)

// closeUnlessBodyRead is for an HTTP/1.x request with a body and Expect:
// 100-continue. When the answer leaves the body unread (a GET or DELETE
// with a body, a refused method or media type, a read-only proxy's 501),
// Go's server answers at once and closes the connection, as etcd does: the
// client never got its 100 Continue and may still send the body. But the
// server recognizes that case by the request body's own type, which
// Caddy's idle-timeout reader (on by default) hides: it would read the
// body first, before it writes the answer, while the client holds the body
// back until the 100 Continue that never comes. Both would wait until a
// timeout cuts the connection with no answer. Connection: close on the
// answer lets it go out at once, with what etcd's carries.
func closeUnlessBodyRead(w http.ResponseWriter, r *http.Request) http.ResponseWriter {
	if r.ProtoMajor != 1 || r.ContentLength == 0 || r.Body == nil || r.Body == http.NoBody || !expectsContinue(r) {
		return w
	}
	b := &eofBody{ReadCloser: r.Body}
	r.Body = b
	return &closeUnlessReadWriter{ResponseWriter: w, body: b}
}

func expectsContinue(r *http.Request) bool {
	for _, v := range r.Header["Expect"] {
		for t := range strings.SplitSeq(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), "100-continue") {
				return true
			}
		}
	}
	return false
}

// eofBody is a request body that records whether it was read to its end.
type eofBody struct {
	io.ReadCloser
	eof atomic.Bool
}

func (b *eofBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err == io.EOF {
		b.eof.Store(true)
	}
	return n, err
}

// closeUnlessReadWriter adds Connection: close to an answer written while
// its request's body is unread.
type closeUnlessReadWriter struct {
	http.ResponseWriter
	body        *eofBody
	wroteHeader bool
}

func (w *closeUnlessReadWriter) WriteHeader(code int) {
	if !w.wroteHeader && code >= 200 {
		w.wroteHeader = true
		if !w.body.eof.Load() {
			w.Header().Set("Connection", "close")
		}
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *closeUnlessReadWriter) Write(p []byte) (int, error) {
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	return w.ResponseWriter.Write(p)
}

// Unwrap lets http.ResponseController reach the writer beneath (a watch's
// flushes).
func (w *closeUnlessReadWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
