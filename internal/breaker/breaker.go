// Package breaker stops calls to WeChat for a stock whose budget is gone.
// The first NOT_ENOUGH opens the stock's breaker in Redis; every worker
// then holds that stock's sends without calling, while one probe call at
// growing intervals (30s doubling to 10m by default) finds out whether the
// budget is back. Other stocks are not affected. A daily budget's
// NOT_ENOUGH says when it ends (00:00 China time): the probe waits for it.
//
// One more breaker per merchant (stock id Merchant) stops every call of
// the merchant while WeChat refuses its signature (SIGN_ERROR: a clock, a
// key or a serial is wrong), with the same probes.
package breaker

import (
	"context"
	_ "embed"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/keyspace"
)

//go:embed breaker.lua
var lua string
var script = redis.NewScript(lua)

// Breakers is the set of breakers of all stocks.
type Breakers struct {
	rdb        redis.UniversalClient
	keys       keyspace.Keys
	first, max time.Duration
	probeLease time.Duration
	now        func() time.Time
	closed     closedCache
}

// closedCache remembers, for a while, which stocks Check found closed (their
// merchant's breaker too), so that the common case costs no round trip. A
// breaker opened meanwhile by another worker is not seen until the entry
// ages out, or until this process trips a breaker itself: the calls made
// in between get WeChat's refusal (NOT_ENOUGH, SIGN_ERROR), which issues
// nothing, and the first such answer this process records empties the cache.
type closedCache struct {
	ttl   time.Duration // 0: no cache
	mu    sync.Mutex
	gen   uint64 // bumped by every Trip, so that a Check begun before it stores nothing
	until map[string]time.Time
}

func (c *closedCache) hit(key string, now time.Time) (gen uint64, ok bool) {
	if c.ttl <= 0 {
		return 0, false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.gen, now.Before(c.until[key])
}

func (c *closedCache) store(key string, gen uint64, now time.Time) {
	if c.ttl <= 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.gen != gen {
		return
	}
	if len(c.until) >= 1024 {
		// Stocks come and go with campaigns: drop the stale entries.
		for k, t := range c.until {
			if !now.Before(t) {
				delete(c.until, k)
			}
		}
	}
	c.until[key] = now.Add(c.ttl)
}

func (c *closedCache) forget() {
	if c.ttl <= 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen++
	clear(c.until)
}

// Option configures Breakers.
type Option func(*Breakers)

// WithProbeInterval sets the first and the longest interval between probes.
func WithProbeInterval(first, max time.Duration) Option {
	return func(b *Breakers) { b.first, b.max = first, max }
}

// WithKeys sets the key layout (default keyspace.Default).
func WithKeys(k keyspace.Keys) Option { return func(b *Breakers) { b.keys = k } }

// WithClosedCache lets Check answer Closed from memory for d after Redis
// last said a stock's breaker (and its merchant's) was closed, saving a
// round trip per send. The price: for up to d after another process opens
// a breaker, this one keeps calling, until its first refusal from WeChat
// (recorded through Trip) makes it ask Redis again. Open breakers are never
// cached: a held send is held by what Redis says.
func WithClosedCache(d time.Duration) Option {
	return func(b *Breakers) { b.closed.ttl = d }
}

// New returns the breakers kept in rdb.
func New(rdb redis.UniversalClient, opts ...Option) *Breakers {
	b := &Breakers{rdb: rdb, keys: keyspace.Default, first: 30 * time.Second, max: 10 * time.Minute,
		probeLease: time.Minute, now: time.Now, closed: closedCache{until: map[string]time.Time{}}}
	for _, o := range opts {
		o(b)
	}
	return b
}

// Merchant, as a stock id, names the merchant's own breaker.
const Merchant = ""

// A stock's breaker, its merchant's set of open breakers and the
// merchant's breaker share the hash tag {mchid}, so the script reads and
// changes them in one atomic step.
func (b *Breakers) key(mchID, stockID string) string {
	if stockID == Merchant {
		return b.keys.MerchantBreaker(mchID)
	}
	return b.keys.Breaker(mchID, stockID)
}

func (b *Breakers) setKey(mchID string) string { return b.keys.OpenBreakers(mchID) }

// Verdict is what Check decided.
type Verdict int

const (
	Closed Verdict = iota // call
	Probe                 // call: this is the one probe; report its outcome
	Hold                  // do not call before Until
)

// Decision is Check's answer.
type Decision struct {
	Verdict Verdict
	Until   time.Time // for Hold
	// Reason is WeChat's answer that opened the breaker, "CODE: message"
	// (for Hold): NOT_ENOUGH, a stock that is paused or not active, or
	// SIGN_ERROR.
	Reason string
	// Merchant: the merchant's breaker decided (SIGN_ERROR), not the
	// stock's. A probe's outcome goes to that breaker (stock id Merchant).
	Merchant bool
}

// Check says whether a send of the stock may call WeChat now.
func (b *Breakers) Check(ctx context.Context, mchID, stockID string) (Decision, error) {
	key := mchID + "\x00" + stockID
	gen, ok := b.closed.hit(key, b.now())
	if ok {
		return Decision{Verdict: Closed}, nil
	}
	r, err := b.run(ctx, mchID, stockID, "check", "", time.Time{})
	if err != nil {
		return Decision{}, err
	}
	switch r.verdict {
	case "hold":
		return Decision{Verdict: Hold, Until: r.at, Reason: r.reason, Merchant: r.merchant}, nil
	case "probe":
		return Decision{Verdict: Probe, Merchant: r.merchant}, nil
	}
	b.closed.store(key, gen, b.now())
	return Decision{Verdict: Closed}, nil
}

// Exhausted records a NOT_ENOUGH: it opens the breaker, or, after a probe,
// doubles the interval to the next one. It returns when the next probe is.
func (b *Breakers) Exhausted(ctx context.Context, mchID, stockID string, probe bool) (time.Time, error) {
	return b.Trip(ctx, mchID, stockID, probe, "NOT_ENOUGH", time.Time{})
}

// Trip is Exhausted for any answer that says the stock (or, for stock id
// Merchant, the merchant) cannot call now: reason, "CODE: message", is
// what held sends are told. until, if not zero, is when the cause ends by
// itself (a daily budget): the next probe waits for it instead of
// probing at growing intervals until then.
func (b *Breakers) Trip(ctx context.Context, mchID, stockID string, probe bool, reason string, until time.Time) (time.Time, error) {
	// Forgotten before the breaker is written, so that no Check of this
	// process answers Closed from memory once it has.
	b.closed.forget()
	op := "exhausted"
	if probe {
		op = "exhausted_probe"
	}
	r, err := b.run(ctx, mchID, stockID, op, reason, until)
	return r.at, err
}

// Abandon gives up a probe that learned nothing about the budget (it was
// not sent, or its answer was a rate limit or ambiguous), so that another
// send can probe at once instead of after the probe's lease.
func (b *Breakers) Abandon(ctx context.Context, mchID, stockID string) error {
	_, err := b.run(ctx, mchID, stockID, "abandon", "", time.Time{})
	return err
}

// Succeeded records that a send of the stock went through: the budget is
// there, so the breaker closes.
func (b *Breakers) Succeeded(ctx context.Context, mchID, stockID string) error {
	return b.Resume(ctx, mchID, stockID)
}

// Resume closes the breaker at once, after a top-up.
func (b *Breakers) Resume(ctx context.Context, mchID, stockID string) error {
	_, err := b.run(ctx, mchID, stockID, "success", "", time.Time{})
	return err
}

// State is a breaker as status shows it.
type State struct {
	StockID   string // Merchant for the merchant's breaker
	Open      bool
	OpenedAt  time.Time
	NextProbe time.Time
	Interval  time.Duration
	Probes    int
	Reason    string // WeChat's answer that opened it, "CODE: message"
}

// Status reads a stock's breaker.
func (b *Breakers) Status(ctx context.Context, mchID, stockID string) (State, error) {
	m, err := b.rdb.HGetAll(ctx, b.key(mchID, stockID)).Result()
	if err != nil {
		return State{}, fmt.Errorf("breaker: %w", err)
	}
	st := State{StockID: stockID, Open: len(m) > 0}
	if st.Open {
		st.OpenedAt = ms(m["opened_ms"])
		st.NextProbe = ms(m["next_ms"])
		iv, _ := strconv.ParseInt(m["interval_ms"], 10, 64)
		st.Interval = time.Duration(iv) * time.Millisecond
		st.Probes, _ = strconv.Atoi(m["probes"])
		st.Reason = m["reason"]
	}
	return st, nil
}

// Open lists a merchant's open breakers: its own first, then its stocks'.
func (b *Breakers) Open(ctx context.Context, mchID string) ([]State, error) {
	ids, err := b.rdb.SMembers(ctx, b.setKey(mchID)).Result()
	if err != nil {
		return nil, fmt.Errorf("breaker: %w", err)
	}
	var out []State
	for _, id := range append([]string{Merchant}, ids...) {
		st, err := b.Status(ctx, mchID, id)
		if err != nil {
			return nil, err
		}
		if st.Open {
			out = append(out, st)
		}
	}
	return out, nil
}

type result struct {
	verdict  string
	at       time.Time
	reason   string
	merchant bool
}

func (b *Breakers) run(ctx context.Context, mchID, stockID, op, reason string, until time.Time) (result, error) {
	var untilMs int64
	if !until.IsZero() {
		untilMs = until.UnixMilli()
	}
	res, err := script.Run(ctx, b.rdb, []string{b.key(mchID, stockID), b.setKey(mchID), b.keys.MerchantBreaker(mchID)},
		op, b.now().UnixMilli(), b.first.Milliseconds(), b.max.Milliseconds(), b.probeLease.Milliseconds(),
		stockID, reason, untilMs).Slice()
	if err != nil {
		return result{}, fmt.Errorf("breaker: %s %s: %w", op, stockID, err)
	}
	var r result
	r.verdict, _ = res[0].(string)
	at, _ := res[1].(int64)
	r.at = time.UnixMilli(at)
	if len(res) > 2 {
		r.reason, _ = res[2].(string)
	}
	if len(res) > 3 {
		scope, _ := res[3].(string)
		r.merchant = scope == "merchant"
	}
	return r, nil
}

func ms(s string) time.Time {
	n, _ := strconv.ParseInt(s, 10, 64)
	return time.UnixMilli(n)
}
