package sandbox_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/wechatpay-apiv3/wechatpay-go/core"
	"github.com/wechatpay-apiv3/wechatpay-go/services/cashcoupons"

	"github.com/couponflow/dispatcher/internal/sandbox"
	"github.com/couponflow/dispatcher/internal/sandbox/sandboxtest"
)

func queryStock(c *core.Client, stockID, creator string) (*cashcoupons.Stock, error) {
	resp, _, err := (&cashcoupons.StockApiService{Client: c}).QueryStock(context.Background(), cashcoupons.QueryStockRequest{
		StockId: core.String(stockID), StockCreatorMchid: core.String(creator),
	})
	return resp, err
}

// The query answers every field the SDK's cashcoupons.Stock reads, with the
// figures the stock's sends produced: the SDK decodes it and verifies its
// signature, so a field of the wrong type or a bad signature fails here.
func TestQueryStockThroughTheSDK(t *testing.T) {
	cst := time.FixedZone("CST", 8*3600)
	var now atomic.Pointer[time.Time]
	set := func(t time.Time) { now.Store(&t) }
	set(time.Date(2026, 3, 10, 12, 0, 0, 0, cst))
	s := sandboxtest.Start(t, func(c *sandbox.Config) { c.Now = func() time.Time { return *now.Load() } })
	c := sdk(t, s)
	id := s.Identity()
	k := newStock(t, s, sandbox.StockSpec{Name: "春季券", Budget: 3, MaxPerUser: 2, CouponValue: 500, CouponMinimum: 1000, MaxAmountByDay: 100000})
	mustSend(t, c, s, sendArgs{openid: "o-q1", stock: k.ID})
	mustSend(t, c, s, sendArgs{openid: "o-q2", stock: k.ID})

	got, err := queryStock(c, k.ID, id.MchID)
	if err != nil {
		t.Fatal(err)
	}
	str := func(p *string) string {
		if p == nil {
			return "<nil>"
		}
		return *p
	}
	num := func(p *int64) int64 {
		if p == nil {
			return -1
		}
		return *p
	}
	for _, c := range []struct{ field, got, want string }{
		{"stock_id", str(got.StockId), k.ID},
		{"stock_creator_mchid", str(got.StockCreatorMchid), id.MchID},
		{"stock_name", str(got.StockName), "春季券"},
		{"status", str(got.Status), "running"},
		{"create_time", str(got.CreateTime), "2026-03-10T12:00:00+08:00"},
		{"available_begin_time", str(got.AvailableBeginTime), "2026-03-09T12:00:00+08:00"}, // default: a day before
		{"available_end_time", str(got.AvailableEndTime), "2026-04-09T12:00:00+08:00"},     // default: 30 days after
		{"stock_type", str(got.StockType), "NORMAL"},
		{"start_time", str(got.StartTime), "2026-03-10T12:00:00+08:00"},
	} {
		if c.got != c.want {
			t.Errorf("%s = %q, want %q", c.field, c.got, c.want)
		}
	}
	if got.StopTime != nil {
		t.Errorf("stop_time = %q on a running stock", *got.StopTime)
	}
	if num(got.DistributedCoupons) != 2 {
		t.Errorf("distributed_coupons = %d, want 2", num(got.DistributedCoupons))
	}
	if got.NoCash == nil || got.Singleitem == nil || got.Description == nil {
		t.Errorf("no_cash, singleitem, description must be present (必填): %+v", got)
	}
	r := got.StockUseRule
	if r == nil || r.FixedNormalCoupon == nil {
		t.Fatalf("stock_use_rule or its fixed_normal_coupon missing: %+v", got)
	}
	for _, c := range []struct {
		field     string
		got, want int64
	}{
		{"max_coupons", num(r.MaxCoupons), 3},
		{"max_amount", num(r.MaxAmount), 1500},
		{"max_amount_by_day", num(r.MaxAmountByDay), 100000},
		{"max_coupons_per_user", num(r.MaxCouponsPerUser), 2},
		{"coupon_amount", num(r.FixedNormalCoupon.CouponAmount), 500},
		{"transaction_minimum", num(r.FixedNormalCoupon.TransactionMinimum), 1000},
	} {
		if c.got != c.want {
			t.Errorf("stock_use_rule.%s = %d, want %d", c.field, c.got, c.want)
		}
	}

	// The states as the docs spell them, stop_time once stopped.
	for _, c := range []struct{ action, status string }{{"pause", "paused"}, {"stop", "stoped"}, {"activate", "running"}} {
		if code := adminDo(t, s, "POST", "/sandbox/stocks/"+k.ID+"/"+c.action, nil, nil); code != 200 {
			t.Fatalf("%s: admin answered %d", c.action, code)
		}
		got, err := queryStock(sdk(t, s), k.ID, id.MchID)
		if err != nil {
			t.Fatal(err)
		}
		if *got.Status != c.status {
			t.Errorf("after %s: status %q, want %q", c.action, *got.Status, c.status)
		}
		if stopped := got.StopTime != nil; stopped != (c.status == "stoped") {
			t.Errorf("after %s: stop_time %v", c.action, got.StopTime)
		}
	}
}

func TestQueryStockErrorsAsWeChatAnswers(t *testing.T) {
	c := sdk(t, shared)
	id := shared.Identity()
	k := newStock(t, shared, sandbox.StockSpec{})
	other := newStock(t, shared, sandbox.StockSpec{CreatorMchID: "1900000888"})

	_, err := queryStock(c, "99999999999", id.MchID)
	wantAPIError(t, err, 404, "RESOURCE_NOT_EXISTS", "批次不存在", "99999999999")
	_, err = queryStock(c, k.ID, "1900000777")
	wantAPIError(t, err, 400, "PARAM_ERROR", "stock_creator_mchid", "1900000777")
	_, err = queryStock(c, other.ID, "1900000888")
	wantAPIError(t, err, 403, "NO_AUTH", other.ID)
	// A merchant the creator authorised may query it, as it may send it.
	if err := shared.AuthorizeMchID(other.ID, id.MchID); err != nil {
		t.Fatal(err)
	}
	if _, err := queryStock(c, other.ID, "1900000888"); err != nil {
		t.Errorf("an authorised sender's query: %v", err)
	}
	// stock_creator_mchid is required: the SDK refuses to call without it,
	// so ask by hand.
	resp, _ := do(t, shared, rawRequest{method: "GET", uri: "/v3/marketing/favor/stocks/" + k.ID})
	wantAPIError(t, apiErrorOf(t, resp), 400, "PARAM_ERROR", "stock_creator_mchid")
}

// A send outside the stock's window is refused as WeChat refuses a stock
// that has ended or not begun, which the worker holds like a paused stock.
func TestSendOutsideTheWindow(t *testing.T) {
	cst := time.FixedZone("CST", 8*3600)
	var now atomic.Pointer[time.Time]
	set := func(t time.Time) { now.Store(&t) }
	start := time.Date(2026, 5, 1, 10, 0, 0, 0, cst)
	set(start)
	s := sandboxtest.Start(t, func(c *sandbox.Config) { c.Now = func() time.Time { return *now.Load() } })
	c := sdk(t, s)
	k := newStock(t, s, sandbox.StockSpec{AvailableBegin: start.Add(time.Hour), AvailableEnd: start.Add(2 * time.Hour)})

	_, err := send(c, s, sendArgs{openid: "o-w1", stock: k.ID})
	wantAPIError(t, err, 400, "INVALID_REQUEST", "活动已结束或未激活", "available from 2026-05-01T11:00:00+08:00")
	set(start.Add(time.Hour))
	mustSend(t, c, s, sendArgs{openid: "o-w1", stock: k.ID})
	set(start.Add(2 * time.Hour))
	_, err = send(c, s, sendArgs{openid: "o-w2", stock: k.ID})
	wantAPIError(t, err, 400, "INVALID_REQUEST", "活动已结束或未激活", "ended at 2026-05-01T12:00:00+08:00")

	// The admin API moves the window; the query shows it.
	var got sandbox.Stock
	if code := adminDo(t, s, "POST", "/sandbox/stocks/"+k.ID+"/window", map[string]string{"available_end_time": "2026-05-02T00:00:00+08:00"}, &got); code != 200 {
		t.Fatalf("window: %d %+v", code, got)
	}
	mustSend(t, c, s, sendArgs{openid: "o-w2", stock: k.ID})
	q, err := queryStock(c, k.ID, s.Identity().MchID)
	if err != nil {
		t.Fatal(err)
	}
	if *q.AvailableEndTime != "2026-05-02T00:00:00+08:00" || *q.AvailableBeginTime != "2026-05-01T11:00:00+08:00" {
		t.Errorf("window %s to %s after the admin moved its end", *q.AvailableBeginTime, *q.AvailableEndTime)
	}
	// An end before the begin is refused, naming both.
	var e map[string]string
	if code := adminDo(t, s, "POST", "/sandbox/stocks/"+k.ID+"/window", map[string]string{"available_end_time": "2026-05-01T00:00:00+08:00"}, &e); code != 400 {
		t.Errorf("an end before the begin: %d %v", code, e)
	}
	if _, err := s.CreateStock(sandbox.StockSpec{Budget: 1, AvailableBegin: start, AvailableEnd: start}); err == nil {
		t.Error("a stock whose window is empty was created")
	}
}
