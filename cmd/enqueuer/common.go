package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/breaker"
	"github.com/couponflow/dispatcher/internal/enqueue"
	"github.com/couponflow/dispatcher/internal/envflag"
	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/keyspace"
	"github.com/couponflow/dispatcher/internal/ratelimit"
	"github.com/couponflow/dispatcher/internal/redisconn"
	"github.com/couponflow/dispatcher/internal/tasks"
	"github.com/couponflow/dispatcher/internal/wechat"
)

// EnvQueue names the queue for every program: the enqueuer's --queue, the
// monitor's --queue, and the worker's default --queues.
const EnvQueue = "QUEUE"

// common are the flags every command shares.
type common struct {
	fs        *flag.FlagSet
	wx        wechat.Config
	redisAddr string
	redisURL  string
	shards    int
	set       map[string]bool // flags given on the command line or by the environment
	maxRetry  int
	keyPrefix string
}

func newFlags(name, synopsis string, stderr io.Writer) *common {
	c := &common{fs: flag.NewFlagSet(name, flag.ContinueOnError), wx: wechat.ConfigFromEnv()}
	c.fs.SetOutput(stderr)
	c.fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: enqueuer %s %s\n\nflags:\n", name, synopsis)
		c.fs.PrintDefaults()
	}
	c.wx.RegisterFlags(c.fs)
	c.fs.StringVar(&c.redisAddr, "redis-addr", redisconn.DefaultAddr, "Redis host:port")
	c.fs.StringVar(&c.redisURL, "redis-url", "", "Redis URL, for TLS, Sentinel or Cluster (see README); wins over --redis-addr")
	c.fs.IntVar(&c.shards, "queue-shards", 1, "spread sends over this many queues, <queue>-0 … (for Redis Cluster); workers need the same setting")
	c.fs.StringVar(&c.keyPrefix, "key-prefix", keyspace.DefaultPrefix, "prefix of every Redis key of ours (asynq's are its own); workers and the monitor need the same setting")
	return c
}

func (c *common) parse(args []string) error {
	env := map[string]string{"redis-addr": redisconn.EnvAddr, "redis-url": redisconn.EnvURL, "queue-shards": "QUEUE_SHARDS",
		"key-prefix": keyspace.EnvPrefix}
	if c.fs.Lookup("queue") != nil {
		env["queue"] = EnvQueue
	}
	if c.fs.Lookup("rate-limits") != nil {
		env["rate-limits"] = "WORKER_RATE_LIMITS" // the workers' variable: the limits are the merchant's
	}
	if err := envflag.Parse(c.fs, env, args); err != nil {
		return err // printed by the flag package, or -h
	}
	if err := keyspace.Validate(c.keyPrefix); err != nil {
		return &exitError{code: 2, err: fmt.Errorf("--key-prefix: %w", err)}
	}
	if c.fs.NArg() > 0 {
		return &exitError{code: 2, err: fmt.Errorf("unexpected argument %q", c.fs.Arg(0))}
	}
	c.set = map[string]bool{}
	c.fs.Visit(func(f *flag.Flag) { c.set[f.Name] = true })
	if c.fs.Lookup("max-retry") != nil && c.maxRetry < 1 {
		// asynq archives a task on any error, a wait included, once its
		// retries are used up: with none, a send could not wait at all.
		return &exitError{code: 2, err: fmt.Errorf("--max-retry must be at least 1, got %d", c.maxRetry)}
	}
	return nil
}

// need reports every named flag that is empty, by flag and variable name.
func need(pairs ...string) error {
	var missing []string
	for i := 0; i+1 < len(pairs); i += 2 {
		if strings.TrimSpace(pairs[i+1]) == "" {
			missing = append(missing, pairs[i])
		}
	}
	if len(missing) > 0 {
		return &exitError{code: 2, err: fmt.Errorf("missing %s", strings.Join(missing, ", "))}
	}
	return nil
}

func (c *common) redis(ctx context.Context, pool int) (redis.UniversalClient, error) {
	spec, err := redisconn.Resolve(c.redisURL, c.redisAddr)
	if err != nil {
		return nil, &exitError{code: 2, err: err}
	}
	return redisconn.OpenSpec(ctx, spec, pool)
}

// store, limiter and breakers use the key layout under --key-prefix.
func (c *common) store(rdb redis.UniversalClient) *idempotency.Store {
	return idempotency.New(rdb, idempotency.WithKeys(keyspace.New(c.keyPrefix)))
}

func (c *common) limiter(rdb redis.UniversalClient, opts ...ratelimit.Option) *ratelimit.Limiter {
	return ratelimit.New(rdb, append(opts, ratelimit.WithKeys(keyspace.New(c.keyPrefix)))...)
}

func (c *common) breakers(rdb redis.UniversalClient) *breaker.Breakers {
	return breaker.New(rdb, breaker.WithKeys(keyspace.New(c.keyPrefix)))
}

func (c *common) producer(rdb redis.UniversalClient, queue string, opts ...enqueue.Option) *enqueue.Producer {
	return enqueue.New(asynq.NewClientFromRedisClient(rdb), c.store(rdb), append([]enqueue.Option{enqueue.WithQueue(queue),
		enqueue.WithQueueShards(c.shards), enqueue.WithMaxRetry(c.maxRetry)}, opts...)...)
}

// retryFlag adds --max-retry to a command that queues sends.
func (c *common) retryFlag() {
	c.fs.IntVar(&c.maxRetry, "max-retry", tasks.MaxRetry, "ambiguous outcomes (5xx, timeouts) a send may meet: at the Nth it ends unknown, to be settled by reconcile, so 1 means no resend at all; rate limits and budget waits do not count")
}

// parseDeadline takes a duration from now or an RFC 3339 time.
func parseDeadline(s string) (time.Time, error) {
	if d, err := time.ParseDuration(s); err == nil {
		if d <= 0 {
			return time.Time{}, fmt.Errorf("--deadline %q must be in the future", s)
		}
		return time.Now().Add(d), nil
	}
	t, err := time.Parse(time.RFC3339, s)
	if err != nil {
		return time.Time{}, fmt.Errorf("--deadline %q is neither a duration (72h) nor an RFC 3339 time", s)
	}
	if !t.After(time.Now()) {
		return time.Time{}, fmt.Errorf("--deadline %s is in the past", s)
	}
	return t, nil
}

// caller is what a command that calls WeChat for one campaign's sends
// (reconcile, redemptions sync) sets up: the client, Redis, the store and
// the shared rate limiter under the merchant's limits.
type caller struct {
	wx      *wechat.Client
	rdb     redis.UniversalClient
	store   *idempotency.Store
	limiter *ratelimit.Limiter
}

// openCaller checks --campaign, --concurrency and --rate-limits, then
// opens what the command calls with; the caller closes rdb.
func (c *common) openCaller(ctx context.Context, name string, concurrency int, rateLimits string) (*caller, error) {
	if err := need("--campaign", name); err != nil {
		return nil, err
	}
	if concurrency < 1 {
		return nil, &exitError{code: 2, err: fmt.Errorf("--concurrency must be at least 1, got %d", concurrency)}
	}
	limits, err := ratelimit.ParseLimits(rateLimits)
	if err != nil {
		return nil, &exitError{code: 2, err: fmt.Errorf("--rate-limits: %w", err)}
	}
	if err := c.wx.Validate(); err != nil {
		return nil, &exitError{code: 2, err: fmt.Errorf("WeChat Pay configuration:\n%w", err)}
	}
	wx, err := wechat.New(ctx, c.wx, wechat.WithConcurrency(concurrency))
	if err != nil {
		return nil, err
	}
	rdb, err := c.redis(ctx, concurrency*2+4)
	if err != nil {
		return nil, err
	}
	store := c.store(rdb)
	if _, err := campaignOf(ctx, store, name); err != nil {
		rdb.Close()
		return nil, err
	}
	return &caller{wx: wx, rdb: rdb, store: store, limiter: c.limiter(rdb, ratelimit.WithLimits(limits))}, nil
}
