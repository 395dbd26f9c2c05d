package main

import (
	"context"
	"encoding/csv"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"sort"
	"time"

	"github.com/cenkalti/backoff/v4"

	"github.com/couponflow/dispatcher/internal/breaker"
	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/ratelimit"
	"github.com/couponflow/dispatcher/internal/wechat"
)

func cmdStatus(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	c := newFlags("status", "--campaign NAME [--watch 2s] [--json]", stderr)
	name := c.fs.String("campaign", "", "campaign name; empty lists the campaigns")
	watch := c.fs.Duration("watch", 0, "print again at this interval until every send is done")
	asJSON := c.fs.Bool("json", false, "print JSON")
	if err := c.parse(args); err != nil {
		return err
	}
	rdb, err := c.redis(ctx, 2)
	if err != nil {
		return err
	}
	defer rdb.Close()
	store := idempotency.New(rdb)
	if *name == "" {
		names, err := store.Campaigns(ctx)
		if err != nil {
			return err
		}
		for _, n := range names {
			fmt.Fprintln(stdout, n)
		}
		return nil
	}
	meta, err := campaignOf(ctx, store, *name)
	if err != nil {
		return err
	}
	limiter := ratelimit.New(rdb)
	breakers := breaker.New(rdb)
	for {
		st, err := store.Status(ctx, *name)
		if err != nil {
			return err
		}
		fleet, err := fleetOf(ctx, limiter, breakers, meta.MchID)
		if err != nil {
			return err
		}
		if *asJSON {
			printStatusJSON(stdout, meta, st, fleet)
		} else {
			printStatus(stdout, meta, st, fleet)
		}
		if *watch <= 0 || st.Done() {
			return nil
		}
		select {
		case <-ctx.Done():
			return &exitError{code: 130, err: fmt.Errorf("interrupted before campaign %s was done", *name)}
		case <-time.After(*watch):
		}
	}
}

// campaignOf reads a campaign that must exist.
func campaignOf(ctx context.Context, store *idempotency.Store, name string) (idempotency.Campaign, error) {
	meta, err := store.Campaign(ctx, name)
	if err == nil && meta.Name == "" {
		err = &exitError{code: 2, err: fmt.Errorf("no campaign %q; run enqueuer status without --campaign to list them", name)}
	}
	return meta, err
}

// fleet is what the workers share: the current rates and open breakers.
type fleet struct {
	Rates    map[ratelimit.Endpoint]float64
	Breakers []breaker.State
}

func fleetOf(ctx context.Context, l *ratelimit.Limiter, b *breaker.Breakers, mchID string) (fleet, error) {
	f := fleet{Rates: map[ratelimit.Endpoint]float64{}}
	for _, ep := range []ratelimit.Endpoint{ratelimit.SendCoupon, ratelimit.SendMultiuse} {
		r, err := l.Rate(ctx, mchID, ep)
		if err != nil {
			return f, err
		}
		f.Rates[ep] = r
	}
	var err error
	f.Breakers, err = b.Open(ctx, mchID)
	return f, err
}

func printStatus(w io.Writer, meta idempotency.Campaign, st idempotency.Status, f fleet) {
	done := st.ByState[idempotency.Succeeded] + st.ByState[idempotency.Failed]
	pct := 0.0
	if st.Total > 0 {
		// Truncated, so that 100.0% means done.
		pct = math.Floor(1000*float64(done)/float64(st.Total)) / 10
	}
	fmt.Fprintf(w, "campaign %s (merchant %s, deadline %s): %d of %d done (%.1f%%), %.1f sends/s over the last minute, %.1f over the last 10s\n",
		meta.Name, meta.MchID, meta.Deadline.Format(time.RFC3339), done, st.Total, pct, st.Rate, st.Rate10s)
	if st.Missing() > 0 {
		fmt.Fprintf(w, "  WARNING: %s (%d recorded, %d counted by its last complete enqueue)\n", st.MissingAdvice(), st.Total, st.Expected)
	}
	for _, s := range idempotency.States {
		fmt.Fprintf(w, "  %-15s %d\n", s, st.ByState[s])
	}
	codes := make([]string, 0, len(st.FailedByCode))
	for code := range st.FailedByCode {
		codes = append(codes, code)
	}
	sort.Strings(codes)
	for _, code := range codes {
		fmt.Fprintf(w, "    failed %-22s %d\n", code, st.FailedByCode[code])
	}
	if n := st.ByState[idempotency.Unknown]; n > 0 {
		fmt.Fprintf(w, "  %d sends are unknown: WeChat never answered them and their coupons may exist; do not resend them elsewhere. Run: enqueuer reconcile --campaign %s\n", n, meta.Name)
	}
	fmt.Fprintf(w, "  shared rate now: %s %.1f/s, %s %.2f/s (the configured limit, or less for a while after WeChat answered 429)\n",
		ratelimit.SendCoupon, f.Rates[ratelimit.SendCoupon], ratelimit.SendMultiuse, f.Rates[ratelimit.SendMultiuse])
	for _, b := range f.Breakers {
		fmt.Fprintf(w, "  stock %s: budget breaker OPEN since %s, next probe %s (every %s)\n",
			b.StockID, b.OpenedAt.Format(time.RFC3339), b.NextProbe.Format(time.RFC3339), b.Interval)
	}
}

func printStatusJSON(w io.Writer, meta idempotency.Campaign, st idempotency.Status, f fleet) {
	byState := map[string]int64{}
	for s, n := range st.ByState {
		byState[string(s)] = n
	}
	_ = json.NewEncoder(w).Encode(map[string]any{
		"campaign": meta.Name, "mchid": meta.MchID, "deadline": meta.Deadline.Format(time.RFC3339),
		"total": st.Total, "by_state": byState, "failed_by_code": st.FailedByCode,
		"rate_per_second": st.Rate, "rate_10s": st.Rate10s, "done": st.Done(),
		"expected": st.Expected, "missing": st.Missing(),
		"shared_rates": f.Rates, "open_breakers": f.Breakers,
	})
}

func cmdReport(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	c := newFlags("report", "--campaign NAME --out results.csv", stderr)
	name := c.fs.String("campaign", "", "campaign name")
	out := c.fs.String("out", "", "CSV file to write; - for standard output")
	if err := c.parse(args); err != nil {
		return err
	}
	if err := need("--campaign", *name, "--out", *out); err != nil {
		return err
	}
	rdb, err := c.redis(ctx, 2)
	if err != nil {
		return err
	}
	defer rdb.Close()
	store := idempotency.New(rdb)
	if _, err := campaignOf(ctx, store, *name); err != nil {
		return err
	}
	var w io.Writer = stdout
	var f *os.File
	if *out != "-" {
		// Written beside the target and renamed, so a report that is read
		// is always a whole one.
		f, err = os.CreateTemp(dirOf(*out), ".report-*.csv")
		if err != nil {
			return err
		}
		defer os.Remove(f.Name())
		w = f
	}
	cw := csv.NewWriter(w)
	_ = cw.Write(idempotency.ReportHeader)
	n := 0
	err = store.Each(ctx, *name, func(r idempotency.Record) error {
		n++
		return cw.Write(r.ReportRow())
	})
	cw.Flush()
	if err == nil {
		err = cw.Error()
	}
	if err != nil {
		return err
	}
	if f != nil {
		if err := f.Close(); err != nil {
			return err
		}
		if err := os.Rename(f.Name(), *out); err != nil {
			return err
		}
		fmt.Fprintf(stderr, "wrote %d rows to %s\n", n, *out)
	}
	return nil
}

func dirOf(path string) string {
	for i := len(path) - 1; i >= 0; i-- {
		if path[i] == '/' {
			return path[:i+1]
		}
	}
	return "."
}

func cmdCoupons(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	c := newFlags("coupons", "--openid ID [--stock-id ID] [--status SENDED|USED] [--json]", stderr)
	openid := c.fs.String("openid", "", "user's openid")
	stock := c.fs.String("stock-id", "", "only this stock")
	status := c.fs.String("status", "", "SENDED or USED")
	creator := c.fs.String("creator-mchid", "", "creator_mchid filter; default the merchant id unless --available-mchid or --sender-mchid is set")
	sender := c.fs.String("sender-mchid", "", "sender_mchid filter")
	available := c.fs.String("available-mchid", "", "available_mchid filter (WeChat then returns only usable coupons, unpaged)")
	business := c.fs.String("business-type", "", "MULTIUSE to list consumer funds")
	asJSON := c.fs.Bool("json", false, "print JSON")
	if err := c.parse(args); err != nil {
		return err
	}
	if err := need("--openid", *openid); err != nil {
		return err
	}
	if err := c.wx.Validate(); err != nil {
		return &exitError{code: 2, err: fmt.Errorf("WeChat Pay configuration:\n%w", err)}
	}
	wx, err := wechat.New(ctx, c.wx)
	if err != nil {
		return err
	}
	req := wechat.ListCouponsRequest{OpenID: *openid, StockID: *stock, Status: *status,
		CreatorMchID: *creator, SenderMchID: *sender, AvailableMchID: *available, BusinessType: *business}
	// A listing changes nothing, so any failure that is not the request's
	// own fault is worth a few more tries.
	var coupons []wechat.Coupon
	b := backoff.NewExponentialBackOff()
	b.MaxElapsedTime = 30 * time.Second
	err = backoff.Retry(func() error {
		var err error
		coupons, err = wx.ListAllUserCoupons(ctx, req)
		if wechat.ClassOf(err) == wechat.Permanent {
			return backoff.Permanent(err)
		}
		return err
	}, backoff.WithContext(b, ctx))
	if err != nil {
		return err
	}
	if *asJSON {
		return json.NewEncoder(stdout).Encode(coupons)
	}
	noun := "coupons"
	if len(coupons) == 1 {
		noun = "coupon"
	}
	fmt.Fprintf(stdout, "%d %s of %s\n", len(coupons), noun, *openid)
	for _, cp := range coupons {
		amount := ""
		if cp.NormalCoupon != nil {
			amount = fmt.Sprintf("%d/%d fen", cp.NormalCoupon.CouponAmount, cp.NormalCoupon.TransactionMinimum)
		}
		fmt.Fprintf(stdout, "  %s  stock %s  %-6s  %s  %s\n", cp.CouponID, cp.StockID, cp.Status, cp.CreateTime, amount)
	}
	return nil
}
