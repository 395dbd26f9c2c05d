package ratelimit

import (
	"context"
	"errors"
	"math"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

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

// fleetClock drives limiters sharing one Redis on a clock of its own: each
// event reports the slots taken since the last one, as Wait does.
type fleetClock struct {
	t     *testing.T
	clock time.Time
	lims  []*Limiter
}

func newFleetClock(t *testing.T, n int, perSecond float64) *fleetClock {
	rdb := redistest.Start(t).Client()
	f := &fleetClock{t: t, clock: time.Unix(1_800_000_000, 0)}
	for range n {
		l := New(rdb, WithLimits(map[Endpoint]Limit{SendCoupon: {perSecond, time.Second}}))
		l.now = func() time.Time { return f.clock }
		f.lims = append(f.lims, l)
	}
	return f
}

// event is one worker's call at offset ms: "get" after granting slots,
// or "429" for a Throttled.
type event struct {
	ms      int
	worker  int
	op      string
	granted int64
}

// run plays the events and returns the last answer.
func (f *fleetClock) run(start time.Time, evs []event) (Shared, bool) {
	f.t.Helper()
	var st Shared
	var lowered bool
	for _, e := range evs {
		f.clock = start.Add(time.Duration(e.ms) * time.Millisecond)
		l := f.lims[e.worker]
		l.granted[l.key("m1", SendCoupon)] += e.granted
		op := map[string]string{"get": "get", "429": "decrease"}[e.op]
		var err error
		if st, lowered, err = l.aimd(context.Background(), "m1", SendCoupon, op); err != nil {
			f.t.Fatal(err)
		}
	}
	return st, lowered
}

// burst is n 429s spread over [from, to) ms, from worker 1 and 2 in turn.
func burst(from, to, n int) []event {
	var evs []event
	for i := range n {
		evs = append(evs, event{ms: from + i*(to-from)/n, worker: 1 + i%2, op: "429"})
	}
	return evs
}

func seq(parts ...[]event) []event { return slices.Concat(parts...) }

// learn is the first 429s of a fleet at 500/s against a WeChat that takes
// 100/s, from at ms: the first 429 cuts the rate to 125/s; the 429s of the
// calls granted before the cut keep coming for 40 ms, so the window waits
// for a settling time (100 ms) with no more 429s than 125/s could bring;
// then in 300 ms 40 slots are granted and 10 refused: 30 accepted in 0.3 s
// is 100/s. It ends at at+500 ms.
func learn(at int) []event {
	return seq(
		[]event{{at, 0, "429", 10}}, burst(at+1, at+40, 30), []event{{at + 100, 0, "get", 6}, {at + 200, 0, "get", 6}},
		burst(at+210, at+490, 10), []event{{at + 500, 0, "get", 40}},
	)
}

// The decision, as a table: what the shared rate and the learned ceiling
// become after a sequence of slots and 429s seen by three workers sharing
// one Redis, the workers configured at 500/s.
func TestAdaptiveDecision(t *testing.T) {
	cases := []struct {
		name      string
		evs       []event
		rate      float64
		ceiling   float64
		measuring bool
		lowered   bool
	}{
		{name: "no 429: the configured limit", evs: []event{{0, 0, "get", 100}}, rate: 500},
		{name: "the first 429 cuts to a quarter at once", evs: []event{{0, 0, "429", 10}}, rate: 125, measuring: true, lowered: true},
		{name: "the rest of the burst does not cut again", evs: seq([]event{{0, 0, "429", 10}}, burst(1, 40, 20)), rate: 125, measuring: true},
		{name: "the accepted rate in the window is the ceiling", evs: learn(0), rate: 97, ceiling: 100},
		// Counted, the 30 late 429s would make 10 accepted in 0.3 s.
		{name: "the window waits for the late 429s of the cut", evs: seq(
			[]event{{0, 0, "429", 10}}, burst(1, 40, 30), []event{{100, 0, "get", 6}},
		), rate: 125, measuring: true},
		{name: "while 429s come faster than the new rate, it waits on", evs: seq(
			[]event{{0, 0, "429", 10}}, burst(1, 40, 30), []event{{100, 0, "get", 6}}, burst(110, 190, 20),
			[]event{{200, 0, "get", 6}, {300, 0, "get", 6}}, burst(310, 590, 10), []event{{600, 0, "get", 40}},
		), rate: 97, ceiling: 100},
		{name: "429s that come back after the window do not start another at once", evs: seq(
			learn(0), burst(510, 1000, 20),
		), rate: 97, ceiling: 100},
		{name: "a window without a 429: half way back up, and measure again", evs: seq(
			[]event{{0, 0, "429", 10}}, []event{{100, 0, "get", 6}, {400, 0, "get", 50}},
		), rate: 312.5, measuring: true},
		{name: "after a window without a 429, the next window with 429s measures", evs: seq(
			[]event{{0, 0, "429", 10}}, []event{{100, 0, "get", 6}, {400, 0, "get", 50}, {500, 0, "get", 16}},
			burst(510, 790, 5), []event{{800, 0, "get", 95}},
		), rate: 0.97 * (95 - 5) / 0.3, ceiling: (95 - 5) / 0.3},
		{name: "a window that lets half the rate or less through halves it and measures again", evs: seq(
			[]event{{0, 0, "429", 10}}, []event{{100, 0, "get", 6}}, burst(110, 390, 36), []event{{400, 0, "get", 37}},
		), rate: 62.5, measuring: true},
		{name: "a window with more 429s than slots measures again at the same rate", evs: seq(
			[]event{{0, 0, "429", 10}}, []event{{100, 0, "get", 6}}, burst(110, 390, 20), []event{{400, 0, "get", 10}},
		), rate: 125, measuring: true},
		{name: "the next burst near the ceiling cuts by a tenth", evs: seq(
			learn(0), []event{{5000, 1, "429", 400}},
		), rate: 97 * 0.9, ceiling: 100, measuring: true, lowered: true},
		{name: "a probe after 10 s of using the rate: +1%", evs: seq(
			learn(0), []event{{10_500, 0, "get", 970}},
		), rate: 97 * 1.01, ceiling: 100},
		{name: "then +2%, +4%: each clean probe doubles the step", evs: seq(
			learn(0), []event{{10_500, 0, "get", 970}, {20_500, 0, "get", 980}, {30_500, 0, "get", 1000}},
		), rate: 97 * 1.01 * 1.02 * 1.04, ceiling: 100},
		{name: "no probe when the fleet does not use the rate", evs: seq(
			learn(0), []event{{10_500, 0, "get", 500}},
		), rate: 97, ceiling: 100},
		// 500/s was used for 10 s without a 429: a storm that teaches
		// 100/s is left at the old pace, 500/s in 30 s.
		{name: "under a rate used without 429s, the rate grows back linearly", evs: seq(
			[]event{{0, 0, "get", 0}, {10_000, 0, "get", 5000}}, learn(10_100), []event{{13_600, 0, "get", 300}},
		), rate: 97 + 0.1*500, ceiling: 100},
		{name: "but not once that rate was used more than ten minutes ago", evs: seq(
			[]event{{0, 0, "get", 0}, {10_000, 0, "get", 5000}}, learn(700_100), []event{{703_600, 0, "get", 300}},
		), rate: 97, ceiling: 100},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := newFleetClock(t, 3, 500)
			st, lowered := f.run(f.clock, c.evs)
			if math.Abs(st.Rate-c.rate) > 1e-6 || math.Abs(st.Ceiling-c.ceiling) > 1e-6 || st.Measuring != c.measuring || lowered != c.lowered || st.Limit != 500 {
				t.Fatalf("got %+v lowered %v; want rate %v ceiling %v measuring %v lowered %v", st, lowered, c.rate, c.ceiling, c.measuring, c.lowered)
			}
		})
	}
}

// Readers (status, the monitor) see the workers' limit, rate and ceiling,
// whatever their own --rate-limits; and what the fleet learned outlives
// the workers' processes.
func TestFleetShowsWhatTheWorkersUse(t *testing.T) {
	f := newFleetClock(t, 1, 500)
	reader := New(f.lims[0].rdb) // the defaults: 500/s
	reader.now = f.lims[0].now
	ctx := context.Background()
	st, err := reader.Fleet(ctx, "m1", SendCoupon)
	if err != nil || st.WorkersLimit || st.Limit != 500 || st.Rate != 500 || st.Ceiling != 0 {
		t.Fatalf("before any worker: %+v %v", st, err)
	}
	// The workers run at 300/s.
	f = &fleetClock{t: t, clock: f.clock}
	w := New(reader.rdb, WithLimits(map[Endpoint]Limit{SendCoupon: {300, time.Second}}))
	w.now = func() time.Time { return f.clock }
	f.lims = []*Limiter{w}
	f.run(f.clock, seq([]event{{0, 0, "429", 10}}, []event{{100, 0, "get", 6}}, []event{{110, 0, "429", 0}, {400, 0, "get", 36}}))
	st, err = reader.Fleet(ctx, "m1", SendCoupon)
	if err != nil || !st.WorkersLimit || st.Limit != 300 || math.Abs(st.Ceiling-(36-1)/0.3) > 1e-6 || math.Abs(st.Rate-0.97*st.Ceiling) > 1e-6 {
		t.Fatalf("after the workers learned: %+v %v", st, err)
	}
	if r, _ := reader.Rate(ctx, "m1", SendCoupon); r != st.Rate {
		t.Fatalf("Rate %v, Fleet %+v", r, st)
	}
	// A worker started later (a restart) takes its slots at the learned
	// rate, not at its configured limit.
	again := New(reader.rdb, WithLimits(map[Endpoint]Limit{SendCoupon: {300, time.Second}}))
	again.now = w.now
	if r, err := again.rate(ctx, "m1", SendCoupon); err != nil || r != st.Rate {
		t.Fatalf("a new worker's rate %v (%v), want %v", r, err, st.Rate)
	}
	if ttl := reader.rdb.PTTL(ctx, keyspace.Default.LimiterRate("m1", string(SendCoupon))).Val(); ttl < 29*24*time.Hour {
		t.Fatalf("the learned state expires in %s", ttl)
	}
}

// Wait reports the slots it took, so that the fleet can count them.
func TestWaitCountsSlots(t *testing.T) {
	rdb := redistest.Start(t).Client()
	ctx := context.Background()
	l := New(rdb)
	for range 5 {
		if _, err := l.Wait(ctx, "m1", SendCoupon, time.Second); err != nil {
			t.Fatal(err)
		}
	}
	// The first Wait read the rate before taking its slot; the rest were
	// counted since and go with the next read.
	l.cache = map[string]cached{}
	if _, err := l.rate(ctx, "m1", SendCoupon); err != nil {
		t.Fatal(err)
	}
	if g := rdb.HGet(ctx, keyspace.Default.LimiterRate("m1", string(SendCoupon)), "g").Val(); g != "5" {
		t.Fatalf("slots counted in Redis: %q, want 5", g)
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

// gcraCalls counts the limiter's round trips for slots (redis_rate's
// scripts on the GCRA key), not its reads of the shared rate.
func gcraCalls() *redistest.RoundTrips {
	return &redistest.RoundTrips{Match: func(cmd redis.Cmder) bool {
		name := cmd.Name()
		if (name != "evalsha" && name != "eval") || len(cmd.Args()) <= 3 {
			return false
		}
		key, _ := cmd.Args()[3].(string)
		return key == keyspace.Default.Limiter("m1", string(SendCoupon))
	}}
}

// Callers queued behind the one asking Redis get their slots from its
// round trip: 32 callers take 640 slots in far fewer round trips, and
// every slot is counted for the fleet's measurements.
func TestWaitBatchesQueuedCallers(t *testing.T) {
	rdb := redistest.Start(t).Client()
	calls := gcraCalls()
	rdb.AddHook(calls)
	ctx := context.Background()
	l := New(rdb, WithLimits(map[Endpoint]Limit{SendCoupon: {100000, time.Second}}))
	var wg sync.WaitGroup
	for range 32 {
		wg.Go(func() {
			for range 20 {
				if _, err := l.Wait(ctx, "m1", SendCoupon, time.Second); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	if n := calls.N(); n >= 640/2 {
		t.Errorf("%d round trips for 640 slots taken by 32 callers at once, want fewer than half", n)
	} else {
		t.Logf("%d round trips for 640 slots", n)
	}
	l.cache = map[string]cached{}
	if _, err := l.rate(ctx, "m1", SendCoupon); err != nil {
		t.Fatal(err)
	}
	if g := rdb.HGet(ctx, keyspace.Default.LimiterRate("m1", string(SendCoupon)), "g").Val(); g != "640" {
		t.Fatalf("slots counted in Redis: %q, want 640", g)
	}
}

// A cut takes back the burst the GCRA state holds at the old pace: right
// after it the next slot is one interval at the new rate away, not a
// burst's worth at once, since those calls would be refused too.
func TestCutDrainsTheBurst(t *testing.T) {
	rdb := redistest.Start(t).Client()
	ctx := context.Background()
	l := New(rdb, WithLimits(map[Endpoint]Limit{SendCoupon: {400, time.Second}}))
	if _, err := l.Wait(ctx, "m1", SendCoupon, 0); err != nil {
		t.Fatal(err)
	}
	cut := time.Now()
	rate, lowered, err := l.Throttled(ctx, "m1", SendCoupon)
	if err != nil || !lowered || rate != 100 {
		t.Fatalf("the first 429: rate %v lowered %v err %v, want a cut to 100/s", rate, lowered, err)
	}
	// Without the drain, 10 slots (a tenth of a second at 100/s) at once;
	// with it, one every 10 ms from the cut.
	got := 0
	for ; got <= 10; got++ {
		if _, err := l.Wait(ctx, "m1", SendCoupon, 0); err != nil {
			var tl *TooLong
			if !errors.As(err, &tl) {
				t.Fatal(err)
			}
			break
		}
	}
	if most := 1 + int(time.Since(cut)/(10*time.Millisecond)); got > most {
		t.Fatalf("%d slots at once right after the cut, want %d at most (one each 10 ms)", got, most)
	}
	if _, err := l.Wait(ctx, "m1", SendCoupon, time.Second); err != nil {
		t.Fatalf("the next slot at the new rate: %v", err)
	}
}

// At the limit each process reserves its next slot instead of racing the
// others for it as it frees: about one round trip a slot (the limiter
// before took 1,566 for 418 slots here), and the rate kept, with no
// 100 ms after the first burst holding more than its share and a few.
func TestReservesOneSlotAtTheLimit(t *testing.T) {
	rdb := redistest.Start(t).Client()
	calls := gcraCalls()
	rdb.AddHook(calls)
	const perSecond, run = 200.0, 2 * time.Second
	ctx, cancel := context.WithTimeout(context.Background(), run)
	defer cancel()
	var mu sync.Mutex
	var times []time.Time
	start := time.Now()
	var wg sync.WaitGroup
	for range 3 {
		l := New(rdb, WithLimits(map[Endpoint]Limit{SendCoupon: {perSecond, time.Second}}))
		for range 16 {
			wg.Go(func() {
				for {
					if _, err := l.Wait(ctx, "m1", SendCoupon, time.Second); err != nil {
						return
					}
					mu.Lock()
					times = append(times, time.Now())
					mu.Unlock()
				}
			})
		}
	}
	wg.Wait()
	elapsed := time.Since(start).Seconds()
	mu.Lock()
	defer mu.Unlock()
	n := float64(len(times))
	if ceiling := perSecond*elapsed + perSecond/10 + 1; n > ceiling || n < 0.8*perSecond*elapsed {
		t.Fatalf("%v slots in %.2fs at %v/s; want between %.0f and %.0f", n, elapsed, perSecond, 0.8*perSecond*elapsed, ceiling)
	}
	// A caller returns when its timer fires, and a late timer bunches two
	// slots: a few more than the share, not a batch's worth (16).
	slices.SortFunc(times, func(a, b time.Time) int { return a.Compare(b) })
	for i, j := 0, 0; i < len(times); i++ {
		for times[i].Sub(times[j]) >= 100*time.Millisecond {
			j++
		}
		if times[i].Sub(start) > 200*time.Millisecond && i-j+1 > int(perSecond/10)+4 {
			t.Fatalf("%d slots within 100 ms at %.2fs, want at most %d", i-j+1, times[i].Sub(start).Seconds(), int(perSecond/10)+4)
		}
	}
	// The first asks of each process are batches refused once slots run
	// short; after that, one a slot.
	if rt := calls.N(); float64(rt) > 1.05*n+10 {
		t.Errorf("%d round trips for %v slots at the limit, want about one a slot", rt, n)
	} else {
		t.Logf("%v slots in %.2fs, %d round trips", n, elapsed, rt)
	}
}

// A caller whose context ends while it sleeps for its reserved slot
// returns at once, and leaves the slot to the next caller of its process,
// which takes it at its time without a round trip: the fleet counted the
// slot as taken, so dropped it would be lost.
func TestLeftSlotGoesToTheNextCaller(t *testing.T) {
	rdb := redistest.Start(t).Client()
	calls := gcraCalls()
	rdb.AddHook(calls)
	ctx := context.Background()
	const interval = 200 * time.Millisecond
	l := New(rdb, WithLimits(map[Endpoint]Limit{SendCoupon: {5, time.Second}}))
	// Up to the limit: the burst, then one slot that had to be waited for.
	for waited := time.Duration(0); waited == 0; {
		var err error
		if waited, err = l.Wait(ctx, "m1", SendCoupon, time.Second); err != nil {
			t.Fatal(err)
		}
	}
	gone, cancel := context.WithCancel(ctx)
	time.AfterFunc(10*time.Millisecond, cancel)
	if waited, err := l.Wait(gone, "m1", SendCoupon, time.Second); !errors.Is(err, context.Canceled) || waited >= 3*interval/4 {
		t.Fatalf("a caller cancelled during its slot's wait: %v after %v, want context.Canceled at once", err, waited)
	}
	before, tat := calls.N(), rdb.Get(ctx, keyspace.Default.Limiter("m1", string(SendCoupon))).Val()
	waited, err := l.Wait(ctx, "m1", SendCoupon, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if n := calls.N() - before; n != 0 || rdb.Get(ctx, keyspace.Default.Limiter("m1", string(SendCoupon))).Val() != tat {
		t.Fatalf("the next caller made %d round trips and moved the GCRA state: it reserved a slot of its own, not the one left", n)
	}
	// The left slot is about an interval after the one before it, 10 ms of
	// which the cancelled caller slept: the next caller waits the rest.
	if waited < interval/4 {
		t.Fatalf("the next caller waited %v: it took the left slot before its time", waited)
	}
}

func TestParseReserved(t *testing.T) {
	for _, c := range []struct {
		v    []any
		ok   bool
		wait time.Duration
		err  bool
	}{
		{v: []any{int64(1), "0.25"}, ok: true, wait: 250 * time.Millisecond},
		{v: []any{int64(1), "-0.01"}, ok: true, wait: -10 * time.Millisecond},
		{v: []any{int64(0), "2"}, wait: 2 * time.Second},
		{v: []any{int64(1)}, err: true},
		{v: []any{int64(1), "soon"}, err: true},
	} {
		ok, wait, err := parseReserved(c.v)
		if (err != nil) != c.err || ok != c.ok || (err == nil && (wait-c.wait).Abs() > time.Microsecond) {
			t.Errorf("%v: %v %v %v", c.v, ok, wait, err)
		}
	}
}
