package sandbox

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/wechatpay-apiv3/wechatpay-go/utils"
)

// APIv3KeyFile holds the merchant's APIv3 key: 32 characters that encrypt
// a notification's resource with AEAD_AES_256_GCM (商户平台 → API安全 →
// 设置APIv3密钥). sandbox.env names it as WECHATPAY_APIV3_KEY.
const APIv3KeyFile = "apiv3_key"

// Notification delivery, as WeChat describes it for 核销事件回调通知
// (https://pay.weixin.qq.com/wiki/doc/apiv3/apis/chapter9_1_15.shtml):
// 通知频率为1min1次，总计9次, and an answer within 5 s
// (https://pay.weixin.qq.com/docs/merchant/apis/cash-coupons/check-notice.html).
const (
	DefaultNotifyInterval = time.Minute
	DefaultNotifyAttempts = 9
	notifyTimeout         = 5 * time.Second
)

// NotifySchedule is how the sandbox delivers COUPON.USE notifications:
// the first at once, then one every Interval until one is acknowledged
// (2xx) or Attempts have been made. Tests compress Interval.
type NotifySchedule struct {
	Interval time.Duration
	Attempts int
	// Timeout is how long a delivery waits for the answer (5 s, as WeChat).
	Timeout time.Duration
}

func (n NotifySchedule) withDefaults() NotifySchedule {
	if n.Interval <= 0 {
		n.Interval = DefaultNotifyInterval
	}
	if n.Attempts <= 0 {
		n.Attempts = DefaultNotifyAttempts
	}
	if n.Timeout <= 0 {
		n.Timeout = notifyTimeout
	}
	return n
}

// callback is a merchant's notification URL (设置代金券消息通知地址).
type callback struct {
	URL        string    `json:"notify_url"`
	MchID      string    `json:"mchid"`
	UpdateTime time.Time `json:"update_time"`
}

// NotificationRecord is one COUPON.USE notification and its deliveries, as
// GET /sandbox/notifications lists them.
type NotificationRecord struct {
	ID       string `json:"id"`
	CouponID string `json:"coupon_id"`
	URL      string `json:"url"`
	// Attempts is the deliveries made; Duplicates those sent again after
	// an acknowledgement (the notify_duplicate_rate fault).
	Attempts   int    `json:"attempts"`
	Duplicates int    `json:"duplicates"`
	Acked      bool   `json:"acked"`
	GaveUp     bool   `json:"gave_up"`
	LastStatus string `json:"last_status"` // "204", "500", "dial tcp …: connection refused", …
}

// notifier holds the deliveries in flight.
type notifier struct {
	sched  NotifySchedule
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	client *http.Client

	mu      sync.Mutex
	records []*NotificationRecord
	byID    map[string]*NotificationRecord
}

func newNotifier(sched NotifySchedule) *notifier {
	ctx, cancel := context.WithCancel(context.Background())
	sched = sched.withDefaults()
	return &notifier{sched: sched, ctx: ctx, cancel: cancel, byID: map[string]*NotificationRecord{},
		client: &http.Client{Timeout: sched.Timeout}}
}

// schedule returns the schedule in force.
func (n *notifier) schedule() NotifySchedule {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.sched
}

// SetNotifySchedule changes how notifications queued from now on are
// delivered (zero fields take WeChat's values).
func (s *Server) SetNotifySchedule(sched NotifySchedule) {
	n := s.notifier
	n.mu.Lock()
	n.sched = sched.withDefaults()
	n.mu.Unlock()
}

func (n *notifier) stop() {
	n.cancel()
	n.wg.Wait()
}

// loadAPIv3Key reads the APIv3 key from the data dir, or makes one.
func (s *Server) loadAPIv3Key() error {
	if s.dir != "" {
		b, err := os.ReadFile(s.path(APIv3KeyFile))
		if err == nil {
			k := strings.TrimSpace(string(b))
			if len(k) != 32 {
				return fmt.Errorf("%s: an APIv3 key is 32 bytes, this one is %d", s.path(APIv3KeyFile), len(k))
			}
			s.apiV3Key = k
			return nil
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	// 32 characters from letters and digits, as the merchant platform asks.
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, 32)
	for i, r := range randBytes(32) {
		b[i] = alphabet[int(r)%len(alphabet)]
	}
	s.apiV3Key = string(b)
	if s.dir == "" {
		return nil
	}
	return writeFileAtomic(s.path(APIv3KeyFile), []byte(s.apiV3Key+"\n"), 0o600)
}

// APIv3Key returns the merchant's APIv3 key. Tests read it; programs read
// the file sandbox.env names.
func (s *Server) APIv3Key() string { return s.apiV3Key }

// setCallback answers POST /v3/marketing/favor/callbacks (设置代金券消息通知地址).
func (s *Server) setCallback(r *http.Request, body []byte) reply {
	var req struct {
		MchID     string `json:"mchid"`
		NotifyURL string `json:"notify_url"`
		Switch    *bool  `json:"switch"`
	}
	if err := json.Unmarshal(body, &req); err != nil {
		return errParam("request body is not valid JSON: %v", err).reply()
	}
	if e := firstErr(required("mchid", req.MchID, 20), required("notify_url", req.NotifyURL, 256)); e != nil {
		return e.reply()
	}
	if req.MchID != s.id.MchID {
		return errParam("mchid %s: 该接口只能创建商户号进行设置 (only the calling merchant %s can set its own notify_url)", req.MchID, s.id.MchID).reply()
	}
	if req.Switch != nil && !*req.Switch {
		// The docs: 该参数设置为false暂不支持使用.
		return errParam("switch=false 暂不支持使用: notifications are turned off on the merchant platform, not here").reply()
	}
	u, err := url.Parse(req.NotifyURL)
	if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" || u.RawQuery != "" || u.Fragment != "" {
		// WeChat requires https; the sandbox takes http too, for local receivers.
		return errParam("notify_url %q must be an absolute https URL without parameters (不能携带参数)", req.NotifyURL).reply()
	}
	now := s.now()
	s.mu.Lock()
	s.st.callbacks[req.MchID] = callback{URL: req.NotifyURL, MchID: req.MchID, UpdateTime: now}
	s.st.dirty = true
	s.mu.Unlock()
	return okReply(map[string]string{"update_time": rfc3339(now), "notify_url": req.NotifyURL})
}

// queryCallback answers GET /v3/marketing/favor/callbacks?mchid= (查询代金券消息通知地址).
func (s *Server) queryCallback(r *http.Request, _ []byte) reply {
	mchid := r.URL.Query().Get("mchid")
	if e := required("mchid", mchid, 20); e != nil {
		return e.reply()
	}
	s.mu.Lock()
	cb, ok := s.st.callbacks[mchid]
	s.mu.Unlock()
	if !ok {
		return (&apiError{404, "RESOURCE_NOT_EXISTS", fmt.Sprintf("mchid %s has set no notify_url (POST /v3/marketing/favor/callbacks)", mchid)}).reply()
	}
	return okReply(map[string]string{"notify_url": cb.URL, "mchid": cb.MchID})
}

// Callback returns the notification URL set for mchid.
func (s *Server) Callback(mchid string) (string, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	cb, ok := s.st.callbacks[mchid]
	return cb.URL, ok
}

// notifyUsed queues the COUPON.USE notification of a coupon just marked
// used, if its stock's creator has set a URL. Called with s.mu held.
func (s *Server) notifyUsedLocked(c *coupon, u usage) string {
	k := s.st.stocks[c.StockID]
	if k == nil {
		return ""
	}
	cb, ok := s.st.callbacks[k.CreatorMchID]
	if !ok {
		return ""
	}
	plain, err := json.Marshal(listed{c: c, stock: *k, used: &u}.view())
	if err != nil {
		return ""
	}
	id := newNotificationID()
	rec := &NotificationRecord{ID: id, CouponID: c.ID, URL: cb.URL}
	n := s.notifier
	n.mu.Lock()
	n.records = append(n.records, rec)
	n.byID[id] = rec
	n.mu.Unlock()
	n.wg.Add(1)
	go s.deliver(rec, plain, s.Faults())
	return id
}

func newNotificationID() string {
	b := randBytes(16)
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// deliver sends one notification until it is acknowledged or the schedule
// runs out, each attempt signed afresh (a new timestamp and nonce), as
// WeChat's retries are.
func (s *Server) deliver(rec *NotificationRecord, plain []byte, f Faults) {
	n := s.notifier
	defer n.wg.Done()
	sched := n.schedule()
	delay := time.Duration(f.NotifyDelayMS) * time.Millisecond
	if f.NotifyJitterMS > 0 {
		s.rngMu.Lock()
		delay += time.Duration(s.rng.Int64N(f.NotifyJitterMS+1)) * time.Millisecond
		s.rngMu.Unlock()
	}
	if delay > 0 {
		s.countFault("notify_delay")
	}
	if !sleepCtx(n.ctx, delay) {
		return
	}
	for attempt := 1; attempt <= sched.Attempts; attempt++ {
		status, ok := s.post(rec, plain)
		n.mu.Lock()
		rec.Attempts++
		rec.LastStatus = status
		rec.Acked = ok
		rec.GaveUp = !ok && attempt == sched.Attempts
		n.mu.Unlock()
		if ok {
			if s.roll(f.NotifyDuplicateRate) {
				// WeChat may send the same notification again (同样的通知可能会多次发送).
				s.countFault("notify_duplicate")
				_, _ = s.post(rec, plain)
				n.mu.Lock()
				rec.Duplicates++
				n.mu.Unlock()
			}
			return
		}
		if attempt < sched.Attempts && !sleepCtx(n.ctx, sched.Interval) {
			return
		}
	}
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// post makes one delivery and reports what came of it.
func (s *Server) post(rec *NotificationRecord, plain []byte) (string, bool) {
	body, err := s.notificationBody(rec.ID, plain)
	if err != nil {
		return "encrypt: " + err.Error(), false
	}
	req, err := http.NewRequestWithContext(s.notifier.ctx, http.MethodPost, rec.URL, bytes.NewReader(body))
	if err != nil {
		return err.Error(), false
	}
	s.signNotification(req.Header, body)
	resp, err := s.notifier.client.Do(req)
	if err != nil {
		return err.Error(), false
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<16))
	_ = resp.Body.Close()
	// WeChat takes 200 or 204 as acknowledged; the sandbox any 2xx.
	return strconv.Itoa(resp.StatusCode), resp.StatusCode >= 200 && resp.StatusCode < 300
}

// notificationBody is the notification as WeChat sends it: the coupon,
// encrypted with AEAD_AES_256_GCM under the APIv3 key, in a resource.
func (s *Server) notificationBody(id string, plain []byte) ([]byte, error) {
	block, err := aes.NewCipher([]byte(s.apiV3Key))
	if err != nil {
		return nil, err
	}
	gcm, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	nonce := make([]byte, 12)
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	for i := range nonce {
		nonce[i] = alphabet[int(nonce[i])%len(alphabet)]
	}
	const ad = "coupon"
	ct := gcm.Seal(nil, nonce, plain, []byte(ad))
	return json.Marshal(map[string]any{
		"id":            id,
		"create_time":   rfc3339(time.Now()),
		"resource_type": "encrypt-resource",
		"event_type":    "COUPON.USE",
		"summary":       "用券成功",
		"resource": map[string]string{
			"original_type":   "coupon",
			"algorithm":       "AEAD_AES_256_GCM",
			"ciphertext":      base64.StdEncoding.EncodeToString(ct),
			"associated_data": ad,
			"nonce":           string(nonce),
		},
	})
}

// signNotification sets the headers a notification carries: signed with
// the WeChat Pay key like an API answer, over timestamp, nonce and body.
func (s *Server) signNotification(h http.Header, body []byte) {
	ts := strconv.FormatInt(time.Now().Unix(), 10)
	nonce, _ := utils.GenerateNonce()
	sig, _ := utils.SignSHA256WithRSA(ts+"\n"+nonce+"\n"+string(body)+"\n", s.wxKey)
	h.Set("Content-Type", "application/json")
	h.Set("User-Agent", "Mozilla/4.0 (wxsandbox notifier)")
	h.Set("Request-Id", s.requestID())
	h.Set("Wechatpay-Serial", s.id.PublicKeyID)
	h.Set("Wechatpay-Timestamp", ts)
	h.Set("Wechatpay-Nonce", nonce)
	h.Set("Wechatpay-Signature", sig)
	h.Set("Wechatpay-Signature-Type", "WECHATPAY2-SHA256-RSA2048")
}

// SignedNotification builds the COUPON.USE notification of a used coupon,
// body and headers, without sending it: for tests that replay, tamper
// with or forge one.
func (s *Server) SignedNotification(couponID string) ([]byte, http.Header, error) {
	s.mu.Lock()
	c := s.st.byID[couponID]
	var plain []byte
	var err error
	if c != nil {
		u, used := s.st.used[couponID]
		if !used {
			s.mu.Unlock()
			return nil, nil, fmt.Errorf("coupon %s is not used", couponID)
		}
		plain, err = json.Marshal(listed{c: c, stock: *s.st.stocks[c.StockID], used: &u}.view())
	}
	s.mu.Unlock()
	if c == nil {
		return nil, nil, fmt.Errorf("coupon %s: %w", couponID, ErrNotFound)
	}
	if err != nil {
		return nil, nil, err
	}
	body, err := s.notificationBody(newNotificationID(), plain)
	if err != nil {
		return nil, nil, err
	}
	h := http.Header{}
	s.signNotification(h, body)
	return body, h, nil
}

// Notifications returns every COUPON.USE notification and its deliveries,
// oldest first.
func (s *Server) Notifications() []NotificationRecord {
	n := s.notifier
	n.mu.Lock()
	defer n.mu.Unlock()
	out := make([]NotificationRecord, len(n.records))
	for i, r := range n.records {
		out[i] = *r
	}
	return out
}
