package main

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/couponflow/dispatcher/internal/breaker"
	"github.com/couponflow/dispatcher/internal/campaignctl"
	"github.com/couponflow/dispatcher/internal/tasks"
)

func cmdStock(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || (args[0] != "status" && args[0] != "resume") {
		return &exitError{code: 2, err: fmt.Errorf("usage: enqueuer stock status|resume --stock-id ID")}
	}
	op := args[0]
	c := newFlags("stock "+op, "--stock-id ID", stderr)
	stock := c.fs.String("stock-id", "", "stock (批次) id")
	queue := c.fs.String("queue", tasks.DefaultQueue, "with resume: the queue whose waiting sends are woken at once")
	if err := c.parse(args[1:]); err != nil {
		return err
	}
	if err := need("--stock-id", *stock, "--mchid or WECHATPAY_MCHID", c.wx.MchID); err != nil {
		return err
	}
	rdb, err := c.redis(ctx, 2)
	if err != nil {
		return err
	}
	defer rdb.Close()
	b := c.breakers(rdb)
	if op == "resume" {
		if err := b.Resume(ctx, c.wx.MchID, *stock); err != nil {
			return err
		}
		// Held sends sleep in asynq's retry set until their next probe time.
		// Woken into their own queue, they go out ahead of any backlog.
		woken := 0
		for _, q := range tasks.ShardQueues(*queue, c.shards) {
			n, err := campaignctl.Wake(ctx, rdb, q, func(b tasks.Common) bool { return b.MchID == c.wx.MchID && b.StockID == *stock })
			woken += n
			if err != nil {
				return fmt.Errorf("breaker closed, but waking the sends held in %s failed after %d: %w; run resume again", q, woken, err)
			}
		}
		fmt.Fprintf(stdout, "stock %s: breaker closed; %d held sends woken into %s, served before the rest of the queue\n",
			*stock, woken, tasks.WokenQueue(*queue))
		return nil
	}
	st, err := b.Status(ctx, c.wx.MchID, *stock)
	if err != nil {
		return err
	}
	if !st.Open {
		fmt.Fprintf(stdout, "stock %s: breaker closed; sends flow\n", *stock)
		return nil
	}
	fmt.Fprintf(stdout, "stock %s: breaker OPEN since %s (%s); %d probes so far, next in %s (at %s), interval %s\n",
		*stock, st.OpenedAt.Format(time.RFC3339), breakerReason(st), st.Probes, time.Until(st.NextProbe).Round(time.Second),
		st.NextProbe.Format(time.RFC3339), st.Interval)
	return nil
}

// breakerReason is what WeChat said when the breaker opened.
func breakerReason(st breaker.State) string {
	if st.Reason == "" || st.Reason == "NOT_ENOUGH" {
		return "budget exhausted"
	}
	return st.Reason
}
