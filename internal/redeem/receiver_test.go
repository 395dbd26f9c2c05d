package redeem_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/wechatpay-apiv3/wechatpay-go/utils"

	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/metrics"
	"github.com/couponflow/dispatcher/internal/ratelimit"
	"github.com/couponflow/dispatcher/internal/redeem"
	"github.com/couponflow/dispatcher/internal/redistest"
	"github.com/couponflow/dispatcher/internal/sandbox"
	"github.com/couponflow/dispatcher/internal/sandbox/sandboxtest"
	"github.com/couponflow/dispatcher/internal/wechat"
)

// world is a sandbox, a real Redis, a WeChat client and a receiver.
type world struct {
	sb    *sandbox.Server
	wx    *wechat.Client
	store *idempotency.Store
	rdb   *redis.Client
	rv    *redeem.Receiver
	logs  *syncBuffer
	env   map[string]string
	stock string
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func newWorld(t *testing.T, opts ...func(*sandbox.Config)) *world {
	t.Helper()
	opts = append([]func(*sandbox.Config){sandboxtest.KeyBits(2048), func(c *sandbox.Config) {
		c.Notify = sandbox.NotifySchedule{Interval: 100 * time.Millisecond, Attempts: 9}
	}}, opts...)
	sb := sandboxtest.Start(t, opts...)
	env := sb.Env()
	wx, err := wechat.New(context.Background(), wechat.Config{
		MchID: env[wechat.EnvMchID], MchSerial: env[wechat.EnvMchSerial], PrivateKeyPath: env[wechat.EnvPrivateKey],
		PublicKeyPath: env[wechat.EnvPublicKey], PublicKeyID: env[wechat.EnvPublicKeyID], AppID: env[wechat.EnvAppID],
		BaseURL: env[wechat.EnvBaseURL],
	})
	if err != nil {
		t.Fatal(err)
	}
	key, _, err := wechat.LoadAPIv3Key(env[wechat.EnvAPIv3Key])
	if err != nil {
		t.Fatal(err)
	}
	pub, err := wechat.LoadPublicKey(env[wechat.EnvPublicKey])
	if err != nil {
		t.Fatal(err)
	}
	rdb := redistest.Start(t).Client()
	store := idempotency.New(rdb)
	logs := &syncBuffer{}
	rv, err := redeem.New(redeem.Config{Store: store, APIv3Key: key, PublicKey: pub, PublicKeyID: env[wechat.EnvPublicKeyID],
		Logger: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})), Metrics: metrics.NewRedemptions()})
	if err != nil {
		t.Fatal(err)
	}
	return &world{sb: sb, wx: wx, store: store, rdb: rdb, rv: rv, logs: logs, env: env, stock: env["SANDBOX_STOCK_ID"]}
}

// issue sends n coupons through the real API and records them as a worker
// would, in campaign c1.
func (w *world) issue(t *testing.T, n int) []idempotency.Send {
	t.Helper()
	ctx := context.Background()
	mch := w.env[wechat.EnvMchID]
	if _, err := w.store.SaveCampaign(ctx, idempotency.Campaign{Name: "c1", MchID: mch, Deadline: time.Now().Add(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	var sends []idempotency.Send
	for i := range n {
		snd := idempotency.Send{Campaign: "c1", MchID: mch, OutRequestNo: fmt.Sprintf("%s-r%d", mch, i), OpenID: fmt.Sprintf("o-user-%d", i), StockID: w.stock}
		resp, err := w.wx.SendCoupon(ctx, wechat.SendCouponRequest{OpenID: snd.OpenID, StockID: snd.StockID, OutRequestNo: snd.OutRequestNo})
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := w.store.Register(ctx, snd); err != nil {
			t.Fatal(err)
		}
		if c, err := w.store.TryClaim(ctx, snd, "w", time.Minute); err != nil || !c.Acquired {
			t.Fatalf("claim %+v %v", c, err)
		}
		if err := w.store.Finish(ctx, snd, "w", idempotency.Result{State: idempotency.Succeeded, CouponID: resp.CouponID, Answered: true}); err != nil {
			t.Fatal(err)
		}
		sends = append(sends, snd)
	}
	return sends
}

func (w *world) couponOf(t *testing.T, snd idempotency.Send) string {
	rec, err := w.store.Get(context.Background(), snd)
	if err != nil {
		t.Fatal(err)
	}
	return rec.CouponID
}

func waitFor(t *testing.T, what string, d time.Duration, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A notification from the sandbox, signed and encrypted for real, is
// verified, decrypted and recorded on its send; duplicates and
// out-of-order deliveries count once.
func TestNotificationsRecordedOnce(t *testing.T) {
	w := newWorld(t, sandboxtest.WithFaults(sandbox.Faults{NotifyDuplicateRate: 1, NotifyJitterMS: 200}))
	srv := httptest.NewServer(w.rv)
	defer srv.Close()
	ctx := context.Background()
	if _, err := w.wx.SetCallback(ctx, srv.URL+"/wechatpay/coupon-use"); err != nil {
		t.Fatal(err)
	}
	if cb, err := w.wx.QueryCallback(ctx); err != nil || cb.NotifyURL != srv.URL+"/wechatpay/coupon-use" {
		t.Fatalf("QueryCallback %+v %v", cb, err)
	}
	sends := w.issue(t, 20)
	base := time.Now().Add(-time.Hour).Truncate(time.Second)
	for i, snd := range sends[:10] {
		if _, err := w.sb.Use(w.couponOf(t, snd), sandbox.Use{ConsumeTime: base.Add(time.Duration(i) * time.Minute),
			ConsumeMchID: "1900000099", TransactionID: "42000" + strconv.Itoa(i)}); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "every notification acknowledged, duplicates included", 10*time.Second, func() bool {
		for _, n := range w.sb.Notifications() {
			if !n.Acked || n.Duplicates != 1 {
				return false
			}
		}
		return len(w.sb.Notifications()) == 10
	})
	st, err := w.store.Status(ctx, "c1")
	if err != nil || st.Redeemed != 10 || st.RedemptionRate() != 0.5 {
		t.Fatalf("status %+v %v", st, err)
	}
	for i, snd := range sends {
		rec, _ := w.store.Get(ctx, snd)
		if i >= 10 {
			if !rec.UsedAt.IsZero() {
				t.Errorf("%s: unused coupon recorded used", snd.OutRequestNo)
			}
			continue
		}
		if !rec.UsedAt.Equal(base.Add(time.Duration(i)*time.Minute)) || rec.UsedMchID != "1900000099" ||
			rec.UsedTransactionID != "42000"+strconv.Itoa(i) || rec.UsedAmount != 100 || rec.RedeemSource != idempotency.RedeemedByNotify ||
			rec.NotificationID == "" {
			t.Errorf("%s: %+v", snd.OutRequestNo, rec)
		}
	}
	if strings.Contains(w.logs.String(), w.sb.APIv3Key()) {
		t.Fatal("the APIv3 key was logged")
	}
}

// Forged, tampered, replayed, stale and wrongly keyed notifications are
// refused and logged without their contents; nothing is recorded.
func TestForgeriesRefused(t *testing.T) {
	w := newWorld(t)
	srv := httptest.NewServer(w.rv)
	defer srv.Close()
	ctx := context.Background()
	snd := w.issue(t, 1)[0]
	coupon := w.couponOf(t, snd)
	if _, err := w.sb.Use(coupon, sandbox.Use{TransactionID: "4200000000SECRETTXN"}); err != nil {
		t.Fatal(err)
	}
	body, hdr, err := w.sb.SignedNotification(coupon)
	if err != nil {
		t.Fatal(err)
	}
	post := func(body []byte, h http.Header) int {
		req, _ := http.NewRequest(http.MethodPost, srv.URL, bytes.NewReader(body))
		req.Header = h.Clone()
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	resign := func(key *rsa.PrivateKey, ts int64, body []byte) http.Header {
		h := hdr.Clone()
		nonce, _ := utils.GenerateNonce()
		sig, _ := utils.SignSHA256WithRSA(fmt.Sprintf("%d\n%s\n%s\n", ts, nonce, body), key)
		h.Set("Wechatpay-Timestamp", strconv.FormatInt(ts, 10))
		h.Set("Wechatpay-Nonce", nonce)
		h.Set("Wechatpay-Signature", sig)
		return h
	}
	forger, _ := rsa.GenerateKey(rand.Reader, 2048)
	tampered := bytes.Replace(body, []byte(`"ciphertext":"`), []byte(`"ciphertext":"AAAA`), 1)

	for _, tc := range []struct {
		name string
		body []byte
		h    http.Header
		want string
	}{
		{"forged: signed with another key", body, resign(forger, time.Now().Unix(), body), metrics.NotifyBadSig},
		{"tampered body, WeChat's signature", tampered, hdr, metrics.NotifyBadSig},
		{"stale timestamp", body, resign(forger, time.Now().Add(-6*time.Minute).Unix(), body), metrics.NotifyStale},
		{"no signature", body, http.Header{"Content-Type": {"application/json"}}, metrics.NotifyStale},
	} {
		if got := post(tc.body, tc.h); got != http.StatusUnauthorized {
			t.Errorf("%s: answered %d, want 401", tc.name, got)
		}
		if !strings.Contains(w.logs.String(), "outcome="+tc.want) {
			t.Errorf("%s: no %s in the log", tc.name, tc.want)
		}
	}
	if rec, _ := w.store.Get(ctx, snd); !rec.UsedAt.IsZero() {
		t.Fatal("a refused notification was recorded")
	}

	// The genuine one is recorded; the same signed bytes again are a replay.
	if got := post(body, hdr); got != http.StatusOK {
		t.Fatalf("genuine: %d", got)
	}
	if got := post(body, hdr); got != http.StatusUnauthorized || !strings.Contains(w.logs.String(), "outcome="+metrics.NotifyReplay) {
		t.Fatalf("replay: %d", got)
	}
	if st, _ := w.store.Status(ctx, "c1"); st.Redeemed != 1 {
		t.Fatalf("redeemed %d", st.Redeemed)
	}

	// A receiver holding the wrong APIv3 key verifies the signature but
	// cannot decrypt: refused, never recorded.
	pub, _ := wechat.LoadPublicKey(w.env[wechat.EnvPublicKey])
	wrong, err := redeem.New(redeem.Config{Store: w.store, APIv3Key: strings.Repeat("k", 32), PublicKey: pub,
		PublicKeyID: w.env[wechat.EnvPublicKeyID], Logger: slog.New(slog.NewTextHandler(w.logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	body2, hdr2, _ := w.sb.SignedNotification(coupon)
	rr := httptest.NewRecorder()
	req := httptest.NewRequest(http.MethodPost, "/", bytes.NewReader(body2))
	req.Header = hdr2
	wrong.ServeHTTP(rr, req)
	if rr.Code != http.StatusUnauthorized || !strings.Contains(w.logs.String(), "outcome="+metrics.NotifyDecrypt) {
		t.Fatalf("wrong key: %d", rr.Code)
	}

	logs := w.logs.String()
	for _, secret := range []string{"4200000000SECRETTXN", string(body), hdr.Get("Wechatpay-Signature"), w.sb.APIv3Key(), "ciphertext"} {
		if strings.Contains(logs, secret) {
			t.Errorf("the log holds %.40q", secret)
		}
	}
	if m, _ := w.store.RedeemStats(ctx); m[idempotency.StatRefused] < 6 {
		t.Errorf("refused counted %d", m[idempotency.StatRefused])
	}
}

// A coupon no campaign of ours issued is acknowledged and counted once.
func TestCouponNotOurs(t *testing.T) {
	w := newWorld(t)
	srv := httptest.NewServer(w.rv)
	defer srv.Close()
	ctx := context.Background()
	if _, err := w.wx.SetCallback(ctx, srv.URL); err != nil {
		t.Fatal(err)
	}
	resp, err := w.wx.SendCoupon(ctx, wechat.SendCouponRequest{OpenID: "o-stranger", StockID: w.stock, OutRequestNo: "elsewhere-1"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.sb.Use(resp.CouponID, sandbox.Use{}); err != nil {
		t.Fatal(err)
	}
	// The sandbox's notification, and the same notification re-signed.
	waitFor(t, "acknowledged", 5*time.Second, func() bool { n := w.sb.Notifications(); return len(n) == 1 && n[0].Acked })
	if m, _ := w.store.RedeemStats(ctx); m[idempotency.StatNotOurs] != 1 {
		t.Fatalf("not ours counted %v", m)
	}
}

// A receiver down for a minute loses nothing: the sandbox retries until it
// is back, and redemptions sync finds those whose retries ran out.
func TestReceiverDownLosesNothing(t *testing.T) {
	// One minute of downtime in WeChat's schedule (9 deliveries a minute
	// apart), compressed a hundredfold: 0.6 s down, deliveries 100 ms apart.
	w := newWorld(t)
	ctx := context.Background()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close() // down: connections refused
	if _, err := w.wx.SetCallback(ctx, "http://"+addr+"/notify"); err != nil {
		t.Fatal(err)
	}
	sends := w.issue(t, 12)
	for _, snd := range sends[:6] {
		if _, err := w.sb.Use(w.couponOf(t, snd), sandbox.Use{}); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(600 * time.Millisecond)
	l, err = net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: w.rv}
	go srv.Serve(l)
	defer srv.Close()
	waitFor(t, "the retries delivered", 5*time.Second, func() bool {
		st, _ := w.store.Status(ctx, "c1")
		return st.Redeemed == 6
	})
	for _, n := range w.sb.Notifications() {
		if n.Attempts < 2 {
			t.Errorf("notification %s delivered at the first attempt while the receiver was down", n.ID)
		}
	}

	// Down past the whole schedule: the retries run out; sync finds them.
	srv.Close()
	for _, snd := range sends[6:9] {
		if _, err := w.sb.Use(w.couponOf(t, snd), sandbox.Use{}); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "the sandbox to give up", 5*time.Second, func() bool {
		gaveUp := 0
		for _, n := range w.sb.Notifications() {
			if n.GaveUp {
				gaveUp++
			}
		}
		return gaveUp == 3
	})
	lim := ratelimit.New(w.rdb, ratelimit.WithLimits(map[ratelimit.Endpoint]ratelimit.Limit{ratelimit.ListCoupons: {N: 10, Per: time.Second}}))
	start := time.Now()
	res, err := redeem.Sync(ctx, "c1", redeem.SyncConfig{Store: w.store, Lister: w.wx, Limiter: lim, MchID: w.env[wechat.EnvMchID], Concurrency: 4})
	if err != nil {
		t.Fatal(err)
	}
	// 6 unused of 12 listed, 3 used ones found; 6 known from notifications.
	if res.Found != 3 || res.Known != 6 || res.Checked != 6 || res.Failed != 0 {
		t.Fatalf("sync %+v", res)
	}
	if el := time.Since(start); el < 400*time.Millisecond {
		t.Errorf("6 listings at 10/s took %v: the limit was not applied", el)
	}
	st, _ := w.store.Status(ctx, "c1")
	if st.Redeemed != 9 || st.RedeemedBySync != 3 {
		t.Fatalf("after sync %+v", st)
	}
	// Again: nothing more to find.
	if res, err := redeem.Sync(ctx, "c1", redeem.SyncConfig{Store: w.store, Lister: w.wx, Limiter: lim, MchID: w.env[wechat.EnvMchID]}); err != nil || res.Found != 0 || res.Known != 9 {
		t.Fatalf("second sync %+v %v", res, err)
	}
}
