package caddymodule

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"

	"github.com/etcaddy/etcaddy/raftkv"
	"go.uber.org/zap"
)

// proxyConfigPath is etcd's v2 proxy's own endpoint: the client URLs it
// forwards to.
const proxyConfigPath = "/v2/config/local/proxy"

// hopHeaders are the hop-by-hop headers a proxy does not forward (RFC 9110
// 7.6.1, and etcd's httpproxy list).
var hopHeaders = []string{
	"Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization",
	"Proxy-Connection", "Te", "Trailer", "Transfer-Encoding", "Upgrade",
}

// serveProxied answers r for a member that runs as a proxy of its cluster
// (a discovery fallback), as etcd's v2 proxy does: the request goes to the
// cluster's client URLs in turn until one answers, an endpoint that cannot
// be reached is left out for a while, and the answer comes back as it is,
// flushed as it arrives (a watch's events too). No endpoint: 503 "zero
// endpoints currently available"; none answering: 502.
func (h *Handler) serveProxied(w http.ResponseWriter, r *http.Request, px *raftkv.Proxy) {
	if px.ReadOnly() && r.Method != http.MethodGet {
		// Became a proxy while this request waited for the member.
		w.WriteHeader(http.StatusNotImplemented)
		return
	}
	if r.URL.Path == proxyConfigPath {
		if !allowMethod(w, r, http.MethodGet) {
			return
		}
		eps := px.Endpoints()
		urls := make([]string, 0, len(eps))
		for _, u := range eps {
			urls = append(urls, u.String())
		}
		b, err := json.Marshal(struct {
			Endpoints []string `json:"endpoints"`
		}{urls})
		if err != nil {
			http.Error(w, "Internal Server Error", http.StatusInternalServerError)
			return
		}
		// etcd's json.Encoder: a newline, and the type Go sniffs.
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Write(append(b, '\n'))
		return
	}
	var body []byte
	if r.Body != nil && r.Body != http.NoBody {
		var err error
		body, err = io.ReadAll(http.MaxBytesReader(w, r.Body, maxRequestBytes))
		var tooBig *http.MaxBytesError
		switch {
		case errors.As(err, &tooBig):
			writeMessage(w, http.StatusRequestEntityTooLarge, causeBodyTooLarge)
			return
		case err != nil:
			writeMessage(w, http.StatusInternalServerError, "httpproxy: failed to read request body: "+err.Error())
			return
		}
	}
	px.WaitEndpoints(r.Context())
	eps := px.Endpoints()
	if len(eps) == 0 {
		writeMessage(w, http.StatusServiceUnavailable, "httpproxy: zero endpoints currently available")
		return
	}
	// The forwarded request ends with its client, and when Caddy exits (a
	// watch would hold Caddy's shutdown, whose grace period is unlimited by
	// default, as the member's own watches end then too).
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	defer context.AfterFunc(processExit, cancel)()
	for _, ep := range eps {
		out := r.Clone(ctx)
		out.RequestURI = ""
		out.URL.Scheme, out.URL.Host = ep.Scheme, ep.Host
		// The member's site matches its own host, not this one's.
		out.Host = ep.Host
		out.Body, out.ContentLength, out.GetBody = nil, int64(len(body)), nil
		if body != nil {
			out.Body = io.NopCloser(bytes.NewReader(body))
			// The transport may send it again on another connection when
			// a kept-alive one turns out closed before it took the request.
			out.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(body)), nil }
		}
		for _, k := range hopHeaders {
			out.Header.Del(k)
		}
		if ip, _, err := net.SplitHostPort(r.RemoteAddr); err == nil {
			if prior := r.Header.Values("X-Forwarded-For"); len(prior) > 0 {
				ip = strings.Join(prior, ", ") + ", " + ip
			}
			out.Header.Set("X-Forwarded-For", ip)
		}
		resp, err := px.Transport().RoundTrip(out)
		if ctx.Err() != nil {
			if err == nil {
				resp.Body.Close()
			}
			return // the client went away
		}
		if err != nil {
			h.logger.Info("proxy: failed to direct request", zap.String("endpoint", ep.String()), zap.Error(err))
			px.Failed(ep)
			continue
		}
		relay(w, resp)
		return
	}
	writeMessage(w, http.StatusBadGateway, fmt.Sprintf("httpproxy: unable to get response from %d endpoint(s)", len(eps)))
}

// relay writes resp to w, flushing each piece of the body as it comes.
func relay(w http.ResponseWriter, resp *http.Response) {
	defer resp.Body.Close()
	hdr := w.Header()
	for k, vs := range resp.Header {
		// This handler set its own CORS headers (etcd's proxy sends both
		// sets, each twice).
		if strings.HasPrefix(k, "Access-Control-") {
			continue
		}
		hdr[k] = vs
	}
	for _, k := range hopHeaders {
		hdr.Del(k)
	}
	w.WriteHeader(resp.StatusCode)
	rc := http.NewResponseController(w)
	_ = rc.Flush()
	buf := make([]byte, 32<<10)
	for {
		n, err := resp.Body.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return
			}
			_ = rc.Flush()
		}
		if err != nil {
			return
		}
	}
}
