package monitor

import (
	"fmt"
	"strings"
	"time"

	"github.com/couponflow/dispatcher/internal/breaker"
)

// The states a campaign is shown in (Campaign.State). Each answers "is it
// moving, and if not, why not", so that "running" is said only of a
// campaign that is.
const (
	StateRunning   = "running"   // sends are being taken up and settled
	StateQueued    = "queued"    // live workers, but none of its sends taken up yet (other work ahead of it)
	StateScheduled = "scheduled" // its start time is still in the future
	StateBlocked   = "blocked"   // held by a stock's (or the merchant's) breaker, or by the rate limit
	StateStalled   = "stalled"   // no live worker, or no send changed state for StallAfter
	StatePaused    = "paused"
	StateCancelled = "cancelled" // cancelled, with calls still in flight
	StateDone      = "done"      // every send succeeded
	// StateDoneFailures: finished, but some sends failed, were cancelled
	// or are unknown: never shown as a plain green "done".
	StateDoneFailures = "done with failures"
)

// StallAfter is how long a campaign not done may go without any send
// changing state before it is called stalled: long enough for a slow
// rate-limited run (every claim and result changes the counters), short
// enough to catch a task lost from asynq (a record that waits for ever).
const StallAfter = 5 * time.Minute

// stateInput is what decides a campaign's state; everything is read
// before, so that stateOf is a pure function the tests can table.
type stateInput struct {
	Now       time.Time
	Control   string // running, paused, cancelled
	Done      bool
	Total     int64
	Finished  int64 // succeeded + failed + cancelled
	Succeeded int64
	Failed    int64
	Cancelled int64
	Unknown   int64
	Scheduled int64 // sends waiting for a start time in the future
	// Touched counts sends taken up but not finished: in flight, retrying,
	// waiting on the rate or on a budget.
	Touched       int64
	WaitingBudget int64
	WaitingRate   int64
	InFlight      int64
	// Orphans are sends waiting for a task asynq no longer holds.
	Orphans int64
	// Settled10s is sends settled (succeeded or failed) per second over
	// the last ten seconds.
	Settled10s float64
	// Workers is the number of live asynq servers serving the queue, -1
	// if it could not be read.
	Workers   int
	ChangedAt time.Time
	// Breakers are the open breakers that hold this campaign: those of its
	// stocks, and the merchant's.
	Breakers []breaker.State
}

// campaignState is a campaign's state: State (one of the State*
// constants), StateClass (the CSS class: green only for a clean done) and
// StateWhy, a sentence for the on-call engineer.
type campaignState struct {
	State      string `json:"state"`
	StateClass string `json:"-"`
	StateWhy   string `json:"state_reason"`
}

// stateOf decides a campaign's state. The order matters: an operator's
// pause or cancel explains everything; a campaign without a worker does
// not move whatever else holds it; a breaker or the rate limit explains a
// lack of progress, so they come before "no progress for minutes".
func stateOf(in stateInput) campaignState {
	if in.Done {
		bad := in.Failed + in.Cancelled + in.Unknown
		if bad == 0 {
			return campaignState{StateDone, "done", fmt.Sprintf("all %d sends succeeded", in.Total)}
		}
		var parts []string
		if in.Failed == in.Total {
			parts = append(parts, fmt.Sprintf("all %d sends failed", in.Total))
		} else if in.Failed > 0 {
			parts = append(parts, fmt.Sprintf("%d of %d sends failed", in.Failed, in.Total))
		}
		if in.Cancelled > 0 {
			parts = append(parts, fmt.Sprintf("%d cancelled", in.Cancelled))
		}
		if in.Unknown > 0 {
			parts = append(parts, fmt.Sprintf("%d unknown (run enqueuer reconcile)", in.Unknown))
		}
		return campaignState{StateDoneFailures, "bad", fmt.Sprintf("finished: %d succeeded; %s", in.Succeeded, strings.Join(parts, ", "))}
	}
	switch in.Control {
	case "paused":
		return campaignState{StatePaused, "paused", "an operator paused it: no send is called until it is resumed"}
	case "cancelled":
		return campaignState{StateCancelled, "cancelled", "an operator cancelled it: calls in flight finish, nothing new is called"}
	}
	if in.Scheduled > 0 {
		return campaignState{StateScheduled, "running", fmt.Sprintf("%d sends wait for the start time", in.Scheduled)}
	}
	if in.Workers == 0 {
		return campaignState{StateStalled, "bad", "no live worker serves the queue: start a worker (nothing moves until one runs)"}
	}
	// Sends whose task is gone move only once the sweeper queues them
	// again: when they are all that is left, nothing else will.
	if left := in.Total - in.Finished - in.Unknown; in.Orphans > 0 && in.Orphans >= left-in.InFlight && in.InFlight == 0 {
		return campaignState{StateStalled, "bad", fmt.Sprintf("the %d sends left wait for tasks asynq no longer holds (deleted or archived in asynqmon?): "+
			"the workers' sweeper queues them again once the campaign has not changed for WORKER_SWEEP_STALL (15 min by default)", in.Orphans)}
	}
	if len(in.Breakers) > 0 && in.WaitingBudget > 0 {
		b := in.Breakers[0]
		who := "stock " + b.StockID
		if b.StockID == breaker.Merchant || b.StockID == "" {
			who = "the merchant"
		}
		why := fmt.Sprintf("%d sends held by the breaker of %s", in.WaitingBudget, who)
		if b.Reason != "" {
			why += " (" + b.Reason + ")"
		}
		return campaignState{StateBlocked, "wait", why}
	}
	// Held by the rate: every send taken up waits for it, or some do and
	// nothing settled for ten seconds (the calls in flight are answered
	// 429 again); a campaign that moves at the limit is running.
	if in.WaitingRate > 0 && (in.InFlight == 0 && in.Touched == in.WaitingRate || in.Settled10s == 0) {
		return campaignState{StateBlocked, "wait", fmt.Sprintf("%d sends wait for WeChat's rate limit (FREQUENCY_LIMIT): they go out as it allows", in.WaitingRate)}
	}
	if !in.ChangedAt.IsZero() && in.Now.Sub(in.ChangedAt) >= StallAfter && (in.Finished > 0 || in.Touched > 0) {
		return campaignState{StateStalled, "bad", fmt.Sprintf("no send changed state for %s although %d are not done: a task may have been lost (deleted in asynqmon?)",
			ago(in.Now.Sub(in.ChangedAt)), in.Total-in.Finished-in.Unknown)}
	}
	if in.Finished == 0 && in.Touched == 0 {
		return campaignState{StateQueued, "wait", "no send taken up yet: the workers are busy with tasks queued before it"}
	}
	return campaignState{StateRunning, "running", "sends are being called and settled"}
}

// ago says a duration the way a person reads it: "40 s", "3 min",
// "2 h 5 min", "2 days 23 h".
func ago(d time.Duration) string {
	if d < 0 {
		d = -d
	}
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%d s", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%d min", int(d.Minutes()))
	case d < 48*time.Hour:
		h := int(d.Hours())
		if m := int(d.Minutes()) % 60; m != 0 {
			return fmt.Sprintf("%d h %d min", h, m)
		}
		return fmt.Sprintf("%d h", h)
	}
	days := int(d.Hours()) / 24
	if h := int(d.Hours()) % 24; h != 0 {
		return fmt.Sprintf("%d days %d h", days, h)
	}
	return fmt.Sprintf("%d days", days)
}
