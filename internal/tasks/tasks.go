// Package tasks defines the two kinds of send task, their payloads, and
// how producers create them. A payload holds exactly what the WeChat Pay
// call needs, so that every delivery of a task, and every retry, sends the
// same bytes under the same out_request_no.
package tasks

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"strconv"
	"strings"
	"time"

	"github.com/hibiken/asynq"

	"github.com/couponflow/dispatcher/internal/ratelimit"
	"github.com/couponflow/dispatcher/internal/wechat"
)

// Task type names, as asynq and its web UI show them.
const (
	TypeSendCoupon   = "coupon:send"
	TypeSendMultiuse = "multiuse:send"
)

// Version is the payload version this code writes. A worker refuses a
// payload of a version it does not know rather than guess at its fields.
const Version = 1

// DefaultQueue is where sends go unless a producer says otherwise.
const DefaultQueue = "coupons"

// ShardQueue spreads sends over shards queues named queue-0 … queue-(n-1),
// by a hash of key (the out_request_no). In Redis Cluster a queue lives on
// one node; a large campaign spread over several queues spreads over the
// nodes. With shards ≤ 1 it is queue itself.
func ShardQueue(queue string, shards int, key string) string {
	if shards <= 1 {
		return queue
	}
	h := fnv.New32a()
	h.Write([]byte(key))
	return fmt.Sprintf("%s-%d", queue, h.Sum32()%uint32(shards))
}

// ShardQueues lists the queues ShardQueue can return.
func ShardQueues(queue string, shards int) []string {
	if shards <= 1 {
		return []string{queue}
	}
	out := make([]string, shards)
	for i := range out {
		out[i] = fmt.Sprintf("%s-%d", queue, i)
	}
	return out
}

// WokenQueue is where sends that must not wait behind a queue's backlog
// go: sends held on a stock whose budget is back (enqueuer stock resume),
// and sends whose task asynq lost (the sweeper). Workers serve the woken
// queues from an asynq server of their own, sharing the worker's call
// slots with the queues' server, so that a woken send waits for a slot,
// not for the backlog, and an empty woken queue costs the queues' sends
// no Redis round trip.
func WokenQueue(queue string) string { return queue + "-woken" }

// WokenWeight is the weight of a woken queue relative to its queue's,
// among the woken queues of several shards.
const WokenWeight = 10

// MaxRetry bounds only failures that count (ambiguous outcomes: 5xx,
// timeouts, lost answers): waits on a rate limit or a budget are retried
// without counting, so that a MaxRetry is never what ends them. WeChat's
// docs say a resend under the same out_request_no settles a 5xx, and that
// 2 to 3 resends usually suffice (一般重试2~3次); 10 leaves room for a short
// incident: the worker's backoff (1s growing by half each time) spreads
// them over about two minutes. The send then ends unknown, and
// `enqueuer reconcile` settles it, rather than resending for a day a
// request that WeChat answers 5xx every time (a wrong stock_creator_mchid
// has been reported to come back as SYSTEM_ERROR).
const MaxRetry = 10

// Timeout bounds one attempt of a task (asynq's Timeout). Sends can wait
// on a budget for days; a task's own timeout only needs to cover one
// attempt.
const Timeout = 2 * time.Minute

// Common holds the fields every send has. It is embedded in each payload,
// so its fields sit at the top level of the JSON.
type Common struct {
	V            int       `json:"v"`
	Campaign     string    `json:"campaign"`
	MchID        string    `json:"mchid"`
	OpenID       string    `json:"openid"`
	StockID      string    `json:"stock_id"`
	OutRequestNo string    `json:"out_request_no"`
	AppID        string    `json:"appid"`
	Deadline     time.Time `json:"deadline"` // waits on an exhausted budget end here
}

// Base returns the common fields.
func (c Common) Base() Common { return c }

// Key identifies the send for idempotency: WeChat deduplicates by
// out_request_no per merchant, and so do we.
func (c Common) Key() Key { return Key{MchID: c.MchID, OutRequestNo: c.OutRequestNo} }

func (c Common) validate() error {
	if c.V != Version {
		return fmt.Errorf("payload version %d is not %d; upgrade the worker or re-enqueue", c.V, Version)
	}
	if err := ValidateCampaign(c.Campaign); err != nil {
		return err
	}
	if c.MchID == "" {
		return fmt.Errorf("mchid is empty")
	}
	if c.AppID == "" {
		return fmt.Errorf("appid is empty")
	}
	if c.Deadline.IsZero() {
		return fmt.Errorf("deadline is not set")
	}
	return nil
}

// ValidateCampaign checks a campaign name: it becomes part of Redis keys
// and of derived out_request_nos.
func ValidateCampaign(name string) error {
	if name == "" || len(name) > 64 || !wechat.OnlyAlnumOr(name, "_.-") {
		return fmt.Errorf("campaign %q must be 1-64 letters, digits, '_', '.' or '-'", name)
	}
	return nil
}

// SendCoupon is the payload of a cash-coupon (代金券) send.
type SendCoupon struct {
	Common
	StockCreatorMchID string `json:"stock_creator_mchid"`
	CouponValue       int64  `json:"coupon_value,omitempty"`
	CouponMinimum     int64  `json:"coupon_minimum,omitempty"`
}

// Kind is the asynq task type.
func (SendCoupon) Kind() string { return TypeSendCoupon }

// Request is the WeChat Pay call this task makes.
func (a SendCoupon) Request() wechat.SendCouponRequest {
	return wechat.SendCouponRequest{
		OpenID: a.OpenID, StockID: a.StockID, OutRequestNo: a.OutRequestNo, AppID: a.AppID,
		StockCreatorMchID: a.StockCreatorMchID, CouponValue: a.CouponValue, CouponMinimum: a.CouponMinimum,
	}
}

// Call sends the cash coupon.
func (a SendCoupon) Call(ctx context.Context, wx *wechat.Client) (string, error) {
	resp, err := wx.SendCoupon(ctx, a.Request())
	if err != nil {
		return "", err
	}
	return resp.CouponID, nil
}

// Validate checks every field the way WeChat will, and the fields of ours.
func (a SendCoupon) Validate() error {
	if err := a.Common.validate(); err != nil {
		return err
	}
	return a.Request().Validate()
}

// SendMultiuse is the payload of a consumer-fund (消费金) send. The
// recipient's name and ID card number are only ever held encrypted.
type SendMultiuse struct {
	Common
	Amount   int64                    `json:"amount,omitempty"` // 0: the stock's fixed amount
	CardType string                   `json:"card_type"`
	Identity wechat.EncryptedIdentity `json:"identity"`
}

// Kind is the asynq task type.
func (SendMultiuse) Kind() string { return TypeSendMultiuse }

// Request is the WeChat Pay call this task makes.
func (a SendMultiuse) Request() wechat.SendMultiuseRequest {
	return wechat.SendMultiuseRequest{
		OpenID: a.OpenID, StockID: a.StockID, OutRequestNo: a.OutRequestNo, AppID: a.AppID,
		Amount: a.Amount, CardType: a.CardType, Identity: a.Identity,
	}
}

// Call sends the consumer funds.
func (a SendMultiuse) Call(ctx context.Context, wx *wechat.Client) (string, error) {
	resp, err := wx.SendMultiuseCoupon(ctx, a.Request())
	if err != nil {
		return "", err
	}
	return resp.CouponID, nil
}

// Validate checks every field; the identity is checked for presence only,
// since its plaintext is not ours to see.
func (a SendMultiuse) Validate() error {
	if err := a.Common.validate(); err != nil {
		return err
	}
	if a.CardType == "" || a.Identity.KeyID == "" {
		return fmt.Errorf("card_type and identity.key_id must be set in the payload")
	}
	return a.Request().Validate(a.Identity.KeyID)
}

// Key names one send: a merchant and an out_request_no.
type Key struct {
	MchID        string
	OutRequestNo string
}

// TaskID is the asynq task id of a send, so that enqueueing the same send
// twice is reported as a conflict instead of queued twice:
// "send:<mchid>:<out_request_no>" with each "-" of the out_request_no
// written ".". asynqmon shows a task id only up to its first "-" (it
// takes ids for UUIDs), which made every row read "send:<mchid>:<mchid>";
// "." never occurs in an out_request_no (wechat.ValidateOutRequestNo), so
// the id still names exactly one send (ParseTaskID).
func (k Key) TaskID() string {
	return "send:" + k.MchID + ":" + strings.ReplaceAll(k.OutRequestNo, "-", ".")
}

// ParseTaskID is the Key a TaskID names; ok is false for an id of
// another form.
func ParseTaskID(id string) (k Key, ok bool) {
	rest, ok := strings.CutPrefix(id, "send:")
	if !ok {
		return Key{}, false
	}
	mch, no, ok := strings.Cut(rest, ":")
	if !ok || mch == "" || no == "" {
		return Key{}, false
	}
	return Key{MchID: mch, OutRequestNo: strings.ReplaceAll(no, ".", "-")}, true
}

// DeriveOutRequestNo gives a recipient of a campaign the same
// out_request_no on every run: the merchant id, then a hash of the
// campaign and the openid. 43 characters, all of WeChat's allowed set.
func DeriveOutRequestNo(mchID, campaign, openID string) string {
	sum := sha256.Sum256([]byte(mchID + "\x00" + campaign + "\x00" + openID))
	return mchID + "-" + hex.EncodeToString(sum[:16])
}

// Args is what both payload types have in common.
type Args interface {
	Kind() string
	Base() Common
	Key() Key
	Validate() error
	// Call makes the send's WeChat Pay call and returns the coupon id.
	Call(ctx context.Context, wx *wechat.Client) (couponID string, err error)
}

// Kind describes one kind of send beyond its payload type's methods. A
// new kind is a payload type (Request, Validate, Call), its entry in
// Kinds, and its call in internal/wechat: the worker registers, decodes
// and rate-limits every kind from here, and status and the monitor show
// each Endpoint's shared rate.
type Kind struct {
	// Type is asynq's task type, the payload's Kind().
	Type string
	// Endpoint is the WeChat Pay API the send calls, whose rate limit it
	// shares.
	Endpoint ratelimit.Endpoint
	decode   func(payload []byte) (Args, error)
}

// Kinds lists every kind of send.
var Kinds = []Kind{
	{Type: TypeSendCoupon, Endpoint: ratelimit.SendCoupon, decode: decodeAs[SendCoupon]},
	{Type: TypeSendMultiuse, Endpoint: ratelimit.SendMultiuse, decode: decodeAs[SendMultiuse]},
}

// Endpoints are the rate limits the kinds of send use, in Kinds' order.
func Endpoints() []ratelimit.Endpoint {
	out := make([]ratelimit.Endpoint, len(Kinds))
	for i, k := range Kinds {
		out[i] = k.Endpoint
	}
	return out
}

// KindOf is the kind whose task type is typ.
func KindOf(typ string) (Kind, bool) {
	for _, k := range Kinds {
		if k.Type == typ {
			return k, true
		}
	}
	return Kind{}, false
}

func decodeAs[A Args](payload []byte) (Args, error) {
	var a A
	err := json.Unmarshal(payload, &a)
	return a, err
}

// NewTask validates args and returns the task with its id, queue and retry
// bound set. Extra options (a queue, say) come after and win.
func NewTask(args Args, opts ...asynq.Option) (*asynq.Task, error) {
	if err := args.Validate(); err != nil {
		return nil, err
	}
	payload, err := json.Marshal(args)
	if err != nil {
		return nil, err
	}
	base := []asynq.Option{
		asynq.TaskID(args.Key().TaskID()),
		asynq.Queue(DefaultQueue),
		asynq.MaxRetry(MaxRetry),
		asynq.Timeout(Timeout),
	}
	return asynq.NewTask(args.Kind(), payload, append(base, opts...)...), nil
}

// Decode parses a payload of any kind and checks its fields.
func Decode(t *asynq.Task) (Args, error) {
	k, ok := KindOf(t.Type())
	if !ok {
		return nil, fmt.Errorf("unknown task type %q", t.Type())
	}
	args, err := k.decode(t.Payload())
	if err != nil {
		return nil, fmt.Errorf("%s payload: %w", t.Type(), err)
	}
	if err := args.Validate(); err != nil {
		return nil, fmt.Errorf("%s payload: %w", t.Type(), err)
	}
	return args, nil
}

// Keep is a task as one value that outlives asynq's copy (the record of
// an unknown send keeps it for reconcile): its type, a newline, its payload.
func Keep(t *asynq.Task) []byte {
	return append([]byte(t.Type()+"\n"), t.Payload()...)
}

// Kept is the task Keep returned.
func Kept(b []byte) (*asynq.Task, error) {
	typ, payload, ok := bytes.Cut(b, []byte("\n"))
	if !ok {
		return nil, fmt.Errorf("a kept task must be its type, a newline and its payload; got %d bytes without a newline", len(b))
	}
	return asynq.NewTask(string(typ), payload), nil
}

// Requeue is a kept task made ready to queue again in queue, with the id
// and bounds NewTask gives; opts (the original task's MaxRetry, where it is
// known) come after and win.
func Requeue(kept []byte, queue string, opts ...asynq.Option) (*asynq.Task, error) {
	t, err := Kept(kept)
	if err != nil {
		return nil, err
	}
	args, err := Decode(t)
	if err != nil {
		return nil, err
	}
	return NewTask(args, append([]asynq.Option{asynq.Queue(queue)}, opts...)...)
}

// A record keeps its send's task until the send is settled, and most
// sends are pending for most of their life. A kept task of ~300 bytes
// turns the record's hash into Redis's hashtable encoding (any value over
// hash-max-listpack-value, 64 bytes by default), which costs about three
// times the listpack's memory. So a cash-coupon task is kept slim: only
// what the record does not hold already (campaign, mchid, openid,
// stock_id and out_request_no are the record's own), in one short value
// without a newline, which Kept tasks always have.

// slimFields separates a slim task's fields; none of them may hold it.
// sameMchID stands for a stock creator that is the sending merchant, as
// it most often is.
const (
	slimFields = "|"
	sameMchID  = "="
)

// slimTime writes t in as few bytes as give it back to the nanosecond
// and with its offset (as JSON writes it): Unix seconds, nanoseconds if
// any, and the offset in seconds, "1796322699@28800". RFC 3339 takes 20
// to 35 bytes, which pushed a slim task with a coupon value past
// hash-max-listpack-value.
func slimTime(t time.Time) string {
	s := strconv.FormatInt(t.Unix(), 10)
	if ns := t.Nanosecond(); ns != 0 {
		s += "." + fmt.Sprintf("%09d", ns)
	}
	_, off := t.Zone()
	return s + "@" + strconv.Itoa(off)
}

// unslimTime reads slimTime's form.
func unslimTime(s string) (time.Time, error) {
	at, off, ok := strings.Cut(s, "@")
	if !ok {
		return time.Time{}, fmt.Errorf("%q is not seconds@offset", s)
	}
	secs, nanos, _ := strings.Cut(at, ".")
	sec, err1 := strconv.ParseInt(secs, 10, 64)
	ns, err2 := int64(0), error(nil)
	if nanos != "" {
		ns, err2 = strconv.ParseInt(nanos, 10, 64)
	}
	o, err3 := strconv.Atoi(off)
	if err := errors.Join(err1, err2, err3); err != nil {
		return time.Time{}, fmt.Errorf("%q: %w", s, err)
	}
	return time.Unix(sec, ns).In(time.FixedZone("", o)), nil
}

// KeepSlim is Keep(t) for the task NewTask made of args, slimmed when
// args is a SendCoupon whose slim form gives back exactly t's bytes, and
// Keep(t) itself otherwise. Unslim reverses it.
func KeepSlim(args Args, t *asynq.Task) []byte {
	full := Keep(t)
	a, ok := args.(SendCoupon)
	if !ok {
		return full
	}
	for _, f := range []string{a.AppID, a.StockCreatorMchID} {
		if strings.ContainsAny(f, slimFields+"\n") || f == sameMchID {
			return full
		}
	}
	creator := a.StockCreatorMchID
	if creator == a.MchID && creator != "" {
		creator = sameMchID
	}
	slim := strings.Join([]string{strconv.Itoa(a.V), a.AppID, slimTime(a.Deadline), creator,
		strconv.FormatInt(a.CouponValue, 10), strconv.FormatInt(a.CouponMinimum, 10)}, slimFields)
	c := a.Common
	if kept, err := Unslim([]byte(slim), c.Campaign, c.MchID, c.OpenID, c.StockID, c.OutRequestNo); err != nil || !bytes.Equal(kept, full) {
		return full
	}
	return []byte(slim)
}

// Unslim is the kept task (as Keep writes it) of a task KeepSlim kept,
// given what the record holds; a kept task that is not slim is returned
// as it is.
func Unslim(kept []byte, campaign, mchID, openID, stockID, outRequestNo string) ([]byte, error) {
	if bytes.IndexByte(kept, '\n') >= 0 {
		return kept, nil
	}
	f := strings.Split(string(kept), slimFields)
	if len(f) != 6 {
		return nil, fmt.Errorf("a slim kept task has 6 fields; got %d", len(f))
	}
	v, err := strconv.Atoi(f[0])
	if err != nil {
		return nil, fmt.Errorf("slim kept task: version %q", f[0])
	}
	deadline, err := unslimTime(f[2])
	if err != nil {
		return nil, fmt.Errorf("slim kept task: deadline: %w", err)
	}
	if f[3] == sameMchID {
		f[3] = mchID
	}
	value, err1 := strconv.ParseInt(f[4], 10, 64)
	minimum, err2 := strconv.ParseInt(f[5], 10, 64)
	if err1 != nil || err2 != nil {
		return nil, fmt.Errorf("slim kept task: coupon value %q and minimum %q", f[4], f[5])
	}
	payload, err := json.Marshal(SendCoupon{
		Common: Common{V: v, Campaign: campaign, MchID: mchID, OpenID: openID, StockID: stockID,
			OutRequestNo: outRequestNo, AppID: f[1], Deadline: deadline},
		StockCreatorMchID: f[3], CouponValue: value, CouponMinimum: minimum,
	})
	if err != nil {
		return nil, err
	}
	return append([]byte(TypeSendCoupon+"\n"), payload...), nil
}
