package dispatch_test

import (
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/breaker"
	"github.com/couponflow/dispatcher/internal/dispatch"
	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/metrics"
	"github.com/couponflow/dispatcher/internal/ratelimit"
	"github.com/couponflow/dispatcher/internal/sandbox"
	"github.com/couponflow/dispatcher/internal/tasks"
)

// The call counters agree with what the sandbox answered, call for call:
// successes, injected 500s, 429s from its rate limit, NOT_ENOUGH from an
// exhausted stock and a permanent 404. Every slot wait and every hold is
// measured too.
func TestMetricsMatchTheSandboxLedger(t *testing.T) {
	t.Parallel()
	m := metrics.New()
	reg := prometheus.NewRegistry()
	if err := m.Register(reg); err != nil {
		t.Fatal(err)
	}
	w := newWorld(t, 8,
		func(*redis.Client) dispatch.Option { return dispatch.WithMetrics(m) },
		func(rdb *redis.Client) dispatch.Option {
			// Configured above the sandbox's limit, so that some calls get 429.
			lim := ratelimit.New(rdb, ratelimit.WithLimits(map[ratelimit.Endpoint]ratelimit.Limit{ratelimit.SendCoupon: {N: 150, Per: time.Second}}))
			return dispatch.WithLimiter(lim, time.Second)
		},
		func(rdb *redis.Client) dispatch.Option {
			return dispatch.WithBreakers(breaker.New(rdb, breaker.WithProbeInterval(time.Minute, time.Minute)))
		})
	// 10/s: even a loaded machine, whose calls take 400 ms, makes more
	// than 10 a second with 8 at a time, so some are answered 429.
	w.sb.SetFaults(sandbox.Faults{ErrorRate: 0.25, RateLimit: 10})

	const n = 40
	var sends []tasks.SendCoupon
	plenty := w.stock(sandbox.StockSpec{Budget: 1000})
	for i := 0; i < n; i++ {
		sends = append(sends, w.send(plenty, fmt.Sprintf("o%d", i), fmt.Sprintf("r-m-%d", i), far()))
	}
	// One coupon for three users: the others get NOT_ENOUGH, the breaker
	// opens and holds them until the deadline, where they fail.
	scarce := w.stock(sandbox.StockSpec{Budget: 1})
	// Long enough that a NOT_ENOUGH comes before it even on a loaded
	// machine: the 40 sends ahead take seconds at 20/s with faults.
	deadline := time.Now().Add(8 * time.Second)
	for i := 0; i < 3; i++ {
		sends = append(sends, w.send(scarce, fmt.Sprintf("s%d", i), fmt.Sprintf("r-s-%d", i), deadline))
	}
	for i := 0; i < 2; i++ {
		sends = append(sends, w.send("404404", fmt.Sprintf("p%d", i), fmt.Sprintf("r-p-%d", i), far()))
	}

	// Once every send has been tried, the faults stop, so that the
	// ambiguous ones succeed at their next retry.
	waitFor(t, 15*time.Second, func() bool { return requests(w.sb.Ledger()) >= int64(len(sends)) })
	w.sb.SetFaults(sandbox.Faults{})
	states := map[string]int{}
	for _, a := range sends {
		rec := waitTerminal(t, w, a, 20*time.Second)
		states[a.StockID+" "+string(rec.State)+" "+rec.Code]++
	}
	if states[plenty+" succeeded "] != n || states[scarce+" succeeded "] != 1 || states[scarce+" failed NOT_ENOUGH"] != 2 ||
		states["404404 failed RESOURCE_NOT_EXISTS"] != 2 {
		t.Fatalf("final states %v", states)
	}

	ledger := w.sb.Ledger()
	got := calls(t, reg)
	want := map[string]float64{}
	for key, count := range ledger.Requests {
		status, code, _ := strings.Cut(key, " ")
		want["favor_send|"+outcomeOf(status, code)+"|"+codeLabel(status, code)] += float64(count)
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("couponflow_wechat_calls_total\n got %v\nwant %v (the ledger: %v)", got, want, ledger.Requests)
	}
	for _, key := range []string{"favor_send|success|", "favor_send|ambiguous|SYSTEM_ERROR", "favor_send|rate_limited|FREQUENCY_LIMIT_EXCEED", "favor_send|budget_exhausted|NOT_ENOUGH", "favor_send|permanent|RESOURCE_NOT_EXISTS"} {
		if got[key] == 0 {
			t.Errorf("no %s call: the test did not exercise it (%v)", key, ledger.Requests)
		}
	}

	var total float64
	for _, v := range got {
		total += v
	}
	mfs := gather(t, reg)
	held := map[string]float64{}
	for _, s := range mfs["couponflow_sends_held_total"].GetMetric() {
		held[label(s, "reason")] = s.GetCounter().GetValue()
	}
	if held[metrics.HeldBudgetBreaker] < 1 {
		t.Errorf("no send held by the budget breaker: %v", held)
	}
	var timed, waits uint64
	for _, s := range mfs["couponflow_wechat_call_seconds"].GetMetric() {
		timed += s.GetHistogram().GetSampleCount()
	}
	for _, s := range mfs["couponflow_ratelimit_wait_seconds"].GetMetric() {
		waits += s.GetHistogram().GetSampleCount()
	}
	if float64(timed) != total {
		t.Errorf("%d calls timed, %v counted", timed, total)
	}
	// Every call waited for its slot first; a wait that gave up is a hold.
	if float64(waits) != total+held[metrics.HeldRateSlot] {
		t.Errorf("%d slot waits for %v calls and %v held for a slot", waits, total, held[metrics.HeldRateSlot])
	}
	t.Logf("calls %v; held %v; ledger %v", got, held, ledger.Requests)
}

func waitTerminal(t *testing.T, w *world, a tasks.SendCoupon, timeout time.Duration) idempotency.Record {
	t.Helper()
	var rec idempotency.Record
	waitFor(t, timeout, func() bool {
		rec = w.record(a)
		return rec.State.Terminal()
	})
	return rec
}

// outcomeOf classifies a ledger entry as the client does.
func outcomeOf(status, code string) string {
	s, _ := strconv.Atoi(status)
	switch {
	case s >= 200 && s < 300:
		return "success"
	case s == 429 || code == "FREQUENCY_LIMIT_EXCEED":
		return "rate_limited"
	case code == "NOT_ENOUGH":
		return "budget_exhausted"
	case s >= 500 || s == 0:
		return "ambiguous"
	}
	return "permanent"
}

func codeLabel(status, code string) string {
	if strings.HasPrefix(status, "2") {
		return ""
	}
	return code
}

func requests(l sandbox.Ledger) int64 {
	var n int64
	for _, c := range l.Requests {
		n += c
	}
	return n
}

func waitFor(t *testing.T, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not true after %s", timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func gather(t *testing.T, reg *prometheus.Registry) map[string]*dto.MetricFamily {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]*dto.MetricFamily{}
	for _, mf := range mfs {
		out[mf.GetName()] = mf
	}
	return out
}

// calls reads couponflow_wechat_calls_total as "endpoint|outcome|code" → count.
func calls(t *testing.T, reg *prometheus.Registry) map[string]float64 {
	t.Helper()
	out := map[string]float64{}
	for _, s := range gather(t, reg)["couponflow_wechat_calls_total"].GetMetric() {
		out[label(s, "endpoint")+"|"+label(s, "outcome")+"|"+label(s, "code")] = s.GetCounter().GetValue()
	}
	return out
}

func label(m *dto.Metric, name string) string {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}
