// Package ratelimit is one rate limit shared by every worker through
// Redis, per merchant and endpoint, because WeChat Pay counts calls per
// merchant, not per worker. The algorithm is GCRA (go-redis/redis_rate);
// on top of it the rate adapts: when WeChat answers 429 anyway, the shared
// rate halves for every worker at once, then grows back linearly.
package ratelimit

import (
	"context"
	_ "embed"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/go-redis/redis_rate/v10"
	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/keyspace"
)

// Endpoint names a WeChat Pay API with a limit of its own.
type Endpoint string

const (
	SendCoupon   Endpoint = "favor_send"    // POST /v3/marketing/favor/users/{openid}/coupons
	SendMultiuse Endpoint = "multiuse_send" // POST /v3/multiuse/users/{openid}/coupons
	ListCoupons  Endpoint = "favor_list"    // GET /v3/marketing/favor/users/{openid}/coupons
)

// Limit is a number of calls per period.
type Limit struct {
	N   float64
	Per time.Duration
}

// PerSecond is the limit as calls per second.
func (l Limit) PerSecond() float64 { return l.N / l.Per.Seconds() }

func (l Limit) String() string {
	switch l.Per {
	case time.Second:
		return strconv.FormatFloat(l.N, 'f', -1, 64) + "/s"
	case time.Minute:
		return strconv.FormatFloat(l.N, 'f', -1, 64) + "/m"
	}
	return fmt.Sprintf("%g/%s", l.N, l.Per)
}

// Defaults are WeChat Pay's published limits: 500/s for sending cash
// coupons, 1,000/min for consumer funds, 500/s per IP for listing.
var Defaults = map[Endpoint]Limit{
	SendCoupon:   {500, time.Second},
	SendMultiuse: {1000, time.Minute},
	ListCoupons:  {500, time.Second},
}

// ParseLimits reads "favor_send=500/s,multiuse_send=1000/m" into a copy of
// Defaults with those entries replaced.
func ParseLimits(s string) (map[Endpoint]Limit, error) {
	out := map[Endpoint]Limit{}
	for k, v := range Defaults {
		out[k] = v
	}
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		name, spec, ok := strings.Cut(part, "=")
		ep := Endpoint(strings.TrimSpace(name))
		if _, known := Defaults[ep]; !ok || !known {
			return nil, fmt.Errorf("rate limit %q: want endpoint=N/s or N/m with endpoint one of favor_send, multiuse_send, favor_list", part)
		}
		num, unit, ok := strings.Cut(spec, "/")
		n, err := strconv.ParseFloat(num, 64)
		per := map[string]time.Duration{"s": time.Second, "m": time.Minute}[unit]
		if !ok || err != nil || n <= 0 || per == 0 {
			return nil, fmt.Errorf("rate limit %q: want a positive number per s or m, like 500/s", part)
		}
		out[ep] = Limit{n, per}
	}
	return out, nil
}

//go:embed aimd.lua
var aimdLua string
var aimdScript = redis.NewScript(aimdLua)

// Limiter hands out call slots. It is safe for concurrent use.
type Limiter struct {
	rdb    redis.UniversalClient
	gcra   *redis_rate.Limiter
	limits map[Endpoint]Limit
	keys   keyspace.Keys

	decrease  float64       // factor applied on a 429
	recovery  time.Duration // time to grow from 0 back to the configured rate
	cooldown  time.Duration // one decrease per cooldown, however many 429s
	cacheFor  time.Duration
	floorFrac float64

	mu    sync.Mutex
	cache map[string]cached
	turns map[string]chan struct{}
	now   func() time.Time
}

func (l *Limiter) turn(mchID string, ep Endpoint) chan struct{} {
	key := l.key(mchID, ep)
	l.mu.Lock()
	defer l.mu.Unlock()
	t, ok := l.turns[key]
	if !ok {
		t = make(chan struct{}, 1)
		l.turns[key] = t
	}
	return t
}

func (l *Limiter) cachedRate(mchID string, ep Endpoint) float64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	if c, ok := l.cache[l.key(mchID, ep)]; ok {
		return c.rate
	}
	return l.limits[ep].PerSecond()
}

type cached struct {
	rate float64
	at   time.Time
}

// Option configures a Limiter.
type Option func(*Limiter)

// WithLimits replaces the limits (see ParseLimits).
func WithLimits(m map[Endpoint]Limit) Option { return func(l *Limiter) { l.limits = m } }

// WithRecovery sets how fast the rate grows back after a decrease: the time
// it would take to grow from zero to the configured limit (default 30s).
func WithRecovery(d time.Duration) Option { return func(l *Limiter) { l.recovery = d } }

// WithKeys sets the key layout (default keyspace.Default).
func WithKeys(k keyspace.Keys) Option { return func(l *Limiter) { l.keys = k } }

// New returns a limiter sharing its state through rdb.
func New(rdb redis.UniversalClient, opts ...Option) *Limiter {
	l := &Limiter{
		rdb: rdb, gcra: redis_rate.NewLimiter(unprefixed{rdb}), limits: Defaults, keys: keyspace.Default,
		decrease: 0.5, recovery: 30 * time.Second, cooldown: time.Second, cacheFor: 200 * time.Millisecond,
		floorFrac: 0.01, cache: map[string]cached{}, turns: map[string]chan struct{}{}, now: time.Now,
	}
	for _, o := range opts {
		o(l)
	}
	return l
}

// Limit is the configured limit of an endpoint.
func (l *Limiter) Limit(ep Endpoint) Limit { return l.limits[ep] }

// The key carries a hash tag, so that in Redis Cluster both of a limit's
// keys live on one slot.
func (l *Limiter) key(mchID string, ep Endpoint) string { return l.keys.Limiter(mchID, string(ep)) }

// unprefixed hands redis_rate's scripts our key as it is: redis_rate v10
// puts its own "rate:" in front of every key (a constant, with no option),
// which would land the GCRA state outside our prefix and layout.
type unprefixed struct{ redis.UniversalClient }

func stripRate(keys []string) []string {
	out := make([]string, len(keys))
	for i, k := range keys {
		out[i] = strings.TrimPrefix(k, "rate:")
	}
	return out
}

func (u unprefixed) Eval(ctx context.Context, script string, keys []string, args ...any) *redis.Cmd {
	return u.UniversalClient.Eval(ctx, script, stripRate(keys), args...)
}
func (u unprefixed) EvalSha(ctx context.Context, sha1 string, keys []string, args ...any) *redis.Cmd {
	return u.UniversalClient.EvalSha(ctx, sha1, stripRate(keys), args...)
}
func (u unprefixed) EvalRO(ctx context.Context, script string, keys []string, args ...any) *redis.Cmd {
	return u.UniversalClient.EvalRO(ctx, script, stripRate(keys), args...)
}
func (u unprefixed) EvalShaRO(ctx context.Context, sha1 string, keys []string, args ...any) *redis.Cmd {
	return u.UniversalClient.EvalShaRO(ctx, sha1, stripRate(keys), args...)
}
func (u unprefixed) Del(ctx context.Context, keys ...string) *redis.IntCmd {
	return u.UniversalClient.Del(ctx, stripRate(keys)...)
}

// TooLong is returned by Wait when the next slot is further away than the
// caller wanted to wait; RetryAfter says when to come back.
type TooLong struct{ RetryAfter time.Duration }

func (e *TooLong) Error() string {
	return fmt.Sprintf("ratelimit: next slot in %s", e.RetryAfter.Round(time.Millisecond))
}

// Wait takes a slot for one call, sleeping for it if it comes within
// maxWait, and returns how long it waited. Take the slot before signing: a
// signature costs CPU and expires, a slot only costs a round trip.
func (l *Limiter) Wait(ctx context.Context, mchID string, ep Endpoint, maxWait time.Duration) (time.Duration, error) {
	start := l.now()
	// One caller per process asks Redis at a time; the others queue here,
	// first come first served. Without this every waiter wakes for every
	// slot and all but one ask Redis in vain.
	turn := l.turn(mchID, ep)
	select {
	case turn <- struct{}{}:
	default:
		timer := time.NewTimer(maxWait)
		select {
		case turn <- struct{}{}:
			timer.Stop()
		case <-timer.C:
			return l.now().Sub(start), &TooLong{RetryAfter: time.Duration(float64(time.Second) / math.Max(l.cachedRate(mchID, ep), 0.001))}
		case <-ctx.Done():
			timer.Stop()
			return l.now().Sub(start), ctx.Err()
		}
	}
	defer func() { <-turn }()
	for {
		rate, err := l.Rate(ctx, mchID, ep)
		if err != nil {
			return l.now().Sub(start), err
		}
		res, err := l.gcra.Allow(ctx, l.key(mchID, ep), gcraLimit(rate))
		if err != nil {
			return l.now().Sub(start), fmt.Errorf("ratelimit: %w", err)
		}
		waited := l.now().Sub(start)
		if res.Allowed > 0 {
			return waited, nil
		}
		if waited+res.RetryAfter > maxWait {
			return waited, &TooLong{RetryAfter: res.RetryAfter}
		}
		// A little jitter, so that workers woken together do not all
		// ask at the same instant and lose together.
		sleep := res.RetryAfter + time.Duration(rand.Int64N(int64(time.Millisecond)+int64(res.RetryAfter)/10))
		select {
		case <-ctx.Done():
			return l.now().Sub(start), ctx.Err()
		case <-time.After(sleep):
		}
	}
}

// gcraLimit expresses a rate per second for redis_rate, which takes whole
// counts: per 10 s for tenth-of-a-call precision, per hour below one call a
// second. The burst is a tenth of a second's worth, so the fleet's rate
// stays smooth at every scale.
func gcraLimit(perSecond float64) redis_rate.Limit {
	period := 10 * time.Second
	if perSecond < 1 {
		period = time.Hour
	}
	n := int(math.Max(1, math.Round(perSecond*period.Seconds())))
	burst := int(math.Max(1, math.Floor(perSecond/10)))
	return redis_rate.Limit{Rate: n, Period: period, Burst: burst}
}

// Rate is the current shared rate in calls per second: the configured
// limit, or less after recent 429s. Workers read it at most every 200ms.
func (l *Limiter) Rate(ctx context.Context, mchID string, ep Endpoint) (float64, error) {
	key := l.key(mchID, ep)
	l.mu.Lock()
	c, ok := l.cache[key]
	l.mu.Unlock()
	if ok && l.now().Sub(c.at) < l.cacheFor {
		return c.rate, nil
	}
	rate, _, err := l.aimd(ctx, mchID, ep, "get")
	return rate, err
}

// Throttled tells the limiter that WeChat answered 429 although a slot was
// taken: the real limit is lower than configured, or another system shares
// the merchant. The shared rate drops for every worker, at most once a
// cooldown however many 429s the fleet sees; it returns the rate now and
// whether this call lowered it.
func (l *Limiter) Throttled(ctx context.Context, mchID string, ep Endpoint) (rate float64, lowered bool, err error) {
	return l.aimd(ctx, mchID, ep, "decrease")
}

func (l *Limiter) aimd(ctx context.Context, mchID string, ep Endpoint, op string) (float64, bool, error) {
	lim, ok := l.limits[ep]
	if !ok {
		return 0, false, fmt.Errorf("ratelimit: no limit for endpoint %q", ep)
	}
	max := lim.PerSecond()
	now := l.now()
	v, err := aimdScript.Run(ctx, l.rdb, []string{l.keys.LimiterRate(mchID, string(ep))},
		now.UnixMilli(), max, max/l.recovery.Seconds(), op, l.decrease, max*l.floorFrac, l.cooldown.Milliseconds()).Slice()
	if err != nil {
		return 0, false, fmt.Errorf("ratelimit: %w", err)
	}
	s, _ := v[0].(string)
	lowered, _ := v[1].(int64)
	rate, err := strconv.ParseFloat(s, 64)
	if err != nil {
		return 0, false, errors.New("ratelimit: bad rate from Redis: " + s)
	}
	l.mu.Lock()
	l.cache[l.key(mchID, ep)] = cached{rate: rate, at: now}
	l.mu.Unlock()
	return rate, lowered == 1, nil
}
