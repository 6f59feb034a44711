package caddymodule

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/etcaddy/etcaddy/raftkv"
	"github.com/etcaddy/etcaddy/storage"
)

const formType = "application/x-www-form-urlencoded"

func keyReq(method, target, contentType, body string) *http.Request {
	var r *http.Request
	if body == "" {
		r = httptest.NewRequest(method, target, nil)
	} else {
		r = httptest.NewRequest(method, target, strings.NewReader(body))
	}
	if contentType != "" {
		r.Header.Set("Content-Type", contentType)
	}
	return r
}

// TestParseKeyRequestErrors checks every parameter's error, and that
// several bad parameters give the error etcd 3.4's parseKeyRequest gives:
// the first in its order.
func TestParseKeyRequestErrors(t *testing.T) {
	tests := []struct {
		name, method, target, ctype, body string
		code                              int
		cause                             string
	}{
		{"bad query escape", "GET", "/v2/keys/a?x=%zz", "", "", 210, `invalid URL escape "%zz"`},
		{"semicolon in query", "GET", "/v2/keys/a?a=1;b=2", "", "", 210, "invalid semicolon separator in query"},
		{"bad body escape", "PUT", "/v2/keys/a", formType, "value=%zz", 210, `invalid URL escape "%zz"`},
		{"form error beats prevIndex", "PUT", "/v2/keys/a?prevIndex=x", formType, "value=%zz", 210, `invalid URL escape "%zz"`},

		{"prevIndex not a number", "PUT", "/v2/keys/a?prevIndex=abc", "", "", 203, `invalid value for "prevIndex"`},
		{"prevIndex negative", "PUT", "/v2/keys/a?prevIndex=-1", "", "", 203, `invalid value for "prevIndex"`},
		{"prevIndex empty", "DELETE", "/v2/keys/a?prevIndex=", "", "", 203, `invalid value for "prevIndex"`},
		{"prevIndex beats waitIndex", "GET", "/v2/keys/a?waitIndex=x&prevIndex=y", "", "", 203, `invalid value for "prevIndex"`},
		{"waitIndex not a number", "GET", "/v2/keys/a?wait=true&waitIndex=x", "", "", 203, `invalid value for "waitIndex"`},
		{"waitIndex beats recursive", "GET", "/v2/keys/a?recursive=x&waitIndex=x", "", "", 203, `invalid value for "waitIndex"`},

		{"recursive maybe", "GET", "/v2/keys/a?recursive=maybe", "", "", 209, `invalid value for "recursive"`},
		{"recursive empty", "GET", "/v2/keys/a?recursive=", "", "", 209, `invalid value for "recursive"`},
		{"recursive bare", "GET", "/v2/keys/a?recursive", "", "", 209, `invalid value for "recursive"`},
		{"recursive beats sorted", "GET", "/v2/keys/a?sorted=x&recursive=x", "", "", 209, `invalid value for "recursive"`},
		{"sorted", "GET", "/v2/keys/a?sorted=yes", "", "", 209, `invalid value for "sorted"`},
		{"sorted beats wait", "GET", "/v2/keys/a?wait=x&sorted=x", "", "", 209, `invalid value for "sorted"`},
		{"wait", "GET", "/v2/keys/a?wait=2", "", "", 209, `invalid value for "wait"`},
		{"wait beats dir", "GET", "/v2/keys/a?dir=x&wait=x", "", "", 209, `invalid value for "wait"`},
		{"dir", "PUT", "/v2/keys/a?dir=on", "", "", 209, `invalid value for "dir"`},
		{"dir beats quorum", "GET", "/v2/keys/a?quorum=x&dir=x", "", "", 209, `invalid value for "dir"`},
		{"quorum", "GET", "/v2/keys/a?quorum=y", "", "", 209, `invalid value for "quorum"`},
		{"quorum beats stream", "GET", "/v2/keys/a?stream=x&quorum=x", "", "", 209, `invalid value for "quorum"`},
		{"stream", "GET", "/v2/keys/a?wait=true&stream=x", "", "", 209, `invalid value for "stream"`},
		{"bad wait on PUT is a bad value", "PUT", "/v2/keys/a?wait=x", "", "", 209, `invalid value for "wait"`},

		{"wait on PUT", "PUT", "/v2/keys/a?wait=true", "", "", 209, `"wait" can only be used with GET requests`},
		{"wait on HEAD", "HEAD", "/v2/keys/a?wait=true", "", "", 209, `"wait" can only be used with GET requests`},
		{"wait on DELETE", "DELETE", "/v2/keys/a?wait=1", "", "", 209, `"wait" can only be used with GET requests`},
		{"wait on PUT beats empty prevValue", "PUT", "/v2/keys/a?wait=true&prevValue=", "", "", 209, `"wait" can only be used with GET requests`},

		{"empty prevValue", "PUT", "/v2/keys/a?prevValue=", "", "", 201, `"prevValue" cannot be empty`},
		{"empty prevValue on DELETE", "DELETE", "/v2/keys/a?prevValue=", "", "", 201, `"prevValue" cannot be empty`},
		{"empty prevValue in body", "PUT", "/v2/keys/a?prevValue=x", formType, "prevValue=", 201, `"prevValue" cannot be empty`},
		{"empty prevValue beats noValueOnSuccess", "PUT", "/v2/keys/a?noValueOnSuccess=x&prevValue=", "", "", 201, `"prevValue" cannot be empty`},
		{"noValueOnSuccess", "PUT", "/v2/keys/a?noValueOnSuccess=sure", "", "", 209, `invalid value for "noValueOnSuccess"`},
		{"noValueOnSuccess beats ttl", "PUT", "/v2/keys/a?ttl=x&noValueOnSuccess=x", "", "", 209, `invalid value for "noValueOnSuccess"`},

		{"ttl not a number", "PUT", "/v2/keys/a?ttl=abc", "", "", 202, `invalid value for "ttl"`},
		{"ttl negative", "PUT", "/v2/keys/a", formType, "ttl=-1", 202, `invalid value for "ttl"`},
		{"ttl fraction", "PUT", "/v2/keys/a", formType, "ttl=1.5", 202, `invalid value for "ttl"`},
		{"ttl beats prevExist", "PUT", "/v2/keys/a?prevExist=x&ttl=x", "", "", 202, `invalid value for "ttl"`},

		{"prevExist", "PUT", "/v2/keys/a?prevExist=maybe", "", "", 209, "invalid value for prevExist"},
		{"prevExist empty", "PUT", "/v2/keys/a?prevExist=", "", "", 209, "invalid value for prevExist"},
		{"prevExist on DELETE is still parsed", "DELETE", "/v2/keys/a?prevExist=x", "", "", 209, "invalid value for prevExist"},
		{"prevExist beats refresh", "PUT", "/v2/keys/a?refresh=x&prevExist=x", "", "", 209, "invalid value for prevExist"},

		{"refresh", "PUT", "/v2/keys/a?refresh=please", "", "", 209, "invalid value for refresh"},
		{"refresh with value", "PUT", "/v2/keys/a?refresh=true&ttl=5", formType, "value=x", 211, "A value was provided on a refresh"},
		{"refresh without ttl", "PUT", "/v2/keys/a?refresh=true&prevExist=true", "", "", 212, "No TTL value set"},
		{"refresh with empty ttl", "PUT", "/v2/keys/a?refresh=true&ttl=", "", "", 212, "No TTL value set"},
		{"refresh value beats missing ttl", "PUT", "/v2/keys/a?refresh=true&value=x", "", "", 211, "A value was provided on a refresh"},

		{"invalid UTF-8 key", "PUT", "/v2/keys/u%ff", "", "", 209, "key is not valid UTF-8"},
		{"key too long", "PUT", "/v2/keys/" + strings.Repeat("k", maxKeyBytes), "", "", 209, "key is longer than 8192 bytes"},
		{"bad parameter beats bad key", "PUT", "/v2/keys/u%ff?dir=x", "", "", 209, `invalid value for "dir"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			kr, err := parseKeyRequest(keyReq(tt.method, tt.target, tt.ctype, tt.body))
			if err == nil {
				t.Fatalf("parsed as %+v, want error %d", kr, tt.code)
			}
			if err.ErrorCode != tt.code || err.Cause != tt.cause || err.Index != 0 {
				t.Fatalf("error %d %q index %d, want %d %q index 0", err.ErrorCode, err.Cause, err.Index, tt.code, tt.cause)
			}
			if err.StatusCode() != http.StatusBadRequest {
				t.Fatalf("status %d, want 400", err.StatusCode())
			}
		})
	}
}

func TestParseKeyRequestBodyTooLarge(t *testing.T) {
	body := "value=" + strings.Repeat("v", maxRequestBytes)
	r := keyReq("PUT", "/v2/keys/big", formType, body)
	r.Body = http.MaxBytesReader(httptest.NewRecorder(), r.Body, maxRequestBytes)
	_, err := parseKeyRequest(r)
	if err == nil || err.ErrorCode != storage.EcodeInvalidForm || err.Cause != causeBodyTooLarge {
		t.Fatalf("err = %v, want 210 %q", err, causeBodyTooLarge)
	}
}

func ptr[T any](v T) *T { return &v }

func TestParseKeyRequestFields(t *testing.T) {
	tests := []struct {
		name, method, target, ctype, body string
		want                              keyRequest
	}{
		{"root without slash", "GET", "/v2/keys", "", "", keyRequest{key: "/"}},
		{"root with slash", "GET", "/v2/keys/", "", "", keyRequest{key: "/"}},
		{"trailing slash ignored", "GET", "/v2/keys/dir/a/b/", "", "", keyRequest{key: "/dir/a/b"}},
		{"%2F is a slash", "GET", "/v2/keys/a%2Fb", "", "", keyRequest{key: "/a/b"}},
		{"%20 is a space", "GET", "/v2/keys/sp%20ace", "", "", keyRequest{key: "/sp ace"}},
		{"hidden key", "GET", "/v2/keys/_h", "", "", keyRequest{key: "/_h"}},
		{"booleans as ParseBool takes them", "GET", "/v2/keys/a?recursive=1&sorted=T&quorum=TRUE&dir=0&stream=False", "", "",
			keyRequest{key: "/a", recursive: true, sorted: true, quorum: true}},
		{"first value wins", "GET", "/v2/keys/a?recursive=true&recursive=bogus", "", "", keyRequest{key: "/a", recursive: true}},
		{"watch", "GET", "/v2/keys/a?wait=true&waitIndex=7&recursive=true&stream=true", "", "",
			keyRequest{key: "/a", wait: true, waitIndex: 7, recursive: true, stream: true}},
		{"value from the query", "PUT", "/v2/keys/a?value=q", "", "", keyRequest{key: "/a", value: "q"}},
		{"body beats query", "PUT", "/v2/keys/a?value=q", formType, "value=b", keyRequest{key: "/a", value: "b"}},
		{"body beats query for flags", "PUT", "/v2/keys/a?dir=false", formType, "dir=true", keyRequest{key: "/a", dir: true}},
		{"repeated value: first wins", "PUT", "/v2/keys/a", formType, "value=a&value=b", keyRequest{key: "/a", value: "a"}},
		{"JSON body is not parsed", "PUT", "/v2/keys/a", "application/json", `{"value":"j"}`, keyRequest{key: "/a"}},
		{"body without content type is not parsed", "PUT", "/v2/keys/a", "", "value=x", keyRequest{key: "/a"}},
		{"POST body", "POST", "/v2/keys/q", formType, "value=job&ttl=5", keyRequest{key: "/q", value: "job", ttl: ptr[uint64](5)}},
		{"DELETE body ignored", "DELETE", "/v2/keys/d", formType, "dir=true&recursive=bogus", keyRequest{key: "/d"}},
		{"GET body ignored", "GET", "/v2/keys/d", formType, "recursive=bogus", keyRequest{key: "/d"}},
		{"empty value is a value", "PUT", "/v2/keys/a", formType, "value=", keyRequest{key: "/a"}},
		{"empty ttl is no ttl", "PUT", "/v2/keys/a?ttl=", "", "", keyRequest{key: "/a"}},
		{"ttl zero", "PUT", "/v2/keys/a?ttl=0", "", "", keyRequest{key: "/a", ttl: ptr[uint64](0)}},
		{"huge ttl parses", "PUT", "/v2/keys/a?ttl=18446744073709551615", "", "", keyRequest{key: "/a", ttl: ptr(uint64(18446744073709551615))}},
		{"prevIndex zero", "PUT", "/v2/keys/a?prevIndex=0", "", "", keyRequest{key: "/a"}},
		{"CAS fields", "PUT", "/v2/keys/a?prevValue=one&prevIndex=4&prevExist=true", formType, "value=two",
			keyRequest{key: "/a", value: "two", prevValue: "one", prevIndex: 4, prevExist: ptr(true)}},
		{"prevExist false", "PUT", "/v2/keys/a?prevExist=false", "", "", keyRequest{key: "/a", prevExist: ptr(false)}},
		{"refresh with empty value", "PUT", "/v2/keys/a?refresh=true&ttl=10&value=", "", "", keyRequest{key: "/a", refresh: ptr(true), ttl: ptr[uint64](10)}},
		{"refresh false allows a value", "PUT", "/v2/keys/a?refresh=false&value=x", "", "", keyRequest{key: "/a", value: "x", refresh: ptr(false)}},
		{"noValueOnSuccess", "PUT", "/v2/keys/a?noValueOnSuccess=true", "", "", keyRequest{key: "/a", noValueOnSuccess: true}},
		{"unknown parameters ignored", "GET", "/v2/keys/a?consistent=true&foo=%20", "", "", keyRequest{key: "/a"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseKeyRequest(keyReq(tt.method, tt.target, tt.ctype, tt.body))
			if err != nil {
				t.Fatalf("error %v", err)
			}
			tt.want.method = tt.method
			if !sameKeyRequest(got, &tt.want) {
				t.Fatalf("got  %+v\nwant %+v", *got, tt.want)
			}
		})
	}
}

func sameKeyRequest(a, b *keyRequest) bool {
	eqU := func(x, y *uint64) bool { return (x == nil) == (y == nil) && (x == nil || *x == *y) }
	eqB := func(x, y *bool) bool { return (x == nil) == (y == nil) && (x == nil || *x == *y) }
	return a.method == b.method && a.key == b.key && a.value == b.value && a.dir == b.dir &&
		a.prevValue == b.prevValue && a.prevIndex == b.prevIndex && eqB(a.prevExist, b.prevExist) &&
		a.wait == b.wait && a.waitIndex == b.waitIndex && a.recursive == b.recursive &&
		a.sorted == b.sorted && a.quorum == b.quorum && a.stream == b.stream &&
		eqB(a.refresh, b.refresh) && eqU(a.ttl, b.ttl) && a.noValueOnSuccess == b.noValueOnSuccess
}

func TestExpirationIsAbsoluteAndBugCompatible(t *testing.T) {
	now := time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)
	tests := []struct {
		name string
		ttl  *uint64
		want int64
	}{
		{"no ttl", nil, 0},
		{"zero expires now", ptr[uint64](0), now.UnixNano()},
		{"five seconds", ptr[uint64](5), now.Add(5 * time.Second).UnixNano()},
		// etcd 3.4: time.Duration(ttl)*time.Second wraps to -1s.
		{"max uint64 wraps to a second ago", ptr(uint64(18446744073709551615)), now.Add(-time.Second).UnixNano()},
	}
	for _, tt := range tests {
		if got := expiration(tt.ttl, now); got != tt.want {
			t.Errorf("%s: expiration = %d, want %d", tt.name, got, tt.want)
		}
	}
}

func TestStorageRequestCarriesEveryField(t *testing.T) {
	now := time.Unix(1_000_000, 0)
	kr := &keyRequest{method: "PUT", key: "/a", value: "v", dir: true, prevValue: "p", prevIndex: 3,
		prevExist: ptr(true), recursive: true, refresh: ptr(true), ttl: ptr[uint64](2)}
	got := kr.storageRequest(now)
	want := storage.Request{Method: "PUT", Path: "/a", Val: "v", Dir: true, PrevValue: "p", PrevIndex: 3,
		PrevExist: got.PrevExist, Expiration: now.Add(2 * time.Second).UnixNano(), Recursive: true, Refresh: true}
	if got != want || got.PrevExist == nil || !*got.PrevExist {
		t.Fatalf("got %+v, want %+v", got, want)
	}
}

func TestRoutingAndPathCleaning(t *testing.T) {
	tests := []struct {
		path  string
		clean string
		ep    endpoint
	}{
		{"/v2/keys", "/v2/keys", epKeys},
		{"/v2/keys/", "/v2/keys/", epKeys},
		{"/v2/keys/a/b/", "/v2/keys/a/b/", epKeys},
		{"/v2/keys//foo", "/v2/keys/foo", epKeys},
		{"/v2/keys/a/./b", "/v2/keys/a/b", epKeys},
		{"/v2/keys/a/../b", "/v2/keys/b", epKeys},
		{"/v2/keys/..", "/v2", epV2Unknown},
		{"/v2", "/v2", epV2Unknown},
		{"/v2//keys/a", "/v2/keys/a", epKeys},
		{"/v2/keysx", "/v2/keysx", epV2Unknown},
		{"/v2/members", "/v2/members", epMembers},
		{"/v2/members/leader", "/v2/members/leader", epMembers},
		{"/v2/machines", "/v2/machines", epMachines},
		{"/v2/machines/", "/v2/machines/", epV2Unknown},
		{"/v2/stats/self", "/v2/stats/self", epStatsSelf},
		{"/v2/stats/store", "/v2/stats/store", epStatsStore},
		{"/v2/stats/leader", "/v2/stats/leader", epStatsLeader},
		{"/v2/stats/other", "/v2/stats/other", epV2Unknown},
		{"/v2/auth/enable", "/v2/auth/enable", epAuthEnable},
		{"/v2/auth/users/root", "/v2/auth/users/root", epAuth},
		{"/v2x", "/v2x", epNone},
		{"/version", "/version", epVersion},
		{"/health", "/health", epHealth},
		{"/app/x", "/app/x", epNone},
		{"/", "/", epNone},
	}
	for _, tt := range tests {
		clean := cleanPath(tt.path)
		if clean != tt.clean {
			t.Errorf("cleanPath(%q) = %q, want %q", tt.path, clean, tt.clean)
		}
		if ep := endpointOf(clean); ep != tt.ep {
			t.Errorf("endpointOf(%q) = %v, want %v", clean, ep, tt.ep)
		}
	}
	if !inAPI("/v2/keys/..") || inAPI("/app//x") {
		t.Error("inAPI misjudges the owner of an unclean path")
	}
}

func TestParseURLsAsEtcd(t *testing.T) {
	tests := []struct {
		in      []string
		want    string
		wantErr string
	}{
		{nil, "", "no valid URLs given"},
		{[]string{"not a url"}, "", "URL scheme must be http, https, unix, or unixs: not a url"},
		{[]string{"http://1.2.3.4"}, "", `URL address does not have the form "host:port": http://1.2.3.4`},
		{[]string{"http://1.2.3.4:5/x"}, "", "URL must not contain a path: http://1.2.3.4:5/x"},
		// etcd checks unix URLs alike (answers of etcd 3.4 to POST /v2/members).
		{[]string{"unix://x"}, "", `URL address does not have the form "host:port": unix://x`},
		{[]string{"unixs://x:1/path"}, "", "URL must not contain a path: unixs://x:1/path"},
		{[]string{" https://b:2 ", "http://a:1", "unix://sock:0"}, "http://a:1 https://b:2 unix://sock:0", ""},
	}
	for _, tt := range tests {
		got, err := raftkv.NormalizeURLs(tt.in)
		if tt.wantErr != "" {
			if err == nil || err.Error() != tt.wantErr {
				t.Errorf("NormalizeURLs(%q) error %v, want %q", tt.in, err, tt.wantErr)
			}
			continue
		}
		if err != nil || strings.Join(got, " ") != tt.want {
			t.Errorf("NormalizeURLs(%q) = %q, %v; want %q", tt.in, got, err, tt.want)
		}
	}
}
