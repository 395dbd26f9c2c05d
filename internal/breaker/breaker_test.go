package breaker

import (
	"context"
	"testing"
	"time"

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
