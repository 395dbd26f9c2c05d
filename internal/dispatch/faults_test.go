package dispatch

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hibiken/asynq"

	"github.com/couponflow/dispatcher/internal/breaker"
	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/ratelimit"
	"github.com/couponflow/dispatcher/internal/tasks"
	"github.com/couponflow/dispatcher/internal/wechat"
)

// The fault paths of a delivery, with Redis failing where no real Redis
// can be made to fail on cue: each fake fails one step.

type fakeStore struct {
	claimErr, finishErr error
	rec                 idempotency.Record
	finished            []idempotency.Result
}

func (s *fakeStore) TryClaim(context.Context, idempotency.Send, string, time.Duration) (idempotency.Claim, error) {
	if s.claimErr != nil {
		return idempotency.Claim{}, s.claimErr
	}
	r := s.rec
	r.State, r.ClaimedFrom, r.Attempts = idempotency.InFlight, r.State, r.Attempts+1
	return idempotency.Claim{Acquired: true, Record: r}, nil
}

func (s *fakeStore) ControlOf(context.Context, string) (idempotency.Control, error) {
	return idempotency.Running, nil
}

func (s *fakeStore) Finish(_ context.Context, _ idempotency.Send, _ string, r idempotency.Result) error {
	s.finished = append(s.finished, r)
	return s.finishErr
}

type fakeCaller struct {
	calls int
	err   error
}

func (c *fakeCaller) Call(context.Context, tasks.Args) (string, error) {
	c.calls++
	if c.err != nil {
		return "", c.err
	}
	return "coupon-1", nil
}

type fakeBreakers struct{ checkErr error }

func (b fakeBreakers) Check(context.Context, string, string) (breaker.Decision, error) {
	return breaker.Decision{}, b.checkErr
}
func (fakeBreakers) Trip(context.Context, string, string, bool, string, time.Time) (time.Time, error) {
	return time.Time{}, nil
}
func (fakeBreakers) Abandon(context.Context, string, string) error   { return nil }
func (fakeBreakers) Succeeded(context.Context, string, string) error { return nil }

type fakeLimiter struct{ err error }

func (l fakeLimiter) Wait(context.Context, string, ratelimit.Endpoint, time.Duration) (time.Duration, error) {
	return 0, l.err
}
func (fakeLimiter) Throttled(context.Context, string, ratelimit.Endpoint) (float64, bool, error) {
	return 0, false, nil
}

var errRedis = errors.New("dial tcp 127.0.0.1:6379: connect: connection refused")

func testArgs() tasks.SendCoupon {
	return tasks.SendCoupon{Common: tasks.Common{V: tasks.Version, Campaign: "c", MchID: "1900000001", OpenID: "o1",
		StockID: "s1", OutRequestNo: "r1", AppID: "wx1", Deadline: time.Now().Add(time.Hour)}, StockCreatorMchID: "1900000001"}
}

func TestTaskOfAnotherMerchantIsRefused(t *testing.T) {
	s, c := &fakeStore{}, &fakeCaller{}
	var logs bytes.Buffer
	h := New(c, s, WithMerchant("1900000002"), WithLogger(slog.New(slog.NewTextHandler(&logs, nil))))
	task, err := tasks.NewTask(testArgs())
	if err != nil {
		t.Fatal(err)
	}
	err = h.ProcessTask(context.Background(), task)
	if !errors.Is(err, asynq.SkipRetry) || c.calls != 0 || len(s.finished) != 0 {
		t.Fatalf("told %v, %d calls, %d writes", err, c.calls, len(s.finished))
	}
	if !strings.Contains(logs.String(), "task_mchid=1900000001") || !strings.Contains(logs.String(), "worker_mchid=1900000002") {
		t.Fatalf("log:\n%s", logs.String())
	}
}

func newTestHandler(s Store, c Caller, opts ...Option) *Handler {
	return New(c, s, append([]Option{WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil)))}, opts...)...)
}

func isWait(err error) bool { var w *waitError; return errors.As(err, &w) }

func TestRedisFailingInTheClaimIsAWait(t *testing.T) {
	s, c := &fakeStore{claimErr: errRedis}, &fakeCaller{}
	err := newTestHandler(s, c).deliver(context.Background(), testArgs(), nil, true, false)
	if !isWait(err) || IsFailure(err) || c.calls != 0 || len(s.finished) != 0 {
		t.Fatalf("told %v (failure %v), %d calls, %d writes", err, IsFailure(err), c.calls, len(s.finished))
	}
}

func TestRedisFailingInTheGateGivesTheClaimBack(t *testing.T) {
	for name, opt := range map[string]Option{
		"breaker": WithBreakers(fakeBreakers{checkErr: errRedis}),
		"limiter": WithLimiter(fakeLimiter{err: errRedis}, time.Second),
	} {
		t.Run(name, func(t *testing.T) {
			s := &fakeStore{rec: idempotency.Record{State: idempotency.Retrying, Attempts: 1, Code: "SYSTEM_ERROR", MaybeIssued: true}}
			c := &fakeCaller{}
			err := newTestHandler(s, c, opt).deliver(context.Background(), testArgs(), nil, true, false)
			if !isWait(err) || IsFailure(err) || c.calls != 0 {
				t.Fatalf("told %v, %d calls", err, c.calls)
			}
			if len(s.finished) != 1 {
				t.Fatalf("%d writes", len(s.finished))
			}
			if r := s.finished[0]; r.State != idempotency.Retrying || !r.NotCalled || r.Code != "SYSTEM_ERROR" || r.Answered {
				t.Fatalf("gave back %+v; want its state and code as they were", r)
			}
		})
	}
}

// asynq archives a task whose last try fails: a result that cannot be
// written must be a wait, or the record would stay in flight for ever.
func TestUnrecordedResultOnTheLastTryIsAWait(t *testing.T) {
	for name, callErr := range map[string]error{
		"success":   nil,
		"ambiguous": &wechat.Error{Class: wechat.Ambiguous, Code: "SYSTEM_ERROR", StatusCode: 500},
	} {
		t.Run(name, func(t *testing.T) {
			s, c := &fakeStore{finishErr: errRedis}, &fakeCaller{err: callErr}
			var logs bytes.Buffer
			h := New(c, s, WithLogger(slog.New(slog.NewTextHandler(&logs, nil))))
			err := h.deliver(context.Background(), testArgs(), nil, true, false)
			if !isWait(err) || IsFailure(err) || c.calls != 1 {
				t.Fatalf("told %v (failure %v), %d calls", err, IsFailure(err), c.calls)
			}
			// The line an operator searches for when a coupon was issued
			// and not recorded.
			if !strings.Contains(logs.String(), "outcome="+name) || (name == "success" && !strings.Contains(logs.String(), "coupon_id=coupon-1")) {
				t.Fatalf("log:\n%s", logs.String())
			}
		})
	}
}

func TestReconcileReportsOnlyRedisErrors(t *testing.T) {
	kept := append([]byte(tasks.TypeSendCoupon+"\n"), mustJSON(t, testArgs())...)
	s, c := &fakeStore{rec: idempotency.Record{State: idempotency.Unknown, MaybeIssued: true}}, &fakeCaller{err: &wechat.Error{Class: wechat.Ambiguous, Code: "SYSTEM_ERROR"}}
	if err := newTestHandler(s, c).Reconcile(context.Background(), kept); err != nil {
		t.Fatal(err)
	}
	if r := s.finished[0]; r.State != idempotency.Unknown || string(r.Task) != string(kept) {
		t.Fatalf("recorded %+v; want still unknown with its task kept", r)
	}
	s.finishErr = errRedis
	if err := newTestHandler(s, c).Reconcile(context.Background(), kept); err == nil {
		t.Fatal("a result that could not be recorded was not reported")
	}
	if err := newTestHandler(s, c).Reconcile(context.Background(), []byte("garbage")); err == nil {
		t.Fatal("a garbled kept task was accepted")
	}
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// lowerOnce is a limiter whose shared rate is lowered by the first 429
// only, as the real one lowers it once a second however many arrive.
type lowerOnce struct{ calls atomic.Int64 }

func (*lowerOnce) Wait(context.Context, string, ratelimit.Endpoint, time.Duration) (time.Duration, error) {
	return 0, nil
}
func (l *lowerOnce) Throttled(context.Context, string, ratelimit.Endpoint) (float64, bool, error) {
	return 250, l.calls.Add(1) == 1, nil
}

// A burst of 429s makes one warning, for the one decrease it caused.
func TestA429BurstLogsOneDecrease(t *testing.T) {
	var logs bytes.Buffer
	c := &fakeCaller{err: &wechat.Error{Class: wechat.RateLimited, Code: "FREQUENCY_LIMIT_EXCEED", StatusCode: 429}}
	h := New(c, &fakeStore{}, WithLimiter(&lowerOnce{}, time.Second), WithLogger(slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn}))))
	for i := 0; i < 20; i++ {
		if err := h.deliver(context.Background(), testArgs(), nil, false, false); !isWait(err) {
			t.Fatalf("a 429 told asynq %v", err)
		}
	}
	if n := strings.Count(logs.String(), "the shared rate is lowered"); n != 1 {
		t.Fatalf("%d warnings for one decrease:\n%s", n, logs.String())
	}
}
