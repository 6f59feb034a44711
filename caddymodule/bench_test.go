package caddymodule

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

const (
	benchRounds  = 5               // rounds per workload and server, alternating servers: the machine is shared, medians need a few
	benchWindow  = 2 * time.Second // each throughput measurement
	benchClients = 64
	benchValue   = 256 // bytes per value
	benchGetKeys = 1000
	benchRSSKeys = 100000

	benchWatchers     = 1000
	benchWatchWrites  = 30  // at benchWatchRate: 3 s of writes per round
	benchWatchRate    = 10  // writes per second
	benchClockTicksHz = 100 // USER_HZ: Linux reports /proc/<pid>/stat times in 1/100 s on every common build
)

// benchServer is one server under measurement.
type benchServer struct {
	name string
	p    *proc
	c    *http.Client
}

// benchClient returns a client that keeps one connection per load
// generator, so the measurement is of requests, not of TCP handshakes.
func benchClient(conns int) *http.Client {
	return &http.Client{
		Transport: &http.Transport{
			DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
			MaxIdleConns:        conns,
			MaxIdleConnsPerHost: conns,
			IdleConnTimeout:     time.Minute,
		},
		Timeout: 30 * time.Second,
	}
}

// benchDo sends one request and drains the answer; any non-2xx is an error.
func benchDo(c *http.Client, method, u string, body string) error {
	var r io.Reader
	if body != "" {
		r = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, u, r)
	if err != nil {
		return err
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("%s %s: %d %s", method, u, resp.StatusCode, crashShort(b))
	}
	return nil
}

// benchResult is what one load run did.
type benchResult struct {
	ops     int64
	errs    int64
	elapsed time.Duration
	err     error // the first error, if any
}

func (r benchResult) rate() float64 { return float64(r.ops) / r.elapsed.Seconds() }

// benchLoad runs op from clients goroutines until d has passed, or until
// limit operations in total when limit > 0.
func benchLoad(clients int, d time.Duration, limit int64, op func(client, i int) error) benchResult {
	var (
		ops, errs, next atomic.Int64
		firstErr        error
		once            sync.Once
		wg              sync.WaitGroup
	)
	start := time.Now()
	deadline := start.Add(d)
	for c := 0; c < clients; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; time.Now().Before(deadline); i++ {
				if limit > 0 && next.Add(1) > limit {
					return
				}
				if err := op(c, i); err != nil {
					errs.Add(1)
					once.Do(func() { firstErr = err })
					continue
				}
				ops.Add(1)
			}
		}()
	}
	wg.Wait()
	return benchResult{ops: ops.Load(), errs: errs.Load(), elapsed: time.Since(start), err: firstErr}
}

// benchCPU returns the CPU time (user + system) process pid has used.
func benchCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// Fields after the command name, which is in parentheses and may hold
	// spaces: state is field 3, utime 14, stime 15.
	i := strings.LastIndexByte(string(b), ')')
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("short /proc/%d/stat", pid)
	}
	utime, err1 := strconv.ParseInt(f[11], 10, 64)
	stime, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("/proc/%d/stat: %v %v", pid, err1, err2)
	}
	return time.Duration(utime+stime) * time.Second / benchClockTicksHz, nil
}

// benchStatus returns a size from /proc/<pid>/status (VmRSS, RssAnon…), in
// bytes.
func benchStatus(pid int, field string) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("no %s for %d", field, pid)
}

// benchWatchDelivery runs benchWatchers watchers on one key while writing
// it benchWatchRate times a second, and returns every delivery latency:
// from just before the write is sent until a watcher has decoded its event.
// Watchers re-arm with waitIndex = modifiedIndex+1 after each event, as
// etcdctl watch --forever does, so none misses a write while it re-arms.
func benchWatchDelivery(s benchServer, round int) ([]time.Duration, int, error) {
	key := fmt.Sprintf("/bench/watch/r%d", round)
	c := benchClient(benchWatchers + 1)
	defer c.CloseIdleConnections()
	form := url.Values{"value": {"start"}}.Encode()
	req, _ := http.NewRequest(http.MethodPut, s.p.ClientURL+"/v2/keys"+key, strings.NewReader(form))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	resp, err := c.Do(req)
	if err != nil {
		return nil, 0, err
	}
	var start crashResponse
	err = json.NewDecoder(resp.Body).Decode(&start)
	resp.Body.Close()
	if err != nil || start.Node.ModifiedIndex == 0 {
		return nil, 0, fmt.Errorf("PUT %s: %v %+v", key, err, start)
	}

	var sent [benchWatchWrites]atomic.Int64 // unix nanos just before each write
	var (
		mu         sync.Mutex
		latencies  = make([]time.Duration, 0, benchWatchers*benchWatchWrites)
		registered atomic.Int64
		done       atomic.Int64
		firstErr   atomic.Value
		wg         sync.WaitGroup
	)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	for w := 0; w < benchWatchers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			waitIndex := start.Node.ModifiedIndex + 1
			first := true
			for ctx.Err() == nil {
				u := fmt.Sprintf("%s/v2/keys%s?wait=true&waitIndex=%d", s.p.ClientURL, key, waitIndex)
				req, _ := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
				resp, err := c.Do(req)
				if err != nil {
					if ctx.Err() == nil {
						firstErr.CompareAndSwap(nil, err)
					}
					return
				}
				if first {
					registered.Add(1)
					first = false
				}
				var ev crashResponse
				err = json.NewDecoder(resp.Body).Decode(&ev)
				now := time.Now()
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if err != nil {
					if ctx.Err() == nil {
						firstErr.CompareAndSwap(nil, fmt.Errorf("watch: %v", err))
					}
					return
				}
				seq, err := strconv.Atoi(ev.Node.Value)
				if err != nil || seq < 0 || seq >= benchWatchWrites {
					firstErr.CompareAndSwap(nil, fmt.Errorf("watch: unexpected event %+v", ev))
					return
				}
				mu.Lock()
				latencies = append(latencies, now.Sub(time.Unix(0, sent[seq].Load())))
				mu.Unlock()
				if seq == benchWatchWrites-1 {
					done.Add(1)
					return
				}
				waitIndex = ev.Node.ModifiedIndex + 1
			}
		}()
	}
	defer wg.Wait()
	defer cancel()

	poll(60*time.Second, func() bool { return registered.Load() >= benchWatchers || firstErr.Load() != nil })
	if e := firstErr.Load(); e != nil {
		return nil, 0, e.(error)
	}
	if n := registered.Load(); n < benchWatchers {
		return nil, 0, fmt.Errorf("only %d of %d watchers registered", n, benchWatchers)
	}

	// A ticker paces the load: the write rate is the workload, not a wait
	// for a condition.
	tick := time.NewTicker(time.Second / benchWatchRate)
	defer tick.Stop()
	for seq := 0; seq < benchWatchWrites; seq++ {
		<-tick.C
		sent[seq].Store(time.Now().UnixNano())
		if err := benchDo(c, http.MethodPut, s.p.ClientURL+"/v2/keys"+key, url.Values{"value": {strconv.Itoa(seq)}}.Encode()); err != nil {
			return nil, 0, err
		}
	}
	poll(30*time.Second, func() bool { return done.Load() >= benchWatchers || firstErr.Load() != nil })
	cancel()
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	missing := benchWatchers*benchWatchWrites - len(latencies)
	if e := firstErr.Load(); e != nil {
		return latencies, missing, e.(error)
	}
	return latencies, missing, nil
}

// benchMedian returns the median of xs.
func benchMedian(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// benchRow is one line of the result table.
type benchRow struct {
	workload string
	metric   string // short name for b.ReportMetric
	unit     string
	higher   bool // whether a higher figure is better
	target   string
	values   map[string][]float64 // per server, one per round
	notes    []string
	// first is the server in the etcaddy column: "etcaddy", unless the row
	// measures Caddy alone.
	first string
}

// firstServer is the server whose figures fill the etcaddy column.
func (r *benchRow) firstServer() string {
	if r.first != "" {
		return r.first
	}
	return "etcaddy"
}

func (r *benchRow) add(server string, v float64) {
	if r.values == nil {
		r.values = make(map[string][]float64)
	}
	r.values[server] = append(r.values[server], v)
}

// copyFrom adds server's figures of row from (the etcd column of a Caddy
// alone row is etcd's own figure for the workload).
func (r *benchRow) copyFrom(server string, from *benchRow) {
	for _, v := range from.values[server] {
		r.add(server, v)
	}
}

func (r *benchRow) note(format string, args ...any) {
	r.notes = append(r.notes, fmt.Sprintf(format, args...))
}

// BenchmarkVsEtcd runs etcaddy and a real etcd 3.4 (--enable-v2, fsync on,
// its default) side by side on this machine and prints, per workload, the
// median of benchRounds alternating rounds and the ratio etcaddy/etcd. It
// measures; it asserts no figure. Run it with ./xcaddy.sh bench, i.e.
//
//	go test ./caddymodule/ -run '^$' -bench BenchmarkVsEtcd -benchtime 1x
//
// The whole comparison runs once whatever b.N is: it takes minutes, and its
// figures are rates and latencies, not time per b.N iteration.
func BenchmarkVsEtcd(b *testing.B) {
	servers := []benchServer{
		{name: "etcaddy", p: startEtcaddy(b, etcaddyOpts{}), c: benchClient(benchClients)},
		{name: "etcd", p: startEtcd(b), c: benchClient(benchClients)},
	}
	value := url.Values{"value": {strings.Repeat("v", benchValue)}}.Encode()

	serial := &benchRow{metric: "serial-put", workload: "serial PUT, 1 client", unit: "ops/s", higher: true, target: ">= 1x"}
	put64 := &benchRow{metric: "put64", workload: "PUT, 64 clients, distinct keys", unit: "ops/s", higher: true, target: ">= 2x"}
	cpu := &benchRow{metric: "cpu-per-put", workload: "server CPU per PUT (64 clients)", unit: "µs/op", target: "lower is better"}
	get64 := &benchRow{metric: "get64", workload: "GET, 64 clients", unit: "ops/s", higher: true, target: ">= 1.3x"}
	quorum := &benchRow{metric: "quorum-get64", workload: "GET quorum=true, 64 clients", unit: "ops/s", higher: true, target: ">= 2x"}
	watch := &benchRow{metric: "watch-p99", workload: fmt.Sprintf("watch delivery p99, %d watchers, %d writes/s", benchWatchers, benchWatchRate), unit: "ms", target: "<= 1x"}
	rss := &benchRow{metric: "rss-100k", workload: fmt.Sprintf("RSS after %dk keys of %d B, fresh server", benchRSSKeys/1000, benchValue), unit: "MiB", target: "<= 0.5x"}
	// RSS counts mapped file pages too (the binary, etcaddy's member.db);
	// RssAnon is the process's own memory: heap, stacks.
	anon := &benchRow{metric: "rss-anon-100k", workload: "of that RSS, the anonymous part (RssAnon: heap, stacks)", unit: "MiB", target: "lower is better"}

	// Caddy alone: the same binary with no etcaddy in its config, answering
	// every request with a fixed GET answer (respond). What it reaches is
	// the most any handler served through Caddy's HTTP server reaches on
	// this machine with this load generator: the ceiling of the etcd
	// handler, whatever it does.
	answer := fmt.Sprintf(`{"action":"get","node":{"key":"/bench/get/500","value":"%s","modifiedIndex":501,"createdIndex":501}}`, strings.Repeat("v", benchValue))
	alone := benchServer{name: "Caddy alone", c: benchClient(benchClients), p: startEtcaddy(b, etcaddyOpts{Caddyfile: "{\n\tadmin 127.0.0.1:{admin_port}\n}\n\n" +
		"http://127.0.0.1:{client_port} {\n\trespond `" + answer + "` 200\n}\n"})}
	aloneGet := &benchRow{first: alone.name, metric: "caddy-alone-get64", workload: "Caddy alone (`respond` with a GET's answer), 64 clients; etcd: its GET", unit: "ops/s", higher: true, target: "the ceiling of any Caddy handler"}
	alonePut := &benchRow{first: alone.name, metric: "caddy-alone-put64", workload: "Caddy alone (`respond`), PUT, 64 clients; etcd: its PUT", unit: "ops/s", higher: true, target: "the ceiling of any Caddy handler"}
	aloneRSS := &benchRow{first: alone.name, metric: "caddy-alone-rss", workload: fmt.Sprintf("Caddy alone, RSS before any request; etcd: after %dk keys", benchRSSKeys/1000), unit: "MiB", target: "the floor of etcaddy's RSS"}
	if v, err := benchStatus(alone.p.Cmd.Process.Pid, "VmRSS"); err == nil {
		aloneRSS.add(alone.name, float64(v)/(1<<20))
	} else {
		aloneRSS.note("%v", err)
	}

	measure := func(row *benchRow, s benchServer, res benchResult) {
		row.add(s.name, res.rate())
		if res.errs > 0 {
			row.note("%s: %d errors, first: %v", s.name, res.errs, res.err)
		}
	}

	// Keys for the GET workloads, written once on each server.
	for _, s := range servers {
		var n atomic.Int64
		res := benchLoad(benchClients, time.Minute, benchGetKeys, func(_, _ int) error {
			return benchDo(s.c, http.MethodPut, fmt.Sprintf("%s/v2/keys/bench/get/%d", s.p.ClientURL, n.Add(1)-1), value)
		})
		if res.errs > 0 || res.ops < benchGetKeys {
			b.Fatalf("%s: loading %d keys: %d written, %d errors, first: %v", s.name, benchGetKeys, res.ops, res.errs, res.err)
		}
	}

	for round := 0; round < benchRounds; round++ {
		for _, s := range servers {
			measure(serial, s, benchLoad(1, benchWindow, 0, func(c, i int) error {
				return benchDo(s.c, http.MethodPut, fmt.Sprintf("%s/v2/keys/bench/serial/r%d/%d", s.p.ClientURL, round, i), value)
			}))
		}
		for _, s := range servers {
			before, err := benchCPU(s.p.Cmd.Process.Pid)
			res := benchLoad(benchClients, benchWindow, 0, func(c, i int) error {
				return benchDo(s.c, http.MethodPut, fmt.Sprintf("%s/v2/keys/bench/put/r%d/c%d/%d", s.p.ClientURL, round, c, i), value)
			})
			after, err2 := benchCPU(s.p.Cmd.Process.Pid)
			measure(put64, s, res)
			if err == nil && err2 == nil && res.ops > 0 {
				cpu.add(s.name, float64(after-before)/float64(time.Microsecond)/float64(res.ops))
			} else {
				cpu.note("%s: %v %v", s.name, err, err2)
			}
		}
		for _, s := range servers {
			measure(get64, s, benchLoad(benchClients, benchWindow, 0, func(c, i int) error {
				return benchDo(s.c, http.MethodGet, fmt.Sprintf("%s/v2/keys/bench/get/%d", s.p.ClientURL, (c*7919+i)%benchGetKeys), "")
			}))
		}
		measure(aloneGet, alone, benchLoad(benchClients, benchWindow, 0, func(c, i int) error {
			return benchDo(alone.c, http.MethodGet, fmt.Sprintf("%s/v2/keys/bench/get/%d", alone.p.ClientURL, (c*7919+i)%benchGetKeys), "")
		}))
		measure(alonePut, alone, benchLoad(benchClients, benchWindow, 0, func(c, i int) error {
			return benchDo(alone.c, http.MethodPut, fmt.Sprintf("%s/v2/keys/bench/put/r%d/c%d/%d", alone.p.ClientURL, round, c, i), value)
		}))
		for _, s := range servers {
			measure(quorum, s, benchLoad(benchClients, benchWindow, 0, func(c, i int) error {
				return benchDo(s.c, http.MethodGet, fmt.Sprintf("%s/v2/keys/bench/get/%d?quorum=true", s.p.ClientURL, (c*7919+i)%benchGetKeys), "")
			}))
		}
		for _, s := range servers {
			lat, missing, err := benchWatchDelivery(s, round)
			if err != nil {
				watch.note("%s round %d: %v", s.name, round, err)
			}
			if missing > 0 {
				watch.note("%s round %d: %d of %d deliveries missing", s.name, round, missing, benchWatchers*benchWatchWrites)
			}
			if len(lat) > 0 {
				slices.Sort(lat)
				p99 := lat[(len(lat)*99+99)/100-1]
				watch.add(s.name, float64(p99)/float64(time.Millisecond))
			}
		}
	}
	for _, s := range append(servers, alone) {
		s.c.CloseIdleConnections()
		s.p.stop()
	}
	aloneGet.copyFrom("etcd", get64)
	alonePut.copyFrom("etcd", put64)

	// RSS: a fresh process of each, loaded with the same keys; the servers
	// above are stopped so they do not compete for memory or CPU.
	for _, name := range []string{"etcaddy", "etcd"} {
		var p *proc
		if name == "etcaddy" {
			p = startEtcaddy(b, etcaddyOpts{})
		} else {
			p = startEtcd(b)
		}
		c := benchClient(benchClients)
		var n atomic.Int64
		res := benchLoad(benchClients, 10*time.Minute, benchRSSKeys, func(_, _ int) error {
			i := n.Add(1) - 1
			return benchDo(c, http.MethodPut, fmt.Sprintf("%s/v2/keys/bench/rss/d%03d/%d", p.ClientURL, i%100, i), value)
		})
		if res.errs > 0 || res.ops < benchRSSKeys {
			rss.note("%s: %d of %d keys written, %d errors, first: %v", name, res.ops, benchRSSKeys, res.errs, res.err)
		}
		c.CloseIdleConnections()
		for row, field := range map[*benchRow]string{rss: "VmRSS", anon: "RssAnon"} {
			if v, err := benchStatus(p.Cmd.Process.Pid, field); err == nil {
				row.add(name, float64(v)/(1<<20))
			} else {
				row.note("%s: %v", name, err)
			}
		}
		b.Logf("%s: loaded %d keys in %v (%.0f ops/s)", name, res.ops, res.elapsed.Round(time.Millisecond), res.rate())
		p.stop()
	}

	aloneRSS.copyFrom("etcd", rss)
	rows := []*benchRow{serial, put64, get64, quorum, watch, cpu, rss, anon, aloneGet, alonePut, aloneRSS}
	benchPrint("single member", "", rows)
	// The ratios also go to the benchmark line, for benchstat; the time of
	// the one iteration says nothing, so it is left out.
	b.ReportMetric(0, "ns/op")
	for _, r := range rows {
		if ea, ed := benchMedian(r.values[r.firstServer()]), benchMedian(r.values["etcd"]); ea > 0 && ed > 0 {
			b.ReportMetric(ea/ed, "etcaddy/etcd-"+r.metric)
		}
	}
}

// benchPrint writes the result table in markdown to stdout.
func benchPrint(setup, processes string, rows []*benchRow) {
	var sb strings.Builder
	fmt.Fprintf(&sb, "\n### etcaddy vs etcd 3.4 (v2 API, %s, median of %d alternating rounds)\n\n", setup, benchRounds)
	fmt.Fprintf(&sb, "`./xcaddy.sh bench` on %s; %setcd with its default fsync; figures from one machine, shared with whatever else ran.\n\n", benchMachine(), processes)
	sb.WriteString("| workload | etcaddy | etcd | ratio etcaddy/etcd | target |\n")
	sb.WriteString("| --- | ---: | ---: | ---: | --- |\n")
	for _, r := range rows {
		ea, ed := benchMedian(r.values[r.firstServer()]), benchMedian(r.values["etcd"])
		better := "lower is better"
		if r.higher {
			better = "higher is better"
		}
		ratio := "n/a"
		if ea > 0 && ed > 0 {
			ratio = fmt.Sprintf("%.2fx", ea/ed)
		}
		target := r.target
		if !strings.Contains(target, "better") {
			target += " (" + better + ")"
		}
		fmt.Fprintf(&sb, "| %s (%s) | %s | %s | %s | %s |\n", r.workload, r.unit, benchFigure(ea), benchFigure(ed), ratio, target)
	}
	for _, r := range rows {
		for _, server := range []string{r.firstServer(), "etcd"} {
			fmt.Fprintf(&sb, "\n- %s, %s, rounds: %s", r.workload, server, benchFigures(r.values[server]))
		}
		for _, n := range r.notes {
			fmt.Fprintf(&sb, "\n- %s: %s", r.workload, n)
		}
	}
	sb.WriteString("\n")
	fmt.Print(sb.String())
}

// benchMachine describes the CPU the figures come from.
func benchMachine() string {
	cpus := 0
	model := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.Lines(string(b)) {
			if k, v, ok := strings.Cut(line, ":"); ok {
				switch strings.TrimSpace(k) {
				case "processor":
					cpus++
				case "model name":
					model = strings.TrimSpace(v)
				}
			}
		}
	}
	return fmt.Sprintf("%d × %s", cpus, model)
}

// benchFigure formats a figure with the precision it deserves.
func benchFigure(v float64) string {
	switch {
	case v == 0:
		return "–"
	case v >= 100:
		return fmt.Sprintf("%.0f", v)
	default:
		return fmt.Sprintf("%.2f", v)
	}
}

// benchFigures formats one figure per round.
func benchFigures(vs []float64) string {
	s := make([]string, len(vs))
	for i, v := range vs {
		s[i] = benchFigure(v)
	}
	return strings.Join(s, ", ")
}
