// Command worker processes send tasks: it claims each send, calls WeChat
// Pay, records the result and lets asynq retry where that is right. Run as
// many as you like, on as many machines, against one Redis.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/hibiken/asynq"

	"github.com/couponflow/dispatcher/internal/breaker"
	"github.com/couponflow/dispatcher/internal/dispatch"
	"github.com/couponflow/dispatcher/internal/envflag"
	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/logging"
	"github.com/couponflow/dispatcher/internal/ratelimit"
	"github.com/couponflow/dispatcher/internal/redisconn"
	"github.com/couponflow/dispatcher/internal/tasks"
	"github.com/couponflow/dispatcher/internal/wechat"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "worker:", err)
		os.Exit(1)
	}
}

func run(argv []string) error {
	fs := flag.NewFlagSet("worker", flag.ContinueOnError)
	wxCfg := wechat.ConfigFromEnv()
	wxCfg.RegisterFlags(fs)
	redisAddr := fs.String("redis-addr", redisconn.DefaultAddr, "Redis host:port")
	redisURL := fs.String("redis-url", "", "Redis URL, for TLS, Sentinel or Cluster (see README); wins over --redis-addr")
	concurrency := fs.Int("concurrency", 20, "sends in flight at once")
	queues := fs.String("queues", tasks.DefaultQueue+"=1", "queues and their weights, name=weight,…")
	shards := fs.Int("queue-shards", 1, "each queue is spread over this many, <name>-0 … (as the enqueuer's --queue-shards)")
	callTimeout := fs.Duration("call-timeout", 15*time.Second, "deadline of one WeChat call")
	probe := fs.Duration("breaker-probe", 30*time.Second, "after a stock's first NOT_ENOUGH, its sends are held and one probe call is made after this long; the interval doubles up to --breaker-probe-max")
	probeMax := fs.Duration("breaker-probe-max", 10*time.Minute, "longest interval between a stock's probes")
	rateLimits := fs.String("rate-limits", "", "the merchant's limits shared by all workers, e.g. favor_send=500/s,multiuse_send=1000/m,favor_list=500/s (these are the defaults)")
	rateMaxWait := fs.Duration("rate-max-wait", 2*time.Second, "longest wait for a rate slot inside the handler; a longer one goes back to the queue")
	rateWait := fs.Duration("rate-wait", time.Second, "first wait after a rate limit; it grows up to --rate-wait-max")
	rateWaitMax := fs.Duration("rate-wait-max", 30*time.Second, "longest wait after a rate limit")
	logFormat := fs.String("log-format", "json", "json or text")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	err := envflag.Parse(fs, map[string]string{
		"redis-addr": redisconn.EnvAddr, "redis-url": redisconn.EnvURL, "concurrency": "WORKER_CONCURRENCY", "queues": "WORKER_QUEUES", "queue-shards": "QUEUE_SHARDS",
		"call-timeout": "WORKER_CALL_TIMEOUT", "breaker-probe": "WORKER_BREAKER_PROBE", "breaker-probe-max": "WORKER_BREAKER_PROBE_MAX",
		"rate-limits": "WORKER_RATE_LIMITS", "rate-max-wait": "WORKER_RATE_MAX_WAIT",
		"rate-wait": "WORKER_RATE_WAIT", "rate-wait-max": "WORKER_RATE_WAIT_MAX",
		"log-format": "LOG_FORMAT", "log-level": "LOG_LEVEL",
	}, argv)
	if err != nil {
		return err
	}
	log, err := logging.New(os.Stderr, *logFormat, *logLevel)
	if err != nil {
		return err
	}
	if *concurrency < 1 {
		return fmt.Errorf("--concurrency must be at least 1, got %d", *concurrency)
	}
	queueWeights, err := parseQueues(*queues, *shards)
	if err != nil {
		return err
	}
	spec, err := redisconn.Resolve(*redisURL, *redisAddr)
	if err != nil {
		return err
	}
	limits, err := ratelimit.ParseLimits(*rateLimits)
	if err != nil {
		return fmt.Errorf("--rate-limits: %w", err)
	}
	if err := wxCfg.Validate(); err != nil {
		return fmt.Errorf("WeChat Pay configuration:\n%w", err)
	}

	ctx := context.Background()
	wx, err := wechat.New(ctx, wxCfg, wechat.WithConcurrency(*concurrency), wechat.WithTimeouts(5*time.Second, *callTimeout), wechat.WithLogger(log))
	if err != nil {
		return err
	}
	rdb, err := redisconn.OpenSpec(ctx, spec, *concurrency*2+10)
	if err != nil {
		return err
	}
	defer rdb.Close()

	h := dispatch.New(wx, idempotency.New(rdb), dispatch.WithLogger(log),
		dispatch.WithCallTimeout(*callTimeout), dispatch.WithBudgetWait(*probe, *probeMax),
		dispatch.WithRateWait(*rateWait, *rateWaitMax),
		dispatch.WithLimiter(ratelimit.New(rdb, ratelimit.WithLimits(limits)), *rateMaxWait),
		dispatch.WithBreakers(breaker.New(rdb, breaker.WithProbeInterval(*probe, *probeMax))))
	srv := asynq.NewServerFromRedisClient(rdb, asynq.Config{
		Concurrency:    *concurrency,
		Queues:         queueWeights,
		RetryDelayFunc: h.RetryDelay,
		IsFailure:      dispatch.IsFailure,
		// Long enough for every call in flight to finish and be recorded.
		ShutdownTimeout: h.ShutdownTimeout(),
		// Waits are seconds long; the default 5s check would stretch them.
		DelayedTaskCheckInterval: time.Second,
		Logger:                   logging.Asynq{L: log},
		LogLevel:                 asynq.WarnLevel,
	})
	mux := asynq.NewServeMux()
	mux.Handle(tasks.TypeSendCoupon, h)
	mux.Handle(tasks.TypeSendMultiuse, h)

	log.Info("worker starting", "redis", spec, "concurrency", *concurrency, "queues", queueWeights,
		"mchid", wxCfg.MchID, "base_url", wxCfg.BaseURL, "call_timeout", callTimeout.String(),
		"rate_limits", fmt.Sprint(limits))
	// Run returns after SIGTERM or SIGINT, once calls in flight are done.
	if err := srv.Run(mux); err != nil {
		return err
	}
	log.Info("worker stopped")
	return nil
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
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("--queues names no queue")
	}
	return out, nil
}
