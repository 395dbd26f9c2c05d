package monitor_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"image"
	"image/png"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/chromedp"
	"github.com/hibiken/asynq"

	"github.com/couponflow/dispatcher/internal/monitor"
	"github.com/couponflow/dispatcher/internal/tasks"
)

// chromium finds Debian's Chromium: /usr/bin/chromium, or chromium on PATH.
func chromium() string {
	if _, err := os.Stat("/usr/bin/chromium"); err == nil {
		return "/usr/bin/chromium"
	}
	if p, err := exec.LookPath("chromium"); err == nil {
		return p
	}
	return ""
}

var progressRE = regexp.MustCompile(`^([\d,]+) of ([\d,]+) done \(`)

// TestCampaignPageInBrowser drives headless Chromium through the Chrome
// DevTools Protocol: the campaign page updates itself while sends finish,
// its link leads into asynqmon, and the screenshots are not blank (they
// are kept with go test -artifacts).
func TestCampaignPageInBrowser(t *testing.T) {
	bin := chromium()
	if bin == "" && os.Getenv("CI") == "true" {
		t.Fatal("Chromium is not installed and CI=true: .ci/run installs it, so a missing one is a broken CI machine, not a test to skip")
	}
	if bin == "" {
		t.Skip("Chromium is not installed (no /usr/bin/chromium, no chromium on PATH), so the page is not tried in a browser: " +
			".ci/run installs Debian's chromium package with apt-get when it is missing and CI runs as root; " +
			"here, as root: apt-get update && apt-get install -y chromium")
	}
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

	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(bin),
		chromedp.NoSandbox, // as root, and in containers
		chromedp.DisableGPU,
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1280, 900),
	)
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	defer cancelAlloc()
	bctx, cancelBrowser := chromedp.NewContext(allocCtx)
	defer cancelBrowser()
	start := time.Now()
	if err := chromedp.Do(bctx); err != nil { // starts the browser
		t.Fatalf("starting Chromium (%s): %v", bin, err)
	}
	t.Logf("Chromium started in %s", time.Since(start).Round(time.Millisecond))
	tctx, cancel := context.WithTimeout(bctx, 25*time.Second)
	defer cancel()

	// Basic auth on every request of the tab, as a browser sends it once
	// the user has logged in.
	cred := base64.StdEncoding.EncodeToString([]byte(testUser + ":" + testPassword))
	if _, err := chromedp.Call(tctx, network.SetExtraHTTPHeaders,
		network.SetExtraHTTPHeadersParams{Headers: network.Headers{"Authorization": "Basic " + cred}}); err != nil {
		t.Fatal(err)
	}
	resp, err := chromedp.Run(tctx, chromedp.NavigateResponse(r.url+"/campaigns/summer"))
	if err != nil {
		t.Fatal(err)
	}
	if resp.Status != 200 {
		t.Fatalf("campaign page: HTTP %d", resp.Status)
	}
	progress := chromedp.CSS(`[data-progress="summer"]`)
	first, err := chromedp.Run(tctx, chromedp.Text(progress))
	if err != nil {
		t.Fatal(err)
	}
	// A mark on this document: a reload would lose it, so the change seen
	// next is the page updating itself in place.
	if err := chromedp.Do(tctx, chromedp.Evaluate[chromedp.Void](`window.__sameDocument = true`)); err != nil {
		t.Fatal(err)
	}
	second, err := chromedp.Run(tctx, chromedp.Poll[string](fmt.Sprintf(
		`(function () { var e = document.querySelector('[data-progress="summer"]'); return e && e.textContent !== %q && e.textContent; })()`, first),
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
	if failures, err := chromedp.Run(tctx, chromedp.Text(chromedp.CSS(`#campaign-summer .failures`))); err != nil || !strings.Contains(failures, "USER_ACCOUNT_ABNORMAL") {
		t.Errorf("failures by code: %q, %v", failures, err)
	}
	shot, err := chromedp.Run(tctx, chromedp.CaptureScreenshot())
	if err != nil {
		t.Fatal(err)
	}
	saveScreenshot(t, "campaign-page.png", shot)

	// Follow the page's link into asynqmon.
	resp, err = chromedp.RunResponse(tctx, chromedp.Click(chromedp.CSS(`#campaign-summer a.queue-link`)))
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
	saveScreenshot(t, "asynqmon-queue.png", shot)

	// The index page lists the campaign and the queue.
	if err := chromedp.Do(tctx, chromedp.Navigate(r.url+"/")); err != nil {
		t.Fatal(err)
	}
	if text, err := chromedp.Run(tctx, chromedp.Text(chromedp.CSS(`main`))); err != nil ||
		!strings.Contains(text, "summer") || !strings.Contains(text, "open in asynqmon") {
		t.Errorf("index page: %v\n%s", err, text)
	}
	shot, err = chromedp.Run(tctx, chromedp.CaptureScreenshot())
	if err != nil {
		t.Fatal(err)
	}
	saveScreenshot(t, "index.png", shot)
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

// saveScreenshot checks that a PNG shows something (many colours, a fair
// share of pixels that are not white) and keeps it in the test's artifact
// directory.
func saveScreenshot(t *testing.T, name string, data []byte) {
	t.Helper()
	img, err := png.Decode(bytes.NewReader(data))
	if err != nil {
		t.Fatalf("screenshot %s is not a PNG: %v", name, err)
	}
	colours, nonWhite, all := census(img)
	path := filepath.Join(t.ArtifactDir(), name)
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot %s: %dx%d, %d colours, %.1f%% not white", path, img.Bounds().Dx(), img.Bounds().Dy(),
		colours, 100*float64(nonWhite)/float64(all))
	if colours < 16 || float64(nonWhite) < 0.02*float64(all) {
		t.Errorf("screenshot %s looks blank: %d colours, %d of %d pixels not white", path, colours, nonWhite, all)
	}
}

func census(img image.Image) (colours, nonWhite, all int) {
	seen := map[[3]uint32]bool{}
	b := img.Bounds()
	for y := b.Min.Y; y < b.Max.Y; y++ {
		for x := b.Min.X; x < b.Max.X; x++ {
			r, g, bl, _ := img.At(x, y).RGBA()
			seen[[3]uint32{r >> 8, g >> 8, bl >> 8}] = true
			if r>>8 < 245 || g>>8 < 245 || bl>>8 < 245 {
				nonWhite++
			}
			all++
		}
	}
	return len(seen), nonWhite, all
}
