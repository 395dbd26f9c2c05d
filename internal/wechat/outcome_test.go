package wechat

import (
	"context"
	"errors"
	"net/http"
	"testing"
	"time"

	"github.com/wechatpay-apiv3/wechatpay-go/core"
)

func TestClassifyAPIErrors(t *testing.T) {
	cases := []struct {
		status int
		code   string
		msg    string
		want   Class
	}{
		{429, "FREQUENCY_LIMIT_EXCEED", "接口限频", RateLimited},
		{403, "FREQUENCY_LIMITED", "", RateLimited},
		{400, "INVALID_REQUEST", "请求过于频繁，请稍后再试", RateLimited},
		{400, "INVALID_REQUEST", "calls are too frequent", RateLimited},
		{403, "NOT_ENOUGH", "批次预算不足", BudgetExhausted},
		{500, "SYSTEM_ERROR", "系统错误", Ambiguous},
		{502, "", "", Ambiguous},
		{400, "PARAM_ERROR", "批次号必填", Permanent},
		{400, "INVALID_REQUEST", "活动已结束或未激活", StockUnavailable},
		{400, "MCH_NOT_EXISTS", "", Permanent},
		{400, "APPID_MCHID_NOT_MATCH", "", Permanent},
		{403, "USER_ACCOUNT_ABNORMAL", "", Permanent},
		{403, "REQUEST_BLOCKED", "用户被限领拦截", Permanent},
		{403, "REQUEST_BLOCKED", "商户无权发券", Permanent},
		// The stock's creator has not authorised this merchant: fixed by
		// the operator, held like a paused stock.
		{403, "REQUEST_BLOCKED", "批次不支持跨商户发券", StockUnavailable},
		{400, "INVALID_REQUEST", "openid与appid不匹配", Permanent},
		{400, "INVALID_REQUEST", "实名校验不通过", Permanent},
		{400, "INVALID_REQUEST", "Http头缺少Accept或User-Agent", Permanent},
		{400, "PARAM_ERROR", "coupon_value/coupon_minimum 该字段暂未开放", Permanent},
		{404, "RESOURCE_NOT_EXISTS", "", Permanent},
		{401, "SIGN_ERROR", "签名错误", SignRefused},
		{400, "INVALID_REQUEST", "调用频率过高", RateLimited},
		{400, "INVALID_REQUEST", "暂时无法领取", Permanent},
		{409, "SOMETHING_NEW", "", Permanent},
	}
	for _, c := range cases {
		h := http.Header{}
		h.Set("Request-Id", "rid-1")
		err := classify(&core.APIError{StatusCode: c.status, Code: c.code, Message: c.msg, Header: h}, nil)
		var e *Error
		if !errors.As(err, &e) {
			t.Fatalf("%d %s: not an *Error: %v", c.status, c.code, err)
		}
		if e.Class != c.want || e.StatusCode != c.status || e.RequestID != "rid-1" {
			t.Errorf("%d %s %q: got %s status %d request id %q, want %s", c.status, c.code, c.msg, e.Class, e.StatusCode, e.RequestID, c.want)
		}
		if c.code == "" && e.Code != "HTTP_502" {
			t.Errorf("a body without a code got code %q", e.Code)
		}
		if ClassOf(err) != c.want {
			t.Errorf("ClassOf disagrees for %s", c.code)
		}
	}
}

func TestMonthlyLimitHasItsOwnCode(t *testing.T) {
	var e *Error
	errors.As(classify(&core.APIError{StatusCode: 400, Code: "INVALID_REQUEST", Message: "暂时无法领取", Header: http.Header{}}, nil), &e)
	if e.Code != CodeMonthlyLimit || e.Message != "INVALID_REQUEST 暂时无法领取" {
		t.Errorf("got %s %q", e.Code, e.Message)
	}
}

func TestClearsAt(t *testing.T) {
	cst := time.FixedZone("CST", 8*3600)
	now := time.Date(2026, 11, 30, 23, 59, 59, 0, cst)
	midnight := time.Date(2026, 12, 1, 0, 0, 0, 0, cst)
	for _, c := range []struct {
		code, msg string
		now       time.Time
		want      time.Time
	}{
		{"NOT_ENOUGH", "批次当天预算不足", now, midnight},
		{"NOT_ENOUGH", "stock has reached its max_amount_by_day", now.UTC(), midnight},
		{"NOT_ENOUGH", "今日发放已达上限", time.Date(2026, 11, 30, 0, 0, 0, 0, cst), midnight},
		// 16:00 UTC is already the next day in China.
		{"NOT_ENOUGH", "当天", time.Date(2026, 11, 30, 16, 0, 0, 0, time.UTC), midnight.AddDate(0, 0, 1)},
		{"NOT_ENOUGH", "批次预算不足", now, time.Time{}},
		{"INVALID_REQUEST", "当天", now, time.Time{}},
	} {
		if got := ClearsAt(c.code, c.msg, c.now); !got.Equal(c.want) {
			t.Errorf("%s %q at %s: %s, want %s", c.code, c.msg, c.now, got, c.want)
		}
	}
}

func TestClassifyTransportErrors(t *testing.T) {
	if got := ClassOf(classify(context.DeadlineExceeded, nil)); got != Ambiguous {
		t.Errorf("timeout: %s", got)
	}
	var e *Error
	errors.As(classify(context.DeadlineExceeded, nil), &e)
	if e.Code != CodeTimeout {
		t.Errorf("timeout code %q", e.Code)
	}
	errors.As(classify(errors.New("connection reset by peer"), &core.APIResult{}), &e)
	if e.Class != Ambiguous || e.Code != CodeNetwork {
		t.Errorf("reset: %s %s", e.Class, e.Code)
	}
	errors.As(classify(errors.New("verify fail"), &core.APIResult{Response: &http.Response{StatusCode: 200, Header: http.Header{}}}), &e)
	if e.Class != Ambiguous || e.Code != CodeBadSignature || e.StatusCode != 200 {
		t.Errorf("bad signature: %s %s %d", e.Class, e.Code, e.StatusCode)
	}
	errors.As(classify(errors.New("unexpected end of JSON input"), &core.APIResult{Response: &http.Response{StatusCode: 202, Header: http.Header{}}}), &e)
	if e.Class != Ambiguous || e.Code != CodeAccepted || e.StatusCode != 202 {
		t.Errorf("202: %s %s %d", e.Class, e.Code, e.StatusCode)
	}
	if ClassOf(nil) != Success || ClassOf(errors.New("foreign")) != Ambiguous {
		t.Error("ClassOf of nil or a foreign error")
	}
}
