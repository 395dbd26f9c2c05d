// Package notify says once, across the fleet, that a campaign is done:
// its enqueue has finished and nothing is left for the workers (every send
// succeeded, failed, was cancelled, or is unknown and waits for reconcile). The first worker to
// see it marks the campaign done in Redis with HSETNX, so that one worker
// only logs it, counts it and, if the campaign asked for it (enqueuer
// campaign --notify-url), queues a webhook. The webhook's state lives in
// the campaign's record, so any worker delivers it, with retries, after
// the one that saw the end has died; it never holds up a send.
package notify

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/keyspace"
)

// EnvSecret names the variable that holds the webhook's HMAC secret.
const EnvSecret = "COUPONFLOW_NOTIFY_SECRET"

// SignatureHeader carries "t=<unix seconds>,v1=<hex HMAC-SHA256 of
// "<t>.<body>" under the secret>", as Stripe signs its webhooks: the
// timestamp lets a receiver refuse a replay.
const SignatureHeader = "X-Couponflow-Signature"

// DeliveryHeader names the event; it is the same on every retry, so a
// receiver can drop a duplicate.
const DeliveryHeader = "X-Couponflow-Delivery"

// Summary is what the webhook posts, as JSON.
type Summary struct {
	Event        string           `json:"event"` // "campaign.done"
	Campaign     string           `json:"campaign"`
	MchID        string           `json:"mchid"`
	DoneAt       time.Time        `json:"done_at"`
	Control      string           `json:"control,omitempty"` // "cancelled" if an operator cancelled it
	Total        int64            `json:"total"`
	Succeeded    int64            `json:"succeeded"`
	Failed       int64            `json:"failed"`
	Unknown      int64            `json:"unknown"`
	Cancelled    int64            `json:"cancelled"`
	FailedByCode map[string]int64 `json:"failed_by_code"`
}

// Notifier watches the campaigns of one Redis.
type Notifier struct {
	rdb      redis.UniversalClient
	store    *idempotency.Store
	keys     keyspace.Keys
	log      *slog.Logger
	client   *http.Client
	secret   []byte
	every    time.Duration
	attempts int
	onDone   func(Summary)
	now      func() time.Time
	owner    string
}

// Option configures a Notifier.
type Option func(*Notifier)

// WithInterval sets how often campaigns are looked at (default 2s).
func WithInterval(d time.Duration) Option { return func(n *Notifier) { n.every = d } }

// WithSecret sets the webhook's HMAC secret (default: $COUPONFLOW_NOTIFY_SECRET).
func WithSecret(s []byte) Option { return func(n *Notifier) { n.secret = s } }

// WithLogger sets the logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option { return func(n *Notifier) { n.log = l } }

// WithOnDone calls f once per campaign, on the worker that saw it done
// (a metric).
func WithOnDone(f func(Summary)) Option { return func(n *Notifier) { n.onDone = f } }

// WithHTTPClient sets the webhook's client (default: 10s timeout).
func WithHTTPClient(c *http.Client) Option { return func(n *Notifier) { n.client = c } }

// WithAttempts bounds the deliveries of one webhook (default 12: about an
// hour of backoff).
func WithAttempts(k int) Option { return func(n *Notifier) { n.attempts = k } }

// New returns a notifier over store's Redis and key layout.
func New(rdb redis.UniversalClient, store *idempotency.Store, opts ...Option) *Notifier {
	var b [8]byte
	_, _ = rand.Read(b[:])
	n := &Notifier{rdb: rdb, store: store, keys: store.Keys(), log: slog.Default(),
		client: &http.Client{Timeout: 10 * time.Second}, every: 2 * time.Second, attempts: 12, now: time.Now,
		owner: hex.EncodeToString(b[:])}
	for _, o := range opts {
		o(n)
	}
	return n
}

// Run looks at the campaigns every interval until ctx ends.
func (n *Notifier) Run(ctx context.Context) {
	t := time.NewTicker(n.every)
	defer t.Stop()
	for {
		if err := n.Once(ctx); err != nil && ctx.Err() == nil {
			n.log.Warn("looking for finished campaigns failed; trying again", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Once looks at every campaign once: says which are newly done, and
// delivers the webhooks that are due.
func (n *Notifier) Once(ctx context.Context) error {
	names, err := n.store.Campaigns(ctx)
	if err != nil {
		return err
	}
	for _, name := range names {
		if err := n.campaign(ctx, name); err != nil {
			return err
		}
	}
	return nil
}

func (n *Notifier) campaign(ctx context.Context, name string) error {
	meta := n.keys.Meta(name)
	m, err := n.rdb.HMGet(ctx, meta, "done_at", "notify_url", "notify_status", "notify_next", "mchid", "enqueuing").Result()
	if err != nil {
		return err
	}
	if m[4] == nil {
		return nil // no such campaign (any more)
	}
	if m[0] == nil && m[5] == nil {
		st, err := n.store.Status(ctx, name)
		if err != nil || !st.Done() {
			return err
		}
		now := n.now()
		won, err := n.rdb.HSetNX(ctx, meta, "done_at", now.UnixMilli()).Result()
		if err != nil || !won {
			return err
		}
		ctl, _ := n.store.ControlOf(ctx, name)
		s := summaryOf(name, str(m[4]), now, st, ctl)
		n.log.Info("campaign done: nothing is left for the workers", "campaign", name, "total", s.Total, "succeeded", s.Succeeded,
			"failed", s.Failed, "unknown", s.Unknown, "cancelled", s.Cancelled, "failed_by_code", s.FailedByCode)
		if n.onDone != nil {
			n.onDone(s)
		}
		if str(m[1]) == "" {
			return nil
		}
		body, _ := json.Marshal(s)
		_, err = n.rdb.HSet(ctx, meta, "notify_status", "pending", "notify_next", 0, "notify_body", body, "notify_attempts", 0).Result()
		m[2], m[3] = "pending", "0"
		if err != nil {
			return err
		}
	}
	if str(m[2]) != "pending" {
		return nil
	}
	if next, _ := strconv.ParseInt(str(m[3]), 10, 64); next > n.now().UnixMilli() {
		return nil
	}
	return n.deliver(ctx, name, str(m[1]))
}

// deliver posts a due webhook, under a lease so that two workers do not
// post it at the same time, and records the outcome.
func (n *Notifier) deliver(ctx context.Context, name, url string) error {
	meta := n.keys.Meta(name)
	lock := n.keys.NotifyLock(name)
	ok, err := n.rdb.SetNX(ctx, lock, n.owner, 30*time.Second).Result()
	if err != nil || !ok {
		return err
	}
	defer n.rdb.Del(context.WithoutCancel(ctx), lock)
	v, err := n.rdb.HMGet(ctx, meta, "notify_status", "notify_body", "notify_attempts", "done_at").Result()
	if err != nil || str(v[0]) != "pending" {
		return err
	}
	body := []byte(str(v[1]))
	attempt, _ := strconv.Atoi(str(v[2]))
	attempt++
	status, perr := n.post(ctx, url, body, name+":"+str(v[3]))
	if perr == nil && status/100 == 2 {
		n.log.Info("campaign done: webhook delivered", "campaign", name, "url", url, "attempt", attempt, "status", status)
		return n.rdb.HSet(ctx, meta, "notify_status", "delivered", "notify_attempts", attempt, "notify_delivered_at", n.now().UnixMilli()).Err()
	}
	why := fmt.Sprintf("HTTP %d", status)
	if perr != nil {
		why = perr.Error()
	}
	if len(n.secret) == 0 || attempt >= n.attempts {
		n.log.Error("campaign done: the webhook was not delivered and is given up", "campaign", name, "url", url, "attempts", attempt, "last", why)
		return n.rdb.HSet(ctx, meta, "notify_status", "failed", "notify_attempts", attempt, "notify_error", why).Err()
	}
	next := n.now().Add(delay(attempt))
	n.log.Warn("campaign done: the webhook failed; it will be posted again", "campaign", name, "url", url, "attempt", attempt, "next", next, "last", why)
	return n.rdb.HSet(ctx, meta, "notify_attempts", attempt, "notify_next", next.UnixMilli(), "notify_error", why).Err()
}

func (n *Notifier) post(ctx context.Context, url string, body []byte, delivery string) (int, error) {
	if len(n.secret) == 0 {
		return 0, fmt.Errorf("no webhook secret: set %s on the workers, so that the receiver can tell the post is ours", EnvSecret)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return 0, err
	}
	ts := strconv.FormatInt(n.now().Unix(), 10)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set(SignatureHeader, "t="+ts+",v1="+Sign(n.secret, ts, body))
	req.Header.Set(DeliveryHeader, delivery)
	resp, err := n.client.Do(req)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}

// Sign is the v1 signature of body sent at ts: what a receiver computes
// to check SignatureHeader.
func Sign(secret []byte, ts string, body []byte) string {
	mac := hmac.New(sha256.New, secret)
	mac.Write([]byte(ts + "."))
	mac.Write(body)
	return hex.EncodeToString(mac.Sum(nil))
}

// delay is the wait after the nth failed delivery: 5s doubling to 10m.
func delay(n int) time.Duration {
	b := backoff.NewExponentialBackOff()
	b.InitialInterval, b.Multiplier, b.MaxInterval, b.MaxElapsedTime = 5*time.Second, 2, 10*time.Minute, 0
	b.Reset()
	d := b.NextBackOff()
	for i := 1; i < n; i++ {
		d = b.NextBackOff()
	}
	return d
}

func summaryOf(name, mchID string, at time.Time, st idempotency.Status, ctl idempotency.Control) Summary {
	return Summary{Event: "campaign.done", Campaign: name, MchID: mchID, DoneAt: at.UTC(), Control: string(ctl),
		Total: st.Total, Succeeded: st.ByState[idempotency.Succeeded], Failed: st.ByState[idempotency.Failed],
		Unknown: st.ByState[idempotency.Unknown], Cancelled: st.ByState[idempotency.Cancelled], FailedByCode: st.FailedByCode}
}

func str(v any) string {
	s, _ := v.(string)
	return s
}
