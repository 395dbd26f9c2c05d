package wechat

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/wechatpay-apiv3/wechatpay-go/services/cashcoupons"
)

// Stock statuses, as the query API spells them (lower case, and 已停止 as
// "stoped": https://pay.weixin.qq.com/docs/merchant/apis/cash-coupons/stock/query-stock.html).
const (
	StockRunning     = "running"
	StockPaused      = "paused"
	StockStopped     = "stoped"
	StockUnactivated = "unactivated"
	StockAudit       = "audit"
)

// StockInfo is what a campaign needs to know of a stock: whether it can
// issue now and until when, and how many more coupons it can issue.
type StockInfo struct {
	StockID      string
	CreatorMchID string
	Name         string
	// Status is WeChat's, lower-cased: StockRunning, StockPaused,
	// StockStopped, StockUnactivated, StockAudit (or another WeChat adds).
	Status string
	// AvailableBegin and AvailableEnd are the window in which the stock
	// issues; zero when WeChat gave none.
	AvailableBegin, AvailableEnd time.Time
	// StopTime is when the stock was stopped for good; zero if it was not.
	StopTime time.Time
	// MaxCoupons and Distributed: the stock's coupon budget and how much
	// of it is issued.
	MaxCoupons, Distributed int64
	// MaxAmount and MaxAmountByDay are budgets in fen (0: none given).
	MaxAmount, MaxAmountByDay int64
	// CouponAmount and TransactionMinimum: a coupon's value and the order
	// amount it needs, in fen (0: none given, as for a stock whose sends
	// name their own value).
	CouponAmount, TransactionMinimum int64
	// MaxPerUser is how many coupons one user may hold (0: not limited).
	MaxPerUser int64
	RequestID  string
}

// Running reports whether WeChat says the stock is issuing (running);
// ActiveAt adds the window.
func (s StockInfo) Running() bool { return s.Status == StockRunning }

// Stopped reports whether the stock was stopped for good.
func (s StockInfo) Stopped() bool { return s.Status == StockStopped }

// ActiveAt reports whether a send at t could be issued: the stock runs
// and t is within its window.
func (s StockInfo) ActiveAt(t time.Time) bool {
	return s.Running() && !t.Before(s.AvailableBegin) && (s.AvailableEnd.IsZero() || t.Before(s.AvailableEnd))
}

// EndedBy reports whether the stock's window is over at t.
func (s StockInfo) EndedBy(t time.Time) bool {
	return !s.AvailableEnd.IsZero() && !t.Before(s.AvailableEnd)
}

// Remaining is how many more coupons the stock can issue: what its coupon
// budget leaves, and, when WeChat gives a total amount and a coupon value,
// what its amount leaves (the smaller; never below 0).
func (s StockInfo) Remaining() int64 {
	left := max(0, s.MaxCoupons-s.Distributed)
	if s.MaxAmount > 0 && s.CouponAmount > 0 {
		spent := s.Distributed * s.CouponAmount
		left = min(left, max(0, (s.MaxAmount-spent)/s.CouponAmount))
	}
	return left
}

// QueryStock asks WeChat about a cash-coupon stock (查询批次详情, GET
// /v3/marketing/favor/stocks/{stock_id}). creatorMchID is the merchant
// that created it; empty means this client's. Errors are classified like
// a send's: an unknown stock is Permanent (404 RESOURCE_NOT_EXISTS).
func (c *Client) QueryStock(ctx context.Context, stockID, creatorMchID string) (*StockInfo, error) {
	ctx, cancel := c.call(ctx)
	defer cancel()
	if creatorMchID == "" {
		creatorMchID = c.mchID
	}
	if err := validateID("stock_id", stockID, 20); err != nil {
		return nil, err
	}
	if err := validateID("stock_creator_mchid", creatorMchID, 20); err != nil {
		return nil, err
	}
	q := url.Values{}
	q.Set("stock_creator_mchid", creatorMchID)
	// By hand rather than through cashcoupons.StockApiService.QueryStock,
	// whose decoding error could not be told from a signature's; the body
	// is the SDK's own model all the same.
	result, err := c.sdk.Request(ctx, http.MethodGet, apiHost+"/v3/marketing/favor/stocks/"+url.PathEscape(stockID), nil, q, nil, "")
	if err != nil {
		return nil, classify(err, result)
	}
	var st cashcoupons.Stock
	if err := decodeBody(result, &st); err != nil {
		return nil, err
	}
	return stockInfo(st, requestID(result))
}

func stockInfo(st cashcoupons.Stock, rid string) (*StockInfo, error) {
	str := func(p *string) string {
		if p == nil {
			return ""
		}
		return *p
	}
	num := func(p *int64) int64 {
		if p == nil {
			return 0
		}
		return *p
	}
	info := &StockInfo{
		StockID: str(st.StockId), CreatorMchID: str(st.StockCreatorMchid), Name: str(st.StockName),
		Status: strings.ToLower(str(st.Status)), Distributed: num(st.DistributedCoupons), RequestID: rid,
	}
	if info.Status == "stopped" { // the docs' "stoped", should WeChat ever spell it right
		info.Status = StockStopped
	}
	var err error
	for _, t := range []struct {
		field string
		v     *string
		into  *time.Time
	}{
		{"available_begin_time", st.AvailableBeginTime, &info.AvailableBegin},
		{"available_end_time", st.AvailableEndTime, &info.AvailableEnd},
		{"stop_time", st.StopTime, &info.StopTime},
	} {
		if t.v == nil || *t.v == "" {
			continue
		}
		if *t.into, err = time.Parse(time.RFC3339, *t.v); err != nil {
			return nil, &Error{Class: Ambiguous, Code: CodeBadResponse, RequestID: rid,
				Message: fmt.Sprintf("stock %s: %s %q is not an RFC 3339 time", info.StockID, t.field, *t.v)}
		}
	}
	if r := st.StockUseRule; r != nil {
		info.MaxCoupons, info.MaxAmount, info.MaxAmountByDay = num(r.MaxCoupons), num(r.MaxAmount), num(r.MaxAmountByDay)
		info.MaxPerUser = num(r.MaxCouponsPerUser)
		if f := r.FixedNormalCoupon; f != nil {
			info.CouponAmount, info.TransactionMinimum = num(f.CouponAmount), num(f.TransactionMinimum)
		}
	}
	if info.Status == "" {
		return nil, &Error{Class: Ambiguous, Code: CodeBadResponse, RequestID: rid,
			Message: fmt.Sprintf("stock %s: the answer has no status", info.StockID)}
	}
	return info, nil
}
