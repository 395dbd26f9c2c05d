// Package redisconn builds the one Redis client a process uses, from the
// environment, for asynq and for our own keys alike.
//
// Any number of workers and enqueuers share one Redis deployment, of one of
// three kinds, chosen by configuration:
//
//   - standalone: REDIS_ADDR=host:port (the default, 127.0.0.1:6379), or
//     REDIS_URL=redis://[user:password@]host:port[/db], rediss:// for TLS;
//   - Sentinel: REDIS_URL=redis-sentinel://[user:password@]h1:26379,h2:26379,h3:26379/mymaster;
//     the client asks the Sentinels for the master and follows a failover;
//   - Cluster: REDIS_URL=redis-cluster://[user:password@]h1:7000,h2:7001,h3:7002
//     (seed nodes; the rest are discovered).
//
// REDIS_URL wins over REDIS_ADDR when it is set (not empty); Resolve
// applies that rule. ParseURL documents every form; OpenSpec connects.
//
// Whatever the kind, the result is a redis.UniversalClient that asynq
// takes as it is (asynq.NewClientFromRedisClient, NewServerFromRedisClient,
// NewInspectorFromRedisClient). In a cluster every key of one asynq queue
// carries the hash tag {queue}, so one queue lives on one master: spread
// load over masters with several queues. Our own keys carry {campaign}
// (or {mchid:openid} for the per-user lock), and every script touches one
// tag.
//
// Passwords never appear in what this package prints: Spec's String and
// every error replace them with xxxxx.
package redisconn

import (
	"context"
	"fmt"

	"github.com/redis/go-redis/v9"
)

// DefaultAddr is used when REDIS_ADDR is not set.
const DefaultAddr = "127.0.0.1:6379"

// EnvAddr names the variable holding Redis's host:port.
const EnvAddr = "REDIS_ADDR"

// EnvURL names the variable holding a Redis URL (see ParseURL); when set,
// it wins over EnvAddr.
const EnvURL = "REDIS_URL"

// Open connects to one server at addr (host:port), as OpenSpec does.
func Open(ctx context.Context, addr string, poolSize int) (redis.UniversalClient, error) {
	spec, err := ParseURL(addr)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", EnvAddr, err)
	}
	spec.Source = EnvAddr
	return OpenSpec(ctx, spec, poolSize)
}

// Resolve applies the precedence between the two settings: redisURL (the
// value of REDIS_URL or its flag) when it is not empty, else redisAddr (of
// REDIS_ADDR), else DefaultAddr. The Spec's Source names the variable it
// came from, and so do parse errors.
func Resolve(redisURL, redisAddr string) (Spec, error) {
	raw, source := redisURL, EnvURL
	if raw == "" {
		raw, source = redisAddr, EnvAddr
		if raw == "" {
			raw = DefaultAddr
		}
	}
	spec, err := ParseURL(raw)
	if err != nil {
		return Spec{}, fmt.Errorf("%s: %w", source, err)
	}
	spec.Source = source
	return spec, nil
}
