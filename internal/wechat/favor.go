package wechat

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"

	"github.com/wechatpay-apiv3/wechatpay-go/core"
	"github.com/wechatpay-apiv3/wechatpay-go/services/cashcoupons"
)

// The SDK addresses every call to the production host; the client's
// transport sends it to the configured base URL.
const apiHost = DefaultBaseURL

// SendCouponRequest sends one cash coupon (代金券) of a stock to a user.
// Empty AppID and StockCreatorMchID default to the client's appid and
// merchant id.
type SendCouponRequest struct {
	OpenID            string
	StockID           string
	OutRequestNo      string
	AppID             string
	StockCreatorMchID string
	// CouponValue and CouponMinimum (fen) are for stocks set up for
	// 指定面额发券 (a value chosen per send), which require them; every
	// other stock refuses them (该字段暂未开放). Leave both 0 otherwise.
	CouponValue   int64
	CouponMinimum int64
}

// SendCouponResponse is WeChat's answer to a successful send.
type SendCouponResponse struct {
	CouponID  string
	RequestID string
}

// SendCoupon issues a cash coupon. Sending the same request again with the
// same OutRequestNo returns the same coupon and issues nothing: that is how
// an Ambiguous outcome is resolved.
func (c *Client) SendCoupon(ctx context.Context, req SendCouponRequest) (*SendCouponResponse, error) {
	ctx, cancel := c.call(ctx)
	defer cancel()
	if req.AppID == "" {
		req.AppID = c.appID
	}
	if req.StockCreatorMchID == "" {
		req.StockCreatorMchID = c.mchID
	}
	if err := req.Validate(); err != nil {
		return nil, err
	}
	body := cashcoupons.SendCouponRequest{
		Openid:            core.String(req.OpenID),
		StockId:           core.String(req.StockID),
		OutRequestNo:      core.String(req.OutRequestNo),
		Appid:             core.String(req.AppID),
		StockCreatorMchid: core.String(req.StockCreatorMchID),
	}
	if req.CouponValue != 0 || req.CouponMinimum != 0 {
		body.CouponValue = core.Int64(req.CouponValue)
		body.CouponMinimum = core.Int64(req.CouponMinimum)
	}
	svc := cashcoupons.CouponApiService{Client: c.sdk}
	resp, result, err := svc.SendCoupon(ctx, body)
	if err != nil {
		return nil, classify(err, result)
	}
	rid := requestID(result)
	if result.Response.StatusCode == http.StatusAccepted {
		return nil, accepted(result)
	}
	if resp == nil || resp.CouponId == nil || *resp.CouponId == "" {
		// Verified by signature yet without a coupon id: we cannot tell
		// what happened, so the retry under the same out_request_no decides.
		return nil, &Error{Class: Ambiguous, StatusCode: result.Response.StatusCode, Code: CodeBadResponse,
			Message: "response has no coupon_id", RequestID: rid}
	}
	return &SendCouponResponse{CouponID: *resp.CouponId, RequestID: rid}, nil
}

// Validate checks the request as WeChat would, after defaults are applied.
func (r SendCouponRequest) Validate() error {
	if err := validateSend(r.OpenID, r.StockID, r.OutRequestNo, r.AppID); err != nil {
		return err
	}
	if err := validateID("stock_creator_mchid", r.StockCreatorMchID, 20); err != nil {
		return err
	}
	if r.CouponValue < 0 || r.CouponMinimum < 0 || (r.CouponValue == 0) != (r.CouponMinimum == 0) {
		return invalid("coupon_value and coupon_minimum must both be positive or both be absent (got %d and %d)",
			r.CouponValue, r.CouponMinimum)
	}
	if r.CouponMinimum < r.CouponValue {
		return invalid("coupon_minimum %d is below coupon_value %d", r.CouponMinimum, r.CouponValue)
	}
	return nil
}

// ListCouponsRequest filters a user's coupons. One of CreatorMchID and
// AvailableMchID is required by WeChat (creator_mchid wins when both are
// given); when both are empty the client's merchant id is used as
// CreatorMchID. There is no sender_mchid: WeChat lists it as 暂未开放
// (not open), and a request carrying it is refused.
type ListCouponsRequest struct {
	OpenID         string
	AppID          string // default: the client's appid
	StockID        string
	Status         string // SENDED or USED
	CreatorMchID   string
	AvailableMchID string
	BusinessType   string // MULTIUSE lists consumer funds instead of cash coupons
	Offset         int    // page offset
	Limit          int    // page size, 0 for WeChat's default (20)
}

// CouponList is one page of a user's coupons.
type CouponList struct {
	Data       []Coupon `json:"data"`
	TotalCount int      `json:"total_count"`
	Offset     int      `json:"offset"`
	Limit      int      `json:"limit"`
}

// Coupon is a user's coupon as the list API describes it. The SDK's model
// drops coupon_id and consume_information, hence this type.
type Coupon struct {
	StockCreatorMchID  string              `json:"stock_creator_mchid"`
	StockID            string              `json:"stock_id"`
	CouponID           string              `json:"coupon_id"`
	CouponName         string              `json:"coupon_name"`
	Status             string              `json:"status"`
	Description        string              `json:"description"`
	CreateTime         string              `json:"create_time"`
	CouponType         string              `json:"coupon_type"`
	NoCash             bool                `json:"no_cash"`
	AvailableBeginTime string              `json:"available_begin_time"`
	AvailableEndTime   string              `json:"available_end_time"`
	SingleItem         bool                `json:"singleitem"`
	CutToMessage       *CutToMessage       `json:"cut_to_message,omitempty"`
	NormalCoupon       *NormalCouponInfo   `json:"normal_coupon_information,omitempty"`
	ConsumeInformation *ConsumeInformation `json:"consume_information,omitempty"`
	AvailableBalance   *int64              `json:"available_balance,omitempty"`
	BusinessType       string              `json:"business_type,omitempty"`
}

// CutToMessage describes a 减至券.
type CutToMessage struct {
	SinglePriceMax int64 `json:"single_price_max"`
	CutToPrice     int64 `json:"cut_to_price"`
}

// NormalCouponInfo is a 满减券's value and threshold, in fen.
type NormalCouponInfo struct {
	CouponAmount       int64 `json:"coupon_amount"`
	TransactionMinimum int64 `json:"transaction_minimum"`
}

// ConsumeInformation is present once a coupon has been used.
type ConsumeInformation struct {
	ConsumeTime   string        `json:"consume_time"`
	ConsumeMchID  string        `json:"consume_mchid"`
	TransactionID string        `json:"transaction_id"`
	GoodsDetail   []GoodsDetail `json:"goods_detail,omitempty"`
}

// GoodsDetail is one line of the order a coupon was used on.
type GoodsDetail struct {
	GoodsID        string `json:"goods_id"`
	Quantity       int64  `json:"quantity"`
	Price          int64  `json:"price"`
	DiscountAmount int64  `json:"discount_amount"`
}

// ListUserCoupons returns one page of a user's coupons.
func (c *Client) ListUserCoupons(ctx context.Context, req ListCouponsRequest) (*CouponList, error) {
	ctx, cancel := c.call(ctx)
	defer cancel()
	if req.AppID == "" {
		req.AppID = c.appID
	}
	if req.CreatorMchID == "" && req.AvailableMchID == "" {
		req.CreatorMchID = c.mchID
	}
	if err := ValidateOpenID(req.OpenID); err != nil {
		return nil, err
	}
	if req.Offset < 0 || req.Limit < 0 {
		return nil, invalid("offset %d and limit %d must not be negative", req.Offset, req.Limit)
	}
	q := url.Values{}
	q.Set("appid", req.AppID)
	for _, kv := range [][2]string{
		{"stock_id", req.StockID}, {"status", req.Status}, {"creator_mchid", req.CreatorMchID},
		{"available_mchid", req.AvailableMchID}, {"business_type", req.BusinessType},
	} {
		if kv[1] != "" {
			q.Set(kv[0], kv[1])
		}
	}
	if req.Offset > 0 {
		q.Set("offset", strconv.Itoa(req.Offset))
	}
	if req.Limit > 0 {
		q.Set("limit", strconv.Itoa(req.Limit))
	}
	path := apiHost + "/v3/marketing/favor/users/" + url.PathEscape(req.OpenID) + "/coupons"
	result, err := c.sdk.Request(ctx, http.MethodGet, path, nil, q, nil, "")
	if err != nil {
		return nil, classify(err, result)
	}
	var list CouponList
	if err := decodeBody(result, &list); err != nil {
		return nil, err
	}
	return &list, nil
}

// ListAllUserCoupons follows the pages of ListUserCoupons until it holds
// total_count distinct coupons.
//
// WeChat's docs call offset a page number (分页页码) and show it as a
// count of coupons; the two readings page differently, and the wrong one
// silently skips coupons. So the second request asks for offset+1, which
// the readings answer differently: a page overlapping the first means
// coupons are counted, a page that follows it means pages are. A page
// that brings no coupon not already held, before total_count is reached,
// fails the listing with an error naming it (CodeInconsistentPages), as
// does a listing that would take more requests than total_count allows.
func (c *Client) ListAllUserCoupons(ctx context.Context, req ListCouponsRequest) ([]Coupon, error) {
	if req.Limit == 0 {
		req.Limit = 100
	}
	return c.listAll(ctx, req, pagingUnknown)
}

type paging int

const (
	pagingUnknown paging = iota
	pagingItems
	pagingPages
)

func (p paging) String() string {
	switch p {
	case pagingItems:
		return "offset counts coupons"
	case pagingPages:
		return "offset counts pages"
	}
	return "reading of offset not known yet"
}

// listAll pages under reading p; pagingUnknown finds it out.
func (c *Client) listAll(ctx context.Context, req ListCouponsRequest, p paging) ([]Coupon, error) {
	seen := map[string]bool{}
	var all []Coupon
	add := func(data []Coupon) (fresh int) {
		for _, cp := range data {
			if !seen[cp.CouponID] {
				seen[cp.CouponID] = true
				all = append(all, cp)
				fresh++
			}
		}
		return fresh
	}
	first, err := c.ListUserCoupons(ctx, req)
	if err != nil {
		return nil, err
	}
	add(first.Data)
	total := first.TotalCount
	// With available_mchid WeChat ignores paging and returns everything.
	if req.AvailableMchID != "" || len(seen) >= total || len(first.Data) == 0 {
		return all, nil
	}
	// A short first page is no error: WeChat may cap limit below ours.
	next := req.Offset + 1
	for requests := 1; len(seen) < total; requests++ {
		if requests > total+2 { // each request must bring a new coupon
			return all, inconsistent(req, p, len(seen), total, fmt.Sprintf("still short after %d requests", requests))
		}
		req.Offset = next
		page, err := c.ListUserCoupons(ctx, req)
		if err != nil {
			return all, err
		}
		total = page.TotalCount
		if p == pagingUnknown {
			p = pagingPages
			for _, cp := range page.Data {
				if seen[cp.CouponID] {
					p = pagingItems
					break
				}
			}
			if req.Limit == 1 {
				p = pagingItems // offset+1 is the next coupon under both readings
			}
		}
		if add(page.Data) == 0 && len(seen) < total {
			return all, inconsistent(req, p, len(seen), total, fmt.Sprintf("the page at offset %d brought no coupon not already held", req.Offset))
		}
		if p == pagingItems {
			next = req.Offset + len(page.Data)
		} else {
			next = req.Offset + 1
		}
	}
	return all, nil
}

func inconsistent(req ListCouponsRequest, p paging, have, total int, what string) error {
	return &Error{Class: Ambiguous, Code: CodeInconsistentPages, Message: fmt.Sprintf(
		"listing the coupons of %s (limit %d, %s): %s; %d of total_count %d held. The listing changed while it was paged, or WeChat pages in a way this client does not know: try again, and report it if it stays",
		req.OpenID, req.Limit, p, what, have, total)}
}

func decodeBody(result *core.APIResult, v any) error {
	if result.Response.StatusCode == http.StatusAccepted {
		_ = result.Response.Body.Close()
		return accepted(result)
	}
	rid := requestID(result)
	body, err := io.ReadAll(result.Response.Body)
	_ = result.Response.Body.Close()
	if err == nil {
		err = json.Unmarshal(body, v)
	}
	if err != nil {
		return &Error{Class: Ambiguous, StatusCode: result.Response.StatusCode, Code: CodeBadResponse,
			Message: fmt.Sprintf("cannot decode the response: %v", err), RequestID: rid, Err: err}
	}
	return nil
}

func requestID(result *core.APIResult) string {
	if result == nil || result.Response == nil {
		return ""
	}
	return result.Response.Header.Get("Request-Id")
}
