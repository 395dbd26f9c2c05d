package redisconn

import (
	"context"
	"errors"
	"time"

	"github.com/redis/go-redis/v9"
)

// WaitOptions tune WaitReady; zero values take the defaults.
type WaitOptions struct {
	// Poll is the time between checks, 1s by default.
	Poll time.Duration
	// Every is how often Waiting is called again while Redis still does
	// not answer, 10s by default.
	Every time.Duration
	// Waiting is called at the first failed check and then every Every,
	// with the last error and how long the wait has lasted.
	Waiting func(err error, waited time.Duration)
	// Ready is called once the check succeeds after at least one failure.
	Ready func(waited time.Duration)
}

// WaitReady checks the deployment (Check) until it answers, for a program
// started while Redis is down, restarting or still loading its data set
// (a LOADING error counts as not ready). It returns nil once Redis
// answers, a *MisconfiguredError at once, or ctx's error when ctx ends
// first.
func WaitReady(ctx context.Context, c redis.UniversalClient, spec Spec, o WaitOptions) error {
	if o.Poll <= 0 {
		o.Poll = time.Second
	}
	if o.Every <= 0 {
		o.Every = 10 * time.Second
	}
	start := time.Now()
	var told time.Time
	for {
		checkCtx, cancel := context.WithTimeout(ctx, checkTimeout)
		err := Check(checkCtx, c, spec)
		cancel()
		if err == nil {
			if !told.IsZero() && o.Ready != nil {
				o.Ready(time.Since(start))
			}
			return nil
		}
		if _, ok := errors.AsType[*MisconfiguredError](err); ok {
			return err
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if o.Waiting != nil && (told.IsZero() || time.Since(told) >= o.Every) {
			told = time.Now()
			o.Waiting(err, time.Since(start))
		} else if told.IsZero() {
			told = time.Now()
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(o.Poll):
		}
	}
}
