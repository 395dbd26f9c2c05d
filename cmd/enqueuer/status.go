package main

import (
	"compress/gzip"
	"context"
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/cenkalti/backoff/v4"

	"github.com/couponflow/dispatcher/internal/breaker"
	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/ratelimit"
	"github.com/couponflow/dispatcher/internal/tasks"
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
	store := c.store(rdb)
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
	var expired *idempotency.ExpiredError
	if errors.As(err, &expired) {
		printTomb(stdout, expired.Tomb, *asJSON)
		return nil
	}
	if err != nil {
		return err
	}
	limiter := c.limiter(rdb)
	breakers := c.breakers(rdb)
	for {
		st, err := store.Status(ctx, *name)
		if err != nil {
			return err
		}
		fleet, err := fleetOf(ctx, limiter, breakers, meta.MchID)
		if err != nil {
			return err
		}
		// Read each round: an operator may pause or cancel it meanwhile.
		if m, err := store.Campaign(ctx, *name); err == nil && m.Name != "" {
			meta = m
		}
		audit, err := store.Audit(ctx, *name)
		if err != nil {
			return err
		}
		if *asJSON {
			printStatusJSON(stdout, meta, st, fleet, audit)
		} else {
			printStatus(stdout, meta, st, fleet, audit)
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

// campaignOf reads a campaign that must exist; one whose retention has
// passed is an *idempotency.ExpiredError, which says what is left of it.
func campaignOf(ctx context.Context, store *idempotency.Store, name string) (idempotency.Campaign, error) {
	meta, err := store.Campaign(ctx, name)
	if err == nil && meta.Name == "" {
		tomb, ok, terr := store.Tomb(ctx, name)
		switch {
		case terr != nil:
			err = terr
		case ok:
			err = &exitError{code: 2, err: &idempotency.ExpiredError{Tomb: tomb}}
		default:
			err = &exitError{code: 2, err: fmt.Errorf("no campaign %q; run enqueuer status without --campaign to list them", name)}
		}
	}
	return meta, err
}

// printTomb describes a campaign whose retention has passed.
func printTomb(w io.Writer, t idempotency.Tomb, asJSON bool) {
	if asJSON {
		_ = json.NewEncoder(w).Encode(map[string]any{
			"campaign": t.Campaign, "mchid": t.MchID, "expired": true, "finished_at": t.FinishedAt.UTC().Format(time.RFC3339),
			"expired_at": t.ExpiresAt.UTC().Format(time.RFC3339), "retention": t.Retention.String(),
			"total": t.Total, "succeeded": t.Succeeded, "failed": t.Failed, "report": t.Report,
		})
		return
	}
	fmt.Fprintf(w, "campaign %s (merchant %s): finished %s, %d sends: %d succeeded, %d failed\n",
		t.Campaign, t.MchID, t.FinishedAt.UTC().Format(time.RFC3339), t.Total, t.Succeeded, t.Failed)
	fmt.Fprintf(w, "  its records expired at %s (retention %s); only this tombstone is left\n", t.ExpiresAt.UTC().Format(time.RFC3339), t.Retention)
	if t.Report != "" {
		fmt.Fprintf(w, "  report archived to %s\n", t.Report)
	} else {
		fmt.Fprintln(w, "  its report was not archived")
	}
}

// retentionLine says how long a campaign's records are kept.
func retentionLine(meta idempotency.Campaign) string {
	var line string
	if meta.ExpiresAt.IsZero() {
		line = fmt.Sprintf("records kept %s once every send has succeeded or failed", meta.Retention)
	} else {
		line = fmt.Sprintf("settled %s; records kept until %s (retention %s)", meta.FinishedAt.UTC().Format(time.RFC3339),
			meta.ExpiresAt.UTC().Format(time.RFC3339), meta.Retention)
	}
	if meta.Report != "" {
		line += "; report archived to " + meta.Report
	}
	return line
}

// fleet is what the workers share: the rates they use (as they wrote them
// to Redis, whatever this command's --rate-limits) and the open breakers.
type fleet struct {
	Rates    map[ratelimit.Endpoint]float64
	Shared   map[ratelimit.Endpoint]ratelimit.Shared
	Breakers []breaker.State
}

func fleetOf(ctx context.Context, l *ratelimit.Limiter, b *breaker.Breakers, mchID string) (fleet, error) {
	f := fleet{Rates: map[ratelimit.Endpoint]float64{}, Shared: map[ratelimit.Endpoint]ratelimit.Shared{}}
	for _, ep := range tasks.Endpoints() {
		sh, err := l.Fleet(ctx, mchID, ep)
		if err != nil {
			return f, err
		}
		f.Rates[ep], f.Shared[ep] = sh.Rate, sh
	}
	var err error
	f.Breakers, err = b.Open(ctx, mchID)
	return f, err
}

func printStatus(w io.Writer, meta idempotency.Campaign, st idempotency.Status, f fleet, audit []idempotency.Action) {
	done := st.ByState[idempotency.Succeeded] + st.ByState[idempotency.Failed] + st.ByState[idempotency.Cancelled]
	pct := 0.0
	if st.Total > 0 {
		// Truncated, so that 100.0% means done.
		pct = math.Floor(1000*float64(done)/float64(st.Total)) / 10
	}
	fmt.Fprintf(w, "campaign %s (merchant %s, deadline %s): %d of %d done (%.1f%%), %.1f sends/s over the last minute, %.1f over the last 10s\n",
		meta.Name, meta.MchID, meta.Deadline.Format(time.RFC3339), done, st.Total, pct, st.Rate, st.Rate10s)
	if n := scheduled(meta, st); n > 0 {
		fmt.Fprintf(w, "  %d scheduled to start at %s\n", n, meta.StartAt.Format(time.RFC3339))
	}
	if st.Missing() > 0 {
		fmt.Fprintf(w, "  WARNING: %s (%d recorded, %d counted by its last complete enqueue)\n", st.MissingAdvice(), st.Total, st.Expected)
	}
	switch meta.Control {
	case idempotency.Paused:
		fmt.Fprintf(w, "  PAUSED: no send of it is called; continue with: enqueuer campaign resume --campaign %s\n", meta.Name)
	case idempotency.CancelledByUser:
		fmt.Fprintf(w, "  CANCELLED: no send of it is called again; enqueuer retry --campaign %s --state cancelled after --reopen queues them\n", meta.Name)
	}
	for i, a := range audit {
		if i == 0 {
			fmt.Fprintln(w, "  actions:")
		}
		if len(audit) > 10 && i < len(audit)-10 {
			continue
		}
		note := ""
		if a.Note != "" {
			note = " (" + a.Note + ")"
		}
		fmt.Fprintf(w, "    %s  %-7s by %s, %d sends%s\n", a.At.UTC().Format(time.RFC3339), a.Action, a.Who, a.Sends, note)
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
	if st.Redeemed > 0 || st.ByState[idempotency.Succeeded] > 0 {
		fmt.Fprintf(w, "  %s\n", redemptionLine(st))
	}
	if n := st.ByState[idempotency.Unknown]; n > 0 {
		fmt.Fprintf(w, "  %d sends are unknown: WeChat never answered them and their coupons may exist; do not resend them elsewhere. Run: enqueuer reconcile --campaign %s\n", n, meta.Name)
	}
	var rates, lines []string
	for _, ep := range tasks.Endpoints() {
		prec := 1 // a limit per minute is a fraction a second
		if ratelimit.Defaults[ep].Per == time.Minute {
			prec = 2
		}
		rates = append(rates, fmt.Sprintf("%s %.*f/s", ep, prec, f.Rates[ep]))
		lines = append(lines, sharedLine(ep, f.Shared[ep]))
	}
	fmt.Fprintf(w, "  shared rate now: %s (%s)\n", strings.Join(rates, ", "), strings.Join(lines, "; "))
	for _, b := range f.Breakers {
		what, hint := "stock "+b.StockID, ""
		if b.StockID == breaker.Merchant {
			what = "merchant " + meta.MchID + " (every stock)"
			hint = "; WeChat refuses the merchant's signature: check the clock, WECHATPAY_PRIVATE_KEY and WECHATPAY_MCH_SERIAL"
		}
		fmt.Fprintf(w, "  %s: breaker OPEN since %s (%s), next probe %s (every %s)%s\n",
			what, b.OpenedAt.Format(time.RFC3339), breakerReason(b), b.NextProbe.Format(time.RFC3339), b.Interval, hint)
	}
	fmt.Fprintf(w, "  %s\n", retentionLine(meta))
}

// redemptionLine says how many of the campaign's coupons were used.
func redemptionLine(st idempotency.Status) string {
	line := fmt.Sprintf("redeemed %d of %d coupons issued (%.1f%%), %s in all", st.Redeemed, st.ByState[idempotency.Succeeded],
		100*st.RedemptionRate(), yuan(st.RedeemedAmount))
	if st.Redeemed > 0 {
		line += fmt.Sprintf(", %s from send to use on average", st.MeanTimeToRedemption().Round(time.Second))
	}
	if st.RedeemedBySync > 0 {
		line += fmt.Sprintf("; %d found by redemptions sync that no notification brought", st.RedeemedBySync)
	}
	return line
}

// yuan writes fen as yuan: 12345 → "123.45 yuan".
func yuan(fen int64) string { return fmt.Sprintf("%d.%02d yuan", fen/100, fen%100) }

func printStatusJSON(w io.Writer, meta idempotency.Campaign, st idempotency.Status, f fleet, audit []idempotency.Action) {
	byState := map[string]int64{}
	for s, n := range st.ByState {
		byState[string(s)] = n
	}
	_ = json.NewEncoder(w).Encode(map[string]any{
		"campaign": meta.Name, "mchid": meta.MchID, "deadline": meta.Deadline.Format(time.RFC3339),
		"total": st.Total, "by_state": byState, "failed_by_code": st.FailedByCode,
		"rate_per_second": st.Rate, "rate_10s": st.Rate10s, "done": st.Done(),
		"expected": st.Expected, "missing": st.Missing(),
		"shared_rates": f.Rates, "rate_limits": sharedJSON(f.Shared), "open_breakers": f.Breakers, "control": string(meta.Control), "actions": audit,
		"retention": meta.Retention.String(), "finished_at": jsonTime(meta.FinishedAt), "expires_at": jsonTime(meta.ExpiresAt),
		"report": meta.Report, "start_at": jsonTime(meta.StartAt), "scheduled": scheduled(meta, st),
		"redeemed": st.Redeemed, "redeemed_amount": st.RedeemedAmount, "redemption_rate": st.RedemptionRate(),
		"redeemed_by_sync": st.RedeemedBySync, "mean_time_to_redemption_seconds": st.MeanTimeToRedemption().Seconds(),
	})
}

// sharedLine says where an endpoint's shared rate comes from: the workers'
// configured limit and the real limit learned from WeChat's 429s.
func sharedLine(ep ratelimit.Endpoint, sh ratelimit.Shared) string {
	per, unit := sh.Limit, "s"
	if ratelimit.Defaults[ep].Per == time.Minute {
		per, unit = math.Round(per*60*1000)/1000, "m"
	}
	line := fmt.Sprintf("%s: workers' limit %g/%s", ep, per, unit)
	if !sh.WorkersLimit {
		line = fmt.Sprintf("%s: no worker has run yet; default limit %g/%s", ep, per, unit)
	}
	switch {
	case sh.Measuring:
		line += ", measuring WeChat's limit after a 429"
	case sh.Ceiling > 0:
		line += fmt.Sprintf(", WeChat's limit learned from its 429s %.1f/s", sh.Ceiling)
	}
	return line
}

// scheduled is how many sends wait for the campaign's --start-at: before
// it, every send not yet processed.
func scheduled(meta idempotency.Campaign, st idempotency.Status) int64 {
	if meta.StartAt.IsZero() || !time.Now().Before(meta.StartAt) {
		return 0
	}
	return st.ByState[idempotency.Pending]
}

func sharedJSON(m map[ratelimit.Endpoint]ratelimit.Shared) map[ratelimit.Endpoint]any {
	out := map[ratelimit.Endpoint]any{}
	for ep, sh := range m {
		out[ep] = map[string]any{"workers_limit_per_second": sh.Limit, "workers_reported": sh.WorkersLimit,
			"rate_per_second": sh.Rate, "learned_ceiling_per_second": sh.Ceiling, "measuring": sh.Measuring}
	}
	return out
}

func jsonTime(t time.Time) any {
	if t.IsZero() {
		return nil
	}
	return t.UTC().Format(time.RFC3339)
}

func cmdReport(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	c := newFlags("report", "--campaign NAME --out results.csv[.gz]", stderr)
	name := c.fs.String("campaign", "", "campaign name")
	out := c.fs.String("out", "", "CSV file to write, gzipped if it ends in .gz; - for standard output. The file of a settled campaign is its archive: its tombstone keeps the path once its records expire")
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
	store := c.store(rdb)
	if _, err := campaignOf(ctx, store, *name); err != nil {
		return err
	}
	st, err := store.Status(ctx, *name)
	if err != nil {
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
	var zw *gzip.Writer
	if strings.HasSuffix(*out, ".gz") {
		zw = gzip.NewWriter(w)
		zw.Name = strings.TrimSuffix(filepath.Base(*out), ".gz")
		w = zw
	}
	cw := csv.NewWriter(w)
	_ = cw.Write(idempotency.ReportHeaderWithRedemptions)
	n := 0
	err = store.Each(ctx, *name, func(r idempotency.Record) error {
		n++
		return cw.Write(r.ReportRowWithRedemption())
	})
	cw.Flush()
	if err == nil {
		err = cw.Error()
	}
	if err == nil && zw != nil {
		err = zw.Close()
	}
	if err != nil {
		return err
	}
	if f == nil {
		return nil
	}
	if err := f.Sync(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(f.Name(), *out); err != nil {
		return err
	}
	fmt.Fprintf(stderr, "wrote %d rows to %s\n", n, *out)
	if !st.Settled() {
		fmt.Fprintf(stderr, "campaign %s is not settled (%d of %d sends succeeded or failed), so this report is not recorded as its archive\n",
			*name, st.ByState[idempotency.Succeeded]+st.ByState[idempotency.Failed], st.Total)
		return nil
	}
	where, err := filepath.Abs(*out)
	if err != nil {
		return err
	}
	if host, err := os.Hostname(); err == nil {
		where += " on " + host
	}
	if err := store.RecordReport(ctx, *name, where); err != nil {
		return err
	}
	fmt.Fprintf(stderr, "recorded as the archive of campaign %s: its tombstone will say %s\n", *name, where)
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
	creator := c.fs.String("creator-mchid", "", "creator_mchid filter; default the merchant id unless --available-mchid is set")
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
		CreatorMchID: *creator, AvailableMchID: *available, BusinessType: *business}
	// A listing changes nothing, so any failure that is not the request's
	// own fault is worth a few more tries.
	var coupons []wechat.Coupon
	b := backoff.NewExponentialBackOff()
	b.MaxElapsedTime = 30 * time.Second
	err = backoff.Retry(func() error {
		var err error
		coupons, err = wx.ListAllUserCoupons(ctx, req)
		if c := wechat.ClassOf(err); c == wechat.Permanent || c == wechat.SignRefused {
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
