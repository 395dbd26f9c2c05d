package sandbox_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/wechatpay-apiv3/wechatpay-go/core"
	"github.com/wechatpay-apiv3/wechatpay-go/core/auth"
	"github.com/wechatpay-apiv3/wechatpay-go/core/auth/signers"
	"github.com/wechatpay-apiv3/wechatpay-go/core/auth/verifiers"
	"github.com/wechatpay-apiv3/wechatpay-go/core/option"
	"github.com/wechatpay-apiv3/wechatpay-go/services/cashcoupons"
	"github.com/wechatpay-apiv3/wechatpay-go/utils"

	"github.com/couponflow/dispatcher/internal/sandbox"
	"github.com/couponflow/dispatcher/internal/sandbox/sandboxtest"
)

const apiHost = "https://api.mch.weixin.qq.com"

// shared serves most tests: keys are generated once per test binary, and
// each test makes its own stocks and openids. Tests that change faults or
// need a fresh data dir start their own sandbox.
var shared *sandbox.Server

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	dir, err := os.MkdirTemp("", "sandbox-test-")
	if err != nil {
		panic(err)
	}
	defer os.RemoveAll(dir)
	shared, err = sandbox.New(sandbox.Config{DataDir: dir})
	if err != nil {
		panic(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	go func() { _ = shared.Serve(l) }()
	<-shared.Ready()
	defer shared.Close()
	return m.Run()
}

var seq atomic.Int64

// uniq makes ids unique across the tests sharing a sandbox.
func uniq(prefix string) string {
	return fmt.Sprintf("%s%d_%d", prefix, time.Now().UnixNano()%1e9, seq.Add(1))
}

// clientOpts tweak the SDK client a test builds.
type clientOpts struct {
	signer auth.Signer
	wrap   func(http.RoundTripper) http.RoundTripper
}

// sdk builds an SDK client of s in public-key mode; opts replace the signer
// or wrap the transport.
func sdk(t testing.TB, s *sandbox.Server, opts ...clientOpts) *core.Client {
	t.Helper()
	id := s.Identity()
	var o clientOpts
	for _, x := range opts {
		o = x
	}
	var tr http.RoundTripper = &sandboxtest.Transport{Base: mustURL(t, s.URL())}
	if o.wrap != nil {
		tr = o.wrap(tr)
	}
	copts := []core.ClientOption{
		option.WithWechatPayPublicKeyAuthCipher(id.MchID, id.MchSerial, id.MerchantKey, id.PublicKeyID, id.PublicKey),
		option.WithHTTPClient(&http.Client{Transport: tr, Timeout: 10 * time.Second}),
	}
	if o.signer != nil {
		copts = append(copts, option.WithSigner(o.signer))
	}
	c, err := core.NewClient(context.Background(), copts...)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func mustURL(t testing.TB, raw string) *url.URL {
	t.Helper()
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" {
		t.Fatalf("bad sandbox URL %q: %v", raw, err)
	}
	return u
}

type sendArgs struct {
	openid, stock, outNo, appid, creator string
	value, minimum                       *int64
}

// send issues a cash coupon through the SDK; zero args take the sandbox's
// appid, mchid and a fresh out_request_no.
func send(c *core.Client, s *sandbox.Server, a sendArgs) (string, error) {
	id := s.Identity()
	if a.outNo == "" {
		a.outNo = uniq("req")
	}
	if a.appid == "" {
		a.appid = id.AppID
	}
	if a.creator == "" {
		a.creator = id.MchID
	}
	resp, _, err := (&cashcoupons.CouponApiService{Client: c}).SendCoupon(context.Background(), cashcoupons.SendCouponRequest{
		Openid: core.String(a.openid), StockId: core.String(a.stock), OutRequestNo: core.String(a.outNo),
		Appid: core.String(a.appid), StockCreatorMchid: core.String(a.creator),
		CouponValue: a.value, CouponMinimum: a.minimum,
	})
	if err != nil {
		return "", err
	}
	return *resp.CouponId, nil
}

func mustSend(t testing.TB, c *core.Client, s *sandbox.Server, a sendArgs) string {
	t.Helper()
	id, err := send(c, s, a)
	if err != nil {
		t.Fatalf("send %+v: %v", a, err)
	}
	return id
}

// wantAPIError asserts err is an *core.APIError with that status and code,
// and that its message mentions each of mention.
func wantAPIError(t testing.TB, err error, status int, code string, mention ...string) *core.APIError {
	t.Helper()
	var e *core.APIError
	if !errors.As(err, &e) {
		t.Fatalf("want %d %s, got %v", status, code, err)
	}
	if e.StatusCode != status || e.Code != code {
		t.Fatalf("want %d %s, got %d %s: %s", status, code, e.StatusCode, e.Code, e.Message)
	}
	for _, m := range mention {
		if !strings.Contains(e.Message, m) {
			t.Errorf("%s message %q does not mention %q", code, e.Message, m)
		}
	}
	return e
}

func newStock(t testing.TB, s *sandbox.Server, spec sandbox.StockSpec) sandbox.Stock {
	t.Helper()
	if spec.Budget == 0 {
		spec.Budget = 100
	}
	k, err := s.CreateStock(spec)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// multiuseBody is the consumer-fund send body; the SDK's cipher encrypts the
// tagged fields with the WeChat Pay public key.
type multiuseBody struct {
	StockID      string `json:"stock_id"`
	OutRequestNo string `json:"out_request_no"`
	UserName     string `json:"user_name" encryption:"EM_APIV3"`
	IDCardNumber string `json:"id_card_number" encryption:"EM_APIV3"`
	Amount       int64  `json:"amount,omitempty"` // 0: left out
	AppID        string `json:"appid"`
	CardType     string `json:"card_type,omitempty"`
}

// sendMultiuse encrypts b (unless raw) and posts it with the Wechatpay-Serial
// the cipher reports, or serial when given.
// card_type defaults to ID_CARD; "-" leaves it out.
func sendMultiuse(c *core.Client, openid string, b multiuseBody, raw bool, serial string) (string, error) {
	ctx := context.Background()
	switch b.CardType {
	case "":
		b.CardType = "ID_CARD"
	case "-":
		b.CardType = ""
	}
	if !raw {
		got, err := c.EncryptRequest(ctx, &b)
		if err != nil {
			return "", err
		}
		if serial == "" {
			serial = got
		}
	}
	h := http.Header{}
	if serial != "" {
		h.Set("Wechatpay-Serial", serial)
	}
	res, err := c.Request(ctx, http.MethodPost, apiHost+"/v3/multiuse/users/"+url.PathEscape(openid)+"/coupons", h, nil, b, "application/json")
	if err != nil {
		return "", err
	}
	var out struct {
		CouponID string `json:"coupon_id"`
	}
	if err := core.UnMarshalResponse(res.Response, &out); err != nil {
		return "", err
	}
	return out.CouponID, nil
}

// listed is the list API's answer with every field the docs give.
type listed struct {
	Data []struct {
		StockCreatorMchID       string `json:"stock_creator_mchid"`
		StockID                 string `json:"stock_id"`
		CouponID                string `json:"coupon_id"`
		CouponName              string `json:"coupon_name"`
		Status                  string `json:"status"`
		Description             string `json:"description"`
		CreateTime              string `json:"create_time"`
		CouponType              string `json:"coupon_type"`
		NoCash                  *bool  `json:"no_cash"`
		AvailableBeginTime      string `json:"available_begin_time"`
		AvailableEndTime        string `json:"available_end_time"`
		Singleitem              *bool  `json:"singleitem"`
		NormalCouponInformation *struct {
			CouponAmount       int64 `json:"coupon_amount"`
			TransactionMinimum int64 `json:"transaction_minimum"`
		} `json:"normal_coupon_information"`
		ConsumeInformation *struct {
			ConsumeTime   string `json:"consume_time"`
			ConsumeMchID  string `json:"consume_mchid"`
			TransactionID string `json:"transaction_id"`
			GoodsDetail   []any  `json:"goods_detail"`
		} `json:"consume_information"`
		AvailableBalance *int64 `json:"available_balance"`
		BusinessType     string `json:"business_type"`
	} `json:"data"`
	TotalCount int64 `json:"total_count"`
	Offset     int64 `json:"offset"`
	Limit      int64 `json:"limit"`
}

func (l listed) ids() []string {
	var ids []string
	for _, d := range l.Data {
		ids = append(ids, d.CouponID)
	}
	return ids
}

// list is a signed GET of the list API with q (appid added unless present).
func list(c *core.Client, s *sandbox.Server, openid string, q url.Values) (listed, error) {
	if _, ok := q["appid"]; !ok {
		q.Set("appid", s.Identity().AppID)
	}
	var out listed
	res, err := c.Get(context.Background(), apiHost+"/v3/marketing/favor/users/"+url.PathEscape(openid)+"/coupons?"+q.Encode())
	if err != nil {
		return out, err
	}
	err = core.UnMarshalResponse(res.Response, &out)
	return out, err
}

// rawRequest is a hand-built API request, for what the SDK cannot send.
type rawRequest struct {
	method, uri string
	body        []byte
	ts          int64
	nonce       string
	key         *rsa.PrivateKey
	auth        *string // replaces the Authorization header
	header      http.Header
}

// do signs (as the SDK would, unless auth is set) and sends r. It returns
// the response with its body read and checks the response signature.
func do(t testing.TB, s *sandbox.Server, r rawRequest) (*http.Response, []byte) {
	t.Helper()
	id := s.Identity()
	if r.ts == 0 {
		r.ts = time.Now().Unix()
	}
	if r.nonce == "" {
		r.nonce, _ = utils.GenerateNonce()
	}
	if r.key == nil {
		r.key = id.MerchantKey
	}
	req, err := http.NewRequest(r.method, s.URL()+r.uri, bytes.NewReader(r.body))
	if err != nil {
		t.Fatal(err)
	}
	// As the SDK does; a test drops one by giving it an empty value (Go
	// then sends no User-Agent either).
	req.Header.Set("Accept", "*/*")
	req.Header.Set("User-Agent", "sandbox-test")
	for k, v := range r.header {
		req.Header[k] = v
	}
	req.Header.Set("Content-Type", "application/json")
	if r.auth != nil {
		req.Header.Set("Authorization", *r.auth)
	} else {
		msg := fmt.Sprintf("%s\n%s\n%d\n%s\n%s\n", r.method, r.uri, r.ts, r.nonce, r.body)
		sig, err := utils.SignSHA256WithRSA(msg, r.key)
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Authorization", fmt.Sprintf(`WECHATPAY2-SHA256-RSA2048 mchid="%s",nonce_str="%s",timestamp="%d",serial_no="%s",signature="%s"`,
			id.MchID, r.nonce, r.ts, id.MchSerial, sig))
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body = io.NopCloser(bytes.NewReader(body))
	if err := verifyResponse(s, resp.Header, body); err != nil {
		t.Errorf("response %d %s is not signed correctly: %v", resp.StatusCode, body, err)
	}
	return resp, body
}

// verifyResponse checks a response signature independently of the SDK.
func verifyResponse(s *sandbox.Server, h http.Header, body []byte) error {
	id := s.Identity()
	if got := h.Get("Wechatpay-Serial"); got != id.PublicKeyID {
		return fmt.Errorf("Wechatpay-Serial %q, want %q", got, id.PublicKeyID)
	}
	if h.Get("Request-Id") == "" || h.Get("Content-Type") != "application/json" {
		return fmt.Errorf("missing Request-Id or Content-Type: %v", h)
	}
	sig, err := base64.StdEncoding.DecodeString(h.Get("Wechatpay-Signature"))
	if err != nil {
		return err
	}
	sum := sha256.Sum256([]byte(h.Get("Wechatpay-Timestamp") + "\n" + h.Get("Wechatpay-Nonce") + "\n" + string(body) + "\n"))
	return rsa.VerifyPKCS1v15(id.PublicKey, crypto.SHA256, sum[:], sig)
}

// apiErrorOf parses a raw error response as the SDK would.
func apiErrorOf(t testing.TB, resp *http.Response) error {
	t.Helper()
	err := core.CheckResponse(resp)
	if err == nil {
		t.Fatalf("want an error response, got %d", resp.StatusCode)
	}
	return err
}

var (
	otherKeyOnce sync.Once
	otherKey     *rsa.PrivateKey
)

// anotherKey is an RSA key the sandbox does not know.
func anotherKey(t testing.TB) *rsa.PrivateKey {
	otherKeyOnce.Do(func() {
		var err error
		if otherKey, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
			panic(err)
		}
	})
	return otherKey
}

// signerWith signs as the merchant (mchid and serial) with another key, or
// over another message when tamper is set.
func signerWith(s *sandbox.Server, key *rsa.PrivateKey, tamper bool) auth.Signer {
	id := s.Identity()
	if key == nil {
		key = id.MerchantKey
	}
	inner := &signers.SHA256WithRSASigner{MchID: id.MchID, CertificateSerialNo: id.MchSerial, PrivateKey: key}
	if !tamper {
		return inner
	}
	return tamperedSigner{inner}
}

type tamperedSigner struct{ *signers.SHA256WithRSASigner }

func (s tamperedSigner) Sign(ctx context.Context, msg string) (*auth.SignatureResult, error) {
	return s.SHA256WithRSASigner.Sign(ctx, msg+"tampered")
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// readEnvFile parses sandbox.env.
func readEnvFile(t testing.TB, dir string) map[string]string {
	t.Helper()
	f, err := os.Open(filepath.Join(dir, sandbox.EnvFile))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	env := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok && !strings.HasPrefix(k, "#") {
			env[k] = v
		}
	}
	return env
}

// verifierFor is a response verifier for the given key id.
func verifierFor(s *sandbox.Server, keyID string) auth.Verifier {
	return verifiers.NewSHA256WithRSAPubkeyVerifier(keyID, *s.Identity().PublicKey)
}

func adminDo(t testing.TB, s *sandbox.Server, method, path string, body any, out any) int {
	t.Helper()
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, s.URL()+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			t.Fatalf("%s %s: %d %s: %v", method, path, resp.StatusCode, b, err)
		}
	}
	return resp.StatusCode
}
