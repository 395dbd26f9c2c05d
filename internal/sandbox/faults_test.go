package sandbox_test

import (
	"errors"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/wechatpay-apiv3/wechatpay-go/core"

	"github.com/couponflow/dispatcher/internal/sandbox"
	"github.com/couponflow/dispatcher/internal/sandbox/sandboxtest"
)

// TestFaults runs on its own sandbox: faults apply to every API request.
func TestFaults(t *testing.T) {
	s := sandboxtest.Start(t, sandboxtest.WithFaults(sandbox.Faults{RateLimit: 1000}))
	c := sdk(t, s)
	id := s.Identity()
	coupons := func() int { return len(s.Ledger().Coupons) }

	t.Run("rate limit", func(t *testing.T) {
		s.SetFaults(sandbox.Faults{RateLimit: 2})
		defer s.SetFaults(sandbox.Faults{})
		limited := 0
		for range 12 {
			_, err := list(c, s, "o1", url.Values{"creator_mchid": {id.MchID}})
			var e *core.APIError
			if errors.As(err, &e) && e.StatusCode == 429 && e.Code == "FREQUENCY_LIMIT_EXCEED" {
				limited++
			} else if err != nil {
				t.Fatal(err)
			}
		}
		if limited < 6 {
			t.Errorf("%d of 12 back-to-back requests were limited at 2/s", limited)
		}
		if got := s.Ledger().Requests["429 FREQUENCY_LIMIT_EXCEED"]; got != int64(limited) {
			t.Errorf("ledger counts %d 429s, saw %d", got, limited)
		}
		// Authentication comes first: a bad request is not rate limited but refused.
		s.SetFaults(sandbox.Faults{RateLimit: 0.001})
		_, err := send(sdk(t, s, clientOpts{signer: signerWith(s, anotherKey(t), false)}), s, sendArgs{openid: "o", stock: id.StockID})
		wantAPIError(t, err, 401, "SIGN_ERROR")
	})

	t.Run("error rate", func(t *testing.T) {
		s.SetFaults(sandbox.Faults{ErrorRate: 1})
		defer s.SetFaults(sandbox.Faults{})
		before := coupons()
		_, err := send(c, s, sendArgs{openid: "o2", stock: id.StockID})
		wantAPIError(t, err, 500, "SYSTEM_ERROR")
		if coupons() != before {
			t.Error("ErrorRate committed a coupon")
		}
		// The admin API is never faulted.
		var l sandbox.Ledger
		if code := adminDo(t, s, "GET", "/sandbox/ledger", nil, &l); code != 200 || l.Faults["system_error"] != 1 {
			t.Errorf("admin ledger: %d %v", code, l.Faults)
		}
	})

	for _, mode := range []string{sandbox.CommitFail500, sandbox.CommitFailDrop} {
		t.Run("commit fail "+mode, func(t *testing.T) {
			s.SetFaults(sandbox.Faults{CommitFailRate: 1, CommitFailMode: mode})
			a := sendArgs{openid: "o3-" + mode, stock: id.StockID, outNo: "commit-" + mode}
			before := coupons()
			_, err := send(c, s, a)
			var e *core.APIError
			switch {
			case mode == sandbox.CommitFail500:
				wantAPIError(t, err, 500, "SYSTEM_ERROR")
			case err == nil || errors.As(err, &e):
				t.Fatalf("dropped connection answered %v", err)
			}
			l := s.Ledger()
			if len(l.Coupons) != before+1 || l.Coupons[before].OutRequestNo != a.outNo {
				t.Fatalf("the coupon was not committed: %+v", l.Coupons[before:])
			}
			if l.Faults["commit_fail_"+mode] != 1 {
				t.Errorf("faults %v", l.Faults)
			}
			if mode == sandbox.CommitFailDrop && l.Requests["0 CONNECTION_DROPPED"] != 1 {
				t.Errorf("requests %v", l.Requests)
			}
			s.SetFaults(sandbox.Faults{})
			if got := mustSend(t, c, s, a); got != l.Coupons[before].CouponID {
				t.Errorf("retry got %s, want the committed %s", got, l.Coupons[before].CouponID)
			}
			if coupons() != before+1 {
				t.Error("the retry issued another coupon")
			}
		})
	}

	t.Run("bad signature", func(t *testing.T) {
		s.SetFaults(sandbox.Faults{BadSignatureRate: 1})
		defer s.SetFaults(sandbox.Faults{})
		before := coupons()
		_, err := send(c, s, sendArgs{openid: "o4", stock: id.StockID})
		var e *core.APIError
		if err == nil || errors.As(err, &e) || !strings.Contains(err.Error(), "verify") {
			t.Fatalf("the SDK accepted a bad signature: %v", err)
		}
		if coupons() != before+1 {
			t.Error("the coupon was not issued")
		}
		// Error answers keep a valid signature.
		resp, _ := do(t, s, rawRequest{method: "GET", uri: "/v3/marketing/favor/users/o4/coupons?appid=x&creator_mchid=1"})
		wantAPIError(t, apiErrorOf(t, resp), 400, "APPID_MCHID_NOT_MATCH")
	})

	t.Run("latency", func(t *testing.T) {
		s.SetFaults(sandbox.Faults{Latency: 150 * time.Millisecond})
		defer s.SetFaults(sandbox.Faults{})
		start := time.Now()
		if _, err := list(c, s, "o5", url.Values{"creator_mchid": {id.MchID}}); err != nil {
			t.Fatal(err)
		}
		if d := time.Since(start); d < 150*time.Millisecond {
			t.Errorf("answered in %v", d)
		}
		if n := s.Ledger().Faults["latency"]; n != 1 {
			t.Errorf("latency counted %d times", n)
		}
	})

	t.Run("admin faults", func(t *testing.T) {
		s.SetFaults(sandbox.Faults{ErrorRate: 0.25})
		var f map[string]any
		if code := adminDo(t, s, "PUT", "/sandbox/faults", map[string]any{"latency": "50ms", "commit_fail_rate": 0.5}, &f); code != 200 {
			t.Fatalf("PUT faults: %d %v", code, f)
		}
		if f["latency"] != "50ms" || f["error_rate"] != 0.25 || f["commit_fail_rate"] != 0.5 {
			t.Errorf("partial update gave %v", f)
		}
		if got := s.Faults(); got.Latency != 50*time.Millisecond || got.ErrorRate != 0.25 {
			t.Errorf("Faults() = %+v", got)
		}
		var e map[string]string
		for _, bad := range []map[string]any{{"error_rate": 2}, {"commit_fail_mode": "sometimes"}, {"latency": "soon"}, {"typo_rate": 1}} {
			if code := adminDo(t, s, "PUT", "/sandbox/faults", bad, &e); code != 400 || e["error"] == "" {
				t.Errorf("PUT %v: %d %v", bad, code, e)
			}
		}
		s.SetFaults(sandbox.Faults{})
	})
}
