package monitor_test

import (
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/couponflow/dispatcher/internal/browsertest"
	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/monitor"
)

// An operator pauses a campaign from its page: the button leads to a
// confirmation that counts the sends, the confirmation posts the form, and
// the page comes back showing the campaign paused and the action in its
// audit trail; the record says paused. Read-only, the page shows no action.
func TestCampaignActionsInBrowser(t *testing.T) {
	tctx := browsertest.Tab(t, testUser, testPassword, 40*time.Second)
	r := newRig(t, monitor.WithBasicAuth(testUser, testPassword), monitor.WithRefresh(300*time.Millisecond))
	sends := r.campaign("autumn", 40)
	finish(t, r.store, sends[0], succeeded("C-0"))

	if resp, err := chromedp.Run(tctx, chromedp.NavigateResponse(r.url+"/campaigns/autumn")); err != nil || resp.Status != 200 {
		t.Fatalf("campaign page: %v, %v", resp, err)
	}
	// The page refreshes itself while the campaign runs: the click waits
	// for the button of the page in place.
	resp, err := chromedp.RunResponse(tctx, browsertest.Click(`#action-pause`))
	if err != nil || resp.Status != 200 {
		t.Fatalf("following Pause…: %v, %v", resp, err)
	}
	affects, err := chromedp.Run(tctx, browsertest.Text(`#confirm [data-affects]`))
	if err != nil || strings.TrimSpace(affects) != "39" {
		t.Fatalf("the confirmation counts %q sends (%v), want 39", affects, err)
	}
	if c := r.control("autumn"); c != idempotency.Running {
		t.Fatalf("the confirmation page alone changed the control to %q", c)
	}
	shot, err := chromedp.Run(tctx, chromedp.CaptureScreenshot())
	if err != nil {
		t.Fatal(err)
	}
	browsertest.SaveScreenshot(t, "confirm-pause.png", shot)

	resp, err = chromedp.RunResponse(tctx, browsertest.Click(`#confirm-button`))
	if err != nil || resp.Status != 200 {
		t.Fatalf("confirming: %v, %v", resp, err)
	}
	state, err := chromedp.Run(tctx, chromedp.Poll[string](
		`(function () { var e = document.querySelector('[data-control="autumn"]'); return e && e.textContent; })()`,
		chromedp.WithPollingTimeout(10*time.Second), chromedp.WithPollingInterval(100*time.Millisecond)))
	if err != nil || state != "paused" {
		t.Fatalf("after confirming, the page shows %q (%v), want paused", state, err)
	}
	if text, err := chromedp.Run(tctx, browsertest.Text(`#did`)); err != nil || !strings.Contains(text, "Paused: 39 sends") {
		t.Errorf("notice %q, %v", text, err)
	}
	if text, err := chromedp.Run(tctx, browsertest.Text(`#audit`)); err != nil || !strings.Contains(text, testUser) || !strings.Contains(text, "pause") {
		t.Errorf("audit trail %q, %v", text, err)
	}
	if n, err := chromedp.Run(tctx, chromedp.Evaluate[int](`document.querySelectorAll('#action-resume').length`)); err != nil || n != 1 {
		t.Errorf("resume buttons on the paused page: %d, %v", n, err)
	}
	if c := r.control("autumn"); c != idempotency.Paused {
		t.Fatalf("the record says %q after the page's pause", c)
	}
	shot, err = chromedp.Run(tctx, chromedp.CaptureScreenshot())
	if err != nil {
		t.Fatal(err)
	}
	browsertest.SaveScreenshot(t, "paused.png", shot)

	// Read-only: the same campaign, no action on its page.
	ro := newRig(t, monitor.WithBasicAuth(testUser, testPassword), monitor.WithReadOnly(true))
	ro.campaign("autumn", 5)
	if resp, err := chromedp.Run(tctx, chromedp.NavigateResponse(ro.url+"/campaigns/autumn")); err != nil || resp.Status != 200 {
		t.Fatalf("read-only campaign page: %v, %v", resp, err)
	}
	n, err := chromedp.Run(tctx, chromedp.Evaluate[int](
		`document.querySelectorAll('#actions, #action-pause, #action-resume, #action-cancel, form[method="post"]').length`))
	if err != nil || n != 0 {
		t.Errorf("the read-only page has %d action elements (%v)", n, err)
	}
	if text, err := chromedp.Run(tctx, browsertest.Text(`#readonly`)); err != nil || !strings.Contains(text, "read-only") {
		t.Errorf("read-only note %q, %v", text, err)
	}
}
