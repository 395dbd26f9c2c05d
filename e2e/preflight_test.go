package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hibiken/asynq"

	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/sandbox"
	"github.com/couponflow/dispatcher/internal/tasks"
)

// The dry run's figures are those of the real run that follows on the same
// sandbox: rows valid, invalid and duplicate, and the budget's shortfall,
// to the coupon. A stock of 250 and a file of 300 recipients, some rows
// twice and some invalid: the dry run says 250 covered, 50 short, exits 3
// and writes nothing; the real run queues the same rows, issues exactly
// 250, and the other 50 end NOT_ENOUGH at the (short) deadline.
func TestDryRunPredictsTheRealRun(t *testing.T) {
	r := newRig(t)
	stock, err := r.sb.CreateStock(sandbox.StockSpec{Kind: "favor", Budget: 250, MaxPerUser: 1, CouponValue: 100, CouponMinimum: 100})
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	b.WriteString("openid\n")
	for i := range 300 {
		fmt.Fprintf(&b, "opre_%04d\n", i)
		if i%30 == 0 {
			fmt.Fprintf(&b, "opre_%04d\n", i) // 10 duplicates
		}
		if i%43 == 0 {
			fmt.Fprintf(&b, "not an openid %d\n", i) // 7 invalid
		}
	}
	path := filepath.Join(r.dir, "pre.csv")
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}

	out, code := r.enqueuer("campaign", "--file", path, "--stock-id", stock.ID, "--campaign", "pre", "--dry-run", "--json")
	if code != 3 {
		t.Fatalf("dry run exited %d, want 3 (would not run as it stands):\n%s", code, out)
	}
	var rep struct {
		Rows                          struct{ Rows, Valid, Duplicates, Invalid int64 }
		Remaining, Covered, Shortfall int64
		ActiveNow                     bool `json:"active_now"`
		Rate                          string
		Duration                      int64  `json:"duration_ns"`
		DeadlineFrom                  string `json:"deadline_from"`
		Deadline                      time.Time
		Problems                      []string
		OK                            bool
	}
	if err := json.Unmarshal([]byte(out[:strings.LastIndex(out, "}")+1]), &rep); err != nil {
		t.Fatalf("dry run JSON: %v\n%s", err, out)
	}
	if rep.Rows.Rows != 317 || rep.Rows.Valid != 300 || rep.Rows.Duplicates != 10 || rep.Rows.Invalid != 7 {
		t.Errorf("dry run rows %+v, want 317 read: 300 valid, 10 duplicates, 7 invalid", rep.Rows)
	}
	if rep.Remaining != 250 || rep.Covered != 250 || rep.Shortfall != 50 || !rep.ActiveNow || rep.OK || len(rep.Problems) != 2 {
		t.Errorf("dry run: remaining %d, covered %d, shortfall %d, active %v, ok %v, problems %q; want 250, 250, 50, true, false, 2",
			rep.Remaining, rep.Covered, rep.Shortfall, rep.ActiveNow, rep.OK, rep.Problems)
	}
	if rep.Rate != "500/s" || rep.Duration != int64(600*time.Millisecond) || rep.DeadlineFrom != "stock" || !rep.Deadline.Equal(stock.AvailableEnd.Truncate(time.Second)) {
		t.Errorf("dry run: rate %s, duration %s, deadline %s from %s; want 500/s, 600ms, the stock's end %s",
			rep.Rate, time.Duration(rep.Duration), rep.Deadline, rep.DeadlineFrom, stock.AvailableEnd)
	}
	text, code := r.enqueuer("campaign", "--file", path, "--stock-id", stock.ID, "--campaign", "pre", "--dry-run")
	for _, want := range []string{"300 valid, 7 invalid, 10 duplicates", "covers 250 of 300 recipients, shortfall 50", "active now: yes", "per-user limit: 1", "would not run as it stands"} {
		if code != 3 || !strings.Contains(text, want) {
			t.Errorf("dry run (text, exit %d) lacks %q:\n%s", code, want, text)
		}
	}
	if n, err := r.rdb.DBSize(context.Background()).Result(); err != nil || n != 0 {
		t.Fatalf("the dry runs wrote %d keys to Redis (%v)", n, err)
	}

	// The real run, with a short deadline so that the shortfall settles.
	out, code = r.enqueuer("campaign", "--file", path, "--stock-id", stock.ID, "--campaign", "pre", "--deadline", "6s")
	if code != 0 || !strings.Contains(out, "enqueued 300, duplicates 10, invalid 7") || !strings.Contains(out, "250 coupons left for the campaign's 300 outstanding sends: 50 short") {
		t.Fatalf("real run exited %d:\n%s", code, out)
	}
	r.worker("a", fastWaits...)
	st := r.waitFor("pre", 40*time.Second, "every send done after the deadline", done)
	if st.ByState[idempotency.Succeeded] != 250 || st.ByState[idempotency.Failed] != 50 || st.FailedByCode["NOT_ENOUGH"] != 50 {
		t.Errorf("real run: %+v; want 250 succeeded, 50 failed NOT_ENOUGH", st)
	}
	issued := 0
	for _, c := range r.sb.Ledger().Coupons {
		if c.StockID == stock.ID {
			issued++
		}
	}
	if issued != 250 {
		t.Errorf("the sandbox issued %d coupons of the stock, the dry run predicted 250", issued)
	}
}

// A stopped stock, or one past its end time, is refused before anything is
// written; --force queues it all the same. A paused one is only warned of.
func TestEnqueueRefusesAStockThatCannotIssue(t *testing.T) {
	r := newRig(t)
	path, _ := r.writeUsers("refused", 5)
	stopped, err := r.sb.CreateStock(sandbox.StockSpec{Kind: "favor", Budget: 10, State: sandbox.StateStopped})
	if err != nil {
		t.Fatal(err)
	}
	ended, err := r.sb.CreateStock(sandbox.StockSpec{Kind: "favor", Budget: 10,
		AvailableBegin: time.Now().Add(-48 * time.Hour), AvailableEnd: time.Now().Add(-time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ stock, mention string }{{stopped.ID, "is stopped"}, {ended.ID, "window ended"}, {"98765432101", "RESOURCE_NOT_EXISTS"}} {
		out, code := r.enqueuer("campaign", "--file", path, "--stock-id", c.stock, "--campaign", "refused")
		if code != 3 || !strings.Contains(out, c.mention) || !strings.Contains(out, "--force") {
			t.Errorf("stock %s: exited %d, want 3 naming %q and --force:\n%s", c.stock, code, c.mention, out)
		}
	}
	if n, _ := r.rdb.DBSize(context.Background()).Result(); n != 0 {
		t.Fatalf("a refused enqueue wrote %d keys", n)
	}
	out, code := r.enqueuer("campaign", "--file", path, "--stock-id", stopped.ID, "--campaign", "refused", "--force", "--deadline", "1h")
	if code != 0 || !strings.Contains(out, "warning (--force)") || !strings.Contains(out, "enqueued 5") {
		t.Errorf("--force exited %d:\n%s", code, out)
	}
	paused, err := r.sb.CreateStock(sandbox.StockSpec{Kind: "favor", Budget: 10, State: sandbox.StatePaused})
	if err != nil {
		t.Fatal(err)
	}
	out, code = r.enqueuer("campaign", "--file", path, "--stock-id", paused.ID, "--campaign", "paused")
	if code != 0 || !strings.Contains(out, "warning: stock "+paused.ID+" is paused") {
		t.Errorf("a paused stock exited %d:\n%s", code, out)
	}
}

// --start-at a few seconds ahead: the sends are scheduled (asynq and
// status say so), nothing reaches WeChat before that time, and everything
// is sent after it.
func TestStartAtSchedulesTheSends(t *testing.T) {
	r := newRig(t)
	var mu sync.Mutex
	var sends []time.Time
	r.sb.OnRequest(func(req sandbox.RecordedRequest) {
		if req.Method == http.MethodPost {
			mu.Lock()
			sends = append(sends, time.Now())
			mu.Unlock()
		}
	})
	r.worker("a", fastWaits...)
	path, openids := r.writeUsers("later", 20)
	startAt := time.Now().Add(5 * time.Second).Truncate(time.Second).Add(time.Second)
	out, code := r.enqueuer("campaign", "--file", path, "--stock-id", r.stockID(), "--campaign", "later", "--start-at", startAt.Format(time.RFC3339))
	if code != 0 || !strings.Contains(out, "enqueued 20") || !strings.Contains(out, "scheduled to start at") {
		t.Fatalf("enqueuer exited %d:\n%s", code, out)
	}
	info, err := asynq.NewInspectorFromRedisClient(r.rdb).GetQueueInfo(tasks.DefaultQueue)
	if err != nil || info.Scheduled != 20 {
		t.Errorf("asynq holds %+v (%v), want 20 scheduled", info, err)
	}
	out, code = r.enqueuer("status", "--campaign", "later")
	if code != 0 || !regexp.MustCompile(`20 scheduled to start at `+regexp.QuoteMeta(startAt.Format(time.RFC3339))).MatchString(out) {
		t.Errorf("status exited %d:\n%s", code, out)
	}
	r.waitFor("later", startAt.Sub(time.Now())+20*time.Second, "every send done after the start", done)
	mu.Lock()
	defer mu.Unlock()
	if len(sends) < 20 {
		t.Fatalf("%d sends reached the sandbox, want 20", len(sends))
	}
	for _, at := range sends {
		if at.Before(startAt) {
			t.Fatalf("a send reached the sandbox at %s, before the start %s", at.Format(time.RFC3339Nano), startAt.Format(time.RFC3339))
		}
	}
	r.checkOneCouponEach(r.stockID(), openids)
	out, _ = r.enqueuer("status", "--campaign", "later")
	if strings.Contains(out, "scheduled to start") {
		t.Errorf("status still shows sends scheduled after the start:\n%s", out)
	}
}
