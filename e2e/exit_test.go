package e2e

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// -h exits 0 without an error line; a usage error exits 2 and says so
// once; a runtime error exits 1.
func TestExitStatuses(t *testing.T) {
	t.Parallel()
	run := func(bin string, env []string, args ...string) (string, int) {
		cmd := exec.Command(filepath.Join(binDir, bin), args...)
		cmd.Env = env
		out, err := cmd.CombinedOutput()
		if ee, ok := err.(*exec.ExitError); ok {
			return string(out), ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		return string(out), 0
	}
	for _, c := range []struct {
		bin  string
		args []string
		code int
		has  string
	}{
		{"worker", []string{"-h"}, 0, "-concurrency"},
		{"worker", []string{"--nope"}, 2, "flag provided but not defined: -nope"},
		{"worker", []string{"--concurrency", "0"}, 2, "worker: --concurrency must be at least 1"},
		{"worker", []string{}, 2, "WECHATPAY_MCHID"},
		{"wxsandbox", []string{"-h"}, 0, "-data-dir"},
		{"wxsandbox", []string{"--nope"}, 2, "flag provided but not defined: -nope"},
		{"wxsandbox", []string{"--error-rate", "2"}, 2, "wxsandbox: "},
		{"receiver", []string{"-h"}, 0, "-apiv3-key"},
		{"receiver", []string{"--nope"}, 2, "flag provided but not defined: -nope"},
		{"receiver", []string{}, 2, "WECHATPAY_APIV3_KEY"},
		{"enqueuer", []string{"callbacks"}, 2, "usage: enqueuer callbacks set"},
		{"enqueuer", []string{"redemptions", "sync", "-h"}, 0, "-campaign"},
		{"enqueuer", []string{"-h"}, 0, "commands:"},
		{"enqueuer", []string{"status", "-h"}, 0, "-campaign"},
		{"enqueuer", []string{"status", "--nope"}, 2, "flag provided but not defined: -nope"},
		{"enqueuer", []string{"nope"}, 2, `unknown command "nope"`},
		{"enqueuer", []string{"status", "--campaign", "x", "--redis-addr", "127.0.0.1:1"}, 1, "enqueuer: "},
	} {
		out, code := run(c.bin, []string{"PATH=/usr/bin:/bin"}, c.args...)
		if code != c.code || !strings.Contains(out, c.has) {
			t.Errorf("%s %v: exit %d, want %d with %q:\n%s", c.bin, c.args, code, c.code, c.has, tail(out, 10))
		}
		if strings.Contains(out, "help requested") || strings.Count(out, "flag provided but not defined") > 1 {
			t.Errorf("%s %v: said twice, or said help was requested:\n%s", c.bin, c.args, tail(out, 10))
		}
	}
}

// One variable names the queue for every program.
func TestQueueVariableNamesTheQueueForAll(t *testing.T) {
	t.Parallel()
	r := newRig(t)
	r.env = append(r.env, "QUEUE=vip")
	path, openids := r.writeUsers("vip", 20)
	if out, code := r.enqueuer("campaign", "--file", path, "--stock-id", r.stockID(), "--campaign", "vip"); code != 0 || !strings.Contains(out, "queue vip") {
		t.Fatalf("exit %d:\n%s", code, out)
	}
	r.worker("a", "--http-addr=")
	r.waitFor("vip", 30*time.Second, "every send done", done)
	r.checkOneCouponEach(r.stockID(), openids)
}
