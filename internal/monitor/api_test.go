package monitor_test

import (
	"context"
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/monitor"
	"github.com/couponflow/dispatcher/internal/tasks"
)

var operator = basic(testUser, testPassword)

// spring is a campaign of five sends: two succeeded, one failed for good,
// one waiting on the rate limit, one pending.
func spring(t *testing.T, r *rig) []idempotency.Send {
	t.Helper()
	sends := r.campaign("spring", 5)
	finish(t, r.store, sends[0], succeeded("C-0"))
	finish(t, r.store, sends[1], succeeded("C-1"))
	finish(t, r.store, sends[2], failed("PARAM_ERROR", "openid, bad"))
	finish(t, r.store, sends[3], idempotency.Result{State: idempotency.WaitingRate, Code: "FREQUENCY_LIMIT_EXCEED", Message: "slow down"})
	return sends
}

func TestCampaignAPI(t *testing.T) {
	r := newRig(t, monitor.WithBasicAuth(testUser, testPassword), monitor.WithMchID(testMchID))
	spring(t, r)

	resp, body := r.get("/api/campaigns/spring", operator)
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "application/json" {
		t.Fatalf("GET /api/campaigns/spring: %d %s\n%s", resp.StatusCode, resp.Header.Get("Content-Type"), body)
	}
	var c monitor.CampaignDetail
	if err := json.Unmarshal([]byte(body), &c); err != nil {
		t.Fatal(err)
	}
	if c.Name != "spring" || c.MchID != testMchID || c.Total != 5 || c.Succeeded != 2 || c.Failed != 1 ||
		c.Finished != 3 || c.Percent != 60 || c.Done {
		t.Errorf("campaign: %+v", c.Campaign)
	}
	wantStates := map[string]int64{"pending": 1, "in_flight": 0, "retrying": 0, "waiting_rate": 1,
		"waiting_budget": 0, "succeeded": 2, "failed": 1}
	for k, v := range wantStates {
		if c.ByState[k] != v {
			t.Errorf("by_state[%s] = %d, want %d (all: %v)", k, c.ByState[k], v, c.ByState)
		}
	}
	if len(c.FailedByCode) != 1 || c.FailedByCode["PARAM_ERROR"] != 1 {
		t.Errorf("failed_by_code %v, want PARAM_ERROR: 1", c.FailedByCode)
	}
	if c.Links.Report != "/api/campaigns/spring/report.csv" || c.Links.Queue != "/monitoring/queues/coupons" {
		t.Errorf("links %+v", c.Links)
	}
	if c.Merchant.MchID != testMchID || c.Merchant.Rates["favor_send"] != 500 || len(c.Merchant.OpenBreakers) != 0 {
		t.Errorf("merchant %+v", c.Merchant)
	}

	// The rate counts whole seconds: once this one is over, it shows.
	deadline := time.Now().Add(3 * time.Second)
	for c.Rate <= 0 && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
		_, body = r.get("/api/campaigns/spring", operator)
		if err := json.Unmarshal([]byte(body), &c); err != nil {
			t.Fatal(err)
		}
	}
	if c.Rate <= 0 || c.Rate > 2 || c.Rate10s <= 0 || c.Rate10s > 2 {
		t.Errorf("rate_per_second %v, rate_10s %v, want (0, 2] after two successes", c.Rate, c.Rate10s)
	}

	// The list has it, with the merchant.
	resp, body = r.get("/api/campaigns", operator)
	var list monitor.CampaignList
	if err := json.Unmarshal([]byte(body), &list); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /api/campaigns: %d %v\n%s", resp.StatusCode, err, body)
	}
	if len(list.Campaigns) != 1 || list.Campaigns[0].Name != "spring" || list.Campaigns[0].Succeeded != 2 {
		t.Errorf("list %+v", list.Campaigns)
	}
	if len(list.Merchants) != 1 || list.Merchants[0].MchID != testMchID {
		t.Errorf("merchants %+v", list.Merchants)
	}

	// An unknown campaign is a 404, in the API, the report and the page.
	for _, path := range []string{"/api/campaigns/autumn", "/api/campaigns/autumn/report.csv", "/campaigns/autumn"} {
		if resp, body := r.get(path, operator); resp.StatusCode != http.StatusNotFound || !strings.Contains(body, "autumn") {
			t.Errorf("GET %s: %d %q, want 404 naming it", path, resp.StatusCode, body)
		}
	}
}

func TestReportCSV(t *testing.T) {
	r := newRig(t, monitor.WithBasicAuth(testUser, testPassword))
	sends := spring(t, r)

	resp, body := r.get("/api/campaigns/spring/report.csv", operator)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("report: %d\n%s", resp.StatusCode, body)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "text/csv; charset=utf-8" {
		t.Errorf("Content-Type %q", ct)
	}
	if cd := resp.Header.Get("Content-Disposition"); cd != `attachment; filename="spring-report.csv"` {
		t.Errorf("Content-Disposition %q", cd)
	}
	rows, err := csv.NewReader(strings.NewReader(body)).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	// The same columns as enqueuer report, redemptions last.
	if got := strings.Join(rows[0], ","); got != "out_request_no,openid,state,coupon_id,error_code,error_message,attempts,first_attempt,last_attempt,"+strings.Join(idempotency.ReportHeaderWithRedemptions[9:], ",") {
		t.Errorf("header %s", got)
	}
	if len(rows) != 6 {
		t.Fatalf("%d rows, want a header and 5:\n%s", len(rows), body)
	}
	want := [][]string{
		{sends[0].OutRequestNo, sends[0].OpenID, "succeeded", "C-0", "", "", "1"},
		{sends[1].OutRequestNo, sends[1].OpenID, "succeeded", "C-1", "", "", "1"},
		{sends[2].OutRequestNo, sends[2].OpenID, "failed", "", "PARAM_ERROR", "openid, bad", "1"},
		{sends[3].OutRequestNo, sends[3].OpenID, "waiting_rate", "", "FREQUENCY_LIMIT_EXCEED", "slow down", "1"},
		{sends[4].OutRequestNo, sends[4].OpenID, "pending", "", "", "", "0"},
	}
	for i, w := range want {
		row := rows[i+1]
		if strings.Join(row[9:], "") != "" {
			t.Errorf("row %d: redemption columns %q for a coupon never used", i+1, row[9:])
		}
		if strings.Join(row[:7], "|") != strings.Join(w, "|") {
			t.Errorf("row %d: %q, want %q", i+1, row[:7], w)
		}
		tried := w[6] != "0"
		for _, col := range row[7:9] {
			if tried {
				if ts, err := time.Parse(time.RFC3339Nano, col); err != nil || time.Since(ts) > time.Minute || !strings.HasSuffix(col, "Z") {
					t.Errorf("row %d: time %q, want a recent UTC RFC 3339 time", i+1, col)
				}
			} else if col != "" {
				t.Errorf("row %d: time %q for a send never tried", i+1, col)
			}
		}
	}
}

// TestReportStreamsLargeCampaign: a report longer than one batch of the
// store and of the writer's flushes comes whole and in order.
func TestReportStreamsLargeCampaign(t *testing.T) {
	r := newRig(t, monitor.WithToken(testToken))
	const n = 2345
	ctx := context.Background()
	if _, err := r.store.SaveCampaign(ctx, idempotency.Campaign{Name: "big", MchID: testMchID}); err != nil {
		t.Fatal(err)
	}
	for i := range n {
		send := idempotency.Send{MchID: testMchID, OutRequestNo: fmt.Sprintf("big-%05d", i), Campaign: "big",
			OpenID: fmt.Sprintf("o%05d", i), StockID: "1"}
		if _, _, err := r.store.Register(ctx, send); err != nil {
			t.Fatal(err)
		}
	}
	resp, body := r.get("/api/campaigns/big/report.csv", bearer(testToken))
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("report: %d", resp.StatusCode)
	}
	rows, err := csv.NewReader(strings.NewReader(body)).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != n+1 {
		t.Fatalf("%d rows, want %d and a header", len(rows)-1, n)
	}
	for i, row := range rows[1:] {
		if want := fmt.Sprintf("big-%05d", i); row[0] != want || row[2] != "pending" {
			t.Fatalf("row %d: %q, want %s pending", i+1, row, want)
		}
	}
	// A name no campaign can have is simply unknown.
	if resp, _ := r.get("/api/campaigns/%7Bbad%7D/report.csv", bearer(testToken)); resp.StatusCode != http.StatusNotFound {
		t.Errorf("report of an invalid name: %d, want 404", resp.StatusCode)
	}
}

func TestMetrics(t *testing.T) {
	extra := prometheus.NewGauge(prometheus.GaugeOpts{Name: "couponflow_test_extra", Help: "from WithCollectors"})
	extra.Set(7)
	r := newRig(t, monitor.WithBasicAuth(testUser, testPassword), monitor.WithCollectors(extra))
	client := asynq.NewClientFromRedisClient(r.rdb)
	for _, id := range []string{"a", "b", "c"} {
		if _, err := client.Enqueue(asynq.NewTask(tasks.TypeSendCoupon, []byte("{}")), asynq.Queue(tasks.DefaultQueue), asynq.TaskID(id)); err != nil {
			t.Fatal(err)
		}
	}
	resp, body := r.get("/metrics", operator)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("/metrics: %d\n%s", resp.StatusCode, body)
	}
	// asynq's queue collector (github.com/hibiken/asynq/x/metrics).
	mustContain(t, "/metrics", body,
		`asynq_tasks_enqueued_total{queue="coupons",state="pending"} 3`,
		`asynq_queue_size{queue="coupons"} 3`,
		`asynq_queue_paused_total{queue="coupons"} 0`,
		"couponflow_test_extra 7")
}

func TestAsynqmonThroughOurMount(t *testing.T) {
	r := newRig(t, monitor.WithBasicAuth(testUser, testPassword), monitor.WithAsynqmonWrites(true))
	client := asynq.NewClientFromRedisClient(r.rdb)
	if _, err := client.Enqueue(asynq.NewTask(tasks.TypeSendCoupon, []byte(`{"v":1}`)), asynq.Queue("coupons"), asynq.TaskID("t1")); err != nil {
		t.Fatal(err)
	}

	resp, body := r.get("/monitoring/api/queues", operator)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("/monitoring/api/queues: %d\n%s", resp.StatusCode, body)
	}
	var got struct {
		Queues []struct {
			Queue   string `json:"queue"`
			Size    int    `json:"size"`
			Pending int    `json:"pending"`
		} `json:"queues"`
	}
	if err := json.Unmarshal([]byte(body), &got); err != nil {
		t.Fatalf("%v:\n%s", err, body)
	}
	if len(got.Queues) != 1 || got.Queues[0].Queue != "coupons" || got.Queues[0].Pending != 1 {
		t.Errorf("queues %+v, want coupons with one pending task", got.Queues)
	}
	resp, body = r.get("/monitoring/api/queues/coupons/pending_tasks", operator)
	mustContain(t, "pending tasks", body, `"id":"t1"`, tasks.TypeSendCoupon)

	// The UI: the index page for any path under the mount, its assets.
	resp, body = r.get("/monitoring/queues/coupons", operator)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("/monitoring/queues/coupons: %d", resp.StatusCode)
	}
	mustContain(t, "asynqmon's page", body, "<title>Asynq - Monitoring</title>", `window.FLAG_ROOT_PATH="\/monitoring"`)
	js := regexp.MustCompile(`src="(/monitoring/static/js/[^"]+\.js)"`).FindStringSubmatch(body)
	if js == nil {
		t.Fatalf("no script in asynqmon's page:\n%s", body)
	}
	if resp, _ := r.get(js[1], operator); resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "application/javascript") {
		t.Errorf("GET %s: %d %s", js[1], resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	if resp, _ := r.get("/monitoring", operator); resp.StatusCode/100 != 3 || resp.Header.Get("Location") != "/monitoring/" {
		t.Errorf("/monitoring: %d to %q, want a redirect to /monitoring/", resp.StatusCode, resp.Header.Get("Location"))
	}

	// Writes asked for: the operator can pause the queue, from our origin.
	resp, body = r.do(http.MethodPost, "/monitoring/api/queues/coupons:pause", operator, "Origin", r.url, "Sec-Fetch-Site", "same-origin")
	if resp.StatusCode != http.StatusNoContent && resp.StatusCode != http.StatusOK {
		t.Errorf("pause from our origin: %d %s", resp.StatusCode, body)
	}
	// Another site cannot, even with the browser's remembered credentials.
	resp, _ = r.do(http.MethodPost, "/monitoring/api/queues/coupons:resume", operator, "Origin", "https://evil.example", "Sec-Fetch-Site", "cross-site")
	if resp.StatusCode != http.StatusForbidden {
		t.Errorf("resume from another site: %d, want 403", resp.StatusCode)
	}
}

// asynqmon is read-only unless the operator asks for writes (deleting a
// task there strands its send), and read-only mode wins over the ask.
func TestAsynqmonReadOnly(t *testing.T) {
	for _, tc := range []struct {
		name     string
		opts     []monitor.Option
		readOnly bool
	}{
		{"by default", nil, true},
		{"writes asked for", []monitor.Option{monitor.WithAsynqmonWrites(true)}, false},
		{"read-only mode wins", []monitor.Option{monitor.WithAsynqmonWrites(true), monitor.WithReadOnly(true)}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t, append([]monitor.Option{monitor.WithBasicAuth(testUser, testPassword)}, tc.opts...)...)
			client := asynq.NewClientFromRedisClient(r.rdb)
			info, err := client.Enqueue(asynq.NewTask(tasks.TypeSendCoupon, nil), asynq.Queue("coupons"))
			if err != nil {
				t.Fatal(err)
			}
			same := []string{"Origin", r.url, "Sec-Fetch-Site", "same-origin"}
			resp, _ := r.do(http.MethodDelete, "/monitoring/api/queues/coupons/pending_tasks/"+info.ID, operator, same...)
			_, gone := asynq.NewInspectorFromRedisClient(r.rdb).GetTaskInfo("coupons", info.ID)
			if tc.readOnly && (resp.StatusCode != http.StatusMethodNotAllowed || gone != nil) {
				t.Errorf("delete: %d (task lookup: %v), want 405 and the task kept", resp.StatusCode, gone)
			}
			if !tc.readOnly && (resp.StatusCode/100 != 2 || !errors.Is(gone, asynq.ErrTaskNotFound)) {
				t.Errorf("delete: %d (task lookup: %v), want 2xx and the task gone", resp.StatusCode, gone)
			}
			if resp, _ := r.get("/monitoring/api/queues", operator); resp.StatusCode != http.StatusOK {
				t.Errorf("list: %d", resp.StatusCode)
			}
			_, body := r.get("/monitoring/", operator)
			mustContain(t, "asynqmon's page", body, fmt.Sprintf(`window.FLAG_READ_ONLY="%t"`, tc.readOnly))
		})
	}
}

func TestPages(t *testing.T) {
	r := newRig(t, monitor.WithBasicAuth(testUser, testPassword), monitor.WithMchID(testMchID))
	sends := spring(t, r)

	resp, body := r.get("/", operator)
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/html") {
		t.Fatalf("/: %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	mustContain(t, "the index page", body,
		`data-progress="spring">3 of 5 done (60.0%)`,
		`href="/api/campaigns/spring/report.csv"`,
		`href="/monitoring/queues/coupons"`,
		`href="/campaigns/spring"`,
		`data-active="true"`,
		`http-equiv="refresh"`,
		"PARAM_ERROR", "favor_send", "multiuse_send", "No open budget breaker",
		"Merchant "+testMchID)
	// The inline script runs under the page's nonce, and nothing else does.
	csp := resp.Header.Get("Content-Security-Policy")
	m := regexp.MustCompile(`'nonce-([^']+)'`).FindStringSubmatch(csp)
	if m == nil || !strings.Contains(body, `<script nonce="`+m[1]+`">`) {
		t.Errorf("CSP %q does not match the script's nonce", csp)
	}

	resp, body = r.get("/campaigns/spring", operator)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("/campaigns/spring: %d", resp.StatusCode)
	}
	mustContain(t, "the campaign page", body, `data-progress="spring">3 of 5 done (60.0%)`, `data-active="true"`)

	// Done: the campaign's page stops refreshing; the list does not, as
	// a new campaign may appear at any moment.
	finish(t, r.store, sends[3], succeeded("C-3"))
	finish(t, r.store, sends[4], failed("USER_ACCOUNT_ABNORMAL", "abnormal"))
	_, body = r.get("/campaigns/spring", operator)
	mustContain(t, "the campaign page when done", body, `data-progress="spring">5 of 5 done (100.0%)`, `data-active="false"`, `data-done="true"`)
	if strings.Contains(body, `http-equiv="refresh"`) {
		t.Error("the page of a finished campaign still refreshes")
	}
	_, body = r.get("/", operator)
	mustContain(t, "the index page when every campaign is done", body, `data-done="true"`, `data-active="true"`)
}

func TestOpenBreakerShown(t *testing.T) {
	r := newRig(t, monitor.WithBasicAuth(testUser, testPassword), monitor.WithMchID(testMchID))
	r.campaign("spring", 1)
	openBreaker(t, r, "16000001")
	_, body := r.get("/", operator)
	mustContain(t, "the index page", body, "16000001", "OPEN")
	_, body = r.get("/api/campaigns/spring", operator)
	var c monitor.CampaignDetail
	if err := json.Unmarshal([]byte(body), &c); err != nil {
		t.Fatal(err)
	}
	if len(c.Merchant.OpenBreakers) != 1 || c.Merchant.OpenBreakers[0].StockID != "16000001" {
		t.Errorf("open breakers %+v", c.Merchant.OpenBreakers)
	}
}

// A send that ended without WeChat's answer is neither done nor failed on
// the page: it says so, and what to run.
func TestUnknownShownApart(t *testing.T) {
	r := newRig(t, monitor.WithBasicAuth(testUser, testPassword), monitor.WithMchID(testMchID))
	sends := r.campaign("autumn", 2)
	finish(t, r.store, sends[0], succeeded("C-0"))
	finish(t, r.store, sends[1], idempotency.Result{State: idempotency.Unknown, Code: "SYSTEM_ERROR", MaybeIssued: true})
	_, body := r.get("/api/campaigns/autumn", operator)
	var c monitor.CampaignDetail
	if err := json.Unmarshal([]byte(body), &c); err != nil {
		t.Fatal(err)
	}
	if c.Unknown != 1 || c.Failed != 0 || c.ByState["unknown"] != 1 || !c.Done {
		t.Errorf("campaign %+v", c.Campaign)
	}
	_, body = r.get("/", operator)
	mustContain(t, "the index page", body, `<span class="unknown">needs reconcile</span>`, `data-unknown="autumn"`,
		"enqueuer reconcile --campaign autumn")
	if strings.Contains(body, `<span class="done">done</span>`) {
		t.Error("a campaign with an unknown send is shown as done")
	}
}

// Redemptions recorded from WeChat's notifications show on the page and
// in the API: count, rate of those sent, amount, time to use.
func TestRedemptionsShown(t *testing.T) {
	r := newRig(t, monitor.WithBasicAuth(testUser, testPassword), monitor.WithMchID(testMchID))
	sends := r.campaign("autumn", 4)
	for i, s := range sends {
		finish(t, r.store, s, succeeded(fmt.Sprintf("C-%d", i)))
	}
	if _, err := r.store.Redeem(context.Background(), sends[1], idempotency.Redemption{CouponID: "C-1", NotificationID: "n1",
		ConsumeTime: time.Now(), ConsumeMchID: testMchID, TransactionID: "4200", Amount: 100, Source: idempotency.RedeemedByNotify}); err != nil {
		t.Fatal(err)
	}
	_, body := r.get("/api/campaigns/autumn", operator)
	var c monitor.CampaignDetail
	if err := json.Unmarshal([]byte(body), &c); err != nil {
		t.Fatal(err)
	}
	if c.Redeemed != 1 || c.RedeemedAmount != 100 || c.RedemptionRate != 0.25 || c.MeanToRedemption == "" {
		t.Errorf("campaign %+v", c.Campaign)
	}
	_, body = r.get("/campaigns/autumn", operator)
	mustContain(t, "the campaign page", body, `data-redeemed="autumn"`, "1 redeemed (25.0% of those sent, 100 fen)")
}
