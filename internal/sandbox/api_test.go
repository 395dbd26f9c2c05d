package sandbox_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/wechatpay-apiv3/wechatpay-go/core"
	"github.com/wechatpay-apiv3/wechatpay-go/core/auth/signers"
	"github.com/wechatpay-apiv3/wechatpay-go/core/option"
	"github.com/wechatpay-apiv3/wechatpay-go/services/cashcoupons"
	"github.com/wechatpay-apiv3/wechatpay-go/utils"

	"github.com/couponflow/dispatcher/internal/sandbox"
)

// TestSDKSendAndList configures the SDK from sandbox.env alone, as the other
// programs do, then sends and lists a coupon.
func TestSDKSendAndList(t *testing.T) {
	env := readEnvFile(t, shared.DataDir())
	key, err := utils.LoadPrivateKeyWithPath(env["WECHATPAY_PRIVATE_KEY"])
	if err != nil {
		t.Fatal(err)
	}
	pub, err := utils.LoadPublicKeyWithPath(env["WECHATPAY_PUBLIC_KEY"])
	if err != nil {
		t.Fatal(err)
	}
	if env["WECHATPAY_BASE_URL"] != shared.URL() {
		t.Fatalf("WECHATPAY_BASE_URL %q, want %q", env["WECHATPAY_BASE_URL"], shared.URL())
	}
	client, err := core.NewClient(context.Background(),
		option.WithWechatPayPublicKeyAuthCipher(env["WECHATPAY_MCHID"], env["WECHATPAY_MCH_SERIAL"], key, env["WECHATPAY_PUBLIC_KEY_ID"], pub),
		option.WithHTTPClient(&http.Client{Transport: roundTripFunc(func(r *http.Request) (*http.Response, error) {
			u := mustURL(t, env["WECHATPAY_BASE_URL"])
			r = r.Clone(r.Context())
			r.URL.Scheme, r.URL.Host, r.Host = u.Scheme, u.Host, u.Host
			return http.DefaultTransport.RoundTrip(r)
		})}))
	if err != nil {
		t.Fatal(err)
	}
	svc := cashcoupons.CouponApiService{Client: client}
	openid := uniq("o")
	outNo := uniq("sdk")
	resp, result, err := svc.SendCoupon(context.Background(), cashcoupons.SendCouponRequest{
		Openid: core.String(openid), StockId: core.String(env["SANDBOX_STOCK_ID"]), OutRequestNo: core.String(outNo),
		Appid: core.String(env["WECHATPAY_APPID"]), StockCreatorMchid: core.String(env["WECHATPAY_MCHID"]),
	})
	if err != nil {
		t.Fatalf("SendCoupon: %v", err) // a bad response signature fails here too
	}
	if result.Response.Header.Get("Wechatpay-Serial") != env["WECHATPAY_PUBLIC_KEY_ID"] {
		t.Errorf("Wechatpay-Serial %q", result.Response.Header.Get("Wechatpay-Serial"))
	}
	couponID := *resp.CouponId
	if len(couponID) == 0 || len(couponID) > 20 || strings.Trim(couponID, "0123456789") != "" {
		t.Errorf("coupon_id %q is not a numeric string of at most 20 characters", couponID)
	}

	coll, _, err := svc.ListCouponsByFilter(context.Background(), cashcoupons.ListCouponsByFilterRequest{
		Openid: core.String(openid), Appid: core.String(env["WECHATPAY_APPID"]), CreatorMchid: core.String(env["WECHATPAY_MCHID"]),
	})
	if err != nil {
		t.Fatalf("ListCouponsByFilter: %v", err)
	}
	if *coll.TotalCount != 1 || len(coll.Data) != 1 || *coll.Data[0].StockId != env["SANDBOX_STOCK_ID"] || *coll.Limit != 20 || *coll.Offset != 0 {
		t.Fatalf("list = %+v", coll)
	}

	l, err := list(client, shared, openid, url.Values{"creator_mchid": {env["WECHATPAY_MCHID"]}})
	if err != nil {
		t.Fatal(err)
	}
	d := l.Data[0]
	created, err := time.Parse(time.RFC3339, d.CreateTime)
	if err != nil || !strings.HasSuffix(d.CreateTime, "+08:00") || time.Since(created) > time.Minute {
		t.Errorf("create_time %q: %v", d.CreateTime, err)
	}
	switch {
	case d.StockCreatorMchID != env["WECHATPAY_MCHID"], d.StockID != env["SANDBOX_STOCK_ID"], d.CouponName == "",
		d.Status != "SENDED", d.Description == "", d.CouponType != "NORMAL",
		d.NoCash == nil || *d.NoCash, d.Singleitem == nil || *d.Singleitem,
		!strings.HasSuffix(d.AvailableBeginTime, "+08:00"), !strings.HasSuffix(d.AvailableEndTime, "+08:00"),
		d.NormalCouponInformation == nil || d.NormalCouponInformation.CouponAmount != 100 || d.NormalCouponInformation.TransactionMinimum != 100,
		d.ConsumeInformation != nil, d.AvailableBalance != nil, d.BusinessType != "":
		t.Errorf("listed coupon has wrong fields: %+v", d)
	}

	found := false
	for _, c := range shared.Ledger().Coupons {
		if c.CouponID == couponID {
			found = c.OutRequestNo == outNo && c.OpenID == openid && c.Kind == sandbox.KindFavor
		}
	}
	if !found {
		t.Errorf("coupon %s not in the ledger as sent", couponID)
	}
}

func TestMultiuseSend(t *testing.T) {
	c := sdk(t, shared)
	id := shared.Identity()
	stock := newStock(t, shared, sandbox.StockSpec{Kind: sandbox.KindMultiuse, CouponValue: 50000})
	openid := uniq("o")
	const name, idNo = "张三", "11010519491231002X"

	var mu sync.Mutex
	var seen []sandbox.RecordedRequest
	shared.OnRequest(func(r sandbox.RecordedRequest) {
		if strings.Contains(r.Path, openid) {
			mu.Lock()
			seen = append(seen, r)
			mu.Unlock()
		}
	})
	defer shared.OnRequest(nil)

	body := multiuseBody{StockID: stock.ID, OutRequestNo: uniq("mu"), UserName: name, IDCardNumber: idNo, Amount: 10000, AppID: id.AppID, CardType: "ID_CARD"}
	couponID, err := sendMultiuse(c, openid, body, false, "")
	if err != nil {
		t.Fatalf("multiuse send: %v", err)
	}
	// A retry encrypts afresh: other ciphertext, same plaintext, same coupon.
	again, err := sendMultiuse(c, openid, body, false, "")
	if err != nil || again != couponID {
		t.Fatalf("retry = %q, %v; want %s", again, err, couponID)
	}
	other := body
	other.UserName = "李四"
	_, err = sendMultiuse(c, openid, other, false, "")
	wantAPIError(t, err, 400, "INVALID_REQUEST", "out_request_no")

	mu.Lock()
	if len(seen) != 3 {
		t.Fatalf("hook saw %d requests, want 3", len(seen))
	}
	for _, r := range seen {
		if r.Method != http.MethodPost || !strings.HasPrefix(r.Path, "/v3/multiuse/users/") || r.Header.Get("Authorization") == "" {
			t.Errorf("recorded %s %s", r.Method, r.Path)
		}
		for _, plain := range []string{name, idNo, "李四", "1101051949"} {
			if bytes.Contains(r.Body, []byte(plain)) {
				t.Errorf("request body carries plaintext %q: %s", plain, r.Body)
			}
		}
	}
	mu.Unlock()

	l, err := list(c, shared, openid, url.Values{"creator_mchid": {id.MchID}, "business_type": {"MULTIUSE"}})
	if err != nil {
		t.Fatal(err)
	}
	if len(l.Data) != 1 || l.Data[0].CouponID != couponID || l.Data[0].BusinessType != "MULTIUSE" ||
		l.Data[0].AvailableBalance == nil || *l.Data[0].AvailableBalance != 10000 {
		t.Fatalf("multiuse list = %+v", l)
	}
	if l, err := list(c, shared, openid, url.Values{"creator_mchid": {id.MchID}}); err != nil || l.TotalCount != 0 {
		t.Errorf("cash-coupon list shows consumer funds: %+v, %v", l, err)
	}

	fresh := func() multiuseBody { b := body; b.OutRequestNo = uniq("mu"); return b }
	t.Run("undecryptable user_name", func(t *testing.T) {
		b := fresh()
		b.UserName = "bm90IGNpcGhlcnRleHQ="
		b.IDCardNumber, _ = utils.EncryptOAEPWithPublicKey(idNo, id.PublicKey)
		_, err := sendMultiuse(c, openid, b, true, id.PublicKeyID)
		wantAPIError(t, err, 400, "PARAM_ERROR", "user_name")
	})
	t.Run("id_card_number under another key", func(t *testing.T) {
		b := fresh()
		b.UserName, _ = utils.EncryptOAEPWithPublicKey(name, id.PublicKey)
		b.IDCardNumber, _ = utils.EncryptOAEPWithPublicKey(idNo, &anotherKey(t).PublicKey)
		_, err := sendMultiuse(c, openid, b, true, id.PublicKeyID)
		wantAPIError(t, err, 400, "PARAM_ERROR", "id_card_number")
	})
	t.Run("malformed id number", func(t *testing.T) {
		b := fresh()
		b.IDCardNumber = "12345"
		_, err := sendMultiuse(c, openid, b, false, "")
		wantAPIError(t, err, 400, "PARAM_ERROR", "id_card_number")
	})
	t.Run("wrong Wechatpay-Serial", func(t *testing.T) {
		// The SDK always sends its verifier's key id; give it another one.
		wrong, err := core.NewClient(context.Background(),
			option.WithMerchantCredential(id.MchID, id.MchSerial, id.MerchantKey),
			option.WithVerifier(verifierFor(shared, "PUB_KEY_ID_0100000000000000000000000000000000")),
			option.WithHTTPClient(&http.Client{Transport: roundTripFunc(func(r *http.Request) (*http.Response, error) {
				u := mustURL(t, shared.URL())
				r = r.Clone(r.Context())
				r.URL.Scheme, r.URL.Host = u.Scheme, u.Host
				return http.DefaultTransport.RoundTrip(r)
			})}))
		if err != nil {
			t.Fatal(err)
		}
		b := fresh()
		b.UserName, _ = utils.EncryptOAEPWithPublicKey(name, id.PublicKey)
		b.IDCardNumber, _ = utils.EncryptOAEPWithPublicKey(idNo, id.PublicKey)
		_, err = sendMultiuse(wrong, openid, b, true, "")
		wantAPIError(t, err, 400, "PARAM_ERROR", "Wechatpay-Serial")
	})
	t.Run("amount over the stock maximum", func(t *testing.T) {
		b := fresh()
		b.Amount = 50001
		_, err := sendMultiuse(c, openid, b, false, "")
		wantAPIError(t, err, 400, "PARAM_ERROR", "amount")
	})
	t.Run("cash-coupon stock", func(t *testing.T) {
		b := fresh()
		b.StockID = id.StockID
		_, err := sendMultiuse(c, openid, b, false, "")
		wantAPIError(t, err, 400, "INVALID_REQUEST")
	})
	t.Run("per-user limit", func(t *testing.T) {
		k := newStock(t, shared, sandbox.StockSpec{Kind: sandbox.KindMultiuse, MaxPerUser: 1})
		b := fresh()
		b.StockID = k.ID
		if _, err := sendMultiuse(c, openid, b, false, ""); err != nil {
			t.Fatal(err)
		}
		b.OutRequestNo = uniq("mu")
		_, err := sendMultiuse(c, openid, b, false, "")
		wantAPIError(t, err, 403, "REQUEST_BLOCKED")
	})
}

func TestSignatureRejections(t *testing.T) {
	id := shared.Identity()
	stock := newStock(t, shared, sandbox.StockSpec{})
	args := func() sendArgs { return sendArgs{openid: uniq("o"), stock: stock.ID} }

	t.Run("bad signature", func(t *testing.T) {
		_, err := send(sdk(t, shared, clientOpts{signer: signerWith(shared, nil, true)}), shared, args())
		wantAPIError(t, err, 401, "SIGN_ERROR", "signature")
	})
	t.Run("another key", func(t *testing.T) {
		_, err := send(sdk(t, shared, clientOpts{signer: signerWith(shared, anotherKey(t), false)}), shared, args())
		wantAPIError(t, err, 401, "SIGN_ERROR", "signature")
	})
	t.Run("stale timestamp", func(t *testing.T) {
		resp, _ := do(t, shared, rawRequest{method: "GET", uri: "/v3/marketing/favor/users/o/coupons?appid=" + id.AppID + "&creator_mchid=" + id.MchID,
			ts: time.Now().Add(-6 * time.Minute).Unix()})
		wantAPIError(t, apiErrorOf(t, resp), 401, "SIGN_ERROR", "timestamp")
	})
	t.Run("future timestamp", func(t *testing.T) {
		resp, _ := do(t, shared, rawRequest{method: "GET", uri: "/v3/marketing/favor/users/o/coupons?appid=" + id.AppID + "&creator_mchid=" + id.MchID,
			ts: time.Now().Add(6 * time.Minute).Unix()})
		wantAPIError(t, apiErrorOf(t, resp), 401, "SIGN_ERROR", "timestamp")
	})
	t.Run("tampered body", func(t *testing.T) {
		c := sdk(t, shared, clientOpts{wrap: func(next http.RoundTripper) http.RoundTripper {
			return roundTripFunc(func(r *http.Request) (*http.Response, error) {
				b, _ := io.ReadAll(r.Body)
				b = bytes.Replace(b, []byte(`"stock_id":"`), []byte(`"stock_id":"9`), 1)
				r = r.Clone(r.Context())
				r.Body, r.ContentLength = io.NopCloser(bytes.NewReader(b)), int64(len(b))
				return next.RoundTrip(r)
			})
		}})
		_, err := send(c, shared, args())
		wantAPIError(t, err, 401, "SIGN_ERROR", "signature")
	})
	t.Run("replayed nonce", func(t *testing.T) {
		var first int
		c := sdk(t, shared, clientOpts{wrap: func(next http.RoundTripper) http.RoundTripper {
			return roundTripFunc(func(r *http.Request) (*http.Response, error) {
				resp, err := next.RoundTrip(r)
				if err != nil {
					return nil, err
				}
				first = resp.StatusCode
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				replay := r.Clone(r.Context())
				replay.Body, _ = r.GetBody()
				return next.RoundTrip(replay)
			})
		}})
		_, err := send(c, shared, args())
		if first != 200 {
			t.Fatalf("first send answered %d", first)
		}
		wantAPIError(t, err, 401, "SIGN_ERROR", "nonce")
	})
	t.Run("missing header", func(t *testing.T) {
		empty := ""
		resp, _ := do(t, shared, rawRequest{method: "GET", uri: "/v3/marketing/favor/users/o/coupons", auth: &empty})
		wantAPIError(t, apiErrorOf(t, resp), 401, "SIGN_ERROR", "Authorization")
	})
	t.Run("malformed header", func(t *testing.T) {
		bad := `WECHATPAY2-SHA256-RSA2048 mchid="` + id.MchID + `",nonce_str="abc"`
		resp, _ := do(t, shared, rawRequest{method: "GET", uri: "/v3/marketing/favor/users/o/coupons", auth: &bad})
		wantAPIError(t, apiErrorOf(t, resp), 401, "SIGN_ERROR", "timestamp")
	})
	t.Run("wrong serial_no", func(t *testing.T) {
		sig, _ := utils.SignSHA256WithRSA("x", id.MerchantKey)
		h := fmt.Sprintf(`WECHATPAY2-SHA256-RSA2048 mchid="%s",nonce_str="n",timestamp="%d",serial_no="ABC",signature="%s"`, id.MchID, time.Now().Unix(), sig)
		resp, _ := do(t, shared, rawRequest{method: "GET", uri: "/v3/marketing/favor/users/o/coupons", auth: &h})
		wantAPIError(t, apiErrorOf(t, resp), 401, "SIGN_ERROR", "serial_no")
	})
	t.Run("unknown mchid", func(t *testing.T) {
		signer := &signers.SHA256WithRSASigner{MchID: "1234567890", CertificateSerialNo: id.MchSerial, PrivateKey: id.MerchantKey}
		_, err := send(sdk(t, shared, clientOpts{signer: signer}), shared, args())
		wantAPIError(t, err, 400, "MCH_NOT_EXISTS")
	})
	l := shared.Ledger()
	if l.Requests["401 SIGN_ERROR"] < 7 {
		t.Errorf("ledger counts %d SIGN_ERROR answers: %v", l.Requests["401 SIGN_ERROR"], l.Requests)
	}
}

func TestIdempotency(t *testing.T) {
	c := sdk(t, shared)
	stock := newStock(t, shared, sandbox.StockSpec{Budget: 1})
	a := sendArgs{openid: uniq("o"), stock: stock.ID, outNo: uniq("idem")}
	first := mustSend(t, c, shared, a)
	// The budget is now spent and the stock paused: a retry still gets its coupon.
	if err := shared.SetStockState(stock.ID, sandbox.StatePaused); err != nil {
		t.Fatal(err)
	}
	if again := mustSend(t, c, shared, a); again != first {
		t.Fatalf("retry got coupon %s, want %s", again, first)
	}
	// WeChat's idempotent re-entry answers before it looks at the budget
	// or the stock's state: the worker relies on it to resend a send that
	// may have been issued through an open budget breaker.
	if err := shared.SetStockState(stock.ID, sandbox.StateStopped); err != nil {
		t.Fatal(err)
	}
	if again := mustSend(t, c, shared, a); again != first {
		t.Fatalf("retry on a stopped stock got coupon %s, want %s", again, first)
	}
	n := 0
	for _, lc := range shared.Ledger().Coupons {
		if lc.OutRequestNo == a.outNo {
			n++
		}
	}
	if n != 1 {
		t.Fatalf("ledger holds %d coupons for out_request_no %s, want 1", n, a.outNo)
	}
	if k, _ := shared.Stock(stock.ID); k.Issued != 1 || k.Remaining != 0 {
		t.Errorf("stock = %+v", k)
	}
	for name, mod := range map[string]func(*sendArgs){
		"openid":        func(a *sendArgs) { a.openid = uniq("o") },
		"stock":         func(a *sendArgs) { a.stock = shared.Identity().StockID },
		"coupon_value":  func(a *sendArgs) { a.value, a.minimum = core.Int64(100), core.Int64(200) },
		"creator_mchid": func(a *sendArgs) { a.creator = "1900000999" },
	} {
		t.Run(name, func(t *testing.T) {
			b := a
			mod(&b)
			_, err := send(c, shared, b)
			wantAPIError(t, err, 400, "INVALID_REQUEST", "out_request_no")
		})
	}
}

func TestBusinessErrors(t *testing.T) {
	c := sdk(t, shared)
	id := shared.Identity()

	t.Run("unknown stock", func(t *testing.T) {
		_, err := send(c, shared, sendArgs{openid: uniq("o"), stock: "99999999999"})
		wantAPIError(t, err, 404, "RESOURCE_NOT_EXISTS", "99999999999")
	})
	t.Run("budget exhausted, then topped up", func(t *testing.T) {
		k := newStock(t, shared, sandbox.StockSpec{Budget: 1})
		mustSend(t, c, shared, sendArgs{openid: uniq("o"), stock: k.ID})
		second := sendArgs{openid: uniq("o"), stock: k.ID}
		_, err := send(c, shared, second)
		wantAPIError(t, err, 403, "NOT_ENOUGH")
		if err := shared.TopUp(k.ID, 1); err != nil {
			t.Fatal(err)
		}
		mustSend(t, c, shared, second) // the failed send was not remembered
	})
	t.Run("per-user limit", func(t *testing.T) {
		k := newStock(t, shared, sandbox.StockSpec{MaxPerUser: 2})
		openid := uniq("o")
		mustSend(t, c, shared, sendArgs{openid: openid, stock: k.ID})
		mustSend(t, c, shared, sendArgs{openid: openid, stock: k.ID})
		_, err := send(c, shared, sendArgs{openid: openid, stock: k.ID})
		wantAPIError(t, err, 403, "REQUEST_BLOCKED", "用户被限领拦截")
		mustSend(t, c, shared, sendArgs{openid: uniq("o"), stock: k.ID})
	})
	t.Run("paused and stopped stock", func(t *testing.T) {
		k := newStock(t, shared, sandbox.StockSpec{State: sandbox.StatePaused})
		_, err := send(c, shared, sendArgs{openid: uniq("o"), stock: k.ID})
		wantAPIError(t, err, 400, "INVALID_REQUEST", "活动已结束或未激活")
		if err := shared.SetStockState(k.ID, sandbox.StateActive); err != nil {
			t.Fatal(err)
		}
		mustSend(t, c, shared, sendArgs{openid: uniq("o"), stock: k.ID})
		if err := shared.SetStockState(k.ID, sandbox.StateStopped); err != nil {
			t.Fatal(err)
		}
		_, err = send(c, shared, sendArgs{openid: uniq("o"), stock: k.ID})
		wantAPIError(t, err, 400, "INVALID_REQUEST")
	})
	t.Run("multiuse stock on the cash-coupon API", func(t *testing.T) {
		_, err := send(c, shared, sendArgs{openid: uniq("o"), stock: id.MultiuseStockID})
		wantAPIError(t, err, 400, "INVALID_REQUEST")
	})
	t.Run("another creator's stock", func(t *testing.T) {
		_, err := send(c, shared, sendArgs{openid: uniq("o"), stock: id.StockID, creator: "1900000999"})
		wantAPIError(t, err, 403, "REQUEST_BLOCKED", "商户无权发券")
		k := newStock(t, shared, sandbox.StockSpec{CreatorMchID: "1900000999", AuthorizedMchIDs: []string{id.MchID}})
		mustSend(t, c, shared, sendArgs{openid: uniq("o"), stock: k.ID, creator: "1900000999"})
	})
	t.Run("appid", func(t *testing.T) {
		_, err := send(c, shared, sendArgs{openid: uniq("o"), stock: id.StockID, appid: "wx0000000000000000"})
		wantAPIError(t, err, 400, "APPID_MCHID_NOT_MATCH")
	})
	t.Run("coupon value", func(t *testing.T) {
		k := newStock(t, shared, sandbox.StockSpec{FixedValue: true})
		cid := mustSend(t, c, shared, sendArgs{openid: uniq("o"), stock: k.ID, value: core.Int64(500), minimum: core.Int64(1000)})
		for _, lc := range shared.Ledger().Coupons {
			if lc.CouponID == cid && lc.StockID != k.ID {
				t.Errorf("ledger coupon %+v", lc)
			}
		}
	})

	long := strings.Repeat("a", 129)
	for _, tc := range []struct {
		name  string
		args  sendArgs
		field string
	}{
		{"bad out_request_no character", sendArgs{outNo: "abc#1"}, "out_request_no"},
		{"space in out_request_no", sendArgs{outNo: "abc 1"}, "out_request_no"},
		{"overlong out_request_no", sendArgs{outNo: long}, "out_request_no"},
		{"overlong openid", sendArgs{openid: long}, "openid"},
		{"empty openid", sendArgs{openid: "-"}, "openid"},
		{"overlong stock_id", sendArgs{stock: "123456789012345678901"}, "stock_id"},
		{"empty stock_id", sendArgs{stock: "-"}, "stock_id"},
		{"overlong appid", sendArgs{appid: long}, "appid"},
		{"overlong stock_creator_mchid", sendArgs{creator: "123456789012345678901"}, "stock_creator_mchid"},
		{"coupon_value alone", sendArgs{value: core.Int64(100)}, "coupon_minimum"},
		{"zero coupon_value", sendArgs{value: core.Int64(0), minimum: core.Int64(100)}, "coupon_value"},
		{"minimum below value", sendArgs{value: core.Int64(200), minimum: core.Int64(100)}, "coupon_minimum"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := tc.args
			switch a.openid {
			case "":
				a.openid = uniq("o")
			case "-":
				a.openid = ""
			}
			switch a.stock {
			case "":
				a.stock = id.StockID
			case "-":
				a.stock = ""
			}
			_, err := send(c, shared, a)
			wantAPIError(t, err, 400, "PARAM_ERROR", tc.field)
		})
	}
	t.Run("invalid JSON", func(t *testing.T) {
		resp, _ := do(t, shared, rawRequest{method: "POST", uri: "/v3/marketing/favor/users/o/coupons", body: []byte(`{"stock_id":`)})
		wantAPIError(t, apiErrorOf(t, resp), 400, "PARAM_ERROR", "JSON")
	})
	t.Run("unknown API", func(t *testing.T) {
		_, err := c.Get(context.Background(), apiHost+"/v3/marketing/favor/stocks")
		wantAPIError(t, err, 404, "NOT_FOUND")
	})
}

// TestConcurrentSends races sends for a small budget: exactly the budget is
// issued, never more.
func TestConcurrentSends(t *testing.T) {
	c := sdk(t, shared)
	k := newStock(t, shared, sandbox.StockSpec{Budget: 10})
	var wg sync.WaitGroup
	var mu sync.Mutex
	codes := map[string]int{}
	for i := range 24 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := send(c, shared, sendArgs{openid: fmt.Sprintf("%s-%d", uniq("o"), i), stock: k.ID})
			code := "OK"
			if e, ok := err.(*core.APIError); ok {
				code = e.Code
			} else if err != nil {
				code = err.Error()
			}
			mu.Lock()
			codes[code]++
			mu.Unlock()
		}()
	}
	wg.Wait()
	if codes["OK"] != 10 || codes["NOT_ENOUGH"] != 14 {
		t.Fatalf("answers %v, want 10 OK and 14 NOT_ENOUGH", codes)
	}
	if got, _ := shared.Stock(k.ID); got.Issued != 10 || got.Remaining != 0 {
		t.Fatalf("stock = %+v", got)
	}
}

func TestListing(t *testing.T) {
	c := sdk(t, shared)
	id := shared.Identity()
	openid := uniq("o")
	a := newStock(t, shared, sandbox.StockSpec{CouponValue: 300, CouponMinimum: 1000})
	b := newStock(t, shared, sandbox.StockSpec{CreatorMchID: "1900000999", AuthorizedMchIDs: []string{id.MchID}})
	var inA []string
	for range 3 {
		inA = append(inA, mustSend(t, c, shared, sendArgs{openid: openid, stock: a.ID}))
	}
	inB := mustSend(t, c, shared, sendArgs{openid: openid, stock: b.ID, creator: "1900000999"})
	mustSend(t, c, shared, sendArgs{openid: uniq("o"), stock: a.ID}) // someone else's
	if err := shared.MarkUsed(inA[1], "1900000777", "4200000001"); err != nil {
		t.Fatal(err)
	}
	mu, err := sendMultiuse(c, openid, multiuseBody{StockID: id.MultiuseStockID, OutRequestNo: uniq("mu"), UserName: "王五", IDCardNumber: "110105194912310021", Amount: 500, AppID: id.AppID}, false, "")
	if err != nil {
		t.Fatal(err)
	}

	get := func(t *testing.T, q url.Values) listed {
		t.Helper()
		l, err := list(c, shared, openid, q)
		if err != nil {
			t.Fatalf("list %v: %v", q, err)
		}
		return l
	}
	same := func(t *testing.T, got []string, want ...string) {
		t.Helper()
		if strings.Join(got, ",") != strings.Join(want, ",") {
			t.Fatalf("listed %v, want %v", got, want)
		}
	}

	t.Run("by creator", func(t *testing.T) {
		l := get(t, url.Values{"creator_mchid": {id.MchID}})
		same(t, l.ids(), inA...)
		if l.TotalCount != 3 || l.Limit != 20 || l.Offset != 0 {
			t.Errorf("total_count %d limit %d offset %d", l.TotalCount, l.Limit, l.Offset)
		}
		if n := l.Data[0].NormalCouponInformation; n.CouponAmount != 300 || n.TransactionMinimum != 1000 {
			t.Errorf("normal_coupon_information %+v", n)
		}
		same(t, get(t, url.Values{"creator_mchid": {"1900000999"}}).ids(), inB)
	})
	t.Run("by stock and status", func(t *testing.T) {
		same(t, get(t, url.Values{"creator_mchid": {"1900000999"}, "stock_id": {b.ID}}).ids(), inB)
		same(t, get(t, url.Values{"creator_mchid": {"1900000999"}, "stock_id": {a.ID}}).ids())
		same(t, get(t, url.Values{"creator_mchid": {id.MchID}, "status": {"SENDED"}}).ids(), inA[0], inA[2])
		// With creator_mchid, USED returns usable and used (USED:返回可用+已实扣).
		l := get(t, url.Values{"creator_mchid": {id.MchID}, "status": {"USED"}})
		same(t, l.ids(), inA...)
		used := l.Data[1]
		ci := used.ConsumeInformation
		if used.Status != "USED" || ci == nil || ci.ConsumeMchID != "1900000777" || ci.TransactionID != "4200000001" ||
			!strings.HasSuffix(ci.ConsumeTime, "+08:00") || ci.GoodsDetail == nil {
			t.Errorf("used coupon %+v, consume_information %+v", used, ci)
		}
		if l.Data[0].Status != "SENDED" || l.Data[0].ConsumeInformation != nil {
			t.Errorf("usable coupon %+v", l.Data[0])
		}
	})
	t.Run("paging", func(t *testing.T) {
		// offset counts coupons to skip.
		p0 := get(t, url.Values{"creator_mchid": {id.MchID}, "limit": {"2"}})
		p1 := get(t, url.Values{"creator_mchid": {id.MchID}, "limit": {"2"}, "offset": {"2"}})
		p2 := get(t, url.Values{"creator_mchid": {id.MchID}, "limit": {"2"}, "offset": {"1"}})
		p3 := get(t, url.Values{"creator_mchid": {id.MchID}, "offset": {"3"}})
		same(t, p0.ids(), inA[:2]...)
		same(t, p1.ids(), inA[2:]...)
		same(t, p2.ids(), inA[1:3]...)
		same(t, p3.ids())
		if p1.TotalCount != 3 || p1.Offset != 2 || p1.Limit != 2 {
			t.Errorf("total_count %d offset %d limit %d", p1.TotalCount, p1.Offset, p1.Limit)
		}
	})
	t.Run("available_mchid", func(t *testing.T) {
		// Only usable (SENDED) coupons, and offset/limit do not apply.
		l := get(t, url.Values{"available_mchid": {id.MchID}, "limit": {"1"}, "offset": {"5"}, "status": {"USED"}})
		same(t, l.ids(), inA[0], inA[2])
		same(t, get(t, url.Values{"available_mchid": {"1900000999"}, "limit": {"500"}}).ids(), inB)
	})
	t.Run("creator_mchid wins over available_mchid", func(t *testing.T) {
		// 如果同时存在，优先使用stock_creator_mchid.
		same(t, get(t, url.Values{"creator_mchid": {"1900000999"}, "available_mchid": {id.MchID}}).ids(), inB)
	})
	t.Run("business_type MULTIUSE", func(t *testing.T) {
		l := get(t, url.Values{"creator_mchid": {id.MchID}, "business_type": {"MULTIUSE"}})
		same(t, l.ids(), mu)
		d := l.Data[0]
		if d.BusinessType != "MULTIUSE" || d.AvailableBalance == nil || *d.AvailableBalance != 500 || d.StockID != id.MultiuseStockID {
			t.Errorf("consumer fund %+v", d)
		}
	})
	t.Run("SDK model", func(t *testing.T) {
		coll, _, err := (&cashcoupons.CouponApiService{Client: c}).ListCouponsByFilter(context.Background(), cashcoupons.ListCouponsByFilterRequest{
			Openid: core.String(openid), Appid: core.String(id.AppID), CreatorMchid: core.String(id.MchID),
			Offset: core.Int64(0), Limit: core.Int64(2),
		})
		if err != nil || *coll.TotalCount != 3 || len(coll.Data) != 2 || *coll.Data[0].StockId != a.ID || *coll.Data[0].CreateTime == "" {
			t.Fatalf("ListCouponsByFilter = %+v, %v", coll, err)
		}
	})
	for _, tc := range []struct {
		name    string
		q       url.Values
		code    string
		mention string
	}{
		{"limit over 100", url.Values{"creator_mchid": {id.MchID}, "limit": {"101"}}, "PARAM_ERROR", "页大小超过阈值"},
		{"limit 0", url.Values{"creator_mchid": {id.MchID}, "limit": {"0"}}, "PARAM_ERROR", "limit"},
		{"bad offset", url.Values{"creator_mchid": {id.MchID}, "offset": {"-1"}}, "PARAM_ERROR", "offset"},
		{"bad limit", url.Values{"creator_mchid": {id.MchID}, "limit": {"ten"}}, "PARAM_ERROR", "limit"},
		{"no merchant filter", url.Values{}, "PARAM_ERROR", "creator_mchid"},
		{"bad status", url.Values{"creator_mchid": {id.MchID}, "status": {"EXPIRED"}}, "PARAM_ERROR", "status"},
		{"bad business_type", url.Values{"creator_mchid": {id.MchID}, "business_type": {"X"}}, "PARAM_ERROR", "business_type"},
		{"no appid", url.Values{"creator_mchid": {id.MchID}, "appid": {""}}, "PARAM_ERROR", "appid"},
		{"wrong appid", url.Values{"creator_mchid": {id.MchID}, "appid": {"wx1"}}, "APPID_MCHID_NOT_MATCH", ""},
		// 批次发放商户号 sender_mchid (该字段暂未开放): refused, not applied.
		{"sender_mchid", url.Values{"sender_mchid": {id.MchID}}, "PARAM_ERROR", "sender_mchid"},
		{"sender_mchid with creator_mchid", url.Values{"creator_mchid": {id.MchID}, "sender_mchid": {id.MchID}}, "PARAM_ERROR", "sender_mchid"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := list(c, shared, openid, tc.q)
			wantAPIError(t, err, 400, tc.code, tc.mention)
		})
	}
}
