package monitor

import (
	"strings"
	"testing"
	"time"

	"github.com/couponflow/dispatcher/internal/breaker"
	"github.com/couponflow/dispatcher/internal/ratelimit"
)

// TestStateOf tables the campaign states of issue 14: each on-call
// situation the pages said "running" for, and what they say now.
func TestStateOf(t *testing.T) {
	now := time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)
	recent := now.Add(-10 * time.Second)
	dry := breaker.State{StockID: "16000004", Open: true, Reason: "NOT_ENOUGH: 批次预算不足"}
	stopped := breaker.State{StockID: "16000005", Open: true, Reason: "STOCK_STATUS_ERROR: stock 16000005 is stopped"}
	merchant := breaker.State{StockID: breaker.Merchant, Open: true, Reason: "SIGN_ERROR: bad signature"}
	cases := []struct {
		name      string
		in        stateInput
		want      string
		class     string
		whyHas    string
		notGreenT bool
	}{
		{"all succeeded", stateInput{Done: true, Total: 400, Finished: 400, Succeeded: 400, Workers: 2},
			StateDone, "done", "all 400 sends succeeded", false},
		{"all failed is not green", stateInput{Done: true, Total: 120, Finished: 120, Failed: 120, Workers: 2},
			StateDoneFailures, "bad", "all 120 sends failed", true},
		{"some failed", stateInput{Done: true, Total: 10, Finished: 10, Succeeded: 7, Failed: 3},
			StateDoneFailures, "bad", "3 of 10 sends failed", true},
		{"done with unknown", stateInput{Done: true, Total: 10, Finished: 9, Succeeded: 9, Unknown: 1},
			StateDoneFailures, "bad", "1 unknown", true},
		{"done after a cancel", stateInput{Done: true, Control: "cancelled", Total: 10, Finished: 10, Succeeded: 4, Cancelled: 6},
			StateDoneFailures, "bad", "6 cancelled", true},
		{"done needs no worker", stateInput{Done: true, Total: 5, Finished: 5, Succeeded: 5, Workers: 0},
			StateDone, "done", "succeeded", false},
		{"paused", stateInput{Control: "paused", Total: 10, Workers: 0},
			StatePaused, "paused", "paused", false},
		{"cancelled, calls in flight", stateInput{Control: "cancelled", Total: 10, InFlight: 1, Touched: 1, Workers: 1},
			StateCancelled, "cancelled", "cancelled", false},
		{"scheduled", stateInput{Total: 10, Scheduled: 10, Workers: 1},
			StateScheduled, "running", "start time", false},
		{"no worker", stateInput{Total: 400, Finished: 100, Succeeded: 100, Workers: 0, ChangedAt: recent},
			StateStalled, "bad", "no live worker", true},
		{"no worker beats a breaker", stateInput{Total: 10, WaitingBudget: 10, Touched: 10, Workers: 0, Breakers: []breaker.State{dry}},
			StateStalled, "bad", "no live worker", true},
		{"dry stock", stateInput{Total: 10, Finished: 2, Succeeded: 2, WaitingBudget: 8, Touched: 8, Workers: 1,
			ChangedAt: now.Add(-time.Hour), Breakers: []breaker.State{dry}},
			StateBlocked, "wait", "breaker of stock 16000004 (NOT_ENOUGH", true},
		{"stopped stock", stateInput{Total: 10, WaitingBudget: 10, Touched: 10, Workers: 1, Breakers: []breaker.State{stopped}},
			StateBlocked, "wait", "stock 16000005 is stopped", true},
		{"merchant breaker", stateInput{Total: 10, WaitingBudget: 10, Touched: 10, Workers: 1, Breakers: []breaker.State{merchant}},
			StateBlocked, "wait", "breaker of the merchant", true},
		{"open breaker but nothing held by it", stateInput{Total: 10, Finished: 5, Succeeded: 5, InFlight: 1, Touched: 1,
			Workers: 1, ChangedAt: recent, Breakers: []breaker.State{dry}},
			StateRunning, "running", "being called", false},
		{"rate limit", stateInput{Total: 10, Finished: 3, Succeeded: 3, WaitingRate: 7, Touched: 7, Workers: 1, ChangedAt: recent},
			StateBlocked, "wait", "rate limit", true},
		{"rate waits beside calls that settle", stateInput{Total: 10, Finished: 3, Succeeded: 3, WaitingRate: 6, InFlight: 1, Touched: 7,
			Settled10s: 2.5, Workers: 1, ChangedAt: recent}, StateRunning, "running", "", false},
		{"rate waits, calls in flight, nothing settled for 10 s", stateInput{Total: 10, Finished: 3, Succeeded: 3, WaitingRate: 6, InFlight: 1,
			Touched: 7, Workers: 1, ChangedAt: recent}, StateBlocked, "wait", "rate limit", true},
		{"stuck at 399 of 400", stateInput{Total: 400, Finished: 399, Succeeded: 399, Workers: 3, ChangedAt: now.Add(-12 * time.Minute)},
			StateStalled, "bad", "no send changed state for 12 min although 1 are not done", true},
		{"only orphans left", stateInput{Total: 400, Finished: 398, Succeeded: 398, WaitingBudget: 2, Touched: 2, Orphans: 2, Workers: 3,
			ChangedAt: recent, Breakers: []breaker.State{dry}}, StateStalled, "bad", "the 2 sends left wait for tasks asynq no longer holds", true},
		{"an orphan among sends that move", stateInput{Total: 400, Finished: 100, Succeeded: 100, InFlight: 4, Touched: 4, Orphans: 1,
			Settled10s: 20, Workers: 3, ChangedAt: recent}, StateRunning, "running", "", false},
		{"queued behind another campaign", stateInput{Total: 400, Workers: 3, ChangedAt: now.Add(-time.Hour)},
			StateQueued, "wait", "no send taken up yet", true},
		{"running", stateInput{Total: 400, Finished: 50, Succeeded: 45, Failed: 5, InFlight: 4, Touched: 4, Settled10s: 20, Workers: 3, ChangedAt: recent},
			StateRunning, "running", "", false},
		{"workers unreadable", stateInput{Total: 400, Finished: 50, Succeeded: 50, Workers: -1, ChangedAt: recent},
			StateRunning, "running", "", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tc.in.Now = now
			got := stateOf(tc.in)
			if got.State != tc.want || got.StateClass != tc.class || !strings.Contains(got.StateWhy, tc.whyHas) {
				t.Errorf("stateOf = %+v, want %s (class %s) saying %q", got, tc.want, tc.class, tc.whyHas)
			}
			if tc.notGreenT && got.StateClass == "done" {
				t.Errorf("%s is shown green", got.State)
			}
		})
	}
}

func TestAgo(t *testing.T) {
	for d, want := range map[time.Duration]string{
		40 * time.Second:              "40 s",
		3*time.Minute + time.Second:   "3 min",
		2*time.Hour + 5*time.Minute:   "2 h 5 min",
		5 * time.Hour:                 "5 h",
		71*time.Hour + 10*time.Minute: "2 days 23 h",
		72 * time.Hour:                "3 days",
		-40 * time.Second:             "40 s",
	} {
		if got := ago(d); got != want {
			t.Errorf("ago(%v) = %q, want %q", d, got, want)
		}
	}
}

func TestETA(t *testing.T) {
	now := time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		state     string
		remaining int64
		pace      float64
		want      string
		at        bool
	}{
		{StateRunning, 600, 10, "in 1 min", true},
		{StateRunning, 36000, 5, "in 2 h", true},
		{StateRunning, 10, 0, "unknown: no send settled in the last minute", false},
		{StateRunning, 0, 3, "any moment", false},
		{StateBlocked, 600, 0, "blocked", false},
		{StateStalled, 600, 2, "stalled", false},
		{StatePaused, 600, 0, "paused", false},
		{StateQueued, 600, 0, "queued", false},
	} {
		got, at := etaOf(tc.state, tc.remaining, tc.pace, now)
		if got != tc.want || at.IsZero() == tc.at {
			t.Errorf("etaOf(%s, %d, %v) = %q, %v; want %q (a time: %v)", tc.state, tc.remaining, tc.pace, got, at, tc.want, tc.at)
		}
	}
}

func TestThousands(t *testing.T) {
	for n, want := range map[int64]string{0: "0", 999: "999", 1000: "1,000", 120000: "120,000", 1234567: "1,234,567", -45000: "-45,000"} {
		if got := thousands(n); got != want {
			t.Errorf("thousands(%d) = %q, want %q", n, got, want)
		}
	}
}

// Times are short: no year when it is this year's, seconds kept; always
// UTC, in a <time> the page's script localises.
func TestShortTime(t *testing.T) {
	now := time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)
	cst := time.FixedZone("CST", 8*3600)
	for _, tc := range []struct {
		at   time.Time
		want string
	}{
		{time.Date(2026, 11, 30, 15, 4, 5, 0, time.UTC), "Nov 30 15:04:05 UTC"},
		{time.Date(2026, 12, 1, 7, 4, 5, 0, cst), "Nov 30 23:04:05 UTC"}, // in UTC whatever the zone
		{time.Date(2027, 1, 2, 3, 4, 5, 0, time.UTC), "2027-01-02 03:04 UTC"},
	} {
		if got := shortTime(tc.at, now); got != tc.want {
			t.Errorf("shortTime(%v) = %q, want %q", tc.at, got, tc.want)
		}
	}
	if got := string(when(time.Date(2026, 11, 30, 15, 4, 5, 0, time.UTC), now)); got != `<time datetime="2026-11-30T15:04:05Z">Nov 30 15:04:05 UTC</time>` {
		t.Errorf("when: %s", got)
	}
	if got := string(when(time.Time{}, now)); got != "–" {
		t.Errorf("when(zero) = %q", got)
	}
}

// Consumer funds read per minute, as WeChat states their limit.
func TestRatePer(t *testing.T) {
	for _, tc := range []struct {
		ep   ratelimit.Endpoint
		r    float64
		want string
	}{
		{ratelimit.SendCoupon, 500, "500.00/s"},
		{ratelimit.SendMultiuse, 1000.0 / 60, "1000.0/min"},
		{ratelimit.SendMultiuse, 2.5, "150.0/min"},
	} {
		if got := ratePer(tc.ep, tc.r); got != tc.want {
			t.Errorf("ratePer(%s, %g) = %q, want %q", tc.ep, tc.r, got, tc.want)
		}
	}
}

// The campaigns' waiting sends and asynq's live tasks: equal, or a
// sentence that says which way they differ and why.
func TestTallyWhy(t *testing.T) {
	for _, tc := range []struct {
		t    Tally
		want string
	}{
		{Tally{Waiting: 400, Tasks: 400}, ""},
		{Tally{Waiting: 400, Tasks: 398, Orphans: 2}, "2 more sends wait than asynq holds tasks: 2 are orphans"},
		{Tally{Waiting: 1400, Tasks: 200}, "1,200 more sends wait than asynq holds tasks: sends registered a moment before"},
		{Tally{Waiting: 10, Tasks: 15}, "asynq holds 5 more tasks than sends wait: copies queued by a resume or the sweeper"},
	} {
		got := tallyWhy(tc.t)
		if tc.want == "" && got != "" || !strings.HasPrefix(got, tc.want) {
			t.Errorf("tallyWhy(%+v) = %q, want %q…", tc.t, got, tc.want)
		}
	}
}

// Held sends' messages carry the time they are held until: one reason
// all the same.
func TestReasonMessage(t *testing.T) {
	a := reasonMessage("held: the stock's breaker is open until 2026-11-30T16:25:52Z (批次预算不足)")
	b := reasonMessage("held: the stock's breaker is open until 2026-11-30T16:25:44.123+08:00 (批次预算不足)")
	if a != b || a != "held: the stock's breaker is open until … (批次预算不足)" {
		t.Errorf("%q and %q", a, b)
	}
	if m := "stock 16000004 is stopped"; reasonMessage(m) != m {
		t.Errorf("a message without a time changed: %q", reasonMessage(m))
	}
}
