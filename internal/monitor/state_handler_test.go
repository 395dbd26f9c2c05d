package monitor_test

import (
	"context"
	"encoding/csv"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/hibiken/asynq"

	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/monitor"
	"github.com/couponflow/dispatcher/internal/tasks"
)

// startWorker runs a real asynq server on the monitor's queue, as the
// worker does, so that it is listed among the live servers; its handler
// is never given a task here. It stops at the end of the test.
func startWorker(t *testing.T, r *rig) *asynq.Server {
	t.Helper()
	w := asynq.NewServerFromRedisClient(r.rdb, asynq.Config{Concurrency: 1,
		Queues: map[string]int{tasks.DefaultQueue: 1}, LogLevel: asynq.FatalLevel})
	if err := w.Start(asynq.HandlerFunc(func(context.Context, *asynq.Task) error { return nil })); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.Shutdown)
	insp := asynq.NewInspectorFromRedisClient(r.rdb)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if s, err := insp.Servers(); err == nil && len(s) > 0 {
			return w
		}
		if time.Now().After(deadline) {
			t.Fatal("the worker did not show in asynq's server list within 10s")
		}
	}
}

func detail(t *testing.T, r *rig, name string) monitor.CampaignDetail {
	t.Helper()
	resp, body := r.get("/api/campaigns/"+name, operator)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /api/campaigns/%s: %d\n%s", name, resp.StatusCode, body)
	}
	var c monitor.CampaignDetail
	if err := json.Unmarshal([]byte(body), &c); err != nil {
		t.Fatal(err)
	}
	return c
}

// TestCampaignStateWithoutWorker: with no worker alive a campaign is
// stalled, not running, and says why; once a worker beats it runs.
func TestCampaignStateWithoutWorker(t *testing.T) {
	r := newRig(t, monitor.WithBasicAuth(testUser, testPassword), monitor.WithMchID(testMchID))
	sends := r.campaign("summer", 4)
	finish(t, r.store, sends[0], succeeded("C-0"))

	c := detail(t, r, "summer")
	if c.State != monitor.StateStalled || c.Workers != 0 || !strings.Contains(c.StateWhy, "no live worker") {
		t.Errorf("without a worker: state %q (%s), %d workers; want stalled, 0", c.State, c.StateWhy, c.Workers)
	}
	_, body := r.get("/campaigns/summer", operator)
	mustContain(t, "campaign page without a worker", body, `<span class="bad">stalled</span>`,
		`data-campaign-state="stalled"`, `<span data-workers="0">0 live workers</span>`,
		`<summary>What the states mean</summary>`, `<dt>stalled</dt><dd>nothing will move it: no live worker serves the queue, or no send changed state for 5 min`)

	startWorker(t, r)
	c = detail(t, r, "summer")
	if c.State != monitor.StateRunning || c.Workers != 1 {
		t.Errorf("with a worker: state %q (%s), %d workers; want running, 1", c.State, c.StateWhy, c.Workers)
	}
	_, body = r.get("/", operator)
	mustContain(t, "index with a worker", body, `<span class="running">running</span>`, `1 live worker</span>`)

	// A failure counts in the failure rate (finish.lua's bucket), and the
	// pace of both gives an ETA for the two sends left.
	finish(t, r.store, sends[1], failed("PARAM_ERROR", "openid, bad"))
	for deadline := time.Now().Add(3 * time.Second); c.FailRate == 0 && time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		c = detail(t, r, "summer")
	}
	if c.FailRate <= 0 || c.FailRate10s <= 0 || c.Rate <= 0 {
		t.Errorf("rates %v/%v successes, %v/%v failures: want all > 0", c.Rate, c.Rate10s, c.FailRate, c.FailRate10s)
	}
	if !strings.HasPrefix(c.ETA, "in ") || c.ETAAt == nil || c.Elapsed == "" {
		t.Errorf("eta %q at %v, elapsed %q: want a time while it runs", c.ETA, c.ETAAt, c.Elapsed)
	}
	_, body = r.get("/campaigns/summer", operator)
	mustContain(t, "campaign page while running", body, `data-eta="summer">ETA: in `, `data-elapsed="summer">running for `,
		`data-fail-rate="summer">`)

	// Done: the rates drop to 0 at once and the page says how long it took.
	finish(t, r.store, sends[2], succeeded("C-2"))
	finish(t, r.store, sends[3], succeeded("C-3"))
	// done_at as package notify writes it.
	if err := r.rdb.HSet(context.Background(), r.store.Keys().Meta("summer"), "done_at", time.Now().UnixMilli()).Err(); err != nil {
		t.Fatal(err)
	}
	c = detail(t, r, "summer")
	if !c.Done || c.Rate != 0 || c.Rate10s != 0 || c.FailRate != 0 || c.FailRate10s != 0 || c.ETA != "" || c.Duration == "" {
		t.Errorf("done: rates %v %v %v %v, eta %q, duration %q; want zero rates, no ETA, a duration",
			c.Rate, c.Rate10s, c.FailRate, c.FailRate10s, c.ETA, c.Duration)
	}
	if c.State != monitor.StateDoneFailures {
		t.Errorf("done with one failure: state %q", c.State)
	}
	_, body = r.get("/campaigns/summer", operator)
	mustContain(t, "campaign page when done", body, `data-duration="summer">took `)
}

// TestCampaignStateAllFailed: a campaign whose every send failed is done
// with failures, never the green "done".
func TestCampaignStateAllFailed(t *testing.T) {
	r := newRig(t, monitor.WithBasicAuth(testUser, testPassword), monitor.WithMchID(testMchID))
	for _, s := range r.campaign("dud", 3) {
		finish(t, r.store, s, failed("STOCK_STATUS_ERROR", "stock 16000001 is stopped"))
	}
	c := detail(t, r, "dud")
	if c.State != monitor.StateDoneFailures || !strings.Contains(c.StateWhy, "all 3 sends failed") {
		t.Errorf("state %q (%s), want done with failures, all 3 failed", c.State, c.StateWhy)
	}
	_, body := r.get("/", operator)
	mustContain(t, "index", body, `<span class="bad">done with failures</span>`)
	if strings.Contains(body, `<span class="done">`) {
		t.Error("a campaign whose every send failed is shown green")
	}
}

// TestCampaignStateBlocked: sends held by an open breaker of the
// campaign's stock make it blocked, naming the stock; the breaker shows
// on that campaign's stock, and not on another campaign's.
func TestCampaignStateBlocked(t *testing.T) {
	r := newRig(t, monitor.WithBasicAuth(testUser, testPassword), monitor.WithMchID(testMchID))
	startWorker(t, r)
	sends := r.campaign("dry", 2)
	openBreaker(t, r, "16000001")
	for _, s := range sends {
		finish(t, r.store, s, idempotency.Result{State: idempotency.WaitingBudget, Code: "NOT_ENOUGH", Message: "批次预算不足"})
	}
	ctx := context.Background()
	if _, err := r.store.SaveCampaign(ctx, idempotency.Campaign{Name: "other", MchID: testMchID, Deadline: time.Now().Add(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	other := idempotency.Send{MchID: testMchID, OutRequestNo: "other-0", Campaign: "other", OpenID: "o1", StockID: "16000009"}
	if _, _, err := r.store.Register(ctx, other); err != nil {
		t.Fatal(err)
	}

	c := detail(t, r, "dry")
	if c.State != monitor.StateBlocked || !strings.Contains(c.StateWhy, "stock 16000001") {
		t.Errorf("state %q (%s), want blocked by stock 16000001", c.State, c.StateWhy)
	}
	if len(c.Stocks) != 1 || c.Stocks[0].StockID != "16000001" || c.Stocks[0].Breaker == nil ||
		!strings.Contains(c.Stocks[0].Remedy, "enqueuer stock resume --stock-id 16000001") ||
		!strings.Contains(c.Stocks[0].Remedy, "fail NOT_ENOUGH") || c.Stocks[0].NextProbeIn == "" {
		t.Errorf("stocks %+v, want 16000001 with its breaker, next probe and remedy", c.Stocks)
	}
	o := detail(t, r, "other")
	if len(o.Stocks) != 1 || o.Stocks[0].StockID != "16000009" || o.Stocks[0].Breaker != nil {
		t.Errorf("other campaign's stocks %+v, want 16000009 without a breaker", o.Stocks)
	}
	if o.State != monitor.StateQueued {
		t.Errorf("other campaign: state %q (%s), want queued", o.State, o.StateWhy)
	}
	if len(o.Merchant.OpenBreakers) != 0 || o.Merchant.OtherBreakers != 1 || len(c.Merchant.OpenBreakers) != 1 {
		t.Errorf("breakers: other campaign %+v, dry %+v; want 16000001's only on dry", o.Merchant, c.Merchant.OpenBreakers)
	}

	_, body := r.get("/campaigns/dry", operator)
	mustContain(t, "dry campaign page", body, `<span class="wait">blocked</span>`, `data-stock="16000001"`,
		`What to do: top up stock 16000001 (or restart it if it was stopped), then run enqueuer stock resume --stock-id 16000001`,
		`held sends fail NOT_ENOUGH at the campaign&#39;s budget deadline, in 2 days 23 h`, `next probe in `, `ETA: blocked`)
	_, body = r.get("/campaigns/other", operator)
	mustContain(t, "other campaign page", body, `<span class="wait">queued</span>`, `no open breaker`,
		`data-other-breakers="1"`)
	if strings.Contains(body, `class="breakers"`) {
		t.Error("another campaign's page shows 16000001's breaker")
	}
}

// TestCampaignReasons: the codes with WeChat's messages of failed,
// retrying and held sends come from the records, most frequent first, on
// the API and on the card.
func TestCampaignReasons(t *testing.T) {
	r := newRig(t, monitor.WithBasicAuth(testUser, testPassword), monitor.WithMchID(testMchID))
	sends := r.campaign("why", 6)
	finish(t, r.store, sends[0], succeeded("C-0"))
	finish(t, r.store, sends[1], failed("STOCK_STATUS_ERROR", "stock 16000004 is stopped"))
	finish(t, r.store, sends[2], failed("STOCK_STATUS_ERROR", "stock 16000004 is stopped"))
	finish(t, r.store, sends[3], failed("PARAM_ERROR", "openid, bad"))
	finish(t, r.store, sends[4], idempotency.Result{State: idempotency.Retrying, Code: "SYSTEM_ERROR", Message: "系统错误"})
	finish(t, r.store, sends[5], idempotency.Result{State: idempotency.WaitingBudget, Code: "NOT_ENOUGH", Message: "批次预算不足"})

	c := detail(t, r, "why")
	want := []monitor.Reason{
		{State: "failed", Code: "STOCK_STATUS_ERROR", Message: "stock 16000004 is stopped", N: 2},
		{State: "failed", Code: "PARAM_ERROR", Message: "openid, bad", N: 1},
		{State: "retrying", Code: "SYSTEM_ERROR", Message: "系统错误", N: 1},
		{State: "waiting_budget", Code: "NOT_ENOUGH", Message: "批次预算不足", N: 1},
	}
	if len(c.Reasons) != len(want) || c.ReasonsFrom != 6 {
		t.Fatalf("reasons %+v from %d records, want %+v from 6", c.Reasons, c.ReasonsFrom, want)
	}
	for i := range want {
		if c.Reasons[i] != want[i] {
			t.Errorf("reason %d: %+v, want %+v", i, c.Reasons[i], want[i])
		}
	}
	_, body := r.get("/", operator)
	mustContain(t, "index", body, `<tr data-reason="STOCK_STATUS_ERROR"><td>failed</td><td>STOCK_STATUS_ERROR</td><td>stock 16000004 is stopped</td><td class="n">2</td></tr>`,
		`<td>retrying</td><td>SYSTEM_ERROR</td><td>系统错误</td>`)
}

// TestReasonsSample: the list reads the first 1,000 records of a campaign
// for its reasons and says so; the campaign's own page reads them all (up
// to 20,000).
func TestReasonsSample(t *testing.T) {
	r := newRig(t, monitor.WithBasicAuth(testUser, testPassword), monitor.WithMchID(testMchID))
	sends := r.campaign("big", 1001)
	finish(t, r.store, sends[1000], failed("PARAM_ERROR", "openid, bad"))

	resp, body := r.get("/api/campaigns", operator)
	var list monitor.CampaignList
	if err := json.Unmarshal([]byte(body), &list); err != nil || resp.StatusCode != http.StatusOK || len(list.Campaigns) != 1 {
		t.Fatalf("list: %d %v %s", resp.StatusCode, err, tail(body, 500))
	}
	if c := list.Campaigns[0]; c.ReasonsFrom != 1000 || len(c.Reasons) != 0 {
		t.Errorf("list: reasons %+v from %d records, want none from the first 1000", c.Reasons, c.ReasonsFrom)
	}
	_, body = r.get("/", operator)
	mustContain(t, "index", body, `data-progress="big">1 of 1,001 done`,
		"No failed, retrying or held send in the first 1,000 of 1,001 sends; the campaign's page reads more")

	c := detail(t, r, "big")
	if c.ReasonsFrom != 1001 || c.ReasonsPartial || len(c.Reasons) != 1 || c.Reasons[0].Code != "PARAM_ERROR" {
		t.Errorf("page: reasons %+v from %d records, want PARAM_ERROR from 1001", c.Reasons, c.ReasonsFrom)
	}
}

// TestReportByState: the report of only some states (the card links to
// those its sends are in), and a state that does not exist refused.
func TestReportByState(t *testing.T) {
	r := newRig(t, monitor.WithBasicAuth(testUser, testPassword))
	sends := spring(t, r)

	resp, body := r.get("/api/campaigns/spring/report.csv?state=failed", operator)
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Disposition") != `attachment; filename="spring-failed.csv"` {
		t.Fatalf("failed report: %d %q\n%s", resp.StatusCode, resp.Header.Get("Content-Disposition"), body)
	}
	rows, err := csv.NewReader(strings.NewReader(body)).ReadAll()
	if err != nil || len(rows) != 2 || rows[1][0] != sends[2].OutRequestNo || rows[1][4] != "PARAM_ERROR" {
		t.Errorf("failed report: %v %q, want the header and %s", err, rows, sends[2].OutRequestNo)
	}
	_, body = r.get("/api/campaigns/spring/report.csv?state=failed&state=waiting_rate", operator)
	if rows, err := csv.NewReader(strings.NewReader(body)).ReadAll(); err != nil || len(rows) != 3 {
		t.Errorf("failed and waiting_rate: %v %q, want the header and 2 rows", err, rows)
	}
	if resp, _ := r.get("/api/campaigns/spring/report.csv?state=lost", operator); resp.StatusCode != http.StatusBadRequest {
		t.Errorf("state=lost: %d, want 400", resp.StatusCode)
	}
	_, body = r.get("/campaigns/spring", operator)
	mustContain(t, "campaign page", body, `<a href="/api/campaigns/spring/report.csv?state=failed" download data-csv-state="failed">failed</a>`,
		`data-csv-state="waiting_rate"`)
	if strings.Contains(body, `data-csv-state="succeeded"`) || strings.Contains(body, `data-csv-state="retrying"`) {
		t.Error("a CSV link for succeeded, or for a state no send is in")
	}
}
