package caddymodule

// The differential test: the same requests, in the same order, to a fresh real etcd 3.4 and
// a fresh etcaddy, answers compared after normalizing what legitimately differs between
// two servers (absolute indexes, times, IDs, URLs, the order of unsorted listings).

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/url"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// cmpMode says how much of a JSON body must match.
type cmpMode int

const (
	cmpExact  cmpMode = iota // values, after index/time/ID normalization
	cmpSorted                // as cmpExact, but "nodes" order matters (sorted=true)
	cmpShape                 // keys and value types only (stats, version)
)

// diffSide is one server with what the test learned about it.
type diffSide struct {
	p    *proc
	base uint64            // store index when the test started
	vars map[string]string // saved values, see differ.expand
	// reference marks real etcd, whose stream watchers get a recursive
	// directory delete twice (etcd-io/etcd v2 watcher hub quirk). etcaddy
	// delivers every event exactly once, so the reference's immediate
	// repeats are dropped before comparing; etcaddy's never are.
	reference bool
	// route, when set, picks the member each request goes to (a cluster); p otherwise.
	route func() *proc
}

// answer is one server's normalized response.
type answer struct {
	status  int
	headers map[string]string // the compared headers, normalized
	body    any               // normalized JSON values (a []any of documents) or a string
	raw     string            // for messages
}

// differ runs each step on both servers, etcd first, and compares.
type differ struct {
	t          *testing.T
	ref, sub   *diffSide
	steps      int
	mismatches int
	watches    map[string]*[2]*pendingWatch
	transcript io.Writer // every step and both answers, when ETCADDY_DIFF_TRANSCRIPT names a file
}

func newDiffer(t *testing.T, ref, sub *proc) *differ {
	d := &differ{t: t, watches: map[string]*[2]*pendingWatch{}}
	d.ref = &diffSide{p: ref, vars: map[string]string{}, reference: true}
	d.sub = &diffSide{p: sub, vars: map[string]string{}}
	for _, s := range d.sides() {
		_, h, _ := s.p.do(t, "GET", "/v2/keys/", nil)
		b, err := strconv.ParseUint(h.Get("X-Etcd-Index"), 10, 64)
		if err != nil {
			t.Fatalf("%s: no X-Etcd-Index on GET /v2/keys/: %v", s.p.Name, err)
		}
		s.base = b
		s.vars["base"] = strconv.FormatUint(b, 10)
	}
	t.Logf("base indexes: %s %d, %s %d", ref.Name, d.ref.base, sub.Name, d.sub.base)
	if path := os.Getenv("ETCADDY_DIFF_TRANSCRIPT"); path != "" {
		f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(f, "######## %s\n", t.Name())
		t.Cleanup(func() { f.Close() })
		d.transcript = f
	}
	return d
}

func (d *differ) sides() []*diffSide { return []*diffSide{d.ref, d.sub} }

// varRef matches ${name}, ${name.field} and ${name.field+N} / ${name.field-N}.
var varRef = regexp.MustCompile(`\$\{([A-Za-z0-9_.]+)([+-]\d+)?\}`)

// expand replaces ${…} references by this server's saved values: ${base} is its starting
// index; ${x.key}, ${x.index}, ${x.created}, ${x.etcd} are node.key, node.modifiedIndex,
// node.createdIndex and X-Etcd-Index of the answer saved as x. Numbers take +N/-N.
func (s *diffSide) expand(in string) (string, error) {
	var err error
	out := varRef.ReplaceAllStringFunc(in, func(m string) string {
		sm := varRef.FindStringSubmatch(m)
		v, ok := s.vars[sm[1]]
		if !ok {
			err = fmt.Errorf("%s: %s is not saved (its step failed?)", s.p.Name, sm[1])
			return m
		}
		if sm[2] == "" {
			return v
		}
		n, e1 := strconv.ParseInt(v, 10, 64)
		delta, e2 := strconv.ParseInt(sm[2], 10, 64)
		if e1 != nil || e2 != nil {
			err = fmt.Errorf("%s: %s=%q is not a number", s.p.Name, sm[1], v)
			return m
		}
		return strconv.FormatInt(n+delta, 10)
	})
	return out, err
}

func (s *diffSide) expandForm(form url.Values) (url.Values, error) {
	if form == nil {
		return nil, nil
	}
	out := url.Values{}
	for k, vs := range form {
		for _, v := range vs {
			e, err := s.expand(v)
			if err != nil {
				return nil, err
			}
			out.Add(k, e)
		}
	}
	return out, nil
}

// save records node.key, node.modifiedIndex, node.createdIndex and X-Etcd-Index as name.*.
func (s *diffSide) save(name string, h http.Header, body []byte) {
	if x := h.Get("X-Etcd-Index"); x != "" {
		s.vars[name+".etcd"] = x
	}
	var ev struct {
		Node *struct {
			Key           string `json:"key"`
			ModifiedIndex uint64 `json:"modifiedIndex"`
			CreatedIndex  uint64 `json:"createdIndex"`
		} `json:"node"`
	}
	if json.Unmarshal(body, &ev) != nil || ev.Node == nil {
		return
	}
	s.vars[name+".key"] = ev.Node.Key
	s.vars[name+".index"] = strconv.FormatUint(ev.Node.ModifiedIndex, 10)
	s.vars[name+".created"] = strconv.FormatUint(ev.Node.CreatedIndex, 10)
}

// step is one request of the script.
type step struct {
	method, path string
	form         url.Values // body on PUT/POST, query otherwise (see proc.newRequest)
	ctype, body  string     // a raw body instead of form (ctype empty: no Content-Type)
	raw          bool       // send body/ctype as they are
	mode         cmpMode
	save         string
	auth         string // "user:password" for basic auth; empty: none
}

func (d *differ) req(method, path string, form url.Values) {
	d.run(step{method: method, path: path, form: form})
}

func (d *differ) sorted(method, path string, form url.Values) {
	d.run(step{method: method, path: path, form: form, mode: cmpSorted})
}

func (d *differ) shape(method, path string) { d.run(step{method: method, path: path, mode: cmpShape}) }

func (d *differ) saveAs(name, method, path string, form url.Values) {
	d.run(step{method: method, path: path, form: form, save: name})
}

func (d *differ) rawBody(method, path, ctype, body string) {
	d.run(step{method: method, path: path, ctype: ctype, body: body, raw: true})
}

// as sends a raw JSON body (none when empty) with basic auth as user ("name:password",
// empty: no Authorization header).
func (d *differ) as(user, method, path, body string) {
	st := step{method: method, path: path, auth: user, raw: true, body: body}
	if body != "" {
		st.ctype = "application/json"
	}
	d.run(st)
}

// asForm sends a form request (see req) with basic auth as user.
func (d *differ) asForm(user, method, path string, form url.Values) {
	d.run(step{method: method, path: path, form: form, auth: user})
}

// firstMemberOnly sends the requests to the first member (p) until the returned
// function puts the route back.
func (s *diffSide) firstMemberOnly() (restore func()) {
	route := s.route
	s.route = nil
	return func() { s.route = route }
}

// send performs st on one server and returns the raw answer.
func (s *diffSide) send(ctx context.Context, st step) (string, *http.Response, []byte, error) {
	path, err := s.expand(st.path)
	if err != nil {
		return "", nil, nil, err
	}
	p := s.p
	if s.route != nil {
		p = s.route()
	}
	var req *http.Request
	if st.raw {
		req, err = http.NewRequestWithContext(ctx, st.method, p.ClientURL+path, strings.NewReader(st.body))
		if err == nil && st.ctype != "" {
			req.Header.Set("Content-Type", st.ctype)
		}
	} else {
		var form url.Values
		if form, err = s.expandForm(st.form); err != nil {
			return path, nil, nil, err
		}
		req, err = p.newRequest(ctx, st.method, path, form)
	}
	if err != nil {
		return path, nil, nil, err
	}
	if name, password, ok := strings.Cut(st.auth, ":"); ok {
		req.SetBasicAuth(name, password)
	}
	desc := st.method + " " + path
	if st.auth != "" {
		desc = "(as " + st.auth + ") " + desc
	}
	if p != s.p {
		desc = p.Name + ": " + desc
	}
	if req.URL.RawQuery != "" && !strings.Contains(path, "?") {
		desc += "?" + req.URL.RawQuery
	}
	if st.raw {
		desc += fmt.Sprintf("  [Content-Type %q, body %q]", st.ctype, st.body)
	} else if (st.method == "PUT" || st.method == "POST") && st.form != nil {
		f, _ := s.expandForm(st.form)
		desc += "  [body " + f.Encode() + "]"
	}
	resp, err := testClient.Do(req)
	if err != nil {
		return desc, nil, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return desc, resp, body, err
}

func (d *differ) run(st step) {
	d.t.Helper()
	d.steps++
	var ans [2]*answer
	var descs [2]string
	for i, s := range d.sides() {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		desc, resp, body, err := s.send(ctx, st)
		cancel()
		descs[i] = desc
		if err != nil {
			ans[i] = &answer{raw: "transport error: " + err.Error()}
			continue
		}
		if st.save != "" {
			s.save(st.save, resp.Header, body)
		}
		// How the body was framed: a length announced, or chunks (a large
		// answer, written in pieces or at once).
		framing := "length"
		if resp.ContentLength < 0 {
			framing = "chunked"
		}
		size := int64(len(body))
		if resp.Request.Method == http.MethodHead {
			// No body: the length announced, or past 2 KiB when none.
			size = resp.ContentLength
			if size < 0 {
				size = goWholeBody + 1
			}
		}
		if (framing == "chunked") == (size > goWholeBody) {
			// Go's server chose it by the body's size, which the absolute
			// indexes in it make differ a little: whether a listing near
			// 2 KiB goes as chunks says nothing of either server. A body
			// framed otherwise (a stream flushed early) shows as it is.
			framing = "by size"
		}
		resp.Header.Set(framingHeader, framing)
		ans[i] = s.normalize(resp.StatusCode, resp.Header, body, st.mode)
	}
	if strings.HasPrefix(ans[0].raw, "transport error: ") && strings.HasPrefix(ans[1].raw, "transport error: ") {
		// Alike, but nothing was compared: say so, as a step that found no
		// answer on either side (a watch with no event to come) tests nothing.
		d.t.Logf("step %d: no answer from either side: %s", d.steps, descs[0])
	}
	d.compare(descs, ans)
}

// compare reports a difference between the two answers, with the request and both answers.
func (d *differ) compare(descs [2]string, ans [2]*answer) {
	d.t.Helper()
	diffs := diffAnswers(ans[0], ans[1])
	if d.transcript != nil {
		fmt.Fprintf(d.transcript, "### step %d: %s\n%s\n--- %s:\n%s\n", d.steps, descs[0], ans[0].raw, d.sub.p.Name, ans[1].raw)
		if len(diffs) > 0 {
			fmt.Fprintf(d.transcript, "--- DIFFERENCES:\n%s\n", strings.Join(diffs, "\n"))
		}
	}
	if len(diffs) == 0 {
		return
	}
	d.mismatches++
	d.t.Errorf("step %d differs:\n  %s: %s\n  %s: %s\n  differences:\n    %s\n  %s answered:\n%s\n  %s answered:\n%s",
		d.steps, d.ref.p.Name, descs[0], d.sub.p.Name, descs[1], strings.Join(diffs, "\n    "),
		d.ref.p.Name, indent(ans[0].raw), d.sub.p.Name, indent(ans[1].raw))
	if d.mismatches >= 25 {
		d.t.Fatalf("stopping after %d differing steps (of %d)", d.mismatches, d.steps)
	}
}

func indent(s string) string {
	if len(s) > 3000 {
		s = s[:3000] + "…(truncated)"
	}
	return "    " + strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n    ")
}

// comparedHeaders are compared by value after normalization; presenceHeaders only by presence.
var (
	comparedHeaders = []string{"Content-Type", "X-Etcd-Index", "Allow", "Location",
		"Access-Control-Allow-Origin", "Access-Control-Allow-Methods", "Access-Control-Allow-Headers", framingHeader}
	presenceHeaders = []string{"X-Raft-Index", "X-Raft-Term", "X-Etcd-Cluster-Id"}
)

// framingHeader is not sent by either server: the differ sets it on each
// response it reads to the body's framing: "by size" when it is framed as
// Go's server frames what a handler writes and returns (with its length
// when the body fits the buffer of goWholeBody bytes it holds before it
// sends anything, else in chunks), else "length" or "chunked".
const (
	framingHeader = "X-Test-Framing"
	goWholeBody   = 2048 // net/http's bufferBeforeChunkingSize
)

// rel turns an absolute index of this server into one relative to its start; 0 stays 0
// (etcd reports index 0 on parameter errors).
func (s *diffSide) rel(v uint64) int64 {
	if v == 0 {
		return 0
	}
	return int64(v) - int64(s.base)
}

var (
	inOrderName = regexp.MustCompile(`\b\d{20}\b`)
	causeCAS    = regexp.MustCompile(`\[(\d+) != (\d+)\]`) // "[prevIndex != modifiedIndex]"
	causeClear  = regexp.MustCompile(`\[(\d+)/(\d+)\]`)    // "[historyStart/waitIndex]"
)

// relText rewrites the indexes a string can carry: in-order key names (%020d of an index)
// and the index pairs of error causes. Values compared by CAS must not be numeric in the
// script: "[1 != 2]" would read as indexes.
func (s *diffSide) relText(v string) string {
	v = inOrderName.ReplaceAllStringFunc(v, func(m string) string {
		n, _ := strconv.ParseUint(m, 10, 64)
		return fmt.Sprintf("%020d", s.rel(n))
	})
	relPair := func(re *regexp.Regexp, format string) func(string) string {
		return func(m string) string {
			sm := re.FindStringSubmatch(m)
			a, _ := strconv.ParseUint(sm[1], 10, 64)
			b, _ := strconv.ParseUint(sm[2], 10, 64)
			return fmt.Sprintf(format, s.rel(a), s.rel(b))
		}
	}
	v = causeCAS.ReplaceAllStringFunc(v, relPair(causeCAS, "[%d != %d]"))
	v = causeClear.ReplaceAllStringFunc(v, relPair(causeClear, "[%d/%d]"))
	return strings.ReplaceAll(v, s.p.ClientURL, "<client-url>")
}

func (s *diffSide) normalize(status int, h http.Header, body []byte, mode cmpMode) *answer {
	a := &answer{status: status, headers: map[string]string{}}
	var raw strings.Builder
	fmt.Fprintf(&raw, "HTTP %d\n", status)
	for _, k := range append(append([]string{}, comparedHeaders...), presenceHeaders...) {
		if v, ok := h[k]; ok {
			fmt.Fprintf(&raw, "%s: %s\n", k, strings.Join(v, ", "))
		}
	}
	raw.Write(body)
	a.raw = raw.String()

	for _, k := range comparedHeaders {
		if _, ok := h[k]; !ok {
			continue
		}
		v := h.Get(k)
		if k == "X-Etcd-Index" {
			if n, err := strconv.ParseUint(v, 10, 64); err == nil {
				v = strconv.FormatInt(s.rel(n), 10)
			}
		}
		a.headers[k] = v
	}
	for _, k := range presenceHeaders {
		if _, ok := h[k]; ok {
			a.headers[k] = "(present)"
		}
	}

	// Bodies are one JSON document (a stream watch: several) or text.
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	var docs []any
	for {
		var v any
		err := dec.Decode(&v)
		if err == io.EOF {
			break
		}
		if err != nil {
			docs = nil
			break
		}
		docs = append(docs, s.normJSON("", v, mode))
	}
	if docs != nil {
		a.body = docs
	} else {
		a.body = s.relText(string(body))
	}
	return a
}

// normJSON normalizes one JSON value; key is the object key it sits under.
func (s *diffSide) normJSON(key string, v any, mode cmpMode) any {
	switch x := v.(type) {
	case map[string]any:
		out := map[string]any{}
		for k, e := range x {
			out[k] = s.normJSON(k, e, mode)
		}
		return out
	case []any:
		out := make([]any, len(x))
		for i, e := range x {
			out[i] = s.normJSON(key, e, mode)
		}
		if key == "nodes" && mode != cmpSorted {
			// Unsorted listings come in Go map order on etcd: compare them as sets.
			sort.SliceStable(out, func(i, j int) bool { return nodeKey(out[i]) < nodeKey(out[j]) })
		}
		return out
	case json.Number:
		if mode == cmpShape {
			return "<number>"
		}
		switch key {
		case "modifiedIndex", "createdIndex", "index":
			if n, err := strconv.ParseUint(string(x), 10, 64); err == nil {
				return json.Number(strconv.FormatInt(s.rel(n), 10))
			}
		}
		return x
	case string:
		if mode == cmpShape && key != "state" && key != "name" {
			return "<string>"
		}
		switch key {
		case "expiration":
			if _, err := time.Parse(time.RFC3339Nano, x); err != nil || !strings.HasSuffix(x, "Z") {
				return "<bad expiration " + x + ">"
			}
			return "<expiration>"
		case "id", "leader":
			return "<member-id>"
		case "peerURLs":
			return "<peer-url>"
		case "clientURLs":
			if x == s.p.ClientURL {
				return "<client-url>"
			}
			return "<other-url " + x + ">"
		}
		return s.relText(x)
	case bool:
		if mode == cmpShape {
			return "<bool>"
		}
		return x
	}
	return v
}

func nodeKey(v any) string {
	if m, ok := v.(map[string]any); ok {
		if k, ok := m["key"].(string); ok {
			return k
		}
	}
	return ""
}

// diffAnswers lists the differences between two normalized answers.
func diffAnswers(a, b *answer) []string {
	var out []string
	if a.status != b.status {
		out = append(out, fmt.Sprintf("status %d != %d", a.status, b.status))
	}
	for _, k := range append(append([]string{}, comparedHeaders...), presenceHeaders...) {
		va, oka := a.headers[k]
		vb, okb := b.headers[k]
		switch {
		case oka && !okb:
			out = append(out, fmt.Sprintf("header %s: %q, missing", k, va))
		case !oka && okb:
			out = append(out, fmt.Sprintf("header %s: missing, %q", k, vb))
		case va != vb:
			out = append(out, fmt.Sprintf("header %s: %q != %q", k, va, vb))
		}
	}
	diffJSON("body", a.body, b.body, &out)
	return out
}

// diffJSON compares two normalized values; a "ttl" may differ by one second (the two
// servers compute it a moment apart).
func diffJSON(path string, a, b any, out *[]string) {
	switch x := a.(type) {
	case map[string]any:
		y, ok := b.(map[string]any)
		if !ok {
			*out = append(*out, fmt.Sprintf("%s: %s != %s", path, show(a), show(b)))
			return
		}
		keys := map[string]bool{}
		for k := range x {
			keys[k] = true
		}
		for k := range y {
			keys[k] = true
		}
		sorted := make([]string, 0, len(keys))
		for k := range keys {
			sorted = append(sorted, k)
		}
		sort.Strings(sorted)
		for _, k := range sorted {
			va, oka := x[k]
			vb, okb := y[k]
			switch {
			case !okb:
				*out = append(*out, fmt.Sprintf("%s.%s: %s, missing", path, k, show(va)))
			case !oka:
				*out = append(*out, fmt.Sprintf("%s.%s: missing, %s", path, k, show(vb)))
			case k == "ttl" && closeNumbers(va, vb, 1):
			default:
				diffJSON(path+"."+k, va, vb, out)
			}
		}
	case []any:
		y, ok := b.([]any)
		if !ok || len(x) != len(y) {
			*out = append(*out, fmt.Sprintf("%s: %s != %s", path, show(a), show(b)))
			return
		}
		for i := range x {
			diffJSON(fmt.Sprintf("%s[%d]", path, i), x[i], y[i], out)
		}
	default:
		if fmt.Sprintf("%T %v", a, a) != fmt.Sprintf("%T %v", b, b) {
			*out = append(*out, fmt.Sprintf("%s: %s != %s", path, show(a), show(b)))
		}
	}
}

func closeNumbers(a, b any, tol float64) bool {
	x, ok1 := a.(json.Number)
	y, ok2 := b.(json.Number)
	if !ok1 || !ok2 {
		return false
	}
	fx, e1 := x.Float64()
	fy, e2 := y.Float64()
	return e1 == nil && e2 == nil && math.Abs(fx-fy) <= tol
}

func show(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Sprint(v)
	}
	if len(b) > 400 {
		return string(b[:400]) + "…"
	}
	return string(b)
}

// pendingWatch is a watch request started on one server whose answer is read later.
type pendingWatch struct {
	desc   string
	cancel context.CancelFunc
	resp   chan *http.Response
	err    chan error
}

// watchStart sends a watch (GET …wait=true) to both servers and waits until each has sent
// its headers: etcd flushes them when the watcher is registered, so the events the next
// steps cause are certain to reach it.
func (d *differ) watchStart(name, path string) {
	d.t.Helper()
	d.steps++
	pw := &[2]*pendingWatch{}
	d.watches[name] = pw
	for i, s := range d.sides() {
		p, err := s.expand(path)
		if err != nil {
			d.t.Errorf("watch %s: %v", name, err)
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		w := &pendingWatch{desc: "GET " + p, cancel: cancel, resp: make(chan *http.Response, 1), err: make(chan error, 1)}
		pw[i] = w
		req, err := s.p.newRequest(ctx, "GET", p, nil)
		if err != nil {
			d.t.Fatal(err)
		}
		go func() {
			resp, err := testClient.Do(req)
			if err != nil {
				w.err <- err
				return
			}
			w.resp <- resp
		}()
		select {
		case resp := <-w.resp:
			w.resp <- resp // keep it for watchEnd
		case err := <-w.err:
			w.err <- err
		case <-time.After(5 * time.Second):
			d.mismatches++
			d.t.Errorf("watch %s: %s sent no response headers within 5s of %s (etcd sends them as soon as the watcher is registered)",
				name, s.p.Name, w.desc)
		}
	}
}

// watchEnd reads the answers of a watch started by watchStart (one event, then the end of
// the response) and compares them.
func (d *differ) watchEnd(name string) { d.finishWatch(name, false) }

// streamEnd reads the events of a stream=true watch until none has come for a second
// (etcd keeps a stream open), then compares the event lists.
func (d *differ) streamEnd(name string) { d.finishWatch(name, true) }

func (d *differ) finishWatch(name string, stream bool) {
	d.t.Helper()
	pw := d.watches[name]
	delete(d.watches, name)
	var ans [2]*answer
	var descs [2]string
	for i, s := range d.sides() {
		w := pw[i]
		if w == nil {
			ans[i] = &answer{raw: "not started"}
			continue
		}
		descs[i] = w.desc
		ans[i] = s.readWatch(w, stream)
	}
	d.compare(descs, ans)
}

func (s *diffSide) readWatch(w *pendingWatch, stream bool) *answer {
	defer w.cancel()
	var resp *http.Response
	select {
	case resp = <-w.resp:
	case err := <-w.err:
		return &answer{raw: "transport error: " + err.Error()}
	case <-time.After(10 * time.Second):
		return &answer{raw: "no response headers within 10s"}
	}
	defer resp.Body.Close()
	if !stream {
		body, err := readWithin(resp.Body, 10*time.Second)
		if err != nil {
			return &answer{raw: fmt.Sprintf("HTTP %d, reading the event: %v (got %q)", resp.StatusCode, err, body)}
		}
		return s.normalize(resp.StatusCode, resp.Header, body, cmpExact)
	}
	// A stream: collect complete lines until a second passes without one.
	lines := make(chan []byte)
	go func() {
		defer close(lines)
		buf := make([]byte, 0, 4096)
		chunk := make([]byte, 4096)
		for {
			n, err := resp.Body.Read(chunk)
			buf = append(buf, chunk[:n]...)
			for {
				i := bytes.IndexByte(buf, '\n')
				if i < 0 {
					break
				}
				lines <- append([]byte(nil), buf[:i+1]...)
				buf = buf[i+1:]
			}
			if err != nil {
				return
			}
		}
	}()
	var body []byte
	overall := time.After(10 * time.Second)
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				return s.normalize(resp.StatusCode, resp.Header, body, cmpExact)
			}
			if s.reference && bytes.HasSuffix(body, l) && (len(body) == len(l) || body[len(body)-len(l)-1] == '\n') {
				continue
			}
			body = append(body, l...)
			continue
		case <-time.After(time.Second):
		case <-overall:
		}
		w.cancel() // ends the reader goroutine
		for range lines {
		}
		return s.normalize(resp.StatusCode, resp.Header, body, cmpExact)
	}
}

// readWithin reads r to its end, failing after d.
func readWithin(r io.Reader, d time.Duration) ([]byte, error) {
	type result struct {
		b   []byte
		err error
	}
	ch := make(chan result, 1)
	go func() {
		b, err := io.ReadAll(r)
		ch <- result{b, err}
	}()
	select {
	case res := <-ch:
		return res.b, res.err
	case <-time.After(d):
		return nil, fmt.Errorf("no complete answer within %v", d)
	}
}

// pollUntil repeats GET path on each server until it answers want (10 s at most; used to
// wait for a TTL to expire before the next write, so both servers number the expire
// event alike), then compares the final answers.
func (d *differ) pollUntil(path string, want int) {
	d.t.Helper()
	d.steps++
	var ans [2]*answer
	var descs [2]string
	for i, s := range d.sides() {
		p, _ := s.expand(path)
		descs[i] = "GET " + p + fmt.Sprintf(" (until %d)", want)
		deadline := time.Now().Add(10 * time.Second)
		tick := time.NewTicker(50 * time.Millisecond)
		for {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			st, h, body, err := s.p.tryDo(ctx, "GET", p, nil)
			cancel()
			if err == nil && (st == want || time.Now().After(deadline)) {
				ans[i] = s.normalize(st, h, body, cmpExact)
				break
			}
			if err != nil && time.Now().After(deadline) {
				ans[i] = &answer{raw: "transport error: " + err.Error()}
				break
			}
			<-tick.C
		}
		tick.Stop()
	}
	d.compare(descs, ans)
}

// bulk sends n identical writes to each server, from a few concurrent clients, so the
// watch history (1000 events) no longer reaches the earlier indexes.
func (d *differ) bulk(n int, path string, form url.Values) {
	d.t.Helper()
	for _, s := range d.sides() {
		var wg sync.WaitGroup
		var mu sync.Mutex
		var errs []string
		next := make(chan int)
		for w := 0; w < 8; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for range next {
					ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
					st, _, body, err := s.p.tryDo(ctx, "PUT", path, form)
					cancel()
					if err != nil || (st != http.StatusOK && st != http.StatusCreated) {
						mu.Lock()
						errs = append(errs, fmt.Sprintf("%d %s %v", st, bytes.TrimSpace(body), err))
						mu.Unlock()
					}
				}
			}()
		}
		for i := 0; i < n; i++ {
			next <- i
		}
		close(next)
		wg.Wait()
		if len(errs) > 0 {
			d.t.Fatalf("%s: %d of %d bulk writes to %s failed, first: %s", s.p.Name, len(errs), n, path, errs[0])
		}
	}
}

func vals(kv ...string) url.Values {
	v := url.Values{}
	for i := 0; i+1 < len(kv); i += 2 {
		v.Add(kv[i], kv[i+1])
	}
	return v
}

// TestDifferentialAgainstEtcd sends the same script to a fresh etcd 3.4 and a fresh etcaddy
// and compares every answer. ETCADDY_E2E_SUBJECT=etcd runs it etcd against etcd, which checks
// the test and its normalization; ETCADDY_DIFF_TRANSCRIPT=<file> writes every request and both
// raw answers there (the client tests too).
func TestDifferentialAgainstEtcd(t *testing.T) {
	d := newDiffer(t, startEtcd(t), startSubject(t))
	start := time.Now()

	// Empty store, basic set/get, the HTTP surface.
	d.req("GET", "/v2/keys/", nil)
	d.req("GET", "/v2/keys", nil)
	d.saveAs("a1", "PUT", "/v2/keys/a", vals("value", "one"))
	d.req("PUT", "/v2/keys/a", vals("value", "two"))
	d.req("GET", "/v2/keys/a", nil)
	d.req("HEAD", "/v2/keys/a", nil)
	d.req("HEAD", "/v2/keys/missing", nil)
	d.req("GET", "/v2/keys/missing", nil)
	d.req("GET", "/v2/keys/missing/deeper/still", nil)
	d.req("GET", "/v2/keys/a/under-a-file", nil)
	d.req("PUT", "/v2/keys/empty", url.Values{})
	d.req("GET", "/v2/keys/empty", nil)
	d.rawBody("PUT", "/v2/keys/qv?value=query", "application/x-www-form-urlencoded", "value=body")
	d.req("PUT", "/v2/keys/qv?value=query", nil)
	d.rawBody("PUT", "/v2/keys/jv", "application/json", `{"value":"json"}`)
	d.rawBody("PUT", "/v2/keys/twice", "application/x-www-form-urlencoded", "value=first&value=second")
	d.req("GET", "/v2/keys/twice", nil)
	d.req("PUT", "/v2/keys/sp%20ace", vals("value", "spaced"))
	d.req("GET", "/v2/keys/sp%20ace", nil)
	d.req("PUT", "/v2/keys/esc%2Fk", vals("value", "escaped"))
	d.req("GET", "/v2/keys/esc/k", nil)
	d.req("GET", "/v2/keys/a/", nil)
	d.req("GET", "/v2/keys//a", nil)
	d.req("GET", "/v2/keys/esc//k?recursive=true", nil)
	d.req("PATCH", "/v2/keys/a", nil)
	d.req("OPTIONS", "/v2/keys/a", nil)
	d.req("GET", "/v2/nothing", nil)
	d.req("PUT", "/v2/keys/", vals("value", "root"))
	d.req("DELETE", "/v2/keys/", nil)
	d.req("DELETE", "/v2/keys/?recursive=true", nil)
	d.saveAs("rootq", "POST", "/v2/keys/", vals("value", "at-root"))
	d.req("GET", "/v2/keys${rootq.key}", nil)
	d.req("DELETE", "/v2/keys${rootq.key}", nil)
	d.req("GET", "/v2/keys/a?quorum=true", nil)
	d.req("GET", "/v2/keys/missing?quorum=true", nil)
	// quorum=true makes a GET a read through Raft, which ignores wait, waitIndex and stream.
	d.req("GET", "/v2/keys/a?quorum=true&wait=true", nil)
	d.req("GET", "/v2/keys/missing?quorum=true&wait=true&waitIndex=1&stream=true", nil)
	d.req("PUT", "/v2/keys", vals("value", "root"))
	d.req("PUT", "/v2/keys/%C3%BCn%C3%AFc%C3%B6de", vals("value", "✓ ünïcödé"))
	d.req("GET", "/v2/keys/%C3%BCn%C3%AFc%C3%B6de", nil)
	d.req("PUT", "/v2/keys/plus+sign", vals("value", "a+b c"))
	d.req("GET", "/v2/keys/plus+sign", nil)
	d.req("PUT", "/v2/keys/q%3Fmark", vals("value", "?"))
	d.req("GET", "/v2/keys/q%3Fmark", nil)
	d.req("GET", "/v2/keysx", nil)
	d.req("GET", "/v2", nil)
	d.req("GET", "/v2/stats/nothing", nil)

	// Parameter errors (reference §1.1), one by one and in etcd's validation order.
	d.req("PUT", "/v2/keys/p?prevValue=", vals("value", "x"))
	d.req("PUT", "/v2/keys/p?prevIndex=abc", vals("value", "x"))
	d.req("PUT", "/v2/keys/p?prevIndex=-1", vals("value", "x"))
	d.req("GET", "/v2/keys/p?wait=true&waitIndex=abc", nil)
	d.req("GET", "/v2/keys/a?recursive=maybe", nil)
	d.req("GET", "/v2/keys/a?recursive=", nil)
	d.req("GET", "/v2/keys/a?recursive", nil)
	d.req("GET", "/v2/keys/a?recursive=1", nil)
	d.req("GET", "/v2/keys/a?recursive=T", nil)
	d.req("GET", "/v2/keys/a?recursive=TRUE", nil)
	d.req("GET", "/v2/keys/a?sorted=x", nil)
	d.req("GET", "/v2/keys/a?wait=x", nil)
	d.req("GET", "/v2/keys/a?quorum=x", nil)
	d.req("GET", "/v2/keys/a?wait=true&stream=x", nil)
	d.req("PUT", "/v2/keys/p", vals("value", "x", "dir", "maybe"))
	d.req("PUT", "/v2/keys/p?wait=true", vals("value", "x"))
	d.req("DELETE", "/v2/keys/a?wait=true", nil)
	d.req("PUT", "/v2/keys/p", vals("value", "x", "noValueOnSuccess", "x"))
	d.req("PUT", "/v2/keys/p", vals("value", "x", "ttl", "abc"))
	d.req("PUT", "/v2/keys/p", vals("value", "x", "ttl", "-1"))
	d.req("POST", "/v2/keys/p", vals("value", "x", "ttl", "1.5"))
	d.req("PUT", "/v2/keys/p", vals("value", "x", "prevExist", "maybe"))
	d.req("PUT", "/v2/keys/p", vals("value", "x", "refresh", "maybe"))
	d.req("PUT", "/v2/keys/a", vals("refresh", "true", "prevExist", "true"))
	d.req("PUT", "/v2/keys/a", vals("refresh", "true", "ttl", "5", "value", "x"))
	d.req("PUT", "/v2/keys/p?prevIndex=abc&recursive=maybe", vals("value", "x"))
	d.req("PUT", "/v2/keys/p?recursive=maybe&prevValue=", vals("value", "x"))
	d.req("PUT", "/v2/keys/p?prevValue=", vals("value", "x", "ttl", "abc"))
	d.req("PUT", "/v2/keys/p", vals("value", "x", "ttl", "abc", "prevExist", "maybe"))
	d.req("PUT", "/v2/keys/p", vals("value", "x", "prevExist", "maybe", "refresh", "x"))
	d.rawBody("PUT", "/v2/keys/p", "application/x-www-form-urlencoded", "value=%zz")
	d.req("GET", "/v2/keys/p?%zz", nil)
	d.req("DELETE", "/v2/keys/a?dir=maybe", nil)
	d.req("DELETE", "/v2/keys/a?recursive=x", nil)
	d.req("GET", "/v2/keys/p", nil) // none of the above wrote it

	// Create, update, compare-and-swap, compare-and-delete: successes and every failure.
	d.saveAs("c0", "PUT", "/v2/keys/c", vals("value", "one", "prevExist", "false"))
	d.req("PUT", "/v2/keys/c", vals("value", "again", "prevExist", "false"))
	d.req("PUT", "/v2/keys/nope", vals("value", "x", "prevExist", "true"))
	d.req("PUT", "/v2/keys/c", vals("value", "two", "prevExist", "true"))
	d.saveAs("c3", "PUT", "/v2/keys/c?prevValue=two", vals("value", "three"))
	d.req("PUT", "/v2/keys/c?prevValue=wrong", vals("value", "x"))
	d.req("PUT", "/v2/keys/c?prevIndex=${c0.index}", vals("value", "x"))
	d.req("PUT", "/v2/keys/c?prevIndex=${c0.index}&prevValue=wrong", vals("value", "x"))
	d.req("PUT", "/v2/keys/c?prevIndex=${c3.index}", vals("value", "four"))
	d.req("PUT", "/v2/keys/c?prevIndex=0", vals("value", "five"))
	d.req("PUT", "/v2/keys/c?prevExist=true&prevValue=five", vals("value", "six"))
	d.req("PUT", "/v2/keys/nokey?prevValue=x", vals("value", "y"))
	d.req("PUT", "/v2/keys/nokey?prevIndex=${c0.index}", vals("value", "y"))
	d.req("PUT", "/v2/keys/c?noValueOnSuccess=true", vals("value", "seven"))
	d.req("PUT", "/v2/keys/c?noValueOnSuccess=true&prevExist=true", vals("value", "eight"))
	d.req("PUT", "/v2/keys/nv?noValueOnSuccess=true&prevExist=false", vals("value", "x"))
	d.req("PUT", "/v2/keys/c?noValueOnSuccess=true&prevValue=eight", vals("value", "nine"))
	d.req("DELETE", "/v2/keys/nv?noValueOnSuccess=true", nil)
	d.req("GET", "/v2/keys/c", nil)
	d.req("DELETE", "/v2/keys/c?prevValue=wrong", nil)
	d.req("DELETE", "/v2/keys/c?prevIndex=${c0.index}", nil)
	d.req("DELETE", "/v2/keys/c?prevIndex=${c0.index}&prevValue=wrong", nil)
	d.req("DELETE", "/v2/keys/c?prevValue=nine", nil)
	d.req("DELETE", "/v2/keys/c", nil)
	d.saveAs("cad", "PUT", "/v2/keys/cad", vals("value", "x"))
	d.req("DELETE", "/v2/keys/cad?prevIndex=${cad.index}", nil)
	d.req("DELETE", "/v2/keys/nokey?prevValue=x", nil)
	// A compare-and-delete of the root is etcd's 102 with no cause at all.
	d.req("DELETE", "/v2/keys/?prevValue=x", nil)
	d.req("DELETE", "/v2/keys/?prevIndex=1&recursive=true", nil)
	d.req("PUT", "/v2/keys/pe", vals("value", "x"))
	d.req("DELETE", "/v2/keys/pe?prevExist=true", nil)
	// prevExist=false wins over prevValue: etcd creates, ignoring the comparison.
	d.req("PUT", "/v2/keys/pv?prevExist=false&prevValue=x", vals("value", "y"))
	d.req("PUT", "/v2/keys/pv?prevExist=false&prevValue=y", vals("value", "z"))
	d.req("POST", "/v2/keys/nvq?noValueOnSuccess=true", vals("value", "x"))
	d.req("DELETE", "/v2/keys/pv?recursive=true", nil)
	d.req("DELETE", "/v2/keys/nvq?dir=true&recursive=true", nil)

	// Directories, listings, hidden keys.
	d.req("PUT", "/v2/keys/dir", vals("dir", "true"))
	d.req("PUT", "/v2/keys/dir", vals("dir", "true"))
	d.req("PUT", "/v2/keys/dir", vals("value", "x"))
	d.req("PUT", "/v2/keys/dir?prevValue=x", vals("value", "y"))
	d.req("DELETE", "/v2/keys/dir?prevValue=x", nil)
	d.req("PUT", "/v2/keys/dir/a/b", vals("value", "ab"))
	d.req("GET", "/v2/keys/dir/a", nil)
	d.req("PUT", "/v2/keys/dir/a/b/c", vals("value", "x"))
	d.req("GET", "/v2/keys/dir/a/b/c", nil)
	d.req("POST", "/v2/keys/dir/a/b", vals("value", "x"))
	d.req("PUT", "/v2/keys/dir/f1", vals("value", "v1"))
	d.req("PUT", "/v2/keys/dir/f2", vals("value", "v2"))
	d.req("PUT", "/v2/keys/dir/sub/x", vals("value", "vx"))
	d.req("PUT", "/v2/keys/dir/_hidden", vals("value", "h"))
	d.req("PUT", "/v2/keys/dir/sub/_h2", vals("value", "h2"))
	d.req("PUT", "/v2/keys/dir/new", vals("dir", "true", "value", "ignored"))
	d.req("GET", "/v2/keys/dir", nil)
	d.req("GET", "/v2/keys/dir?recursive=true", nil)
	d.sorted("GET", "/v2/keys/dir?recursive=true&sorted=true", nil)
	d.sorted("GET", "/v2/keys/dir?sorted=true", nil)
	d.sorted("GET", "/v2/keys/?recursive=true&sorted=true", nil)
	// A listing larger than one response buffer (etcaddy's goes out in
	// pieces, see spillAt): 150 keys of 700 bytes over three directories.
	for i := range 150 {
		d.req("PUT", fmt.Sprintf("/v2/keys/biglist/d%d/k%03d", i%3, i), vals("value", fmt.Sprintf("%03d%s", i, strings.Repeat("<v>", 232))))
	}
	d.sorted("GET", "/v2/keys/biglist?recursive=true&sorted=true", nil)
	d.req("GET", "/v2/keys/biglist?recursive=true", nil)
	d.req("HEAD", "/v2/keys/biglist?recursive=true", nil)
	d.req("DELETE", "/v2/keys/biglist?recursive=true", nil)
	d.req("GET", "/v2/keys/", nil)
	d.req("GET", "/v2/keys/dir/_hidden", nil)
	d.req("GET", "/v2/keys/dir/sub/_h2", nil)
	d.req("PUT", "/v2/keys/emptydir", vals("dir", "true"))
	d.req("GET", "/v2/keys/emptydir", nil)
	d.req("GET", "/v2/keys/emptydir?recursive=true", nil)
	d.req("DELETE", "/v2/keys/emptydir", nil)
	d.req("DELETE", "/v2/keys/emptydir?dir=true", nil)
	d.req("DELETE", "/v2/keys/dir?dir=true", nil)
	d.req("DELETE", "/v2/keys/dir", nil)
	d.rawBody("DELETE", "/v2/keys/dir", "application/x-www-form-urlencoded", "dir=true")
	d.req("PUT", "/v2/keys/filetodir", vals("value", "x"))
	d.req("PUT", "/v2/keys/filetodir", vals("dir", "true"))
	d.req("PUT", "/v2/keys/dir2", vals("dir", "true"))
	d.req("PUT", "/v2/keys/dir2", vals("dir", "true", "ttl", "300", "prevExist", "true"))
	d.req("GET", "/v2/keys/dir2", nil)
	d.req("PUT", "/v2/keys/dir2", vals("dir", "true", "ttl", "", "prevExist", "true"))
	d.req("GET", "/v2/keys/dir2", nil)
	d.req("PUT", "/v2/keys/dir2", vals("dir", "true", "prevExist", "true"))
	d.req("HEAD", "/v2/keys/dir2", nil)
	d.req("PUT", "/v2/keys/f3", vals("value", "x"))
	d.req("PUT", "/v2/keys/f3", vals("prevExist", "true", "dir", "true"))
	d.req("DELETE", "/v2/keys/f3?dir=true", nil)
	d.req("DELETE", "/v2/keys/dir?recursive=true", nil)
	d.req("GET", "/v2/keys/dir/a", nil)
	d.req("DELETE", "/v2/keys/dir2?recursive=true", nil)

	// In-order keys.
	d.saveAs("q1", "POST", "/v2/keys/queue", vals("value", "job1"))
	d.saveAs("q2", "POST", "/v2/keys/queue", vals("value", "job2", "ttl", "300"))
	d.saveAs("q3", "POST", "/v2/keys/queue", vals("dir", "true"))
	d.sorted("GET", "/v2/keys/queue?recursive=true&sorted=true", nil)
	d.req("GET", "/v2/keys${q1.key}", nil)
	d.req("PUT", "/v2/keys${q3.key}/inside", vals("value", "x"))
	d.req("POST", "/v2/keys/a", vals("value", "x"))
	d.req("DELETE", "/v2/keys${q2.key}", nil)
	d.req("DELETE", "/v2/keys/queue?recursive=true", nil)

	// TTLs: set, refresh, clear; expiry (waited for before the next write).
	d.req("PUT", "/v2/keys/t1", vals("value", "x", "ttl", "300"))
	d.req("GET", "/v2/keys/t1", nil)
	d.req("PUT", "/v2/keys/t1", vals("ttl", "400", "refresh", "true", "prevExist", "true"))
	d.req("PUT", "/v2/keys/t1", vals("ttl", "400", "refresh", "true"))
	d.req("PUT", "/v2/keys/t1?prevValue=x", vals("ttl", "400", "refresh", "true"))
	d.req("PUT", "/v2/keys/t1", vals("ttl", "400", "refresh", "true", "prevExist", "true", "value", ""))
	d.req("PUT", "/v2/keys/t1", vals("value", "x", "ttl", "", "prevExist", "true"))
	d.req("GET", "/v2/keys/t1", nil)
	d.req("PUT", "/v2/keys/t1", vals("value", "y", "ttl", "300"))
	d.req("PUT", "/v2/keys/t1", vals("value", "z", "prevExist", "true"))
	d.req("GET", "/v2/keys/t1", nil)
	d.req("PUT", "/v2/keys/tmiss", vals("ttl", "10", "refresh", "true"))
	d.req("PUT", "/v2/keys/tmiss", vals("ttl", "10", "refresh", "true", "prevExist", "true"))
	d.watchStart("refresh", "/v2/keys/t1?wait=true")
	d.saveAs("ref", "PUT", "/v2/keys/t1", vals("ttl", "300", "refresh", "true", "prevExist", "true"))
	d.req("PUT", "/v2/keys/t1", vals("value", "after-refresh"))
	d.watchEnd("refresh")
	d.req("GET", "/v2/keys/t1?wait=true&waitIndex=${ref.index}", nil)
	d.req("DELETE", "/v2/keys/t1", nil)
	d.saveAs("texp", "PUT", "/v2/keys/texp", vals("value", "v", "ttl", "1"))
	d.watchStart("expire", "/v2/keys/texp?wait=true")
	d.pollUntil("/v2/keys/texp", http.StatusNotFound)
	d.watchEnd("expire")
	d.req("GET", "/v2/keys/texp?wait=true&waitIndex=${texp.index+1}", nil)
	d.req("PUT", "/v2/keys/t0", vals("value", "x", "ttl", "0"))
	d.pollUntil("/v2/keys/t0", http.StatusNotFound)
	d.req("PUT", "/v2/keys/tdir", vals("dir", "true", "ttl", "1"))
	d.req("PUT", "/v2/keys/tdir/k", vals("value", "x"))
	d.pollUntil("/v2/keys/tdir", http.StatusNotFound)
	d.req("GET", "/v2/keys/tdir/k", nil)

	// Live watches: key, recursive, hidden, non-recursive on a dir, a deleted parent.
	d.req("PUT", "/v2/keys/w/k", vals("value", "0"))
	d.watchStart("key", "/v2/keys/w/k?wait=true")
	d.watchStart("rec", "/v2/keys/w?wait=true&recursive=true")
	d.watchStart("hid", "/v2/keys/w/_hid?wait=true")
	d.watchStart("dir", "/v2/keys/w?wait=true")
	d.saveAs("hid", "PUT", "/v2/keys/w/_hid", vals("value", "h"))
	d.saveAs("wk", "PUT", "/v2/keys/w/k", vals("value", "1"))
	d.watchEnd("hid")
	d.watchEnd("key")
	d.watchEnd("rec")
	d.watchStart("parent", "/v2/keys/w/k?wait=true")
	// A removed directory wakes the watchers at the nodes it took, not those of keys that
	// were not there: they get the next event at their own key.
	d.watchStart("absent", "/v2/keys/w/none?wait=true")
	d.watchStart("underfile", "/v2/keys/w/k/sub?wait=true&recursive=true")
	d.req("DELETE", "/v2/keys/w?recursive=true", nil)
	d.watchEnd("parent")
	d.watchEnd("dir")
	d.req("PUT", "/v2/keys/w/none", vals("value", "back"))
	d.req("PUT", "/v2/keys/w/k/sub/x", vals("value", "under"))
	d.watchEnd("absent")
	d.watchEnd("underfile")
	d.req("DELETE", "/v2/keys/w?recursive=true", nil)
	d.req("GET", "/v2/keys/w/k?wait=true&waitIndex=${wk.index}", nil)
	d.req("GET", "/v2/keys/w?wait=true&recursive=true&waitIndex=${hid.index}", nil)
	d.req("GET", "/v2/keys/w?wait=true&recursive=true&waitIndex=${hid.index+1}", nil)
	d.saveAs("wf0", "PUT", "/v2/keys/wf", vals("value", "zero"))
	d.watchStart("future", "/v2/keys/wf?wait=true&waitIndex=${wf0.index+2}")
	d.req("PUT", "/v2/keys/wf", vals("value", "one"))
	d.req("PUT", "/v2/keys/wf", vals("value", "two"))
	d.watchEnd("future")
	d.req("PUT", "/v2/keys/sw/x", vals("value", "x"))
	d.watchStart("stream", "/v2/keys/sw?wait=true&recursive=true&stream=true")
	d.req("PUT", "/v2/keys/sw/a", vals("value", "a"))
	d.req("PUT", "/v2/keys/sw/b", vals("value", "b"))
	d.req("DELETE", "/v2/keys/sw?recursive=true", nil)
	d.streamEnd("stream")

	// History: 1000 events later the first ones are gone (errorCode 401).
	d.bulk(1010, "/v2/keys/bulk", vals("value", "same"))
	d.saveAs("bulk", "GET", "/v2/keys/bulk", nil)
	d.req("GET", "/v2/keys/a?wait=true&waitIndex=${a1.index}", nil)
	d.req("GET", "/v2/keys/a?wait=true&waitIndex=${base+1}", nil)
	d.req("GET", "/v2/keys/a/sub?wait=true&waitIndex=${base+1}", nil)
	d.req("GET", "/v2/keys/bulk?wait=true&waitIndex=${bulk.index-100}", nil)
	d.req("GET", "/v2/keys/bulk?wait=true&waitIndex=${bulk.index-998}", nil)
	d.req("DELETE", "/v2/keys/bulk", nil)

	// The other endpoints.
	d.req("GET", "/v2/members", nil)
	d.req("GET", "/v2/members/leader", nil)
	d.req("GET", "/v2/members/xyz", nil)
	d.rawBody("POST", "/v2/members", "application/x-www-form-urlencoded", "peerURLs=http://127.0.0.1:1")
	d.rawBody("POST", "/v2/members", "application/json", `{}`)
	d.rawBody("POST", "/v2/members", "application/json", `{bad`)
	d.rawBody("POST", "/v2/members", "application/json", `{"peerURLs":["not a url"]}`)
	d.rawBody("POST", "/v2/members", "application/json", `{"peerURLs":["http://127.0.0.1:1:1"]}`)
	d.rawBody("POST", "/v2/members", "application/json", `{"peerURLs":["http://127.0.0.1:x"]}`)
	d.rawBody("POST", "/v2/members", "application/json", `{"peerURLs":["http://u:p@127.0.0.1:1:1/"]}`)
	d.req("DELETE", "/v2/members", nil)
	d.req("DELETE", "/v2/members/zzz", nil)
	d.req("GET", "/v2/machines", nil)
	d.req("HEAD", "/v2/machines", nil)
	d.req("POST", "/v2/machines", nil)
	d.shape("GET", "/v2/stats/self")
	d.shape("GET", "/v2/stats/store")
	d.req("GET", "/v2/stats/leader", nil)
	d.req("POST", "/v2/stats/store", nil)
	d.shape("GET", "/version")
	d.req("POST", "/version", nil)
	d.req("GET", "/health", nil)
	d.req("POST", "/health", nil)
	d.req("GET", "/v2/auth/enable", nil)
	d.req("OPTIONS", "/v2/members", nil)
	// etcd 3.4's deprecated log level endpoint: PUT only, a JSON body whose
	// Level is one of capnslog's names (any case), 204.
	for _, body := range []string{`{"Level":"DEBUG"}`, `{"level":"warning"}`, `{"Level":"n"}`, `{"LEVEL":"3"}`,
		`{"Level":"TRACE"} trailing`, `{"Level":"bogus"}`, `{"Level":""}`, `{}`, `notjson`, ``, `[1]`, `{"Level":5}`,
		`{"Level":"Info"}`} {
		d.as("", "PUT", "/config/local/log", body)
	}
	d.req("GET", "/config/local/log", nil)
	d.req("POST", "/config/local/log", nil)
	d.req("OPTIONS", "/config/local/log", nil)
	d.sorted("GET", "/v2/keys/?recursive=true&sorted=true", nil)

	t.Logf("%d steps (plus 1010 bulk writes) in %v, %d differing", d.steps, time.Since(start).Round(time.Millisecond), d.mismatches)
	if d.steps < 150 {
		t.Errorf("only %d steps: the script must send at least 150", d.steps)
	}
}
