package wechat

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/couponflow/dispatcher/internal/sandbox"
	"github.com/couponflow/dispatcher/internal/sandbox/sandboxtest"
)

// A sandbox that reads the list's offset one way, a client of it, and a
// user holding n coupons.
func pagedSandbox(t *testing.T, reading string, n int) (*Client, string) {
	t.Helper()
	sb := sandboxtest.Start(t, func(c *sandbox.Config) { c.ListPaging = reading })
	env := sb.Env()
	c, err := New(context.Background(), Config{
		MchID: env[EnvMchID], MchSerial: env[EnvMchSerial], PrivateKeyPath: env[EnvPrivateKey],
		PublicKeyPath: env[EnvPublicKey], PublicKeyID: env[EnvPublicKeyID], AppID: env[EnvAppID], BaseURL: env[EnvBaseURL],
	})
	if err != nil {
		t.Fatal(err)
	}
	stock, err := sb.CreateStock(sandbox.StockSpec{Kind: sandbox.KindFavor, Budget: 100, CouponValue: 100, CouponMinimum: 100})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < n; i++ {
		if _, err := c.SendCoupon(context.Background(), SendCouponRequest{OpenID: "o_paged", StockID: stock.ID, OutRequestNo: fmt.Sprintf("r-paged-%d", i)}); err != nil {
			t.Fatal(err)
		}
	}
	return c, "o_paged"
}

// Under either reading of offset, every coupon comes back once.
func TestListAllUnderBothReadingsOfOffset(t *testing.T) {
	for _, reading := range []string{sandbox.PagingItems, sandbox.PagingPages} {
		t.Run(reading, func(t *testing.T) {
			c, openid := pagedSandbox(t, reading, 7)
			for _, limit := range []int{1, 2, 3, 7, 10} {
				all, err := c.ListAllUserCoupons(context.Background(), ListCouponsRequest{OpenID: openid, Limit: limit})
				if err != nil {
					t.Fatalf("limit %d: %v", limit, err)
				}
				ids := map[string]bool{}
				for _, cp := range all {
					ids[cp.CouponID] = true
				}
				if len(all) != 7 || len(ids) != 7 {
					t.Fatalf("limit %d: %d coupons, %d distinct; want 7", limit, len(all), len(ids))
				}
			}
		})
	}
}

// Paging under the wrong reading cannot end quietly short. Pages read as
// coupon counts skip coupons: the listing fails, naming the page and how
// many coupons it holds. Coupon counts read as pages only overlap: every
// coupon still comes back once.
func TestListAllUnderTheWrongReadingNeverLosesCoupons(t *testing.T) {
	c, openid := pagedSandbox(t, sandbox.PagingPages, 5)
	all, err := c.listAll(context.Background(), ListCouponsRequest{OpenID: openid, Limit: 2}, pagingItems)
	var e *Error
	if !errors.As(err, &e) || e.Code != CodeInconsistentPages || e.Class != Ambiguous {
		t.Fatalf("got %d coupons and %v; want %s", len(all), err, CodeInconsistentPages)
	}
	t.Log(e.Message)

	c, openid = pagedSandbox(t, sandbox.PagingItems, 5)
	all, err = c.listAll(context.Background(), ListCouponsRequest{OpenID: openid, Limit: 2}, pagingPages)
	if err != nil || len(all) != 5 {
		t.Fatalf("got %d coupons and %v; want all 5", len(all), err)
	}
}
