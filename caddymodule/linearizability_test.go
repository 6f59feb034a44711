package caddymodule

// A linearizability check of a three-member cluster under crashes: clients
// spread over the members set, compare-and-swap and quorum-read a few keys
// while members are killed with SIGKILL and restarted, and the recorded
// history is checked with porcupine against a register per key. This is the
// workload Jepsen ran against etcd (a CAS register per key, indeterminate
// operations left open) and the one etcd's robustness tests check with
// porcupine.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net/http"
	"net/url"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"
)

// linKeys are the registers the clients share: few, so that operations on
// each key overlap often.
var linKeys = []string{"/lin/a", "/lin/b", "/lin/c"}

const (
	// linClients is how many clients run at once, spread over the members.
	linClients = 7
	// linDuration is how long the clients run.
	linDuration = 15 * time.Second
	// linRequestTimeout outlasts the server's own request timeout (5 s plus
	// two election timeouts), so that a request the server still works on
	// gets the server's answer rather than a client-side timeout.
	linRequestTimeout = 15 * time.Second
	// linCheckTimeout bounds porcupine's search.
	linCheckTimeout = 30 * time.Second
)

// linKind is the kind of a register operation.
type linKind uint8

const (
	linRead  linKind = iota // GET ?quorum=true
	linWrite                // PUT value=
	linCAS                  // PUT prevValue= value=
)

// linInput is an operation as the client called it.
type linInput struct {
	Kind  linKind
	Key   string
	Value string // the value written (write, CAS)
	Prev  string // the value CAS expects
}

// linResult is what a CAS answered.
type linResult uint8

const (
	linOK       linResult = iota // written (CAS: 200)
	linMismatch                  // CAS: 412, the key holds another value
	linAbsent                    // CAS: 404, the key does not exist
)

// linOutput is what the operation returned. Unknown operations (a transport
// error, a 5xx) may or may not have taken effect; their return time is
// infinite, so the checker may place them anywhere after their call, the end
// of the history included, which is the same as never.
type linOutput struct {
	Unknown bool
	Value   string // read: the value, "" when the key is absent
	Result  linResult
}

// linModel is a register per key: the state of a partition is the key's
// value, "" while it does not exist (the clients never write "").
var linModel = porcupine.Model{
	Partition: func(history []porcupine.Operation) [][]porcupine.Operation {
		byKey := make(map[string][]porcupine.Operation)
		var order []string
		for _, op := range history {
			k := op.Input.(linInput).Key
			if _, ok := byKey[k]; !ok {
				order = append(order, k)
			}
			byKey[k] = append(byKey[k], op)
		}
		out := make([][]porcupine.Operation, 0, len(order))
		for _, k := range order {
			out = append(out, byKey[k])
		}
		return out
	},
	Init: func() any { return "" },
	Step: func(state, input, output any) (bool, any) {
		s, in, out := state.(string), input.(linInput), output.(linOutput)
		switch in.Kind {
		case linRead:
			return out.Value == s, s
		case linWrite:
			return true, in.Value
		default:
			if out.Unknown {
				// Where it is placed, the CAS does what the state there says.
				if s == in.Prev {
					return true, in.Value
				}
				return true, s
			}
			switch out.Result {
			case linOK:
				return s == in.Prev, in.Value
			case linMismatch:
				return s != "" && s != in.Prev, s
			default:
				return s == "", s
			}
		}
	},
	DescribeOperation: func(input, output any) string {
		in, out := input.(linInput), output.(linOutput)
		var res string
		switch {
		case out.Unknown:
			res = "unknown"
		case in.Kind == linRead:
			res = fmt.Sprintf("%q", out.Value)
		case out.Result == linOK:
			res = "ok"
		case out.Result == linMismatch:
			res = "412"
		default:
			res = "404"
		}
		switch in.Kind {
		case linRead:
			return fmt.Sprintf("get(%s) -> %s", in.Key, res)
		case linWrite:
			return fmt.Sprintf("set(%s, %q) -> %s", in.Key, in.Value, res)
		default:
			return fmt.Sprintf("cas(%s, %q→%q) -> %s", in.Key, in.Prev, in.Value, res)
		}
	},
	DescribeState: func(state any) string {
		if state.(string) == "" {
			return "(absent)"
		}
		return fmt.Sprintf("%q", state)
	},
}

// linNeverSent reports whether a request failed before reaching the server:
// the connection was refused, so nothing was sent and the operation had no
// effect (it is left out of the history).
func linNeverSent(err error) bool {
	return errors.Is(err, syscall.ECONNREFUSED)
}

// linCall performs op on m and classifies the answer. record is false when
// the operation is left out of the history: it never reached a server, or
// it is a read that failed (a read has no effect, so an unanswered one says
// nothing). A 4xx other than the ones the model knows is a test failure.
func linCall(t *testing.T, c *http.Client, m *testMember, in linInput) (out linOutput, record bool) {
	ctx, cancel := context.WithTimeout(context.Background(), linRequestTimeout)
	defer cancel()
	var req *http.Request
	var err error
	switch in.Kind {
	case linRead:
		req, err = m.newRequest(ctx, http.MethodGet, "/v2/keys"+in.Key+"?quorum=true", nil)
	case linWrite:
		req, err = m.newRequest(ctx, http.MethodPut, "/v2/keys"+in.Key, url.Values{"value": {in.Value}})
	default:
		req, err = m.newRequest(ctx, http.MethodPut, "/v2/keys"+in.Key, url.Values{"value": {in.Value}, "prevValue": {in.Prev}})
	}
	if err != nil {
		t.Errorf("request: %v", err)
		return out, false
	}
	status, body, err := linSend(c, req)
	unknown := func() (linOutput, bool) {
		if in.Kind == linRead || linNeverSent(err) {
			return linOutput{}, false
		}
		return linOutput{Unknown: true}, true
	}
	if err != nil || status/100 == 5 {
		return unknown()
	}
	var r struct {
		ErrorCode int       `json:"errorCode"`
		Node      crashNode `json:"node"`
	}
	if err := json.Unmarshal(body, &r); err != nil {
		t.Errorf("%s: %s %s: %d, undecodable %q: %v", m.Name, req.Method, in.Key, status, crashShort(body), err)
		return out, false
	}
	switch {
	case in.Kind == linRead && status == http.StatusOK:
		return linOutput{Value: r.Node.Value}, true
	case in.Kind == linRead && status == http.StatusNotFound && r.ErrorCode == 100:
		return linOutput{}, true
	case in.Kind != linRead && (status == http.StatusOK || status == http.StatusCreated):
		return linOutput{Result: linOK}, true
	case in.Kind == linCAS && status == http.StatusPreconditionFailed && r.ErrorCode == 101:
		return linOutput{Result: linMismatch}, true
	case in.Kind == linCAS && status == http.StatusNotFound && r.ErrorCode == 100:
		return linOutput{Result: linAbsent}, true
	}
	t.Errorf("%s: %+v: unexpected answer %d %s", m.Name, in, status, crashShort(body))
	return out, false
}

// linSend sends req and reads the whole answer; a body cut short is an error
// (the client never saw the outcome).
func linSend(c *http.Client, req *http.Request) (int, []byte, error) {
	resp, err := c.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp.StatusCode, body, err
}

// TestClusterIsLinearizable runs clients that set, compare-and-swap and
// quorum-read three keys on every member of a three-member cluster, while
// members, one at a time, are killed with SIGKILL and restarted; the history
// must be linearizable. Writes and CAS are linearizable in etcd, and so is
// GET with quorum=true (etcd v2's documented guarantee; Jepsen found the
// plain GET is not).
func TestClusterIsLinearizable(t *testing.T) {
	c := startCluster(t, 3, nil)
	ms := c.members
	client := crashClient(linClients * len(ms))
	defer client.CloseIdleConnections()

	base := time.Now()
	since := func() int64 { return int64(time.Since(base)) } // monotonic
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	// Stop the clients however the test ends; a Fatalf in the fault loop
	// below runs this too.
	defer func() {
		cancel()
		wg.Wait()
	}()
	histories := make([][]porcupine.Operation, linClients)
	var definite, unknown atomic.Int64
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	for id := range linClients {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(seed, uint64(id)))
			last := make(map[string]string) // the last value this client saw per key
			for seq := 0; ctx.Err() == nil; seq++ {
				m := ms[rng.IntN(len(ms))]
				in := linInput{Key: linKeys[rng.IntN(len(linKeys))], Value: fmt.Sprintf("c%d-%d", id, seq)}
				switch r := rng.IntN(10); {
				case r < 4:
					in.Kind, in.Value = linRead, ""
				case r < 6:
					in.Kind = linWrite
				default:
					// Mostly the value last seen, so that many CAS
					// succeed; now and then one that cannot.
					in.Kind, in.Prev = linCAS, last[in.Key]
					if in.Prev == "" || rng.IntN(8) == 0 {
						in.Prev = fmt.Sprintf("c%d-%d", rng.IntN(linClients), rng.IntN(seq+1))
					}
				}
				call := since()
				out, record := linCall(t, client, m, in)
				ret := since()
				if !record {
					continue
				}
				if out.Unknown {
					ret = math.MaxInt64
					unknown.Add(1)
				} else {
					definite.Add(1)
					switch {
					case in.Kind == linRead:
						last[in.Key] = out.Value
					case out.Result == linOK:
						last[in.Key] = in.Value
					}
				}
				histories[id] = append(histories[id], porcupine.Operation{
					ClientId: id, Input: in, Call: call, Output: out, Return: ret,
					Metadata: m.Name,
				})
			}
		})
	}

	// The faults: every couple of seconds one member is killed and, after a
	// moment down, restarted; the next kill waits until the cluster agrees on
	// a leader again, so a quorum always survives. The first victim is the
	// leader, the others are drawn at random.
	frng := rand.New(rand.NewPCG(seed, math.MaxUint64))
	end := time.NewTimer(linDuration)
	defer end.Stop()
	kills := 0
	wait := func(d time.Duration) bool {
		tm := time.NewTimer(d)
		defer tm.Stop()
		select {
		case <-tm.C:
			return true
		case <-end.C:
			return false
		}
	}
	for wait(time.Duration(1000+frng.IntN(1000)) * time.Millisecond) {
		victim := ms[frng.IntN(len(ms))]
		if kills == 0 {
			victim = c.byName(agreedLeader(t, ms, "", 10*time.Second).Name)
		}
		victim.kill9()
		kills++
		t.Logf("%v: killed %s", time.Since(base).Round(time.Millisecond), victim.Name)
		down := wait(time.Duration(300+frng.IntN(700)) * time.Millisecond)
		victim.restart(t)
		agreedLeader(t, ms, "", 15*time.Second)
		t.Logf("%v: %s back", time.Since(base).Round(time.Millisecond), victim.Name)
		if !down {
			break
		}
	}
	cancel()
	wg.Wait()

	var history []porcupine.Operation
	for _, h := range histories {
		history = append(history, h...)
	}
	t.Logf("%d kills; %d operations with a definite outcome, %d indeterminate", kills, definite.Load(), unknown.Load())
	if kills < 2 {
		t.Errorf("only %d kills in %v", kills, linDuration)
	}
	if definite.Load() < 500 {
		t.Errorf("only %d operations completed", definite.Load())
	}
	if t.Failed() {
		return
	}
	checkLinearizable(t, history)
}

// checkLinearizable checks history with porcupine; on a violation it writes
// porcupine's visualization of the history into the test's artifact
// directory (kept with go test -artifacts) and fails.
func checkLinearizable(t *testing.T, history []porcupine.Operation) {
	t.Helper()
	start := time.Now()
	res := porcupine.CheckOperationsTimeout(linModel, history, linCheckTimeout)
	t.Logf("porcupine: %s for %d operations in %v", res, len(history), time.Since(start).Round(time.Millisecond))
	switch res {
	case porcupine.Ok:
		return
	case porcupine.Unknown:
		t.Fatalf("porcupine could not decide within %v", linCheckTimeout)
	}
	res, info := porcupine.CheckOperationsVerbose(linModel, history, linCheckTimeout)
	path := filepath.Join(t.ArtifactDir(), "linearizability.html")
	if err := porcupine.VisualizePath(linModel, info, path); err != nil {
		t.Errorf("visualization: %v", err)
	}
	t.Fatalf("the history is not linearizable (%s); visualization: %s (kept with go test -artifacts)", res, path)
}

// TestLinearizabilityModel checks the model on small histories, so that a
// passing cluster run means something: a stale read and a CAS that succeeds
// against the wrong value are caught; an indeterminate write may take effect
// or not.
func TestLinearizabilityModel(t *testing.T) {
	op := func(client int, call, ret int64, in linInput, out linOutput) porcupine.Operation {
		in.Key = "/k"
		return porcupine.Operation{ClientId: client, Input: in, Call: call, Output: out, Return: ret}
	}
	write := linInput{Kind: linWrite, Value: "x"}
	read := linInput{Kind: linRead}
	cas := linInput{Kind: linCAS, Prev: "x", Value: "y"}
	for _, tc := range []struct {
		name    string
		history []porcupine.Operation
		want    porcupine.CheckResult
	}{
		{"read after write", []porcupine.Operation{
			op(0, 0, 10, write, linOutput{}),
			op(1, 20, 30, read, linOutput{Value: "x"}),
		}, porcupine.Ok},
		{"stale read", []porcupine.Operation{
			op(0, 0, 10, write, linOutput{}),
			op(1, 20, 30, read, linOutput{Value: ""}),
		}, porcupine.Illegal},
		{"concurrent read may miss the write", []porcupine.Operation{
			op(0, 0, 10, write, linOutput{}),
			op(1, 5, 30, read, linOutput{Value: ""}),
		}, porcupine.Ok},
		{"CAS on the value written", []porcupine.Operation{
			op(0, 0, 10, write, linOutput{}),
			op(1, 20, 30, cas, linOutput{Result: linOK}),
			op(0, 40, 50, read, linOutput{Value: "y"}),
		}, porcupine.Ok},
		{"CAS succeeds on an absent key", []porcupine.Operation{
			op(1, 20, 30, cas, linOutput{Result: linOK}),
		}, porcupine.Illegal},
		{"CAS mismatch on the expected value", []porcupine.Operation{
			op(0, 0, 10, write, linOutput{}),
			op(1, 20, 30, cas, linOutput{Result: linMismatch}),
		}, porcupine.Illegal},
		{"CAS absent on an existing key", []porcupine.Operation{
			op(0, 0, 10, write, linOutput{}),
			op(1, 20, 30, cas, linOutput{Result: linAbsent}),
		}, porcupine.Illegal},
		{"indeterminate write seen", []porcupine.Operation{
			op(0, 0, math.MaxInt64, write, linOutput{Unknown: true}),
			op(1, 20, 30, read, linOutput{Value: "x"}),
		}, porcupine.Ok},
		{"indeterminate write not seen", []porcupine.Operation{
			op(0, 0, math.MaxInt64, write, linOutput{Unknown: true}),
			op(1, 20, 30, read, linOutput{Value: ""}),
		}, porcupine.Ok},
		{"read before the write was called", []porcupine.Operation{
			op(1, 0, 10, read, linOutput{Value: "x"}),
			op(0, 20, math.MaxInt64, write, linOutput{Unknown: true}),
		}, porcupine.Illegal},
	} {
		if got := porcupine.CheckOperationsTimeout(linModel, tc.history, time.Second); got != tc.want {
			t.Errorf("%s: %s, want %s", tc.name, got, tc.want)
		}
	}
}
