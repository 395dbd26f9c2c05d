package wechat_test

import (
	"context"
	"testing"
	"time"

	"github.com/couponflow/dispatcher/internal/sandbox"
	"github.com/couponflow/dispatcher/internal/wechat"
)

func TestQueryStock(t *testing.T) {
	c := newClient(t)
	ctx := context.Background()
	begin := time.Now().Add(-time.Hour).Truncate(time.Second)
	end := time.Now().Add(48 * time.Hour).Truncate(time.Second)
	stock := newStock(t, sandbox.StockSpec{Budget: 5, MaxPerUser: 1, CouponValue: 300, CouponMinimum: 500, AvailableBegin: begin, AvailableEnd: end})
	for range 2 {
		if _, err := c.SendCoupon(ctx, wechat.SendCouponRequest{OpenID: unique("o"), StockID: stock, OutRequestNo: unique("r")}); err != nil {
			t.Fatal(err)
		}
	}
	info, err := c.QueryStock(ctx, stock, "")
	if err != nil {
		t.Fatal(err)
	}
	want := wechat.StockInfo{StockID: stock, CreatorMchID: c.MchID(), Name: info.Name, Status: wechat.StockRunning,
		AvailableBegin: begin, AvailableEnd: end, MaxCoupons: 5, Distributed: 2, MaxAmount: 1500,
		CouponAmount: 300, TransactionMinimum: 500, MaxPerUser: 1, RequestID: info.RequestID}
	if !info.AvailableBegin.Equal(begin) || !info.AvailableEnd.Equal(end) {
		t.Errorf("window %s to %s, want %s to %s", info.AvailableBegin, info.AvailableEnd, begin, end)
	}
	info.AvailableBegin, info.AvailableEnd = begin, end // compared above, across time zones
	if *info != want {
		t.Errorf("got  %+v\nwant %+v", *info, want)
	}
	if info.RequestID == "" || info.Name == "" {
		t.Errorf("no Request-Id or name: %+v", info)
	}
	if n := info.Remaining(); n != 3 {
		t.Errorf("Remaining() = %d, want 3", n)
	}
	if !info.ActiveAt(time.Now()) || info.ActiveAt(end) || info.ActiveAt(begin.Add(-time.Second)) || info.EndedBy(time.Now()) || !info.EndedBy(end) {
		t.Errorf("window judged wrong: %+v", info)
	}

	// Stopped, as WeChat spells it.
	if err := sb.SetStockState(stock, sandbox.StateStopped); err != nil {
		t.Fatal(err)
	}
	info, err = c.QueryStock(ctx, stock, "")
	if err != nil {
		t.Fatal(err)
	}
	if info.Status != wechat.StockStopped || !info.Stopped() || info.ActiveAt(time.Now()) || info.StopTime.IsZero() {
		t.Errorf("a stopped stock: %+v", info)
	}
}

func TestQueryStockErrors(t *testing.T) {
	c := newClient(t)
	ctx := context.Background()
	_, err := c.QueryStock(ctx, "98765432109876", "")
	e := wantClass(t, err, wechat.Permanent, 404, "RESOURCE_NOT_EXISTS")
	if e.Message == "" {
		t.Error("no message carried")
	}
	stock := newStock(t, sandbox.StockSpec{})
	_, err = c.QueryStock(ctx, stock, "1900000777")
	wantClass(t, err, wechat.Permanent, 400, "PARAM_ERROR")
	_, err = c.QueryStock(ctx, "12/34", "")
	wantClass(t, err, wechat.Permanent, 0, wechat.CodeBadRequest)

	withFaults(t, sandbox.Faults{ErrorRate: 1})
	_, err = c.QueryStock(ctx, stock, "")
	wantClass(t, err, wechat.Ambiguous, 500, "SYSTEM_ERROR")
}

// Remaining takes the smaller of what the coupon count and the amount
// leave, and never goes below zero.
func TestStockInfoRemaining(t *testing.T) {
	for _, c := range []struct {
		name string
		s    wechat.StockInfo
		want int64
	}{
		{"count only", wechat.StockInfo{MaxCoupons: 10, Distributed: 4}, 6},
		{"amount the tighter", wechat.StockInfo{MaxCoupons: 10, Distributed: 4, MaxAmount: 700, CouponAmount: 100}, 3},
		{"count the tighter", wechat.StockInfo{MaxCoupons: 10, Distributed: 4, MaxAmount: 100000, CouponAmount: 100}, 6},
		{"overspent", wechat.StockInfo{MaxCoupons: 10, Distributed: 12}, 0},
		{"amount overspent", wechat.StockInfo{MaxCoupons: 10, Distributed: 4, MaxAmount: 300, CouponAmount: 100}, 0},
	} {
		if got := c.s.Remaining(); got != c.want {
			t.Errorf("%s: Remaining() = %d, want %d", c.name, got, c.want)
		}
	}
}
