package sandbox

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/wechatpay-apiv3/wechatpay-go/utils"
)

// apiError is an API error answer: {"code":…,"message":…}.
type apiError struct {
	status    int
	code, msg string
}

func errSign(format string, args ...any) *apiError {
	return &apiError{401, "SIGN_ERROR", fmt.Sprintf(format, args...)}
}

func errParam(format string, args ...any) *apiError {
	return &apiError{400, "PARAM_ERROR", fmt.Sprintf(format, args...)}
}

func errInvalid(format string, args ...any) *apiError {
	return &apiError{400, "INVALID_REQUEST", fmt.Sprintf(format, args...)}
}

func errSystem() *apiError { return &apiError{500, "SYSTEM_ERROR", "系统错误，请稍后重试"} }

func (s *Server) errAppID(appid string) *apiError {
	return &apiError{400, "APPID_MCHID_NOT_MATCH", fmt.Sprintf("商户号与appid不匹配: appid %s is not bound to mchid %s", appid, s.id.MchID)}
}

func (e *apiError) reply() reply {
	b, _ := json.Marshal(struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	}{e.code, e.msg})
	return reply{status: e.status, code: e.code, body: b}
}

// reply is an API answer before faults and signing are applied.
type reply struct {
	status int
	code   string // "OK" on success
	body   []byte
	issued bool // a send answered with a coupon: commit-fail faults apply
}

func okReply(v any) reply {
	b, err := json.Marshal(v)
	if err != nil {
		return errSystem().reply()
	}
	return reply{status: http.StatusOK, code: "OK", body: b}
}

type apiHandler func(r *http.Request, body []byte) reply

// RecordedRequest is an API request as received, given to the OnRequest hook.
type RecordedRequest struct {
	Method string
	Path   string // path and query, as sent
	Header http.Header
	Body   []byte // raw
}

// OnRequest sets a hook called synchronously with every API request (not
// admin requests) before it is processed; nil removes it.
func (s *Server) OnRequest(f func(RecordedRequest)) {
	if f == nil {
		s.hook.Store(nil)
		return
	}
	s.hook.Store(&f)
}

const maxBody = 1 << 20

// api wraps a business handler with what every API request goes through:
// authentication, the rate limit, faults, counting and response signing.
func (s *Server) api(h apiHandler) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		body, rerr := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
		if hook := s.hook.Load(); hook != nil {
			(*hook)(RecordedRequest{Method: r.Method, Path: r.RequestURI, Header: r.Header.Clone(), Body: bytes.Clone(body)})
		}
		f := s.Faults()
		conflict, release := s.enterUser(r, f)
		defer release()
		rep := s.process(r, body, rerr, h, f, conflict)

		if f.Latency > 0 && s.roll(f.latencyRate()) {
			s.countFault("latency")
			t := time.NewTimer(f.Latency)
			select {
			case <-t.C:
			case <-r.Context().Done():
				t.Stop()
			}
		}
		if rep.issued && s.roll(f.AcceptedRate) {
			// Issued, and answered as if WeChat had not finished: only the
			// same request again tells the caller its coupon.
			s.countFault("accepted_202")
			rep = reply{status: http.StatusAccepted, code: "ACCEPTED"}
		}
		if rep.issued && rep.status == http.StatusOK && s.roll(f.CommitFailRate) {
			mode := f.CommitFailMode
			if mode != CommitFail500 && mode != CommitFailDrop {
				mode = CommitFail500
				if s.roll(0.5) {
					mode = CommitFailDrop
				}
			}
			if mode == CommitFailDrop {
				// Hijacking fails on HTTP/2; answer 500 there instead.
				if conn, _, err := http.NewResponseController(w).Hijack(); err == nil {
					// Counted before closing, so a caller that sees the drop sees it counted.
					s.countFault("commit_fail_drop")
					s.count(0, "CONNECTION_DROPPED")
					_ = conn.Close()
					s.log.Debug("api request", "method", r.Method, "path", r.URL.Path, "status", 0, "code", "CONNECTION_DROPPED", "elapsed", time.Since(start))
					return
				}
			}
			s.countFault("commit_fail_500")
			rep = errSystem().reply()
		}
		bad := rep.status < 300 && s.roll(f.BadSignatureRate)
		if bad {
			s.countFault("bad_signature")
		}
		s.count(rep.status, rep.code)
		s.writeSigned(w, rep.status, rep.body, bad)
		s.log.Debug("api request", "method", r.Method, "path", r.URL.Path, "status", rep.status, "code", rep.code, "elapsed", time.Since(start))
	}
}

func (s *Server) process(r *http.Request, body []byte, rerr error, h apiHandler, f Faults, conflict bool) reply {
	if rerr != nil {
		return errParam("request body unreadable or larger than 1 MiB: %v", rerr).reply()
	}
	// Before the signature, as WeChat does: a request without these
	// headers is told so even when its Authorization is malformed.
	if r.Header.Get("Accept") == "" || r.Header.Get("User-Agent") == "" {
		return errInvalid("Http头缺少Accept或User-Agent: every APIv3 request must carry both (Accept: application/json, User-Agent naming the client)").reply()
	}
	if f.SignError {
		s.countFault("sign_error")
		return errSign("签名错误，请检查后再试: the sandbox's sign_error profile refuses every request, as WeChat does when the merchant's clock is off or its private key or serial is wrong").reply()
	}
	if e := s.authenticate(r, body); e != nil {
		return e.reply()
	}
	if !s.allow() {
		return f.rateLimited().reply()
	}
	if s.roll(f.ErrorRate) {
		s.countFault("system_error")
		return errSystem().reply()
	}
	if conflict {
		s.countFault("user_conflict")
		return (&apiError{403, "REQUEST_BLOCKED", "用户被限领拦截: another send to this openid is in flight (the sandbox's user_conflict profile)"}).reply()
	}
	return h(r, body)
}

// enterUser marks a send to an openid as in flight while the user_conflict
// profile is on, and says whether another send to it already was.
func (s *Server) enterUser(r *http.Request, f Faults) (conflict bool, release func()) {
	openid := r.PathValue("openid")
	if !f.UserConflict || r.Method != http.MethodPost || openid == "" {
		return false, func() {}
	}
	s.inflightMu.Lock()
	defer s.inflightMu.Unlock()
	conflict = s.inflight[openid] > 0
	s.inflight[openid]++
	return conflict, func() {
		s.inflightMu.Lock()
		defer s.inflightMu.Unlock()
		if s.inflight[openid]--; s.inflight[openid] == 0 {
			delete(s.inflight, openid)
		}
	}
}

func notFound(r *http.Request, _ []byte) reply {
	return (&apiError{404, "NOT_FOUND", fmt.Sprintf("the sandbox has no API %s %s", r.Method, r.URL.Path)}).reply()
}

// uncleanPath answers API paths that ServeMux would redirect: an empty
// {openid} ("users//coupons") is the one a client can produce.
func uncleanPath(r *http.Request, body []byte) reply {
	if strings.HasSuffix(r.URL.Path, "/users//coupons") {
		return errParam("openid 必填: openid is required").reply()
	}
	return notFound(r, body)
}

// required checks a mandatory string field.
func required(field, v string, maxLen int) *apiError {
	if v == "" {
		return errParam("%s is required (必填)", field)
	}
	return optional(field, v, maxLen)
}

func optional(field, v string, maxLen int) *apiError {
	if len(v) > maxLen {
		return errParam("%s is longer than %d characters", field, maxLen)
	}
	return nil
}

func firstErr(errs ...*apiError) *apiError {
	for _, e := range errs {
		if e != nil {
			return e
		}
	}
	return nil
}

func checkOutRequestNo(v string) *apiError {
	if e := required("out_request_no", v, 128); e != nil {
		return e
	}
	for _, c := range v {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.ContainsRune("_|*-", c)) {
			return errParam("out_request_no contains %q: only letters, digits and _ | * - are allowed", c)
		}
	}
	return nil
}

func (s *Server) sendFavor(r *http.Request, body []byte) reply {
	var req struct {
		StockID           string `json:"stock_id"`
		OutRequestNo      string `json:"out_request_no"`
		AppID             string `json:"appid"`
		StockCreatorMchID string `json:"stock_creator_mchid"`
		CouponValue       *int64 `json:"coupon_value"`
		CouponMinimum     *int64 `json:"coupon_minimum"`
	}
	if err := json.Unmarshal(body, &req); err != nil {
		return errParam("request body is not valid JSON: %v", err).reply()
	}
	openid := r.PathValue("openid")
	var value, minimum int64
	var valueErr *apiError
	switch {
	case (req.CouponValue == nil) != (req.CouponMinimum == nil):
		valueErr = errParam("coupon_value and coupon_minimum must be given together")
	case req.CouponValue == nil:
	case *req.CouponValue <= 0:
		valueErr = errParam("coupon_value must be > 0, got %d", *req.CouponValue)
	case *req.CouponMinimum < *req.CouponValue:
		valueErr = errParam("coupon_minimum (%d) must be >= coupon_value (%d)", *req.CouponMinimum, *req.CouponValue)
	default:
		value, minimum = *req.CouponValue, *req.CouponMinimum
	}
	if e := firstErr(
		required("openid", openid, 128),
		required("stock_id", req.StockID, 20),
		checkOutRequestNo(req.OutRequestNo),
		required("appid", req.AppID, 128),
		required("stock_creator_mchid", req.StockCreatorMchID, 20),
		valueErr,
	); e != nil {
		return e.reply()
	}
	if req.AppID != s.id.AppID {
		return s.errAppID(req.AppID).reply()
	}
	if e := s.checkUser(openid, req.AppID); e != nil {
		return e.reply()
	}
	c, e := s.issue(&coupon{
		Kind: KindFavor, StockID: req.StockID, OpenID: openid, OutRequestNo: req.OutRequestNo,
		SenderMchID: s.id.MchID, AppID: req.AppID, CreatorMchID: req.StockCreatorMchID,
		ReqValue: value, ReqMinimum: minimum, Amount: value, Minimum: minimum,
	})
	return s.sent(c, e)
}

func (s *Server) sent(c *coupon, e *apiError) reply {
	if e != nil {
		return e.reply()
	}
	rep := okReply(map[string]string{"coupon_id": c.ID})
	rep.issued = true
	return rep
}

var idCardRe = regexp.MustCompile(`^[0-9]{17}[0-9Xx]$`)

func (s *Server) sendMultiuse(r *http.Request, body []byte) reply {
	if got := r.Header.Get("Wechatpay-Serial"); got != s.id.PublicKeyID {
		return errParam("Wechatpay-Serial header must be the WeChat Pay public key id %s that encrypted user_name and id_card_number, got %q", s.id.PublicKeyID, got).reply()
	}
	var req struct {
		StockID      string `json:"stock_id"`
		OutRequestNo string `json:"out_request_no"`
		UserName     string `json:"user_name"`
		IDCardNumber string `json:"id_card_number"`
		Amount       *int64 `json:"amount"`
		AppID        string `json:"appid"`
		CardType     string `json:"card_type"`
	}
	if err := json.Unmarshal(body, &req); err != nil {
		return errParam("request body is not valid JSON: %v", err).reply()
	}
	openid := r.PathValue("openid")
	cardType := req.CardType
	// amount may be left out where the stock has a fixed amount; issue
	// decides, knowing the stock.
	var amount int64
	var amountErr *apiError
	if req.Amount != nil {
		if amount = *req.Amount; amount <= 0 {
			amountErr = errParam("amount must be > 0, got %d", amount)
		}
	}
	var cardErr *apiError
	switch cardType {
	case "":
		cardErr = errParam("card_type is required (必填): ID_CARD")
	case "ID_CARD":
	default:
		cardErr = errParam("card_type must be ID_CARD (the only 证件类型 WeChat lists), got %q", truncateRunes(cardType, 32))
	}
	if e := firstErr(
		required("openid", openid, 128),
		required("stock_id", req.StockID, 20),
		checkOutRequestNo(req.OutRequestNo),
		required("user_name", req.UserName, 2048),
		required("id_card_number", req.IDCardNumber, 2048),
		amountErr,
		required("appid", req.AppID, 128),
		cardErr,
	); e != nil {
		return e.reply()
	}
	if req.AppID != s.id.AppID {
		return s.errAppID(req.AppID).reply()
	}
	if e := s.checkUser(openid, req.AppID); e != nil {
		return e.reply()
	}
	// The plaintext lives only in these locals: never stored, never logged.
	name, err := utils.DecryptOAEP(req.UserName, s.wxKey)
	if err != nil {
		return errParam("user_name cannot be decrypted: it must be base64 RSA-OAEP (SHA-1) ciphertext under the WeChat Pay public key %s", s.id.PublicKeyID).reply()
	}
	idNumber, err := utils.DecryptOAEP(req.IDCardNumber, s.wxKey)
	if err != nil {
		return errParam("id_card_number cannot be decrypted: it must be base64 RSA-OAEP (SHA-1) ciphertext under the WeChat Pay public key %s", s.id.PublicKeyID).reply()
	}
	switch {
	case strings.TrimSpace(name) == "":
		return errParam("user_name decrypts to an empty name").reply()
	case idNumber == "":
		return errParam("id_card_number decrypts to an empty number").reply()
	case !idCardRe.MatchString(idNumber):
		return errParam("id_card_number is not an 18-character ID card number (17 digits, then a digit or X)").reply()
	}
	if e := s.checkIdentity(name, idNumber); e != nil {
		return e.reply()
	}
	mac := hmac.New(sha256.New, []byte(s.id.HolderSalt))
	mac.Write([]byte(name + "\x00" + idNumber))
	c, e := s.issue(&coupon{
		Kind: KindMultiuse, StockID: req.StockID, OpenID: openid, OutRequestNo: req.OutRequestNo,
		SenderMchID: s.id.MchID, AppID: req.AppID, ReqValue: amount, Amount: amount,
		CardType: cardType, Holder: hex.EncodeToString(mac.Sum(nil)),
	})
	return s.sent(c, e)
}

type couponView struct {
	StockCreatorMchID       string           `json:"stock_creator_mchid"`
	StockID                 string           `json:"stock_id"`
	CouponID                string           `json:"coupon_id"`
	CouponName              string           `json:"coupon_name"`
	Status                  string           `json:"status"`
	Description             string           `json:"description"`
	CreateTime              string           `json:"create_time"`
	CouponType              string           `json:"coupon_type"`
	NoCash                  bool             `json:"no_cash"`
	AvailableBeginTime      string           `json:"available_begin_time"`
	AvailableEndTime        string           `json:"available_end_time"`
	Singleitem              bool             `json:"singleitem"`
	NormalCouponInformation normalCouponInfo `json:"normal_coupon_information"`
	ConsumeInformation      *consumeInfo     `json:"consume_information,omitempty"`
	AvailableBalance        *int64           `json:"available_balance,omitempty"`
	BusinessType            string           `json:"business_type,omitempty"`
}

type normalCouponInfo struct {
	CouponAmount       int64 `json:"coupon_amount"`
	TransactionMinimum int64 `json:"transaction_minimum"`
}

type consumeInfo struct {
	ConsumeTime   string `json:"consume_time"`
	ConsumeMchID  string `json:"consume_mchid"`
	TransactionID string `json:"transaction_id"`
	GoodsDetail   []any  `json:"goods_detail"`
}

func (l listed) view() couponView {
	c := l.c
	v := couponView{
		StockCreatorMchID:       l.stock.CreatorMchID,
		StockID:                 c.StockID,
		CouponID:                c.ID,
		CouponName:              l.stock.Name,
		Status:                  StatusSended,
		Description:             "沙箱批次 " + c.StockID,
		CreateTime:              rfc3339(c.Created),
		CouponType:              "NORMAL",
		AvailableBeginTime:      rfc3339(c.Created),
		AvailableEndTime:        rfc3339(c.Created.AddDate(0, 0, 30)),
		NormalCouponInformation: normalCouponInfo{c.Amount, c.Minimum},
	}
	if l.used != nil {
		v.Status = StatusUsed
		v.ConsumeInformation = &consumeInfo{rfc3339(l.used.Time), l.used.MchID, l.used.TransactionID, []any{}}
	}
	if c.Kind == KindMultiuse {
		balance := c.Amount
		if l.used != nil {
			balance = 0
		}
		v.AvailableBalance, v.BusinessType = &balance, "MULTIUSE"
	}
	return v
}

// truncateRunes shortens a value echoed in an error message.
func truncateRunes(v string, n int) string {
	if r := []rune(v); len(r) > n {
		return string(r[:n]) + "…"
	}
	return v
}

func uintParam(q url.Values, name string, def int64) (int64, *apiError) {
	v := q.Get(name)
	if v == "" {
		return def, nil
	}
	n, err := strconv.ParseUint(v, 10, 32)
	if err != nil {
		return 0, errParam("%s must be an unsigned integer, got %q", name, v)
	}
	return int64(n), nil
}

// listCoupons is GET /v3/marketing/favor/users/{openid}/coupons. The docs
// label offset 分页页码 (page number) without saying more; Config.ListPaging
// says whether it counts coupons (the default) or pages.
func (s *Server) listCoupons(r *http.Request, _ []byte) reply {
	q := r.URL.Query()
	f := listFilter{
		openID: r.PathValue("openid"), kind: KindFavor,
		stockID: q.Get("stock_id"), status: q.Get("status"),
		creator: q.Get("creator_mchid"), availableMchID: q.Get("available_mchid"),
	}
	appid := q.Get("appid")
	if e := firstErr(
		required("openid", f.openID, 128),
		required("appid", appid, 128),
		optional("stock_id", f.stockID, 20),
		optional("creator_mchid", f.creator, 20),
		optional("available_mchid", f.availableMchID, 20),
	); e != nil {
		return e.reply()
	}
	if _, ok := q["sender_mchid"]; ok {
		// 批次发放商户号 sender_mchid (该字段暂未开放): refused rather than
		// applied, so no client comes to depend on a filter WeChat lacks.
		return errParam("sender_mchid 该字段暂未开放: filter by creator_mchid or available_mchid").reply()
	}
	if appid != s.id.AppID {
		return s.errAppID(appid).reply()
	}
	if e := s.checkUser(f.openID, appid); e != nil {
		return e.reply()
	}
	if f.creator == "" && f.availableMchID == "" {
		return errParam("one of creator_mchid or available_mchid is required (二选一)").reply()
	}
	if f.creator != "" {
		// 如果同时存在，优先使用stock_creator_mchid: available_mchid, and
		// what it switches off (stock_id, status, paging), no longer apply.
		f.availableMchID = ""
	}
	if f.status != "" && f.status != StatusSended && f.status != StatusUsed {
		return errParam("status must be SENDED or USED, got %q", f.status).reply()
	}
	switch bt := q.Get("business_type"); bt {
	case "":
	case "MULTIUSE":
		f.kind = KindMultiuse
	default:
		return errParam("business_type must be MULTIUSE or absent, got %q", bt).reply()
	}
	// With available_mchid, offset and limit do not apply (填写available_mchid，该字段不生效).
	var offset, limit int64
	if f.availableMchID == "" {
		var e *apiError
		if offset, e = uintParam(q, "offset", 0); e != nil {
			return e.reply()
		}
		if limit, e = uintParam(q, "limit", 20); e != nil {
			return e.reply()
		}
		if limit < 1 || limit > 100 {
			return errParam("页大小超过阈值: limit must be between 1 and 100, got %d", limit).reply()
		}
	}
	all := s.find(f)
	page := all
	if f.availableMchID == "" {
		skip := offset
		if s.paging == PagingPages {
			skip = offset * limit
		}
		from := min(int64(len(all)), skip)
		page = all[from:min(int64(len(all)), from+limit)]
	} else {
		limit = int64(len(all))
	}
	data := make([]couponView, len(page))
	for i, l := range page {
		data[i] = l.view()
	}
	return okReply(struct {
		Data       []couponView `json:"data"`
		TotalCount int          `json:"total_count"`
		Offset     int64        `json:"offset"`
		Limit      int64        `json:"limit"`
	}{data, len(all), offset, limit})
}

// Query-stock status values, as the official docs spell them (lower case,
// and 已停止 as "stoped"): https://pay.weixin.qq.com/docs/merchant/apis/cash-coupons/stock/query-stock.html
const (
	QueryStatusRunning = "running"
	QueryStatusPaused  = "paused"
	QueryStatusStopped = "stoped"
)

// stockView is the answer of GET /v3/marketing/favor/stocks/{stock_id}
// (查询批次详情), field for field as the official page and the SDK's
// cashcoupons.Stock have it.
type stockView struct {
	StockID            string       `json:"stock_id"`
	StockCreatorMchID  string       `json:"stock_creator_mchid"`
	StockName          string       `json:"stock_name"`
	Status             string       `json:"status"`
	CreateTime         string       `json:"create_time"`
	Description        string       `json:"description"`
	StockUseRule       stockUseRule `json:"stock_use_rule"`
	AvailableBeginTime string       `json:"available_begin_time"`
	AvailableEndTime   string       `json:"available_end_time"`
	DistributedCoupons int64        `json:"distributed_coupons"`
	NoCash             bool         `json:"no_cash"`
	StartTime          string       `json:"start_time,omitempty"`
	StopTime           string       `json:"stop_time,omitempty"`
	Singleitem         bool         `json:"singleitem"`
	StockType          string       `json:"stock_type"`
}

type stockUseRule struct {
	MaxCoupons        int64            `json:"max_coupons"`
	MaxAmount         int64            `json:"max_amount"`
	MaxAmountByDay    int64            `json:"max_amount_by_day,omitempty"`
	FixedNormalCoupon normalCouponInfo `json:"fixed_normal_coupon"`
	// MaxCouponsPerUser is 0 for a sandbox stock without a per-user limit
	// (WeChat's stocks always have one).
	MaxCouponsPerUser int64    `json:"max_coupons_per_user"`
	CouponType        string   `json:"coupon_type"`
	GoodsTag          []string `json:"goods_tag"`
	TradeType         []string `json:"trade_type"`
	CombineUse        bool     `json:"combine_use"`
}

func (k Stock) queryView() stockView {
	status := QueryStatusRunning
	switch k.State {
	case StatePaused:
		status = QueryStatusPaused
	case StateStopped:
		status = QueryStatusStopped
	}
	stockType := "NORMAL"
	if k.Kind == KindMultiuse {
		stockType = "OTHER" // the SDK's enum: NORMAL, DISCOUNT_CUT, OTHER
	}
	v := stockView{
		StockID:           k.ID,
		StockCreatorMchID: k.CreatorMchID,
		StockName:         k.Name,
		Status:            status,
		CreateTime:        rfc3339(k.Created),
		Description:       "沙箱批次 " + k.ID,
		StockUseRule: stockUseRule{
			MaxCoupons:        k.Budget,
			MaxAmount:         budgetAmount(k.Budget, k.CouponValue),
			MaxAmountByDay:    k.MaxAmountByDay,
			FixedNormalCoupon: normalCouponInfo{k.CouponValue, k.CouponMinimum},
			MaxCouponsPerUser: k.MaxPerUser,
			CouponType:        "NORMAL",
			GoodsTag:          []string{},
			TradeType:         []string{},
		},
		AvailableBeginTime: rfc3339(k.AvailableBegin),
		AvailableEndTime:   rfc3339(k.AvailableEnd),
		DistributedCoupons: k.Issued,
		StartTime:          rfc3339(k.Created),
		StockType:          stockType,
	}
	if !k.Stopped.IsZero() {
		v.StopTime = rfc3339(k.Stopped)
	}
	return v
}

// budgetAmount is max_amount, the budget in fen, saturated rather than
// overflowing for an absurd sandbox budget.
func budgetAmount(coupons, value int64) int64 {
	if value > 0 && coupons > math.MaxInt64/value {
		return math.MaxInt64
	}
	return coupons * value
}

// queryStock is GET /v3/marketing/favor/stocks/{stock_id} (查询批次详情).
// The docs: stock_creator_mchid is required and must have created the
// stock (校验规则); the creator and the stock's senders may call it
// (该接口支持批次创建商户号与批次发放商户调用).
func (s *Server) queryStock(r *http.Request, _ []byte) reply {
	id := r.PathValue("stock_id")
	creator := r.URL.Query().Get("stock_creator_mchid")
	if e := firstErr(
		required("stock_id", id, 20),
		required("stock_creator_mchid", creator, 20),
	); e != nil {
		return e.reply()
	}
	k, ok := s.Stock(id)
	switch {
	case !ok:
		return (&apiError{404, "RESOURCE_NOT_EXISTS", fmt.Sprintf("批次不存在: stock_id %s not found", id)}).reply()
	case k.CreatorMchID != creator:
		return errParam("stock_creator_mchid %s did not create stock %s (接口传入的批次号需由stock_creator_mchid所创建)", creator, id).reply()
	case k.CreatorMchID != s.id.MchID && !slices.Contains(k.AuthorizedMchIDs, s.id.MchID):
		return (&apiError{403, "NO_AUTH", fmt.Sprintf("无权限: merchant %s neither created stock %s nor is authorised to send it", s.id.MchID, id)}).reply()
	}
	return okReply(k.queryView())
}
