package caddymodule

import (
	"fmt"
	"math/rand/v2"
	"net/url"
	"os"
	"strconv"
	"strings"
	"testing"
)

// TestRandomizedDifferentialAgainstEtcd sends seeded random sequences of key requests to a
// fresh etcd 3.4 and a fresh etcaddy and compares every answer, as the scripted differential
// test does. The requests mix the methods and parameters of the keys API on a few keys that
// nest (files, directories, hidden and in-order keys, the root), so that they meet each
// other's state: compare-and-swap and -delete against the indexes and values the servers
// hold, creates over existing nodes, deletes of full directories, malformed parameters, and
// watches from the history. Nothing expires during a run (TTLs are an hour): expiry times are
// the one thing the two servers may legitimately order differently. The seeds are fixed, so
// a failure reproduces; ETCADDY_DIFF_SEEDS (comma-separated) and ETCADDY_DIFF_STEPS run
// others.
func TestRandomizedDifferentialAgainstEtcd(t *testing.T) {
	seeds := []uint64{1, 2, 3}
	steps := 600
	if v := os.Getenv("ETCADDY_DIFF_SEEDS"); v != "" {
		seeds = nil
		for _, f := range strings.Split(v, ",") {
			n, err := strconv.ParseUint(strings.TrimSpace(f), 10, 64)
			if err != nil {
				t.Fatalf("ETCADDY_DIFF_SEEDS: %v", err)
			}
			seeds = append(seeds, n)
		}
	}
	if v := os.Getenv("ETCADDY_DIFF_STEPS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil {
			t.Fatalf("ETCADDY_DIFF_STEPS: %v", err)
		}
		steps = n
	}
	for _, seed := range seeds {
		t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
			randomDifferential(t, seed, steps, newDiffer(t, startEtcd(t), startSubject(t)), false)
		})
	}
	// The same against a three-member etcaddy, each request to a member picked at random:
	// writes through followers, reads with quorum=true (a default read on a follower may be
	// stale, as v2 allows), watches on the member whose index they start from.
	t.Run(fmt.Sprintf("cluster/seed=%d", seeds[0]), func(t *testing.T) {
		c := startCluster(t, 3, nil)
		d := newDiffer(t, startEtcd(t), c.members[0].proc)
		pick := rand.New(rand.NewPCG(seeds[0], 3))
		d.sub.route = func() *proc { return c.members[pick.IntN(len(c.members))].proc }
		randomDifferential(t, seeds[0], steps, d, true)
	})
}

// randomDifferential runs steps random requests of seed through d.
func randomDifferential(t *testing.T, seed uint64, steps int, d *differ, cluster bool) {
	g := randomSteps{rnd: rand.New(rand.NewPCG(seed, 0x6574636164647921)), cluster: cluster}
	// Every write's answer is saved as "last", so that prevIndex can name indexes the servers
	// hold (relative to each one's own). Ten writes first: an index a few below the current
	// one is then a real one.
	d.saveAs("first", "PUT", "/v2/keys/seed", vals("value", "start"))
	for i := range 10 {
		d.saveAs("last", "PUT", "/v2/keys/seed", vals("value", fmt.Sprint("start", i)))
	}
	for range steps {
		g.step(d)
	}
	t.Logf("seed %d: %d steps", seed, d.steps)
}

// randomSteps generates the requests of TestRandomizedDifferentialAgainstEtcd.
type randomSteps struct {
	rnd     *rand.Rand
	cluster bool // GETs with quorum=true, watches on one member
}

// The key space: a few names that nest, so that requests meet each other's nodes.
var randomKeys = []string{"/a", "/a/b", "/a/b/c", "/d", "/d/e", "/d/e/f/g", "/f", "/_h", "/a/_h", "/q", "/a/", "/"}

// Values are never numeric: a compare failure's cause "[x != y]" would read as indexes.
var randomValues = []string{"x", "y", "zz", ""}

func (g *randomSteps) pick(xs []string) string { return xs[g.rnd.IntN(len(xs))] }

func (g *randomSteps) chance(p float64) bool { return g.rnd.Float64() < p }

// index is an index the servers hold (the last write's X-Etcd-Index, or a few before it), or
// now and then one that is malformed or beyond any. (After a request refused for its
// parameters, "last" is 0 on both servers: the indexes made from it are then 0 or negative,
// malformed alike on both.)
func (g *randomSteps) index() string {
	if g.chance(0.05) {
		// An index beyond any held one is relative too: the causes that quote it are
		// compared relative to each server's start.
		return g.pick([]string{"0", "-1", "abc", "${first.etcd+100000}"})
	}
	return fmt.Sprintf("${last.etcd-%d}", g.rnd.IntN(8))
}

func (g *randomSteps) step(d *differ) {
	key := g.pick(randomKeys)
	q := url.Values{}
	switch m := g.pick([]string{"PUT", "PUT", "PUT", "PUT", "POST", "GET", "GET", "HEAD", "DELETE", "DELETE", "WATCH"}); m {
	case "PUT", "POST":
		form := url.Values{}
		if g.chance(0.85) {
			form.Set("value", g.pick(randomValues))
		}
		if g.chance(0.15) {
			q.Set("dir", g.pick([]string{"true", "false"}))
		}
		if g.chance(0.25) {
			q.Set("prevExist", g.pick([]string{"true", "false", "true", "false", "t", "1", "yes"}))
		}
		if g.chance(0.2) {
			q.Set("prevValue", g.pick(randomValues))
		}
		if g.chance(0.15) {
			q.Set("prevIndex", g.index())
		}
		if g.chance(0.12) {
			form.Set("ttl", g.pick([]string{"3600", "7200", "", "", "-1", "abc", "1.5"}))
		}
		if g.chance(0.06) {
			q.Set("refresh", "true")
		}
		if g.chance(0.05) {
			q.Set("noValueOnSuccess", "true")
		}
		d.saveAs("last", m, "/v2/keys"+key+query(q), form)
	case "GET", "HEAD":
		if g.chance(0.4) {
			q.Set("recursive", "true")
		}
		if g.chance(0.3) {
			q.Set("sorted", "true")
		}
		if g.cluster || g.chance(0.2) {
			q.Set("quorum", "true")
		}
		if m == "HEAD" && g.cluster {
			// etcd's HEAD reads locally, quorum=true or not (only a GET becomes a
			// quorum read), so a HEAD on a follower may be stale, as v2 allows: it goes
			// to the first member, after a quorum GET there caught that member up.
			defer d.sub.firstMemberOnly()()
			d.req("GET", "/v2/keys/?quorum=true", nil)
		}
		if q.Get("sorted") == "true" {
			d.sorted(m, "/v2/keys"+key+query(q), nil)
		} else {
			d.req(m, "/v2/keys"+key+query(q), nil)
		}
	case "DELETE":
		if g.chance(0.3) {
			q.Set("recursive", "true")
		}
		if g.chance(0.3) {
			q.Set("dir", "true")
		}
		if g.chance(0.15) {
			q.Set("prevValue", g.pick(randomValues))
		}
		if g.chance(0.15) {
			q.Set("prevIndex", g.index())
		}
		d.saveAs("last", m, "/v2/keys"+key+query(q), nil)
	case "WATCH":
		// From the history, so that it answers at once: a recursive watch of the root from
		// an index below the current one finds an event there (or 401 once the history
		// no longer reaches back, or 400 for a malformed index). The current index is the
		// X-Etcd-Index of a read of the root; not the current index itself, which has no
		// event when the last write was a refresh (both servers would wait the step out).
		defer d.sub.firstMemberOnly()() // both on the first member
		d.saveAs("now", "GET", "/v2/keys/?quorum=true", nil)
		q.Set("wait", "true")
		q.Set("recursive", "true")
		if g.chance(0.05) {
			q.Set("waitIndex", g.pick([]string{"-1", "abc"}))
		} else {
			q.Set("waitIndex", fmt.Sprintf("${now.etcd-%d}", 1+g.rnd.IntN(8)))
		}
		d.req("GET", "/v2/keys/"+query(q), nil)
	}
}

// query is q as a query string, its ${…} references left unescaped for expand.
func query(q url.Values) string {
	if len(q) == 0 {
		return ""
	}
	s := q.Encode()
	s = strings.ReplaceAll(s, "%24%7B", "${")
	s = strings.ReplaceAll(s, "%7D", "}")
	s = strings.ReplaceAll(s, "%2B", "+")
	return "?" + s
}
