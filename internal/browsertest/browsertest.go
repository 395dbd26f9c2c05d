// Package browsertest drives Debian's headless Chromium for the tests of
// the pages people read (internal/monitor, e2e): a tab with credentials,
// and screenshots that are checked not to be blank and kept as the test's
// artifacts (go test -artifacts).
package browsertest

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"image"
	"image/png"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/chromedp"
)

// Chromium finds Debian's Chromium: /usr/bin/chromium, or chromium on PATH.
func Chromium() string {
	if _, err := os.Stat("/usr/bin/chromium"); err == nil {
		return "/usr/bin/chromium"
	}
	if p, err := exec.LookPath("chromium"); err == nil {
		return p
	}
	return ""
}

// Tab starts a headless Chromium for the test and returns a tab that
// sends HTTP basic auth as user and password (none when user is ""),
// good for timeout. It skips without Chromium, and fails under CI=true:
// .ci/run installs it, so a missing one is a broken CI machine.
func Tab(t testing.TB, user, password string, timeout time.Duration) context.Context {
	t.Helper()
	bin := Chromium()
	if bin == "" && os.Getenv("CI") == "true" {
		t.Fatal("Chromium is not installed and CI=true: .ci/run installs it, so a missing one is a broken CI machine, not a test to skip")
	}
	if bin == "" {
		t.Skip("Chromium is not installed (no /usr/bin/chromium, no chromium on PATH); as root: apt-get update && apt-get install -y chromium")
	}
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(bin),
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1280, 900),
	)
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	t.Cleanup(cancelAlloc)
	bctx, cancelBrowser := chromedp.NewContext(allocCtx)
	t.Cleanup(cancelBrowser)
	if err := chromedp.Do(bctx); err != nil {
		t.Fatalf("starting Chromium (%s): %v", bin, err)
	}
	tctx, cancel := context.WithTimeout(bctx, timeout)
	t.Cleanup(cancel)
	if user != "" {
		cred := base64.StdEncoding.EncodeToString([]byte(user + ":" + password))
		if _, err := chromedp.Call(tctx, network.SetExtraHTTPHeaders,
			network.SetExtraHTTPHeadersParams{Headers: network.Headers{"Authorization": "Basic " + cred}}); err != nil {
			t.Fatal(err)
		}
	}
	return tctx
}

// Text waits for an element and reads its visible text, in one JavaScript
// evaluation. chromedp.Text finds a node id first and reads it in a second
// call; our pages replace their content on every refresh, so between the
// two the node can be gone ("Could not find node with given id").
func Text(sel string) chromedp.Action[string] {
	// The text rides in an array, which is truthy even when the text is "".
	poll := chromedp.Poll[[]string](fmt.Sprintf(
		`(function () { var e = document.querySelector(%s); return e !== null && [e.innerText]; })()`, jsString(sel)),
		chromedp.WithPollingInterval(50*time.Millisecond))
	return func(ctx context.Context, t *chromedp.Target) (string, error) {
		v, err := poll(ctx, t)
		if err != nil || len(v) != 1 {
			return "", fmt.Errorf("reading the text of %s: %v", sel, err)
		}
		return v[0], nil
	}
}

// Click clicks an element once it is shown and enabled, in one JavaScript
// evaluation, for the same reason as Text. Wrap it in chromedp.RunResponse
// when the click navigates.
func Click(sel string) chromedp.Action[chromedp.Void] {
	return chromedp.Poll[chromedp.Void](fmt.Sprintf(
		`(function () { var e = document.querySelector(%s); if (e === null || e.disabled || e.getClientRects().length === 0) { return false; } e.click(); return true; })()`, jsString(sel)),
		chromedp.WithPollingInterval(50*time.Millisecond))
}

func jsString(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

// SaveScreenshot checks that a PNG shows something (many colours, a fair
// share of pixels that are not white) and keeps it in the test's artifact
// directory.
func SaveScreenshot(t testing.TB, name string, data []byte) {
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
