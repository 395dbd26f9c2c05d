package redistest

import (
	"context"
	"sync/atomic"

	"github.com/redis/go-redis/v9"
)

// RoundTrips is a go-redis hook counting a client's round trips: one per
// command, one per pipeline; with Match, only the commands it accepts (a
// pipeline counts if one of its commands does). Add it with AddHook.
type RoundTrips struct {
	Match func(redis.Cmder) bool
	n     atomic.Int64
}

// N is the round trips counted so far.
func (c *RoundTrips) N() int64 { return c.n.Load() }

// Reset starts the count again from 0.
func (c *RoundTrips) Reset() { c.n.Store(0) }

func (c *RoundTrips) DialHook(next redis.DialHook) redis.DialHook { return next }

func (c *RoundTrips) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if c.Match == nil || c.Match(cmd) {
			c.n.Add(1)
		}
		return next(ctx, cmd)
	}
}

func (c *RoundTrips) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		for _, cmd := range cmds {
			if c.Match == nil || c.Match(cmd) {
				c.n.Add(1)
				break
			}
		}
		return next(ctx, cmds)
	}
}
