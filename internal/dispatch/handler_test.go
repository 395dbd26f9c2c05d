package dispatch_test

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/breaker"
	"github.com/couponflow/dispatcher/internal/dispatch"
	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/redistest"
	"github.com/couponflow/dispatcher/internal/sandbox"
	"github.com/couponflow/dispatcher/internal/sandbox/sandboxtest"
	"github.com/couponflow/dispatcher/internal/tasks"
	"github.com/couponflow/dispatcher/internal/wechat"
)

// world is a sandbox, a private Redis and an in-process asynq server
// running the real handler.
type world struct {
	t     *testing.T
	sb    *sandbox.Server
	rdb   *redis.Client
	store *idempotency.Store
	mchID string
	appID string
	h     *dispatch.Handler
}

func newWorld(t *testing.T, concurrency int, opts ...func(*redis.Client) dispatch.Option) *world {
	t.Helper()
	sb := sandboxtest.Start(t)
	env := sb.Env()
	wx, err := wechat.New(context.Background(), wechat.Config{
		MchID: env[wechat.EnvMchID], MchSerial: env[wechat.EnvMchSerial], PrivateKeyPath: env[wechat.EnvPrivateKey],
		PublicKeyPath: env[wechat.EnvPublicKey], PublicKeyID: env[wechat.EnvPublicKeyID], AppID: env[wechat.EnvAppID],
		BaseURL: env[wechat.EnvBaseURL],
	})
	if err != nil {
		t.Fatal(err)
	}
	rdb := redistest.Start(t).Client()
	store := idempotency.New(rdb)
	hopts := []dispatch.Option{dispatch.WithRateWait(100*time.Millisecond, 300*time.Millisecond),
		dispatch.WithBudgetWait(200*time.Millisecond, 500*time.Millisecond)}
	for _, o := range opts {
		hopts = append(hopts, o(rdb))
	}
	h := dispatch.New(dispatch.WeChat(wx), store, hopts...)
	srv := asynq.NewServerFromRedisClient(rdb, asynq.Config{
		Concurrency: concurrency, Queues: map[string]int{tasks.DefaultQueue: 1},
		RetryDelayFunc: h.RetryDelay, IsFailure: dispatch.IsFailure, DelayedTaskCheckInterval: 200 * time.Millisecond,
		ShutdownTimeout: h.ShutdownTimeout(), LogLevel: asynq.ErrorLevel,
	})
	mux := asynq.NewServeMux()
	mux.Handle(tasks.TypeSendCoupon, h)
	if err := srv.Start(mux); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Shutdown)
	return &world{t: t, sb: sb, rdb: rdb, store: store, mchID: env[wechat.EnvMchID], appID: env[wechat.EnvAppID], h: h}
}

func (w *world) send(stock, openid, orn string, deadline time.Time, opts ...asynq.Option) tasks.SendCoupon {
	w.t.Helper()
	a := tasks.SendCoupon{Common: tasks.Common{V: tasks.Version, Campaign: "c", MchID: w.mchID, OpenID: openid,
		StockID: stock, OutRequestNo: orn, AppID: w.appID, Deadline: deadline}, StockCreatorMchID: w.mchID}
	task, err := tasks.NewTask(a, opts...)
	if err != nil {
		w.t.Fatal(err)
	}
	if _, err := asynq.NewClientFromRedisClient(w.rdb).Enqueue(task); err != nil {
		w.t.Fatal(err)
	}
	return a
}

func (w *world) record(a tasks.SendCoupon) idempotency.Record {
	rec, err := w.store.Get(context.Background(), idempotency.Send{MchID: a.MchID, OutRequestNo: a.OutRequestNo, Campaign: a.Campaign})
	if err != nil {
		w.t.Fatal(err)
	}
	return rec
}

func (w *world) waitState(a tasks.SendCoupon, state idempotency.State, timeout time.Duration) idempotency.Record {
	w.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		rec := w.record(a)
		if rec.State == state {
			return rec
		}
		if time.Now().After(deadline) {
			w.t.Fatalf("%s is %s (%s %s), not %s after %s", a.OutRequestNo, rec.State, rec.Code, rec.Message, state, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (w *world) stock(spec sandbox.StockSpec) string {
	w.t.Helper()
	spec.Kind = sandbox.KindFavor
	if spec.CouponValue == 0 {
		spec.CouponValue, spec.CouponMinimum = 100, 100
	}
	st, err := w.sb.CreateStock(spec)
	if err != nil {
		w.t.Fatal(err)
	}
	return st.ID
}

// waitAnswers waits until the sandbox has given n answers of a kind.
func (w *world) waitAnswers(kind string, n int64) {
	w.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for w.sb.Ledger().Requests[kind] < n {
		if time.Now().After(deadline) {
			w.t.Fatalf("%d %s answers awaited; only %v after 20s", n, kind, w.sb.Ledger().Requests)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func far() time.Time { return time.Now().Add(time.Hour) }

// asynq checks "retries exhausted" before IsFailure, so waits must never
// consume retries: a task allowed one retry survives many rate limits.
func TestRateLimitsNeverUseUpRetries(t *testing.T) {
	t.Parallel()
	w := newWorld(t, 2)
	w.sb.SetFaults(sandbox.Faults{RateLimit: 0.001}) // one token, then nothing for ~17 minutes
	stock := w.stock(sandbox.StockSpec{Budget: 10})
	w.waitState(w.send(stock, "o0", "r-rate-0", far()), idempotency.Succeeded, 10*time.Second) // spends the token
	a := w.send(stock, "o1", "r-rate-1", far(), asynq.MaxRetry(1))
	w.waitAnswers("429 FREQUENCY_LIMIT_EXCEED", 4)
	if st := w.record(a).State; st != idempotency.WaitingRate && st != idempotency.InFlight {
		t.Fatalf("while rate limited the send is %s", st)
	}
	w.sb.SetFaults(sandbox.Faults{})
	rec := w.waitState(a, idempotency.Succeeded, 10*time.Second)
	if rec.CouponID == "" || rec.Attempts < 5 {
		t.Fatalf("record %+v", rec)
	}
}

func TestPermanentFailureIsRecordedOnceAndNotRetried(t *testing.T) {
	t.Parallel()
	w := newWorld(t, 2)
	a := w.send("404404", "o1", "r-perm-1", far())
	rec := w.waitState(a, idempotency.Failed, 10*time.Second)
	if rec.Code != "RESOURCE_NOT_EXISTS" || rec.Attempts != 1 {
		t.Fatalf("record %+v", rec)
	}
	time.Sleep(500 * time.Millisecond)
	if n := w.sb.Ledger().Requests["404 RESOURCE_NOT_EXISTS"]; n != 1 {
		t.Fatalf("WeChat was called %d times for a permanent failure", n)
	}
	st, _ := w.store.Status(context.Background(), "c")
	if st.FailedByCode["RESOURCE_NOT_EXISTS"] != 1 {
		t.Fatalf("status %+v", st)
	}
}

func TestBudgetWaitEndsAtTheDeadline(t *testing.T) {
	t.Parallel()
	w := newWorld(t, 2)
	stock := w.stock(sandbox.StockSpec{Budget: 1})
	w.waitState(w.send(stock, "o0", "r-budget-0", far()), idempotency.Succeeded, 10*time.Second) // spends the budget
	a := w.send(stock, "o1", "r-budget-1", time.Now().Add(2*time.Second))
	w.waitState(a, idempotency.WaitingBudget, 10*time.Second)
	rec := w.waitState(a, idempotency.Failed, 10*time.Second)
	if rec.Code != "NOT_ENOUGH" || !strings.Contains(rec.Message, "deadline") {
		t.Fatalf("record %+v", rec)
	}
}

// A send whose retries run out without an answer may hold a coupon: it
// ends unknown, never failed, and reconcile's identical resend records
// the coupon WeChat issued, once.
func TestAmbiguousOnTheLastTryIsUnknownUntilReconciled(t *testing.T) {
	t.Parallel()
	w := newWorld(t, 2)
	w.sb.SetFaults(sandbox.Faults{CommitFailRate: 1, CommitFailMode: sandbox.CommitFail500})
	stock := w.stock(sandbox.StockSpec{Budget: 10})
	a := w.send(stock, "o1", "r-amb-1", far(), asynq.MaxRetry(2))
	w.waitState(a, idempotency.Retrying, 10*time.Second)
	rec := w.waitState(a, idempotency.Unknown, 15*time.Second)
	if rec.Code != "SYSTEM_ERROR" || rec.Attempts != 2 || !rec.MaybeIssued || !strings.Contains(rec.Message, "reconcile") || len(rec.Task) == 0 {
		t.Fatalf("record %+v", rec)
	}
	w.sb.SetFaults(sandbox.Faults{})
	if err := w.h.Reconcile(context.Background(), rec.Task); err != nil {
		t.Fatal(err)
	}
	rec = w.record(a)
	issued := w.sb.Ledger().Coupons
	if rec.State != idempotency.Succeeded || len(issued) != 1 || rec.CouponID != issued[0].CouponID || rec.MaybeIssued || rec.Task != nil {
		t.Fatalf("after reconcile: record %+v, ledger %+v", rec, issued)
	}
}

// asynq archives a task on any error once its counted failures reach
// MaxRetry, a wait included. The ambiguous outcome that would count the
// last one ends the send unknown, so the count never gets there and a
// wait after an ambiguous outcome keeps its task.
func TestAWaitAfterAnAmbiguousOutcomeKeepsItsTask(t *testing.T) {
	t.Parallel()
	w := newWorld(t, 2)
	stock := w.stock(sandbox.StockSpec{Budget: 10})
	// One token: the first call passes the limit and meets the error, every
	// later one is rate limited.
	w.sb.SetFaults(sandbox.Faults{ErrorRate: 1, RateLimit: 0.001})
	a := w.send(stock, "o1", "r-wait-1", far(), asynq.MaxRetry(2))
	w.waitAnswers("429 FREQUENCY_LIMIT_EXCEED", 3)
	info, err := asynq.NewInspectorFromRedisClient(w.rdb).GetTaskInfo(tasks.DefaultQueue, a.Key().TaskID())
	if err != nil || info.State == asynq.TaskStateArchived {
		t.Fatalf("a waiting send's task: %+v %v", info, err)
	}
	w.sb.SetFaults(sandbox.Faults{})
	if rec := w.waitState(a, idempotency.Succeeded, 15*time.Second); rec.CouponID == "" {
		t.Fatalf("record %+v", rec)
	}
}

// With one retry allowed, the first ambiguous outcome is the last.
func TestAmbiguousOutcomeThatWouldUseUpTheRetriesIsUnknown(t *testing.T) {
	t.Parallel()
	w := newWorld(t, 2)
	stock := w.stock(sandbox.StockSpec{Budget: 10})
	w.sb.SetFaults(sandbox.Faults{ErrorRate: 1})
	a := w.send(stock, "o1", "r-once-1", far(), asynq.MaxRetry(1))
	if rec := w.waitState(a, idempotency.Unknown, 10*time.Second); rec.Attempts != 1 {
		t.Fatalf("record %+v", rec)
	}
}

// The defect of issue 8: a coupon issued behind a lost answer, then the
// stock's budget breaker opens. The send must not be held and failed
// NOT_ENOUGH at the deadline: its resend returns its coupon.
func TestMaybeIssuedSendPassesAnOpenBreaker(t *testing.T) {
	t.Parallel()
	w := newWorld(t, 2, func(rdb *redis.Client) dispatch.Option {
		return dispatch.WithBreakers(breaker.New(rdb, breaker.WithProbeInterval(time.Minute, time.Minute)))
	})
	stock := w.stock(sandbox.StockSpec{Budget: 1})
	w.sb.SetFaults(sandbox.Faults{CommitFailRate: 1, CommitFailMode: sandbox.CommitFailDrop})
	lost := w.send(stock, "o-lost", "r-lost", time.Now().Add(4*time.Second))
	if rec := w.waitState(lost, idempotency.Retrying, 10*time.Second); !rec.MaybeIssued {
		t.Fatalf("after a dropped answer: %+v", rec)
	}
	// The budget is spent by the lost send itself; open its breaker as the
	// next send's NOT_ENOUGH would, before the lost send's retry comes.
	if _, err := breaker.New(w.rdb).Exhausted(context.Background(), w.mchID, stock, false); err != nil {
		t.Fatal(err)
	}
	w.sb.SetFaults(sandbox.Faults{})
	dry := w.send(stock, "o-dry", "r-dry", time.Now().Add(3*time.Second))
	rec := w.waitState(lost, idempotency.Succeeded, 15*time.Second)
	issued := w.sb.Ledger().Coupons
	if len(issued) != 1 || rec.CouponID != issued[0].CouponID || rec.MaybeIssued {
		t.Fatalf("record %+v, ledger %+v", rec, issued)
	}
	if rec := w.waitState(dry, idempotency.Failed, 15*time.Second); rec.Code != "NOT_ENOUGH" || rec.MaybeIssued {
		t.Fatalf("the dry send: %+v", rec)
	}
	if n := w.sb.Ledger().Requests["403 NOT_ENOUGH"]; n != 0 {
		t.Fatalf("%d NOT_ENOUGH calls; the open breaker should have held the dry send without one", n)
	}
}

// A paused stock is an operator's mistake to mend, not a reason to fail
// the campaign: its sends are held like a dry stock's, go out once it is
// active again, and fail only at the deadline, saying why.
func TestPausedStockIsHeldUntilActive(t *testing.T) {
	t.Parallel()
	w := newWorld(t, 2, func(rdb *redis.Client) dispatch.Option {
		return dispatch.WithBreakers(breaker.New(rdb, breaker.WithProbeInterval(300*time.Millisecond, 300*time.Millisecond)))
	})
	stock := w.stock(sandbox.StockSpec{Budget: 10, State: sandbox.StatePaused})
	held := w.send(stock, "o1", "r-paused-1", far())
	late := w.send(stock, "o2", "r-paused-2", time.Now().Add(2*time.Second))
	w.heldUntilMended(held, late, "INVALID_REQUEST", "活动已结束或未激活", func() error { return w.sb.SetStockState(stock, sandbox.StateActive) })
}

// heldUntilMended checks the life of sends whose stock cannot issue until
// an operator mends it: held (code), failed at its deadline saying why
// (phrase) for late, and sent once mend has run for held.
func (w *world) heldUntilMended(held, late tasks.SendCoupon, code, phrase string, mend func() error) {
	w.t.Helper()
	if rec := w.waitState(held, idempotency.WaitingBudget, 10*time.Second); rec.Code != code {
		w.t.Fatalf("record %+v", rec)
	}
	if rec := w.waitState(late, idempotency.Failed, 10*time.Second); rec.Code != code || !strings.Contains(rec.Message, "deadline") || !strings.Contains(rec.Message, phrase) {
		w.t.Fatalf("at the deadline: %+v", rec)
	}
	if err := mend(); err != nil {
		w.t.Fatal(err)
	}
	if rec := w.waitState(held, idempotency.Succeeded, 15*time.Second); rec.CouponID == "" {
		w.t.Fatalf("record %+v", rec)
	}
}

// WeChat answers parallel sends to one user with spurious errors, so one
// user's sends must reach it one at a time.
func TestOneUsersSendsNeverOverlap(t *testing.T) {
	t.Parallel()
	w := newWorld(t, 8)
	const latency = 150 * time.Millisecond
	w.sb.SetFaults(sandbox.Faults{Latency: latency, LatencyRate: 1})
	var mu sync.Mutex
	starts := map[string][]time.Time{}
	w.sb.OnRequest(func(r sandbox.RecordedRequest) {
		mu.Lock()
		user := strings.Split(r.Path, "/")[5]
		starts[user] = append(starts[user], time.Now())
		mu.Unlock()
	})
	stock := w.stock(sandbox.StockSpec{Budget: 100})
	var sends []tasks.SendCoupon
	for i := 0; i < 6; i++ {
		sends = append(sends, w.send(stock, "same_user", fmt.Sprintf("r-same-%d", i), far()))
		sends = append(sends, w.send(stock, fmt.Sprintf("other_%d", i), fmt.Sprintf("r-other-%d", i), far()))
	}
	for _, a := range sends {
		w.waitState(a, idempotency.Succeeded, 30*time.Second)
	}
	mu.Lock()
	defer mu.Unlock()
	ts := starts["same_user"]
	sort.Slice(ts, func(i, j int) bool { return ts[i].Before(ts[j]) })
	if len(ts) < 6 {
		t.Fatalf("%d calls for same_user", len(ts))
	}
	for i := 1; i < len(ts); i++ {
		if gap := ts[i].Sub(ts[i-1]); gap < latency-20*time.Millisecond {
			t.Fatalf("calls %d and %d to one user overlapped: %s apart, each takes %s", i-1, i, gap, latency)
		}
	}
}

// With the budget breaker on, a held send is not called again; at the
// campaign's deadline it is recorded as failed NOT_ENOUGH without a call.
func TestBreakerHeldSendFailsAtTheDeadline(t *testing.T) {
	t.Parallel()
	w := newWorld(t, 2, func(rdb *redis.Client) dispatch.Option {
		return dispatch.WithBreakers(breaker.New(rdb, breaker.WithProbeInterval(time.Minute, time.Minute)))
	})
	stock := w.stock(sandbox.StockSpec{Budget: 1})
	w.waitState(w.send(stock, "o0", "r-held-0", far()), idempotency.Succeeded, 10*time.Second)
	a := w.send(stock, "o1", "r-held-1", time.Now().Add(2*time.Second))
	rec := w.waitState(a, idempotency.Failed, 15*time.Second)
	if rec.Code != "NOT_ENOUGH" || !strings.Contains(rec.Message, "deadline") || rec.Attempts != 1 {
		t.Fatalf("record %+v", rec)
	}
	if n := w.sb.Ledger().Requests["403 NOT_ENOUGH"]; n != 1 {
		t.Fatalf("%d NOT_ENOUGH calls; the breaker should have held the send after the first", n)
	}
}
