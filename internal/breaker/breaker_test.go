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
