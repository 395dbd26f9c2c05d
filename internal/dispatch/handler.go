// Package dispatch is the worker's side of a send: it turns one task into
// at most one WeChat Pay call at a time, records what came of it, and tells
// asynq whether and when to try again.
//
// The path of one delivery: claim the send in the idempotency store (which
// also locks its user) → call WeChat with the task's exact parameters →
// record the result with the campaign counters → return nil (done),
// SkipRetry (failed for good), or an error whose class decides the delay
// and whether asynq counts it as a failure.
package dispatch

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/hibiken/asynq"

	"github.com/couponflow/dispatcher/internal/breaker"
	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/metrics"
	"github.com/couponflow/dispatcher/internal/ratelimit"
	"github.com/couponflow/dispatcher/internal/tasks"
	"github.com/couponflow/dispatcher/internal/wechat"
)

// Handler processes send tasks of both kinds.
type Handler struct {
	wx          *wechat.Client
	store       *idempotency.Store
	log         *slog.Logger
	lease       time.Duration
	callTimeout time.Duration
	busyWait    time.Duration
	budgetWait  [2]time.Duration // first wait, longest wait
	rateWait    [2]time.Duration
	limiter     *ratelimit.Limiter
	maxSlotWait time.Duration
	breakers    *breaker.Breakers
	metrics     *metrics.Metrics // nil: not measured
	now         func() time.Time
}

// Option configures a Handler.
type Option func(*Handler)

// WithLogger sets the logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option { return func(h *Handler) { h.log = l } }

// WithCallTimeout bounds one WeChat call (default 15s). The claim's lease
// is derived from it, so that a lease never runs out under a live call.
func WithCallTimeout(d time.Duration) Option { return func(h *Handler) { h.callTimeout = d } }

// WithBudgetWait sets the first and the longest wait after NOT_ENOUGH
// (default 30s doubling to 10m).
func WithBudgetWait(first, max time.Duration) Option {
	return func(h *Handler) { h.budgetWait = [2]time.Duration{first, max} }
}

// WithRateWait sets the first and the longest wait after a rate limit
// (default 1s growing to 30s, jittered).
func WithRateWait(first, max time.Duration) Option {
	return func(h *Handler) { h.rateWait = [2]time.Duration{first, max} }
}

// WithLimiter makes every call take a slot of the fleet's shared rate
// first, waiting up to maxWait inside the handler; a longer wait goes back
// to asynq as a rate wait. A 429 lowers the shared rate.
func WithLimiter(l *ratelimit.Limiter, maxWait time.Duration) Option {
	return func(h *Handler) { h.limiter, h.maxSlotWait = l, maxWait }
}

// WithBreakers holds the sends of a stock whose budget is exhausted,
// calling WeChat only for the breaker's probes.
func WithBreakers(b *breaker.Breakers) Option { return func(h *Handler) { h.breakers = b } }

// WithMetrics counts every WeChat call, the waits for a rate slot and the
// sends held before a call in m.
func WithMetrics(m *metrics.Metrics) Option { return func(h *Handler) { h.metrics = m } }

// New returns a handler calling WeChat through wx and recording in store.
func New(wx *wechat.Client, store *idempotency.Store, opts ...Option) *Handler {
	h := &Handler{
		wx: wx, store: store, log: slog.Default(),
		callTimeout: 15 * time.Second, busyWait: 3 * time.Second,
		budgetWait: [2]time.Duration{30 * time.Second, 10 * time.Minute},
		rateWait:   [2]time.Duration{time.Second, 30 * time.Second},
		now:        time.Now,
	}
	for _, o := range opts {
		o(h)
	}
	h.lease = 2*h.callTimeout + 10*time.Second
	return h
}

// ShutdownTimeout is how long a worker must give calls in flight at
// shutdown, so that each finishes and its result is recorded.
func (h *Handler) ShutdownTimeout() time.Duration { return h.callTimeout + 10*time.Second }

// waitError asks asynq to try again after delay without counting a
// failure: a rate limit, an exhausted budget, or a busy user say nothing
// about the send itself.
type waitError struct {
	reason string
	delay  time.Duration
	err    error
}

func (e *waitError) Error() string {
	return fmt.Sprintf("waiting %s (%s): %v", e.delay.Round(time.Millisecond), e.reason, e.err)
}
func (e *waitError) Unwrap() error { return e.err }

// ambiguousError asks for a resend of the same request after a backoff;
// it counts as a failure, bounded by the task's MaxRetry.
type ambiguousError struct{ err error }

func (e *ambiguousError) Error() string { return e.err.Error() }
func (e *ambiguousError) Unwrap() error { return e.err }

// IsFailure is asynq's Config.IsFailure: waits are not failures, so they
// never use up a task's retries.
func IsFailure(err error) bool {
	var w *waitError
	return !errors.As(err, &w)
}

// RetryDelay is asynq's Config.RetryDelayFunc.
func (h *Handler) RetryDelay(n int, err error, _ *asynq.Task) time.Duration {
	var w *waitError
	if errors.As(err, &w) {
		return w.delay
	}
	return exponential(n, time.Second, 10*time.Minute)
}

// exponential is the nth delay of a jittered exponential schedule.
func exponential(n int, first, max time.Duration) time.Duration {
	b := backoff.NewExponentialBackOff()
	b.InitialInterval, b.MaxInterval, b.MaxElapsedTime = first, max, 0
	b.Reset()
	d := b.NextBackOff()
	for i := 0; i < n && d < max; i++ {
		d = b.NextBackOff()
	}
	return d
}

// ProcessTask implements asynq.Handler.
func (h *Handler) ProcessTask(ctx context.Context, t *asynq.Task) error {
	args, err := tasks.Decode(t)
	if err != nil {
		// Nothing we could send; retrying cannot help.
		h.log.Error("undecodable task", "type", t.Type(), "err", err)
		return fmt.Errorf("%v: %w", err, asynq.SkipRetry)
	}
	send := sendOf(args)
	log := h.log.With("out_request_no", send.OutRequestNo, "campaign", send.Campaign, "stock_id", send.StockID, "kind", args.Kind())
	owner := newOwner()

	claim, err := h.claim(ctx, send, owner)
	if err != nil {
		return err
	}
	switch {
	case claim.Record.State.Terminal():
		log.Info("already recorded; not sent again", "state", claim.Record.State, "coupon_id", claim.Record.CouponID, "code", claim.Record.Code)
		return nil
	case claim.Busy:
		h.metrics.Held(metrics.HeldBusy)
		return &waitError{reason: "busy", delay: jitter(time.Second), err: errors.New("this send or another send to its user is in flight")}
	}
	attempt := claim.Record.Attempts
	log = log.With("attempt", attempt)

	probe, held, err := h.gate(ctx, args, claim.Record)
	if held != nil {
		recCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		if ferr := h.store.Finish(recCtx, send, owner, held.res); ferr != nil && !errors.Is(ferr, idempotency.ErrLeaseLost) {
			return ferr
		}
		log.Debug("held before calling", "state", held.res.State, "retry", held.ret.Error())
		return held.ret
	}
	if err != nil {
		// Redis failed under the limiter or the breaker: give the claim
		// back and let asynq retry.
		recCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		_ = h.store.Finish(recCtx, send, owner, idempotency.Result{State: claim.Record.State, NotCalled: true,
			Code: claim.Record.Code, Message: claim.Record.Message})
		return err
	}

	// A call that has started must finish and be recorded even if the
	// worker is shutting down: cutting it off would leave a coupon issued
	// and unrecorded until the next delivery resends.
	callCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), h.callTimeout)
	start := time.Now()
	couponID, callErr := h.call(callCtx, args)
	cancel()
	latency := time.Since(start)

	class := wechat.ClassOf(callErr)
	h.metrics.ObserveCall(string(endpointOf(args)), class, codeOf(callErr), latency)
	nextProbe := h.observe(ctx, log, args, class, probe)
	retried, _ := asynq.GetRetryCount(ctx)
	maxRetry, ok := asynq.GetMaxRetry(ctx)
	lastTry := ok && retried >= maxRetry
	res, ret := h.decide(args, claim.Record, class, callErr, lastTry, nextProbe)
	res.CouponID = couponID

	recCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	if err := h.store.Finish(recCtx, send, owner, res); err != nil && !errors.Is(err, idempotency.ErrLeaseLost) {
		// The result is lost; the next delivery will resend the same
		// request, and WeChat will answer with the same outcome.
		log.Error("recording the result failed; the send will be retried", "outcome", class, "err", err)
		return err
	}
	attrs := []any{"outcome", class.String(), "state", res.State, "latency_ms", latency.Milliseconds()}
	if res.CouponID != "" {
		attrs = append(attrs, "coupon_id", res.CouponID)
	}
	var we *wechat.Error
	if errors.As(callErr, &we) {
		attrs = append(attrs, "code", we.Code, "http_status", we.StatusCode, "request_id", we.RequestID, "message", we.Message)
	}
	switch class {
	case wechat.Success:
		log.Info("sent", attrs...)
	case wechat.Permanent:
		log.Warn("failed permanently", attrs...)
	default:
		log.Info("will retry", append(attrs, "retry", ret.Error())...)
	}
	return ret
}

// heldSend is a send stopped before its call: what to record, what to return.
type heldSend struct {
	res idempotency.Result
	ret error
}

// gate runs the checks that may stop a claimed send before it costs a
// call: the stock's budget breaker, then a slot of the shared rate. The
// slot comes last and just before the call, since it is spent when taken.
func (h *Handler) gate(ctx context.Context, args tasks.Args, rec idempotency.Record) (probe bool, held *heldSend, err error) {
	b := args.Base()
	if h.breakers != nil {
		d, err := h.breakers.Check(ctx, b.MchID, b.StockID)
		if err != nil {
			return false, nil, err
		}
		switch d.Verdict {
		case breaker.Probe:
			probe = true
		case breaker.Hold:
			h.metrics.Held(metrics.HeldBudgetBreaker)
			return false, h.holdForBudget(b, rec, d.Until), nil
		}
	}
	if h.limiter != nil {
		waited, err := h.limiter.Wait(ctx, b.MchID, endpointOf(args), h.maxSlotWait)
		if err != nil && probe {
			_ = h.breakers.Abandon(context.WithoutCancel(ctx), b.MchID, b.StockID)
		}
		var tl *ratelimit.TooLong
		if err == nil || errors.As(err, &tl) {
			h.metrics.ObserveSlotWait(string(endpointOf(args)), waited)
		}
		if tl != nil {
			h.metrics.Held(metrics.HeldRateSlot)
			return probe, &heldSend{
				res: idempotency.Result{State: idempotency.WaitingRate, NotCalled: true, Code: rec.Code, Message: rec.Message},
				ret: &waitError{reason: "rate limit slot", delay: jitter(tl.RetryAfter), err: tl},
			}, nil
		}
		if err != nil {
			return probe, nil, err
		}
	}
	return probe, nil, nil
}

// holdForBudget keeps a send of an exhausted stock waiting for the next
// probe, or fails it at the campaign's deadline.
func (h *Handler) holdForBudget(b tasks.Common, rec idempotency.Record, until time.Time) *heldSend {
	now := h.now()
	if !now.Before(b.Deadline) {
		return &heldSend{
			res: idempotency.Result{State: idempotency.Failed, NotCalled: true, Code: "NOT_ENOUGH",
				Message: fmt.Sprintf("the stock's budget was still exhausted at the campaign deadline %s", b.Deadline.Format(time.RFC3339))},
			ret: fmt.Errorf("stock %s exhausted past the deadline: %w", b.StockID, asynq.SkipRetry),
		}
	}
	delay := until.Sub(now) + jitter(time.Second)
	if left := b.Deadline.Sub(now); delay > left {
		delay = left
	}
	return &heldSend{
		res: idempotency.Result{State: idempotency.WaitingBudget, NotCalled: true, Code: "NOT_ENOUGH",
			Message: "held: the stock's budget breaker is open until " + until.Format(time.RFC3339)},
		ret: &waitError{reason: "budget breaker open", delay: delay, err: errors.New("stock " + b.StockID + " has no budget")},
	}
}

// observe feeds an outcome back to the limiter and the breaker. After a
// NOT_ENOUGH it returns when the stock's next probe is due.
func (h *Handler) observe(ctx context.Context, log *slog.Logger, args tasks.Args, class wechat.Class, probe bool) (nextProbe time.Time) {
	ctx = context.WithoutCancel(ctx)
	b := args.Base()
	switch {
	case class == wechat.RateLimited && h.limiter != nil:
		if rate, err := h.limiter.Throttled(ctx, b.MchID, endpointOf(args)); err == nil {
			log.Warn("WeChat rate limited a call that had a slot; lowering the shared rate", "rate_per_s", rate)
		}
	case class == wechat.BudgetExhausted && h.breakers != nil:
		if next, err := h.breakers.Exhausted(ctx, b.MchID, b.StockID, probe); err == nil {
			log.Warn("stock budget exhausted; its breaker holds sends until the next probe", "probe", probe, "next_probe", next)
			nextProbe = next
		}
	case class == wechat.Success && probe:
		if err := h.breakers.Succeeded(ctx, b.MchID, b.StockID); err == nil {
			log.Info("probe succeeded; the stock's breaker is closed")
		}
	}
	if probe && class != wechat.Success && class != wechat.BudgetExhausted {
		// The probe learned nothing about the budget: let another send probe.
		_ = h.breakers.Abandon(ctx, b.MchID, b.StockID)
	}
	return nextProbe
}

// codeOf is the code a call's error is counted under, "" for a success.
func codeOf(err error) string {
	var we *wechat.Error
	if errors.As(err, &we) {
		return we.Code
	}
	if err != nil {
		return wechat.CodeNetwork
	}
	return ""
}

func endpointOf(args tasks.Args) ratelimit.Endpoint {
	if args.Kind() == tasks.TypeSendMultiuse {
		return ratelimit.SendMultiuse
	}
	return ratelimit.SendCoupon
}

// claim takes the send, waiting a little inside the handler when it is
// busy, since asynq's retry set only moves tasks once a second at best.
func (h *Handler) claim(ctx context.Context, send idempotency.Send, owner string) (idempotency.Claim, error) {
	deadline := time.Now().Add(h.busyWait)
	for {
		c, err := h.store.TryClaim(ctx, send, owner, h.lease)
		if err != nil || !c.Busy || time.Now().After(deadline) {
			return c, err
		}
		select {
		case <-ctx.Done():
			return c, nil
		case <-time.After(jitter(100 * time.Millisecond)):
		}
	}
}

func (h *Handler) call(ctx context.Context, args tasks.Args) (string, error) {
	switch a := args.(type) {
	case tasks.SendCoupon:
		resp, err := h.wx.SendCoupon(ctx, a.Request())
		if err != nil {
			return "", err
		}
		return resp.CouponID, nil
	case tasks.SendMultiuse:
		resp, err := h.wx.SendMultiuseCoupon(ctx, a.Request())
		if err != nil {
			return "", err
		}
		return resp.CouponID, nil
	}
	return "", fmt.Errorf("dispatch: no call for %T", args)
}

// decide maps an outcome to the state to record and the error for asynq.
// lastTry says asynq will archive the task if this attempt fails.
func (h *Handler) decide(args tasks.Args, rec idempotency.Record, class wechat.Class, err error, lastTry bool, nextProbe time.Time) (idempotency.Result, error) {
	var we *wechat.Error
	errors.As(err, &we)
	res := idempotency.Result{}
	if we != nil {
		res.Code, res.Message = we.Code, we.Message
	} else if err != nil {
		res.Code, res.Message = wechat.CodeNetwork, err.Error()
	}
	switch class {
	case wechat.Success:
		res.State = idempotency.Succeeded
		return res, nil
	case wechat.Permanent:
		res.State = idempotency.Failed
		return res, fmt.Errorf("%v: %w", err, asynq.SkipRetry)
	case wechat.RateLimited:
		res.State = idempotency.WaitingRate
		return res, &waitError{reason: "rate limited", delay: jitter(exponential(rec.Attempts-1, h.rateWait[0], h.rateWait[1])), err: err}
	case wechat.BudgetExhausted:
		deadline := args.Base().Deadline
		now := h.now()
		if !now.Before(deadline) {
			res.State = idempotency.Failed
			res.Message = fmt.Sprintf("budget still exhausted at the campaign deadline %s: %s", deadline.Format(time.RFC3339), res.Message)
			return res, fmt.Errorf("%v: %w", err, asynq.SkipRetry)
		}
		res.State = idempotency.WaitingBudget
		delay := jitter(exponential(rec.Attempts-1, h.budgetWait[0], h.budgetWait[1]))
		if !nextProbe.IsZero() {
			// The breaker holds the stock until its next probe anyway.
			delay = nextProbe.Sub(now) + jitter(time.Second)
		}
		if left := deadline.Sub(now); delay > left {
			delay = left // one last try at the deadline
		}
		return res, &waitError{reason: "budget exhausted", delay: delay, err: err}
	default:
		if lastTry {
			// asynq is about to archive the task: say so in the record,
			// which is what status and the report read.
			res.State = idempotency.Failed
			res.Message = fmt.Sprintf("gave up after %d attempts without a clear answer; the coupon may have been issued, and re-sending the same out_request_no is safe: %s", rec.Attempts, res.Message)
			return res, fmt.Errorf("%v: %w", err, asynq.SkipRetry)
		}
		res.State = idempotency.Retrying
		return res, &ambiguousError{err: err}
	}
}

func sendOf(args tasks.Args) idempotency.Send {
	b := args.Base()
	return idempotency.Send{MchID: b.MchID, OutRequestNo: b.OutRequestNo, Campaign: b.Campaign, OpenID: b.OpenID, StockID: b.StockID}
}

// jitter spreads d over [d/2, 3d/2) so that tasks that waited together do
// not come back together.
func jitter(d time.Duration) time.Duration {
	if d <= 0 {
		return 0
	}
	return d/2 + rand.N(d)
}

func newOwner() string {
	var b [8]byte
	_, _ = crand.Read(b[:])
	return hex.EncodeToString(b[:])
}
