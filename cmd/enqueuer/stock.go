package main

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/hibiken/asynq"

	"github.com/couponflow/dispatcher/internal/breaker"
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
	b := breaker.New(rdb)
	if op == "resume" {
		if err := b.Resume(ctx, c.wx.MchID, *stock); err != nil {
			return err
		}
		// Held sends sleep in asynq's retry set until their next probe time;
		// wake them now. Other retries in the queue run early too, which is
		// safe: every send is idempotent by its out_request_no.
		woken := 0
		for _, q := range tasks.ShardQueues(*queue, c.shards) {
			n, err := asynq.NewInspectorFromRedisClient(rdb).RunAllRetryTasks(q)
			if err != nil {
				return fmt.Errorf("breaker closed, but waking the queue %s failed: %w", q, err)
			}
			woken += n
		}
		fmt.Fprintf(stdout, "stock %s: breaker closed; %d waiting sends in queue %s woken\n", *stock, woken, *queue)
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
	fmt.Fprintf(stdout, "stock %s: breaker OPEN since %s (budget exhausted); %d probes so far, next in %s (at %s), interval %s\n",
		*stock, st.OpenedAt.Format(time.RFC3339), st.Probes, time.Until(st.NextProbe).Round(time.Second),
		st.NextProbe.Format(time.RFC3339), st.Interval)
	return nil
}
