package e2e

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hibiken/asynq"

	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/sandbox"
	"github.com/couponflow/dispatcher/internal/tasks"
)

func (r *rig) pending() int {
	r.t.Helper()
	info, err := asynq.NewInspectorFromRedisClient(r.rdb).GetQueueInfo(tasks.DefaultQueue)
	if err != nil {
		r.t.Fatal(err)
	}
	return info.Pending
}

func TestBadInputIsReportedAndSkipped(t *testing.T) {
	r := newRig(t)
	long := strings.Repeat("x", 129)
	file := filepath.Join(r.dir, "mixed.csv")
	content := "openid,out_request_no,coupon_value,coupon_minimum\n" + // line 1
		"good_1,,,\n" + //                 2
		",r-missing,,\n" + //              3: missing openid
		"bad id,,,\n" + //                 4: a space
		"good_2,r-ok-1,100,200\n" + //     5
		"good_3,bad/orn,,\n" + //          6: '/' not allowed
		long + ",,,\n" + //                7: too long
		"good_4,,abc,100\n" + //           8: not a number
		"good_5,,100,\n" + //              9: one of a pair
		"good_6,,,\n" + //                 10
		"good_1,,,\n" //                   11: the same recipient again
	if err := os.WriteFile(file, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	out, code := r.enqueuer("campaign", "--file", file, "--stock-id", r.stockID(), "--campaign", "mixed")
	if code != 0 {
		t.Fatalf("exit %d; invalid rows must not fail a run whose valid rows were all queued:\n%s", code, out)
	}
	if !strings.Contains(out, "enqueued 3, duplicates 1, invalid 6") {
		t.Fatalf("summary:\n%s", out)
	}
	for _, want := range []string{"line 3: openid", "line 4: openid \"bad id\"", "line 6: out_request_no \"bad/orn\"",
		"line 7: openid", "line 8: coupon_value \"abc\"", "line 9: coupon"} {
		if !strings.Contains(out, want) {
			t.Errorf("the summary does not say %q:\n%s", want, out)
		}
	}
	if st, _ := r.store.Status(context.Background(), "mixed"); st.Total != 3 || r.pending() != 3 {
		t.Fatalf("%d recorded, %d queued; want the 3 valid rows", st.Total, r.pending())
	}
	// The campaign remembers what it skipped, for the monitor's card.
	if c, err := r.store.Campaign(context.Background(), "mixed"); err != nil || c.Skipped != 6 ||
		len(c.SkippedRows) != idempotency.MaxSkippedRows || !strings.HasPrefix(c.SkippedRows[0], "line 3: openid") {
		t.Errorf("skipped rows recorded: %d %q (%v), want 6, the first %d from line 3", c.Skipped, c.SkippedRows, err, idempotency.MaxSkippedRows)
	}

	// Files that are not recipient files at all: refused whole, exit 2,
	// nothing queued.
	cases := map[string]struct{ content, want string }{
		"header.csv":      {"open_id,value\nx,1\n", `unknown column "open_id"`},
		"binary.csv":      {"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "looks binary"},
		"empty.csv":       {"", "no recipients"},
		"header-only.csv": {"openid,out_request_no\n", "no recipients"},
		"noheader.jsonl":  {"{\"openid\": \"a\"}\n{\"openid\": \"b\", \"oops\": 1}\nnot json\n", ""},
	}
	for name, c := range cases {
		path := filepath.Join(r.dir, name)
		os.WriteFile(path, []byte(c.content), 0o644)
		campaign := strings.NewReplacer(".", "-").Replace(name)
		out, code := r.enqueuer("campaign", "--file", path, "--stock-id", r.stockID(), "--campaign", campaign)
		if c.want == "" {
			// JSON lines with two bad rows: the good one is queued.
			if code != 0 || !strings.Contains(out, "enqueued 1, duplicates 0, invalid 2") || !strings.Contains(out, `line 2: "oops": unknown key`) {
				t.Errorf("%s: exit %d:\n%s", name, code, out)
			}
			continue
		}
		if code != 2 || !strings.Contains(out, c.want) {
			t.Errorf("%s: exit %d, want 2 and %q:\n%s", name, code, c.want, out)
		}
		if st, _ := r.store.Status(context.Background(), campaign); st.Total != 0 {
			t.Errorf("%s: %d sends recorded from a refused file", name, st.Total)
		}
		if meta, _ := r.store.Campaign(context.Background(), campaign); meta.Name != "" {
			t.Errorf("%s: a refused file created the campaign %+v", name, meta)
		}
	}
	adir := filepath.Join(r.dir, "adir")
	os.Mkdir(adir, 0o755)
	if out, code := r.enqueuer("campaign", "--file", adir, "--stock-id", r.stockID(), "--campaign", "adir"); code != 2 {
		t.Errorf("a directory: exit %d:\n%s", code, out)
	}
	if meta, _ := r.store.Campaign(context.Background(), "adir"); meta.Name != "" {
		t.Errorf("a directory created the campaign %+v", meta)
	}
	if r.pending() != 4 {
		t.Fatalf("%d tasks queued in all, want 4", r.pending())
	}
}

// Redis dies in the middle of a bulk enqueue: the enqueuer stops with a
// message that says what to do, and running it again completes the
// campaign with every recipient queued exactly once.
func TestEnqueueResumesAfterRedisFailure(t *testing.T) {
	r := newRig(t, "--appendonly", "yes", "--appendfsync", "always")
	const n = 20000
	path, _ := r.writeUsers("resume", n)
	p := r.start(filepath.Join(binDir, "enqueuer"), "campaign", "--file", path, "--stock-id", r.stockID(), "--campaign", "resume", "--concurrency", "8")
	r.waitFor("resume", time.Minute, "a few thousand rows queued", func(st idempotency.Status) bool { return st.Total >= 3000 })
	r.redis.Kill()
	<-p.done
	out := p.out.String()
	if p.cmd.ProcessState.ExitCode() == 0 || !regexp.MustCompile(`(?s)redis.*run the same command again`).MatchString(out) {
		t.Fatalf("enqueuer exit %d after Redis died:\n%s", p.cmd.ProcessState.ExitCode(), tail(out, 10))
	}
	r.redis.Restart()
	before, _ := r.store.Status(context.Background(), "resume")
	if before.Total >= n {
		t.Fatalf("the first run finished (%d) before Redis was killed; the test proved nothing", before.Total)
	}
	out, code := r.enqueuer("campaign", "--file", path, "--stock-id", r.stockID(), "--campaign", "resume")
	m := regexp.MustCompile(`enqueued (\d+), duplicates (\d+), invalid 0`).FindStringSubmatch(out)
	if code != 0 || m == nil {
		t.Fatalf("re-run exit %d:\n%s", code, out)
	}
	enq, _ := strconv.Atoi(m[1])
	dup, _ := strconv.Atoi(m[2])
	if enq+dup != n || dup == 0 {
		t.Fatalf("re-run: %d enqueued + %d duplicates, want %d in all with some duplicates", enq, dup, n)
	}
	after, _ := r.store.Status(context.Background(), "resume")
	if after.Total != n || r.pending() != n {
		t.Fatalf("%d recorded and %d queued after resuming, want %d each", after.Total, r.pending(), n)
	}
	t.Logf("first run recorded %d before Redis died; the re-run queued %d and found %d", before.Total, enq, dup)
}

// SIGTERM while calls are in flight: the worker stops taking tasks, lets
// the calls finish and records every one of them before it exits.
func TestGracefulShutdownRecordsCallsInFlight(t *testing.T) {
	r := newRig(t)
	r.sb.SetFaults(sandbox.Faults{Latency: 1500 * time.Millisecond, LatencyRate: 1})
	path, openids := r.writeUsers("calm", 60)
	if out, code := r.enqueuer("campaign", "--file", path, "--stock-id", r.stockID(), "--campaign", "calm"); code != 0 {
		t.Fatal(out)
	}
	w := r.worker("a", "--concurrency", "10")
	r.waitFor("calm", 30*time.Second, "calls in flight", func(st idempotency.Status) bool { return st.ByState[idempotency.InFlight] >= 5 })
	w.signal(syscall.SIGTERM)
	select {
	case <-w.done:
	case <-time.After(40 * time.Second):
		t.Fatal("the worker did not stop within 40s of SIGTERM")
	}
	st, _ := r.store.Status(context.Background(), "calm")
	issued := len(r.sb.Ledger().Coupons)
	if st.ByState[idempotency.InFlight] != 0 || int(st.ByState[idempotency.Succeeded]) != issued || issued == 0 {
		t.Fatalf("after shutdown: %d in flight, %d recorded as sent, %d issued by WeChat", st.ByState[idempotency.InFlight], st.ByState[idempotency.Succeeded], issued)
	}
	if !strings.Contains(w.out.String(), "worker stopped") {
		t.Fatalf("no clean stop in the log:\n%s", tail(w.out.String(), 10))
	}
	r.sb.SetFaults(sandbox.Faults{})
	r.worker("b")
	r.waitFor("calm", time.Minute, "every send done", done)
	r.checkOneCouponEach(r.stockID(), openids)
}

// SIGKILL in the middle of a campaign. asynq gives a dead worker's tasks
// back only once their lease (30s) is 30s stale, and checks at start and
// then every minute, so this test waits about 65s for that; it runs in
// parallel with the others to hide the wait.
func TestWorkerKilledMidCampaign(t *testing.T) {
	t.Parallel()
	r := newRig(t)
	r.sb.SetFaults(sandbox.Faults{Latency: 200 * time.Millisecond, LatencyRate: 1})
	path, openids := r.writeUsers("crash", 400)
	if out, code := r.enqueuer("campaign", "--file", path, "--stock-id", r.stockID(), "--campaign", "crash"); code != 0 {
		t.Fatal(out)
	}
	// A claim runs out 2×call-timeout+10s after it is taken: 20 s here.
	args := []string{"--concurrency", "8", "--http-addr=", "--call-timeout", "5s", "--sweep-every", "1s"}
	a := r.worker("a", args...)
	r.waitFor("crash", time.Minute, "100 sent", func(st idempotency.Status) bool { return st.ByState[idempotency.Succeeded] >= 100 })
	a.signal(syscall.SIGKILL)
	killed := time.Now()
	<-a.done
	st, _ := r.store.Status(context.Background(), "crash")
	orphans := st.ByState[idempotency.InFlight]
	t.Logf("killed with %d sends in flight", orphans)

	// A survivor takes the rest at once, and the dead worker's sends once
	// their claims run out: asynq alone would give them back only after
	// 55 to 120 s (its lease of 30 s, then its recoverer, once a minute,
	// for leases expired 30 s before).
	b := r.worker("b", args...)
	r.waitFor("crash", 2*time.Minute, "everything but the orphans", func(st idempotency.Status) bool {
		return st.ByState[idempotency.Succeeded]+st.ByState[idempotency.InFlight] == 400 && st.ByState[idempotency.Pending] == 0
	})
	r.waitFor("crash", 2*time.Minute, "every send done", done)
	tailTime := time.Since(killed)
	r.checkOneCouponEach(r.stockID(), openids)
	if orphans == 0 {
		t.Log("no send was in flight at the kill; the takeover path went unexercised this time")
		return
	}
	t.Logf("the %d sends the killed worker held were done %s after the kill", orphans, tailTime.Round(100*time.Millisecond))
	if !strings.Contains(b.out.String(), "queued again a send a dead worker held") {
		t.Errorf("the survivor's sweeper did not take the dead worker's sends; they came back %s after the kill", tailTime.Round(time.Second))
	}
}

// One cash coupon through enqueuer send: queued once, a duplicate after,
// and a refused field named.
func TestSendOneCoupon(t *testing.T) {
	r := newRig(t)
	out, code := r.enqueuer("send", "--openid", "o_one", "--stock-id", r.stockID(), "--out-request-no", "r-one-1", "--campaign", "one")
	if code != 0 || !strings.Contains(out, "enqueued send:") || !strings.Contains(out, "r-one-1") {
		t.Fatalf("exit %d:\n%s", code, out)
	}
	out, code = r.enqueuer("send", "--openid", "o_one", "--stock-id", r.stockID(), "--out-request-no", "r-one-1", "--campaign", "one")
	if code != 0 || !strings.Contains(out, "duplicate: ") {
		t.Fatalf("second send exit %d:\n%s", code, out)
	}
	out, code = r.enqueuer("send", "--openid", "o one", "--stock-id", r.stockID(), "--campaign", "one")
	if code != 2 || !strings.Contains(out, "refused") || !strings.Contains(out, "openid") {
		t.Fatalf("bad openid exit %d:\n%s", code, out)
	}
	if r.pending() != 1 {
		t.Fatalf("%d queued, want 1", r.pending())
	}
}
