package ratelimit

import (
	"context"
	"errors"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/couponflow/dispatcher/internal/keyspace"
	"github.com/couponflow/dispatcher/internal/redistest"
)

func TestParseLimits(t *testing.T) {
	m, err := ParseLimits("favor_send=120/s, multiuse_send=600/m")
	if err != nil {
		t.Fatal(err)
	}
	if m[SendCoupon].PerSecond() != 120 || m[SendMultiuse].PerSecond() != 10 || m[ListCoupons] != Defaults[ListCoupons] {
		t.Fatalf("%v", m)
	}
	for _, bad := range []string{"favor_send=0/s", "favor_send=5/h", "nope=5/s", "favor_send", "favor_send=x/s"} {
		if _, err := ParseLimits(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

// Three limiters stand for three workers: together they stay within the
// one limit they share.
func TestWorkersShareOneLimit(t *testing.T) {
	rdb := redistest.Start(t).Client()
	const perSecond, run = 100.0, 3 * time.Second
	var granted atomic.Int64
	ctx, cancel := context.WithTimeout(context.Background(), run)
	defer cancel()
	start := time.Now()
	var wg sync.WaitGroup
	for w := 0; w < 3; w++ {
		l := New(rdb, WithLimits(map[Endpoint]Limit{SendCoupon: {perSecond, time.Second}}))
		for g := 0; g < 8; g++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					if _, err := l.Wait(ctx, "m1", SendCoupon, time.Second); err != nil {
						return
					}
					granted.Add(1)
				}
			}()
		}
	}
	wg.Wait()
	elapsed := time.Since(start).Seconds()
	// GCRA allows the burst (a tenth of a second's worth) on top.
	ceiling := perSecond*elapsed + perSecond/10 + 1
	if n := float64(granted.Load()); n > ceiling || n < perSecond*elapsed/2 {
		t.Fatalf("%v slots in %.2fs at %v/s; ceiling %v", n, elapsed, perSecond, ceiling)
	}
}

func TestWaitGivesUpBeyondMaxWait(t *testing.T) {
	l := New(redistest.Start(t).Client(), WithLimits(map[Endpoint]Limit{SendMultiuse: {1, time.Minute}}))
	ctx := context.Background()
	if _, err := l.Wait(ctx, "m1", SendMultiuse, 0); err != nil {
		t.Fatalf("first slot: %v", err)
	}
	_, err := l.Wait(ctx, "m1", SendMultiuse, 100*time.Millisecond)
	var tl *TooLong
	if !errors.As(err, &tl) || tl.RetryAfter < 50*time.Second {
		t.Fatalf("second slot within a minute at 1/min: %v", err)
	}
	// Another merchant has its own limit.
	if _, err := l.Wait(ctx, "m2", SendMultiuse, 0); err != nil {
		t.Fatalf("another merchant: %v", err)
	}
}

// A 429 halves the rate for every worker, once per cooldown however many
// workers report it, and the rate grows back linearly.
func TestThrottledIsSharedAndRecovers(t *testing.T) {
	rdb := redistest.Start(t).Client()
	clock := time.Unix(1_800_000_000, 0)
	now := func() time.Time { return clock }
	limits := WithLimits(map[Endpoint]Limit{SendCoupon: {100, time.Second}})
	a, b := New(rdb, limits, WithRecovery(10*time.Second)), New(rdb, limits, WithRecovery(10*time.Second))
	a.now, b.now = now, now
	ctx := context.Background()
	if r, _ := b.Rate(ctx, "m1", SendCoupon); r != 100 {
		t.Fatalf("initial rate %v", r)
	}
	if r, lowered, _ := a.Throttled(ctx, "m1", SendCoupon); r != 50 || !lowered {
		t.Fatalf("after a 429: %v", r)
	}
	if r, lowered, _ := b.Throttled(ctx, "m1", SendCoupon); r != 50 || lowered {
		t.Fatalf("a second 429 in the same burst halved again: %v", r)
	}
	clock = clock.Add(2 * time.Second) // past b's cache and the cooldown
	if r, _ := b.Rate(ctx, "m1", SendCoupon); r != 70 {
		t.Fatalf("after 2s of recovery at 10/s: %v, want 70", r)
	}
	if r, lowered, _ := a.Throttled(ctx, "m1", SendCoupon); r != 35 || !lowered {
		t.Fatalf("second decrease: %v", r)
	}
	clock = clock.Add(time.Minute)
	if r, _ := b.Rate(ctx, "m1", SendCoupon); r != 100 {
		t.Fatalf("long after: %v, want the configured 100", r)
	}
	for i := 0; i < 20; i++ {
		clock = clock.Add(2 * time.Second)
		a.Throttled(ctx, "m1", SendCoupon)
	}
	if r, _ := a.Rate(ctx, "m1", SendCoupon); r < 1 {
		t.Fatalf("the rate fell to %v; it must keep a floor", r)
	}
}

// Every key the limiter writes, redis_rate's GCRA state included, is under
// the layout's prefix, on the limit's hash tag.
func TestKeysUnderThePrefix(t *testing.T) {
	rdb := redistest.Start(t).Client()
	ctx := context.Background()
	keys := keyspace.New("acme")
	l := New(rdb, WithKeys(keys))
	if _, err := l.Wait(ctx, "m", SendCoupon, time.Second); err != nil {
		t.Fatal(err)
	}
	if _, _, err := l.Throttled(ctx, "m", SendCoupon); err != nil {
		t.Fatal(err)
	}
	got := rdb.Keys(ctx, "*").Val()
	sort.Strings(got)
	want := []string{keys.Limiter("m", string(SendCoupon)), keys.LimiterRate("m", string(SendCoupon))}
	if !slices.Equal(got, want) {
		t.Fatalf("keys %q, want %q", got, want)
	}
}
