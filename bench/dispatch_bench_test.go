package bench

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/pprof"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/campaign"
	"github.com/couponflow/dispatcher/internal/dispatch"
	"github.com/couponflow/dispatcher/internal/enqueue"
	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/keyspace"
	"github.com/couponflow/dispatcher/internal/logging"
	"github.com/couponflow/dispatcher/internal/redisconn"
	"github.com/couponflow/dispatcher/internal/redistest"
	"github.com/couponflow/dispatcher/internal/sandbox"
	"github.com/couponflow/dispatcher/internal/sandbox/sandboxtest"
	"github.com/couponflow/dispatcher/internal/tasks"
	"github.com/couponflow/dispatcher/internal/wechat"
)

// workerConcurrency is the worker's --concurrency in these benchmarks.
const workerConcurrency = 32

// dispatchRig is a private Redis and an in-process sandbox (no rate limit,
// no faults, RSA-2048 keys) with a campaign of n sends already queued
// through the producer.
type dispatchRig struct {
	redis    *redistest.Server
	rdb      redis.UniversalClient
	store    *idempotency.Store
	sb       *sandbox.Server
	campaign string
	n        int
	// Redis used_memory before the campaign was enqueued, and once it was.
	memBase, memPending int64
	// own counts this process's round trips to Redis (the status poll, the
	// INFO reads), so that they can be told from the worker's.
	own *redistest.RoundTrips
}

// workerRoundTrips is how many requests Redis read from its clients since
// CONFIG RESETSTAT (INFO stats total_reads_processed: one per round trip
// of a client that waits for each answer, as the worker's clients do),
// less this process's own. total_commands_processed would not do: it
// counts the commands a script runs as well.
func (r *dispatchRig) workerRoundTrips(b *testing.B) int64 {
	b.Helper()
	own := r.own.N()
	reads, err := strconv.ParseInt(redisInfo(b, r.rdb, "stats")["total_reads_processed"], 10, 64)
	if err != nil {
		b.Fatal(err)
	}
	return reads - own
}

func newDispatchRig(b *testing.B, n int) *dispatchRig {
	b.Helper()
	ctx := context.Background()
	r := &dispatchRig{redis: redistest.Start(b), sb: sandboxtest.Start(b), campaign: "dispatch", n: n}
	r.rdb = openRedis(b, r.redis.Addr)
	r.own = &redistest.RoundTrips{}
	r.rdb.AddHook(r.own)
	r.store = idempotency.New(r.rdb)
	env := r.sb.Env()
	deadline := time.Now().Add(72 * time.Hour)
	if _, err := r.store.SaveCampaign(ctx, idempotency.Campaign{Name: r.campaign, MchID: env[wechat.EnvMchID], Deadline: deadline}); err != nil {
		b.Fatal(err)
	}
	path := filepath.Join(b.TempDir(), "dispatch.csv")
	writeCampaignCSV(b, path, "oDsp", n)
	rd, closer, err := campaign.Open(path, campaign.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer closer.Close()
	var stats enqueue.Stats
	r.memBase = usedMemory(b, r.rdb)
	err = enqueue.New(asynq.NewClientFromRedisClient(r.rdb), r.store).Bulk(ctx, rd, enqueue.Campaign{
		Name: r.campaign, MchID: env[wechat.EnvMchID], AppID: env[wechat.EnvAppID], StockID: env["SANDBOX_STOCK_ID"], Deadline: deadline,
	}, &stats, enqueue.BulkOptions{})
	if err != nil || stats.Enqueued.Load() != int64(n) {
		b.Fatalf("enqueued %d of %d: %v", stats.Enqueued.Load(), n, err)
	}
	r.memPending = usedMemory(b, r.rdb)
	if err := r.rdb.ConfigResetStat(ctx).Err(); err != nil { // count dispatch alone
		b.Fatal(err)
	}
	r.own.Reset()
	return r
}

// window is the steady part of a run: from the first success seen to the
// last, with what each party had used of the CPU at both ends.
type window struct {
	start, end       time.Time
	sentAtStart      int64
	worker0, worker1 time.Duration // the worker process, if separate
	self0, self1     time.Duration // this process
	redis0, redis1   time.Duration
	workerPID        int
	timeout          time.Duration
	pollEvery        time.Duration
}

// wait polls the campaign's status until every send succeeded, marking
// the window's ends.
func (r *dispatchRig) wait(b *testing.B, w *window, alive func() error) {
	b.Helper()
	ctx := context.Background()
	mark := func() (self, wk, rd time.Duration) {
		self, rd = selfCPU(b), redisCPU(b, r.rdb)
		if w.workerPID != 0 {
			wk = procCPU(b, w.workerPID)
		}
		return
	}
	deadline := time.Now().Add(w.timeout)
	for {
		st, err := r.store.Status(ctx, r.campaign)
		if err != nil {
			b.Fatal(err)
		}
		ok := st.ByState[idempotency.Succeeded]
		if ok > 0 && w.start.IsZero() {
			w.start, w.sentAtStart = time.Now(), ok
			w.self0, w.worker0, w.redis0 = mark()
		}
		if ok == int64(r.n) {
			w.end = time.Now()
			w.self1, w.worker1, w.redis1 = mark()
			return
		}
		if f := st.ByState[idempotency.Failed] + st.ByState[idempotency.Retrying] + st.ByState[idempotency.WaitingRate]; f > 0 {
			b.Fatalf("sends that did not simply succeed: %+v", st)
		}
		if err := alive(); err != nil {
			b.Fatal(err)
		}
		if time.Now().After(deadline) {
			b.Fatalf("not done in %s: %+v", w.timeout, st)
		}
		time.Sleep(w.pollEvery)
	}
}

// check verifies that the sandbox issued exactly one coupon per send.
func (r *dispatchRig) check(b *testing.B) {
	b.Helper()
	seen := map[string]bool{}
	for _, c := range r.sb.Ledger().Coupons {
		if seen[c.OpenID] {
			b.Fatalf("%s got two coupons", c.OpenID)
		}
		seen[c.OpenID] = true
	}
	if len(seen) != r.n {
		b.Fatalf("%d coupons issued for %d sends", len(seen), r.n)
	}
}

// BenchmarkDispatch runs the real worker program (built from ./cmd/worker,
// --concurrency 32, JSON logs at info as in production) as its own process
// against a private Redis and an in-process sandbox, and sends BENCH_SENDS
// coupons (default 5,000) already queued. The worker's CPU time is its own:
// read from /proc/<pid>/stat over the steady window (first success to
// last), and from its rusage after SIGTERM over its whole life. This
// process's CPU over the window is the sandbox's (plus the status poll).
//
// Around the run, one goroutine locked to its thread signs with the
// sandbox's merchant key (the key the worker signs with) for 1 s before and
// 1 s after, giving RSA-2048 SHA256 PKCS#1 v1.5 signatures per core-second
// of CPU time; ratio is the worker's sends per CPU-second over that: the
// fraction of the one-signature-per-send bound that the worker reaches.
//
// BENCH_RATE (calls a second, default 100,000) is the worker's limit: the
// default leaves the machine as the limit; one below the worker's pace
// (about 600 here) measures a worker at the merchant's limit, where every
// slot is scarce.
func BenchmarkDispatch(b *testing.B) {
	n := envInt(b, "BENCH_SENDS", 5000)
	rate := envInt(b, "BENCH_RATE", 100000)
	bin := buildWorker(b)
	var sends int64
	var wall, workerCPU, workerLife, selfCPUUsed, redisCPUUsed, sigCPU time.Duration
	var sigs int
	var memDone, trips int64
	for b.Loop() {
		b.StopTimer()
		r := newDispatchRig(b, n)
		key := r.sb.Identity().MerchantKey
		s, c := signRate(b, key, time.Second)
		sigs, sigCPU = sigs+s, sigCPU+c

		logPath := filepath.Join(b.TempDir(), "worker.log")
		logFile, err := os.Create(logPath)
		if err != nil {
			b.Fatal(err)
		}
		cmd := exec.Command(bin)
		cmd.Env = append(os.Environ(), "REDIS_ADDR="+r.redis.Addr, "WORKER_CONCURRENCY="+strconv.Itoa(workerConcurrency), "LOG_FORMAT=json", "LOG_LEVEL=info",
			"WORKER_RATE_LIMITS=favor_send="+strconv.Itoa(rate)+"/s", "WORKER_HTTP_ADDR=127.0.0.1:0")
		for k, v := range r.sb.Env() {
			cmd.Env = append(cmd.Env, k+"="+v)
		}
		cmd.Stdout, cmd.Stderr = logFile, logFile
		b.StartTimer()
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { _ = cmd.Process.Kill() }) // if the benchmark failed; a no-op once it exited
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		stopPerf := perfRecord(b, cmd.Process.Pid)
		w := &window{workerPID: cmd.Process.Pid, timeout: 5 * time.Minute, pollEvery: 20 * time.Millisecond}
		r.wait(b, w, func() error {
			select {
			case err := <-exited:
				out, _ := os.ReadFile(logPath)
				b.Fatalf("worker exited: %v\n%s", err, tail(string(out), 20))
			default:
			}
			return nil
		})
		b.StopTimer()
		stopPerf()
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			if err != nil {
				b.Fatalf("worker: %v", err)
			}
		case <-time.After(time.Minute):
			_ = cmd.Process.Kill()
			b.Fatal("worker did not stop within a minute of SIGTERM")
		}
		logFile.Close()
		trips += r.workerRoundTrips(b)
		r.check(b)
		b.Logf("redis commandstats per send: %s", commandStats(b, r.rdb, int64(n)))
		memDone += usedMemory(b, r.rdb) - r.memBase
		mch := r.sb.Env()[wechat.EnvMchID]
		recKey := keyspace.Default.Record(r.campaign, mch, tasks.DeriveOutRequestNo(mch, r.campaign, openID("oDsp", 0)))
		b.Logf("redis memory per send: %d B pending, %d B once sent (a sent record's hash: %d B, MEMORY USAGE)",
			(r.memPending-r.memBase)/int64(n), (usedMemory(b, r.rdb)-r.memBase)/int64(n), r.rdb.MemoryUsage(context.Background(), recKey).Val())

		s, c = signRate(b, key, time.Second)
		sigs, sigCPU = sigs+s, sigCPU+c

		sends += int64(n) - w.sentAtStart
		wall += w.end.Sub(w.start)
		workerCPU += w.worker1 - w.worker0
		workerLife += cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
		selfCPUUsed += w.self1 - w.self0
		redisCPUUsed += w.redis1 - w.redis0
		b.Logf("%d sends (%d in the window of %s); worker CPU %s in the window, %s over its life",
			n, int64(n)-w.sentAtStart, w.end.Sub(w.start).Round(time.Millisecond), (w.worker1 - w.worker0), cmd.ProcessState.UserTime()+cmd.ProcessState.SystemTime())
		b.StartTimer()
	}
	perWorkerCPU := float64(sends) / workerCPU.Seconds()
	sigRate := float64(sigs) / sigCPU.Seconds()
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(float64(sends)/wall.Seconds(), "sends/s")
	b.ReportMetric(perWorkerCPU, "sends/worker-cpu-s")
	b.ReportMetric(float64(int64(n)*int64(b.N))/workerLife.Seconds(), "sends/worker-cpu-s-life")
	b.ReportMetric(sigRate, "sigs/core-s")
	b.ReportMetric(perWorkerCPU/sigRate, "ratio")
	b.ReportMetric(float64(workerCPU.Microseconds())/float64(sends), "worker-cpu-us/send")
	b.ReportMetric(float64(selfCPUUsed.Microseconds())/float64(sends), "sandbox-cpu-us/send")
	b.ReportMetric(float64(redisCPUUsed.Microseconds())/float64(sends), "redis-cpu-us/send")
	// Over the worker's whole life, its start and shutdown included.
	b.ReportMetric(float64(trips)/float64(int64(n)*int64(b.N)), "redis-round-trips/send")
	b.ReportMetric(float64(memDone)/float64(int64(n)*int64(b.N)), "done-bytes/send")
}

// perfRecord profiles the worker process with `perf record -g` into the
// file named by BENCH_WORKER_PERF, if set, until the returned func is
// called: the worker program has no pprof endpoint, and perf sees its
// runtime costs (GC, scheduler) too. Read it with
// `perf report -i FILE --no-children --sort symbol`.
func perfRecord(b *testing.B, pid int) (stop func()) {
	out := os.Getenv("BENCH_WORKER_PERF")
	if out == "" {
		return func() {}
	}
	cmd := exec.Command("perf", "record", "-F", "997", "-g", "-o", out, "-p", strconv.Itoa(pid))
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatalf("BENCH_WORKER_PERF: %v", err)
	}
	return func() {
		_ = cmd.Process.Signal(os.Interrupt)
		_ = cmd.Wait()
	}
}

// BenchmarkDispatchInProcess runs the worker's handler in this process
// (dispatch.New and an asynq.Server of concurrency 32, configured as
// cmd/worker configures them) next to the sandbox. CPU is this process's
// whole, worker and sandbox together; every goroutine of the asynq server,
// the handler, its HTTP client and its Redis calls carries the pprof label
// side=worker, so that
//
//	go test -run '^$' -bench DispatchInProcess -benchtime=1x -cpuprofile cpu.out ./bench
//	go tool pprof -tagfocus side=worker -top bench.test cpu.out
//
// shows the worker's costs alone.
func BenchmarkDispatchInProcess(b *testing.B) {
	n := envInt(b, "BENCH_SENDS", 5000)
	ctx := context.Background()
	var sends int64
	var wall, cpu time.Duration
	for b.Loop() {
		b.StopTimer()
		r := newDispatchRig(b, n)
		env := r.sb.Env()
		logFile, err := os.Create(filepath.Join(b.TempDir(), "worker.log"))
		if err != nil {
			b.Fatal(err)
		}
		log, _ := logging.New(logFile, "json", "info")
		cfg := wechat.Config{
			MchID: env[wechat.EnvMchID], MchSerial: env[wechat.EnvMchSerial], PrivateKeyPath: env[wechat.EnvPrivateKey],
			PublicKeyPath: env[wechat.EnvPublicKey], PublicKeyID: env[wechat.EnvPublicKeyID], AppID: env[wechat.EnvAppID],
			BaseURL: env[wechat.EnvBaseURL],
		}
		var srv *asynq.Server
		b.StartTimer()
		pprof.Do(ctx, pprof.Labels("side", "worker"), func(ctx context.Context) {
			wx, err := wechat.New(ctx, cfg, wechat.WithConcurrency(workerConcurrency), wechat.WithTimeouts(5*time.Second, 15*time.Second), wechat.WithLogger(log))
			if err != nil {
				b.Fatal(err)
			}
			rdb, err := redisconn.Open(ctx, r.redis.Addr, workerConcurrency*2+10)
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { rdb.Close() })
			h := dispatch.New(dispatch.WeChat(wx), idempotency.New(rdb), dispatch.WithLogger(log))
			srv = asynq.NewServerFromRedisClient(rdb, asynq.Config{
				Concurrency: workerConcurrency, Queues: map[string]int{tasks.DefaultQueue: 1},
				RetryDelayFunc: h.RetryDelay, IsFailure: dispatch.IsFailure, ShutdownTimeout: h.ShutdownTimeout(),
				DelayedTaskCheckInterval: time.Second, Logger: logging.Asynq{L: log}, LogLevel: asynq.WarnLevel,
			})
			mux := asynq.NewServeMux()
			mux.Handle(tasks.TypeSendCoupon, h)
			if err := srv.Start(mux); err != nil {
				b.Fatal(err)
			}
			b.Cleanup(srv.Shutdown) // if the benchmark failed; a no-op after the Shutdown below
		})
		w := &window{timeout: 5 * time.Minute, pollEvery: 20 * time.Millisecond}
		r.wait(b, w, func() error { return nil })
		b.StopTimer()
		srv.Shutdown()
		logFile.Close()
		r.check(b)
		sends += int64(n) - w.sentAtStart
		wall += w.end.Sub(w.start)
		cpu += w.self1 - w.self0
		b.StartTimer()
	}
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(float64(sends)/wall.Seconds(), "sends/s")
	b.ReportMetric(float64(sends)/cpu.Seconds(), "sends/process-cpu-s")
}

func tail(s string, n int) string {
	for i := len(s) - 1; i >= 0; i-- {
		if s[i] == '\n' {
			if n--; n < 0 {
				return s[i+1:]
			}
		}
	}
	return s
}
