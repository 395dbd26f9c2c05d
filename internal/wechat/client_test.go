package wechat_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/couponflow/dispatcher/internal/sandbox"
	"github.com/couponflow/dispatcher/internal/sandbox/sandboxtest"
	"github.com/couponflow/dispatcher/internal/wechat"
)

// One sandbox for the package: generating its RSA keys is the slow part.
// Tests that change its faults restore them and do not run in parallel.
var sb *sandbox.Server

func TestMain(m *testing.M) {
	var stop func()
	var err error
	if sb, stop, err = sandboxtest.ForMain(); err != nil {
		panic(err)
	}
	code := m.Run()
	stop()
	os.Exit(code)
}

func configOf(env map[string]string) wechat.Config {
	return wechat.Config{
		MchID: env[wechat.EnvMchID], MchSerial: env[wechat.EnvMchSerial],
		PrivateKeyPath: env[wechat.EnvPrivateKey], PublicKeyPath: env[wechat.EnvPublicKey],
		PublicKeyID: env[wechat.EnvPublicKeyID], AppID: env[wechat.EnvAppID], BaseURL: env[wechat.EnvBaseURL],
	}
}

func newClient(t *testing.T, opts ...wechat.Option) *wechat.Client {
	t.Helper()
	c, err := wechat.New(context.Background(), configOf(sb.Env()), opts...)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

var seq atomic.Int64

func unique(prefix string) string {
	return fmt.Sprintf("%s%d%d", prefix, time.Now().UnixNano()%1e9, seq.Add(1))
}

func newStock(t *testing.T, spec sandbox.StockSpec) string {
	t.Helper()
	if spec.Kind == "" {
		spec.Kind = "favor"
	}
	if spec.Budget == 0 {
		spec.Budget = 1000
	}
	if spec.CouponValue == 0 {
		spec.CouponValue, spec.CouponMinimum = 100, 100
	}
	st, err := sb.CreateStock(spec)
	if err != nil {
		t.Fatal(err)
	}
	return st.ID
}

func withFaults(t *testing.T, f sandbox.Faults) {
	t.Helper()
	sb.SetFaults(f)
	t.Cleanup(func() { sb.SetFaults(sandbox.Faults{}) })
}

func ledgerCount(outRequestNo string) int {
	n := 0
	for _, c := range sb.Ledger().Coupons {
		if c.OutRequestNo == outRequestNo {
			n++
		}
	}
	return n
}

func wantClass(t *testing.T, err error, class wechat.Class, status int, code string) *wechat.Error {
	t.Helper()
	var e *wechat.Error
	if !errors.As(err, &e) {
		t.Fatalf("want %s %d %s, got %v", class, status, code, err)
	}
	if e.Class != class || e.StatusCode != status || e.Code != code {
		t.Fatalf("want %s %d %s, got %s %d %s (%v)", class, status, code, e.Class, e.StatusCode, e.Code, err)
	}
	if status != 0 && e.RequestID == "" {
		t.Errorf("%s: no Request-Id carried", code)
	}
	return e
}

func TestSendCouponIsIdempotent(t *testing.T) {
	c := newClient(t)
	stock := newStock(t, sandbox.StockSpec{})
	req := wechat.SendCouponRequest{OpenID: unique("o"), StockID: stock, OutRequestNo: unique("r")}
	first, err := c.SendCoupon(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	if first.CouponID == "" || first.RequestID == "" {
		t.Fatalf("response %+v", first)
	}
	again, err := c.SendCoupon(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	if again.CouponID != first.CouponID {
		t.Fatalf("resend issued %s, first was %s", again.CouponID, first.CouponID)
	}
	if n := ledgerCount(req.OutRequestNo); n != 1 {
		t.Fatalf("ledger holds %d coupons for one out_request_no", n)
	}
	other := req
	other.OpenID = unique("o")
	_, err = c.SendCoupon(context.Background(), other)
	wantClass(t, err, wechat.Permanent, 400, "INVALID_REQUEST")
}

func TestOutcomeClasses(t *testing.T) {
	c := newClient(t)
	ctx := context.Background()
	send := func(stock string) error {
		_, err := c.SendCoupon(ctx, wechat.SendCouponRequest{OpenID: unique("o"), StockID: stock, OutRequestNo: unique("r")})
		return err
	}

	t.Run("budget exhausted", func(t *testing.T) {
		stock := newStock(t, sandbox.StockSpec{Budget: 1})
		if err := send(stock); err != nil {
			t.Fatal(err)
		}
		wantClass(t, send(stock), wechat.BudgetExhausted, 403, "NOT_ENOUGH")
		if err := sb.TopUp(stock, 1); err != nil {
			t.Fatal(err)
		}
		if err := send(stock); err != nil {
			t.Fatalf("after a top-up: %v", err)
		}
	})
	t.Run("permanent", func(t *testing.T) {
		wantClass(t, send("99999999"), wechat.Permanent, 404, "RESOURCE_NOT_EXISTS")
		paused := newStock(t, sandbox.StockSpec{State: "paused"})
		wantClass(t, send(paused), wechat.StockUnavailable, 400, "INVALID_REQUEST")
		once := newStock(t, sandbox.StockSpec{MaxPerUser: 1})
		openid := unique("o")
		for i, want := range []string{"", "REQUEST_BLOCKED"} {
			_, err := c.SendCoupon(ctx, wechat.SendCouponRequest{OpenID: openid, StockID: once, OutRequestNo: unique("r")})
			if want == "" && err != nil {
				t.Fatalf("send %d: %v", i, err)
			}
			if want != "" {
				wantClass(t, err, wechat.Permanent, 403, want)
			}
		}
		_, err := c.SendCoupon(ctx, wechat.SendCouponRequest{OpenID: unique("o"), StockID: once, OutRequestNo: unique("r"), AppID: "wx0000000000000000"})
		wantClass(t, err, wechat.Permanent, 400, "APPID_MCHID_NOT_MATCH")
	})
	t.Run("refused before sending", func(t *testing.T) {
		before := sb.Ledger().Requests
		_, err := c.SendCoupon(ctx, wechat.SendCouponRequest{OpenID: "o1", StockID: "1", OutRequestNo: "bad no/1"})
		e := wantClass(t, err, wechat.Permanent, 0, wechat.CodeBadRequest)
		if !strings.Contains(e.Message, "out_request_no") {
			t.Errorf("message does not name the field: %s", e.Message)
		}
		if total(sb.Ledger().Requests) != total(before) {
			t.Error("a request refused locally reached the sandbox")
		}
	})
	t.Run("rate limited", func(t *testing.T) {
		stock := newStock(t, sandbox.StockSpec{})
		withFaults(t, sandbox.Faults{RateLimit: 2})
		var limited *wechat.Error
		for i := 0; i < 20 && limited == nil; i++ {
			if err := send(stock); wechat.ClassOf(err) == wechat.RateLimited {
				limited = wantClass(t, err, wechat.RateLimited, 429, "FREQUENCY_LIMIT_EXCEED")
			}
		}
		if limited == nil {
			t.Fatal("20 calls at once under a limit of 2/s were never rate limited")
		}
	})
	t.Run("system error", func(t *testing.T) {
		stock := newStock(t, sandbox.StockSpec{})
		withFaults(t, sandbox.Faults{ErrorRate: 1})
		wantClass(t, send(stock), wechat.Ambiguous, 500, "SYSTEM_ERROR")
	})
	t.Run("bad signature on a 2xx", func(t *testing.T) {
		stock := newStock(t, sandbox.StockSpec{})
		withFaults(t, sandbox.Faults{BadSignatureRate: 1})
		wantClass(t, send(stock), wechat.Ambiguous, 200, wechat.CodeBadSignature)
	})
	t.Run("timeout", func(t *testing.T) {
		stock := newStock(t, sandbox.StockSpec{})
		withFaults(t, sandbox.Faults{Latency: 2 * time.Second, LatencyRate: 1})
		quick := newClient(t, wechat.WithTimeouts(time.Second, 200*time.Millisecond))
		_, err := quick.SendCoupon(ctx, wechat.SendCouponRequest{OpenID: unique("o"), StockID: stock, OutRequestNo: unique("r")})
		wantClass(t, err, wechat.Ambiguous, 0, wechat.CodeTimeout)
	})
	t.Run("signed by the wrong key", func(t *testing.T) {
		cfg := configOf(sb.Env())
		cfg.MchSerial = "0000000000000000000000000000000000000000"
		wrong, err := wechat.New(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		_, err = wrong.SendCoupon(ctx, wechat.SendCouponRequest{OpenID: unique("o"), StockID: newStock(t, sandbox.StockSpec{}), OutRequestNo: unique("r")})
		wantClass(t, err, wechat.SignRefused, 401, "SIGN_ERROR")
	})
	t.Run("sign error profile", func(t *testing.T) {
		stock := newStock(t, sandbox.StockSpec{})
		withFaults(t, sandbox.Faults{SignError: true})
		wantClass(t, send(stock), wechat.SignRefused, 401, "SIGN_ERROR")
	})
	for _, rl := range []struct {
		answer, code string
		status       int
	}{
		{sandbox.RateLimitInvalidRequest, "INVALID_REQUEST", 400},
		{sandbox.RateLimitFrequencyLimited, "FREQUENCY_LIMITED", 403},
	} {
		t.Run("rate limited as "+rl.answer, func(t *testing.T) {
			stock := newStock(t, sandbox.StockSpec{})
			withFaults(t, sandbox.Faults{RateLimit: 0.001, RateLimitAnswer: rl.answer})
			var last error
			for range 3 {
				last = send(stock)
			}
			wantClass(t, last, wechat.RateLimited, rl.status, rl.code)
		})
	}
	t.Run("monthly cap", func(t *testing.T) {
		stock := newStock(t, sandbox.StockSpec{})
		openid := unique("o")
		withFaults(t, sandbox.Faults{MonthlyCapPerUser: 1})
		if _, err := c.SendCoupon(ctx, wechat.SendCouponRequest{OpenID: openid, StockID: stock, OutRequestNo: unique("r")}); err != nil {
			t.Fatal(err)
		}
		_, err := c.SendCoupon(ctx, wechat.SendCouponRequest{OpenID: openid, StockID: stock, OutRequestNo: unique("r")})
		wantClass(t, err, wechat.Permanent, 400, wechat.CodeMonthlyLimit)
	})
	t.Run("daily budget", func(t *testing.T) {
		stock := newStock(t, sandbox.StockSpec{CouponValue: 100, MaxAmountByDay: 100})
		if err := send(stock); err != nil {
			t.Fatal(err)
		}
		e := wantClass(t, send(stock), wechat.BudgetExhausted, 403, "NOT_ENOUGH")
		now := time.Now()
		if at := wechat.ClearsAt(e.Code, e.Message, now); !at.After(now) || at.Sub(now) > 24*time.Hour {
			t.Errorf("the daily NOT_ENOUGH %q clears at %s", e.Message, at)
		}
	})
}

// A 202 without a body asks for the same request again: ambiguous, and the
// resend gets the coupon the 202 stood for. Both send kinds.
func TestAcceptedIsResent(t *testing.T) {
	c := newClient(t)
	ctx := context.Background()
	req := wechat.SendCouponRequest{OpenID: unique("o"), StockID: newStock(t, sandbox.StockSpec{Budget: 1}), OutRequestNo: unique("r")}
	withFaults(t, sandbox.Faults{AcceptedRate: 1})
	_, err := c.SendCoupon(ctx, req)
	wantClass(t, err, wechat.Ambiguous, 202, wechat.CodeAccepted)
	mreq := multiuseRequest(t, c)
	_, err = c.SendMultiuseCoupon(ctx, mreq)
	wantClass(t, err, wechat.Ambiguous, 202, wechat.CodeAccepted)
	sb.SetFaults(sandbox.Faults{})
	if _, err := c.SendCoupon(ctx, req); err != nil || ledgerCount(req.OutRequestNo) != 1 {
		t.Fatalf("resend: %v, %d coupons", err, ledgerCount(req.OutRequestNo))
	}
	if _, err := c.SendMultiuseCoupon(ctx, mreq); err != nil || ledgerCount(mreq.OutRequestNo) != 1 {
		t.Fatalf("multiuse resend: %v, %d coupons", err, ledgerCount(mreq.OutRequestNo))
	}
}

func total(m map[string]int64) (n int64) {
	for _, v := range m {
		n += v
	}
	return n
}

// A coupon issued by a call whose answer was lost: the client must call it
// ambiguous, and the same request again must return that coupon.
func TestCommitThenFailResolvesByResending(t *testing.T) {
	c := newClient(t)
	for _, mode := range []struct {
		name, mode string
		status     int
		code       string
	}{{"500", "500", 500, "SYSTEM_ERROR"}, {"dropped connection", "drop", 0, wechat.CodeNetwork}} {
		t.Run(mode.name, func(t *testing.T) {
			req := wechat.SendCouponRequest{OpenID: unique("o"), StockID: newStock(t, sandbox.StockSpec{Budget: 1}), OutRequestNo: unique("r")}
			sb.SetFaults(sandbox.Faults{CommitFailRate: 1, CommitFailMode: mode.mode})
			_, err := c.SendCoupon(context.Background(), req)
			sb.SetFaults(sandbox.Faults{})
			wantClass(t, err, wechat.Ambiguous, mode.status, mode.code)
			if n := ledgerCount(req.OutRequestNo); n != 1 {
				t.Fatalf("commit-then-fail left %d coupons", n)
			}
			// The budget of 1 is spent: only the idempotent replay can succeed.
			resp, err := c.SendCoupon(context.Background(), req)
			if err != nil {
				t.Fatalf("retry: %v", err)
			}
			var issued string
			for _, lc := range sb.Ledger().Coupons {
				if lc.OutRequestNo == req.OutRequestNo {
					issued = lc.CouponID
				}
			}
			if resp.CouponID != issued || ledgerCount(req.OutRequestNo) != 1 {
				t.Fatalf("retry returned %s, ledger has %s (%d coupons)", resp.CouponID, issued, ledgerCount(req.OutRequestNo))
			}
		})
	}
}

func TestListUserCoupons(t *testing.T) {
	c := newClient(t)
	ctx := context.Background()
	openid := unique("o")
	a := newStock(t, sandbox.StockSpec{})
	b := newStock(t, sandbox.StockSpec{CouponValue: 500, CouponMinimum: 1000})
	var ids []string
	for _, stock := range []string{a, a, b, b, b} {
		resp, err := c.SendCoupon(ctx, wechat.SendCouponRequest{OpenID: openid, StockID: stock, OutRequestNo: unique("r")})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, resp.CouponID)
	}
	page, err := c.ListUserCoupons(ctx, wechat.ListCouponsRequest{OpenID: openid, Limit: 2, Offset: 2})
	if err != nil {
		t.Fatal(err)
	}
	if page.TotalCount != 5 || len(page.Data) != 2 || page.Limit != 2 || page.Offset != 2 {
		t.Fatalf("page: total %d, %d items, limit %d offset %d", page.TotalCount, len(page.Data), page.Limit, page.Offset)
	}
	if page.Data[0].CouponID != ids[2] {
		t.Errorf("offset 2 starts at %s, want %s", page.Data[0].CouponID, ids[2])
	}
	all, err := c.ListAllUserCoupons(ctx, wechat.ListCouponsRequest{OpenID: openid, StockID: b, Limit: 2})
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 3 {
		t.Fatalf("stock %s: %d coupons, want 3", b, len(all))
	}
	got := all[0]
	if got.StockID != b || got.Status != "SENDED" || got.CreateTime == "" || got.NormalCoupon == nil ||
		got.NormalCoupon.CouponAmount != 500 || got.NormalCoupon.TransactionMinimum != 1000 || got.ConsumeInformation != nil {
		t.Fatalf("coupon %+v", got)
	}
	if err := sb.MarkUsed(ids[0], "1900000099", "4200000000001"); err != nil {
		t.Fatal(err)
	}
	// With creator_mchid (the client's default), USED returns the usable
	// coupons too (USED:返回可用+已实扣); the used one carries its use.
	used, err := c.ListAllUserCoupons(ctx, wechat.ListCouponsRequest{OpenID: openid, Status: "USED"})
	if err != nil {
		t.Fatal(err)
	}
	if len(used) != 5 || used[0].CouponID != ids[0] || used[0].Status != "USED" || used[0].ConsumeInformation == nil ||
		used[0].ConsumeInformation.TransactionID != "4200000000001" || used[0].ConsumeInformation.ConsumeMchID != "1900000099" ||
		used[1].ConsumeInformation != nil {
		t.Fatalf("used coupons %+v", used)
	}
	_, err = c.ListUserCoupons(ctx, wechat.ListCouponsRequest{OpenID: openid, Limit: 101})
	wantClass(t, err, wechat.Permanent, 400, "PARAM_ERROR")
}

func TestSendMultiuseCarriesOnlyCiphertext(t *testing.T) {
	c := newClient(t)
	ctx := context.Background()
	const name, idCard = "张三丰", "11010519491231002X"
	var mu sync.Mutex
	var seen []sandbox.RecordedRequest
	sb.OnRequest(func(r sandbox.RecordedRequest) {
		mu.Lock()
		seen = append(seen, r)
		mu.Unlock()
	})
	t.Cleanup(func() { sb.OnRequest(nil) })

	ident, err := c.Encryptor().EncryptIdentity(name, idCard)
	if err != nil {
		t.Fatal(err)
	}
	if ident.KeyID != sb.Env()[wechat.EnvPublicKeyID] {
		t.Fatalf("encrypted under %q", ident.KeyID)
	}
	stock := newStock(t, sandbox.StockSpec{Kind: "multiuse", CouponValue: 10000})
	openid := unique("o")
	req := wechat.SendMultiuseRequest{OpenID: openid, StockID: stock, OutRequestNo: unique("m"), Amount: 5000, Identity: ident}
	resp, err := c.SendMultiuseCoupon(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	again, err := c.SendMultiuseCoupon(ctx, req)
	if err != nil || again.CouponID != resp.CouponID {
		t.Fatalf("resend: %v, %v vs %v", err, again, resp)
	}

	sb.OnRequest(nil)
	mu.Lock()
	defer mu.Unlock()
	var multiuse int
	for _, r := range seen {
		if !strings.HasPrefix(r.Path, "/v3/multiuse/") {
			continue
		}
		multiuse++
		body := string(r.Body)
		if strings.Contains(body, name) || strings.Contains(body, idCard) || strings.Contains(body, "110105") {
			t.Fatalf("plaintext on the wire: %s", body)
		}
		if !strings.Contains(body, ident.UserName) || !strings.Contains(body, ident.IDCardNumber) {
			t.Fatalf("ciphertext missing from the body: %s", body)
		}
		if r.Header.Get("Wechatpay-Serial") != ident.KeyID {
			t.Fatalf("Wechatpay-Serial %q", r.Header.Get("Wechatpay-Serial"))
		}
	}
	if multiuse != 2 {
		t.Fatalf("the sandbox saw %d consumer-fund requests, want 2", multiuse)
	}

	funds, err := c.ListAllUserCoupons(ctx, wechat.ListCouponsRequest{OpenID: openid, BusinessType: "MULTIUSE"})
	if err != nil {
		t.Fatal(err)
	}
	if len(funds) != 1 || funds[0].CouponID != resp.CouponID {
		t.Fatalf("consumer funds listed: %+v", funds)
	}

	stale := req
	stale.OutRequestNo = unique("m")
	stale.Identity.KeyID = "PUB_KEY_ID_OLD"
	_, err = c.SendMultiuseCoupon(ctx, stale)
	wantClass(t, err, wechat.Permanent, 0, wechat.CodeBadRequest)
}

func TestEncryptIdentityNeverEchoesPlaintext(t *testing.T) {
	c := newClient(t)
	_, err := c.Encryptor().EncryptIdentity("李四", "1234")
	if err == nil || !strings.Contains(err.Error(), "id_card_number") || strings.Contains(err.Error(), "1234") {
		t.Fatalf("bad id card: %v", err)
	}
}

func multiuseRequest(t *testing.T, c *wechat.Client) wechat.SendMultiuseRequest {
	t.Helper()
	ident, err := c.Encryptor().EncryptIdentity("李四", "110105194912310029")
	if err != nil {
		t.Fatal(err)
	}
	stock := newStock(t, sandbox.StockSpec{Kind: "multiuse", CouponValue: 10000})
	return wechat.SendMultiuseRequest{OpenID: unique("o"), StockID: stock, OutRequestNo: unique("m"), Amount: 5000, Identity: ident}
}

// A call leaves nothing running once it has returned: before calls carried
// their deadline in their context, each left a goroutine and a timer alive
// for the whole request timeout (100 calls, 100 goroutines).
func TestCallsLeaveNoGoroutines(t *testing.T) {
	c := newClient(t)
	stock := newStock(t, sandbox.StockSpec{Budget: 1000})
	ctx := context.Background()
	if _, err := c.SendCoupon(ctx, wechat.SendCouponRequest{OpenID: unique("o"), StockID: stock, OutRequestNo: unique("r")}); err != nil {
		t.Fatal(err)
	}
	base := runtime.NumGoroutine() // the connection's own are running now
	for range 100 {
		if _, err := c.SendCoupon(ctx, wechat.SendCouponRequest{OpenID: unique("o"), StockID: stock, OutRequestNo: unique("r")}); err != nil {
			t.Fatal(err)
		}
	}
	if n := runtime.NumGoroutine() - base; n > 10 {
		t.Fatalf("%d more goroutines after 100 calls", n)
	}
}
