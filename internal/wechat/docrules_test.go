package wechat_test

import (
	"context"
	"strings"
	"sync"
	"testing"

	"github.com/couponflow/dispatcher/internal/sandbox"
	"github.com/couponflow/dispatcher/internal/wechat"
)

// The sandbox's rules (docs/sandbox.md, "Rules and where they come from")
// as this client meets them, and the class each refusal gets: what the
// worker does about it.
func TestClientMeetsTheDocsRules(t *testing.T) {
	c := newClient(t)
	ctx := context.Background()
	id := sb.Identity()
	send := func(req wechat.SendCouponRequest) error {
		if req.OutRequestNo == "" {
			req.OutRequestNo = unique("r")
		}
		_, err := c.SendCoupon(ctx, req)
		return err
	}
	ident, err := c.Encryptor().EncryptIdentity("吴十", "110105194912310101")
	if err != nil {
		t.Fatal(err)
	}
	sendFunds := func(openid, stock string, amount int64, who wechat.EncryptedIdentity) (*wechat.SendCouponResponse, error) {
		return c.SendMultiuseCoupon(ctx, wechat.SendMultiuseRequest{OpenID: openid, StockID: stock, OutRequestNo: unique("m"), Amount: amount, Identity: who})
	}

	t.Run("coupon_value only on a fixed-value stock", func(t *testing.T) {
		plain := newStock(t, sandbox.StockSpec{})
		e := wantClass(t, send(wechat.SendCouponRequest{OpenID: unique("o"), StockID: plain, CouponValue: 777, CouponMinimum: 1000}),
			wechat.Permanent, 400, "PARAM_ERROR")
		if !strings.Contains(e.Message, "coupon_value") {
			t.Errorf("message does not name the field: %s", e.Message)
		}
		fixed := newStock(t, sandbox.StockSpec{FixedValue: true})
		wantClass(t, send(wechat.SendCouponRequest{OpenID: unique("o"), StockID: fixed}), wechat.Permanent, 400, "PARAM_ERROR")
		if err := send(wechat.SendCouponRequest{OpenID: unique("o"), StockID: fixed, CouponValue: 777, CouponMinimum: 1000}); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("openid of another appid", func(t *testing.T) {
		openid := unique("o")
		if _, err := sb.RegisterUser(sandbox.User{OpenID: openid, AppID: "wx00000000000000cc"}); err != nil {
			t.Fatal(err)
		}
		e := wantClass(t, send(wechat.SendCouponRequest{OpenID: openid, StockID: id.StockID}), wechat.Permanent, 400, "INVALID_REQUEST")
		if !strings.Contains(e.Message, "openid与appid不匹配") {
			t.Errorf("message %q", e.Message)
		}
		_, err := sendFunds(openid, id.MultiuseStockID, 100, ident)
		wantClass(t, err, wechat.Permanent, 400, "INVALID_REQUEST")
		_, err = c.ListUserCoupons(ctx, wechat.ListCouponsRequest{OpenID: openid})
		wantClass(t, err, wechat.Permanent, 400, "INVALID_REQUEST")
	})

	t.Run("another merchant's stock is held until authorised", func(t *testing.T) {
		const other = "1900000777"
		stock := newStock(t, sandbox.StockSpec{CreatorMchID: other})
		req := wechat.SendCouponRequest{OpenID: unique("o"), StockID: stock, StockCreatorMchID: other, OutRequestNo: unique("r")}
		e := wantClass(t, send(req), wechat.StockUnavailable, 403, "REQUEST_BLOCKED")
		if !strings.Contains(e.Message, "批次不支持跨商户发券") {
			t.Errorf("message %q", e.Message)
		}
		if err := sb.AuthorizeMchID(stock, id.MchID); err != nil {
			t.Fatal(err)
		}
		// The same send, once the operator has authorised: it goes through.
		if err := send(req); err != nil {
			t.Fatalf("after authorisation: %v", err)
		}
	})

	t.Run("abnormal user", func(t *testing.T) {
		openid := unique("o")
		if _, err := sb.RegisterUser(sandbox.User{OpenID: openid, Abnormal: true}); err != nil {
			t.Fatal(err)
		}
		wantClass(t, send(wechat.SendCouponRequest{OpenID: openid, StockID: id.StockID}), wechat.Permanent, 403, "USER_ACCOUNT_ABNORMAL")
		_, err := sendFunds(openid, id.MultiuseStockID, 100, ident)
		wantClass(t, err, wechat.Permanent, 403, "USER_ACCOUNT_ABNORMAL")
	})

	t.Run("consumer funds of a fixed amount", func(t *testing.T) {
		k, err := sb.CreateStock(sandbox.StockSpec{Kind: sandbox.KindMultiuse, Budget: 10, CouponValue: 2500, FixedAmount: true})
		if err != nil {
			t.Fatal(err)
		}
		var mu sync.Mutex
		var bodies []string
		sb.OnRequest(func(r sandbox.RecordedRequest) {
			mu.Lock()
			bodies = append(bodies, string(r.Body))
			mu.Unlock()
		})
		openid := unique("o")
		resp, err := sendFunds(openid, k.ID, 0, ident)
		sb.OnRequest(nil)
		if err != nil {
			t.Fatal(err)
		}
		mu.Lock()
		if len(bodies) != 1 || strings.Contains(bodies[0], `"amount"`) {
			t.Errorf("amount 0 must be left out of the body: %q", bodies)
		}
		mu.Unlock()
		funds, err := c.ListAllUserCoupons(ctx, wechat.ListCouponsRequest{OpenID: openid, BusinessType: "MULTIUSE"})
		if err != nil || len(funds) != 1 || funds[0].CouponID != resp.CouponID || funds[0].AvailableBalance == nil || *funds[0].AvailableBalance != 2500 {
			t.Fatalf("listed %+v, %v", funds, err)
		}
		_, err = sendFunds(unique("o"), k.ID, 2000, ident)
		wantClass(t, err, wechat.Permanent, 400, "PARAM_ERROR")
		// A stock without a fixed amount needs one.
		_, err = sendFunds(unique("o"), id.MultiuseStockID, 0, ident)
		wantClass(t, err, wechat.Permanent, 400, "PARAM_ERROR")
	})

	t.Run("card_type is ID_CARD", func(t *testing.T) {
		_, err := c.SendMultiuseCoupon(ctx, wechat.SendMultiuseRequest{OpenID: unique("o"), StockID: id.MultiuseStockID,
			OutRequestNo: unique("m"), Amount: 100, CardType: "PASSPORT", Identity: ident})
		e := wantClass(t, err, wechat.Permanent, 0, wechat.CodeBadRequest)
		if !strings.Contains(e.Message, "card_type") {
			t.Errorf("message %q", e.Message)
		}
	})

	t.Run("real-name check", func(t *testing.T) {
		const number = "110105194912310128"
		if err := sb.RegisterIdentity("郑十一", number); err != nil {
			t.Fatal(err)
		}
		impostor, err := c.Encryptor().EncryptIdentity("王十二", number)
		if err != nil {
			t.Fatal(err)
		}
		_, err = sendFunds(unique("o"), id.MultiuseStockID, 100, impostor)
		e := wantClass(t, err, wechat.Permanent, 400, "INVALID_REQUEST")
		if !strings.Contains(e.Message, "实名") || strings.Contains(e.Message, number) {
			t.Errorf("message %q", e.Message)
		}
		owner, err := c.Encryptor().EncryptIdentity("郑十一", number)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := sendFunds(unique("o"), id.MultiuseStockID, 100, owner); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("every request carries Accept and User-Agent", func(t *testing.T) {
		var mu sync.Mutex
		var missing []string
		sb.OnRequest(func(r sandbox.RecordedRequest) {
			if r.Header.Get("Accept") == "" || r.Header.Get("User-Agent") == "" {
				mu.Lock()
				missing = append(missing, r.Method+" "+r.Path)
				mu.Unlock()
			}
		})
		defer sb.OnRequest(nil)
		openid := unique("o")
		if err := send(wechat.SendCouponRequest{OpenID: openid, StockID: newStock(t, sandbox.StockSpec{})}); err != nil {
			t.Fatal(err)
		}
		if _, err := sendFunds(openid, id.MultiuseStockID, 100, ident); err != nil {
			t.Fatal(err)
		}
		if _, err := c.ListUserCoupons(ctx, wechat.ListCouponsRequest{OpenID: openid}); err != nil {
			t.Fatal(err)
		}
		mu.Lock()
		defer mu.Unlock()
		if len(missing) > 0 {
			t.Fatalf("requests without Accept or User-Agent: %v", missing)
		}
	})
}
