package breaker

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/keyspace"
	"github.com/couponflow/dispatcher/internal/redistest"
)

func TestBreakerLifecycle(t *testing.T) {
	clock := time.Unix(1_800_000_000, 0)
	b := New(redistest.Start(t).Client(), WithProbeInterval(30*time.Second, 2*time.Minute))
	b.now = func() time.Time { return clock }
	ctx := context.Background()
	check := func(want Verdict) Decision {
		t.Helper()
		d, err := b.Check(ctx, "m", "s1")
		if err != nil || d.Verdict != want {
			t.Fatalf("check: %+v %v, want verdict %d", d, err, want)
		}
		return d
	}
	check(Closed)
	next, _ := b.Exhausted(ctx, "m", "s1", false)
	if !next.Equal(clock.Add(30 * time.Second)) {
		t.Fatalf("first probe at %v", next)
	}
	if d := check(Hold); !d.Until.Equal(next) {
		t.Fatalf("hold until %v", d.Until)
	}
	// Calls that were in flight when it opened report too: no change.
	if again, _ := b.Exhausted(ctx, "m", "s1", false); !again.Equal(next) {
		t.Fatalf("a second NOT_ENOUGH moved the probe to %v", again)
	}
	if d, _ := b.Check(ctx, "m", "s2"); d.Verdict != Closed {
		t.Fatal("another stock is held")
	}
	clock = next
	check(Probe)
	// Only one probe at a time; the others come back after the first
	// interval rather than the probe's whole lease.
	if d := check(Hold); d.Until.After(clock.Add(30 * time.Second)) {
		t.Fatalf("held until %v while a probe is in flight", d.Until)
	}
	for _, want := range []time.Duration{60 * time.Second, 120 * time.Second, 120 * time.Second} {
		n, _ := b.Exhausted(ctx, "m", "s1", true)
		if n.Sub(clock) != want {
			t.Fatalf("next probe in %v, want %v", n.Sub(clock), want)
		}
		clock = n
		check(Probe)
	}
	st, _ := b.Status(ctx, "m", "s1")
	if !st.Open || st.Probes != 3 || st.Interval != 2*time.Minute {
		t.Fatalf("status %+v", st)
	}
	open, _ := b.Open(ctx, "m")
	if len(open) != 1 || open[0].StockID != "s1" {
		t.Fatalf("open %+v", open)
	}
	if err := b.Succeeded(ctx, "m", "s1"); err != nil {
		t.Fatal(err)
	}
	check(Closed)
	if open, _ := b.Open(ctx, "m"); len(open) != 0 {
		t.Fatalf("still listed open: %+v", open)
	}
}

func TestAbandonedProbeLetsAnotherProbe(t *testing.T) {
	clock := time.Unix(1_800_000_000, 0)
	b := New(redistest.Start(t).Client(), WithProbeInterval(time.Second, time.Minute))
	b.now = func() time.Time { return clock }
	ctx := context.Background()
	b.Exhausted(ctx, "m", "s1", false)
	clock = clock.Add(time.Second)
	if d, _ := b.Check(ctx, "m", "s1"); d.Verdict != Probe {
		t.Fatalf("%+v", d)
	}
	if d, _ := b.Check(ctx, "m", "s1"); d.Verdict != Hold {
		t.Fatalf("a second probe while one is out: %+v", d)
	}
	b.Abandon(ctx, "m", "s1")
	if d, _ := b.Check(ctx, "m", "s1"); d.Verdict != Probe {
		t.Fatalf("after abandoning: %+v", d)
	}
	b.Resume(ctx, "m", "s1")
	b.Abandon(ctx, "m", "s1") // on a closed breaker: nothing
	if d, _ := b.Check(ctx, "m", "s1"); d.Verdict != Closed {
		t.Fatalf("abandon reopened it: %+v", d)
	}
}

func TestResumeClosesAtOnce(t *testing.T) {
	b := New(redistest.Start(t).Client())
	ctx := context.Background()
	b.Exhausted(ctx, "m", "s1", false)
	if d, _ := b.Check(ctx, "m", "s1"); d.Verdict != Hold {
		t.Fatalf("not held: %+v", d)
	}
	if err := b.Resume(ctx, "m", "s1"); err != nil {
		t.Fatal(err)
	}
	if d, _ := b.Check(ctx, "m", "s1"); d.Verdict != Closed {
		t.Fatalf("after resume: %+v", d)
	}
}

// commands counts the commands a client sends.
type commands struct{ names []string }

func (c *commands) DialHook(next redis.DialHook) redis.DialHook { return next }
func (c *commands) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		switch cmd.Name() {
		case "hello", "client", "evalsha": // connection set-up; a script not yet loaded is sent again as eval
		default:
			c.names = append(c.names, cmd.Name())
		}
		return next(ctx, cmd)
	}
}
func (c *commands) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

// The breaker and its merchant's open set change in one script: one
// command each way, both keys under the layout's prefix and one hash tag,
// so the script runs on a Cluster too.
func TestOpenSetMovesWithTheBreaker(t *testing.T) {
	cluster := redistest.StartCluster(t, 3)
	for name, rdb := range map[string]redis.UniversalClient{"standalone": redistest.Start(t).Client(), "cluster": cluster.Client()} {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			keys := keyspace.New("acme")
			b := New(rdb, WithKeys(keys))
			var seen commands
			rdb.AddHook(&seen)
			if _, err := b.Exhausted(ctx, "m", "s1", false); err != nil {
				t.Fatal(err)
			}
			if len(seen.names) > 1 || len(seen.names) == 1 && seen.names[0] != "eval" {
				t.Fatalf("opening took %v besides its script", seen.names)
			}
			if !rdb.SIsMember(ctx, keys.OpenBreakers("m"), "s1").Val() || rdb.Exists(ctx, keys.Breaker("m", "s1")).Val() != 1 {
				t.Fatal("opened breaker missing from the hash or the open set")
			}
			seen.names = nil
			if err := b.Resume(ctx, "m", "s1"); err != nil {
				t.Fatal(err)
			}
			if len(seen.names) > 1 || len(seen.names) == 1 && seen.names[0] != "eval" {
				t.Fatalf("resuming took %v besides its script", seen.names)
			}
			if rdb.SCard(ctx, keys.OpenBreakers("m")).Val() != 0 || rdb.Exists(ctx, keys.Breaker("m", "s1")).Val() != 0 {
				t.Fatal("resumed breaker left behind")
			}
			b.Exhausted(ctx, "m", "s2", false)
			var all []string
			var mu sync.Mutex
			scan := func(ctx context.Context, c *redis.Client) error {
				ks := c.Keys(ctx, "*").Val()
				mu.Lock()
				defer mu.Unlock()
				all = append(all, ks...)
				return nil
			}
			if cc, ok := rdb.(*redis.ClusterClient); ok {
				cc.ForEachMaster(ctx, scan)
			} else {
				scan(ctx, rdb.(*redis.Client))
			}
			for _, k := range all {
				if !keys.Owns(k) {
					t.Errorf("key %q outside the prefix", k)
				}
			}
			if len(all) != 2 {
				t.Errorf("keys %v, want the breaker and the open set", all)
			}
		})
	}
}

// A daily budget ends at midnight: the breaker holds until then, probes
// then, and a probe that finds it still gone waits for the next end it is
// told of, not for a doubled interval.
func TestBreakerHoldsUntilAKnownEnd(t *testing.T) {
	clock := time.Unix(1_800_000_000, 0)
	b := New(redistest.Start(t).Client(), WithProbeInterval(30*time.Second, 10*time.Minute))
	b.now = func() time.Time { return clock }
	ctx := context.Background()
	midnight := clock.Add(5 * time.Hour)
	next, err := b.Trip(ctx, "m", "s1", false, "NOT_ENOUGH: 批次当天预算不足", midnight)
	if err != nil || !next.Equal(midnight) {
		t.Fatalf("opened until %v %v, want %v", next, err, midnight)
	}
	clock = clock.Add(4 * time.Hour)
	if d, _ := b.Check(ctx, "m", "s1"); d.Verdict != Hold || !d.Until.Equal(midnight) || d.Reason != "NOT_ENOUGH: 批次当天预算不足" {
		t.Fatalf("four hours in: %+v", d)
	}
	clock = midnight
	if d, _ := b.Check(ctx, "m", "s1"); d.Verdict != Probe {
		t.Fatalf("at midnight: %+v", d)
	}
	tomorrow := midnight.Add(24 * time.Hour)
	if next, _ := b.Trip(ctx, "m", "s1", true, "NOT_ENOUGH: 批次当天预算不足", tomorrow); !next.Equal(tomorrow) {
		t.Fatalf("a probe that found it spent again: next %v", next)
	}
	// A breaker opened by the total budget learns of a later end from a
	// call that was in flight.
	b.Exhausted(ctx, "m", "s2", false)
	if next, _ := b.Trip(ctx, "m", "s2", false, "NOT_ENOUGH: 当天", tomorrow); !next.Equal(tomorrow) {
		t.Fatalf("the later end was ignored: %v", next)
	}
}

// The merchant's breaker holds every stock's sends, comes before a
// stock's, and keeps its own probes.
func TestMerchantBreakerHoldsEveryStock(t *testing.T) {
	clock := time.Unix(1_800_000_000, 0)
	b := New(redistest.Start(t).Client(), WithProbeInterval(30*time.Second, 10*time.Minute))
	b.now = func() time.Time { return clock }
	ctx := context.Background()
	b.Exhausted(ctx, "m", "s2", false)
	if _, err := b.Trip(ctx, "m", Merchant, false, "SIGN_ERROR: 签名错误", time.Time{}); err != nil {
		t.Fatal(err)
	}
	for _, stock := range []string{"s1", "s2"} {
		d, _ := b.Check(ctx, "m", stock)
		if d.Verdict != Hold || !d.Merchant || d.Reason != "SIGN_ERROR: 签名错误" {
			t.Fatalf("%s: %+v", stock, d)
		}
	}
	if d, _ := b.Check(ctx, "other", "s1"); d.Verdict != Closed {
		t.Fatalf("another merchant is held: %+v", d)
	}
	open, _ := b.Open(ctx, "m")
	if len(open) != 2 || open[0].StockID != Merchant || open[0].Reason != "SIGN_ERROR: 签名错误" || open[1].StockID != "s2" {
		t.Fatalf("open: %+v", open)
	}
	clock = clock.Add(30 * time.Second)
	d, _ := b.Check(ctx, "m", "s1")
	if d.Verdict != Probe || !d.Merchant {
		t.Fatalf("the merchant's probe: %+v", d)
	}
	if d, _ := b.Check(ctx, "m", "s1"); d.Verdict != Hold || !d.Merchant {
		t.Fatalf("a second probe while one is out: %+v", d)
	}
	if err := b.Succeeded(ctx, "m", Merchant); err != nil {
		t.Fatal(err)
	}
	if d, _ := b.Check(ctx, "m", "s1"); d.Verdict != Closed {
		t.Fatalf("after the merchant's probe succeeded: %+v", d)
	}
	// Its first probe is due: the stock's own, not the merchant's.
	if d, _ := b.Check(ctx, "m", "s2"); d.Verdict != Probe || d.Merchant {
		t.Fatalf("the stock's own breaker: %+v", d)
	}
}

// hookFunc runs before every command or pipeline of a client.
type hookFunc func()

func (h hookFunc) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h hookFunc) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error { h(); return next(ctx, cmd) }
}
func (h hookFunc) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error { h(); return next(ctx, cmds) }
}

// A worker's cache of closed breakers: no round trip while it holds, a
// breaker opened elsewhere seen once the entry ages out or once this
// worker records a refusal itself, and an open breaker never cached.
func TestClosedBreakersAreCached(t *testing.T) {
	srv := redistest.Start(t)
	clock := time.Unix(1_800_000_000, 0)
	rdb := srv.Client()
	var trips int
	var onTrip func()
	rdb.AddHook(hookFunc(func() {
		trips++
		if onTrip != nil {
			onTrip()
		}
	}))
	w := New(rdb, WithProbeInterval(30*time.Second, 10*time.Minute), WithClosedCache(time.Second))
	other := New(srv.Client(), WithProbeInterval(30*time.Second, 10*time.Minute))
	w.now = func() time.Time { return clock }
	other.now = w.now
	ctx := context.Background()
	check := func(stock string, want Verdict, wantTrips int) Decision {
		t.Helper()
		trips = 0
		d, err := w.Check(ctx, "m", stock)
		if err != nil || d.Verdict != want || trips != wantTrips {
			t.Fatalf("check %s: %+v %v in %d round trips, want verdict %d in %d", stock, d, err, trips, want, wantTrips)
		}
		return d
	}
	if _, err := w.Check(ctx, "warm-up", "s0"); err != nil { // the connection and the script
		t.Fatal(err)
	}
	check("s1", Closed, 1)
	check("s1", Closed, 0)
	check("s2", Closed, 1)

	// Opened by another worker: this one does not see it for a while...
	other.Exhausted(ctx, "m", "s1", false)
	check("s1", Closed, 0)
	clock = clock.Add(999 * time.Millisecond)
	check("s1", Closed, 0)
	// ...until the entry ages out, and an open breaker is asked every time.
	clock = clock.Add(time.Millisecond)
	check("s1", Hold, 1)
	check("s1", Hold, 1)
	check("s2", Closed, 1)

	// Or until this worker records a refusal of its own: every entry goes,
	// the merchant's breaker covering all its stocks.
	check("s2", Closed, 0)
	other.Trip(ctx, "m", Merchant, false, "SIGN_ERROR: x", time.Time{})
	w.Trip(ctx, "m", Merchant, false, "SIGN_ERROR: x", time.Time{})
	if d := check("s2", Hold, 1); !d.Merchant {
		t.Fatalf("held by %+v", d)
	}
	w.Resume(ctx, "m", Merchant)
	check("s2", Closed, 1)

	// A Check that was under way when a Trip began stores nothing, since
	// it may have read the breaker before the Trip opened it.
	clock = clock.Add(time.Second)
	onTrip = func() { onTrip = nil; w.closed.forget() }
	check("s2", Closed, 1)
	check("s2", Closed, 1)
	check("s2", Closed, 0)
}
