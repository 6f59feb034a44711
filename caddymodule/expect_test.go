package caddymodule

import (
	"bufio"
	"net"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"
)

// TestExpectContinueUnreadBodyAnswersAtOnce sends requests with Expect:
// 100-continue whose body the answer never reads, holding the body back as
// a client that waits for the 100 Continue does: etcd answers each at once,
// with Connection: close, and so must etcaddy (behind Caddy, whose
// idle-timeout reader made the server wait for the body first). A request
// whose body is read gets its 100 Continue and then its answer, on both.
func TestExpectContinueUnreadBodyAnswersAtOnce(t *testing.T) {
	e := startEtcd(t)
	m := startEtcaddy(t, etcaddyOpts{})
	form := "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 7\r\n"
	cases := []struct {
		name, head string
		status     int
	}{
		{"DELETE of a missing key", "DELETE /v2/keys/expect/missing HTTP/1.1\r\n" + form, http.StatusNotFound},
		{"GET with a body", "GET /v2/keys/expect/missing HTTP/1.1\r\n" + form, http.StatusNotFound},
		{"unknown method", "PATCH /v2/keys/expect/x HTTP/1.1\r\n" + form, http.StatusMethodNotAllowed},
		{"member add as text", "POST /v2/members HTTP/1.1\r\nContent-Type: text/plain\r\nContent-Length: 7\r\n", http.StatusUnsupportedMediaType},
	}
	for _, p := range []*proc{e, m} {
		u, err := url.Parse(p.ClientURL)
		if err != nil {
			t.Fatal(err)
		}
		for _, tc := range cases {
			resp := expectSend(t, u.Host, tc.head+"Host: "+u.Host+"\r\nExpect: 100-continue\r\n\r\n", "")
			if resp.StatusCode != tc.status || !resp.Close {
				t.Errorf("%s, %s: %d (Connection: %q), want %d with Connection: close", p.Name, tc.name, resp.StatusCode, resp.Header.Get("Connection"), tc.status)
			}
		}
		resp := expectSend(t, u.Host, "PUT /v2/keys/expect/x HTTP/1.1\r\nHost: "+u.Host+"\r\nExpect: 100-continue\r\n"+form+"\r\n", "value=1")
		if resp.StatusCode != http.StatusCreated {
			t.Errorf("%s, a PUT that waited for its 100 Continue: %d, want 201", p.Name, resp.StatusCode)
		}
	}
}

// expectSend writes head on a new connection to host and reads the answer,
// which must come within 10 s; a 100 Continue is answered with body.
func expectSend(t *testing.T, host, head, body string) *http.Response {
	t.Helper()
	c, err := net.Dial("tcp", host)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if err := c.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write([]byte(head)); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	for {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("%s: no answer within 10 s: %v", strings.SplitN(head, "\r\n", 2)[0], err)
		}
		if resp.StatusCode != http.StatusContinue {
			return resp
		}
		if body == "" {
			t.Fatalf("%s: 100 Continue for a body the answer does not read", strings.SplitN(head, "\r\n", 2)[0])
		}
		if _, err := c.Write([]byte(body)); err != nil {
			t.Fatal(err)
		}
	}
}
