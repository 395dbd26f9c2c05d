package preflight

import (
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/couponflow/dispatcher/internal/campaign"
	"github.com/couponflow/dispatcher/internal/enqueue"
	"github.com/couponflow/dispatcher/internal/ratelimit"
	"github.com/couponflow/dispatcher/internal/wechat"
)

var camp = enqueue.Campaign{Name: "spring", MchID: "1900000001", AppID: "wx1234567890abcdef", StockID: "16000001", Deadline: time.Now().Add(time.Hour)}

// file builds a CSV of valid unique rows, duplicates of the first ones (an
// openid again, whose derived out_request_no repeats), invalid rows, and
// extra rows to openids that already have one under another
// out_request_no.
func file(t *testing.T, valid, dups, invalid, again int) *campaign.Reader {
	t.Helper()
	var b strings.Builder
	b.WriteString("openid,out_request_no\n")
	for i := range valid {
		fmt.Fprintf(&b, "o_user%05d,\n", i)
	}
	for i := range dups {
		fmt.Fprintf(&b, "o_user%05d,\n", i)
	}
	for i := range invalid {
		fmt.Fprintf(&b, "bad openid %d,\n", i)
	}
	for i := range again {
		fmt.Fprintf(&b, "o_user%05d,again%d\n", i, i)
	}
	r, err := campaign.NewReader(strings.NewReader(b.String()), campaign.Options{Format: "csv"})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// The counts do not depend on whether the rows were sorted in memory or
// spilled in many runs merged in several passes.
func TestScanCountsAsAnEnqueueWould(t *testing.T) {
	for _, chunk := range []int{1 << 20, 7, 1} {
		t.Run(fmt.Sprintf("chunk %d", chunk), func(t *testing.T) {
			dir := t.TempDir()
			rep, err := Scan(file(t, 300, 12, 5, 9), camp, ScanOptions{ChunkRecords: chunk, KeepInvalid: 3, TempDir: dir})
			if err != nil {
				t.Fatal(err)
			}
			if rep.Rows != 326 || rep.Valid != 309 || rep.Duplicates != 12 || rep.Invalid != 5 || rep.Openids != 300 {
				t.Errorf("rows %d valid %d duplicates %d invalid %d openids %d; want 326, 309, 12, 5, 300", rep.Rows, rep.Valid, rep.Duplicates, rep.Invalid, rep.Openids)
			}
			if len(rep.InvalidRows) != 3 || !strings.Contains(rep.InvalidRows[0], "line 314") || !strings.Contains(rep.InvalidRows[0], "openid") {
				t.Errorf("invalid rows kept: %q", rep.InvalidRows)
			}
			if got := rep.OverLimit(1); got != 9 {
				t.Errorf("OverLimit(1) = %d, want 9", got)
			}
			if got := rep.OverLimit(2); got != 0 {
				t.Errorf("OverLimit(2) = %d, want 0", got)
			}
			left, _ := os.ReadDir(dir)
			if len(left) != 0 {
				t.Errorf("%d temporary files left behind", len(left))
			}
		})
	}
}

func stockOf(remaining int64) *wechat.StockInfo {
	now := time.Now()
	return &wechat.StockInfo{StockID: "16000001", Status: wechat.StockRunning, AvailableBegin: now.Add(-time.Hour), AvailableEnd: now.Add(48 * time.Hour),
		MaxCoupons: 1000, Distributed: 1000 - remaining, CouponAmount: 100, MaxAmount: 100000, MaxPerUser: 1}
}

func TestAssessPredictsTheShortfall(t *testing.T) {
	rep := &Report{Rows: FileReport{Rows: 320, Valid: 300, Duplicates: 12, Invalid: 8, Openids: 300, PerOpenID: map[int64]int64{1: 300}}, Start: time.Now()}
	Assess(rep, stockOf(250), time.Now(), ratelimit.Limit{N: 100, Per: time.Second})
	if rep.Covered != 250 || rep.Shortfall != 50 || rep.Remaining != 250 || rep.Eligible != 300 {
		t.Errorf("covered %d shortfall %d remaining %d eligible %d; want 250, 50, 250, 300", rep.Covered, rep.Shortfall, rep.Remaining, rep.Eligible)
	}
	if rep.Duration != 3*time.Second || !rep.ActiveNow || !rep.ActiveAt {
		t.Errorf("duration %s, active now %v, at start %v", rep.Duration, rep.ActiveNow, rep.ActiveAt)
	}
	if rep.OK() || len(rep.Problems) != 2 || !strings.Contains(rep.Problems[0], "8 invalid") || !strings.Contains(rep.Problems[1], "50 short") {
		t.Errorf("problems %q", rep.Problems)
	}
	var b strings.Builder
	rep.Print(&b)
	for _, want := range []string{"300 valid, 8 invalid, 12 duplicates", "covers 250 of 300 recipients, shortfall 50", "per-user limit: 1", "at least 3s", "would not run as it stands"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("report lacks %q:\n%s", want, b.String())
		}
	}

	rep = &Report{Rows: FileReport{Rows: 10, Valid: 10, Openids: 10, PerOpenID: map[int64]int64{1: 10}}, Start: time.Now()}
	Assess(rep, stockOf(10), time.Now(), ratelimit.Defaults[ratelimit.SendCoupon])
	if !rep.OK() || rep.Shortfall != 0 {
		t.Errorf("a file the stock covers: %q", rep.Problems)
	}
}

func TestCheckStock(t *testing.T) {
	now := time.Now()
	for _, c := range []struct {
		name            string
		edit            func(*wechat.StockInfo)
		start           time.Time
		refused, warned bool
		mention         string
	}{
		{"running", func(*wechat.StockInfo) {}, now, false, false, ""},
		{"stopped", func(s *wechat.StockInfo) { s.Status = wechat.StockStopped }, now, true, false, "stopped"},
		{"ended", func(s *wechat.StockInfo) { s.AvailableEnd = now.Add(-time.Minute) }, now, true, false, "ended"},
		{"ends before the start", func(*wechat.StockInfo) {}, now.Add(72 * time.Hour), true, false, "ended"},
		{"paused", func(s *wechat.StockInfo) { s.Status = wechat.StockPaused }, now, false, true, "paused"},
		{"not begun", func(s *wechat.StockInfo) { s.AvailableBegin = now.Add(time.Hour) }, now, false, true, "begins"},
	} {
		st := stockOf(10)
		c.edit(st)
		got := CheckStock(st, c.start)
		if (len(got.Refusals) > 0) != c.refused || (len(got.Warnings) > 0) != c.warned {
			t.Errorf("%s: %+v", c.name, got)
		}
		if all := strings.Join(append(got.Refusals, got.Warnings...), " "); !strings.Contains(all, c.mention) {
			t.Errorf("%s: %q does not mention %q", c.name, all, c.mention)
		}
	}
}
