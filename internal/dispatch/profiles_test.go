package dispatch_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/breaker"
	"github.com/couponflow/dispatcher/internal/dispatch"
	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/ratelimit"
	"github.com/couponflow/dispatcher/internal/sandbox"
	"github.com/couponflow/dispatcher/internal/tasks"
	"github.com/couponflow/dispatcher/internal/wechat"
)

// The worker's reaction to each failure merchants report of the real API,
// played by the sandbox's profiles (internal/sandbox/profiles_test.go shows
// each profile firing when nothing prevents it).

// WeChat answers overlapping sends to one openid with a false
// REQUEST_BLOCKED. Under load (16 at a time, 5 sends to each of 20 users,
// every call slowed down) the per-user lock lets none overlap: every send
// succeeds and the sandbox saw no conflict.
func TestNoFalseRequestBlockedUnderLoad(t *testing.T) {
	t.Parallel()
	w := newWorld(t, 16)
	w.sb.SetFaults(sandbox.Faults{UserConflict: true, Latency: 30 * time.Millisecond, LatencyRate: 1})
	stock := w.stock(sandbox.StockSpec{Budget: 1000})
	var sends []tasks.SendCoupon
	for i := range 5 {
		for u := range 20 {
			sends = append(sends, w.send(stock, fmt.Sprintf("user_%d", u), fmt.Sprintf("r-load-%d-%d", u, i), far()))
		}
	}
	for _, a := range sends {
		w.waitState(a, idempotency.Succeeded, 60*time.Second)
	}
	l := w.sb.Ledger()
	if n := l.Faults["user_conflict"]; n != 0 {
		t.Fatalf("%d sends overlapped another send to their user", n)
	}
	if len(l.Coupons) != len(sends) {
		t.Fatalf("%d coupons for %d sends", len(l.Coupons), len(sends))
	}
}

// A stock's daily budget is spent: its sends are held until 00:00 China
// time, with no probe before then, and the record says why.
func TestDailyBudgetHoldsUntilMidnight(t *testing.T) {
	t.Parallel()
	bs := make(chan *breaker.Breakers, 1)
	w := newWorld(t, 2, func(rdb *redis.Client) dispatch.Option {
		b := breaker.New(rdb, breaker.WithProbeInterval(200*time.Millisecond, 200*time.Millisecond))
		bs <- b
		return dispatch.WithBreakers(b)
	})
	b := <-bs
	stock := w.stock(sandbox.StockSpec{Budget: 10, MaxAmountByDay: 100})
	w.waitState(w.send(stock, "o1", "r-day-1", far()), idempotency.Succeeded, 10*time.Second)
	held := w.send(stock, "o2", "r-day-2", far())
	rec := w.waitState(held, idempotency.WaitingBudget, 10*time.Second)
	if rec.Code != "NOT_ENOUGH" || !strings.Contains(rec.Message, "当天") {
		t.Fatalf("record %+v", rec)
	}
	st, err := b.Status(context.Background(), w.mchID, stock)
	if err != nil {
		t.Fatal(err)
	}
	midnight := wechat.ClearsAt("NOT_ENOUGH", "当天", time.Now())
	if !st.Open || !st.NextProbe.Equal(midnight) || !strings.Contains(st.Reason, "当天") {
		t.Fatalf("breaker %+v, want its next probe at %s", st, midnight)
	}
	// The probe interval is 200ms: a breaker that probed would have called
	// several times by now.
	calls := w.sb.Ledger().Requests["403 NOT_ENOUGH"]
	time.Sleep(time.Second)
	if again := w.sb.Ledger().Requests["403 NOT_ENOUGH"]; again != calls {
		t.Fatalf("%d more calls before midnight", again-calls)
	}
}

// WeChat's monthly limit on one user is final for that user: failed at
// once, under its own code, and the campaign's other users go on.
func TestMonthlyCapFailsThatUserOnly(t *testing.T) {
	t.Parallel()
	w := newWorld(t, 2)
	w.sb.SetFaults(sandbox.Faults{MonthlyCapPerUser: 1})
	stock := w.stock(sandbox.StockSpec{Budget: 10})
	w.waitState(w.send(stock, "capped", "r-cap-1", far()), idempotency.Succeeded, 10*time.Second)
	rec := w.waitState(w.send(stock, "capped", "r-cap-2", far()), idempotency.Failed, 10*time.Second)
	if rec.Code != wechat.CodeMonthlyLimit || !strings.Contains(rec.Message, "暂时无法领取") {
		t.Fatalf("record %+v", rec)
	}
	w.waitState(w.send(stock, "other", "r-cap-3", far()), idempotency.Succeeded, 10*time.Second)
}

// Throttling comes as 429, as 400 INVALID_REQUEST 调用频率过高 and as
// FREQUENCY_LIMITED: each is a rate wait that lowers the shared rate, and
// never a failure.
func TestEveryThrottleAnswerIsARateWait(t *testing.T) {
	t.Parallel()
	for _, answer := range []string{sandbox.RateLimitInvalidRequest, sandbox.RateLimitFrequencyLimited} {
		t.Run(answer, func(t *testing.T) {
			t.Parallel()
			lims := make(chan *ratelimit.Limiter, 1)
			w := newWorld(t, 4, func(rdb *redis.Client) dispatch.Option {
				l := ratelimit.New(rdb, ratelimit.WithLimits(map[ratelimit.Endpoint]ratelimit.Limit{ratelimit.SendCoupon: {N: 50, Per: time.Second}}))
				lims <- l
				return dispatch.WithLimiter(l, time.Second)
			})
			lim := <-lims
			w.sb.SetFaults(sandbox.Faults{RateLimit: 5, RateLimitAnswer: answer})
			stock := w.stock(sandbox.StockSpec{Budget: 100})
			var sends []tasks.SendCoupon
			for i := range 20 {
				sends = append(sends, w.send(stock, fmt.Sprintf("o%d", i), fmt.Sprintf("r-thr-%s-%d", answer, i), far(), asynq.MaxRetry(1)))
			}
			for _, a := range sends {
				w.waitState(a, idempotency.Succeeded, 60*time.Second)
			}
			if w.sb.Ledger().Faults["system_error"] != 0 {
				t.Fatal("unexpected faults")
			}
			rate, err := lim.Rate(context.Background(), w.mchID, ratelimit.SendCoupon)
			if err != nil || rate >= 50 {
				t.Fatalf("shared rate %v (%v): not lowered by %s", rate, err, answer)
			}
		})
	}
}

// A 202 asks for the same request again: the send is resent and gets the
// coupon the 202 stood for; none is issued twice.
func TestAcceptedIsResentUntilAnswered(t *testing.T) {
	t.Parallel()
	w := newWorld(t, 4)
	// Resends are answered 202 too, at the same rate: 0.3 keeps a run of
	// 202s long enough to reach the backoff's minutes unlikely (0.3^6 per send).
	w.sb.SetFaults(sandbox.Faults{AcceptedRate: 0.3})
	stock := w.stock(sandbox.StockSpec{Budget: 100})
	var sends []tasks.SendCoupon
	for i := range 20 {
		sends = append(sends, w.send(stock, fmt.Sprintf("o%d", i), fmt.Sprintf("r-202-%d", i), far()))
	}
	issued := map[string]string{}
	for _, a := range sends {
		issued[a.OutRequestNo] = w.waitState(a, idempotency.Succeeded, 60*time.Second).CouponID
	}
	l := w.sb.Ledger()
	if l.Faults["accepted_202"] == 0 {
		t.Fatal("no 202 was answered: the test proves nothing")
	}
	if len(l.Coupons) != len(sends) {
		t.Fatalf("%d coupons for %d sends", len(l.Coupons), len(sends))
	}
	for _, c := range l.Coupons {
		if issued[c.OutRequestNo] != c.CouponID {
			t.Errorf("%s: recorded %s, issued %s", c.OutRequestNo, issued[c.OutRequestNo], c.CouponID)
		}
	}
}

// SIGN_ERROR on every call (a clock or a key gone wrong) stops the fleet's
// calls for the merchant: sends are held, not failed, one probe at a time
// asks again, and once the signature is taken every send goes out.
func TestSignErrorStopsTheMerchantUntilAProbeIsTaken(t *testing.T) {
	t.Parallel()
	bs := make(chan *breaker.Breakers, 1)
	w := newWorld(t, 4, func(rdb *redis.Client) dispatch.Option {
		b := breaker.New(rdb, breaker.WithProbeInterval(time.Second, time.Second))
		bs <- b
		return dispatch.WithBreakers(b)
	})
	b := <-bs
	w.sb.SetFaults(sandbox.Faults{SignError: true})
	stock := w.stock(sandbox.StockSpec{Budget: 100})
	other := w.stock(sandbox.StockSpec{Budget: 100})
	var sends []tasks.SendCoupon
	for i := range 20 {
		s := stock
		if i%2 == 1 {
			s = other
		}
		sends = append(sends, w.send(s, fmt.Sprintf("o%d", i), fmt.Sprintf("r-sig-%d", i), far()))
	}
	for _, a := range sends {
		if rec := w.waitState(a, idempotency.WaitingBudget, 20*time.Second); rec.Code != "SIGN_ERROR" {
			t.Fatalf("record %+v", rec)
		}
	}
	open, err := b.Open(context.Background(), w.mchID)
	if err != nil || len(open) == 0 || open[0].StockID != breaker.Merchant {
		t.Fatalf("open breakers %+v %v", open, err)
	}
	// 20 sends held over 2s of 1s probes: the first refusals, then one
	// probe a second, not a call per send per retry.
	time.Sleep(2 * time.Second)
	refused := w.sb.Ledger().Requests["401 SIGN_ERROR"]
	if refused > 12 {
		t.Fatalf("%d calls refused while the merchant's breaker was open", refused)
	}
	t.Logf("20 sends held; %d calls refused with SIGN_ERROR in all", refused)
	w.sb.SetFaults(sandbox.Faults{})
	for _, a := range sends {
		w.waitState(a, idempotency.Succeeded, 30*time.Second)
	}
	if open, _ := b.Open(context.Background(), w.mchID); len(open) != 0 {
		t.Fatalf("still open: %+v", open)
	}
}
