// Command worker processes send tasks: it claims each send, calls WeChat
// Pay, records the result and lets asynq retry where that is right. Run as
// many as you like, on as many machines, against one Redis.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/breaker"
	"github.com/couponflow/dispatcher/internal/dispatch"
	"github.com/couponflow/dispatcher/internal/envflag"
	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/keyspace"
	"github.com/couponflow/dispatcher/internal/logging"
	"github.com/couponflow/dispatcher/internal/metrics"
	"github.com/couponflow/dispatcher/internal/notify"
	"github.com/couponflow/dispatcher/internal/ratelimit"
	"github.com/couponflow/dispatcher/internal/redisconn"
	"github.com/couponflow/dispatcher/internal/sweep"
	"github.com/couponflow/dispatcher/internal/tasks"
	"github.com/couponflow/dispatcher/internal/wechat"
)

// gcPercent is the worker's GOGC unless the environment sets one. Its
// live heap is a few tens of MB and every send leaves the same garbage
// (a request, a signature, an answer): at Go's default of 100 the
// collector ran often enough to cost a tenth of the worker's CPU, which
// is the signing's to have (BenchmarkDispatch: 1,172 against 1,025 µs of
// worker CPU a send, at 100 and at 400, in one sitting); the heap grows
// by as much as four times its live size instead of twice.
const gcPercent = 400

func main() {
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(gcPercent)
	}
	if err := run(os.Args[1:]); err != nil {
		os.Exit(envflag.Report(os.Stderr, "worker", err))
	}
}

func run(argv []string) error {
	fs := flag.NewFlagSet("worker", flag.ContinueOnError)
	wxCfg := wechat.ConfigFromEnv()
	wxCfg.RegisterFlags(fs)
	redisAddr := fs.String("redis-addr", redisconn.DefaultAddr, "Redis host:port")
	redisURL := fs.String("redis-url", "", "Redis URL, for TLS, Sentinel or Cluster (see README); wins over --redis-addr")
	concurrency := fs.Int("concurrency", 20, "sends in flight at once")
	defaultQueues := tasks.DefaultQueue + "=1"
	if q := os.Getenv("QUEUE"); q != "" {
		defaultQueues = q + "=1" // the queue the enqueuer and the monitor are told of
	}
	queues := fs.String("queues", defaultQueues, "queues and their weights, name=weight,… (default: QUEUE=1 when QUEUE is set)")
	shards := fs.Int("queue-shards", 1, "each queue is spread over this many, <name>-0 … (as the enqueuer's --queue-shards)")
	callTimeout := fs.Duration("call-timeout", 15*time.Second, "deadline of one WeChat call")
	probe := fs.Duration("breaker-probe", 30*time.Second, "after a stock's first NOT_ENOUGH, its sends are held and one probe call is made after this long; the interval doubles up to --breaker-probe-max")
	probeMax := fs.Duration("breaker-probe-max", 10*time.Minute, "longest interval between a stock's probes")
	rateLimits := fs.String("rate-limits", "", "the merchant's limits shared by all workers, e.g. favor_send=500/s,multiuse_send=1000/m,favor_list=500/s (these are the defaults)")
	rateMaxWait := fs.Duration("rate-max-wait", 2*time.Second, "longest wait for a rate slot inside the handler; a longer one goes back to the queue")
	rateWait := fs.Duration("rate-wait", time.Second, "first wait after a rate limit; it grows up to --rate-wait-max")
	rateWaitMax := fs.Duration("rate-wait-max", 30*time.Second, "longest wait after a rate limit")
	keyPrefix := fs.String("key-prefix", keyspace.DefaultPrefix, "prefix of every Redis key of ours (asynq's are its own); the enqueuer and the monitor need the same setting")
	retentionSweep := fs.Duration("retention-sweep", 30*time.Second, "how often to look for settled campaigns, start their retention and expire their keys once it has passed (one worker of the fleet at a time); 0 disables")
	sweepEvery := fs.Duration("sweep-every", 10*time.Second, "how often the fleet looks for a dead worker's sends and for stalled campaigns whose tasks asynq lost (one worker sweeps at a time); 0 turns it off")
	sweepStall := fs.Duration("sweep-stall", 15*time.Minute, "a campaign not done whose sends have not changed for this long is checked for lost tasks; keep it above --breaker-probe-max")
	notifyEvery := fs.Duration("notify-every", 2*time.Second, "how often to look for campaigns that are done, to say so once across the fleet (a log line, a metric, the campaign's webhook, signed with $"+notify.EnvSecret+"); 0 turns it off")
	httpAddr := fs.String("http-addr", "127.0.0.1:9091", "where to serve /metrics, /healthz and /readyz; empty disables")
	logFormat := fs.String("log-format", "json", "json or text")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	err := envflag.Parse(fs, map[string]string{
		"redis-addr": redisconn.EnvAddr, "redis-url": redisconn.EnvURL, "concurrency": "WORKER_CONCURRENCY", "queues": "WORKER_QUEUES", "queue-shards": "QUEUE_SHARDS",
		"call-timeout": "WORKER_CALL_TIMEOUT", "breaker-probe": "WORKER_BREAKER_PROBE", "breaker-probe-max": "WORKER_BREAKER_PROBE_MAX",
		"rate-limits": "WORKER_RATE_LIMITS", "rate-max-wait": "WORKER_RATE_MAX_WAIT",
		"rate-wait": "WORKER_RATE_WAIT", "rate-wait-max": "WORKER_RATE_WAIT_MAX",
		"sweep-every": "WORKER_SWEEP_EVERY", "sweep-stall": "WORKER_SWEEP_STALL",
		"log-format": "LOG_FORMAT", "log-level": "LOG_LEVEL", "http-addr": "WORKER_HTTP_ADDR",
		"retention-sweep": "WORKER_RETENTION_SWEEP", "key-prefix": keyspace.EnvPrefix, "notify-every": "WORKER_NOTIFY_EVERY",
	}, argv)
	if err != nil {
		return err
	}
	log, err := logging.New(os.Stderr, *logFormat, *logLevel)
	if err != nil {
		return err
	}
	logging.RouteRedis(log)
	if *concurrency < 1 {
		return envflag.Usagef("--concurrency must be at least 1, got %d", *concurrency)
	}
	if err := keyspace.Validate(*keyPrefix); err != nil {
		return fmt.Errorf("--key-prefix: %w", err)
	}
	queueWeights, err := parseQueues(*queues, *shards)
	if err != nil {
		return &envflag.UsageError{Err: err}
	}
	spec, err := redisconn.Resolve(*redisURL, *redisAddr)
	if err != nil {
		return err
	}
	limits, err := ratelimit.ParseLimits(*rateLimits)
	if err != nil {
		return envflag.Usagef("--rate-limits: %w", err)
	}
	if err := wxCfg.Validate(); err != nil {
		return envflag.Usagef("WeChat Pay configuration:\n%w", err)
	}

	ctx := context.Background()
	wx, err := wechat.New(ctx, wxCfg, wechat.WithConcurrency(*concurrency), wechat.WithTimeouts(5*time.Second, *callTimeout), wechat.WithLogger(log))
	if err != nil {
		return err
	}
	// Redis may be down, restarting or loading its data set: the worker
	// waits for it (readiness 503 meanwhile) rather than exiting.
	// Two asynq servers of --concurrency goroutines each, and the calls'
	// own claims and results.
	rdb, err := redisconn.Connect(spec, *concurrency*3+10)
	if err != nil {
		return err
	}
	defer rdb.Close()
	var started atomic.Bool
	waiting := func() error {
		if !started.Load() {
			return errors.New("waiting for redis")
		}
		return nil
	}

	keys := keyspace.New(*keyPrefix)
	store := idempotency.New(rdb, idempotency.WithKeys(keys))
	limiter := ratelimit.New(rdb, ratelimit.WithLimits(limits), ratelimit.WithKeys(keys))
	// A closed breaker is taken from memory for a second: a breaker another
	// worker opens costs this one at most its calls until WeChat's first
	// refusal (which issues nothing) comes back, and saves a round trip per send.
	breakers := breaker.New(rdb, breaker.WithProbeInterval(*probe, *probeMax), breaker.WithKeys(keys),
		breaker.WithClosedCache(time.Second))
	m := metrics.New()
	h := dispatch.New(dispatch.WeChat(wx), store, dispatch.WithLogger(log),
		dispatch.WithCallTimeout(*callTimeout), dispatch.WithBudgetWait(*probe, *probeMax),
		dispatch.WithRateWait(*rateWait, *rateWaitMax),
		dispatch.WithLimiter(limiter, *rateMaxWait),
		dispatch.WithBreakers(breakers), dispatch.WithMetrics(m), dispatch.WithMerchant(wxCfg.MchID))
	// Two asynq servers over one pool of call slots: one serves the
	// queues, the other their woken queues. asynq dequeues by trying each
	// queue of a server in turn, one Redis round trip a queue, and a woken
	// queue is empty nearly always: served by the same server at ten times
	// the weight it cost 0.91 round trips a send (docs/benchmarks.md). Its
	// own server polls it, empty, four times a second; while it holds
	// sends they share the slots with the backlog, first come first served,
	// instead of waiting behind it.
	slots := make(chan struct{}, *concurrency)
	config := func(queues map[string]int, check time.Duration) asynq.Config {
		return asynq.Config{
			Concurrency:    *concurrency,
			Queues:         queues,
			RetryDelayFunc: h.RetryDelay,
			IsFailure:      dispatch.IsFailure,
			// Long enough for every call in flight to finish and be recorded.
			ShutdownTimeout: h.ShutdownTimeout(),
			// Waits are seconds long; the default 5s check would stretch them.
			DelayedTaskCheckInterval: time.Second,
			TaskCheckInterval:        check,
			Logger:                   logging.Asynq{L: log},
			LogLevel:                 asynq.WarnLevel,
		}
	}
	mainQueues, wokenQueues := splitWoken(queueWeights)
	srv := asynq.NewServerFromRedisClient(rdb, config(mainQueues, 0))
	wokenSrv := asynq.NewServerFromRedisClient(rdb, config(wokenQueues, 250*time.Millisecond))
	mux := asynq.NewServeMux()
	for _, k := range tasks.Kinds {
		mux.Handle(k.Type, h)
	}
	handler := withSlots(slots, mux)

	log.Info("worker starting", "redis", spec, "concurrency", *concurrency, "queues", queueWeights,
		"mchid", wxCfg.MchID, "base_url", wxCfg.BaseURL, "call_timeout", callTimeout.String(),
		"rate_limits", fmt.Sprint(limits))
	if *httpAddr != "" {
		reg := prometheus.NewRegistry()
		if err := m.Register(reg); err != nil {
			return err
		}
		reg.MustRegister(metrics.NewFleetCollector(store, limiter, breakers, wxCfg.MchID),
			collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
		explicit := false
		fs.Visit(func(f *flag.Flag) { explicit = explicit || f.Name == "http-addr" })
		stop, err := serveHTTP(*httpAddr, !explicit, reg, rdb, waiting, log)
		if err != nil {
			return err
		}
		defer stop()
	}
	sigCtx, stopSignals := signal.NotifyContext(ctx, syscall.SIGTERM, syscall.SIGINT)
	err = redisconn.WaitReady(sigCtx, rdb, spec, redisconn.WaitOptions{
		Waiting: func(err error, waited time.Duration) {
			log.Warn("waiting for redis: the worker starts processing when it answers", "redis", spec,
				"waited", waited.Round(time.Second).String(), "err", err)
		},
		Ready: func(waited time.Duration) {
			log.Info("redis answers; starting", "redis", spec, "waited", waited.Round(time.Second).String())
		},
	})
	stopSignals()
	if err != nil {
		if sigCtx.Err() != nil && ctx.Err() == nil {
			log.Info("worker stopped while waiting for redis")
			return nil
		}
		return err
	}
	started.Store(true)
	if *sweepEvery > 0 {
		sweepCtx, stopSweep := context.WithCancel(ctx)
		defer stopSweep()
		base := make([]string, 0, len(queueWeights))
		for q := range queueWeights {
			if !strings.HasSuffix(q, tasks.WokenQueue("")) {
				base = append(base, q)
			}
		}
		sort.Strings(base)
		go sweep.New(rdb, store, sweep.WithInterval(*sweepEvery), sweep.WithStallAfter(*sweepStall),
			sweep.WithQueues(base...), sweep.WithLogger(log)).Run(sweepCtx)
	}
	if *retentionSweep > 0 {
		retentionCtx, stopRetention := context.WithCancel(ctx)
		swept := make(chan struct{})
		go func() { defer close(swept); store.RunSweeper(retentionCtx, *retentionSweep, log) }()
		defer func() { stopRetention(); <-swept }()
	}
	if *notifyEvery > 0 {
		notifyCtx, stopNotify := context.WithCancel(ctx)
		defer stopNotify()
		go notify.New(rdb, store, notify.WithInterval(*notifyEvery), notify.WithLogger(log),
			notify.WithSecret([]byte(os.Getenv(notify.EnvSecret))),
			notify.WithOnDone(func(notify.Summary) { m.CampaignDone() })).Run(notifyCtx)
	}
	// Returns after SIGTERM or SIGINT, once calls in flight are done.
	if err := run2(srv, wokenSrv, handler); err != nil {
		return err
	}
	log.Info("worker stopped")
	return nil
}

// withSlots lets at most cap(slots) tasks of both servers into next at
// once: --concurrency is the worker's calls in flight, whichever queue
// their task came from. A task waiting for a slot has not been claimed,
// so a shutdown meanwhile leaves it to asynq to hand out again.
func withSlots(slots chan struct{}, next asynq.Handler) asynq.Handler {
	return asynq.HandlerFunc(func(ctx context.Context, t *asynq.Task) error {
		select {
		case slots <- struct{}{}:
		case <-ctx.Done():
			return ctx.Err()
		}
		defer func() { <-slots }()
		return next.ProcessTask(ctx, t)
	})
}

// splitWoken parts the queue weights into the queues and their woken
// queues.
func splitWoken(weights map[string]int) (queues, woken map[string]int) {
	queues, woken = map[string]int{}, map[string]int{}
	for q, w := range weights {
		if strings.HasSuffix(q, tasks.WokenQueue("")) {
			woken[q] = w
		} else {
			queues[q] = w
		}
	}
	return queues, woken
}

// run2 is asynq's Server.Run for two servers: both start, and on SIGTERM
// or SIGINT both shut down at once (each waits for its calls in flight);
// SIGTSTP stops both taking new tasks.
func run2(a, b *asynq.Server, h asynq.Handler) error {
	if err := a.Start(h); err != nil {
		return err
	}
	if err := b.Start(h); err != nil {
		a.Shutdown()
		return err
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGTSTP)
	defer signal.Stop(sigs)
	for sig := range sigs {
		if sig == syscall.SIGTSTP {
			a.Stop()
			b.Stop()
			continue
		}
		break
	}
	var wg sync.WaitGroup
	wg.Go(a.Shutdown)
	wg.Go(b.Shutdown)
	wg.Wait()
	return nil
}

// serveHTTP serves /metrics, /healthz and /readyz on addr until stop is
// called.
// With fallback (the address is the default, not one asked for), a port
// already taken, by another worker on the host, gives way to a free one.
func serveHTTP(addr string, fallback bool, reg *prometheus.Registry, rdb redis.UniversalClient, ready func() error, log *slog.Logger) (stop func(), err error) {
	l, err := net.Listen("tcp", addr)
	if err != nil && fallback {
		host, _, _ := net.SplitHostPort(addr)
		var ferr error
		if l, ferr = net.Listen("tcp", net.JoinHostPort(host, "0")); ferr == nil {
			log.Info("the default metrics address is taken, by another worker on this host perhaps; serving on a free port instead",
				"default", addr, "addr", l.Addr().String(), "err", err.Error())
			err = nil
		}
	}
	if err != nil {
		return nil, fmt.Errorf("--http-addr: %w", err)
	}
	healthz, readyz := metrics.Health(rdb, ready)
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", metrics.Handler(reg))
	mux.Handle("GET /healthz", healthz)
	mux.Handle("GET /readyz", readyz)
	hs := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := hs.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics and health server stopped", "addr", l.Addr().String(), "err", err)
		}
	}()
	log.Info("serving metrics and health", "addr", l.Addr().String(), "paths", "/metrics /healthz /readyz")
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = hs.Shutdown(ctx)
		<-done
	}, nil
}

func parseQueues(s string, shards int) (map[string]int, error) {
	out := map[string]int{}
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		name, w, found := strings.Cut(part, "=")
		weight := 1
		if found {
			n, err := strconv.Atoi(w)
			if err != nil || n < 1 {
				return nil, fmt.Errorf("--queues: weight of %q must be a positive integer, got %q", name, w)
			}
			weight = n
		}
		for _, q := range tasks.ShardQueues(name, shards) {
			out[q] = weight
			out[tasks.WokenQueue(q)] = weight * tasks.WokenWeight
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("--queues names no queue")
	}
	return out, nil
}
