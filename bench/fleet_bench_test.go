package bench

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/sandbox"
)

// Fleet settings. The steady window starts fleetWarmup after the first
// send reached the sandbox (connections, the first signatures and the
// limiter's burst are start-up) and lasts fleetWindow, or less if the
// campaign runs into its tail first.
const (
	fleetWarmup = time.Second
	fleetWindow = 10 * time.Second
	// fleetOpenLimit is the workers' favor_send limit when the sandbox has
	// none: far above anything this machine can do, so the limiter never
	// holds a send (it still takes a slot per send, as in production).
	fleetOpenLimit = 100_000
)

// BenchmarkFleet runs 1, 2 and 3 worker processes (built from ./cmd/worker,
// --concurrency 32 each, JSON logs at info) against one private Redis and
// one in-process sandbox (RSA-2048 keys), fresh for every run, in two
// settings:
//
//   - limit=none: the sandbox has no rate limit and the workers are
//     configured with favor_send=100000/s. sends/s is the machine's
//     capacity: on a small machine the sandbox (which signs every
//     response), the workers and Redis share the same cores, so more
//     workers cannot add CPU.
//   - limit=R: the sandbox answers 429 above R calls/s (BENCH_FLEET_RATE,
//     default 150) and the workers are configured with favor_send=R/s, the
//     real limit, shared through Redis. utilisation is sends/s ÷ R.
//
// Each run queues BENCH_FLEET_SENDS sends (default 9,000) with no limit, or
// 13×R with one, through the producer, then starts the workers together.
// sends/s counts the 2xx answers the sandbox gave inside the steady window
// (its ledger's request counts read at both ends). 429s is every 429 of the
// run, start-up included; the log also gives those inside the window, the
// POSTs the sandbox received in the window and the busiest second of them.
// cores-busy is the CPU the workers, this process (the sandbox) and
// redis-server used over the window, divided by its length. allows/send is
// the limiter's GCRA calls (redis_rate's script, counted by its TIME call in
// INFO commandstats) per send over the whole run, and deliveries/send
// asynq's dequeues per send: above 1 when sends went back to the queue, for
// instance after waiting --rate-max-wait for a slot in vain. Every run must
// end with every send succeeded and exactly one coupon per recipient.
func BenchmarkFleet(b *testing.B) {
	bin := buildWorker(b)
	limit := envInt(b, "BENCH_FLEET_RATE", 150)
	open := envInt(b, "BENCH_FLEET_SENDS", 9000)
	for workers := 1; workers <= 3; workers++ {
		b.Run(fmt.Sprintf("workers=%d", workers), func(b *testing.B) {
			b.Run("limit=none", func(b *testing.B) { runFleet(b, bin, workers, 0, open) })
			b.Run(fmt.Sprintf("limit=%d", limit), func(b *testing.B) { runFleet(b, bin, workers, limit, 13*limit) })
		})
	}
}

// fleetSnap is what the parties had done at one instant.
type fleetSnap struct {
	at       time.Time
	requests map[string]int64 // the sandbox ledger's counts by "<status> <code>"
	workers  time.Duration    // CPU of every worker process, summed
	self     time.Duration    // this process: the sandbox, the poll and the hook
	redis    time.Duration
}

func (s fleetSnap) ok() int64 {
	var n int64
	for k, v := range s.requests {
		if strings.HasPrefix(k, "2") {
			n += v
		}
	}
	return n
}

const tooMany = "429 FREQUENCY_LIMIT_EXCEED"

// fleetWorker is one worker process.
type fleetWorker struct {
	cmd     *exec.Cmd
	log     *os.File
	logPath string
	exited  chan error
}

func startFleetWorker(b *testing.B, bin string, r *dispatchRig, name, rateLimits string) *fleetWorker {
	b.Helper()
	w := &fleetWorker{logPath: filepath.Join(b.TempDir(), "worker-"+name+".log"), exited: make(chan error, 1)}
	var err error
	if w.log, err = os.Create(w.logPath); err != nil {
		b.Fatal(err)
	}
	w.cmd = exec.Command(bin, "--rate-limits", rateLimits)
	w.cmd.Env = append(os.Environ(), "REDIS_ADDR="+r.redis.Addr, "WORKER_CONCURRENCY="+strconv.Itoa(workerConcurrency), "LOG_FORMAT=json", "LOG_LEVEL=info", "WORKER_HTTP_ADDR=127.0.0.1:0")
	for k, v := range r.sb.Env() {
		w.cmd.Env = append(w.cmd.Env, k+"="+v)
	}
	w.cmd.Stdout, w.cmd.Stderr = w.log, w.log
	if err := w.cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = w.cmd.Process.Kill() }) // if the benchmark failed; a no-op once it exited
	go func() { w.exited <- w.cmd.Wait() }()
	return w
}

// stop sends SIGTERM and waits for a clean exit.
func (w *fleetWorker) stop(b *testing.B) {
	b.Helper()
	_ = w.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-w.exited:
		w.log.Close()
		if err != nil {
			out, _ := os.ReadFile(w.logPath)
			b.Fatalf("worker: %v\n%s", err, tail(string(out), 20))
		}
	case <-time.After(time.Minute):
		_ = w.cmd.Process.Kill()
		b.Fatal("worker did not stop within a minute of SIGTERM")
	}
}

// postTimes records when the sandbox received each cash-coupon send.
type postTimes struct {
	mu sync.Mutex
	at []time.Time
}

func (p *postTimes) hook(r sandbox.RecordedRequest) {
	if r.Method == "POST" && strings.HasPrefix(r.Path, "/v3/marketing/favor/") {
		now := time.Now()
		p.mu.Lock()
		p.at = append(p.at, now)
		p.mu.Unlock()
	}
}

func (p *postTimes) first() time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.at) == 0 {
		return time.Time{}
	}
	return p.at[0]
}

// within returns the POSTs received in [from, to] and the most of them in
// any one second of that span.
func (p *postTimes) within(from, to time.Time) (n, peak int) {
	p.mu.Lock()
	var at []time.Time
	for _, t := range p.at {
		if !t.Before(from) && !t.After(to) {
			at = append(at, t)
		}
	}
	p.mu.Unlock()
	sort.Slice(at, func(i, j int) bool { return at[i].Before(at[j]) })
	j := 0
	for i := range at {
		for j < len(at) && at[j].Sub(at[i]) < time.Second {
			j++
		}
		peak = max(peak, j-i)
	}
	return len(at), peak
}

// fleetRun is what one run measured.
type fleetRun struct {
	window        time.Duration
	ok, posts     int64 // 2xx answers and POSTs received in the window
	limited       int64 // 429s in the window
	limitedAll    int64 // 429s over the whole run
	peak          int   // most POSTs in one second of the window
	cpu           time.Duration
	workerCPU     time.Duration // the workers' share of cpu
	selfCPU       time.Duration // this process's: the sandbox
	redisCPU      time.Duration
	waitedForRate int64 // sends seen in waiting_rate by the poll, at most
	// Over the whole run, from INFO commandstats: limiter Allow calls and
	// asynq deliveries.
	allows, deliveries int64
	// waitingBySecond is the most sends seen in waiting_rate in each
	// second after the first send reached the sandbox.
	waitingBySecond []int64
}

// runFleet is one sub-benchmark: workers processes, a sandbox limited to
// limit calls/s (0: none), n sends.
func runFleet(b *testing.B, bin string, workers, limit, n int) {
	var sum fleetRun
	for b.Loop() {
		b.StopTimer()
		r := newDispatchRig(b, n)
		configured := fleetOpenLimit
		if limit > 0 {
			r.sb.SetFaults(sandbox.Faults{RateLimit: float64(limit)})
			configured = limit
		}
		var posts postTimes
		r.sb.OnRequest(posts.hook)
		b.StartTimer()
		fleet := make([]*fleetWorker, workers)
		for i := range fleet {
			fleet[i] = startFleetWorker(b, bin, r, strconv.Itoa(i), fmt.Sprintf("favor_send=%d/s", configured))
		}
		run := measureFleet(b, r, fleet, &posts)
		b.StopTimer()
		for _, w := range fleet {
			w.stop(b)
		}
		r.sb.OnRequest(nil)
		r.check(b)
		end := r.sb.Ledger()
		run.limitedAll = end.Requests[tooMany]
		var other []string
		for k, v := range end.Requests {
			if !strings.HasPrefix(k, "2") && k != tooMany {
				other = append(other, fmt.Sprintf("%s: %d", k, v))
			}
		}
		if len(other) > 0 {
			b.Errorf("answers other than 2xx and 429: %s", strings.Join(other, ", "))
		}
		b.Logf("%d workers, sandbox limit %d/s (0: none), workers at favor_send=%d/s, %d sends: window %s, %d 2xx (%.1f/s), %d POSTs, busiest second %d, 429s %d in the window and %d in all, up to %d sends seen waiting_rate, %.2f cores busy",
			workers, limit, configured, n, run.window.Round(time.Millisecond), run.ok, float64(run.ok)/run.window.Seconds(), run.posts, run.peak,
			run.limited, run.limitedAll, run.waitedForRate, run.cpu.Seconds()/run.window.Seconds())
		// redis_rate's script calls TIME once per Allow, nothing else of
		// ours does; asynq's dequeue does one RPOPLPUSH per delivery.
		allows, deliveries := commandCalls(b, r.rdb, "time"), commandCalls(b, r.rdb, "rpoplpush")
		var sent []string
		for _, w := range fleet {
			sent = append(sent, strconv.Itoa(w.sent(b)))
		}
		b.Logf("limiter Allow calls %.2f per send, deliveries %.3f per send; coupons sent by each worker: %s; CPU per 2xx in the window: workers %d µs, sandbox %d µs, redis-server %d µs",
			float64(allows)/float64(n), float64(deliveries)/float64(n), strings.Join(sent, ", "),
			run.workerCPU.Microseconds()/run.ok, run.selfCPU.Microseconds()/run.ok, run.redisCPU.Microseconds()/run.ok)
		b.Logf("redis commandstats per send, whole run: %s", commandStats(b, r.rdb, int64(n)))
		if run.waitedForRate > 0 {
			b.Logf("most sends in waiting_rate, second by second from the first send: %v", run.waitingBySecond)
		}
		sum.allows += allows
		sum.deliveries += deliveries
		sum.window += run.window
		sum.ok += run.ok
		sum.limited += run.limited
		sum.limitedAll += run.limitedAll
		sum.cpu += run.cpu
		sum.peak = max(sum.peak, run.peak)
		b.StartTimer()
	}
	rate := float64(sum.ok) / sum.window.Seconds()
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(rate, "sends/s")
	if limit > 0 {
		b.ReportMetric(rate/float64(limit), "utilisation")
		b.ReportMetric(float64(sum.peak), "peak-1s-posts")
	}
	b.ReportMetric(float64(sum.limitedAll)/float64(b.N), "429s")
	b.ReportMetric(float64(sum.limited)/float64(b.N), "429s-window")
	b.ReportMetric(sum.cpu.Seconds()/sum.window.Seconds(), "cores-busy")
	b.ReportMetric(float64(sum.allows)/float64(n*b.N), "allows/send")
	b.ReportMetric(float64(sum.deliveries)/float64(n*b.N), "deliveries/send")
}

// commandCalls is the calls count of one command in INFO commandstats.
func commandCalls(b *testing.B, rdb redis.UniversalClient, cmd string) int64 {
	b.Helper()
	v := redisInfo(b, rdb, "commandstats")["cmdstat_"+cmd]
	for _, kv := range strings.Split(v, ",") {
		if k, n, _ := strings.Cut(kv, "="); k == "calls" {
			c, _ := strconv.ParseInt(n, 10, 64)
			return c
		}
	}
	return 0
}

// sent counts the worker's "sent" log lines: the coupons it sent.
func (w *fleetWorker) sent(b *testing.B) int {
	b.Helper()
	out, err := os.ReadFile(w.logPath)
	if err != nil {
		b.Fatal(err)
	}
	return strings.Count(string(out), `"msg":"sent"`)
}

// measureFleet polls until every send succeeded, taking the window's
// snapshots on the way.
func measureFleet(b *testing.B, r *dispatchRig, fleet []*fleetWorker, posts *postTimes) fleetRun {
	b.Helper()
	ctx := context.Background()
	snap := func() fleetSnap {
		s := fleetSnap{self: selfCPU(b), redis: redisCPU(b, r.rdb)}
		for _, w := range fleet {
			s.workers += procCPU(b, w.cmd.Process.Pid)
		}
		s.requests, s.at = r.sb.Ledger().Requests, time.Now()
		return s
	}
	// The window ends early if only the fleet's last sends in flight are
	// left: that is the tail, not the steady state.
	tailAt := int64(r.n - len(fleet)*workerConcurrency)
	var run fleetRun
	var s0, s1 fleetSnap
	deadline := time.Now().Add(3 * time.Minute)
	for {
		st, err := r.store.Status(ctx, r.campaign)
		if err != nil {
			b.Fatal(err)
		}
		okN := st.ByState[idempotency.Succeeded]
		run.waitedForRate = max(run.waitedForRate, st.ByState[idempotency.WaitingRate])
		now := time.Now()
		first := posts.first()
		if !first.IsZero() {
			sec := int(now.Sub(first) / time.Second)
			for len(run.waitingBySecond) <= sec {
				run.waitingBySecond = append(run.waitingBySecond, 0)
			}
			run.waitingBySecond[sec] = max(run.waitingBySecond[sec], st.ByState[idempotency.WaitingRate])
		}
		switch {
		case first.IsZero() || now.Before(first.Add(fleetWarmup)):
		case s0.at.IsZero():
			if okN >= tailAt {
				b.Fatalf("%d of %d sends done before the steady window began: queue more (BENCH_FLEET_SENDS, BENCH_FLEET_RATE)", okN, r.n)
			}
			s0 = snap()
		case s1.at.IsZero() && (now.Sub(s0.at) >= fleetWindow || okN >= tailAt):
			s1 = snap()
			if d := s1.at.Sub(s0.at); d < fleetWindow*9/10 {
				b.Logf("the window closed after %s, at the campaign's tail", d.Round(time.Millisecond))
			}
		}
		if okN == int64(r.n) {
			if s1.at.IsZero() {
				b.Fatalf("the campaign ended before the window closed")
			}
			break
		}
		if st.ByState[idempotency.Failed] > 0 {
			b.Fatalf("sends failed: %+v", st)
		}
		for _, w := range fleet {
			select {
			case err := <-w.exited:
				out, _ := os.ReadFile(w.logPath)
				b.Fatalf("worker exited: %v\n%s", err, tail(string(out), 20))
			default:
			}
		}
		if now.After(deadline) {
			b.Fatalf("not done in 3 minutes: %+v", st)
		}
		time.Sleep(10 * time.Millisecond)
	}
	run.window = s1.at.Sub(s0.at)
	run.ok = s1.ok() - s0.ok()
	run.limited = s1.requests[tooMany] - s0.requests[tooMany]
	p, peak := posts.within(s0.at, s1.at)
	run.posts, run.peak = int64(p), peak
	run.workerCPU, run.selfCPU, run.redisCPU = s1.workers-s0.workers, s1.self-s0.self, s1.redis-s0.redis
	run.cpu = run.workerCPU + run.selfCPU + run.redisCPU
	return run
}
