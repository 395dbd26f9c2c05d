// Package redisconn builds the one Redis client a process uses, from the
// environment, for asynq and for our own keys alike.
package redisconn

import (
	"context"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"
)

// DefaultAddr is used when REDIS_ADDR is not set.
const DefaultAddr = "127.0.0.1:6379"

// EnvAddr names the variable holding Redis's host:port.
const EnvAddr = "REDIS_ADDR"

// Open connects to addr with a pool sized for poolSize concurrent users and
// checks that Redis answers, so that a wrong address fails at start with a
// message that says so.
func Open(ctx context.Context, addr string, poolSize int) (redis.UniversalClient, error) {
	if poolSize < 10 {
		poolSize = 10
	}
	c := redis.NewClient(&redis.Options{Addr: addr, PoolSize: poolSize, ReadTimeout: 5 * time.Second, WriteTimeout: 5 * time.Second})
	pingCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := c.Ping(pingCtx).Err(); err != nil {
		_ = c.Close()
		return nil, fmt.Errorf("redis at %s (%s) does not answer: %w", addr, EnvAddr, err)
	}
	return c, nil
}
