// Package campaignctl pauses, resumes and cancels a campaign: the one
// implementation behind enqueuer campaign pause|resume|cancel and the
// monitor's buttons. The record (package idempotency) holds the control,
// so every worker obeys it at its next claim; this package adds what an
// operator's action needs around it: the count of sends it touches, the
// audit entry, waiting for the calls in flight (so that none starts after
// the action returns), and waking the campaign's tasks that sleep in
// asynq's retry set (so that a resume or a cancel takes effect now, not
// at their next retry time).
package campaignctl

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/tasks"
)

// DefaultDrainWait is how long Pause and Cancel wait by default for the
// calls in flight to finish and be recorded.
const DefaultDrainWait = 45 * time.Second

// RefusedError is an action that makes no sense in the campaign's state
// (no such campaign, pausing a cancelled one): the operator's mistake, not
// a failure of Redis, and nothing was changed.
type RefusedError struct{ Reason string }

func (e *RefusedError) Error() string { return e.Reason }

func refused(format string, args ...any) error {
	return &RefusedError{Reason: fmt.Sprintf(format, args...)}
}

// IsRefused reports whether err is a RefusedError.
func IsRefused(err error) bool {
	var r *RefusedError
	return errors.As(err, &r)
}

// Controller acts on the campaigns of one store and queue.
type Controller struct {
	Store *idempotency.Store
	// Redis holds asynq's queues, where the campaign's tasks are woken.
	Redis redis.UniversalClient
	// Queues are the campaign's asynq queues (tasks.ShardQueues).
	Queues []string
	// DrainWait bounds Pause's and Cancel's wait for calls in flight
	// (DefaultDrainWait when zero).
	DrainWait time.Duration
	// Note is kept with every action in the audit trail: where it came
	// from ("monitor"), beside who.
	Note string
}

// Preview is a campaign as an action would find it: what to show before
// asking for confirmation.
type Preview struct {
	Campaign idempotency.Campaign
	Status   idempotency.Status
	// Waiting counts the sends not yet done (pending, scheduled, retrying,
	// waiting, in flight): those a pause holds and a cancel settles.
	Waiting int64
}

// Result is what an action did.
type Result struct {
	Preview
	// Woken counts the tasks moved from asynq's retry set into the woken
	// queue (resume and cancel).
	Woken int
	// WakeErr is a failure to wake them after the action itself held:
	// the tasks still come up at their retry time.
	WakeErr error
	// InFlight counts the sends still in flight once the wait was over
	// (-1: it could not be read); 0 means no call of the campaign can
	// start any more.
	InFlight int64
	// Unknown lists the sends a cancel found possibly issued (a call was
	// made): they stay unknown, for reconcile.
	Unknown []idempotency.Record
	// AlreadyCancelled: Cancel found the campaign cancelled and only
	// settled what still waited.
	AlreadyCancelled bool
}

// Waiting counts the sends of st not yet done.
func Waiting(st idempotency.Status) int64 {
	return st.Total - st.ByState[idempotency.Succeeded] - st.ByState[idempotency.Failed] -
		st.ByState[idempotency.Cancelled] - st.ByState[idempotency.Unknown]
}

// Preview reads a campaign; an unknown one is a RefusedError.
func (c *Controller) Preview(ctx context.Context, name string) (Preview, error) {
	camp, err := c.Store.Campaign(ctx, name)
	if err != nil {
		return Preview{}, err
	}
	if camp.Name == "" {
		return Preview{}, refused("no campaign %q in Redis", name)
	}
	st, err := c.Store.Status(ctx, name)
	if err != nil {
		return Preview{}, err
	}
	return Preview{Campaign: camp, Status: st, Waiting: Waiting(st)}, nil
}

// Pause holds every send of the campaign not yet called, across the
// fleet, and returns once the calls in flight are recorded (or after
// DrainWait). who is kept in the audit trail.
func (c *Controller) Pause(ctx context.Context, name, who string) (Result, error) {
	p, err := c.Preview(ctx, name)
	if err != nil {
		return Result{}, err
	}
	if p.Campaign.Control == idempotency.CancelledByUser {
		return Result{Preview: p}, refused("campaign %s is cancelled; there is nothing to pause", name)
	}
	if err := c.Store.SetControl(ctx, name, idempotency.Paused, idempotency.Action{Who: who, Action: "pause", Sends: p.Waiting, Note: c.Note}); err != nil {
		return Result{Preview: p}, err
	}
	return Result{Preview: p, InFlight: c.drain(ctx, name)}, nil
}

// Resume lets the campaign's sends be called again and wakes those asynq
// holds in its retry set. A failure to wake them is in WakeErr, with the
// count woken so far in Woken: the campaign is resumed all the same.
func (c *Controller) Resume(ctx context.Context, name, who string) (Result, error) {
	p, err := c.Preview(ctx, name)
	if err != nil {
		return Result{}, err
	}
	if p.Campaign.Control == idempotency.CancelledByUser {
		return Result{Preview: p}, refused("campaign %s is cancelled, not paused: queue what you want sent again with enqueuer retry --campaign %s --state cancelled", name, name)
	}
	if err := c.Store.SetControl(ctx, name, idempotency.Running, idempotency.Action{Who: who, Action: "resume", Sends: p.Waiting, Note: c.Note}); err != nil {
		return Result{Preview: p}, err
	}
	r := Result{Preview: p}
	r.Woken, r.WakeErr = c.wakeAll(ctx, name)
	return r, nil
}

// Cancel records every send not yet called cancelled, never to be called;
// calls in flight finish and are recorded for what they are, and a send a
// call may have issued stays unknown (listed in Unknown). It returns once
// no call of the campaign is in flight (or after DrainWait), with Status
// read again. Cancelling a cancelled campaign settles what still waits.
func (c *Controller) Cancel(ctx context.Context, name, who string) (Result, error) {
	p, err := c.Preview(ctx, name)
	if err != nil {
		return Result{}, err
	}
	r := Result{Preview: p, AlreadyCancelled: p.Campaign.Control == idempotency.CancelledByUser}
	if err := c.Store.SetControl(ctx, name, idempotency.CancelledByUser, idempotency.Action{Who: who, Action: "cancel", Sends: p.Waiting, Note: c.Note}); err != nil {
		return r, err
	}
	n, err := c.Store.CancelSends(ctx, name)
	if err != nil {
		return r, fmt.Errorf("campaign %s is cancelled (no send of it will be called), but settling its waiting sends failed: %w; run cancel again", name, err)
	}
	r.InFlight = c.drain(ctx, name)
	if n.InFlight > 0 {
		// Their calls are over now: settle what they left waiting.
		more, err := c.Store.CancelSends(ctx, name)
		if err != nil {
			return r, err
		}
		n.Unknown = append(n.Unknown, more.Unknown...)
	}
	r.Unknown = n.Unknown
	// Their tasks would otherwise sit in asynq until their retry time.
	r.Woken, r.WakeErr = c.wakeAll(ctx, name)
	if r.Status, err = c.Store.Status(ctx, name); err != nil {
		return r, err
	}
	return r, nil
}

func (c *Controller) wakeAll(ctx context.Context, name string) (int, error) {
	n := 0
	queues := c.Queues
	if len(queues) == 0 {
		queues = []string{tasks.DefaultQueue}
	}
	for _, q := range queues {
		m, err := Wake(ctx, c.Redis, q, func(b tasks.Common) bool { return b.Campaign == name })
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// drain waits until no send of the campaign is in flight, or for
// DrainWait, and returns how many still are (-1 if that could not be
// read). A claim taken before the pause or cancel either calls and
// records before it is released, or reads the control again and gives
// the send back: once none is in flight, no call of the campaign can
// start.
func (c *Controller) drain(ctx context.Context, name string) int64 {
	wait := c.DrainWait
	if wait <= 0 {
		wait = DefaultDrainWait
	}
	deadline := time.Now().Add(wait)
	for {
		st, err := c.Store.Status(ctx, name)
		if err == nil && st.ByState[idempotency.InFlight] == 0 {
			return 0
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			if err != nil {
				return -1
			}
			return st.ByState[idempotency.InFlight]
		}
		select {
		case <-ctx.Done():
		case <-time.After(50 * time.Millisecond):
		}
	}
}
