package main

import (
	"context"
	"flag"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/keyspace"
	"github.com/couponflow/dispatcher/internal/redisconn"
)

// replicaFlag adds --replica-timeout to a command that queues sends.
func replicaFlag(fs *flag.FlagSet) *time.Duration {
	return fs.Duration("replica-timeout", 5*time.Second, "when Redis has replicas, a send counts as queued only once a replica holds it (WAIT); fail if none acknowledges within this long (0: do not wait)")
}

// acknowledger waits, on a deployment with replicas, until one holds the
// writes made so far (see redisconn.Acknowledger).
func (c *common) acknowledger(ctx context.Context, rdb redis.UniversalClient, timeout time.Duration) (*redisconn.Acknowledger, error) {
	return redisconn.NewAcknowledger(ctx, rdb, timeout, redisconn.AckKeys(keyspace.New(c.keyPrefix)))
}
