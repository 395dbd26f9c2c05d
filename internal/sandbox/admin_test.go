package sandbox_test

import (
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/couponflow/dispatcher/internal/sandbox"
)

func TestAdminAPI(t *testing.T) {
	s := shared
	var health map[string]string
	if code := adminDo(t, s, "GET", "/sandbox/healthz", nil, &health); code != 200 || health["status"] != "ok" {
		t.Fatalf("healthz: %d %v", code, health)
	}

	var k sandbox.Stock
	if code := adminDo(t, s, "POST", "/sandbox/stocks", map[string]any{"budget": 2, "max_per_user": 1, "coupon_value": 200, "coupon_minimum": 500}, &k); code != 201 {
		t.Fatalf("create stock: %d %+v", code, k)
	}
	if k.ID == "" || k.Kind != sandbox.KindFavor || k.State != sandbox.StateActive || k.Remaining != 2 || k.CreatorMchID != s.Identity().MchID || k.CouponValue != 200 {
		t.Errorf("created %+v", k)
	}
	for _, step := range []struct {
		path  string
		body  any
		check func(sandbox.Stock) bool
	}{
		{"/pause", nil, func(k sandbox.Stock) bool { return k.State == sandbox.StatePaused }},
		{"/activate", nil, func(k sandbox.Stock) bool { return k.State == sandbox.StateActive }},
		{"/topup", map[string]int{"coupons": 3}, func(k sandbox.Stock) bool { return k.Budget == 5 && k.Remaining == 5 }},
		{"/stop", nil, func(k sandbox.Stock) bool { return k.State == sandbox.StateStopped }},
	} {
		var got sandbox.Stock
		if code := adminDo(t, s, "POST", "/sandbox/stocks/"+k.ID+step.path, step.body, &got); code != 200 || !step.check(got) {
			t.Errorf("%s: %d %+v", step.path, code, got)
		}
	}
	var got sandbox.Stock
	if code := adminDo(t, s, "GET", "/sandbox/stocks/"+k.ID, nil, &got); code != 200 || got.ID != k.ID || got.State != sandbox.StateStopped {
		t.Errorf("get stock: %d %+v", code, got)
	}
	var all []sandbox.Stock
	if code := adminDo(t, s, "GET", "/sandbox/stocks", nil, &all); code != 200 || len(all) < 3 || all[0].ID != s.Identity().StockID {
		t.Errorf("list stocks: %d, %d stocks", code, len(all))
	}

	// Sent through the API, then used through the admin API.
	c := sdk(t, s)
	k2 := newStock(t, s, sandbox.StockSpec{})
	couponID := mustSend(t, c, s, sendArgs{openid: uniq("o"), stock: k2.ID})
	var used map[string]any
	if code := adminDo(t, s, "POST", "/sandbox/coupons/"+couponID+"/use", map[string]string{"consume_mchid": "1900000777", "transaction_id": "42001"}, &used); code != 200 || used["status"] != "USED" {
		t.Errorf("use: %d %v", code, used)
	}

	var e map[string]string
	for _, bad := range []struct {
		method, path string
		body         any
		code         int
	}{
		{"GET", "/sandbox/stocks/424242424242", nil, 404},
		{"POST", "/sandbox/stocks/424242424242/pause", nil, 404},
		{"POST", "/sandbox/stocks/" + k.ID + "/explode", nil, 404},
		{"POST", "/sandbox/stocks/" + k.ID + "/topup", map[string]int{"coupons": 0}, 400},
		{"POST", "/sandbox/stocks", map[string]any{"budget": 0}, 400},
		{"POST", "/sandbox/stocks", map[string]any{"budget": 1, "kind": "voucher"}, 400},
		{"POST", "/sandbox/stocks", map[string]any{"budget": 1, "stock_id": k.ID}, 400},
		{"POST", "/sandbox/stocks", map[string]any{"budget": 1, "bugdet": 1}, 400},
		{"POST", "/sandbox/coupons/" + couponID + "/use", nil, 400},
		{"POST", "/sandbox/coupons/1/use", nil, 404},
		{"GET", "/sandbox/nothing", nil, 404},
	} {
		e = nil
		if code := adminDo(t, s, bad.method, bad.path, bad.body, &e); code != bad.code || e["error"] == "" {
			t.Errorf("%s %s: %d %v, want %d with an error", bad.method, bad.path, code, e, bad.code)
		}
	}

	var l sandbox.Ledger
	if code := adminDo(t, s, "GET", "/sandbox/ledger", nil, &l); code != 200 || len(l.Coupons) == 0 || l.Requests["200 OK"] == 0 {
		t.Errorf("ledger: %d %+v", code, l.Requests)
	}
	found := false
	for _, lc := range l.Coupons {
		found = found || lc.CouponID == couponID && lc.Status == sandbox.StatusUsed && strings.HasSuffix(lc.CreateTime, "+08:00")
	}
	if !found {
		t.Errorf("ledger lacks used coupon %s", couponID)
	}

	resp, err := http.Get(s.URL() + "/sandbox/env")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for k, v := range s.Env() {
		if !strings.Contains(string(body), "\n"+k+"="+v+"\n") {
			t.Errorf("GET /sandbox/env lacks %s=%s:\n%s", k, v, body)
		}
	}
}

// The admin API needs no signature, so a web page of another site must
// not be able to change the sandbox through a visitor's browser.
func TestAdminAPIRefusesCrossSiteChanges(t *testing.T) {
	s := shared
	k, err := s.CreateStock(sandbox.StockSpec{Budget: 5, CouponValue: 100, CouponMinimum: 100})
	if err != nil {
		t.Fatal(err)
	}
	for name, c := range map[string]struct {
		header      map[string]string
		body        string
		wantRefused bool
	}{
		"a cross-site page (Sec-Fetch-Site)": {map[string]string{"Sec-Fetch-Site": "cross-site"}, "", true},
		"another origin":                     {map[string]string{"Origin": "http://evil.example"}, "", true},
		"a form body":                        {map[string]string{"Content-Type": "application/x-www-form-urlencoded"}, `{"coupons":1}`, true},
		"a text/plain body":                  {map[string]string{"Content-Type": "text/plain"}, `{"coupons":1}`, true},
		"the same origin":                    {map[string]string{"Origin": strings.TrimSuffix(s.URL(), "/"), "Sec-Fetch-Site": "same-origin", "Content-Type": "application/json"}, `{"coupons":1}`, false},
		"curl":                               {map[string]string{"Content-Type": "application/json"}, `{"coupons":1}`, false},
	} {
		t.Run(name, func(t *testing.T) {
			before, _ := s.Stock(k.ID)
			req, _ := http.NewRequest("POST", s.URL()+"/sandbox/stocks/"+k.ID+"/topup", strings.NewReader(c.body))
			for h, v := range c.header {
				req.Header.Set(h, v)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			after, _ := s.Stock(k.ID)
			refused := resp.StatusCode == 403 || resp.StatusCode == 415
			if refused != c.wantRefused || (refused && after.Budget != before.Budget) {
				t.Fatalf("status %d, budget %d → %d; want refused %v", resp.StatusCode, before.Budget, after.Budget, c.wantRefused)
			}
		})
	}
}

func TestTopUpCannotOverflow(t *testing.T) {
	k, err := shared.CreateStock(sandbox.StockSpec{Budget: 5, CouponValue: 100, CouponMinimum: 100})
	if err != nil {
		t.Fatal(err)
	}
	if code := adminDo(t, shared, "POST", "/sandbox/stocks/"+k.ID+"/topup", map[string]int64{"coupons": 1<<63 - 1}, nil); code != 400 {
		t.Fatalf("a top-up past the largest budget answered %d", code)
	}
	if after, _ := shared.Stock(k.ID); after.Budget != 5 {
		t.Fatalf("budget %d after a refused top-up", after.Budget)
	}
}
