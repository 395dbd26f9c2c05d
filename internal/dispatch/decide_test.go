package dispatch

import (
	"errors"
	"testing"
	"time"

	"github.com/hibiken/asynq"

	"github.com/couponflow/dispatcher/internal/breaker"
	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/wechat"
)

var (
	t0       = time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)
	testPol  = policy{budgetWait: [2]time.Duration{30 * time.Second, 10 * time.Minute}, rateWait: [2]time.Duration{time.Second, 30 * time.Second}, jitter: func(d time.Duration) time.Duration { return d }}
	payload  = []byte("coupon:send\n{}")
	clean    = idempotency.Record{State: idempotency.InFlight, Attempts: 1}
	maybe    = idempotency.Record{State: idempotency.InFlight, Attempts: 3, MaybeIssued: true}
	before   = t0.Add(time.Hour) // a deadline not yet passed
	passed   = t0.Add(-time.Second)
	success  = outcome{class: wechat.Success, couponID: "c1"}
	lost     = outcome{class: wechat.Ambiguous, code: "SYSTEM_ERROR", message: "系统错误"}
	dry      = outcome{class: wechat.BudgetExhausted, code: "NOT_ENOUGH", message: "批次预算不足"}
	limited  = outcome{class: wechat.RateLimited, code: "FREQUENCY_LIMIT_EXCEED"}
	paused   = outcome{class: wechat.StockUnavailable, code: "INVALID_REQUEST", message: "活动已结束或未激活"}
	refused  = outcome{class: wechat.Permanent, code: "USER_ACCOUNT_ABNORMAL"}
	signErr  = outcome{class: wechat.SignRefused, code: "SIGN_ERROR"}
	proxyErr = outcome{class: wechat.Permanent, code: "HTTP_407"}
)

// what asynq is told, in one word
func told(err error) string {
	var w *waitError
	var a *ambiguousError
	switch {
	case err == nil:
		return "done"
	case errors.Is(err, asynq.SkipRetry):
		return "skip"
	case errors.As(err, &w):
		return "wait"
	case errors.As(err, &a):
		return "retry"
	}
	return "error"
}

func TestSettle(t *testing.T) {
	for _, c := range []struct {
		name     string
		a        attempt
		o        outcome
		state    idempotency.State
		told     string
		issued   string // the flag's change: set, clear, ""
		payload  bool
		delayMin time.Duration
	}{
		{"success", attempt{rec: clean, deadline: before}, success, idempotency.Succeeded, "done", "clear", false, 0},
		{"success after a lost answer", attempt{rec: maybe, deadline: before}, success, idempotency.Succeeded, "done", "clear", false, 0},
		{"refused", attempt{rec: clean, deadline: before}, refused, idempotency.Failed, "skip", "clear", false, 0},
		{"refused after a lost answer: WeChat looked at the send", attempt{rec: maybe, deadline: before}, refused, idempotency.Failed, "skip", "clear", false, 0},
		{"signature refused: the merchant's breaker holds it", attempt{rec: clean, deadline: before}, signErr, idempotency.WaitingBudget, "wait", "", false, 15 * time.Second},
		{"signature refused after a lost answer: held too", attempt{rec: maybe, deadline: before}, signErr, idempotency.WaitingBudget, "wait", "", false, 15 * time.Second},
		{"signature refused at the deadline, nothing lost", attempt{rec: clean, deadline: passed}, signErr, idempotency.Failed, "skip", "", false, 0},
		{"signature refused at the deadline after a lost answer", attempt{rec: maybe, deadline: passed}, signErr, idempotency.Unknown, "skip", "set", true, 0},
		{"signature refused in reconcile", attempt{rec: maybe, deadline: before, final: true}, signErr, idempotency.Unknown, "skip", "set", true, 0},
		{"a proxy's error page after a lost answer", attempt{rec: maybe, deadline: before}, proxyErr, idempotency.Unknown, "skip", "set", true, 0},
		{"ambiguous", attempt{rec: clean, deadline: before}, lost, idempotency.Retrying, "retry", "set", false, 0},
		{"ambiguous on the last try", attempt{rec: maybe, deadline: before, lastTry: true}, lost, idempotency.Unknown, "skip", "set", true, 0},
		{"ambiguous in reconcile", attempt{rec: maybe, deadline: passed, final: true}, lost, idempotency.Unknown, "skip", "set", true, 0},
		{"dry", attempt{rec: clean, deadline: before}, dry, idempotency.WaitingBudget, "wait", "clear", false, 15 * time.Second},
		{"dry after a lost answer: nothing was issued", attempt{rec: maybe, deadline: before}, dry, idempotency.WaitingBudget, "wait", "clear", false, 15 * time.Second},
		{"dry at the deadline", attempt{rec: clean, deadline: passed}, dry, idempotency.Failed, "skip", "clear", false, 0},
		{"dry at the deadline after a lost answer", attempt{rec: maybe, deadline: passed}, dry, idempotency.Failed, "skip", "clear", false, 0},
		{"dry in reconcile", attempt{rec: maybe, deadline: before, final: true}, dry, idempotency.Failed, "skip", "clear", false, 0},
		{"stock paused: held like a dry one", attempt{rec: clean, deadline: before}, paused, idempotency.WaitingBudget, "wait", "clear", false, 15 * time.Second},
		{"stock paused after a lost answer: nothing was issued", attempt{rec: maybe, deadline: before}, paused, idempotency.WaitingBudget, "wait", "clear", false, 15 * time.Second},
		{"stock paused at the deadline", attempt{rec: clean, deadline: passed}, paused, idempotency.Failed, "skip", "clear", false, 0},
		{"rate limited", attempt{rec: clean, deadline: before}, limited, idempotency.WaitingRate, "wait", "", false, 500 * time.Millisecond},
		{"rate limited on the last try: not a failure", attempt{rec: maybe, deadline: before, lastTry: true}, limited, idempotency.WaitingRate, "wait", "", false, 500 * time.Millisecond},
		{"rate limited in reconcile", attempt{rec: maybe, deadline: before, final: true}, limited, idempotency.Unknown, "skip", "set", true, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			c.a.now, c.a.payload = t0, payload
			res, err := testPol.settle(c.a, c.o, time.Time{})
			if res.State != c.state || told(err) != c.told {
				t.Fatalf("got %s, told asynq %s (%v); want %s, %s", res.State, told(err), err, c.state, c.told)
			}
			if got := issuedOf(res); got != c.issued {
				t.Errorf("maybe_issued change %q, want %q", got, c.issued)
			}
			if (res.Task != nil) != c.payload {
				t.Errorf("payload kept: %v, want %v", res.Task != nil, c.payload)
			}
			var w *waitError
			if errors.As(err, &w) && w.delay < c.delayMin {
				t.Errorf("waits %s, want at least %s", w.delay, c.delayMin)
			}
			if res.State == idempotency.Failed && c.a.rec.MaybeIssued && !c.o.answers() {
				t.Errorf("a send that may have been issued failed without WeChat's answer")
			}
		})
	}
}

func TestSettleBudgetWaitEndsAtTheDeadline(t *testing.T) {
	a := attempt{rec: clean, deadline: t0.Add(10 * time.Second), now: t0}
	_, err := testPol.settle(a, dry, t0.Add(time.Minute))
	var w *waitError
	if !errors.As(err, &w) || w.delay != 10*time.Second {
		t.Fatalf("told %v; want a wait of exactly the 10s left", err)
	}
}

func TestAdmit(t *testing.T) {
	open := breaker.Decision{Verdict: breaker.Hold, Until: t0.Add(time.Minute)}
	merchant := breaker.Decision{Verdict: breaker.Hold, Until: t0.Add(time.Minute), Reason: "SIGN_ERROR: 签名错误", Merchant: true}
	for _, c := range []struct {
		name  string
		a     attempt
		d     breaker.Decision
		probe bool
		held  idempotency.State // "" when the send may call
		told  string
	}{
		{"closed", attempt{rec: clean, deadline: before}, breaker.Decision{}, false, "", ""},
		{"probe", attempt{rec: clean, deadline: before}, breaker.Decision{Verdict: breaker.Probe}, true, "", ""},
		{"open: held to the next probe", attempt{rec: clean, deadline: before}, open, false, idempotency.WaitingBudget, "wait"},
		{"open past the deadline: failed without a call", attempt{rec: clean, deadline: passed}, open, false, idempotency.Failed, "skip"},
		{"open, but maybe issued: resent", attempt{rec: maybe, deadline: before}, open, false, "", ""},
		{"open past the deadline, maybe issued: resent", attempt{rec: maybe, deadline: passed}, open, false, "", ""},
		{"open, in reconcile: resent", attempt{rec: clean, deadline: passed, final: true}, open, false, "", ""},
		{"merchant's open: held", attempt{rec: clean, deadline: before}, merchant, false, idempotency.WaitingBudget, "wait"},
		{"merchant's open, maybe issued: held, since the resend is refused too", attempt{rec: maybe, deadline: before}, merchant, false, idempotency.WaitingBudget, "wait"},
		{"merchant's open past the deadline, maybe issued: unknown, never failed", attempt{rec: maybe, deadline: passed}, merchant, false, idempotency.Unknown, "skip"},
		{"merchant's open past the deadline: failed without a call", attempt{rec: clean, deadline: passed}, merchant, false, idempotency.Failed, "skip"},
		{"merchant's probe", attempt{rec: maybe, deadline: before}, breaker.Decision{Verdict: breaker.Probe, Merchant: true}, true, "", ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			c.a.now, c.a.payload = t0, payload
			probe, held := testPol.admit(c.a, c.d, "s1")
			if probe != c.probe {
				t.Errorf("probe %v, want %v", probe, c.probe)
			}
			switch {
			case c.held == "" && held != nil:
				t.Fatalf("held as %s; want a call", held.res.State)
			case c.held != "" && held == nil:
				t.Fatalf("called; want held as %s", c.held)
			case held != nil:
				if held.res.State != c.held || told(held.ret) != c.told || !held.res.NotCalled {
					t.Fatalf("held %+v, told %s; want %s, %s", held.res, told(held.ret), c.held, c.told)
				}
				if held.res.State == idempotency.Unknown {
					if !held.res.MaybeIssued || held.res.Task == nil {
						t.Errorf("unknown without its mark or task: %+v", held.res)
					}
				} else if issuedOf(held.res) != "" {
					t.Errorf("a hold changed maybe_issued")
				}
			}
		})
	}
}

// issuedOf is the change to the record's maybe_issued flag that Finish makes.
func issuedOf(r idempotency.Result) string {
	switch {
	case r.MaybeIssued:
		return "set"
	case r.Answered:
		return "clear"
	}
	return ""
}

// A held send is told what opened its stock's breaker: a paused stock is
// not reported as an exhausted budget.
func TestHoldSaysWhyTheBreakerIsOpen(t *testing.T) {
	a := attempt{rec: clean, deadline: passed, now: t0}
	for reason, code := range map[string]string{
		"INVALID_REQUEST: 活动已结束或未激活: stock 1 is paused": "INVALID_REQUEST",
		"NOT_ENOUGH: 批次预算不足":                            "NOT_ENOUGH",
		"":                                              "NOT_ENOUGH",
	} {
		_, held := testPol.admit(a, breaker.Decision{Verdict: breaker.Hold, Until: t0.Add(time.Minute), Reason: reason}, "1")
		if held == nil || held.res.State != idempotency.Failed || held.res.Code != code {
			t.Errorf("reason %q: held %+v; want failed %s", reason, held, code)
		}
	}
}
