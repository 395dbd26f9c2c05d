package monitor_test

import (
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/couponflow/dispatcher/internal/monitor"
)

// The states as an on-call engineer sees them in Chromium: a campaign
// whose every send failed is not green, and one with no worker alive
// says stalled and why.
func TestCampaignStatesInBrowser(t *testing.T) {
	tctx := browserTab(t)
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
	saveScreenshot(t, "states.png", shot)

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
		saveScreenshot(t, "400px"+strings.ReplaceAll(path, "/", "-")+".png", shot)
	}
}
