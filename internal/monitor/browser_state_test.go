package monitor_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/cdproto/emulation"
	"github.com/chromedp/chromedp"

	"github.com/couponflow/dispatcher/internal/breaker"
	"github.com/couponflow/dispatcher/internal/browsertest"
	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/monitor"
)

// The states as an on-call engineer sees them in Chromium: a campaign
// whose every send failed is not green, and one with no worker alive
// says stalled and why.
func TestCampaignStatesInBrowser(t *testing.T) {
	tctx := browsertest.Tab(t, testUser, testPassword, 40*time.Second)
	r := newRig(t, monitor.WithBasicAuth(testUser, testPassword), monitor.WithMchID(testMchID),
		monitor.WithRefresh(300*time.Millisecond))
	for _, s := range r.campaign("dud", 3) {
		finish(t, r.store, s, failed("STOCK_STATUS_ERROR", "stock 16000001 is stopped"))
	}
	idle := r.campaign("idle", 3)
	finish(t, r.store, idle[0], succeeded("C-0"))

	if resp, err := chromedp.Run(tctx, chromedp.NavigateResponse(r.url+"/")); err != nil || resp.Status != 200 {
		t.Fatalf("index page: %v, %v", resp, err)
	}
	// The badge's colour as rendered, and its words.
	type badge struct {
		Text  string `json:"text"`
		Color string `json:"color"`
		Why   string `json:"why"`
	}
	read := func(name string) badge {
		t.Helper()
		b, err := chromedp.Run(tctx, chromedp.Evaluate[badge](`(function () {
			var card = document.querySelector('[data-campaign="`+name+`"]');
			var s = card.querySelector('h3 span');
			return {text: s.textContent, color: getComputedStyle(s).color,
				why: card.querySelector('[data-state-of]').textContent};
		})()`))
		if err != nil {
			t.Fatalf("reading %s's badge: %v", name, err)
		}
		return b
	}
	green, err := chromedp.Run(tctx, chromedp.Evaluate[string](
		`getComputedStyle(document.documentElement).getPropertyValue('--ok').trim()`))
	if err != nil || green == "" {
		t.Fatalf("the page's green: %q, %v", green, err)
	}
	const greenRGB = "rgb(46, 157, 91)" // --ok, #2e9d5b
	if green != "#2e9d5b" {
		t.Fatalf("--ok is %s, this test expects #2e9d5b", green)
	}

	dud := read("dud")
	if dud.Text != "done with failures" || dud.Color == greenRGB || !strings.Contains(dud.Why, "all 3 sends failed") {
		t.Errorf("every send failed: badge %+v, want not green, done with failures, all 3 failed", dud)
	}
	st := read("idle")
	if st.Text != "stalled" || !strings.Contains(st.Why, "no live worker") || !strings.Contains(st.Why, "0 live workers") {
		t.Errorf("no worker: badge %+v, want stalled with no live worker", st)
	}
	shot, err := chromedp.Run(tctx, chromedp.CaptureScreenshot())
	if err != nil {
		t.Fatal(err)
	}
	browsertest.SaveScreenshot(t, "states.png", shot)

	// On a phone, 400 px wide, with a breaker, its remedy and the reasons
	// on the page: the header wraps, wide tables scroll inside their card,
	// and the page itself never scrolls sideways.
	openBreaker(t, r, "16000001")
	for _, path := range []string{"/", "/campaigns/dud"} {
		if _, err := chromedp.Run(tctx, chromedp.EmulateViewport(400, 800)); err != nil {
			t.Fatal(err)
		}
		if _, err := chromedp.Run(tctx, chromedp.Navigate(r.url+path)); err != nil {
			t.Fatal(err)
		}
		w, err := chromedp.Run(tctx, chromedp.Evaluate[int](`document.documentElement.scrollWidth`))
		if err != nil || w > 400 {
			t.Errorf("%s at 400 px is %d px wide (%v): it scrolls sideways", path, w, err)
		}
		shot, err := chromedp.Run(tctx, chromedp.CaptureScreenshot())
		if err != nil {
			t.Fatal(err)
		}
		browsertest.SaveScreenshot(t, "400px"+strings.ReplaceAll(path, "/", "-")+".png", shot)
	}
}

// A dry stock seen in Chromium: the campaign is blocked, its card names
// the stock, its breaker and the remedy; the ETA says blocked. Once done
// the card says how long it took, and its rates are 0.
func TestBlockedAndDoneInBrowser(t *testing.T) {
	tctx := browsertest.Tab(t, testUser, testPassword, 40*time.Second)
	r := newRig(t, monitor.WithBasicAuth(testUser, testPassword), monitor.WithMchID(testMchID),
		monitor.WithRefresh(300*time.Millisecond))
	startWorker(t, r)
	sends := r.campaign("dry", 2)
	finish(t, r.store, sends[0], succeeded("C-0"))
	openBreaker(t, r, "16000001")
	finish(t, r.store, sends[1], idempotency.Result{State: idempotency.WaitingBudget, Code: "NOT_ENOUGH", Message: "批次预算不足"})

	// An on-call engineer in Shanghai: each UTC time has their local
	// time beside it.
	if _, err := chromedp.Call(tctx, emulation.SetTimezoneOverride, emulation.SetTimezoneOverrideParams{TimezoneID: "Asia/Shanghai"}); err != nil {
		t.Fatal(err)
	}
	if resp, err := chromedp.Run(tctx, chromedp.NavigateResponse(r.url+"/campaigns/dry")); err != nil || resp.Status != 200 {
		t.Fatalf("campaign page: %v, %v", resp, err)
	}
	text := func(sel string) string {
		t.Helper()
		s, err := chromedp.Run(tctx, browsertest.Text(sel))
		if err != nil {
			t.Fatalf("%s: %v", sel, err)
		}
		return s
	}
	if s := text(`[data-campaign="dry"] h3`); !strings.Contains(s, "blocked") {
		t.Errorf("heading %q, want blocked", s)
	}
	if s := text(`[data-state-of="dry"]`); !strings.Contains(s, "stock 16000001") || !strings.Contains(s, "1 live worker") {
		t.Errorf("state line %q, want the stock and 1 live worker", s)
	}
	if s := text(`[data-stock="16000001"]`); !strings.Contains(s, "breaker OPEN") || !strings.Contains(s, "next probe in") ||
		!strings.Contains(s, "enqueuer stock resume --stock-id 16000001") || !strings.Contains(s, "fail NOT_ENOUGH") {
		t.Errorf("stock %q, want its open breaker, next probe and remedy", s)
	}
	if s := text(`[data-eta="dry"]`); s != "ETA: blocked" {
		t.Errorf("ETA %q, want blocked", s)
	}
	type shown struct {
		UTC   string `json:"utc"`
		At    string `json:"at"`
		Local string `json:"local"`
	}
	opened, err := chromedp.Run(tctx, chromedp.Evaluate[shown](`(function () {
		var el = document.querySelector('[data-stock="16000001"] time');
		var local = el.nextElementSibling;
		return {utc: el.textContent, at: el.getAttribute('datetime'), local: local && local.className === 'local' ? local.textContent : ''};
	})()`))
	if err != nil {
		t.Fatal(err)
	}
	if at, err := time.Parse(time.RFC3339, opened.At); err != nil || !strings.HasSuffix(opened.UTC, " UTC") ||
		!strings.Contains(opened.Local, at.In(time.FixedZone("", 8*3600)).Format("15:04:05")) || !strings.Contains(opened.Local, "GMT+8") {
		t.Errorf("breaker opened at %+v (%v): want UTC, then Shanghai's time with GMT+8 beside it", opened, err)
	}
	shot, err := chromedp.Run(tctx, chromedp.CaptureScreenshot())
	if err != nil {
		t.Fatal(err)
	}
	browsertest.SaveScreenshot(t, "blocked.png", shot)

	// Topped up: the held send succeeds, notify marks the campaign done,
	// and the page (refreshing itself) shows the duration and rates of 0.
	if err := breaker.New(r.rdb).Resume(context.Background(), testMchID, "16000001"); err != nil {
		t.Fatal(err)
	}
	finish(t, r.store, sends[1], succeeded("C-1"))
	if err := r.rdb.HSet(context.Background(), r.store.Keys().Meta("dry"), "done_at", time.Now().UnixMilli()).Err(); err != nil {
		t.Fatal(err)
	}
	took, err := chromedp.Run(tctx, chromedp.Poll[string](
		`(function () { var e = document.querySelector('[data-duration="dry"]'); return e && e.textContent; })()`,
		chromedp.WithPollingTimeout(10*time.Second), chromedp.WithPollingInterval(100*time.Millisecond)))
	if err != nil || !strings.HasPrefix(took, "took ") {
		t.Fatalf("duration %q (%v), want took …", took, err)
	}
	// The page replaced itself: the local times are there again.
	if n, err := chromedp.Run(tctx, chromedp.Evaluate[int](`document.querySelectorAll('time + .local').length`)); err != nil || n == 0 {
		t.Errorf("after a refresh, %d local times beside UTC (%v)", n, err)
	}
	if s := text(`[data-campaign="dry"] h3`); !strings.Contains(s, "done") || strings.Contains(s, "failures") {
		t.Errorf("heading %q, want done", s)
	}
	if s := text(`[data-rate="dry"]`); !strings.HasPrefix(s, "0.0 sends/s over the last minute, 0.0/s") {
		t.Errorf("rate %q once done, want 0.0", s)
	}
}
