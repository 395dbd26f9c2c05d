package monitor_test

import (
	"context"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/hibiken/asynq"

	"github.com/couponflow/dispatcher/internal/browsertest"
	"github.com/couponflow/dispatcher/internal/monitor"
	"github.com/couponflow/dispatcher/internal/tasks"
)

var progressRE = regexp.MustCompile(`^([\d,]+) of ([\d,]+) done \(`)

// TestCampaignPageInBrowser drives headless Chromium through the Chrome
// DevTools Protocol: the campaign page updates itself while sends finish,
// its link leads into asynqmon, and the screenshots are not blank (they
// are kept with go test -artifacts).
func TestCampaignPageInBrowser(t *testing.T) {
	tctx := browsertest.Tab(t, testUser, testPassword, 25*time.Second)
	r := newRig(t, monitor.WithBasicAuth(testUser, testPassword), monitor.WithMchID(testMchID),
		monitor.WithRefresh(300*time.Millisecond))
	client := asynq.NewClientFromRedisClient(r.rdb)
	for i := range 3 {
		if _, err := client.Enqueue(asynq.NewTask(tasks.TypeSendCoupon, []byte(`{"v":1}`)), asynq.Queue(tasks.DefaultQueue),
			asynq.TaskID(fmt.Sprintf("send:%s:summer-%04d", testMchID, i))); err != nil {
			t.Fatal(err)
		}
	}
	sends := r.campaign("summer", 200)
	finish(t, r.store, sends[0], succeeded("C-0"))

	// A worker's progress: one send finished every 200ms, every fifth a
	// failure.
	ctx, stop := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	t.Cleanup(func() { stop(); wg.Wait() }) // before the rig's Redis goes
	wg.Go(func() {
		tick := time.NewTicker(200 * time.Millisecond)
		defer tick.Stop()
		for i := 1; i < len(sends); i++ {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			if i%5 == 0 {
				finish(t, r.store, sends[i], failed("USER_ACCOUNT_ABNORMAL", "abnormal account"))
			} else {
				finish(t, r.store, sends[i], succeeded(fmt.Sprintf("C-%d", i)))
			}
		}
	})

	resp, err := chromedp.Run(tctx, chromedp.NavigateResponse(r.url+"/campaigns/summer"))
	if err != nil {
		t.Fatal(err)
	}
	if resp.Status != 200 {
		t.Fatalf("campaign page: HTTP %d", resp.Status)
	}
	first, err := chromedp.Run(tctx, browsertest.Text(`[data-progress="summer"]`))
	if err != nil {
		t.Fatal(err)
	}
	// A mark on this document: a reload would lose it, so the change seen
	// next is the page updating itself in place.
	if err := chromedp.Do(tctx, chromedp.Evaluate[chromedp.Void](`window.__sameDocument = true`)); err != nil {
		t.Fatal(err)
	}
	second, err := chromedp.Run(tctx, chromedp.Poll[string](fmt.Sprintf(
		`(function () { var e = document.querySelector('[data-progress="summer"]'); return e && e.innerText !== %q && e.innerText; })()`, first),
		chromedp.WithPollingTimeout(10*time.Second), chromedp.WithPollingInterval(100*time.Millisecond)))
	if err != nil {
		t.Fatalf("the progress %q did not change within 10s: %v", first, err)
	}
	if same, err := chromedp.Run(tctx, chromedp.Evaluate[bool](`window.__sameDocument === true`)); err != nil || !same {
		t.Errorf("the page was reloaded rather than updated in place (%v)", err)
	}
	n1, total1 := parseProgress(t, first)
	n2, total2 := parseProgress(t, second)
	if total1 != 200 || total2 != 200 || n2 <= n1 {
		t.Errorf("progress went from %q to %q, want more of 200 done", first, second)
	}
	t.Logf("progress seen: %q, then %q", first, second)
	if failures, err := chromedp.Run(tctx, browsertest.Text(`#campaign-summer .failures`)); err != nil || !strings.Contains(failures, "USER_ACCOUNT_ABNORMAL") {
		t.Errorf("failures by code: %q, %v", failures, err)
	}
	shot, err := chromedp.Run(tctx, chromedp.CaptureScreenshot())
	if err != nil {
		t.Fatal(err)
	}
	browsertest.SaveScreenshot(t, "campaign-page.png", shot)

	// Follow the page's link into asynqmon.
	resp, err = chromedp.RunResponse(tctx, browsertest.Click(`#campaign-summer a.queue-link`))
	if err != nil {
		t.Fatalf("following the queue link: %v", err)
	}
	if resp.Status != 200 {
		t.Fatalf("asynqmon: HTTP %d", resp.Status)
	}
	loc, err := chromedp.Run(tctx, chromedp.Location())
	if err != nil || !strings.HasSuffix(loc, "/monitoring/queues/coupons") {
		t.Errorf("the queue link led to %q (%v), want /monitoring/queues/coupons", loc, err)
	}
	// asynqmon's React app renders the queue from its API, through our mount.
	if _, err := chromedp.Run(tctx, chromedp.Poll[bool](
		`document.title.indexOf('Asynq') >= 0 && document.querySelector('#root') !== null && document.querySelector('#root').innerText.indexOf('coupons') >= 0`,
		chromedp.WithPollingTimeout(10*time.Second), chromedp.WithPollingInterval(100*time.Millisecond))); err != nil {
		title, _ := chromedp.Run(tctx, chromedp.Title())
		text, _ := chromedp.Run(tctx, chromedp.Evaluate[string](`document.body.innerText`))
		t.Fatalf("asynqmon did not show queue coupons (title %q): %v\n%s", title, err, text)
	}
	title, _ := chromedp.Run(tctx, chromedp.Title())
	t.Logf("asynqmon page title %q", title)
	shot, err = chromedp.Run(tctx, chromedp.CaptureScreenshot())
	if err != nil {
		t.Fatal(err)
	}
	browsertest.SaveScreenshot(t, "asynqmon-queue.png", shot)

	// The index page lists the campaign and the queue.
	if err := chromedp.Do(tctx, chromedp.Navigate(r.url+"/")); err != nil {
		t.Fatal(err)
	}
	if text, err := chromedp.Run(tctx, browsertest.Text(`main`)); err != nil ||
		!strings.Contains(text, "summer") || !strings.Contains(text, "open in asynqmon") {
		t.Errorf("index page: %v\n%s", err, text)
	}
	shot, err = chromedp.Run(tctx, chromedp.CaptureScreenshot())
	if err != nil {
		t.Fatal(err)
	}
	browsertest.SaveScreenshot(t, "index.png", shot)
}

func parseProgress(t *testing.T, s string) (done, total int) {
	t.Helper()
	m := progressRE.FindStringSubmatch(strings.TrimSpace(s))
	if m == nil {
		t.Fatalf("progress %q is not \"N of M done (…)\"", s)
	}
	// Numbers have thousands separators (1,234).
	done, _ = strconv.Atoi(strings.ReplaceAll(m[1], ",", ""))
	total, _ = strconv.Atoi(strings.ReplaceAll(m[2], ",", ""))
	return done, total
}
