// Package ratelimit is one rate limit shared by every worker through
// Redis, per merchant and endpoint, because WeChat Pay counts calls per
// merchant, not per worker. The algorithm is GCRA (go-redis/redis_rate);
// on top of it the rate adapts: when WeChat answers 429 anyway, the fleet
// measures the rate WeChat accepted, sets the shared rate just under it for
// every worker at once, keeps it as the learned ceiling, and probes above it
// slowly (see aimd.lua).
package ratelimit

import (
	"context"
	_ "embed"
	"errors"
	"fmt"
	"math"
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

	adapt Adaptation
	// How long a worker uses the rate it read before asking again: shorter
	// while an episode measures, so that every worker's slots are counted
	// when the window closes.
	cacheFor, episodeCacheFor time.Duration
	floorFrac                 float64

	mu      sync.Mutex
	cache   map[string]cached
	granted map[string]int64 // slots taken and not yet reported to Redis
	turns   map[string]chan struct{}
	// waiting counts the callers in Wait per key; spares are slots the
	// caller who asked Redis took for them (Wait).
	waiting map[string]int
	spares  map[string]spare
	// used counts the slots this process used per key, in spareFor
	// windows: the last full window's count is what it takes ahead.
	used map[string]usage
	// bound is until when a key is at its limit: a slot was refused.
	bound map[string]time.Time
	// orphans are reserved slots whose caller left before their time
	// (its context ended): the next caller of this process takes the slot
	// at that time instead of reserving one more.
	orphans map[string]time.Time
	now     func() time.Time
}

// Adaptation is how the shared rate reacts to 429s (see aimd.lua).
type Adaptation struct {
	// CutUnknown and CutKnown multiply the rate on the first 429 of a
	// burst: with no learned ceiling (or far above it), and near one.
	CutUnknown, CutKnown float64
	// Settle is left after the cut for the 429s of calls granted before it
	// to come back; Window is how long the accepted rate is then measured.
	Settle, Window time.Duration
	// Margin sets the rate under the measured limit.
	Margin float64
	// ProbeEvery and ProbeStep: after each ProbeEvery in which the fleet
	// used at least 90% of the rate without a 429, the rate grows by
	// ProbeStep, the step doubling after each such probe (up to 16 times)
	// and starting over after a 429.
	ProbeEvery time.Duration
	ProbeStep  float64
	// Cooldown: no new episode this long after one, however many 429s.
	Cooldown time.Duration
	// Below a rate the fleet used without a 429 for a whole probe interval
	// within BestFor, the rate grows back linearly, from 0 to it in
	// Recover: a short 429 storm is not a new limit.
	Recover, BestFor time.Duration
	// Keep is how long the learned state lives in Redis without a write.
	Keep time.Duration
}

// DefaultAdaptation is what BenchmarkUnknownLimit (bench/) was measured
// with; docs/benchmarks.md has its figures.
var DefaultAdaptation = Adaptation{
	CutUnknown: 0.25, CutKnown: 0.9,
	Settle: 100 * time.Millisecond, Window: 300 * time.Millisecond,
	Margin:     0.97,
	ProbeEvery: 10 * time.Second, ProbeStep: 0.01,
	Cooldown: time.Second,
	Recover:  30 * time.Second, BestFor: 10 * time.Minute,
	Keep: 30 * 24 * time.Hour,
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
	rate    float64
	at      time.Time
	episode bool
}

// Option configures a Limiter.
type Option func(*Limiter)

// WithLimits replaces the limits (see ParseLimits).
func WithLimits(m map[Endpoint]Limit) Option { return func(l *Limiter) { l.limits = m } }

// WithAdaptation replaces DefaultAdaptation.
func WithAdaptation(a Adaptation) Option { return func(l *Limiter) { l.adapt = a } }

// WithKeys sets the key layout (default keyspace.Default).
func WithKeys(k keyspace.Keys) Option { return func(l *Limiter) { l.keys = k } }

// New returns a limiter sharing its state through rdb.
func New(rdb redis.UniversalClient, opts ...Option) *Limiter {
	l := &Limiter{
		rdb: rdb, gcra: redis_rate.NewLimiter(unprefixed{rdb}), limits: Defaults, keys: keyspace.Default,
		adapt: DefaultAdaptation, cacheFor: 200 * time.Millisecond, episodeCacheFor: 20 * time.Millisecond,
		floorFrac: 0.01, cache: map[string]cached{}, granted: map[string]int64{}, turns: map[string]chan struct{}{},
		waiting: map[string]int{}, spares: map[string]spare{}, used: map[string]usage{}, bound: map[string]time.Time{}, orphans: map[string]time.Time{}, now: time.Now,
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
	key := l.key(mchID, ep)
	if l.takeSpare(key) {
		return 0, nil
	}
	l.mu.Lock()
	l.waiting[key]++
	l.mu.Unlock()
	defer func() {
		l.mu.Lock()
		l.waiting[key]--
		l.mu.Unlock()
	}()
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
	if at, ok := l.takeOrphan(key, start.Add(maxWait)); ok {
		return l.sleepUntil(ctx, key, start, at)
	}
	for {
		// The caller before us may have taken our slot.
		if l.takeSpare(key) {
			return l.now().Sub(start), nil
		}
		rate, err := l.rate(ctx, mchID, ep)
		if err != nil {
			return l.now().Sub(start), err
		}
		// One round trip takes a slot for each caller of this process
		// queued behind us too: they take theirs from memory (takeSpare).
		// And ahead, as many as this process used in the last window:
		// at a steady pace, the callers of the next few milliseconds take
		// theirs without a round trip.
		// At the limit (a slot had to be waited for in the last second) one
		// slot a round trip, reserved at its time: the slots are what is
		// scarce there, and taking several at once lost a known limit 4 %
		// of its calls (BenchmarkUnknownLimit).
		l.mu.Lock()
		atLimit := l.now().Before(l.bound[key])
		n := min(max(l.waiting[key], l.used[key].last(l.now()), 1), maxBatch)
		l.mu.Unlock()
		limit := gcraLimit(rate)
		if atLimit {
			return l.reserve(ctx, key, limit, start, maxWait)
		}
		// All of them or none (AllowN): redis_rate's AllowAtMost spends
		// the fraction of a slot it cannot grant, which cost a known limit
		// a tenth of its calls. No more than the burst, or it never comes.
		res, err := l.gcra.AllowN(ctx, key, limit, min(n, limit.Burst))
		if err != nil {
			return l.now().Sub(start), fmt.Errorf("ratelimit: %w", err)
		}
		waited := l.now().Sub(start)
		if res.Allowed > 0 {
			l.mu.Lock()
			l.use(key)
			if res.Allowed > 1 {
				l.spares[key] = spare{n: res.Allowed - 1, until: l.now().Add(spareFor)}
			}
			l.mu.Unlock()
			return waited, nil
		}
		if waited+res.RetryAfter > maxWait {
			return waited, &TooLong{RetryAfter: res.RetryAfter}
		}
		l.mu.Lock()
		l.bound[key] = l.now().Add(time.Second)
		l.mu.Unlock()
	}
}

//go:embed reserve.lua
var reserveLua string
var reserveScript = redis.NewScript(reserveLua)

// reserve takes the next slot at its time, if that comes within maxWait of
// start, and sleeps until then, holding the process's turn: at most one
// slot a process is reserved ahead, so a cut of the shared rate leaves no
// tail of slots taken at the old pace. Without it the fleet's askers race
// for each slot as it frees and all but one lose a round trip (1,566
// round trips for 418 slots in TestReservesOneSlotAtTheLimit's setting).
func (l *Limiter) reserve(ctx context.Context, key string, limit redis_rate.Limit, start time.Time, maxWait time.Duration) (time.Duration, error) {
	left := maxWait - l.now().Sub(start)
	v, err := reserveScript.Run(ctx, l.rdb, []string{key}, limit.Burst, limit.Rate, limit.Period.Seconds(), left.Seconds()).Slice()
	if err != nil {
		return l.now().Sub(start), fmt.Errorf("ratelimit: %w", err)
	}
	ok, wait, err := parseReserved(v)
	if err != nil {
		return l.now().Sub(start), err
	}
	if !ok {
		return l.now().Sub(start), &TooLong{RetryAfter: wait}
	}
	l.mu.Lock()
	if wait > 0 {
		l.bound[key] = l.now().Add(time.Second)
	}
	l.use(key)
	at := l.now().Add(wait)
	l.mu.Unlock()
	return l.sleepUntil(ctx, key, start, at)
}

// sleepUntil waits for a reserved slot's time. A caller whose context ends
// first leaves the slot to the next caller of the process (takeOrphan):
// the fleet counted it as taken, so unused it would be lost to everyone.
func (l *Limiter) sleepUntil(ctx context.Context, key string, start, at time.Time) (time.Duration, error) {
	if wait := at.Sub(l.now()); wait > 0 {
		t := time.NewTimer(wait)
		defer t.Stop()
		select {
		case <-ctx.Done():
			l.mu.Lock()
			l.orphans[key] = at
			l.mu.Unlock()
			return l.now().Sub(start), ctx.Err()
		case <-t.C:
		}
	}
	return l.now().Sub(start), nil
}

// takeOrphan takes a slot left by a caller who gave up on it, if its time
// is no later than by and has not passed more than spareFor ago: a slot
// used late would fall between later ones, above the rate.
func (l *Limiter) takeOrphan(key string, by time.Time) (time.Time, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	at, ok := l.orphans[key]
	if !ok {
		return time.Time{}, false
	}
	now := l.now()
	if now.Sub(at) > spareFor {
		delete(l.orphans, key)
		return time.Time{}, false
	}
	if at.After(by) {
		return time.Time{}, false
	}
	delete(l.orphans, key)
	return at, true
}

func parseReserved(v []any) (bool, time.Duration, error) {
	if len(v) != 2 {
		return false, 0, fmt.Errorf("ratelimit: bad answer from Redis: %v", v)
	}
	ok, _ := v[0].(int64)
	s, _ := v[1].(string)
	secs, err := strconv.ParseFloat(s, 64)
	if err != nil {
		return false, 0, fmt.Errorf("ratelimit: bad wait from Redis: %v", v)
	}
	return ok == 1, time.Duration(secs * float64(time.Second)), nil
}

// maxBatch is the most slots one round trip takes for a process, and
// spareFor how long the ones its caller does not use stay good: the
// callers queued behind it take them within microseconds; a slot left
// over (its caller gave up) is dropped soon, not spent late in a burst.
const (
	maxBatch = 16
	spareFor = 20 * time.Millisecond
)

// spare is slots taken from Redis and not used yet.
type spare struct {
	n     int
	until time.Time
}

// takeSpare takes one of the key's spare slots, if one is still good.
func (l *Limiter) takeSpare(key string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	sp, ok := l.spares[key]
	if !ok || sp.n <= 0 || !l.now().Before(sp.until) {
		return false
	}
	sp.n--
	l.spares[key] = sp
	l.use(key)
	return true
}

// use counts a slot this process takes: for the fleet's measurements
// (granted), and for how many to take ahead (used). Under l.mu.
func (l *Limiter) use(key string) {
	l.granted[key]++
	u := l.used[key]
	now := l.now()
	if now.Sub(u.start) >= spareFor {
		u.prev = u.n
		if now.Sub(u.start) >= 2*spareFor {
			u.prev = 0 // a window with no slot lies between
		}
		u.start, u.n = now, 0
	}
	u.n++
	l.used[key] = u
}

// usage is a key's slots used in the current window and the one before.
type usage struct {
	start   time.Time
	n, prev int
}

// last is the slots used in the last full window, 0 once it is stale.
func (u usage) last(now time.Time) int {
	if now.Sub(u.start) >= 2*spareFor {
		return 0
	}
	return u.prev
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

// rate is the shared rate a worker takes its slots at, read from Redis
// at most every cacheFor, reporting the slots this process took meanwhile.
func (l *Limiter) rate(ctx context.Context, mchID string, ep Endpoint) (float64, error) {
	key := l.key(mchID, ep)
	l.mu.Lock()
	c, ok := l.cache[key]
	l.mu.Unlock()
	fresh := l.cacheFor
	if c.episode {
		fresh = l.episodeCacheFor
	}
	if ok && l.now().Sub(c.at) < fresh {
		return c.rate, nil
	}
	st, _, err := l.aimd(ctx, mchID, ep, "get")
	return st.Rate, err
}

// Shared is what the fleet uses for one (merchant, endpoint), as the
// workers last wrote it to Redis.
type Shared struct {
	// Limit is the workers' configured limit; the reader's own when no
	// worker has written it yet (WorkersLimit false).
	Limit        float64
	WorkersLimit bool
	// Rate is the shared rate now, at most Limit.
	Rate float64
	// Ceiling is the real limit learned from WeChat's 429s, 0 if none.
	Ceiling float64
	// Measuring is set while an episode measures the accepted rate.
	Measuring bool
}

// Fleet reads what the fleet uses, without changing it: for status and
// the monitor, which need no --rate-limits of their own for it.
func (l *Limiter) Fleet(ctx context.Context, mchID string, ep Endpoint) (Shared, error) {
	st, _, err := l.aimd(ctx, mchID, ep, "peek")
	return st, err
}

// Rate is the shared rate in calls per second that the workers use now:
// their configured limit, or less after WeChat answered 429. It is a
// reader's view (see Fleet).
func (l *Limiter) Rate(ctx context.Context, mchID string, ep Endpoint) (float64, error) {
	st, err := l.Fleet(ctx, mchID, ep)
	return st.Rate, err
}

// Throttled tells the limiter that WeChat answered 429 although a slot was
// taken: the real limit is lower than configured, or another system shares
// the merchant. The first 429 of a burst cuts the shared rate for every
// worker and starts measuring the rate WeChat accepts; it returns the rate
// now and whether this call lowered it.
func (l *Limiter) Throttled(ctx context.Context, mchID string, ep Endpoint) (rate float64, lowered bool, err error) {
	st, lowered, err := l.aimd(ctx, mchID, ep, "decrease")
	return st.Rate, lowered, err
}

func (l *Limiter) aimd(ctx context.Context, mchID string, ep Endpoint, op string) (Shared, bool, error) {
	lim, ok := l.limits[ep]
	if !ok {
		return Shared{}, false, fmt.Errorf("ratelimit: no limit for endpoint %q", ep)
	}
	max := lim.PerSecond()
	key := l.key(mchID, ep)
	var granted int64
	if op != "peek" {
		l.mu.Lock()
		granted = l.granted[key]
		delete(l.granted, key)
		l.mu.Unlock()
	}
	a := l.adapt
	now := l.now()
	v, err := aimdScript.Run(ctx, l.rdb, []string{l.keys.LimiterRate(mchID, string(ep)), key},
		now.UnixMilli(), max, op, granted, max*l.floorFrac, a.CutUnknown, a.CutKnown,
		a.Settle.Milliseconds(), a.Window.Milliseconds(), a.Margin, a.ProbeEvery.Milliseconds(), a.ProbeStep,
		a.Cooldown.Milliseconds(), a.Keep.Milliseconds(), a.Recover.Milliseconds(), a.BestFor.Milliseconds()).Slice()
	if err != nil {
		if granted > 0 { // report them next time
			l.mu.Lock()
			l.granted[key] += granted
			l.mu.Unlock()
		}
		return Shared{}, false, fmt.Errorf("ratelimit: %w", err)
	}
	st, lowered, err := parseShared(v, max)
	if err != nil {
		return st, false, err
	}
	if op != "peek" {
		l.mu.Lock()
		if c, ok := l.cache[key]; lowered || ok && st.Rate < c.rate {
			// Spare slots were taken at the old pace; the script drained
			// the fleet's burst for the same reason.
			delete(l.spares, key)
		}
		l.cache[key] = cached{rate: st.Rate, at: now, episode: st.Measuring}
		l.mu.Unlock()
	}
	return st, lowered, nil
}

func parseShared(v []any, own float64) (Shared, bool, error) {
	if len(v) != 5 {
		return Shared{}, false, fmt.Errorf("ratelimit: bad answer from Redis: %v", v)
	}
	num := func(i int) (float64, error) {
		s, _ := v[i].(string)
		if s == "" {
			return 0, nil
		}
		f, err := strconv.ParseFloat(s, 64)
		if err != nil {
			return 0, errors.New("ratelimit: bad number from Redis: " + s)
		}
		return f, nil
	}
	var st Shared
	var err error
	if st.Rate, err = num(0); err != nil {
		return st, false, err
	}
	if st.Ceiling, err = num(2); err != nil {
		return st, false, err
	}
	if st.Limit, err = num(3); err != nil {
		return st, false, err
	}
	st.WorkersLimit = st.Limit > 0
	if !st.WorkersLimit {
		st.Limit = own
	}
	lowered, _ := v[1].(int64)
	open, _ := v[4].(int64)
	st.Measuring = open == 1
	return st, lowered == 1, nil
}
