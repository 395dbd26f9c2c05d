// Command monitor serves the operator's web view: every campaign's
// progress, its pause, resume and cancel (unless --readonly), the
// merchant's shared rate and budget breakers, the campaign reports as CSV, asynqmon under /monitoring/, Prometheus metrics under
// /metrics, and /healthz and /readyz. See internal/monitor.
//
// Authentication comes from the environment only, never from flags (a
// command line is visible to every user of the machine): MONITOR_USER and
// MONITOR_PASSWORD for HTTP basic auth, or MONITOR_TOKEN for a bearer
// token. Without them the monitor listens only on a loopback address.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/couponflow/dispatcher/internal/breaker"
	"github.com/couponflow/dispatcher/internal/envflag"
	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/keyspace"
	"github.com/couponflow/dispatcher/internal/logging"
	"github.com/couponflow/dispatcher/internal/metrics"
	"github.com/couponflow/dispatcher/internal/monitor"
	"github.com/couponflow/dispatcher/internal/ratelimit"
	"github.com/couponflow/dispatcher/internal/redisconn"
	"github.com/couponflow/dispatcher/internal/tasks"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stderr, nil); err != nil {
		stop()
		os.Exit(envflag.Report(os.Stderr, "monitor", err))
	}
}

// run serves until ctx ends. ready, when not nil, receives the address
// listened on.
func run(ctx context.Context, argv []string, stderr io.Writer, ready func(net.Addr)) error {
	fs := flag.NewFlagSet("monitor", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", "127.0.0.1:8080", "address to listen on; without credentials only a loopback address is allowed")
	redisAddr := fs.String("redis-addr", redisconn.DefaultAddr, "Redis host:port")
	redisURL := fs.String("redis-url", "", "Redis URL, for TLS, Sentinel or Cluster (see README); wins over --redis-addr")
	mchID := fs.String("mchid", "", "merchant whose shared rate and budget breakers are shown (those of the campaigns are shown too)")
	readOnly := fs.Bool("readonly", false, "read-only: the campaign pages offer no pause, resume or cancel, and asynqmon is read-only even with --asynqmon-writes")
	monWrites := fs.Bool("asynqmon-writes", false, "let asynqmon change queues and tasks (by default it is read-only: a task deleted there strands its send until the sweeper queues it again)")
	queue := fs.String("queue", tasks.DefaultQueue, "queue the pages link to in asynqmon, where a resume or a cancel wakes the campaign's waiting tasks")
	queueShards := fs.Int("queue-shards", 1, "the queue's shards, as the workers' and the enqueuer's --queue-shards: a resume or a cancel wakes the campaign's tasks in each")
	refresh := fs.Duration("refresh", 2*time.Second, "how often a page refreshes while a campaign is running")
	rateLimits := fs.String("rate-limits", "", "the limits the workers run with, as the worker's --rate-limits (default WeChat's)")
	logFormat := fs.String("log-format", "json", "json or text")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	keyPrefix := fs.String("key-prefix", keyspace.DefaultPrefix, "prefix of every Redis key of ours (asynq's are its own), as the workers'")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: monitor [flags]\n\nCredentials come from the environment only: %s and %s (HTTP basic auth), or %s (bearer token; a browser may give it as the basic-auth password).\n\n",
			monitor.EnvUser, monitor.EnvPassword, monitor.EnvToken)
		fs.PrintDefaults()
	}
	err := envflag.Parse(fs, map[string]string{
		"addr": "MONITOR_ADDR", "redis-addr": redisconn.EnvAddr, "redis-url": redisconn.EnvURL,
		"mchid": "WECHATPAY_MCHID", "readonly": "MONITOR_READONLY", "asynqmon-writes": "MONITOR_ASYNQMON_WRITES", "queue": "QUEUE", "queue-shards": "QUEUE_SHARDS",
		"refresh": "MONITOR_REFRESH", "rate-limits": "WORKER_RATE_LIMITS",
		"log-format": "LOG_FORMAT", "log-level": "LOG_LEVEL", "key-prefix": keyspace.EnvPrefix,
	}, argv)
	if err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return envflag.Usagef("unexpected arguments %q (credentials go in %s, %s or %s)", fs.Args(), monitor.EnvUser, monitor.EnvPassword, monitor.EnvToken)
	}
	log, err := logging.New(stderr, *logFormat, *logLevel)
	if err != nil {
		return err
	}
	logging.RouteRedis(log)
	if err := keyspace.Validate(*keyPrefix); err != nil {
		return fmt.Errorf("--key-prefix: %w", err)
	}
	user, password, token := os.Getenv(monitor.EnvUser), os.Getenv(monitor.EnvPassword), os.Getenv(monitor.EnvToken)
	// Before anything is opened: a monitor that would be open to the
	// network, or half-configured, stops here.
	if (user == "") != (password == "") {
		return fmt.Errorf("%s and %s go together: set both for basic auth (or neither, and %s)", monitor.EnvUser, monitor.EnvPassword, monitor.EnvToken)
	}
	if err := monitor.CheckExposure(*addr, user != "" || token != ""); err != nil {
		return err
	}
	limits, err := ratelimit.ParseLimits(*rateLimits)
	if err != nil {
		return fmt.Errorf("--rate-limits: %w", err)
	}
	spec, err := redisconn.Resolve(*redisURL, *redisAddr)
	if err != nil {
		return err
	}
	rdb, err := redisconn.OpenSpec(ctx, spec, 20)
	if err != nil {
		return err
	}
	defer rdb.Close()

	keys := keyspace.New(*keyPrefix)
	store := idempotency.New(rdb, idempotency.WithKeys(keys))
	limiter := ratelimit.New(rdb, ratelimit.WithLimits(limits), ratelimit.WithKeys(keys))
	breakers := breaker.New(rdb, breaker.WithKeys(keys))
	opts := []monitor.Option{
		monitor.WithLogger(log), monitor.WithMchID(*mchID), monitor.WithReadOnly(*readOnly), monitor.WithAsynqmonWrites(*monWrites),
		monitor.WithQueue(*queue), monitor.WithQueueShards(*queueShards), monitor.WithRefresh(*refresh),
		monitor.WithStore(store), monitor.WithLimiter(limiter), monitor.WithBreakers(breakers),
		monitor.WithCollectors(fleetCollector(store, limiter, breakers, *mchID)),
	}
	if user != "" || password != "" {
		opts = append(opts, monitor.WithBasicAuth(user, password))
	}
	if token != "" {
		opts = append(opts, monitor.WithToken(token))
	}
	srv, err := monitor.New(rdb, spec.AsynqConnOpt(), opts...)
	if err != nil {
		return err
	}
	defer srv.Close()

	l, err := net.Listen("tcp", *addr)
	if err != nil {
		return err
	}
	if srv.AuthMode() == "none" {
		log.Warn("no credentials: serving without authentication, on a loopback address only",
			"set", monitor.EnvUser+"+"+monitor.EnvPassword+" or "+monitor.EnvToken)
	}
	log.Info("monitor listening", "url", "http://"+l.Addr().String()+"/", "asynqmon", monitor.RootPath+"/",
		"redis", spec, "auth", srv.AuthMode(), "readonly", *readOnly, "asynqmon_read_only", srv.AsynqmonReadOnly(), "mchid", *mchID)
	if ready != nil {
		ready(l.Addr())
	}
	// Serve returns after SIGINT or SIGTERM, once requests in flight are done.
	if err := srv.Serve(ctx, l); err != nil {
		return err
	}
	log.Info("monitor stopped")
	return nil
}

// fleetCollector is internal/metrics' view of what the workers share, for
// /metrics beside asynq's queue metrics.
func fleetCollector(store *idempotency.Store, limiter *ratelimit.Limiter, breakers *breaker.Breakers, mchID string) prometheus.Collector {
	if mchID == "" {
		// Without a merchant there is no rate or breaker to read: only the
		// campaigns.
		return metrics.NewFleetCollector(store, nil, nil, "")
	}
	return metrics.NewFleetCollector(store, limiter, breakers, mchID)
}
