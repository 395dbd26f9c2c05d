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
	"sync/atomic"
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

// Store is the record of sends, as a delivery uses it.
type Store interface {
	TryClaim(ctx context.Context, send idempotency.Send, owner string, lease time.Duration) (idempotency.Claim, error)
	Finish(ctx context.Context, send idempotency.Send, owner string, r idempotency.Result) error
	ControlOf(ctx context.Context, campaign string) (idempotency.Control, error)
}

// Breakers are the stocks' budget breakers and the merchants' signature
// breakers (internal/breaker; stock id breaker.Merchant).
type Breakers interface {
	Check(ctx context.Context, mchID, stockID string) (breaker.Decision, error)
	Trip(ctx context.Context, mchID, stockID string, probe bool, reason string, until time.Time) (time.Time, error)
	Abandon(ctx context.Context, mchID, stockID string) error
	Succeeded(ctx context.Context, mchID, stockID string) error
}

// Limiter is the fleet's shared rate limit (internal/ratelimit).
type Limiter interface {
	Wait(ctx context.Context, mchID string, ep ratelimit.Endpoint, maxWait time.Duration) (time.Duration, error)
	Throttled(ctx context.Context, mchID string, ep ratelimit.Endpoint) (rate float64, lowered bool, err error)
}

// Caller makes the WeChat call of a send, returning the coupon id.
type Caller interface {
	Call(ctx context.Context, args tasks.Args) (couponID string, err error)
}

// WeChat is the Caller that sends through the WeChat Pay client.
func WeChat(wx *wechat.Client) Caller { return wechatCaller{wx} }

type wechatCaller struct{ wx *wechat.Client }

func (c wechatCaller) Call(ctx context.Context, args tasks.Args) (string, error) {
	return args.Call(ctx, c.wx)
}

// Handler processes send tasks of every kind (tasks.Kinds).
type Handler struct {
	policy
	wx          Caller
	store       Store
	log         *slog.Logger
	lease       time.Duration
	callTimeout time.Duration
	busyWait    time.Duration
	limiter     Limiter
	maxSlotWait time.Duration
	breakers    Breakers
	metrics     *metrics.Metrics // nil: not measured
	mchID       string           // "": any merchant's tasks
	holds       *holdLog
	throttled   atomic.Int64 // 429s since this worker last lowered the shared rate
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
func WithLimiter(l Limiter, maxWait time.Duration) Option {
	return func(h *Handler) { h.limiter, h.maxSlotWait = l, maxWait }
}

// WithBreakers holds the sends of a stock whose budget is exhausted,
// calling WeChat only for the breaker's probes.
func WithBreakers(b Breakers) Option { return func(h *Handler) { h.breakers = b } }

// WithMetrics counts every WeChat call, the waits for a rate slot and the
// sends held before a call in m.
func WithMetrics(m *metrics.Metrics) Option { return func(h *Handler) { h.metrics = m } }

// WithMerchant makes the handler refuse tasks of any other merchant: it
// signs with this merchant's key, so another's task would be sent under
// the wrong merchant and recorded under a foreign id.
func WithMerchant(mchID string) Option { return func(h *Handler) { h.mchID = mchID } }

// WithHoldSummary sets how often the sends held before a call (breaker,
// rate slot, busy user) are summed up in one info line (default 10s).
func WithHoldSummary(every time.Duration) Option {
	return func(h *Handler) { h.holds.every = every }
}

// New returns a handler that calls WeChat through wx (see WeChat) and
// records in store.
func New(wx Caller, store Store, opts ...Option) *Handler {
	h := &Handler{
		policy: policy{
			budgetWait: [2]time.Duration{30 * time.Second, 10 * time.Minute},
			rateWait:   [2]time.Duration{time.Second, 30 * time.Second},
			jitter:     jitter,
		},
		wx: wx, store: store, log: slog.Default(),
		callTimeout: 15 * time.Second, busyWait: 3 * time.Second,
		holds: &holdLog{every: 10 * time.Second},
		now:   time.Now,
	}
	for _, o := range opts {
		o(h)
	}
	h.holds.log = h.log
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
	growStack(len(t.Payload()))
	args, err := tasks.Decode(t)
	if err != nil {
		// Nothing we could send; retrying cannot help.
		h.log.Error("undecodable task", "type", t.Type(), "err", err)
		return fmt.Errorf("%v: %w", err, asynq.SkipRetry)
	}
	if b := args.Base(); h.mchID != "" && b.MchID != h.mchID {
		h.log.Error("refusing a task of another merchant: this worker signs as its own merchant; the task is archived, nothing was sent or recorded",
			"task_mchid", b.MchID, "worker_mchid", h.mchID, "out_request_no", b.OutRequestNo, "campaign", b.Campaign)
		return fmt.Errorf("task of merchant %q, worker of merchant %q: %w", b.MchID, h.mchID, asynq.SkipRetry)
	}
	// asynq archives a task on any error, a wait included, once its
	// counted failures reach MaxRetry. So the ambiguous outcome that would
	// count the last one ends the send unknown instead, and the count never
	// gets there: a later wait is never archived.
	retried, _ := asynq.GetRetryCount(ctx)
	maxRetry, ok := asynq.GetMaxRetry(ctx)
	return h.deliver(ctx, args, tasks.Keep(t), ok && retried+1 >= maxRetry, false)
}

// Reconcile makes one final delivery of a send whose outcome is unknown
// (its record's Payload is the kept task): it resends the identical
// request and records WeChat's answer. Whatever WeChat does not answer
// leaves the send unknown, never waiting, since no task follows. The
// caller reads the record for the outcome; an error means it could not
// be recorded.
func (h *Handler) Reconcile(ctx context.Context, kept []byte) error {
	t, err := tasks.Kept(kept)
	if err != nil {
		return err
	}
	args, err := tasks.Decode(t)
	if err != nil {
		return err
	}
	err = h.deliver(ctx, args, kept, true, true)
	var w *waitError
	if errors.As(err, &w) && w.reason == reasonRedis {
		return err
	}
	return nil
}

const reasonRedis = "redis"

// pausedWait is how long a paused campaign's task waits before it is
// looked at again, unless resume wakes it; controlRecheck is how old a
// claim's reading of the control may be when its call starts.
const (
	pausedWait     = 5 * time.Minute
	controlRecheck = 300 * time.Millisecond
)

// deliver is one delivery of a send. lastTry: a failure now would count
// asynq's last retry; final: nothing follows this delivery (reconcile).
func (h *Handler) deliver(ctx context.Context, args tasks.Args, kept []byte, lastTry, final bool) error {
	send := sendOf(args)
	send.Settle = final
	b := args.Base()
	log := h.log.With("out_request_no", send.OutRequestNo, "campaign", send.Campaign, "stock_id", send.StockID, "kind", args.Kind())
	owner := newOwner()

	claimed := time.Now()
	claim, err := h.claim(ctx, send, owner)
	if errors.Is(err, idempotency.ErrExpired) {
		// A task that outlived its campaign's records: nothing can say
		// whether it was sent, so it is not.
		log.Error("not sent: the campaign's retention has passed", "err", err)
		return fmt.Errorf("%v: %w", err, asynq.SkipRetry)
	}
	if err != nil {
		// Nothing was written: a wait, which does not use up the task's
		// retries, so a Redis outage never archives a send.
		log.Warn("claiming the send failed; it will be tried again", "err", err)
		return &waitError{reason: reasonRedis, delay: h.jitter(5 * time.Second), err: err}
	}
	switch {
	case claim.Record.State.Terminal():
		log.Info("already recorded; not sent again", "state", claim.Record.State, "coupon_id", claim.Record.CouponID, "code", claim.Record.Code)
		return nil
	case claim.Busy:
		h.held(metrics.HeldBusy, send)
		return &waitError{reason: "busy", delay: h.jitter(time.Second), err: errors.New("this send or another send to its user is in flight")}
	case claim.Paused:
		// enqueuer campaign resume wakes the campaign's tasks at once;
		// the long wait only bounds how often a paused task is looked at.
		h.held(metrics.HeldPaused, send)
		return &waitError{reason: "campaign paused", delay: h.jitter(pausedWait), err: errors.New("the campaign is paused; enqueuer campaign resume continues it")}
	case claim.Cancelled:
		log.Info("not sent: the campaign was cancelled", "state", claim.Record.State)
		return nil
	}
	a := attempt{rec: claim.Record, deadline: b.Deadline, now: h.now(), lastTry: lastTry, final: final, payload: kept}
	log = log.With("attempt", a.rec.Attempts)
	if a.rec.MaybeIssued {
		log = log.With("maybe_issued", true)
	}
	record := func(res idempotency.Result) error {
		// Recorded even if the worker is shutting down: the result is
		// what the record is for.
		recCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		err := h.store.Finish(recCtx, send, owner, res)
		if errors.Is(err, idempotency.ErrLeaseLost) {
			return nil
		}
		return err
	}

	probe, held, err := h.gate(ctx, args, a)
	if err == nil && held != nil {
		if ferr := record(held.res); ferr != nil {
			log.Warn("recording a hold failed; the send will be tried again", "err", ferr)
			return &waitError{reason: reasonRedis, delay: h.jitter(5 * time.Second), err: ferr}
		}
		return held.ret
	}
	if err != nil {
		// Redis failed under the limiter or the breaker: give the claim
		// back as it was and wait; no call was made.
		log.Warn("checking the rate limit or the budget breaker failed; the send will be tried again", "err", err)
		back := a.rec.ClaimedFrom
		if back == idempotency.InFlight {
			back = idempotency.Retrying // a takeover: the send is marked maybe issued
		}
		_ = record(idempotency.Result{State: back, NotCalled: true, Code: a.rec.Code, Message: a.rec.Message, Task: a.payload})
		return &waitError{reason: reasonRedis, delay: h.jitter(5 * time.Second), err: err}
	}

	if !final && time.Since(claimed) > controlRecheck {
		// The claim read the campaign's control; a pause or a cancel since
		// then, during a long wait for a rate slot, is read again, so that
		// no call starts long after the operator's command returned.
		if c, err := h.store.ControlOf(ctx, send.Campaign); err != nil || c != idempotency.Running {
			if probe.on {
				_ = h.breakers.Abandon(context.WithoutCancel(ctx), b.MchID, probe.stockID)
			}
			back := a.rec.ClaimedFrom
			if back == idempotency.InFlight {
				back = idempotency.Retrying // a takeover: the send is marked maybe issued
			}
			_ = record(idempotency.Result{State: back, NotCalled: true, Code: a.rec.Code, Message: a.rec.Message, Task: a.payload})
			return &waitError{reason: "campaign paused", delay: h.jitter(time.Second), err: fmt.Errorf("the campaign was paused or cancelled before the call (%q, %v)", c, err)}
		}
	}

	// A call that has started must finish and be recorded even if the
	// worker is shutting down: cutting it off would leave a coupon issued
	// and unrecorded until the next delivery resends.
	callCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), h.callTimeout)
	start := time.Now()
	couponID, callErr := h.wx.Call(callCtx, args)
	cancel()
	latency := time.Since(start)

	o := outcomeOf(couponID, callErr)
	h.metrics.ObserveCall(string(endpointOf(args)), o.class, codeOf(callErr), latency)
	nextProbe := h.observe(ctx, log, args, o, probe)
	a.now = h.now()
	res, ret := h.settle(a, o, nextProbe)

	if err := record(res); err != nil {
		// The claim stays in flight until its lease runs out; the next
		// delivery then takes it over as maybe issued and resends the
		// same request, which WeChat answers with the same outcome. A
		// wait, so that this never archives the task.
		log.Error("recording the result failed; the send will be resent", "outcome", o.class.String(), "coupon_id", o.couponID, "err", err)
		return &waitError{reason: reasonRedis, delay: h.jitter(5 * time.Second), err: err}
	}
	attrs := []any{"outcome", o.class.String(), "state", res.State, "latency_ms", latency.Milliseconds()}
	if res.CouponID != "" {
		attrs = append(attrs, "coupon_id", res.CouponID)
	}
	var we *wechat.Error
	if errors.As(callErr, &we) {
		attrs = append(attrs, "code", we.Code, "http_status", we.StatusCode, "request_id", we.RequestID, "message", we.Message)
	}
	switch {
	case res.State == idempotency.Succeeded:
		log.Info("sent", attrs...)
	case res.State == idempotency.Unknown:
		log.Warn("outcome unknown; reconcile will settle it", attrs...)
	case res.State == idempotency.Failed:
		log.Warn("failed permanently", attrs...)
	default:
		log.Info("will retry", append(attrs, "retry", ret.Error())...)
	}
	return ret
}

// gate runs the checks that may stop a claimed send before it costs a
// call: the stock's budget breaker, then a slot of the shared rate. The
// slot comes last and just before the call, since it is spent when taken.
func (h *Handler) gate(ctx context.Context, args tasks.Args, a attempt) (probe probe, held *heldSend, err error) {
	b := args.Base()
	send := sendOf(args)
	if h.breakers != nil {
		d, err := h.breakers.Check(ctx, b.MchID, b.StockID)
		if err != nil {
			return probe, nil, err
		}
		probe.on, held = h.admit(a, d, b.StockID)
		probe.stockID = b.StockID
		if d.Merchant {
			probe.stockID = breaker.Merchant
		}
		if held != nil {
			reason := metrics.HeldBudgetBreaker
			if d.Merchant {
				reason = metrics.HeldMerchantBreaker
			}
			h.held(reason, send)
			return probe, held, nil
		}
	}
	if h.limiter != nil {
		maxWait := h.maxSlotWait
		if a.final {
			maxWait = time.Minute
		}
		waited, err := h.limiter.Wait(ctx, b.MchID, endpointOf(args), maxWait)
		if err != nil && probe.on {
			_ = h.breakers.Abandon(context.WithoutCancel(ctx), b.MchID, probe.stockID)
		}
		var tl *ratelimit.TooLong
		if err == nil || errors.As(err, &tl) {
			h.metrics.ObserveSlotWait(string(endpointOf(args)), waited)
		}
		if tl != nil {
			h.held(metrics.HeldRateSlot, send)
			res := idempotency.Result{State: idempotency.WaitingRate, NotCalled: true, Code: a.rec.Code, Message: a.rec.Message}
			if a.final {
				res.State, res.Task = idempotency.Unknown, a.payload
			}
			return probe, &heldSend{res: res, ret: &waitError{reason: "rate limit slot", delay: h.jitter(tl.RetryAfter), err: tl}}, nil
		}
		if err != nil {
			return probe, nil, err
		}
	}
	return probe, nil, nil
}

// probe names the breaker a call is the probe of, if any: the stock's,
// or the merchant's (stockID breaker.Merchant).
type probe struct {
	on      bool
	stockID string
}

func (p probe) of(stockID string) bool { return p.on && p.stockID == stockID }

// observe feeds an outcome back to the limiter and the breakers. After a
// NOT_ENOUGH or a SIGN_ERROR it returns when the next probe is due.
func (h *Handler) observe(ctx context.Context, log *slog.Logger, args tasks.Args, o outcome, p probe) (nextProbe time.Time) {
	ctx = context.WithoutCancel(ctx)
	class := o.class
	b := args.Base()
	if p.of(breaker.Merchant) {
		switch class {
		case wechat.SignRefused:
		case wechat.Ambiguous:
			_ = h.breakers.Abandon(ctx, b.MchID, breaker.Merchant)
		default:
			// WeChat read the request, so it took the signature.
			if err := h.breakers.Succeeded(ctx, b.MchID, breaker.Merchant); err == nil {
				log.Info("WeChat takes the merchant's signature again; its breaker is closed and every worker calls again", "mchid", b.MchID)
			}
		}
	}
	switch {
	case class == wechat.RateLimited && h.limiter != nil:
		// The fleet sees 429s in bursts and lowers the rate once a second at
		// most: one line per decrease, with the 429s that came since the last
		// (all are counted in couponflow_wechat_calls_total).
		n := h.throttled.Add(1)
		if rate, lowered, err := h.limiter.Throttled(ctx, b.MchID, endpointOf(args)); err == nil && lowered {
			h.throttled.Add(-n)
			log.Warn("WeChat rate limited calls that had a slot; the shared rate is lowered for every worker",
				"rate_per_s", rate, "endpoint", endpointOf(args), "rate_limited_since_last_decrease", n)
		}
	case (class == wechat.BudgetExhausted || class == wechat.StockUnavailable) && h.breakers != nil:
		until := wechat.ClearsAt(o.code, o.message, h.now())
		if next, err := h.breakers.Trip(ctx, b.MchID, b.StockID, p.of(b.StockID), o.code+": "+o.message, until); err == nil {
			what := "stock budget exhausted"
			switch {
			case class == wechat.StockUnavailable:
				what = "stock cannot issue now (paused, not yet active, ended, or not authorised for this merchant)"
			case !until.IsZero():
				what = "stock's daily budget exhausted (it clears at 00:00 China time)"
			}
			log.Warn(what+"; its breaker holds sends until the next probe", "probe", p.of(b.StockID), "next_probe", next)
			nextProbe = next
		}
	case class == wechat.SignRefused && h.breakers != nil:
		if next, err := h.breakers.Trip(ctx, b.MchID, breaker.Merchant, p.of(breaker.Merchant), o.code+": "+o.message, time.Time{}); err == nil {
			log.Error("WeChat refuses the merchant's signature (SIGN_ERROR): every worker stops calling for this merchant and holds its sends until a probe is taken; check the clock (NTP), WECHATPAY_PRIVATE_KEY and WECHATPAY_MCH_SERIAL",
				"mchid", b.MchID, "probe", p.of(breaker.Merchant), "next_probe", next, "message", o.message)
			nextProbe = next
		}
	case class == wechat.Success && p.of(b.StockID):
		if err := h.breakers.Succeeded(ctx, b.MchID, b.StockID); err == nil {
			log.Info("probe succeeded; the stock's breaker is closed")
		}
	}
	if p.of(b.StockID) && class != wechat.Success && class != wechat.BudgetExhausted && class != wechat.StockUnavailable {
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
	k, _ := tasks.KindOf(args.Kind())
	return k.Endpoint
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
		case <-time.After(h.jitter(100 * time.Millisecond)):
		}
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

// growStack grows the calling goroutine's stack to fit a send, in one copy
// made while the stack is shallow. asynq runs each task on a goroutine of
// its own, whose stack starts small and grows by copying as the call
// deepens (the SDK, RSA, go-redis), each copy walking every frame. perf
// put 2.6 % of the worker's CPU in runtime.morestack; 1.1 % with a 16 KB
// frame here, 0.8 % with 32 KB (the rest is other goroutines'). In nine
// BenchmarkDispatch pairs a send took 2.2 % less worker CPU on average,
// and the signing ratio was higher in every pair.
//
// seed is any number the compiler cannot know (the payload's length), so
// that the frame is kept.
//
//go:noinline
func growStack(seed int) byte {
	var frame [32 << 10]byte
	i := seed & (len(frame) - 1)
	frame[i] = 1
	return frame[(i*7+1)&(len(frame)-1)]
}
