package main

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/couponflow/dispatcher/internal/redeem"
	"github.com/couponflow/dispatcher/internal/wechat"
)

// cmdCallbacks sets or shows the merchant's notification URL, where WeChat
// posts COUPON.USE notifications: the receiver's public address.
func cmdCallbacks(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || (args[0] != "set" && args[0] != "show") {
		return &exitError{code: 2, err: fmt.Errorf("usage: enqueuer callbacks set --url https://…/wechatpay/coupon-use | enqueuer callbacks show")}
	}
	sub := args[0]
	c := newFlags("callbacks "+sub, map[string]string{"set": "--url URL", "show": ""}[sub], stderr)
	u := ""
	if sub == "set" {
		c.fs.StringVar(&u, "url", "", "the receiver's public URL, https and without parameters (WeChat's rule; the sandbox takes http)")
	}
	if err := c.parse(args[1:]); err != nil {
		return err
	}
	if sub == "set" {
		if err := need("--url", u); err != nil {
			return err
		}
	}
	if err := c.wx.Validate(); err != nil {
		return &exitError{code: 2, err: fmt.Errorf("WeChat Pay configuration:\n%w", err)}
	}
	wx, err := wechat.New(ctx, c.wx)
	if err != nil {
		return err
	}
	if sub == "set" {
		cb, err := wx.SetCallback(ctx, u)
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "notify_url of merchant %s set to %s at %s\n", cb.MchID, cb.NotifyURL, cb.UpdateTime)
		return nil
	}
	cb, err := wx.QueryCallback(ctx)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "notify_url of merchant %s: %s\n", cb.MchID, cb.NotifyURL)
	return nil
}

// cmdRedemptions backfills a campaign's redemptions from the list API.
func cmdRedemptions(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || args[0] != "sync" {
		return &exitError{code: 2, err: fmt.Errorf("usage: enqueuer redemptions sync --campaign NAME")}
	}
	c := newFlags("redemptions sync", "--campaign NAME", stderr)
	name := c.fs.String("campaign", "", "campaign whose issued coupons to check")
	concurrency := c.fs.Int("concurrency", 8, "listings in flight at once")
	rateLimits := c.fs.String("rate-limits", "", "the merchant's limits, as the workers' --rate-limits; listings take favor_list slots (500/s per WeChat) shared through Redis")
	if err := c.parse(args[1:]); err != nil {
		return err
	}
	cl, err := c.openCaller(ctx, *name, *concurrency, *rateLimits)
	if err != nil {
		return err
	}
	defer cl.rdb.Close()
	wx, store := cl.wx, cl.store
	start := time.Now()
	res, err := redeem.Sync(ctx, *name, redeem.SyncConfig{Store: store, Lister: wx, Limiter: cl.limiter,
		MchID: c.wx.MchID, Concurrency: *concurrency})
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "campaign %s: %d issued coupons not known as used were listed in %s; %d were used and no notification had recorded them (recorded now), %d were recorded by a notification meanwhile; %d were already recorded as used\n",
		*name, res.Checked, time.Since(start).Round(time.Millisecond), res.Found, res.Already, res.Known)
	if res.Indexed > 0 {
		fmt.Fprintf(stdout, "  %d coupons issued before the coupon index existed were added to it, so the receiver finds their notifications\n", res.Indexed)
	}
	if res.Failed > 0 {
		for _, e := range res.Errors {
			fmt.Fprintf(stderr, "  %v\n", e)
		}
		return fmt.Errorf("%d listings failed; run the same command again", res.Failed)
	}
	st, err := store.Status(ctx, *name)
	if err == nil {
		fmt.Fprintf(stdout, "  %s\n", redemptionLine(st))
	}
	return err
}
