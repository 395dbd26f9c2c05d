package main

import (
	"context"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/couponflow/dispatcher/internal/dispatch"
	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/logging"
)

// cmdReconcile settles every unknown send of a campaign: the send's
// retries ran out without WeChat's answer, so only WeChat can say whether
// its coupon exists. The identical request, resent under the same
// out_request_no, returns the coupon if one was issued (whatever the
// budget) and WeChat's refusal otherwise; the answer is recorded as any
// worker would record it, under the same claim, rate limit and user lock.
func cmdReconcile(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	c := newFlags("reconcile", "--campaign NAME", stderr)
	name := c.fs.String("campaign", "", "campaign whose unknown sends to settle")
	concurrency := c.fs.Int("concurrency", 4, "resends in flight at once")
	rateLimits := c.fs.String("rate-limits", "", "the merchant's limits, as the workers' --rate-limits (shared with them through Redis)")
	if err := c.parse(args); err != nil {
		return err
	}
	cl, err := c.openCaller(ctx, *name, *concurrency, *rateLimits)
	if err != nil {
		return err
	}
	defer cl.rdb.Close()
	wx, store := cl.wx, cl.store
	log, err := logging.New(stderr, "text", "warn")
	if err != nil {
		return err
	}
	h := dispatch.New(dispatch.WeChat(wx), store, dispatch.WithLogger(log),
		dispatch.WithLimiter(cl.limiter, time.Minute))

	var (
		mu     sync.Mutex
		counts = map[idempotency.State]int{}
		failed error
	)
	unknown := make(chan idempotency.Record)
	var wg sync.WaitGroup
	for i := 0; i < *concurrency; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for rec := range unknown {
				line, state, err := settleOne(ctx, h, store, rec)
				mu.Lock()
				counts[state]++
				if err != nil && failed == nil {
					failed = err
				}
				fmt.Fprintln(stdout, line)
				mu.Unlock()
			}
		}()
	}
	total := 0
	err = store.Each(ctx, *name, func(rec idempotency.Record) error {
		if rec.State != idempotency.Unknown {
			return nil
		}
		total++
		select {
		case unknown <- rec:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	})
	close(unknown)
	wg.Wait()
	if err == nil {
		err = failed
	}
	still := counts[idempotency.Unknown] + counts[idempotency.Pending] + counts[idempotency.InFlight] +
		counts[idempotency.Retrying] + counts[idempotency.WaitingRate] + counts[idempotency.WaitingBudget]
	fmt.Fprintf(stdout, "campaign %s: %d unknown sends; %d succeeded, %d failed, %d still unknown\n",
		*name, total, counts[idempotency.Succeeded], counts[idempotency.Failed], still)
	switch {
	case err != nil:
		return fmt.Errorf("reconcile stopped: %w; run it again: a send already settled is not resent", err)
	case still > 0:
		return fmt.Errorf("%d sends are still unknown (WeChat did not answer); run reconcile again later", still)
	}
	return nil
}

// settleOne resends one unknown send and reads back what was recorded.
func settleOne(ctx context.Context, h *dispatch.Handler, store *idempotency.Store, rec idempotency.Record) (string, idempotency.State, error) {
	send := idempotency.Send{MchID: rec.MchID, OutRequestNo: rec.OutRequestNo, Campaign: rec.Campaign, OpenID: rec.OpenID, StockID: rec.StockID}
	if len(rec.Task) == 0 {
		return fmt.Sprintf("%s: still unknown: its task was not kept, so it cannot be resent here; list the user's coupons (enqueuer coupons --openid %s --stock-id %s)",
			rec.OutRequestNo, rec.OpenID, rec.StockID), idempotency.Unknown, nil
	}
	if err := h.Reconcile(ctx, rec.Task); err != nil {
		return fmt.Sprintf("%s: not recorded: %v", rec.OutRequestNo, err), idempotency.Unknown, err
	}
	now, err := store.Get(ctx, send)
	if err != nil {
		return fmt.Sprintf("%s: %v", rec.OutRequestNo, err), idempotency.Unknown, err
	}
	switch now.State {
	case idempotency.Succeeded:
		return fmt.Sprintf("%s: succeeded, coupon %s", rec.OutRequestNo, now.CouponID), now.State, nil
	case idempotency.Failed:
		return fmt.Sprintf("%s: failed %s: %s (no coupon was issued)", rec.OutRequestNo, now.Code, now.Message), now.State, nil
	}
	return fmt.Sprintf("%s: still %s: %s %s", rec.OutRequestNo, now.State, now.Code, now.Message), now.State, nil
}
