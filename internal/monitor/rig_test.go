package monitor_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/breaker"
	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/monitor"
	"github.com/couponflow/dispatcher/internal/redisconn"
	"github.com/couponflow/dispatcher/internal/redistest"
	"github.com/couponflow/dispatcher/internal/tasks"
)

const (
	testUser     = "operator"
	testPassword = "correct horse battery staple"
	testToken    = "tok-0123456789abcdef"
	testMchID    = "1900000109"
)

// rig is a private Redis and a monitor over it, served by httptest.
type rig struct {
	t     *testing.T
	redis *redistest.Server
	rdb   *redis.Client
	store *idempotency.Store
	mon   *monitor.Server
	url   string
	asynq *asynq.Client
}

func newRig(t *testing.T, opts ...monitor.Option) *rig {
	t.Helper()
	srv := redistest.Start(t)
	spec, err := redisconn.ParseURL(srv.Addr)
	if err != nil {
		t.Fatal(err)
	}
	rdb := srv.Client()
	m, err := monitor.New(rdb, spec.AsynqConnOpt(), opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Close() })
	hs := httptest.NewServer(m.Handler())
	t.Cleanup(hs.Close)
	client := asynq.NewClientFromRedisClient(rdb)
	t.Cleanup(func() { _ = client.Close() })
	return &rig{t: t, redis: srv, rdb: rdb, store: idempotency.New(rdb), mon: m, url: hs.URL, asynq: client}
}

// auth sets credentials on a request.
type auth func(*http.Request)

func basic(user, password string) auth {
	return func(r *http.Request) { r.SetBasicAuth(user, password) }
}

func bearer(token string) auth {
	return func(r *http.Request) { r.Header.Set("Authorization", "Bearer "+token) }
}

var noAuth auth = func(*http.Request) {}

// do sends a request and returns the response with its body read.
func (r *rig) do(method, path string, a auth, hdr ...string) (*http.Response, string) {
	r.t.Helper()
	req, err := http.NewRequest(method, r.url+path, nil)
	if err != nil {
		r.t.Fatal(err)
	}
	a(req)
	for i := 0; i+1 < len(hdr); i += 2 {
		if hdr[i] == "Host" {
			req.Host = hdr[i+1] // net/http sends req.Host, never Header["Host"]
			continue
		}
		req.Header.Set(hdr[i], hdr[i+1])
	}
	client := &http.Client{Timeout: 10 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error {
		return http.ErrUseLastResponse
	}}
	resp, err := client.Do(req)
	if err != nil {
		r.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		r.t.Fatalf("%s %s: reading body: %v", method, path, err)
	}
	return resp, string(body)
}

func (r *rig) get(path string, a auth) (*http.Response, string) {
	r.t.Helper()
	return r.do(http.MethodGet, path, a)
}

// campaign creates a campaign of n pending sends and returns them.
func (r *rig) campaign(name string, n int) []idempotency.Send {
	r.t.Helper()
	ctx := context.Background()
	if _, err := r.store.SaveCampaign(ctx, idempotency.Campaign{Name: name, MchID: testMchID,
		Deadline: time.Now().Add(72 * time.Hour)}); err != nil {
		r.t.Fatal(err)
	}
	sends := make([]idempotency.Send, n)
	for i := range sends {
		sends[i] = idempotency.Send{MchID: testMchID, OutRequestNo: fmt.Sprintf("%s-%04d", name, i),
			Campaign: name, OpenID: fmt.Sprintf("o%s_%04d", name, i), StockID: "16000001"}
		if _, _, err := r.store.Register(ctx, sends[i]); err != nil {
			r.t.Fatal(err)
		}
		r.queueTask(sends[i])
	}
	return sends
}

// queueTask has asynq hold a send's task, as the producer leaves it, a
// day ahead so that startWorker's server never takes it: a record
// without a task is an orphan (orphans.go).
func (r *rig) queueTask(send idempotency.Send) {
	r.t.Helper()
	if _, err := r.asynq.Enqueue(asynq.NewTask(tasks.TypeSendCoupon, nil), asynq.Queue(tasks.DefaultQueue),
		asynq.TaskID(tasks.Key{MchID: send.MchID, OutRequestNo: send.OutRequestNo}.TaskID()), asynq.ProcessIn(24*time.Hour)); err != nil {
		r.t.Fatal(err)
	}
}

// finish claims a send and records a result, as a worker would.
func finish(t testing.TB, store *idempotency.Store, send idempotency.Send, res idempotency.Result) {
	t.Helper()
	ctx := context.Background()
	c, err := store.TryClaim(ctx, send, "test-worker", time.Minute)
	if err != nil {
		t.Error(err)
		return
	}
	if !c.Acquired {
		t.Errorf("claim of %s not acquired: %+v", send.OutRequestNo, c)
		return
	}
	if err := store.Finish(ctx, send, "test-worker", res); err != nil {
		t.Error(err)
	}
}

func succeeded(couponID string) idempotency.Result {
	return idempotency.Result{State: idempotency.Succeeded, CouponID: couponID}
}

func failed(code, msg string) idempotency.Result {
	return idempotency.Result{State: idempotency.Failed, Code: code, Message: msg}
}

func mustContain(t *testing.T, what, body string, wants ...string) {
	t.Helper()
	for _, w := range wants {
		if !strings.Contains(body, w) {
			t.Errorf("%s does not contain %q:\n%s", what, w, tail(body, 3000))
		}
	}
}

func tail(s string, n int) string {
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}

// openBreaker opens a stock's budget breaker, as a worker does on NOT_ENOUGH.
func openBreaker(t *testing.T, r *rig, stockID string) {
	t.Helper()
	if _, err := breaker.New(r.rdb).Exhausted(context.Background(), testMchID, stockID, false); err != nil {
		t.Fatal(err)
	}
}

// shownTime is how the pages write a time: short, in UTC, in a <time>
// element the page's script adds the reader's local time beside.
func shownTime(t time.Time) string {
	layout := "Jan 2 15:04:05 UTC"
	if t.UTC().Year() != time.Now().UTC().Year() {
		layout = "2006-01-02 15:04 UTC"
	}
	return `<time datetime="` + t.UTC().Format(time.RFC3339) + `">` + t.UTC().Format(layout) + `</time>`
}
