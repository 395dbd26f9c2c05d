package sandbox_test

import (
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/wechatpay-apiv3/wechatpay-go/core"

	"github.com/couponflow/dispatcher/internal/sandbox"
)

// The rules of docs/sandbox.md "Rules and where they come from", each
// through the SDK (or a raw request where the SDK cannot break the rule)
// and the admin API that sets it up.

// coupon_value/coupon_minimum are for 指定面额发券 only (favor-send-official.md
// lines 35-37: 其他场景不需要填).
func TestCouponValueOnlyOnFixedValueStocks(t *testing.T) {
	c := sdk(t, shared)
	var fixed sandbox.Stock
	if code := adminDo(t, shared, "POST", "/sandbox/stocks", map[string]any{"budget": 10, "fixed_value": true}, &fixed); code != 201 || !fixed.FixedValue {
		t.Fatalf("create a fixed-value stock: %d %+v", code, fixed)
	}
	plain := newStock(t, shared, sandbox.StockSpec{})

	_, err := send(c, shared, sendArgs{openid: uniq("o"), stock: plain.ID, value: core.Int64(777), minimum: core.Int64(1000)})
	wantAPIError(t, err, 400, "PARAM_ERROR", "coupon_value", "暂未开放", plain.ID)
	_, err = send(c, shared, sendArgs{openid: uniq("o"), stock: fixed.ID})
	wantAPIError(t, err, 400, "PARAM_ERROR", "coupon_value", "必填")
	if k, _ := shared.Stock(plain.ID); k.Issued != 0 {
		t.Fatalf("a refused send issued: %+v", k)
	}

	openid := uniq("o")
	mustSend(t, c, shared, sendArgs{openid: openid, stock: fixed.ID, value: core.Int64(777), minimum: core.Int64(1000)})
	l, err := list(c, shared, openid, url.Values{"creator_mchid": {shared.Identity().MchID}})
	if err != nil {
		t.Fatal(err)
	}
	if len(l.Data) != 1 || l.Data[0].NormalCouponInformation.CouponAmount != 777 || l.Data[0].NormalCouponInformation.TransactionMinimum != 1000 {
		t.Fatalf("listed %+v", l.Data)
	}

	var e map[string]string
	if code := adminDo(t, shared, "POST", "/sandbox/stocks", map[string]any{"budget": 1, "kind": "multiuse", "fixed_value": true}, &e); code != 400 || !strings.Contains(e["error"], "fixed_value") {
		t.Errorf("fixed_value on a consumer-fund stock: %d %v", code, e)
	}
}

// An openid belongs to one appid (favor-list-official.txt lines 83-88;
// error table line 282: 400 INVALID_REQUEST openid与appid不匹配).
func TestOpenIDMustBelongToAppID(t *testing.T) {
	c := sdk(t, shared)
	id := shared.Identity()
	stranger := uniq("o")
	var u sandbox.User
	if code := adminDo(t, shared, "POST", "/sandbox/users", map[string]any{"openid": stranger, "appid": "wx00000000000000aa"}, &u); code != 201 || u.AppID != "wx00000000000000aa" {
		t.Fatalf("register: %d %+v", code, u)
	}
	_, err := send(c, shared, sendArgs{openid: stranger, stock: id.StockID})
	wantAPIError(t, err, 400, "INVALID_REQUEST", "openid与appid不匹配", "wx00000000000000aa")
	_, err = sendMultiuse(c, stranger, multiuseBody{StockID: id.MultiuseStockID, OutRequestNo: uniq("mu"), UserName: "王五", IDCardNumber: "110105194912310021", Amount: 100, AppID: id.AppID}, false, "")
	wantAPIError(t, err, 400, "INVALID_REQUEST", "openid与appid不匹配")
	_, err = list(c, shared, stranger, url.Values{"creator_mchid": {id.MchID}})
	wantAPIError(t, err, 400, "INVALID_REQUEST", "openid与appid不匹配")

	// Registered with no appid: the sandbox's, like any openid never registered.
	ours := uniq("o")
	if code := adminDo(t, shared, "POST", "/sandbox/users", map[string]any{"openid": ours}, &u); code != 201 || u.AppID != id.AppID {
		t.Fatalf("register: %d %+v", code, u)
	}
	mustSend(t, c, shared, sendArgs{openid: ours, stock: id.StockID})
	mustSend(t, c, shared, sendArgs{openid: uniq("o"), stock: id.StockID})

	var all []sandbox.User
	if code := adminDo(t, shared, "GET", "/sandbox/users", nil, &all); code != 200 {
		t.Fatalf("list users: %d", code)
	}
	n := 0
	for _, u := range all {
		if u.OpenID == stranger || u.OpenID == ours {
			n++
		}
	}
	if n != 2 {
		t.Errorf("GET /sandbox/users lacks the registered users: %+v", all)
	}
	var e map[string]string
	if code := adminDo(t, shared, "POST", "/sandbox/users", map[string]any{"appid": id.AppID}, &e); code != 400 || !strings.Contains(e["error"], "openid") {
		t.Errorf("a user without openid: %d %v", code, e)
	}
}

// A stock of another merchant needs the sender's authorisation
// (favor-send-official.md line 93: 403 REQUEST_BLOCKED 批次不支持跨商户发券).
func TestCrossMerchantStockNeedsAuthorisation(t *testing.T) {
	c := sdk(t, shared)
	const other = "1900000888"
	favor := newStock(t, shared, sandbox.StockSpec{CreatorMchID: other})
	multi := newStock(t, shared, sandbox.StockSpec{Kind: sandbox.KindMultiuse, CreatorMchID: other})

	_, err := send(c, shared, sendArgs{openid: uniq("o"), stock: favor.ID, creator: other})
	wantAPIError(t, err, 403, "REQUEST_BLOCKED", "批次不支持跨商户发券", other)
	mu := multiuseBody{StockID: multi.ID, OutRequestNo: uniq("mu"), UserName: "王五", IDCardNumber: "110105194912310021", Amount: 100, AppID: shared.Identity().AppID}
	_, err = sendMultiuse(c, uniq("o"), mu, false, "")
	wantAPIError(t, err, 403, "REQUEST_BLOCKED", "批次不支持跨商户发券")

	for _, k := range []sandbox.Stock{favor, multi} {
		var got sandbox.Stock
		if code := adminDo(t, shared, "POST", "/sandbox/stocks/"+k.ID+"/authorize", map[string]string{"mchid": shared.Identity().MchID}, &got); code != 200 || len(got.AuthorizedMchIDs) != 1 {
			t.Fatalf("authorize: %d %+v", code, got)
		}
	}
	mustSend(t, c, shared, sendArgs{openid: uniq("o"), stock: favor.ID, creator: other})
	if _, err := sendMultiuse(c, uniq("o"), mu, false, ""); err != nil {
		t.Fatalf("after authorisation: %v", err)
	}
	// Still the creator's to name: 商户无权发券 comes first.
	_, err = send(c, shared, sendArgs{openid: uniq("o"), stock: favor.ID})
	wantAPIError(t, err, 403, "REQUEST_BLOCKED", "商户无权发券")

	var e map[string]string
	if code := adminDo(t, shared, "POST", "/sandbox/stocks/"+favor.ID+"/authorize", map[string]string{"mchid": "not digits"}, &e); code != 400 || !strings.Contains(e["error"], "mchid") {
		t.Errorf("a bad mchid: %d %v", code, e)
	}
}

// Abnormal users are refused both kinds of send (favor-send-official.md
// line 89: 403 USER_ACCOUNT_ABNORMAL 用户非法).
func TestAbnormalUserIsRefused(t *testing.T) {
	c := sdk(t, shared)
	id := shared.Identity()
	openid := uniq("o")
	first := sendArgs{openid: openid, stock: newStock(t, shared, sandbox.StockSpec{}).ID, outNo: uniq("r")}
	coupon := mustSend(t, c, shared, first)
	if code := adminDo(t, shared, "POST", "/sandbox/users", map[string]any{"openid": openid, "abnormal": true}, nil); code != 201 {
		t.Fatalf("flag: %d", code)
	}
	_, err := send(c, shared, sendArgs{openid: openid, stock: id.StockID})
	wantAPIError(t, err, 403, "USER_ACCOUNT_ABNORMAL", "用户非法")
	_, err = sendMultiuse(c, openid, multiuseBody{StockID: id.MultiuseStockID, OutRequestNo: uniq("mu"), UserName: "王五", IDCardNumber: "110105194912310021", Amount: 100, AppID: id.AppID}, false, "")
	wantAPIError(t, err, 403, "USER_ACCOUNT_ABNORMAL", "用户非法")
	// The idempotent re-entry answers before the user is looked at.
	if again := mustSend(t, c, shared, first); again != coupon {
		t.Fatalf("resend got %s, want %s", again, coupon)
	}
	if code := adminDo(t, shared, "POST", "/sandbox/users", map[string]any{"openid": openid, "abnormal": false}, nil); code != 201 {
		t.Fatalf("unflag: %d", code)
	}
	mustSend(t, c, shared, sendArgs{openid: openid, stock: id.StockID})
}

// amount is optional (no data-required) where the stock has a fixed
// amount; card_type is required and ID_CARD its only value (wechatpay.im,
// openapi/v3/multiuse/users/{openid}/coupons.md).
func TestMultiuseAmountAndCardType(t *testing.T) {
	c := sdk(t, shared)
	id := shared.Identity()
	var fixed sandbox.Stock
	if code := adminDo(t, shared, "POST", "/sandbox/stocks", map[string]any{"kind": "multiuse", "budget": 10, "coupon_value": 3000, "fixed_amount": true}, &fixed); code != 201 || !fixed.FixedAmount {
		t.Fatalf("create: %d %+v", code, fixed)
	}
	open := newStock(t, shared, sandbox.StockSpec{Kind: sandbox.KindMultiuse, CouponValue: 5000})
	body := func(stock string, amount int64) multiuseBody {
		return multiuseBody{StockID: stock, OutRequestNo: uniq("mu"), UserName: "王五", IDCardNumber: "110105194912310021", Amount: amount, AppID: id.AppID}
	}
	openid := uniq("o")
	if _, err := sendMultiuse(c, openid, body(fixed.ID, 0), false, ""); err != nil {
		t.Fatalf("no amount on a fixed-amount stock: %v", err)
	}
	if _, err := sendMultiuse(c, openid, body(fixed.ID, 3000), false, ""); err != nil {
		t.Fatalf("the fixed amount itself: %v", err)
	}
	l, err := list(c, shared, openid, url.Values{"creator_mchid": {id.MchID}, "business_type": {"MULTIUSE"}})
	if err != nil || len(l.Data) != 2 || *l.Data[0].AvailableBalance != 3000 || *l.Data[1].AvailableBalance != 3000 {
		t.Fatalf("listed %+v, %v", l.Data, err)
	}
	_, err = sendMultiuse(c, openid, body(fixed.ID, 2999), false, "")
	wantAPIError(t, err, 400, "PARAM_ERROR", "amount", "3000")
	_, err = sendMultiuse(c, openid, body(open.ID, 0), false, "")
	wantAPIError(t, err, 400, "PARAM_ERROR", "amount", "必填")

	noType := body(open.ID, 100)
	noType.CardType = "-"
	_, err = sendMultiuse(c, openid, noType, false, "")
	wantAPIError(t, err, 400, "PARAM_ERROR", "card_type")
	passport := body(open.ID, 100)
	passport.CardType = "PASSPORT"
	_, err = sendMultiuse(c, openid, passport, false, "")
	wantAPIError(t, err, 400, "PARAM_ERROR", "card_type", "ID_CARD")

	var e map[string]string
	if code := adminDo(t, shared, "POST", "/sandbox/stocks", map[string]any{"budget": 1, "fixed_amount": true}, &e); code != 400 || !strings.Contains(e["error"], "fixed_amount") {
		t.Errorf("fixed_amount on a cash-coupon stock: %d %v", code, e)
	}
}

// A name and an id number that do not belong together fail the real-name
// check; the sandbox keeps only salted hashes of what it is told.
func TestRealNameCheck(t *testing.T) {
	c := sdk(t, shared)
	id := shared.Identity()
	const name, other, idNo = "赵六", "钱七", "11010519491231005x"
	var out map[string]string
	if code := adminDo(t, shared, "POST", "/sandbox/identities", map[string]string{"user_name": name, "id_card_number": idNo}, &out); code != 201 {
		t.Fatalf("register: %d %v", code, out)
	}
	for k, v := range out {
		if strings.Contains(k+v, name) || strings.Contains(strings.ToUpper(k+v), strings.ToUpper(idNo)) {
			t.Fatalf("the admin API echoed the identity: %v", out)
		}
	}
	body := func(n, number string) multiuseBody {
		return multiuseBody{StockID: id.MultiuseStockID, OutRequestNo: uniq("mu"), UserName: n, IDCardNumber: number, Amount: 100, AppID: id.AppID}
	}
	openid := uniq("o")
	if _, err := sendMultiuse(c, openid, body(name, strings.ToUpper(idNo)), false, ""); err != nil {
		t.Fatalf("the registered pair: %v", err)
	}
	_, err := sendMultiuse(c, openid, body(other, idNo), false, "")
	e := wantAPIError(t, err, 400, "INVALID_REQUEST", "实名")
	if strings.Contains(e.Message, other) || strings.Contains(e.Message, idNo) {
		t.Errorf("the answer echoes the identity: %s", e.Message)
	}
	// An id number never registered is not checked.
	if _, err := sendMultiuse(c, openid, body(other, "110105194912310064"), false, ""); err != nil {
		t.Fatalf("an unregistered id number: %v", err)
	}

	var bad map[string]string
	if code := adminDo(t, shared, "POST", "/sandbox/identities", map[string]string{"user_name": name, "id_card_number": "123"}, &bad); code != 400 || strings.Contains(bad["error"], "123") {
		t.Errorf("a malformed id number: %d %v", code, bad)
	}
}

// Users, identities and authorisations survive a restart; state.json
// holds no name or id number.
func TestRulesSurviveRestart(t *testing.T) {
	dir := t.TempDir()
	s1, err := sandbox.New(sandbox.Config{DataDir: dir, KeyBits: 1024})
	if err != nil {
		t.Fatal(err)
	}
	const name, idNo = "孙八", "110105194912310080"
	if _, err := s1.RegisterUser(sandbox.User{OpenID: "o-far", AppID: "wx00000000000000bb", Abnormal: true}); err != nil {
		t.Fatal(err)
	}
	if err := s1.RegisterIdentity(name, idNo); err != nil {
		t.Fatal(err)
	}
	k, err := s1.CreateStock(sandbox.StockSpec{Budget: 5, CreatorMchID: "1900000888"})
	if err != nil {
		t.Fatal(err)
	}
	if err := s1.AuthorizeMchID(k.ID, s1.Identity().MchID); err != nil {
		t.Fatal(err)
	}
	if err := s1.Close(); err != nil {
		t.Fatal(err)
	}
	state, err := os.ReadFile(filepath.Join(dir, sandbox.StateFile))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(state), name) || strings.Contains(string(state), idNo) {
		t.Fatal("state.json holds the identity in plaintext")
	}

	s2, err := sandbox.New(sandbox.Config{DataDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	serve(t, s2)
	if u := s2.Users(); len(u) != 1 || u[0] != (sandbox.User{OpenID: "o-far", AppID: "wx00000000000000bb", Abnormal: true}) {
		t.Errorf("users after restart: %+v", u)
	}
	if got, _ := s2.Stock(k.ID); len(got.AuthorizedMchIDs) != 1 {
		t.Errorf("stock after restart: %+v", got)
	}
	c := sdk(t, s2)
	id := s2.Identity()
	mustSend(t, c, s2, sendArgs{openid: "o-near", stock: k.ID, creator: "1900000888"})
	_, err = sendMultiuse(c, "o-near", multiuseBody{StockID: id.MultiuseStockID, OutRequestNo: uniq("mu"), UserName: "周九", IDCardNumber: idNo, Amount: 100, AppID: id.AppID}, false, "")
	wantAPIError(t, err, 400, "INVALID_REQUEST", "实名")
}

// Requests must carry Accept and User-Agent; WeChat answers without
// looking at the signature (developers.weixin.qq.com community: 400
// INVALID_REQUEST "Http头缺少Accept或User-Agent").
func TestRequestsNeedAcceptAndUserAgent(t *testing.T) {
	id := shared.Identity()
	uri := "/v3/marketing/favor/users/o/coupons?appid=" + id.AppID + "&creator_mchid=" + id.MchID
	for _, h := range []string{"Accept", "User-Agent"} {
		t.Run("without "+h, func(t *testing.T) {
			resp, _ := do(t, shared, rawRequest{method: "GET", uri: uri, header: http.Header{h: {""}}})
			wantAPIError(t, apiErrorOf(t, resp), 400, "INVALID_REQUEST", "Accept或User-Agent")
			garbage := "WECHATPAY2-SHA256-RSA2048 nonsense"
			resp, _ = do(t, shared, rawRequest{method: "GET", uri: uri, header: http.Header{h: {""}}, auth: &garbage})
			wantAPIError(t, apiErrorOf(t, resp), 400, "INVALID_REQUEST", "Accept或User-Agent")
		})
	}
	resp, _ := do(t, shared, rawRequest{method: "GET", uri: uri})
	if resp.StatusCode != 200 {
		t.Fatalf("with both headers: %d", resp.StatusCode)
	}
}
