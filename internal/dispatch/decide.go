package dispatch

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/hibiken/asynq"

	"github.com/couponflow/dispatcher/internal/breaker"
	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/wechat"
)

// The decisions of a delivery are pure functions of the record as claimed,
// what happened, and the clock, so that every path (a hold, the deadline,
// the last retry, a lost answer) is a row of a table test.
//
// The rule they keep: a send that may have been issued is never recorded
// as failed without WeChat's answer to its out_request_no. WeChat answers
// an identical resend with the coupon it issued before, whatever the
// budget, so such a send is resent rather than held or given up.

// policy holds the waits a decision chooses from.
type policy struct {
	budgetWait [2]time.Duration // first wait after NOT_ENOUGH, longest
	rateWait   [2]time.Duration // first wait after a rate limit, longest
	jitter     func(time.Duration) time.Duration
}

// attempt is what a decision knows of one delivery.
type attempt struct {
	rec      idempotency.Record // as claimed: Attempts counts this one
	deadline time.Time          // the campaign's: budget waits end here
	now      time.Time
	// lastTry: a failure now would count the task's last retry, after
	// which asynq archives it on any error, a wait included.
	lastTry bool
	// final: no delivery follows this one whatever it returns (reconcile),
	// so a wait cannot be recorded: there would be nothing to end it.
	final   bool
	payload []byte // the task, kept with a send that ends unknown
}

// outcome is what one call came to.
type outcome struct {
	class    wechat.Class
	code     string
	message  string
	couponID string
}

func outcomeOf(couponID string, err error) outcome {
	o := outcome{class: wechat.ClassOf(err), couponID: couponID}
	var we *wechat.Error
	switch {
	case errors.As(err, &we):
		o.code, o.message = we.Code, we.Message
	case err != nil:
		o.code, o.message = wechat.CodeNetwork, err.Error()
	}
	return o
}

// answers reports whether WeChat answered the request for this
// out_request_no itself, so that the answer says whether a coupon exists:
// a coupon, NOT_ENOUGH (WeChat's idempotent re-entry answers a resend of
// an issued send with its coupon before it checks the budget), or a
// refusal of the request. A signature refusal, a local refusal or an
// error page without WeChat's code was no look at the send.
func (o outcome) answers() bool {
	switch o.class {
	case wechat.Success, wechat.BudgetExhausted, wechat.StockUnavailable:
		return true
	case wechat.Permanent:
		if o.code == wechat.CodeBadRequest {
			return false
		}
		return len(o.code) < 5 || o.code[:5] != "HTTP_"
	}
	return false
}

// admit decides, before any call, whether a claimed send may call WeChat
// given its stock's breaker. held is nil when it may; probe says the call
// is the breaker's one probe.
func (p policy) admit(a attempt, d breaker.Decision, stockID string) (probe bool, held *heldSend) {
	switch d.Verdict {
	case breaker.Probe:
		return true, nil
	case breaker.Hold:
		if (a.rec.MaybeIssued || a.final) && !d.Merchant {
			// Its resend returns the coupon it may hold, whatever the
			// budget; holding it could only end in a false failure. A
			// refused signature refuses the resend too: it is held, and
			// ends unknown rather than failed if the deadline comes.
			return false, nil
		}
		return false, p.holdForBudget(a, d, stockID)
	}
	return false, nil
}

// holdForBudget keeps a send of an exhausted stock waiting for the next
// probe, or fails it at the deadline. Only for a send that cannot have
// been issued: every call it made was answered.
func (p policy) holdForBudget(a attempt, d breaker.Decision, stockID string) *heldSend {
	// Held sends are told what WeChat told the send that opened the
	// breaker: an exhausted budget, or a paused or inactive stock.
	code, why, _ := strings.Cut(d.Reason, ": ")
	if code == "" {
		code, why = "NOT_ENOUGH", "the stock's budget is exhausted"
	}
	whose := "the stock's"
	if d.Merchant {
		whose = "the merchant's"
	}
	res := idempotency.Result{NotCalled: true, Code: code,
		Message: fmt.Sprintf("held: %s breaker is open until %s (%s)", whose, d.Until.UTC().Format(time.RFC3339), why)}
	res, ret := p.waitForBudget(a, res, d.Until, fmt.Errorf("stock %s cannot issue: %s", stockID, d.Reason))
	return &heldSend{res: res, ret: ret}
}

// waitForBudget is the one rule for a send whose stock has no budget, held
// or answered NOT_ENOUGH: wait until next (the breaker's next probe; zero:
// a growing backoff), never past the campaign's deadline, and at the
// deadline fail: no coupon exists, as every call of the send was answered.
func (p policy) waitForBudget(a attempt, res idempotency.Result, next time.Time, cause error) (idempotency.Result, error) {
	if (!a.now.Before(a.deadline) || a.final) && a.rec.MaybeIssued && !res.Answered {
		// Held or refused without a look at the send (SIGN_ERROR): a
		// coupon may exist, so no failure.
		return p.unknown(a, res, "WeChat refused the merchant's signature until the deadline")
	}
	if !a.now.Before(a.deadline) || a.final {
		res.State = idempotency.Failed
		res.Message = fmt.Sprintf("the stock could not issue at %s (campaign deadline %s); no coupon was issued: %s",
			a.now.UTC().Format(time.RFC3339), a.deadline.UTC().Format(time.RFC3339), res.Message)
		return res, fmt.Errorf("%v: %w", cause, asynq.SkipRetry)
	}
	res.State = idempotency.WaitingBudget
	delay := p.jitter(exponential(a.rec.Attempts-1, p.budgetWait[0], p.budgetWait[1]))
	if !next.IsZero() {
		delay = next.Sub(a.now) + p.jitter(time.Second)
	}
	if left := a.deadline.Sub(a.now); delay > left {
		delay = left // one last try at the deadline
	}
	return res, &waitError{reason: "budget exhausted", delay: delay, err: cause}
}

// heldSend is a send stopped before its call: what to record, what to return.
type heldSend struct {
	res idempotency.Result
	ret error
}

// settle maps a call's outcome to the result to record and the error for
// asynq. nextProbe, after a NOT_ENOUGH, is when the stock's breaker lets
// the next probe through.
func (p policy) settle(a attempt, o outcome, nextProbe time.Time) (idempotency.Result, error) {
	res := idempotency.Result{CouponID: o.couponID, Code: o.code, Message: o.message, Answered: o.answers()}
	err := errors.New(o.code + ": " + o.message)
	switch o.class {
	case wechat.Success:
		res.State = idempotency.Succeeded
		return res, nil
	case wechat.Permanent:
		if a.rec.MaybeIssued && !res.Answered {
			return p.unknown(a, res, "the request was refused before WeChat looked at the send")
		}
		res.State = idempotency.Failed
		return res, fmt.Errorf("%v: %w", err, asynq.SkipRetry)
	case wechat.BudgetExhausted, wechat.StockUnavailable, wechat.SignRefused:
		// The breaker holds the stock (or, for SIGN_ERROR, the merchant)
		// until its next probe anyway.
		return p.waitForBudget(a, res, nextProbe, err)
	case wechat.RateLimited:
		if a.final {
			return p.unknown(a, res, "WeChat rate-limited the resend")
		}
		res.State = idempotency.WaitingRate
		return res, &waitError{reason: "rate limited", delay: p.jitter(exponential(a.rec.Attempts-1, p.rateWait[0], p.rateWait[1])), err: err}
	default: // Ambiguous
		res.MaybeIssued = true
		if a.lastTry || a.final {
			return p.unknown(a, res, fmt.Sprintf("no clear answer after %d attempts", a.rec.Attempts))
		}
		res.State = idempotency.Retrying
		return res, &ambiguousError{err: err}
	}
}

// unknown ends a send that may have been issued without WeChat's answer:
// reconcile settles it by resending the identical request.
func (p policy) unknown(a attempt, res idempotency.Result, why string) (idempotency.Result, error) {
	res.State = idempotency.Unknown
	res.Task = a.payload
	res.MaybeIssued = true
	res.Message = fmt.Sprintf("%s; the coupon may have been issued: run enqueuer reconcile, which resends the identical request (last: %s %s)",
		why, res.Code, res.Message)
	return res, fmt.Errorf("outcome unknown, %s: %w", why, asynq.SkipRetry)
}
