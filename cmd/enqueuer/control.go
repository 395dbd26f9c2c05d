package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/user"
	"strings"

	"golang.org/x/term"

	"github.com/couponflow/dispatcher/internal/campaignctl"
	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/tasks"
)

// cmdControl is enqueuer campaign pause|resume|cancel: an operator's
// action on one campaign, held in its record so that every worker of the
// fleet obeys it at its next claim, and kept in the campaign's audit trail.
func cmdControl(ctx context.Context, op string, args []string, stdout, stderr io.Writer) error {
	c := newFlags("campaign "+op, "--campaign NAME [--yes]", stderr)
	name := c.fs.String("campaign", "", "campaign name")
	yes := c.fs.Bool("yes", false, "cancel without asking (needed when standard input is not a terminal)")
	queue := c.fs.String("queue", tasks.DefaultQueue, "the campaign's asynq queue: resume and cancel wake its waiting tasks there")
	drainWait := c.fs.Duration("wait", campaignctl.DefaultDrainWait, "pause and cancel: how long to wait for the calls in flight to finish and be recorded, so that none starts after the command returns")
	if err := c.parse(args); err != nil {
		return err
	}
	if err := need("--campaign", *name); err != nil {
		return err
	}
	rdb, err := c.redis(ctx, 4)
	if err != nil {
		return err
	}
	defer rdb.Close()
	ctl := &campaignctl.Controller{Store: c.store(rdb), Redis: rdb, Queues: tasks.ShardQueues(*queue, c.shards), DrainWait: *drainWait}
	who := operator()
	// refusal is what the operator asked wrongly: exit status 2, as for a
	// bad flag.
	refusal := func(err error) error {
		if campaignctl.IsRefused(err) {
			return &exitError{code: 2, err: err}
		}
		return err
	}

	switch op {
	case "pause":
		r, err := ctl.Pause(ctx, *name, who)
		if err != nil {
			return refusal(err)
		}
		fmt.Fprintf(stdout, "campaign %s: paused; %d sends not yet done wait without a call%s.\n"+
			"  Continue with: enqueuer campaign resume --campaign %s\n", *name, r.Waiting, drained(r.InFlight), *name)
		return nil
	case "resume":
		r, err := ctl.Resume(ctx, *name, who)
		if err != nil {
			return refusal(err)
		}
		if r.WakeErr != nil {
			return fmt.Errorf("campaign %s resumed, but waking its paused tasks failed after %d: %w; they go out within 5 minutes anyway, or run resume again", *name, r.Woken, r.WakeErr)
		}
		fmt.Fprintf(stdout, "campaign %s: resumed; %d sends not yet done, %d paused tasks woken into %s\n", *name, r.Waiting, r.Woken, tasks.WokenQueue(*queue))
		return nil
	}

	// cancel: the count first, and the operator's word for it.
	p, err := ctl.Preview(ctx, *name)
	if err != nil {
		return refusal(err)
	}
	if p.Campaign.Control == idempotency.CancelledByUser {
		fmt.Fprintf(stdout, "campaign %s is already cancelled; settling what still waits\n", *name)
	} else {
		fmt.Fprintf(stdout, "campaign %s: %d of %d sends are not done yet; cancelling records them cancelled and never calls them\n"+
			"  (a send a call may already have issued ends unknown instead, for reconcile)\n", *name, p.Waiting, p.Status.Total)
		if !*yes {
			ok, err := confirm(stdout, fmt.Sprintf("cancel campaign %s? type its name to confirm: ", *name), *name)
			if err != nil {
				return err
			}
			if !ok {
				return &exitError{code: 1, err: errors.New("not cancelled")}
			}
		}
	}
	r, err := ctl.Cancel(ctx, *name, who)
	if err != nil {
		return refusal(err)
	}
	if r.WakeErr != nil {
		fmt.Fprintf(stderr, "enqueuer: cancelled, but clearing its waiting tasks from asynq failed: %v; they end without a call when they come up\n", r.WakeErr)
	}
	st := r.Status
	fmt.Fprintf(stdout, "campaign %s: cancelled: %d sends cancelled, %d unknown, %d succeeded, %d failed%s\n", *name,
		st.ByState[idempotency.Cancelled], st.ByState[idempotency.Unknown], st.ByState[idempotency.Succeeded], st.ByState[idempotency.Failed], drained(r.InFlight))
	for i, u := range r.Unknown {
		if i == 20 {
			fmt.Fprintf(stdout, "  … and %d more\n", len(r.Unknown)-20)
			break
		}
		fmt.Fprintf(stdout, "  unknown: %s (openid %s): a call may have issued its coupon\n", u.OutRequestNo, u.OpenID)
	}
	if len(r.Unknown) > 0 {
		fmt.Fprintf(stdout, "  Settle them with: enqueuer reconcile --campaign %s\n", *name)
	}
	return nil
}

func drained(left int64) string {
	switch {
	case left == 0:
		return "; no call of it is in flight"
	case left < 0:
		return "; whether calls are still in flight could not be read"
	}
	return fmt.Sprintf("; %d sends are still in flight after --wait (a worker that died holds them until its lease runs out: they stop at their next claim)", left)
}

// operator names who runs the command, for the audit trail.
func operator() string {
	if u := os.Getenv("SUDO_USER"); u != "" {
		return u
	}
	if u, err := user.Current(); err == nil {
		return u.Username
	}
	return "unknown"
}

// confirm asks on a terminal; elsewhere it refuses, since nobody can answer.
func confirm(stdout io.Writer, prompt, want string) (bool, error) {
	if !term.IsTerminal(int(os.Stdin.Fd())) {
		return false, &exitError{code: 2, err: errors.New("standard input is not a terminal: add --yes to confirm")}
	}
	fmt.Fprint(stdout, prompt)
	line, err := bufio.NewReader(os.Stdin).ReadString('\n')
	if err != nil && line == "" {
		return false, err
	}
	return strings.TrimSpace(line) == want, nil
}

// refuseCancelled refuses to queue into a cancelled campaign unless
// reopen, which takes the cancel back (the cancelled sends stay so; retry
// queues them again).
func refuseCancelled(ctx context.Context, store *idempotency.Store, name string, reopen bool, stderr io.Writer) error {
	ctl, err := store.ControlOf(ctx, name)
	if err != nil || ctl != idempotency.CancelledByUser {
		if ctl == idempotency.Paused {
			fmt.Fprintf(stderr, "enqueuer: campaign %s is paused: these sends wait until enqueuer campaign resume --campaign %s\n", name, name)
		}
		return err
	}
	if !reopen {
		return &exitError{code: 2, err: fmt.Errorf("campaign %s was cancelled: nothing was queued. Add --reopen to queue into it again (its cancelled sends stay cancelled; enqueuer retry --campaign %s --state cancelled queues them)", name, name)}
	}
	if err := store.SetControl(ctx, name, idempotency.Running, idempotency.Action{Who: operator(), Action: "reopen"}); err != nil {
		return err
	}
	return store.ClearDone(ctx, name)
}

// checkNotifyURL refuses a webhook address a worker could not post to.
func checkNotifyURL(raw string) error {
	if raw == "" {
		return nil
	}
	u, err := url.Parse(raw)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return &exitError{code: 2, err: fmt.Errorf("--notify-url %q: want an http:// or https:// address", raw)}
	}
	return nil
}
