package wechat

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/wechatpay-apiv3/wechatpay-go/core"
)

// Class is what the caller should do about an outcome. Every call of this
// package ends in exactly one class; the worker acts on it and nothing else.
type Class int

const (
	// Success: the coupon exists, record it.
	Success Class = iota
	// RateLimited: WeChat refused the call for frequency; nothing happened,
	// retry later without counting a failure.
	RateLimited
	// BudgetExhausted: the stock has no budget left (403 NOT_ENOUGH);
	// nothing happened, retry after a long wait or a top-up.
	BudgetExhausted
	// Ambiguous: the call may or may not have issued a coupon (5xx, network
	// error, timeout, a 2xx that failed verification). The only safe retry
	// resends byte-identical parameters under the same out_request_no.
	Ambiguous
	// Permanent: the request is wrong or not allowed; retrying the same
	// request cannot succeed.
	Permanent
	// StockUnavailable: the stock cannot issue now (400 INVALID_REQUEST
	// 活动已结束或未激活: paused, not yet active, or ended; 403
	// REQUEST_BLOCKED 批次不支持跨商户发券: another merchant's stock that
	// has not authorised this one); nothing happened. An operator's
	// mistake that the operator fixes (activating, authorising), so it is
	// held like an exhausted budget, until the campaign's deadline.
	StockUnavailable
	// SignRefused: WeChat refused the request's signature (401
	// SIGN_ERROR) before looking at it. The merchant's clock, private key
	// or serial is wrong, so every call of the merchant fails alike until
	// someone fixes it: the fleet stops calling for the merchant and waits.
	SignRefused
)

func (c Class) String() string {
	switch c {
	case Success:
		return "success"
	case RateLimited:
		return "rate_limited"
	case BudgetExhausted:
		return "budget_exhausted"
	case Ambiguous:
		return "ambiguous"
	case Permanent:
		return "permanent"
	case StockUnavailable:
		return "stock_unavailable"
	case SignRefused:
		return "sign_refused"
	}
	return fmt.Sprintf("Class(%d)", int(c))
}

// Codes this package gives to outcomes WeChat did not name itself, so that
// every failure can be counted under some code.
const (
	CodeNetwork      = "NETWORK_ERROR"     // the call did not complete on the wire
	CodeTimeout      = "TIMEOUT"           // no answer in time
	CodeBadSignature = "INVALID_SIGNATURE" // a 2xx whose signature is missing or wrong
	CodeBadResponse  = "INVALID_RESPONSE"  // a verified 2xx whose body does not parse
	CodeBadRequest   = "INVALID_ARGUMENT"  // refused locally, before any call
	// CodeInconsistentPages: the pages of a listing do not add up to its
	// total_count (ListAllUserCoupons).
	CodeInconsistentPages = "INCONSISTENT_PAGES"
	// CodeAccepted: a 202 without a body. WeChat took the request and asks
	// for the same request again, whose answer says what came of it.
	CodeAccepted = "ACCEPTED"
	// CodeMonthlyLimit: 400 INVALID_REQUEST 暂时无法领取, WeChat's limit on
	// what one user may receive in a month: final for that user this
	// month, and reported apart from the request's own mistakes.
	CodeMonthlyLimit = "USER_MONTHLY_LIMIT"
)

// Error is the failure of one call, classified. StatusCode is 0 when no
// HTTP answer arrived.
type Error struct {
	Class      Class
	StatusCode int
	Code       string
	Message    string
	RequestID  string
	Err        error // the underlying error, if any
}

func (e *Error) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "wechatpay: %s", e.Class)
	if e.StatusCode != 0 {
		fmt.Fprintf(&b, " (HTTP %d)", e.StatusCode)
	}
	fmt.Fprintf(&b, " %s", e.Code)
	if e.Message != "" {
		fmt.Fprintf(&b, ": %s", e.Message)
	}
	if e.RequestID != "" {
		fmt.Fprintf(&b, " [Request-Id %s]", e.RequestID)
	}
	return b.String()
}

func (e *Error) Unwrap() error { return e.Err }

// ClassOf returns the class of an error returned by this package: Success
// for nil, Ambiguous for an error it did not produce (the safe assumption).
func ClassOf(err error) Class {
	if err == nil {
		return Success
	}
	var e *Error
	if errors.As(err, &e) {
		return e.Class
	}
	return Ambiguous
}

// classify turns what the SDK returned into an *Error, or nil on success.
// status is the HTTP status of the answer, 0 if none arrived.
func classify(err error, result *core.APIResult) error {
	if err == nil {
		return nil
	}
	var apiErr *core.APIError
	if errors.As(err, &apiErr) {
		return classifyAPIError(apiErr)
	}
	e := &Error{Class: Ambiguous, Err: err, Message: err.Error()}
	if result != nil && result.Response != nil && result.Response.StatusCode == http.StatusAccepted {
		// The SDK verified the 202 and then found no body to decode.
		return accepted(result)
	}
	if result != nil && result.Response != nil {
		// A 2xx that the SDK refused: the validator found the signature
		// missing or wrong. WeChat may well have issued the coupon.
		e.StatusCode = result.Response.StatusCode
		e.RequestID = result.Response.Header.Get("Request-Id")
		e.Code = CodeBadSignature
		return e
	}
	var netErr net.Error
	switch {
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &netErr) && netErr.Timeout():
		e.Code = CodeTimeout
	default:
		e.Code = CodeNetwork
	}
	return e
}

func classifyAPIError(a *core.APIError) *Error {
	e := &Error{
		StatusCode: a.StatusCode,
		Code:       a.Code,
		Message:    a.Message,
		RequestID:  a.Header.Get("Request-Id"),
		Err:        a,
	}
	switch {
	case a.StatusCode == 429, a.Code == "FREQUENCY_LIMIT_EXCEED", a.Code == "FREQUENCY_LIMITED":
		e.Class = RateLimited
	case a.Code == "INVALID_REQUEST" && saysTooFrequent(a.Message):
		// WeChat sometimes reports throttling as a 400 with a message only.
		e.Class = RateLimited
	case a.Code == "NOT_ENOUGH":
		e.Class = BudgetExhausted
	case a.Code == "SIGN_ERROR":
		e.Class = SignRefused
	case a.Code == "INVALID_REQUEST" && strings.Contains(a.Message, "暂时无法领取"):
		e.Class, e.Code, e.Message = Permanent, CodeMonthlyLimit, "INVALID_REQUEST "+a.Message
	case a.Code == "INVALID_REQUEST" && strings.Contains(a.Message, "活动已结束或未激活"),
		a.Code == "REQUEST_BLOCKED" && strings.Contains(a.Message, "跨商户"):
		e.Class = StockUnavailable
	case a.StatusCode >= 500:
		e.Class = Ambiguous
	default:
		e.Class = Permanent
	}
	if e.Code == "" {
		// A non-JSON error body (a proxy's HTML page, say) still gets a code
		// so it can be counted.
		e.Code = fmt.Sprintf("HTTP_%d", a.StatusCode)
		if e.Message == "" {
			e.Message = truncate(a.Body, 200)
		}
	}
	return e
}

// accepted is the outcome of a 202: WeChat took the request without
// saying what came of it. Ambiguous, so that the same request is sent
// again under the same out_request_no.
func accepted(result *core.APIResult) *Error {
	return &Error{Class: Ambiguous, StatusCode: http.StatusAccepted, Code: CodeAccepted, RequestID: requestID(result),
		Message: "WeChat accepted the request without an answer (202); the same request will be sent again"}
}

// ClearsAt is when an exhausted budget comes back by itself: the next
// 00:00 China time for a stock's daily budget (max_amount_by_day), whose
// NOT_ENOUGH says 当天 (today); zero for the stock's whole budget, which
// only a top-up restores.
func ClearsAt(code, message string, now time.Time) time.Time {
	if code != "NOT_ENOUGH" || !(strings.Contains(message, "当天") || strings.Contains(message, "今日") ||
		strings.Contains(message, "每日") || strings.Contains(message, "max_amount_by_day")) {
		return time.Time{}
	}
	y, m, d := now.In(chinaTime).Date()
	return time.Date(y, m, d+1, 0, 0, 0, 0, chinaTime)
}

var chinaTime = time.FixedZone("CST", 8*3600)

func saysTooFrequent(msg string) bool {
	m := strings.ToLower(msg)
	return strings.Contains(m, "频繁") || strings.Contains(m, "频率") || strings.Contains(m, "限频") ||
		strings.Contains(m, "frequen") || strings.Contains(m, "rate limit")
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
