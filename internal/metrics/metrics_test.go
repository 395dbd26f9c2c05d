package metrics_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/couponflow/dispatcher/internal/breaker"
	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/metrics"
	"github.com/couponflow/dispatcher/internal/ratelimit"
	"github.com/couponflow/dispatcher/internal/redistest"
	"github.com/couponflow/dispatcher/internal/wechat"
)

const mch = "1900000001"

// scrape fetches url over HTTP and parses the text exposition.
func scrape(t *testing.T, url string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s\n%s", url, resp.Status, body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(strings.NewReader(string(body)))
	if err != nil {
		t.Fatalf("the exposition does not parse: %v\n%s", err, body)
	}
	return mfs
}

// series lists a family's samples as "label=value,…" → value (a counter's,
// a gauge's, or a histogram's count).
func series(mfs map[string]*dto.MetricFamily, name string) map[string]float64 {
	out := map[string]float64{}
	mf := mfs[name]
	if mf == nil {
		return out
	}
	for _, m := range mf.GetMetric() {
		var labels []string
		for _, l := range m.GetLabel() {
			labels = append(labels, l.GetName()+"="+l.GetValue())
		}
		sort.Strings(labels)
		var v float64
		switch {
		case m.Counter != nil:
			v = m.GetCounter().GetValue()
		case m.Gauge != nil:
			v = m.GetGauge().GetValue()
		case m.Histogram != nil:
			v = float64(m.GetHistogram().GetSampleCount())
		}
		out[strings.Join(labels, ",")] = v
	}
	return out
}

// serve registers cs and serves them as the worker does.
func serve(t *testing.T, cs ...prometheus.Collector) string {
	t.Helper()
	reg := prometheus.NewRegistry()
	reg.MustRegister(cs...)
	return serveRegistry(t, reg)
}

func serveRegistry(t *testing.T, reg *prometheus.Registry) string {
	t.Helper()
	srv := httptest.NewServer(metrics.Handler(reg))
	t.Cleanup(srv.Close)
	return srv.URL + "/metrics"
}

func TestFleetCollectorCountsCampaigns(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	rdb := redistest.Start(t).Client()
	store := idempotency.New(rdb)
	for _, c := range []string{"spring", "autumn"} {
		if _, err := store.SaveCampaign(ctx, idempotency.Campaign{Name: c, MchID: mch, Deadline: time.Now().Add(time.Hour)}); err != nil {
			t.Fatal(err)
		}
	}
	sends := make([]idempotency.Send, 6)
	for i := range sends {
		sends[i] = idempotency.Send{MchID: mch, OutRequestNo: fmt.Sprintf("r%d", i), Campaign: "spring", OpenID: fmt.Sprintf("o%d", i), StockID: "S1"}
		if _, _, err := store.Register(ctx, sends[i]); err != nil {
			t.Fatal(err)
		}
	}
	claim := func(s idempotency.Send) {
		t.Helper()
		c, err := store.TryClaim(ctx, s, "w1", time.Minute)
		if err != nil || !c.Acquired {
			t.Fatalf("claim %s: %+v %v", s.OutRequestNo, c, err)
		}
	}
	finish := func(s idempotency.Send, r idempotency.Result) {
		t.Helper()
		if err := store.Finish(ctx, s, "w1", r); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 5; i++ {
		claim(sends[i])
	}
	finish(sends[0], idempotency.Result{State: idempotency.Succeeded, CouponID: "c0"})
	finish(sends[1], idempotency.Result{State: idempotency.Succeeded, CouponID: "c1"})
	finish(sends[2], idempotency.Result{State: idempotency.Failed, Code: "USER_ACCOUNT_ABNORMAL", Message: "m"})
	finish(sends[3], idempotency.Result{State: idempotency.WaitingRate, Code: "FREQUENCY_LIMIT_EXCEED"})
	// sends[4] stays in flight, sends[5] pending.

	url := serve(t, metrics.NewFleetCollector(store, nil, nil, mch))
	mfs := scrape(t, url)
	want := map[string]float64{
		"campaign=spring,state=pending": 1, "campaign=spring,state=in_flight": 1, "campaign=spring,state=retrying": 0,
		"campaign=spring,state=waiting_rate": 1, "campaign=spring,state=waiting_budget": 0,
		"campaign=spring,state=succeeded": 2, "campaign=spring,state=failed": 1, "campaign=spring,state=unknown": 0, "campaign=spring,state=cancelled": 0,
	}
	for _, st := range idempotency.States { // a campaign with no sends has every state, at 0
		want["campaign=autumn,state="+string(st)] = 0
	}
	if got := series(mfs, "couponflow_campaign_sends"); !equal(got, want) {
		t.Errorf("couponflow_campaign_sends = %v, want %v", got, want)
	}
	if got := series(mfs, "couponflow_campaign_total"); !equal(got, map[string]float64{"campaign=spring": 6, "campaign=autumn": 0}) {
		t.Errorf("couponflow_campaign_total = %v", got)
	}
	if got := series(mfs, "couponflow_campaign_failed"); !equal(got, map[string]float64{"campaign=spring,code=USER_ACCOUNT_ABNORMAL": 1}) {
		t.Errorf("couponflow_campaign_failed = %v", got)
	}
	if got := series(mfs, "couponflow_scrape_error"); !equal(got, map[string]float64{"source=campaigns": 0}) {
		t.Errorf("couponflow_scrape_error = %v", got)
	}

	// The rate counts whole seconds gone by: after one, the two successes
	// of that second are a rate of 2/s.
	time.Sleep(time.Until(time.Now().Truncate(time.Second).Add(1100 * time.Millisecond)))
	claim(sends[5])
	finish(sends[5], idempotency.Result{State: idempotency.Succeeded, CouponID: "c5"})
	finish(sends[4], idempotency.Result{State: idempotency.Failed, Code: "USER_ACCOUNT_ABNORMAL"})
	mfs = scrape(t, url)
	if got := series(mfs, "couponflow_campaign_send_rate")["campaign=spring"]; got <= 0 {
		t.Errorf("couponflow_campaign_send_rate = %v after successes a second ago", got)
	}
	got := series(mfs, "couponflow_campaign_sends")
	if got["campaign=spring,state=succeeded"] != 3 || got["campaign=spring,state=failed"] != 2 || got["campaign=spring,state=in_flight"] != 0 {
		t.Errorf("after finishing: %v", got)
	}
	if got := series(mfs, "couponflow_campaign_failed"); got["campaign=spring,code=USER_ACCOUNT_ABNORMAL"] != 2 {
		t.Errorf("couponflow_campaign_failed = %v", got)
	}
}

func TestFleetCollectorBreakersAndRate(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	rdb := redistest.Start(t).Client()
	limits := map[ratelimit.Endpoint]ratelimit.Limit{ratelimit.SendCoupon: {N: 100, Per: time.Second}, ratelimit.SendMultiuse: {N: 600, Per: time.Minute}}
	// The worker's limiter and the one scraped are different, as they are
	// on two machines: the rate is shared through Redis.
	worker := ratelimit.New(rdb, ratelimit.WithLimits(limits))
	scraped := ratelimit.New(rdb, ratelimit.WithLimits(limits))
	breakers := breaker.New(rdb)
	url := serve(t, metrics.NewFleetCollector(idempotency.New(rdb), scraped, breakers, mch))

	mfs := scrape(t, url)
	if got := series(mfs, "couponflow_ratelimit_rate"); !equal(got, map[string]float64{"endpoint=favor_send": 100, "endpoint=multiuse_send": 10}) {
		t.Errorf("couponflow_ratelimit_rate = %v", got)
	}
	if got := series(mfs, "couponflow_breaker_open"); len(got) != 0 {
		t.Errorf("couponflow_breaker_open = %v with no breaker open", got)
	}

	if _, _, err := worker.Throttled(ctx, mch, ratelimit.SendCoupon); err != nil {
		t.Fatal(err)
	}
	if _, err := breakers.Exhausted(ctx, mch, "S1", false); err != nil {
		t.Fatal(err)
	}
	if _, err := breakers.Exhausted(ctx, "another-merchant", "S9", false); err != nil {
		t.Fatal(err)
	}
	mfs = scrape(t, url)
	// The first 429 cuts the shared rate to a quarter while the fleet
	// measures WeChat's limit; the scrape reads it as the workers left it.
	if got := series(mfs, "couponflow_ratelimit_rate")["endpoint=favor_send"]; got != 25 {
		t.Errorf("couponflow_ratelimit_rate{favor_send} = %v after a 429, want 25", got)
	}
	if got := series(mfs, "couponflow_breaker_open"); !equal(got, map[string]float64{"stock_id=S1": 1}) {
		t.Errorf("couponflow_breaker_open = %v, want S1 only", got)
	}

	if err := breakers.Resume(ctx, mch, "S1"); err != nil {
		t.Fatal(err)
	}
	mfs = scrape(t, url)
	if got := series(mfs, "couponflow_breaker_open"); len(got) != 0 {
		t.Errorf("couponflow_breaker_open = %v after resume", got)
	}
	if got := series(mfs, "couponflow_scrape_error"); !equal(got, map[string]float64{"source=ratelimit": 0, "source=breakers": 0, "source=campaigns": 0}) {
		t.Errorf("couponflow_scrape_error = %v", got)
	}
}

func TestCallMetrics(t *testing.T) {
	t.Parallel()
	m := metrics.New()
	m.ObserveCall("favor_send", wechat.Success, "", 80*time.Millisecond)
	m.ObserveCall("favor_send", wechat.Success, "IGNORED", 30*time.Millisecond)
	m.ObserveCall("favor_send", wechat.RateLimited, "FREQUENCY_LIMIT_EXCEED", 5*time.Millisecond)
	m.ObserveCall("multiuse_send", wechat.Ambiguous, "not a code: <html>", 15*time.Second)
	for i := 0; i < 100; i++ { // past the bound on distinct codes
		m.ObserveCall("favor_send", wechat.Permanent, fmt.Sprintf("CODE_%d", i), time.Millisecond)
	}
	m.ObserveSlotWait("favor_send", 20*time.Millisecond)
	m.Held(metrics.HeldRateSlot)
	m.Held(metrics.HeldBudgetBreaker)
	m.Held(metrics.HeldBudgetBreaker)
	var none *metrics.Metrics // a handler without metrics
	none.ObserveCall("favor_send", wechat.Success, "", time.Second)
	none.ObserveSlotWait("favor_send", time.Second)
	none.Held(metrics.HeldBusy)

	reg := prometheus.NewRegistry()
	if err := m.Register(reg); err != nil {
		t.Fatal(err)
	}
	if err := m.Register(reg); err == nil {
		t.Error("registering twice succeeded")
	}
	mfs := scrape(t, serveRegistry(t, reg))
	calls := series(mfs, "couponflow_wechat_calls_total")
	if calls["code=,endpoint=favor_send,outcome=success"] != 2 ||
		calls["code=FREQUENCY_LIMIT_EXCEED,endpoint=favor_send,outcome=rate_limited"] != 1 ||
		calls["code=OTHER,endpoint=multiuse_send,outcome=ambiguous"] != 1 {
		t.Errorf("couponflow_wechat_calls_total = %v", calls)
	}
	if len(calls) > 70 || calls["code=OTHER,endpoint=favor_send,outcome=permanent"] == 0 {
		t.Errorf("%d series of couponflow_wechat_calls_total: codes are not bounded", len(calls))
	}
	secs := series(mfs, "couponflow_wechat_call_seconds")
	if secs["endpoint=favor_send,outcome=success"] != 2 || secs["endpoint=multiuse_send,outcome=ambiguous"] != 1 {
		t.Errorf("couponflow_wechat_call_seconds counts = %v", secs)
	}
	if got := series(mfs, "couponflow_ratelimit_wait_seconds"); !equal(got, map[string]float64{"endpoint=favor_send": 1}) {
		t.Errorf("couponflow_ratelimit_wait_seconds = %v", got)
	}
	if got := series(mfs, "couponflow_sends_held_total"); !equal(got, map[string]float64{"reason=budget_breaker": 2, "reason=merchant_breaker": 0, "reason=paused": 0, "reason=rate_slot": 1, "reason=busy": 0}) {
		t.Errorf("couponflow_sends_held_total = %v", got)
	}
}

// Redis gone: /readyz says so, /healthz does not, and /metrics still
// answers, with the fleet's sources flagged.
func TestHealthAndScrapeErrors(t *testing.T) {
	t.Parallel()
	srv := redistest.Start(t)
	rdb := srv.Client()
	store := idempotency.New(rdb)
	if _, err := store.SaveCampaign(context.Background(), idempotency.Campaign{Name: "spring", MchID: mch}); err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	m := metrics.New()
	if err := m.Register(reg); err != nil {
		t.Fatal(err)
	}
	reg.MustRegister(metrics.NewFleetCollector(store, ratelimit.New(rdb), breaker.New(rdb), mch),
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	healthz, readyz := metrics.Health(rdb)
	mux := http.NewServeMux()
	mux.Handle("/metrics", metrics.Handler(reg))
	mux.Handle("/healthz", healthz)
	mux.Handle("/readyz", readyz)
	hs := httptest.NewServer(mux)
	defer hs.Close()

	get := func(path string) (int, string) {
		t.Helper()
		resp, err := http.Get(hs.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := get("/readyz"); code != 200 || body != "ok\n" {
		t.Fatalf("/readyz with Redis up: %d %q", code, body)
	}
	if code, body := get("/healthz"); code != 200 || body != "ok\n" {
		t.Fatalf("/healthz: %d %q", code, body)
	}
	mfs := scrape(t, hs.URL+"/metrics")
	for _, name := range []string{"go_goroutines", "process_cpu_seconds_total", "couponflow_sends_held_total", "couponflow_campaign_total", "couponflow_ratelimit_rate"} {
		if _, ok := mfs[name]; !ok {
			t.Errorf("%s missing from the exposition", name)
		}
	}

	srv.Kill()
	start := time.Now()
	code, body := get("/readyz")
	if code != http.StatusServiceUnavailable || !strings.HasPrefix(body, "redis: ") {
		t.Fatalf("/readyz with Redis killed: %d %q", code, body)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("/readyz took %s", d)
	}
	if code, _ := get("/healthz"); code != 200 {
		t.Errorf("/healthz with Redis killed: %d", code)
	}
	mfs = scrape(t, hs.URL+"/metrics")
	if got := series(mfs, "couponflow_scrape_error"); !equal(got, map[string]float64{"source=ratelimit": 1, "source=breakers": 1, "source=campaigns": 1}) {
		t.Errorf("couponflow_scrape_error = %v with Redis killed", got)
	}
	if _, ok := mfs["go_goroutines"]; !ok {
		t.Error("the process metrics are gone with Redis")
	}
}

func equal(a, b map[string]float64) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}
