// Package metrics exposes what a worker does, and what the fleet shares,
// to Prometheus.
//
// Metrics holds the worker's own counters and histograms: every WeChat call
// by endpoint and outcome, the time spent waiting for a slot of the shared
// rate, and the sends held before a call. NewFleetCollector reads, at
// scrape time, what lives in Redis and is the same for every worker: the
// shared rate, the open budget breakers and every campaign's counters. Every
// worker of a merchant reports the same fleet values, so aggregate them with
// max (or pick one instance), never sum.
//
// Handler serves the exposition; Health serves /healthz and /readyz.
package metrics

import (
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/couponflow/dispatcher/internal/wechat"
)

// Reasons a send is held before its call, the values of the reason label of
// couponflow_sends_held_total.
const (
	HeldBudgetBreaker = "budget_breaker" // the stock's budget breaker is open
	// HeldMerchantBreaker: WeChat refuses the merchant's signature
	// (SIGN_ERROR); every send of the merchant waits for a probe.
	HeldMerchantBreaker = "merchant_breaker"
	HeldPaused          = "paused"    // an operator paused the send's campaign
	HeldRateSlot        = "rate_slot" // the next slot of the shared rate is too far away
	HeldBusy            = "busy"      // the send, or another send to its user, is in flight
)

// CodeOther replaces a code that would grow the label set past its bound.
const CodeOther = "OTHER"

// maxCodes bounds the distinct values of the code label. WeChat's codes are
// a few dozen; anything beyond this many is a bug or a proxy's noise.
const maxCodes = 64

// Metrics is one worker's call metrics. Its methods are safe for concurrent
// use, and a nil *Metrics does nothing, so callers need no checks.
type Metrics struct {
	calls       *prometheus.CounterVec
	callSeconds *prometheus.HistogramVec
	slotWait    *prometheus.HistogramVec
	held        *prometheus.CounterVec
	done        prometheus.Counter

	mu    sync.Mutex
	codes map[string]bool
}

// New returns unregistered metrics; see Register.
func New() *Metrics {
	m := &Metrics{
		calls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "couponflow_wechat_calls_total",
			Help: "WeChat Pay calls by endpoint, outcome (success, rate_limited, budget_exhausted, ambiguous, permanent) and WeChat's code (empty for a success).",
		}, []string{"endpoint", "outcome", "code"}),
		callSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "couponflow_wechat_call_seconds",
			Help:    "Duration of WeChat Pay calls, signing to verified answer, by endpoint and outcome.",
			Buckets: []float64{.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 15},
		}, []string{"endpoint", "outcome"}),
		slotWait: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "couponflow_ratelimit_wait_seconds",
			Help:    "Time a send waited in the shared rate limiter, whether it got a slot or gave up because the next one was too far away (those are also counted in couponflow_sends_held_total{reason=\"rate_slot\"}).",
			Buckets: []float64{.001, .005, .01, .025, .05, .1, .25, .5, 1, 2, 5, 10, 30},
		}, []string{"endpoint"}),
		held: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "couponflow_sends_held_total",
			Help: "Sends stopped before calling WeChat, by reason: budget_breaker, rate_slot, busy.",
		}, []string{"reason"}),
		done: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "couponflow_campaigns_done_total",
			Help: "Campaigns this worker found done (nothing left for the workers); the fleet counts each campaign once, summed over workers.",
		}),
		codes: map[string]bool{},
	}
	for _, r := range []string{HeldBudgetBreaker, HeldMerchantBreaker, HeldPaused, HeldRateSlot, HeldBusy} {
		m.held.WithLabelValues(r) // present at 0 from the start
	}
	return m
}

// Register registers every metric with r.
func (m *Metrics) Register(r prometheus.Registerer) error {
	for _, c := range []prometheus.Collector{m.calls, m.callSeconds, m.slotWait, m.held, m.done} {
		if err := r.Register(c); err != nil {
			return err
		}
	}
	return nil
}

// ObserveCall counts one WeChat call and its duration. code is WeChat's
// code (or the client's own, such as NETWORK_ERROR); it is ignored for a
// success.
func (m *Metrics) ObserveCall(endpoint string, class wechat.Class, code string, d time.Duration) {
	if m == nil {
		return
	}
	outcome := class.String()
	if class == wechat.Success {
		code = ""
	} else {
		code = m.boundCode(code)
	}
	m.calls.WithLabelValues(endpoint, outcome, code).Inc()
	m.callSeconds.WithLabelValues(endpoint, outcome).Observe(d.Seconds())
}

// CampaignDone counts a campaign this worker found done.
func (m *Metrics) CampaignDone() {
	if m == nil {
		return
	}
	m.done.Inc()
}

// ObserveSlotWait records how long a send waited for a slot of the shared rate.
func (m *Metrics) ObserveSlotWait(endpoint string, d time.Duration) {
	if m == nil {
		return
	}
	m.slotWait.WithLabelValues(endpoint).Observe(d.Seconds())
}

// Held counts a send stopped before its call; reason is one of the Held*
// constants (anything else is counted as "other").
func (m *Metrics) Held(reason string) {
	if m == nil {
		return
	}
	switch reason {
	case HeldBudgetBreaker, HeldMerchantBreaker, HeldPaused, HeldRateSlot, HeldBusy:
	default:
		reason = "other"
	}
	m.held.WithLabelValues(reason).Inc()
}

// boundCode keeps the code label to a bounded set of well-formed values:
// WeChat's codes are upper-case identifiers, and only the first maxCodes
// distinct ones get a series of their own.
func (m *Metrics) boundCode(code string) string {
	if !wellFormed(code) {
		return CodeOther
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.codes[code] {
		return code
	}
	if len(m.codes) >= maxCodes {
		return CodeOther
	}
	m.codes[code] = true
	return code
}

func wellFormed(code string) bool {
	if code == "" || len(code) > 48 {
		return false
	}
	for _, c := range code {
		if !(c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_') {
			return false
		}
	}
	return true
}
