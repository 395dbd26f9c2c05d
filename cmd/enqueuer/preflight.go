package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/couponflow/dispatcher/internal/campaign"
	"github.com/couponflow/dispatcher/internal/enqueue"
	"github.com/couponflow/dispatcher/internal/preflight"
	"github.com/couponflow/dispatcher/internal/ratelimit"
	"github.com/couponflow/dispatcher/internal/wechat"
)

// exitWouldNotRun is a dry run's status when the campaign would not run as
// it stands (see preflight.Report.Problems); a real enqueue refusing a
// stopped or ended stock exits with it too.
const exitWouldNotRun = 3

// defaultDeadline is how long budget waits last when neither --deadline
// nor the stock's end time says.
const defaultDeadline = 72 * time.Hour

// startAtLayouts are the forms --start-at takes, RFC 3339 first; the
// others are in the local time zone.
var startAtLayouts = []string{time.RFC3339, "2006-01-02 15:04:05", "2006-01-02 15:04", "2006-01-02T15:04"}

// parseStartAt reads --start-at; "" is zero (at once).
func parseStartAt(s string) (time.Time, error) {
	if s == "" {
		return time.Time{}, nil
	}
	if t, err := time.Parse(time.RFC3339, s); err == nil {
		return t, nil
	}
	for _, layout := range startAtLayouts[1:] {
		if t, err := time.ParseInLocation(layout, s, time.Local); err == nil {
			return t, nil
		}
	}
	return time.Time{}, fmt.Errorf(`--start-at %q: want RFC 3339 ("2006-01-02T15:04:05+08:00") or local time ("2006-01-02 15:04" or "2006-01-02 15:04:05", zone %s)`, s, time.Local)
}

// stockQuery is the stock as WeChat describes it, or why it could not be
// asked. Permanent reports an answer that the stock as named cannot be
// used (unknown stock, wrong creator, no authority): a real enqueue
// refuses it like a stopped stock.
type stockQuery struct {
	info      *wechat.StockInfo
	err       error
	permanent bool
}

// queryStock asks WeChat about the stock, within 15 s.
func (c *common) queryStock(ctx context.Context, stockID, creator string) stockQuery {
	if err := c.wx.Validate(); err != nil {
		return stockQuery{err: fmt.Errorf("WeChat Pay configuration:\n%w", err)}
	}
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	wx, err := wechat.New(ctx, c.wx, wechat.WithConcurrency(1))
	if err != nil {
		return stockQuery{err: err}
	}
	info, err := wx.QueryStock(ctx, stockID, creator)
	return stockQuery{info: info, err: err, permanent: err != nil && wechat.ClassOf(err) == wechat.Permanent}
}

// chooseDeadline is --deadline when given, else the stock's end time when
// it is known and after the start, else 72 h after the start.
func chooseDeadline(given bool, flag string, q stockQuery, start time.Time) (time.Time, string, error) {
	if given {
		dl, err := parseDeadline(flag)
		if err == nil && !start.IsZero() && !dl.After(start) {
			err = fmt.Errorf("--deadline %s is not after --start-at %s", dl.Format(time.RFC3339), start.Format(time.RFC3339))
		}
		return dl, "flag", err
	}
	from := start
	if from.IsZero() {
		from = time.Now()
	}
	if q.info != nil && q.info.AvailableEnd.After(from) {
		return q.info.AvailableEnd, "stock", nil
	}
	return from.Add(defaultDeadline), "default", nil
}

// dryRun reports what the campaign would do and writes nothing.
func dryRun(reader *campaign.Reader, camp enqueue.Campaign, file string, q stockQuery,
	start time.Time, deadlineFrom string, limits map[ratelimit.Endpoint]ratelimit.Limit, showInvalid int, asJSON bool, stdout io.Writer) error {
	now := time.Now()
	rep := &preflight.Report{Campaign: camp.Name, File: file, MchID: camp.MchID, StockID: camp.StockID,
		Start: start, Deadline: camp.Deadline, DeadlineFrom: deadlineFrom}
	if rep.Start.IsZero() {
		rep.Start = now
	}
	rows, err := preflight.Scan(reader, camp, preflight.ScanOptions{KeepInvalid: showInvalid})
	if err != nil {
		return &exitError{code: 2, err: fmt.Errorf("%w; a dry run writes nothing", err)}
	}
	rep.Rows = rows
	if q.err != nil {
		rep.StockError = q.err.Error()
	}
	preflight.Assess(rep, q.info, now, limits[ratelimit.SendCoupon])
	if asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(struct {
			*preflight.Report
			OK bool `json:"ok"`
		}{rep, rep.OK()}); err != nil {
			return err
		}
	} else {
		rep.Print(stdout)
	}
	switch {
	case q.err != nil && !q.permanent:
		// Not knowing the stock, the dry run cannot say; that is no verdict.
		return fmt.Errorf("the stock could not be queried, so the dry run cannot say whether the campaign would run: %w", q.err)
	case !rep.OK():
		return &exitError{code: exitWouldNotRun, err: errors.New("dry run: the campaign would not run as it stands (" + strings.Join(rep.Problems, "; ") + ")")}
	}
	return nil
}

// checkStockBeforeEnqueue refuses, unless forced, a stock that can never
// issue these sends, and warns about one that holds them.
func checkStockBeforeEnqueue(q stockQuery, start time.Time, force bool, stderr io.Writer) error {
	if start.IsZero() {
		start = time.Now()
	}
	var refusals []string
	switch {
	case q.err != nil && q.permanent:
		refusals = append(refusals, fmt.Sprintf("WeChat refused the stock query: %v", q.err))
	case q.err != nil:
		fmt.Fprintf(stderr, "warning: the stock could not be queried, so it was not checked: %v\n", q.err)
	default:
		check := preflight.CheckStock(q.info, start)
		refusals = check.Refusals
		for _, w := range check.Warnings {
			fmt.Fprintln(stderr, "warning: "+w)
		}
	}
	if len(refusals) == 0 {
		return nil
	}
	if force {
		for _, r := range refusals {
			fmt.Fprintln(stderr, "warning (--force): "+r)
		}
		return nil
	}
	return &exitError{code: exitWouldNotRun, err: fmt.Errorf("%s.\nNothing was queued and no campaign was created; --force queues it all the same", strings.Join(refusals, "; "))}
}

// warnShortfall says, after the enqueue, how many of the campaign's sends
// that still need a coupon the stock's remaining budget leaves out.
func warnShortfall(q stockQuery, outstanding int64, stderr io.Writer) {
	if q.info == nil {
		return
	}
	if left := q.info.Remaining(); outstanding > left {
		fmt.Fprintf(stderr, "warning: stock %s has %d coupons left for the campaign's %d outstanding sends: %d short; they wait for a top-up until the deadline, then fail NOT_ENOUGH\n",
			q.info.StockID, left, outstanding, outstanding-left)
	}
}

// startLine says when a campaign's sends start.
func startLine(t time.Time) string {
	if t.IsZero() {
		return "at once"
	}
	return t.Format(time.RFC3339)
}
