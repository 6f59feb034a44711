package storage

import (
	"fmt"
	"maps"
	"reflect"
	"strings"
	"testing"
	"time"
)

func requestSeeds() []Request {
	return []Request{
		{},
		{ID: 1, Method: MethodPut, Path: "/a", Val: "v"},
		{ID: 2, Method: MethodAuthPut, Path: "/users/root", Val: `{"user":"root"}`, PrevExist: boolp(false)},
		{ID: 3, Method: MethodAuthDelete, Path: "/roles/r", PrevValue: "{}"},
		{ID: 1<<64 - 1, Method: MethodPut, Path: "/a/b", Val: "x", Dir: true, PrevValue: "p", PrevIndex: 9,
			PrevExist: boolp(true), Expiration: -1 << 63, Recursive: true, Refresh: true, Time: 1<<63 - 1},
		{Method: MethodPut, Path: "/c", PrevExist: boolp(false)},
		{Method: MethodPost, Path: "/q", Dir: true, Expiration: 1700000000000000000},
		{Method: MethodDelete, Path: "/d", Recursive: true},
		{Method: MethodSync, Time: 1700000000000000000},
		{Method: MethodQGet, Path: "/"},
		{Method: "PATCH", Path: "/odd\x00key", Val: strings.Repeat("é", 100)},
	}
}

func TestRequestRoundTrip(t *testing.T) {
	for _, r := range requestSeeds() {
		got, err := UnmarshalRequest(r.Marshal())
		if err != nil {
			t.Fatalf("%+v: %v", r, err)
		}
		if !reflect.DeepEqual(*got, r) {
			t.Fatalf("got %+v, want %+v", *got, r)
		}
	}
	for _, bad := range [][]byte{nil, {1}, {2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0}, {1, 9, 0}, {1, 1, 0x80}, {1, 1, reqPrevExist},
		append((&Request{Method: MethodPut}).Marshal(), 0), (&Request{Method: MethodPut, Path: "/a"}).Marshal()[:6]} {
		if _, err := UnmarshalRequest(bad); err == nil {
			t.Fatalf("%x decoded", bad)
		}
	}
}

func eventSeeds() []*Event {
	strp := func(s string) *string { return &s }
	exp := testClock.Add(90 * time.Second)
	return []*Event{
		{Action: ActionSet, EtcdIndex: 7, Node: &Node{Key: "/a", Value: strp("v"), ModifiedIndex: 7, CreatedIndex: 7},
			PrevNode: &Node{Key: "/a", Value: strp(""), ModifiedIndex: 3, CreatedIndex: 2}},
		{Action: ActionUpdate, EtcdIndex: 9, Refresh: true, Node: &Node{Key: "/d", Dir: true, Expiration: &exp, TTL: 90,
			ModifiedIndex: 9, CreatedIndex: 4}, PrevNode: &Node{Key: "/d", Dir: true, ModifiedIndex: 4, CreatedIndex: 4}},
		{Action: ActionExpire, EtcdIndex: 12, Node: &Node{Key: "/e", ModifiedIndex: 11, CreatedIndex: 1},
			PrevNode: &Node{Key: "/other", Value: strp("x"), TTL: -3, ModifiedIndex: 1, CreatedIndex: 1}},
		{Action: ActionCreate, EtcdIndex: 1 << 62, Node: &Node{Key: "/q/00000000000000000001", Value: strp("é\x00"),
			ModifiedIndex: 1 << 62, CreatedIndex: 1 << 62}},
	}
}

// FuzzUnmarshalEvent: a stored event decodes to what was stored, and any
// input decodes or fails without a panic.
func FuzzUnmarshalEvent(f *testing.F) {
	for _, e := range eventSeeds() {
		data := marshalEvent(e)
		got, err := unmarshalEvent(data)
		if err != nil || !reflect.DeepEqual(got, e) {
			f.Fatalf("%+v decoded as %+v, %v", e, got, err)
		}
		f.Add(data)
	}
	f.Add([]byte{1, 8, 0})
	f.Add([]byte{1, 14, 0, 1, 'a', 0, 1, 8, 0, 2})
	f.Fuzz(func(t *testing.T, data []byte) {
		e, err := unmarshalEvent(data)
		if err != nil {
			return
		}
		e2, err := unmarshalEvent(marshalEvent(e))
		if err != nil || !reflect.DeepEqual(e, e2) {
			t.Fatalf("%+v re-encoded as %+v, %v", e, e2, err)
		}
	})
}

// FuzzUnmarshalRequest: any input decodes or fails without a panic, and
// whatever decodes encodes back to the same request.
func FuzzUnmarshalRequest(f *testing.F) {
	for _, r := range requestSeeds() {
		f.Add(r.Marshal())
	}
	f.Add([]byte{1, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01})
	f.Add([]byte{1, 1, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x0f})
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := UnmarshalRequest(data)
		if err != nil {
			return
		}
		r2, err := UnmarshalRequest(r.Marshal())
		if err != nil {
			t.Fatalf("re-encoding of %+v does not decode: %v", r, err)
		}
		if !reflect.DeepEqual(r, r2) {
			t.Fatalf("round trip: %+v != %+v", r, r2)
		}
	})
}

// model is the v2 keyspace as a plain map, with etcd 3.4's rules written
// out directly: the reference FuzzStoreOps checks the store against.
type model struct {
	nodes map[string]*mnode
	index uint64
	auth  map[string]string // the auth data; nil until the first auth write
}

type mnode struct {
	dir               bool
	value             string
	created, modified uint64
}

type mresult struct {
	action   string
	key      string
	node     mnode // the event's node
	code     int
	cause    string
	hasValue bool
}

func components(p string) []string {
	if p == "/" {
		return nil
	}
	return strings.Split(p[1:], "/")
}

func (m *model) lookup(p string) (*mnode, int, string) {
	if p == "/" {
		return &mnode{dir: true}, 0, ""
	}
	cur := ""
	comps := components(p)
	for i, c := range comps {
		cur += "/" + c
		n := m.nodes[cur]
		if n == nil {
			return nil, EcodeKeyNotFound, cur
		}
		if i == len(comps)-1 {
			return n, 0, ""
		}
		if !n.dir {
			return nil, EcodeNotDir, cur
		}
	}
	return nil, 0, ""
}

func (m *model) removeTree(p string) {
	for k := range m.nodes {
		if k == p || strings.HasPrefix(k, p+"/") {
			delete(m.nodes, k)
		}
	}
}

func (m *model) hasChildren(p string) bool {
	for k := range m.nodes {
		if strings.HasPrefix(k, p+"/") {
			return true
		}
	}
	return false
}

func fail(code int, cause string) mresult { return mresult{code: code, cause: cause} }

func (m *model) create(p string, dir bool, value string, replace bool, action string) mresult {
	if p == "/" {
		return fail(EcodeRootROnly, "/")
	}
	next := m.index + 1
	comps := components(p)
	cur := ""
	var missing []string
	for _, c := range comps[:len(comps)-1] {
		cur += "/" + c
		n := m.nodes[cur]
		if n == nil {
			missing = append(missing, cur)
		} else if !n.dir {
			return fail(EcodeNotDir, cur)
		}
	}
	if old := m.nodes[p]; old != nil {
		if !replace {
			return fail(EcodeNodeExist, p)
		}
		if old.dir {
			return fail(EcodeNotFile, p)
		}
	}
	for _, d := range missing {
		m.nodes[d] = &mnode{dir: true, created: next, modified: next}
	}
	n := &mnode{dir: dir, created: next, modified: next}
	if !dir {
		n.value = value
	}
	m.nodes[p] = n
	m.index = next
	return mresult{action: action, key: p, node: *n, hasValue: !dir}
}

func compareOK(n *mnode, prevValue string, prevIndex uint64) (string, bool) {
	im := prevIndex == 0 || n.modified == prevIndex
	vm := prevValue == "" || n.value == prevValue
	switch {
	case im && vm:
		return "", true
	case im:
		return fmt.Sprintf("[%s != %s]", prevValue, n.value), false
	case vm:
		return fmt.Sprintf("[%d != %d]", prevIndex, n.modified), false
	}
	return fmt.Sprintf("[%s != %s] [%d != %d]", prevValue, n.value, prevIndex, n.modified), false
}

func (m *model) apply(r *Request) mresult {
	p := r.Path
	switch {
	case r.Method == MethodAuthPut || r.Method == MethodAuthDelete:
		return m.applyAuth(r)
	case r.Method == MethodPost:
		return m.create(fmt.Sprintf("%s/%020d", strings.TrimSuffix(p, "/"), m.index+1), r.Dir, r.Val, false, ActionCreate)
	case r.Method == MethodPut && r.PrevExist != nil && !*r.PrevExist:
		return m.create(p, r.Dir, r.Val, false, ActionCreate)
	case r.Method == MethodPut && r.PrevExist != nil && r.PrevValue == "" && r.PrevIndex == 0: // update
		if p == "/" {
			return fail(EcodeRootROnly, "/")
		}
		n, code, cause := m.lookup(p)
		if code != 0 {
			return fail(code, cause)
		}
		if n.dir && r.Val != "" {
			return fail(EcodeNotFile, p)
		}
		m.index++
		if !n.dir {
			n.value, n.modified = r.Val, m.index
		}
		ev := *n
		ev.modified = m.index
		return mresult{action: ActionUpdate, key: p, node: ev, hasValue: !n.dir}
	case r.Method == MethodPut && (r.PrevExist != nil || r.PrevValue != "" || r.PrevIndex != 0): // CAS
		if p == "/" {
			return fail(EcodeRootROnly, "/")
		}
		n, code, cause := m.lookup(p)
		if code != 0 {
			return fail(code, cause)
		}
		if n.dir {
			return fail(EcodeNotFile, p)
		}
		if cause, ok := compareOK(n, r.PrevValue, r.PrevIndex); !ok {
			return fail(EcodeTestFailed, cause)
		}
		m.index++
		n.value, n.modified = r.Val, m.index
		return mresult{action: ActionCompareAndSwap, key: p, node: *n, hasValue: true}
	case r.Method == MethodPut:
		return m.create(p, r.Dir, r.Val, true, ActionSet)
	case r.PrevValue != "" || r.PrevIndex != 0: // CAD
		n, code, cause := m.lookup(p)
		if code != 0 {
			return fail(code, cause)
		}
		if p == "/" {
			return fail(EcodeNotFile, "") // etcd's cause is its store path minus its "/1" prefix
		}
		if n.dir {
			return fail(EcodeNotFile, p)
		}
		if cause, ok := compareOK(n, r.PrevValue, r.PrevIndex); !ok {
			return fail(EcodeTestFailed, cause)
		}
		m.index++
		m.removeTree(p)
		return mresult{action: ActionCompareAndDelete, key: p, node: mnode{created: n.created, modified: m.index}}
	default: // delete
		if p == "/" {
			return fail(EcodeRootROnly, "/")
		}
		n, code, cause := m.lookup(p)
		if code != 0 {
			return fail(code, cause)
		}
		if n.dir {
			if !r.Dir && !r.Recursive {
				return fail(EcodeNotFile, p)
			}
			if !r.Recursive && m.hasChildren(p) {
				return fail(EcodeDirNotEmpty, p)
			}
		}
		m.index++
		m.removeTree(p)
		return mresult{action: ActionDelete, key: p, node: mnode{dir: n.dir, created: n.created, modified: m.index}}
	}
}

// applyAuth is etcd's writes under /2: the first one creates /2, /2/users,
// /2/roles and /2/enabled ("false") before it, each taking an index.
func (m *model) applyAuth(r *Request) mresult {
	if r.Method == MethodAuthDelete && r.Path == AuthEnabledPath {
		return fail(EcodeRaftInternal, "storage: /enabled cannot be deleted")
	}
	if m.auth == nil {
		m.auth = map[string]string{AuthEnabledPath: "false"}
		m.index += 4
	}
	cur, ok := m.auth[r.Path]
	_, hasRoot := m.auth[authRootUser]
	switch {
	case r.Method == MethodAuthPut && r.Path == AuthEnabledPath && r.Val == "true" && !hasRoot:
		return fail(EcodeTestFailed, "[no root user]")
	case r.Method == MethodAuthDelete && r.Path == authRootUser && m.auth[AuthEnabledPath] == "true":
		return fail(EcodeTestFailed, "[auth is on]")
	case !ok && (r.Method == MethodAuthDelete || r.PrevExist != nil && *r.PrevExist || r.PrevValue != ""):
		return fail(EcodeKeyNotFound, "/2"+r.Path)
	case r.PrevValue != "" && cur != r.PrevValue:
		return fail(EcodeTestFailed, "[prevValue mismatch]")
	case r.Method == MethodAuthPut && r.PrevExist != nil && !*r.PrevExist && ok:
		return fail(EcodeNodeExist, "/2"+r.Path)
	}
	action := ActionSet
	switch {
	case r.Method == MethodAuthDelete && r.PrevValue != "":
		action = ActionCompareAndDelete
	case r.Method == MethodAuthDelete:
		action = ActionDelete
	case r.PrevExist != nil && !*r.PrevExist:
		action = ActionCreate
	case r.PrevValue != "":
		action = ActionCompareAndSwap
	case r.PrevExist != nil:
		action = ActionUpdate
	}
	if r.Method == MethodAuthDelete {
		delete(m.auth, r.Path)
	} else {
		m.auth[r.Path] = r.Val
	}
	m.index++
	return mresult{action: action, key: "2" + r.Path, node: mnode{created: m.index, modified: m.index}}
}

var fuzzNames = [...]string{"a", "b", "_h"}

// fuzzAuthPaths and fuzzAuthValues are what the auth requests of decodeOps
// write: with the root user and "true", they reach the store's own rules
// (auth on needs a root user, which stays while it is on).
var (
	fuzzAuthPaths  = [...]string{"/users/a", "/roles/a", AuthEnabledPath, authRootUser}
	fuzzAuthValues = [...]string{"", "x", "true", "false"}
)
var fuzzValues = [...]string{"", "x", "y"}

// decodeOps turns fuzz bytes into requests: three bytes per request (kind,
// path, value and compare index) over a tiny keyspace, so that operations
// keep meeting each other's keys.
func decodeOps(data []byte) []Request {
	var reqs []Request
	for len(data) >= 3 && len(reqs) < 64 {
		kind, sel, val := data[0], data[1], data[2]
		data = data[3:]
		p := "/"
		if sel != 255 {
			depth := 1 + int(sel%3)
			for i, s := 0, int(sel/3); i < depth; i, s = i+1, s/3 {
				p += fuzzNames[s%3] + "/"
			}
			p = strings.TrimSuffix(p, "/")
		}
		v := fuzzValues[val%3]
		idx := uint64(val/3) % 12
		r := Request{Path: p, Val: v}
		switch kind % 16 {
		case 0:
			r.Method = MethodPut
		case 1:
			r.Method, r.Dir = MethodPut, true
		case 2:
			r.Method, r.PrevExist = MethodPut, boolp(false)
		case 3:
			r.Method, r.PrevExist, r.Dir = MethodPut, boolp(false), true
		case 4:
			r.Method, r.PrevExist = MethodPut, boolp(true)
		case 5:
			r.Method, r.PrevValue = MethodPut, fuzzValues[(val/3)%3]
		case 6:
			r.Method, r.PrevIndex = MethodPut, idx
		case 7:
			r.Method = MethodDelete
		case 8:
			r.Method, r.Dir = MethodDelete, true
		case 9:
			r.Method, r.Recursive = MethodDelete, true
		case 10:
			r.Method, r.PrevValue = MethodDelete, fuzzValues[(val/3)%3]
		case 11:
			r.Method, r.PrevIndex = MethodDelete, idx
		case 12:
			r.Method = MethodPost
		case 13:
			r.Method, r.Dir = MethodPost, true
		case 14:
			r = Request{Method: MethodAuthPut, Path: fuzzAuthPaths[sel%4], Val: fuzzAuthValues[val%4]}
			switch (val / 4) % 4 {
			case 1:
				r.PrevExist = boolp(false)
			case 2:
				r.PrevExist = boolp(true)
			case 3:
				r.PrevValue = fuzzAuthValues[1+(val/16)%3]
			}
		case 15:
			r = Request{Method: MethodAuthDelete, Path: fuzzAuthPaths[sel%4], PrevValue: fuzzAuthValues[(val/4)%4]}
		}
		reqs = append(reqs, r)
	}
	return reqs
}

// FuzzStoreOps applies a random sequence of writes through Save and checks
// every answer, and the final keyspace, against the map model.
func FuzzStoreOps(f *testing.F) {
	f.Add([]byte{0, 0, 1, 0, 3, 2, 1, 6, 0, 12, 0, 1, 9, 0, 0})
	f.Add([]byte{1, 1, 0, 0, 4, 1, 2, 4, 1, 4, 4, 4, 4, 1, 1, 5, 4, 4, 6, 4, 7, 7, 1, 0, 8, 1, 0, 9, 1, 0})
	f.Add([]byte{0, 255, 0, 7, 255, 0, 9, 255, 0, 10, 255, 4, 12, 255, 1, 13, 255, 0, 2, 8, 1, 3, 17, 0, 10, 8, 4, 11, 8, 6})
	f.Add([]byte{0, 5, 1, 0, 14, 2, 0, 23, 1, 5, 5, 4, 6, 5, 9, 8, 2, 0, 9, 2, 0, 11, 14, 15, 0, 2, 0, 4, 8, 2, 12, 2, 1})
	f.Add([]byte("the quick brown fox jumps over the lazy dog, twice: the quick brown fox jumps over the lazy dog"))
	f.Add([]byte{0, 0, 1, 14, 0, 1, 14, 0, 4, 14, 0, 7, 0, 1, 2, 14, 1, 10, 15, 0, 0, 15, 0, 4, 15, 1, 0, 14, 2, 2, 14, 2, 11, 0, 0, 2})
	// Auth on without a root user, then with one, and the root user's
	// removal while auth is on and after.
	f.Add([]byte{14, 2, 2, 14, 3, 1, 14, 2, 2, 15, 3, 0, 14, 2, 3, 15, 3, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		reqs := decodeOps(data)
		if len(reqs) == 0 {
			return
		}
		ts := newTestStore(t)
		m := &model{nodes: map[string]*mnode{}}
		for start := 0; start < len(reqs); start += 5 {
			batch := reqs[start:min(start+5, len(reqs))]
			out := ts.apply(batch...)
			for i, res := range out {
				want := m.apply(&batch[i])
				checkResult(t, &batch[i], res, want, m.index)
			}
			if ts.Index() != m.index {
				t.Fatalf("store index %d, model %d", ts.Index(), m.index)
			}
		}
		if want, got := m.auth, ts.authValues(); !maps.Equal(want, got) {
			t.Fatalf("auth data %v, model %v", got, want)
		}
		visible := 0
		for p, n := range m.nodes {
			e, err := ts.get(p, false, false)
			if err != nil {
				t.Fatalf("GET %s: %v", p, err)
			}
			got := e.Node
			if got.Dir != n.dir || got.CreatedIndex != n.created || got.ModifiedIndex != n.modified ||
				(!n.dir && (got.Value == nil || *got.Value != n.value)) {
				t.Fatalf("GET %s: %s, model %+v", p, jsonOf(t, got), *n)
			}
			if !strings.Contains(p, "/_") {
				visible++
			}
		}
		root, err := ts.get("/", true, true)
		if err != nil {
			t.Fatal(err)
		}
		var count func([]*Node) int
		count = func(ns []*Node) int {
			c := len(ns)
			for _, n := range ns {
				c += count(n.Nodes)
			}
			return c
		}
		if c := count(root.Node.Nodes); c != visible {
			t.Fatalf("recursive listing has %d nodes, model %d visible", c, visible)
		}
	})
}

func checkResult(t *testing.T, r *Request, got Applied, want mresult, index uint64) {
	t.Helper()
	if want.code != 0 {
		if got.Err == nil || got.Err.ErrorCode != want.code || got.Err.Cause != want.cause || got.Err.Index != index {
			t.Fatalf("%+v: got %v / %s, model error %d %q [%d]", *r, verr(got.Err), jsonOf(t, got.Event), want.code, want.cause, index)
		}
		return
	}
	if got.Err != nil {
		t.Fatalf("%+v: got %v, model %+v", *r, got.Err, want)
	}
	e := got.Event
	n := e.Node
	if e.Action != want.action || n.Key != want.key || n.Dir != want.node.dir ||
		n.CreatedIndex != want.node.created || n.ModifiedIndex != want.node.modified ||
		(n.Value != nil) != want.hasValue || (want.hasValue && *n.Value != want.node.value) {
		t.Fatalf("%+v: got %s, model %+v", *r, jsonOf(t, e), want)
	}
}
