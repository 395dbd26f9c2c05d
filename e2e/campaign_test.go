package e2e

import (
	"net/http"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/sandbox"
)

var fastWaits = []string{"--concurrency", "16", "--rate-wait", "200ms", "--rate-wait-max", "2s",
	"--breaker-probe", "300ms", "--breaker-probe-max", "1s"}

func done(st idempotency.Status) bool { return st.Done() }

// The acceptance run: 2,000 recipients, two worker processes, a sandbox
// that fails 10% of calls, fails 5% after issuing the coupon, and limits
// the rate below what the workers offer.
func TestCampaignSurvivesFaults(t *testing.T) {
	r := newRig(t)
	r.sb.SetFaults(sandbox.Faults{RateLimit: 150, ErrorRate: 0.10, CommitFailRate: 0.05, Latency: 5 * time.Millisecond, LatencyRate: 1})
	path, openids := r.writeUsers("spring", 2000)
	out, code := r.enqueuer("campaign", "--file", path, "--stock-id", r.stockID(), "--campaign", "spring")
	if code != 0 || !strings.Contains(out, "enqueued 2000, duplicates 0, invalid 0") {
		t.Fatalf("enqueuer exited %d:\n%s", code, out)
	}
	r.worker("a", fastWaits...)
	r.worker("b", fastWaits...)
	st := r.waitFor("spring", 3*time.Minute, "every send done", done)
	if st.ByState[idempotency.Succeeded] != 2000 {
		t.Fatalf("status %+v", st)
	}

	coupons := r.checkOneCouponEach(r.stockID(), openids)
	led := r.sb.Ledger()
	for _, code := range []string{"429 FREQUENCY_LIMIT_EXCEED", "500 SYSTEM_ERROR"} {
		if led.Requests[code] == 0 {
			t.Errorf("the sandbox never answered %s; the faults were not exercised (requests %v)", code, led.Requests)
		}
	}
	if led.Faults["commit_fail_500"]+led.Faults["commit_fail_drop"] == 0 {
		t.Errorf("no commit-then-fail happened: %v", led.Faults)
	}
	t.Logf("sandbox requests: %v, faults: %v", led.Requests, led.Faults)

	rows := r.report("spring")
	if len(rows) != 2001 {
		t.Fatalf("report has %d lines, want a header and 2000", len(rows))
	}
	for _, row := range rows[1:] {
		orn, openid, state, couponID := row[0], row[1], row[2], row[3]
		c := coupons[openid]
		if state != "succeeded" || c.CouponID != couponID || c.OutRequestNo != orn {
			t.Fatalf("report row %v does not match the ledger's %+v", row, c)
		}
	}

	out, code = r.enqueuer("status", "--campaign", "spring")
	if code != 0 || !strings.Contains(out, "2000 of 2000 done (100.0%)") || !regexp.MustCompile(`succeeded\s+2000`).MatchString(out) ||
		!regexp.MustCompile(`shared rate now: favor_send \d+\.\d/s`).MatchString(out) {
		t.Fatalf("status exited %d:\n%s", code, out)
	}
	out, code = r.enqueuer("coupons", "--openid", openids[7])
	if code != 0 || !strings.Contains(out, "1 coupon of "+openids[7]) || !strings.Contains(out, coupons[openids[7]].CouponID) {
		t.Fatalf("coupons exited %d:\n%s", code, out)
	}

	// The same command again: nothing queued, nothing issued, nothing sent.
	var posts atomic.Int64
	r.sb.OnRequest(func(req sandbox.RecordedRequest) {
		if req.Method == http.MethodPost {
			posts.Add(1)
		}
	})
	before := r.sb.Ledger()
	out, code = r.enqueuer("campaign", "--file", path, "--stock-id", r.stockID(), "--campaign", "spring")
	if code != 0 || !strings.Contains(out, "enqueued 0, duplicates 2000, invalid 0") {
		t.Fatalf("re-run exited %d:\n%s", code, out)
	}
	time.Sleep(2 * time.Second) // give a wrongly queued task time to run
	after := r.sb.Ledger()
	// The one request it makes is the stock's query, a GET.
	if len(after.Coupons) != len(before.Coupons) || total(after.Requests) != total(before.Requests)+1 || posts.Load() != 0 {
		t.Fatalf("the re-run sent to WeChat: %d → %d coupons, %d → %d requests, %d sends",
			len(before.Coupons), len(after.Coupons), total(before.Requests), total(after.Requests), posts.Load())
	}
}

func total(m map[string]int64) (n int64) {
	for _, v := range m {
		n += v
	}
	return n
}

// A budget smaller than the campaign: the rest waits, counted as waiting
// on the budget and not as failed, until a top-up lets it finish.
func TestExhaustedBudgetWaitsForTopUp(t *testing.T) {
	r := newRig(t)
	stock, err := r.sb.CreateStock(sandbox.StockSpec{Kind: "favor", Budget: 50, CouponValue: 100, CouponMinimum: 100})
	if err != nil {
		t.Fatal(err)
	}
	path, openids := r.writeUsers("small", 80)
	if out, code := r.enqueuer("campaign", "--file", path, "--stock-id", stock.ID, "--campaign", "small"); code != 0 {
		t.Fatalf("enqueuer exited %d:\n%s", code, out)
	}
	r.worker("a", fastWaits...)
	st := r.waitFor("small", time.Minute, "50 sent and 30 waiting on the budget", func(st idempotency.Status) bool {
		return st.ByState[idempotency.Succeeded] == 50 && st.ByState[idempotency.WaitingBudget] == 30
	})
	if st.ByState[idempotency.Failed] != 0 {
		t.Fatalf("sends failed on an exhausted budget: %+v", st)
	}
	if err := r.sb.TopUp(stock.ID, 30); err != nil {
		t.Fatal(err)
	}
	st = r.waitFor("small", time.Minute, "every send done after the top-up", done)
	if st.ByState[idempotency.Succeeded] != 80 {
		t.Fatalf("status after top-up %+v", st)
	}
	r.checkOneCouponEach(stock.ID, openids)
}
