package e2e

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/hibiken/asynq"

	"github.com/couponflow/dispatcher/internal/browsertest"
	"github.com/couponflow/dispatcher/internal/monitor"
	"github.com/couponflow/dispatcher/internal/redisconn"
	"github.com/couponflow/dispatcher/internal/sandbox"
	"github.com/couponflow/dispatcher/internal/tasks"
)

// card is what an on-call engineer reads on a campaign's card.
type card struct {
	Found    bool   `json:"found"`
	State    string `json:"state"`
	Why      string `json:"why"`
	Badge    string `json:"badge"`
	Color    string `json:"color"`
	ETA      string `json:"eta"`
	Elapsed  string `json:"elapsed"`
	Duration string `json:"duration"`
	Rate     string `json:"rate"`
	Stocks   string `json:"stocks"`
	Orphans  string `json:"orphans"`
}

const readCard = `(function (name) {
	var c = document.querySelector('[data-campaign="' + name + '"]');
	if (!c) { return {found: false}; }
	var q = function (sel) { var e = c.querySelector(sel); return e ? e.textContent : ''; };
	var s = c.querySelector('[data-state-of]');
	var b = c.querySelector('h3 span');
	return {found: true, state: s.dataset.campaignState, why: s.textContent, badge: b ? b.textContent : '',
		color: b ? getComputedStyle(b).color : '', eta: q('[data-eta]'), elapsed: q('[data-elapsed]'),
		duration: q('[data-duration]'), rate: q('[data-rate]'), stocks: q('.stocks'), orphans: q('[data-orphans]')};
})`

// The campaign page walked through in Chromium during real campaigns, as
// an on-call engineer opens it: each state reached by the real programs
// (enqueuer, worker processes, the sandbox) and shown as such. No worker:
// stalled. Workers busy with a campaign: it runs with an ETA, the one
// queued behind it says queued. A dry stock: blocked, with the stock and
// the remedy. A held task deleted in asynqmon: an orphan, shown, then
// queued again by the sweeper and sent once. Topped up: done, with its
// duration and a rate of 0. Every send refused: not green. WeChat's rate
// limit holding everything: blocked by the rate limit. At 400 px the page
// does not scroll sideways.
func TestCampaignPageInRealRun(t *testing.T) {
	t.Parallel()
	const user, password = "oncall", "e2e monitor password"
	tab := browsertest.Tab(t, user, password, 3*time.Minute)
	r := newRig(t)
	spec, err := redisconn.ParseURL(r.redis.Addr)
	if err != nil {
		t.Fatal(err)
	}
	mchID := r.sb.Env()["WECHATPAY_MCHID"]
	mon, err := monitor.New(r.rdb, spec.AsynqConnOpt(), monitor.WithBasicAuth(user, password), monitor.WithMchID(mchID),
		monitor.WithRefresh(300*time.Millisecond), monitor.WithAsynqmonWrites(true))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = mon.Close() })
	hs := httptest.NewServer(mon.Handler())
	t.Cleanup(hs.Close)
	if _, err := chromedp.Run(tab, chromedp.Navigate(hs.URL+"/")); err != nil {
		t.Fatal(err)
	}
	// The index refreshes itself every 300 ms; wait reads a card until
	// cond holds.
	wait := func(name, what string, timeout time.Duration, cond func(card) bool) card {
		t.Helper()
		var c card
		for deadline := time.Now().Add(timeout); ; time.Sleep(150 * time.Millisecond) {
			c, err = chromedp.Run(tab, chromedp.Evaluate[card](readCard+`(`+fmt.Sprintf("%q", name)+`)`))
			if err == nil && c.Found && cond(c) {
				return c
			}
			if time.Now().After(deadline) {
				t.Fatalf("campaign %s: %s not shown within %s; the card shows %+v (%v)", name, what, timeout, c, err)
			}
		}
	}
	shot := func(name string) {
		t.Helper()
		png, err := chromedp.Run(tab, chromedp.CaptureScreenshot())
		if err != nil {
			t.Fatal(err)
		}
		browsertest.SaveScreenshot(t, name, png)
	}
	const green = "rgb(46, 157, 91)"

	// No worker alive: stalled, and why.
	r.sb.SetFaults(sandbox.Faults{Latency: 150 * time.Millisecond, LatencyRate: 1})
	bigFile, bigUsers := r.writeUsers("big", 300)
	if out, code := r.enqueuer("campaign", "--file", bigFile, "--stock-id", r.stockID(), "--campaign", "big"); code != 0 {
		t.Fatal(out)
	}
	laterFile, laterUsers := r.writeUsers("later", 20)
	if out, code := r.enqueuer("campaign", "--file", laterFile, "--stock-id", r.stockID(), "--campaign", "later"); code != 0 {
		t.Fatal(out)
	}
	wait("big", "stalled without a worker", 10*time.Second, func(c card) bool {
		return c.State == monitor.StateStalled && strings.Contains(c.Why, "no live worker") && c.Color != green
	})
	shot("stalled.png")

	// A worker, slowed by the sandbox: big runs with an ETA, later waits
	// behind it.
	r.worker("w", "--concurrency", "4", "--http-addr=", "--sweep-every", "500ms", "--sweep-stall", "4s",
		"--breaker-probe", "1s", "--breaker-probe-max", "2s")
	running := wait("big", "running with an ETA", 20*time.Second, func(c card) bool {
		return c.State == monitor.StateRunning && strings.HasPrefix(c.ETA, "ETA: in ") && strings.HasPrefix(c.Elapsed, "running for ")
	})
	queued := wait("later", "queued behind big", 5*time.Second, func(c card) bool { return c.State == monitor.StateQueued })
	t.Logf("big: %s, %s; later: %s", running.ETA, running.Elapsed, queued.Why)
	shot("running-and-queued.png")
	r.waitFor("later", 60*time.Second, "done", done)
	r.sb.SetFaults(sandbox.Faults{})
	r.checkOneCouponEach(r.stockID(), append(bigUsers, laterUsers...))

	// A stock with budget for 5 of 10: blocked, by that stock, and what
	// to do.
	dry, err := r.sb.CreateStock(sandbox.StockSpec{Kind: "favor", Budget: 5, CouponValue: 100, CouponMinimum: 100})
	if err != nil {
		t.Fatal(err)
	}
	dryFile, dryUsers := r.writeUsers("dry", 10)
	if out, code := r.enqueuer("campaign", "--file", dryFile, "--stock-id", dry.ID, "--campaign", "dry"); code != 0 {
		t.Fatal(out)
	}
	blocked := wait("dry", "blocked by its stock", 30*time.Second, func(c card) bool {
		return c.State == monitor.StateBlocked && strings.Contains(c.Why, "stock "+dry.ID) && c.ETA == "ETA: blocked" &&
			strings.Contains(c.Stocks, "breaker OPEN") && strings.Contains(c.Stocks, "enqueuer stock resume --stock-id "+dry.ID)
	})
	t.Logf("dry: %s | %s", blocked.Why, blocked.Stocks)
	shot("blocked.png")
	// At 400 px, with a breaker, its remedy and long ids on the page.
	if _, err := chromedp.Run(tab, chromedp.EmulateViewport(400, 900)); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond) // a refresh at the new width
	if w, err := chromedp.Run(tab, chromedp.Evaluate[int](`document.documentElement.scrollWidth`)); err != nil || w > 400 {
		t.Errorf("the page at 400 px is %d px wide (%v): it scrolls sideways", w, err)
	}
	shot("blocked-400px.png")
	if _, err := chromedp.Run(tab, chromedp.EmulateViewport(1280, 900)); err != nil {
		t.Fatal(err)
	}

	// An operator deletes a held task in asynqmon: its send is an orphan.
	// A held send's task waits in asynq's retry set, but comes up at each
	// probe of the breaker: look again until one is there.
	insp := asynq.NewInspectorFromRedisClient(r.rdb)
	var held []*asynq.TaskInfo
	for deadline := time.Now().Add(15 * time.Second); len(held) == 0; time.Sleep(100 * time.Millisecond) {
		if held, err = insp.ListRetryTasks(tasks.DefaultQueue); err != nil || time.Now().After(deadline) {
			t.Fatalf("no held task of dry in asynq's retry set within 15 s: %v", err)
		}
	}
	victim, ok := tasks.ParseTaskID(held[0].ID)
	if !ok {
		t.Fatalf("task id %q", held[0].ID)
	}
	req, _ := http.NewRequest(http.MethodDelete, hs.URL+"/monitoring/api/queues/"+tasks.DefaultQueue+"/retry_tasks/"+held[0].ID, nil)
	req.SetBasicAuth(user, password)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if _, err := insp.GetTaskInfo(tasks.DefaultQueue, held[0].ID); resp.StatusCode/100 != 2 || !errors.Is(err, asynq.ErrTaskNotFound) {
		t.Fatalf("deleting %s through asynqmon: %d, then %v", held[0].ID, resp.StatusCode, err)
	}
	wait("dry", "the orphan", 15*time.Second, func(c card) bool {
		return strings.Contains(c.Orphans, "1 send waits for a task asynq no longer holds") && strings.Contains(c.Orphans, victim.OutRequestNo)
	})
	shot("orphan.png")

	// Topped up and resumed: the held sends go, the sweeper queues the
	// orphan again, and the campaign is done, once each.
	if err := r.sb.TopUp(dry.ID, 5); err != nil {
		t.Fatal(err)
	}
	if out, code := r.enqueuer("stock", "resume", "--stock-id", dry.ID); code != 0 {
		t.Fatal(out)
	}
	finished := wait("dry", "done, with its duration and no rate", 60*time.Second, func(c card) bool {
		return c.State == monitor.StateDone && strings.HasPrefix(c.Duration, "took ") &&
			strings.HasPrefix(c.Rate, "0.0 sends/s over the last minute, 0.0/s") && c.Color == green && c.Orphans == ""
	})
	t.Logf("dry: %s, %s", finished.Why, finished.Duration)
	r.checkOneCouponEach(dry.ID, dryUsers)
	shot("done.png")

	// Every send refused (the users belong to another appid): finished,
	// and not green.
	var mismatched strings.Builder
	mismatched.WriteString("openid\n")
	for i := range 5 {
		id := fmt.Sprintf("o_other_app_%d", i)
		if _, err := r.sb.RegisterUser(sandbox.User{OpenID: id, AppID: "wx00000000000000dd"}); err != nil {
			t.Fatal(err)
		}
		mismatched.WriteString(id + "\n")
	}
	refusedFile := r.dir + "/refused.csv"
	if err := os.WriteFile(refusedFile, []byte(mismatched.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, code := r.enqueuer("campaign", "--file", refusedFile, "--stock-id", r.stockID(), "--campaign", "refused"); code != 0 {
		t.Fatal(out)
	}
	wait("refused", "done with failures, not green", 30*time.Second, func(c card) bool {
		return c.State == monitor.StateDoneFailures && strings.Contains(c.Why, "all 5 sends failed") && c.Color != green
	})
	shot("all-failed.png")

	// WeChat's rate limit lets next to nothing through: blocked by it.
	r.sb.SetFaults(sandbox.Faults{RateLimit: 0.01})
	slowFile, _ := r.writeUsers("slow", 10)
	if out, code := r.enqueuer("campaign", "--file", slowFile, "--stock-id", r.stockID(), "--campaign", "slow"); code != 0 {
		t.Fatal(out)
	}
	limited := wait("slow", "blocked by the rate limit", 40*time.Second, func(c card) bool {
		return c.State == monitor.StateBlocked && strings.Contains(c.Why, "rate limit") && c.ETA == "ETA: blocked"
	})
	t.Logf("slow: %s", limited.Why)
	shot("rate-limited.png")
	r.sb.SetFaults(sandbox.Faults{})
	if st, err := r.store.Status(context.Background(), "slow"); err != nil || st.Total != 10 {
		t.Fatalf("slow: %+v, %v", st, err)
	}
}
