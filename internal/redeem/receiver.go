// Package redeem closes a campaign's loop: which of its coupons were used.
//
// Receiver is the HTTP handler WeChat Pay posts COUPON.USE notifications
// to (核销事件回调通知, https://pay.weixin.qq.com/docs/merchant/apis/cash-coupons/check-notice.html).
// It verifies each notification's signature and decrypts its resource with
// the official SDK's core/notify, records the redemption on the send's
// record (idempotency.Store.Redeem) and acknowledges only once that is
// written. Sync backfills what notifications missed from the list API.
package redeem

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"math"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/wechatpay-apiv3/wechatpay-go/core/auth/verifiers"
	"github.com/wechatpay-apiv3/wechatpay-go/core/notify"

	"crypto/rsa"

	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/metrics"
)

// EventCouponUse is the event type of a cash coupon's use.
const EventCouponUse = "COUPON.USE"

// maxBody bounds a notification: WeChat's are a few KiB.
const maxBody = 64 << 10

// Receiver handles COUPON.USE notifications. It trusts nothing that is not
// signed by the WeChat Pay key and encrypted under the APIv3 key: it is
// reachable from the internet.
type Receiver struct {
	store   *idempotency.Store
	handler *notify.Handler
	log     *slog.Logger
	metrics *metrics.Redemptions
	// skew is how far a notification's timestamp may be from now; the SDK
	// refuses 5 minutes, the receiver says so first to name the reason.
	skew time.Duration
	now  func() time.Time

	// byStock remembers which campaigns a stock's coupons were found in,
	// so that a notification usually costs one lookup, not one per campaign.
	mu      sync.Mutex
	byStock map[string][]string
}

// Config configures a Receiver.
type Config struct {
	Store *idempotency.Store
	// APIv3Key decrypts the resource (32 bytes); PublicKey and PublicKeyID
	// verify the signature (Wechatpay-Serial names the key).
	APIv3Key    string
	PublicKey   *rsa.PublicKey
	PublicKeyID string
	Logger      *slog.Logger
	Metrics     *metrics.Redemptions
}

// New builds a receiver. The key is checked here, so a wrong one stops the
// program at start rather than refusing every notification.
func New(cfg Config) (*Receiver, error) {
	if len(cfg.APIv3Key) != 32 {
		return nil, errors.New("redeem: the APIv3 key must be 32 bytes")
	}
	if cfg.PublicKey == nil || cfg.PublicKeyID == "" {
		return nil, errors.New("redeem: the WeChat Pay public key and its id are required to verify notifications")
	}
	h, err := notify.NewRSANotifyHandler(cfg.APIv3Key, verifiers.NewSHA256WithRSAPubkeyVerifier(cfg.PublicKeyID, *cfg.PublicKey))
	if err != nil {
		// Never wrap the error: it could only be about the key.
		return nil, errors.New("redeem: the APIv3 key cannot make an AES-256-GCM cipher")
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Receiver{store: cfg.Store, handler: h, log: log, metrics: cfg.Metrics, skew: 5 * time.Minute,
		now: time.Now, byStock: map[string][]string{}}, nil
}

// CouponUse is the decrypted resource of a COUPON.USE notification: the
// coupon as the list API describes it, with its consume_information.
type CouponUse struct {
	StockCreatorMchID string `json:"stock_creator_mchid"`
	StockID           string `json:"stock_id"`
	CouponID          string `json:"coupon_id"`
	Status            string `json:"status"`
	NormalCoupon      *struct {
		// A number of fen; json.Number, since integrators have seen it
		// written 10.0.
		CouponAmount json.Number `json:"coupon_amount"`
	} `json:"normal_coupon_information"`
	ConsumeInformation *struct {
		ConsumeTime   string `json:"consume_time"`
		ConsumeMchID  string `json:"consume_mchid"`
		TransactionID string `json:"transaction_id"`
	} `json:"consume_information"`
}

// Redemption turns the resource into what the store records.
func (c CouponUse) Redemption(notificationID, source string) (idempotency.Redemption, error) {
	if c.CouponID == "" || c.ConsumeInformation == nil {
		return idempotency.Redemption{}, errors.New("coupon_id or consume_information missing")
	}
	at, err := time.Parse(time.RFC3339, c.ConsumeInformation.ConsumeTime)
	if err != nil {
		return idempotency.Redemption{}, errors.New("consume_information.consume_time is not RFC 3339")
	}
	var amount int64
	if c.NormalCoupon != nil && c.NormalCoupon.CouponAmount != "" {
		f, err := strconv.ParseFloat(string(c.NormalCoupon.CouponAmount), 64)
		if err != nil || f < 0 {
			return idempotency.Redemption{}, errors.New("normal_coupon_information.coupon_amount is not an amount")
		}
		amount = int64(math.Round(f))
	}
	return idempotency.Redemption{CouponID: c.CouponID, NotificationID: notificationID, ConsumeTime: at,
		ConsumeMchID: c.ConsumeInformation.ConsumeMchID, TransactionID: c.ConsumeInformation.TransactionID,
		Amount: amount, Source: source}, nil
}

// ServeHTTP handles one notification. Answers: 200 {"code":"SUCCESS"}
// once the redemption is written (or was before, or is not ours); 401
// for what is not WeChat's (signature, staleness, replay, decryption),
// 400 for a body that cannot be read, 500 when the write failed, so that
// WeChat delivers it again. Nothing of the body, the headers' values or
// the SDK's error (which dumps the request) is logged.
func (rv *Receiver) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		fail(w, http.StatusMethodNotAllowed, "POST only")
		return
	}
	start := rv.now()
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	if err != nil {
		rv.refuse(w, r, metrics.NotifyMalformed, http.StatusBadRequest, "body unreadable or over 64 KiB")
		return
	}
	if ts, err := strconv.ParseInt(r.Header.Get("Wechatpay-Timestamp"), 10, 64); err == nil {
		if d := start.Sub(time.Unix(ts, 0)); d >= rv.skew || d <= -rv.skew {
			rv.refuse(w, r, metrics.NotifyStale, http.StatusUnauthorized, "timestamp more than 5 minutes off")
			return
		}
	}
	r.Body = io.NopCloser(strings.NewReader(string(body)))
	var use CouponUse
	req, err := rv.handler.ParseNotifyRequest(r.Context(), r, &use)
	if err != nil {
		outcome, why := metrics.NotifyBadSig, "signature missing or not the WeChat Pay key's"
		// Classified by the start of the SDK's message only: the rest of a
		// signature error dumps the request, body included.
		msg := err.Error()
		switch {
		case strings.HasPrefix(msg, "invalid notification") && strings.Contains(msg, "expires, request-id"):
			outcome, why = metrics.NotifyStale, "timestamp more than 5 minutes off"
		case strings.HasPrefix(msg, "invalid notification"), strings.HasPrefix(msg, "unsupported Wechatpay-Signature-Type"):
		case strings.Contains(msg, " decrypt error"), strings.HasPrefix(msg, "possible invalid notification"):
			outcome, why = metrics.NotifyDecrypt, "resource does not decrypt under the APIv3 key"
		default: // parse request body, unmarshal plaintext
			outcome, why = metrics.NotifyMalformed, "body or resource is not the JSON expected"
		}
		rv.refuse(w, r, outcome, http.StatusUnauthorized, why)
		return
	}
	// Signed by WeChat: the same bytes again within the timestamp's window
	// are a replay, since each delivery is signed afresh.
	first, err := rv.store.FirstNonce(r.Context(), r.Header.Get("Wechatpay-Nonce"))
	if err != nil {
		rv.failed(w, req.ID, err)
		return
	}
	if !first {
		rv.refuse(w, r, metrics.NotifyReplay, http.StatusUnauthorized, "the same signed notification was received before")
		return
	}
	if req.EventType != EventCouponUse {
		rv.metrics.Notification(metrics.NotifyOther)
		rv.log.Info("notification of another event acknowledged", "notification_id", req.ID, "event_type", req.EventType)
		ok(w)
		return
	}
	red, err := use.Redemption(req.ID, idempotency.RedeemedByNotify)
	if err != nil {
		rv.refuse(w, r, metrics.NotifyMalformed, http.StatusBadRequest, err.Error())
		return
	}
	outcome, err := rv.record(r.Context(), use.StockID, red)
	if err != nil {
		rv.failed(w, req.ID, err)
		return
	}
	rv.metrics.Notification(outcome)
	rv.log.Debug("notification", "notification_id", req.ID, "coupon_id", red.CouponID, "outcome", outcome,
		"elapsed", rv.now().Sub(start))
	ok(w)
}

// record finds the coupon's send and records its redemption, returning
// the notification's outcome.
func (rv *Receiver) record(ctx context.Context, stockID string, red idempotency.Redemption) (string, error) {
	send, err := rv.find(ctx, stockID, red.CouponID)
	if errors.Is(err, idempotency.ErrNotOurs) {
		// Counted once per notification, however often WeChat sends it.
		first, err := rv.store.FirstNotification(ctx, red.NotificationID)
		if err != nil {
			return "", err
		}
		if first {
			if err := rv.store.CountRedeemStat(ctx, idempotency.StatNotOurs); err != nil {
				return "", err
			}
			rv.log.Info("a coupon not issued by any campaign of ours was used", "notification_id", red.NotificationID,
				"coupon_id", red.CouponID, "stock_id", stockID)
			return metrics.NotifyNotOurs, nil
		}
		return metrics.NotifyDuplicate, nil
	}
	if err != nil {
		return "", err
	}
	out, err := rv.store.Redeem(ctx, send.Send(), red)
	if errors.Is(err, idempotency.ErrNotOurs) {
		return metrics.NotifyNotOurs, nil
	}
	if err != nil {
		return "", err
	}
	if out.Duplicate {
		return metrics.NotifyDuplicate, nil
	}
	wait := time.Duration(0)
	if !out.SentAt.IsZero() {
		wait = red.ConsumeTime.Sub(out.SentAt)
	}
	rv.metrics.Redeemed(idempotency.RedeemedByNotify, wait)
	rv.log.Info("redemption recorded", "notification_id", red.NotificationID, "coupon_id", red.CouponID,
		"campaign", send.Campaign, "out_request_no", send.OutRequestNo, "consume_time", red.ConsumeTime,
		"amount", red.Amount, "time_to_redemption", wait.Round(time.Second))
	return metrics.NotifyRecorded, nil
}

// find looks the coupon up in the campaigns its stock was last found in,
// then in every campaign.
func (rv *Receiver) find(ctx context.Context, stockID, couponID string) (idempotency.CouponSend, error) {
	rv.mu.Lock()
	hint := rv.byStock[stockID]
	rv.mu.Unlock()
	if len(hint) > 0 {
		if s, err := rv.store.FindCoupon(ctx, couponID, hint); err == nil || !errors.Is(err, idempotency.ErrNotOurs) {
			return s, err
		}
	}
	s, err := rv.store.FindCoupon(ctx, couponID, nil)
	if err == nil && stockID != "" {
		rv.mu.Lock()
		if !contains(rv.byStock[stockID], s.Campaign) {
			rv.byStock[stockID] = append(rv.byStock[stockID], s.Campaign)
		}
		rv.mu.Unlock()
	}
	return s, err
}

func contains(list []string, v string) bool {
	for _, x := range list {
		if x == v {
			return true
		}
	}
	return false
}

// refuse answers a notification that is not WeChat's, or not readable,
// and logs why: never its content.
func (rv *Receiver) refuse(w http.ResponseWriter, r *http.Request, outcome string, status int, why string) {
	rv.metrics.Notification(outcome)
	if err := rv.store.CountRedeemStat(r.Context(), idempotency.StatRefused); err != nil {
		rv.log.Warn("counting a refused notification", "err", err)
	}
	rv.log.Warn("notification refused", "outcome", outcome, "reason", why, "remote", r.RemoteAddr,
		"request_id", r.Header.Get("Request-Id"))
	fail(w, status, why)
}

// failed answers a notification whose redemption could not be written: not
// acknowledged, so WeChat delivers it again.
func (rv *Receiver) failed(w http.ResponseWriter, id string, err error) {
	rv.metrics.Notification(metrics.NotifyError)
	rv.log.Error("notification not recorded; WeChat will deliver it again", "notification_id", id, "err", err)
	fail(w, http.StatusInternalServerError, "not recorded, deliver again")
}

// ok acknowledges: 200 with WeChat's success body (the docs accept 200 or
// 204; a body does no harm to either reading).
func ok(w http.ResponseWriter) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	_, _ = io.WriteString(w, `{"code":"SUCCESS","message":"成功"}`)
}

func fail(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	b, _ := json.Marshal(map[string]string{"code": "FAIL", "message": msg})
	_, _ = w.Write(b)
}
