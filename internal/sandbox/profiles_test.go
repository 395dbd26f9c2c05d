package sandbox_test

import (
	"encoding/json"
	"errors"
	"net/url"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/wechatpay-apiv3/wechatpay-go/core"

	"github.com/couponflow/dispatcher/internal/sandbox"
	"github.com/couponflow/dispatcher/internal/sandbox/sandboxtest"
)

// The profiles are failures merchants report of the real API. Each test
// shows the profile does what it says, so that a worker test that sees
// none of it proves the worker's reaction, not a dead profile.

func TestRateLimitAnswers(t *testing.T) {
	s := sandboxtest.Start(t)
	c := sdk(t, s)
	id := s.Identity()
	for _, tc := range []struct {
		answer, code string
		status       int
	}{
		{sandbox.RateLimit429, "FREQUENCY_LIMIT_EXCEED", 429},
		{sandbox.RateLimitInvalidRequest, "INVALID_REQUEST", 400},
		{sandbox.RateLimitFrequencyLimited, "FREQUENCY_LIMITED", 403},
	} {
		t.Run(tc.answer, func(t *testing.T) {
			s.SetFaults(sandbox.Faults{RateLimit: 0.001, RateLimitAnswer: tc.answer})
			defer s.SetFaults(sandbox.Faults{})
			var last error
			for range 3 {
				_, last = list(c, s, "o-rl", url.Values{"creator_mchid": {id.MchID}})
			}
			e := wantAPIError(t, last, tc.status, tc.code)
			if tc.answer == sandbox.RateLimitInvalidRequest {
				wantAPIError(t, e, 400, "INVALID_REQUEST", "调用频率过高")
			}
		})
	}
	if err := (sandbox.Faults{RateLimitAnswer: "503"}).Validate(); err == nil {
		t.Error("rate_limit_answer 503 was accepted")
	}
}

// A 202 is answered after the coupon is issued: only the same request
// again tells the caller which coupon.
func TestAcceptedAsksForTheSameRequestAgain(t *testing.T) {
	s := sandboxtest.Start(t, sandboxtest.WithFaults(sandbox.Faults{AcceptedRate: 1}))
	c := sdk(t, s)
	id := s.Identity()
	a := sendArgs{openid: "o-202", stock: id.StockID, outNo: uniq("r202")}
	body, _ := json.Marshal(map[string]string{"stock_id": a.stock, "out_request_no": a.outNo, "appid": id.AppID, "stock_creator_mchid": id.MchID})
	resp, b := do(t, s, rawRequest{method: "POST", uri: "/v3/marketing/favor/users/o-202/coupons", body: body})
	if resp.StatusCode != 202 || len(b) != 0 {
		t.Fatalf("got %d %q, want 202 with no body", resp.StatusCode, b)
	}
	if err := verifyResponse(s, resp.Header, b); err != nil {
		t.Fatalf("the 202 is not signed: %v", err)
	}
	if n := len(s.Ledger().Coupons); n != 1 {
		t.Fatalf("%d coupons issued, want the one the 202 stands for", n)
	}
	s.SetFaults(sandbox.Faults{})
	couponID := mustSend(t, c, s, a)
	if l := s.Ledger(); len(l.Coupons) != 1 || l.Coupons[0].CouponID != couponID || l.Faults["accepted_202"] != 1 {
		t.Errorf("the resend got %s; ledger %+v", couponID, l)
	}
}

// Overlapping sends to one openid get a false REQUEST_BLOCKED; the same
// sends one at a time all succeed.
func TestUserConflict(t *testing.T) {
	s := sandboxtest.Start(t, sandboxtest.WithFaults(sandbox.Faults{UserConflict: true, Latency: 200 * time.Millisecond}))
	c := sdk(t, s)
	favor := newStock(t, s, sandbox.StockSpec{Budget: 100})
	var wg sync.WaitGroup
	var blocked, ok atomic.Int64
	for range 4 {
		wg.Go(func() {
			_, err := send(c, s, sendArgs{openid: "o-conflict", stock: favor.ID})
			var e *core.APIError
			switch {
			case err == nil:
				ok.Add(1)
			case errors.As(err, &e) && e.StatusCode == 403 && e.Code == "REQUEST_BLOCKED":
				blocked.Add(1)
			default:
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if ok.Load() < 1 || blocked.Load() < 1 {
		t.Fatalf("4 overlapping sends: %d succeeded, %d blocked; want both kinds", ok.Load(), blocked.Load())
	}
	for range 3 {
		mustSend(t, c, s, sendArgs{openid: "o-conflict", stock: favor.ID})
	}
	if got := s.Ledger().Faults["user_conflict"]; got != blocked.Load() {
		t.Errorf("ledger counts %d conflicts, saw %d", got, blocked.Load())
	}
}

// The daily budget refuses with NOT_ENOUGH until 00:00 China time, and
// not a moment longer.
func TestDailyBudgetClearsAtMidnightChinaTime(t *testing.T) {
	cst := time.FixedZone("CST", 8*3600)
	var now atomic.Pointer[time.Time]
	set := func(t time.Time) { now.Store(&t) }
	set(time.Date(2026, 11, 30, 23, 59, 0, 0, cst))
	s := sandboxtest.Start(t, func(c *sandbox.Config) { c.Now = func() time.Time { return *now.Load() } })
	c := sdk(t, s)
	k := newStock(t, s, sandbox.StockSpec{Budget: 100, CouponValue: 100, MaxAmountByDay: 200})
	mustSend(t, c, s, sendArgs{openid: "o-d1", stock: k.ID})
	mustSend(t, c, s, sendArgs{openid: "o-d2", stock: k.ID})
	_, err := send(c, s, sendArgs{openid: "o-d3", stock: k.ID})
	wantAPIError(t, err, 403, "NOT_ENOUGH", "当天", "max_amount_by_day")
	set(time.Date(2026, 11, 30, 23, 59, 59, 0, cst))
	_, err = send(c, s, sendArgs{openid: "o-d3", stock: k.ID})
	wantAPIError(t, err, 403, "NOT_ENOUGH")
	set(time.Date(2026, 12, 1, 0, 0, 0, 0, cst))
	mustSend(t, c, s, sendArgs{openid: "o-d3", stock: k.ID})
}

func TestMonthlyCapPerUser(t *testing.T) {
	cst := time.FixedZone("CST", 8*3600)
	var now atomic.Pointer[time.Time]
	set := func(t time.Time) { now.Store(&t) }
	set(time.Date(2026, 11, 30, 12, 0, 0, 0, cst))
	s := sandboxtest.Start(t, func(c *sandbox.Config) {
		c.Now = func() time.Time { return *now.Load() }
		c.Faults = sandbox.Faults{MonthlyCapPerUser: 2}
	})
	c := sdk(t, s)
	k := newStock(t, s, sandbox.StockSpec{Budget: 100})
	mustSend(t, c, s, sendArgs{openid: "o-m", stock: k.ID})
	mustSend(t, c, s, sendArgs{openid: "o-m", stock: s.Identity().StockID})
	_, err := send(c, s, sendArgs{openid: "o-m", stock: k.ID})
	wantAPIError(t, err, 400, "INVALID_REQUEST", "暂时无法领取")
	mustSend(t, c, s, sendArgs{openid: "o-other", stock: k.ID})
	set(time.Date(2026, 12, 1, 0, 0, 0, 0, cst))
	mustSend(t, c, s, sendArgs{openid: "o-m", stock: k.ID})
}

func TestSignErrorProfile(t *testing.T) {
	s := sandboxtest.Start(t, sandboxtest.WithFaults(sandbox.Faults{SignError: true}))
	c := sdk(t, s)
	_, err := send(c, s, sendArgs{openid: "o-sig", stock: s.Identity().StockID})
	wantAPIError(t, err, 401, "SIGN_ERROR")
	_, err = list(c, s, "o-sig", url.Values{"creator_mchid": {s.Identity().MchID}})
	wantAPIError(t, err, 401, "SIGN_ERROR")
	s.SetFaults(sandbox.Faults{})
	mustSend(t, c, s, sendArgs{openid: "o-sig", stock: s.Identity().StockID})
}
