package preflight

import (
	"fmt"
	"io"
	"math"
	"time"

	"github.com/couponflow/dispatcher/internal/ratelimit"
	"github.com/couponflow/dispatcher/internal/wechat"
)

// StockCheck is what the stock says about a campaign starting at a time.
// Refusals stop a real enqueue unless forced: the stock can never issue
// these sends (stopped, or its window over). Warnings do not: the sends
// are held, and go out if the stock runs again before the deadline.
type StockCheck struct {
	Refusals []string `json:"refusals,omitempty"`
	Warnings []string `json:"warnings,omitempty"`
}

// CheckStock judges st for sends processed from start.
func CheckStock(st *wechat.StockInfo, start time.Time) StockCheck {
	var c StockCheck
	switch {
	case st.Stopped():
		c.Refusals = append(c.Refusals, fmt.Sprintf("stock %s is stopped (status %s%s): it will never issue again", st.StockID, st.Status, since(st.StopTime)))
	case st.EndedBy(start):
		c.Refusals = append(c.Refusals, fmt.Sprintf("stock %s's window ended at %s: it issues nothing after that", st.StockID, stamp(st.AvailableEnd)))
	}
	if !st.Running() && !st.Stopped() {
		c.Warnings = append(c.Warnings, fmt.Sprintf("stock %s is %s, not running: its sends will be held until it runs or the deadline passes", st.StockID, st.Status))
	}
	if start.Before(st.AvailableBegin) {
		c.Warnings = append(c.Warnings, fmt.Sprintf("stock %s's window begins at %s, after the campaign starts (%s): its sends will be held until then", st.StockID, stamp(st.AvailableBegin), stamp(start)))
	}
	return c
}

func since(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return " since " + stamp(t)
}

// Report is a dry run's finding.
type Report struct {
	Campaign string     `json:"campaign"`
	File     string     `json:"file"`
	MchID    string     `json:"mchid"`
	StockID  string     `json:"stock_id"`
	Rows     FileReport `json:"rows"`
	// Stock is nil when it could not be queried (StockError says why).
	Stock      *wechat.StockInfo `json:"stock,omitempty"`
	StockError string            `json:"stock_error,omitempty"`
	Start      time.Time         `json:"start"`    // when the sends would be processed from
	Deadline   time.Time         `json:"deadline"` // when budget waits would end
	// DeadlineFrom says where Deadline comes from: "flag", "stock" (its
	// end time) or "default" (72 h, the stock's end being unknown).
	DeadlineFrom string `json:"deadline_from"`
	ActiveNow    bool   `json:"active_now"`
	ActiveAt     bool   `json:"active_at_start"`
	// Remaining is the coupons the stock's budget has left; OverLimit the
	// sends beyond its per-user limit; Eligible the sends that could be
	// issued; Covered those the budget covers; Shortfall the rest.
	Remaining int64 `json:"remaining"`
	OverLimit int64 `json:"over_limit"`
	Eligible  int64 `json:"eligible"`
	Covered   int64 `json:"covered"`
	Shortfall int64 `json:"shortfall"`
	// Rate is the merchant's send limit; Duration how long the valid
	// sends take at it, one call each (the least they can take).
	Rate     string        `json:"rate"`
	Duration time.Duration `json:"duration_ns"`
	// PerDay is how many coupons the stock's daily budget allows (0: no
	// daily budget, or none known).
	PerDay int64      `json:"per_day,omitempty"`
	Check  StockCheck `json:"stock_check"`
	// Problems are why the campaign would not run as it stands; none
	// means it would.
	Problems []string `json:"problems"`
}

// OK reports whether the campaign can run as it stands.
func (r *Report) OK() bool { return len(r.Problems) == 0 }

// Assess sets a file against the stock (nil if it could not be queried)
// for sends processed from start, at the merchant's send limit.
func Assess(r *Report, st *wechat.StockInfo, now time.Time, limit ratelimit.Limit) {
	f := r.Rows
	r.Problems = nil
	r.Rate = limit.String()
	if ps := limit.PerSecond(); ps > 0 {
		r.Duration = time.Duration(float64(f.Valid) / ps * float64(time.Second))
	}
	if f.Invalid > 0 {
		r.Problems = append(r.Problems, fmt.Sprintf("%d invalid rows would be skipped", f.Invalid))
	}
	if f.Valid == 0 {
		r.Problems = append(r.Problems, "no valid row: nothing would be sent")
	}
	r.Stock = st
	if st == nil {
		r.Problems = append(r.Problems, "the stock could not be queried: "+r.StockError)
		return
	}
	r.ActiveNow, r.ActiveAt = st.ActiveAt(now), st.ActiveAt(r.Start)
	r.Check = CheckStock(st, r.Start)
	r.Problems = append(r.Problems, r.Check.Refusals...)
	r.Problems = append(r.Problems, r.Check.Warnings...)
	r.Remaining = st.Remaining()
	r.OverLimit = f.OverLimit(st.MaxPerUser)
	r.Eligible = f.Valid - r.OverLimit
	r.Covered = min(r.Eligible, r.Remaining)
	r.Shortfall = r.Eligible - r.Covered
	if r.OverLimit > 0 {
		r.Problems = append(r.Problems, fmt.Sprintf("%d sends go beyond the limit of %d per user and would be refused (用户被限领拦截)", r.OverLimit, st.MaxPerUser))
	}
	if r.Shortfall > 0 {
		r.Problems = append(r.Problems, fmt.Sprintf("the budget covers %d of %d recipients: %d short", r.Covered, r.Eligible, r.Shortfall))
	}
	if st.MaxAmountByDay > 0 && st.CouponAmount > 0 {
		r.PerDay = st.MaxAmountByDay / st.CouponAmount
	}
}

// Print writes the report for an operator.
func (r *Report) Print(w io.Writer) {
	f := r.Rows
	fmt.Fprintf(w, "dry run of campaign %s (%s → stock %s, merchant %s): nothing was written to Redis\n", r.Campaign, r.File, r.StockID, r.MchID)
	fmt.Fprintf(w, "rows: %d read: %d valid, %d invalid, %d duplicates; %d distinct openids\n", f.Rows, f.Valid, f.Invalid, f.Duplicates, f.Openids)
	for _, line := range f.InvalidRows {
		fmt.Fprintln(w, "  invalid: "+line)
	}
	if more := f.Invalid - int64(len(f.InvalidRows)); more > 0 {
		fmt.Fprintf(w, "  … and %d more invalid rows\n", more)
	}
	if st := r.Stock; st != nil {
		fmt.Fprintf(w, "stock %s (%s): %s, window %s to %s\n", st.StockID, st.Name, st.Status, stamp(st.AvailableBegin), stamp(st.AvailableEnd))
		fmt.Fprintf(w, "  active now: %s; at the start (%s): %s, until %s\n", yes(r.ActiveNow), stamp(r.Start), yes(r.ActiveAt), stamp(st.AvailableEnd))
		fmt.Fprintf(w, "  budget: %d coupons, %d issued, %d left", st.MaxCoupons, st.Distributed, r.Remaining)
		if st.MaxAmount > 0 {
			fmt.Fprintf(w, " (total %s)", yuan(st.MaxAmount))
		}
		if st.CouponAmount > 0 {
			fmt.Fprintf(w, "; a coupon is %s off orders of %s", yuan(st.CouponAmount), yuan(st.TransactionMinimum))
		}
		fmt.Fprintln(w)
		if st.MaxPerUser > 0 {
			fmt.Fprintf(w, "  per-user limit: %d coupon(s); %d sends beyond it\n", st.MaxPerUser, r.OverLimit)
		} else {
			fmt.Fprintln(w, "  per-user limit: none")
		}
		if r.PerDay > 0 {
			days := int64(math.Ceil(float64(r.Covered) / float64(r.PerDay)))
			fmt.Fprintf(w, "  daily budget: %s, %d coupons a day (China time): the covered sends take at least %d day(s)\n", yuan(st.MaxAmountByDay), r.PerDay, days)
		}
		fmt.Fprintf(w, "budget: covers %d of %d recipients, shortfall %d\n", r.Covered, r.Eligible, r.Shortfall)
	} else {
		fmt.Fprintf(w, "stock %s: could not be queried: %s\n", r.StockID, r.StockError)
	}
	fmt.Fprintf(w, "time: %d sends at the merchant's limit of %s (favor_send, shared with its other campaigns): at least %s\n", f.Valid, r.Rate, r.Duration.Round(time.Second/10))
	fmt.Fprintf(w, "deadline: %s (%s)\n", stamp(r.Deadline), map[string]string{
		"flag": "--deadline", "stock": "the stock's end time", "default": "72h after the start: the stock's end time is not known",
	}[r.DeadlineFrom])
	if r.OK() {
		fmt.Fprintln(w, "verdict: the campaign can run as it stands")
		return
	}
	fmt.Fprintln(w, "verdict: the campaign would not run as it stands:")
	for _, p := range r.Problems {
		fmt.Fprintln(w, "  - "+p)
	}
}

func yes(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

var chinaTime = time.FixedZone("CST", 8*3600)

// stamp shows a time as WeChat does, in China time.
func stamp(t time.Time) string {
	if t.IsZero() {
		return "(none)"
	}
	return t.In(chinaTime).Format(time.RFC3339)
}

func yuan(fen int64) string { return fmt.Sprintf("%d.%02d yuan", fen/100, fen%100) }
