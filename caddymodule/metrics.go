package caddymodule

import (
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
)

// memberMetrics exports the member's state through Caddy's metrics (the
// admin endpoint's /metrics) under the names etcd 3.4 gives it, so that the
// dashboards and alerts written for etcd (etcd_server_has_leader,
// etcd_server_leader_changes_seen_total, ...) work as they are. Each
// config registers one in its own registry; the member outlives them.
type memberMetrics struct{ m *member }

// etcd's names and help texts.
var (
	metricHasLeader = prometheus.NewDesc("etcd_server_has_leader",
		"Whether or not a leader exists. 1 is existence, 0 is not.", nil, nil)
	metricIsLeader = prometheus.NewDesc("etcd_server_is_leader",
		"Whether or not this member is a leader. 1 if is, 0 otherwise.", nil, nil)
	metricLeaderChanges = prometheus.NewDesc("etcd_server_leader_changes_seen_total",
		"The number of leader changes seen.", nil, nil)
	metricID = prometheus.NewDesc("etcd_server_id",
		"Server or member ID in hexadecimal format. 1 for 'server_id' label with current ID.", []string{"server_id"}, nil)
	metricCommitted = prometheus.NewDesc("etcd_server_proposals_committed_total",
		"The total number of consensus proposals committed.", nil, nil)
	metricApplied = prometheus.NewDesc("etcd_server_proposals_applied_total",
		"The total number of consensus proposals applied.", nil, nil)
	metricWatchers = prometheus.NewDesc("etcd_debugging_store_watchers",
		"Count of currently active watchers.", nil, nil)
	metricPending = prometheus.NewDesc("etcd_server_proposals_pending",
		"The current number of pending proposals to commit.", nil, nil)
	metricFailed = prometheus.NewDesc("etcd_server_proposals_failed_total",
		"The total number of failed proposals seen.", nil, nil)
)

func (memberMetrics) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{metricHasLeader, metricIsLeader, metricLeaderChanges, metricID,
		metricCommitted, metricApplied, metricWatchers, metricPending, metricFailed} {
		ch <- d
	}
}

// Collect reads the member at each scrape. A member that has not started
// (or no longer runs) has no leader, and the rest is left out.
func (mm memberMetrics) Collect(ch chan<- prometheus.Metric) {
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	n := mm.m.running()
	if n == nil {
		gauge(metricHasLeader, 0)
		gauge(metricIsLeader, 0)
		return
	}
	s := n.Metrics()
	gauge(metricHasLeader, b2f(s.HasLeader))
	gauge(metricIsLeader, b2f(s.IsLeader))
	ch <- prometheus.MustNewConstMetric(metricLeaderChanges, prometheus.CounterValue, float64(s.LeaderChanges))
	gauge(metricID, 1, strconv.FormatUint(s.ID, 16))
	// etcd's own types: gauges, in spite of their _total.
	gauge(metricCommitted, float64(s.Committed))
	gauge(metricApplied, float64(s.Applied))
	gauge(metricWatchers, float64(s.Watchers))
	gauge(metricPending, float64(s.ProposalsPending))
	ch <- prometheus.MustNewConstMetric(metricFailed, prometheus.CounterValue, float64(s.ProposalsFailed))
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
