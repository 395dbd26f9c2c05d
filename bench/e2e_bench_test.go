package bench

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/redistest"
	"github.com/couponflow/dispatcher/internal/sandbox"
	"github.com/couponflow/dispatcher/internal/sandbox/sandboxtest"
)

// e2eLimit is the sandbox's limit in BenchmarkEndToEnd, WeChat's published
// favor_send limit, which the workers' default matches.
const e2eLimit = 500

// BenchmarkEndToEnd runs a whole campaign as an operator would: the
// enqueuer program (./cmd/enqueuer campaign --file) and three worker
// programs (./cmd/worker, --concurrency 32, default limits, JSON logs at
// info) start together against a private Redis and an in-process sandbox
// limited to 500 calls/s (RSA-2048 keys). BENCH_E2E_SENDS recipients
// (default 200,000) would take n/500 s at the limit.
//
//   - x-ideal: from the programs' start to the last send recorded
//     succeeded, over n/500 s. The target is at most 1.03.
//   - enqueuer-rss-growth and worker-rss-growth: the processes' resident
//     memory (VmRSS, sampled every 250 ms) when the enqueuer had registered
//     100% of the recipients (or at its last sample, if it exited first;
//     the workers: when 100% were sent) over the same at 25%; flat memory
//     is about 1. The log has the samples at 25, 50, 75 and 100%, and the
//     peak.
//   - The run fails unless every recipient holds exactly one coupon in the
//     sandbox's ledger and every send is recorded succeeded.
func BenchmarkEndToEnd(b *testing.B) {
	n := envInt(b, "BENCH_E2E_SENDS", 200_000)
	worker, enqueuer := buildWorker(b), buildCommand(b, "enqueuer")
	for b.Loop() {
		b.StopTimer()
		ctx := context.Background()
		srv := redistest.Start(b)
		rdb := openRedis(b, srv.Addr)
		store := idempotency.New(rdb)
		sb := sandboxtest.Start(b)
		sb.SetFaults(sandbox.Faults{RateLimit: e2eLimit})
		dir := b.TempDir()
		path := filepath.Join(dir, "e2e.csv")
		writeCampaignCSV(b, path, "oE2e", n)
		env := append(os.Environ(), "REDIS_ADDR="+srv.Addr, "LOG_FORMAT=json", "LOG_LEVEL=info", "WORKER_HTTP_ADDR=127.0.0.1:0",
			"WORKER_CONCURRENCY="+strconv.Itoa(workerConcurrency))
		for k, v := range sb.Env() {
			env = append(env, k+"="+v)
		}
		start := func(name, bin string, args ...string) (*exec.Cmd, chan error) {
			cmd := exec.Command(bin, args...)
			cmd.Env = env
			log, err := os.Create(filepath.Join(dir, name+".log"))
			if err != nil {
				b.Fatal(err)
			}
			cmd.Stdout, cmd.Stderr = log, log
			if err := cmd.Start(); err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { _ = cmd.Process.Kill() })
			done := make(chan error, 1)
			go func() { done <- cmd.Wait(); log.Close() }()
			return cmd, done
		}
		logTail := func(name string) string {
			out, _ := os.ReadFile(filepath.Join(dir, name+".log"))
			return tail(string(out), 20)
		}

		b.StartTimer()
		t0 := time.Now()
		enq, enqDone := start("enqueuer", enqueuer, "campaign", "--file", path, "--stock-id", sb.Env()["SANDBOX_STOCK_ID"], "--campaign", "e2e")
		workers := make([]*exec.Cmd, 3)
		workerDone := make([]chan error, 3)
		for i := range workers {
			workers[i], workerDone[i] = start("worker-"+strconv.Itoa(i), worker)
		}
		// RSS by quarter of the work done: the enqueuer's by recipients
		// registered, the workers' (summed) by sends succeeded.
		var enqRSS, workerRSS [5]int64 // [0] is the peak
		var enqLast int64              // the enqueuer's last sample before it exited
		enqExited := false
		var enqEnd time.Time
		deadline := t0.Add(time.Duration(3*n/e2eLimit)*time.Second + 5*time.Minute)
		for {
			st, err := store.Status(ctx, "e2e")
			if err != nil {
				b.Fatal(err)
			}
			if !enqExited {
				select {
				case err := <-enqDone:
					if err != nil {
						b.Fatalf("enqueuer: %v\n%s", err, logTail("enqueuer"))
					}
					enqExited, enqEnd = true, time.Now()
				default:
					if rss := procRSS(enq.Process.Pid); rss > 0 {
						enqRSS[0], enqLast = max(enqRSS[0], rss), rss
						for q := 1; q <= 4; q++ {
							if st.Total*4 >= int64(q*n) && enqRSS[q] == 0 {
								enqRSS[q] = rss
							}
						}
					}
				}
			}
			var rss int64
			for i, w := range workers {
				select {
				case err := <-workerDone[i]:
					b.Fatalf("worker %d exited: %v\n%s", i, err, logTail("worker-"+strconv.Itoa(i)))
				default:
				}
				rss += procRSS(w.Process.Pid)
			}
			ok := st.ByState[idempotency.Succeeded]
			workerRSS[0] = max(workerRSS[0], rss)
			for q := 1; q <= 4; q++ {
				if ok*4 >= int64(q*n) && workerRSS[q] == 0 {
					workerRSS[q] = rss
				}
			}
			if ok == int64(n) {
				break
			}
			if f := st.ByState[idempotency.Failed]; f > 0 {
				b.Fatalf("%d sends failed: %+v", f, st.ByState)
			}
			if time.Now().After(deadline) {
				b.Fatalf("not done by %s: %+v", deadline.Sub(t0), st.ByState)
			}
			time.Sleep(250 * time.Millisecond)
		}
		elapsed := time.Since(t0)
		b.StopTimer()
		for i, w := range workers {
			_ = w.Process.Signal(syscall.SIGTERM)
			if err := <-workerDone[i]; err != nil {
				b.Fatalf("worker %d: %v\n%s", i, err, logTail("worker-"+strconv.Itoa(i)))
			}
		}
		if !enqExited {
			b.Fatalf("the enqueuer had not exited when every send had succeeded")
		}
		if enqRSS[4] == 0 { // it finished between two samples
			enqRSS[4] = enqLast
		}
		led := sb.Ledger()
		coupons := map[string]int{}
		for _, c := range led.Coupons {
			coupons[c.OpenID]++
		}
		for i := range n {
			if got := coupons[openID("oE2e", i)]; got != 1 {
				b.Fatalf("recipient %d holds %d coupons", i, got)
			}
		}
		if len(led.Coupons) != n {
			b.Fatalf("%d coupons issued for %d recipients", len(led.Coupons), n)
		}
		ideal := time.Duration(n/e2eLimit) * time.Second
		mb := func(v [5]int64) string {
			return fmt.Sprintf("%.1f, %.1f, %.1f, %.1f MB (peak %.1f)", float64(v[1])/1e6, float64(v[2])/1e6, float64(v[3])/1e6, float64(v[4])/1e6, float64(v[0])/1e6)
		}
		b.Logf("%d recipients, 3 workers, sandbox at %d/s: done in %s (%.4f × the %s at the limit); enqueuer done after %s; every recipient holds exactly one coupon (%d coupons); 429s %d",
			n, e2eLimit, elapsed.Round(time.Millisecond), elapsed.Seconds()/ideal.Seconds(), ideal, enqEnd.Sub(t0).Round(time.Millisecond), len(led.Coupons), led.Requests[tooMany])
		b.Logf("RSS at 25, 50, 75, 100%%: enqueuer %s; the three workers together %s", mb(enqRSS), mb(workerRSS))
		b.ReportMetric(0, "ns/op")
		b.ReportMetric(elapsed.Seconds()/ideal.Seconds(), "x-ideal")
		b.ReportMetric(elapsed.Seconds(), "s")
		if enqRSS[1] > 0 && enqRSS[4] > 0 {
			b.ReportMetric(float64(enqRSS[4])/float64(enqRSS[1]), "enqueuer-rss-growth")
		}
		b.ReportMetric(float64(workerRSS[4])/float64(workerRSS[1]), "worker-rss-growth")
		b.ReportMetric(float64(led.Requests[tooMany]), "429s")
		b.StartTimer()
	}
}

// procRSS is a process's resident memory in bytes (VmRSS), 0 if it is gone.
func procRSS(pid int) int64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb * 1024
		}
	}
	return 0
}

// buildCommand builds ./cmd/<name> into a temporary directory.
func buildCommand(b *testing.B, name string) string {
	b.Helper()
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	out := filepath.Join(b.TempDir(), name)
	cmd := exec.Command(goBin, "build", "-o", out, "github.com/couponflow/dispatcher/cmd/"+name)
	if msg, err := cmd.CombinedOutput(); err != nil {
		b.Fatalf("building %s: %v\n%s", name, err, msg)
	}
	return out
}
