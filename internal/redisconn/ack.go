package redisconn

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/keyspace"
)

// AckKey is the key (one per master in a cluster, with a hash tag that
// places it there) that an Acknowledger's marker write increments, under
// the default key layout (AckKeys sets another).
var AckKey = keyspace.Default.ReplicaAck()

// AckOption configures an Acknowledger.
type AckOption func(*Acknowledger)

// AckKeys sets the key layout of the marker (default keyspace.Default).
func AckKeys(k keyspace.Keys) AckOption { return func(a *Acknowledger) { a.keys = k } }

// ErrNotAcknowledged is wrapped by Acknowledge's error when a replica did
// not acknowledge in time.
var ErrNotAcknowledged = errors.New("not acknowledged by a replica")

// An Acknowledger makes "acknowledged" mean "kept" on a deployment with
// replicas: Acknowledge returns once a replica of every master holds every
// write that completed before it was called, whichever pooled connection
// made it.
//
// Redis replicates asynchronously and WAIT counts only the calling
// connection's writes, while go-redis spreads commands over a pool. But
// the replication stream of a master is ordered: a replica that has
// acknowledged the offset of one write holds every write the master
// applied before it. So Acknowledge sends, on one connection and in one
// pipeline, a small marker write (INCR of AckKey) and WAIT 1 timeout; a
// successful WAIT proves every earlier write is on a replica.
//
// Whether replicas exist is decided by NewAcknowledger, from INFO
// replication (connected_slaves) of the master, or of every cluster
// master: a master without replicas needs no WAIT (a standalone server
// keeps its old behaviour). If a replica then disconnects, WAIT times out
// and Acknowledge fails, rather than calling unreplicated writes kept.
type Acknowledger struct {
	rdb     redis.UniversalClient
	keys    keyspace.Keys
	timeout time.Duration
	// targets are the masters that have replicas, with the key to write
	// there; empty: nothing to wait for.
	targets []ackTarget

	mu  sync.Mutex
	min int // fewest replicas that acknowledged one Acknowledge, -1 before any
}

type ackTarget struct {
	addr string
	key  string
	c    *redis.Client // the master's client (standalone, Sentinel, or one cluster node)
}

// NewAcknowledger inspects the deployment behind rdb: each master with at
// least one connected replica will be waited for, up to timeout, on every
// Acknowledge. A timeout of 0 or less disables acknowledgement altogether.
func NewAcknowledger(ctx context.Context, rdb redis.UniversalClient, timeout time.Duration, opts ...AckOption) (*Acknowledger, error) {
	a := &Acknowledger{rdb: rdb, keys: keyspace.Default, timeout: timeout, min: -1}
	for _, o := range opts {
		o(a)
	}
	if timeout <= 0 {
		return a, nil
	}
	cc, ok := rdb.(*redis.ClusterClient)
	if !ok {
		n, err := connectedReplicas(ctx, rdb)
		if err != nil {
			return nil, err
		}
		if n > 0 {
			c, ok := rdb.(*redis.Client)
			if !ok {
				return nil, fmt.Errorf("acknowledgement by replicas needs a *redis.Client, not %T", rdb)
			}
			a.targets = []ackTarget{{addr: "the master", key: a.keys.ReplicaAck(), c: c}}
		}
		return a, nil
	}
	var mu sync.Mutex
	var addrs []string
	err := cc.ForEachMaster(ctx, func(ctx context.Context, m *redis.Client) error {
		n, err := connectedReplicas(ctx, m)
		if err != nil {
			return err
		}
		if n > 0 {
			mu.Lock()
			addrs = append(addrs, m.Options().Addr)
			mu.Unlock()
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	// A key that the cluster places on each such master: try hash tags
	// until one lands there.
	for _, addr := range addrs {
		found := false
		for i := 0; i < 100000 && !found; i++ {
			key := a.keys.ReplicaAckTagged(i)
			m, err := cc.MasterForKey(ctx, key)
			if err != nil {
				return nil, err
			}
			if m.Options().Addr == addr {
				a.targets = append(a.targets, ackTarget{addr: addr, key: key, c: m})
				found = true
			}
		}
		if !found {
			return nil, fmt.Errorf("no key found that the cluster places on master %s", addr)
		}
	}
	return a, nil
}

// connectedReplicas reads connected_slaves from a master's INFO replication.
func connectedReplicas(ctx context.Context, c redis.Cmdable) (int, error) {
	info, err := c.Info(ctx, "replication").Result()
	if err != nil {
		return 0, fmt.Errorf("reading INFO replication: %w", err)
	}
	n, _ := strconv.Atoi(infoField(info, "connected_slaves"))
	return n, nil
}

// Enabled reports whether Acknowledge waits for replicas at all.
func (a *Acknowledger) Enabled() bool { return a != nil && len(a.targets) > 0 }

// Timeout is how long Acknowledge waits for each master's replica.
func (a *Acknowledger) Timeout() time.Duration { return a.timeout }

// Replicas is the fewest replicas (of any master) that acknowledged one
// Acknowledge so far, 0 before the first or when disabled.
func (a *Acknowledger) Replicas() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return max(a.min, 0)
}

// Acknowledge returns nil once a replica of every master with replicas
// holds every write completed before the call, or an error wrapping
// ErrNotAcknowledged when one does not within the timeout. Disabled, it
// returns nil at once.
func (a *Acknowledger) Acknowledge(ctx context.Context) error {
	if !a.Enabled() {
		return nil
	}
	errs := make([]error, len(a.targets))
	counts := make([]int, len(a.targets))
	var wg sync.WaitGroup
	for i, t := range a.targets {
		wg.Add(1)
		go func() {
			defer wg.Done()
			counts[i], errs[i] = a.wait(ctx, t)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	a.mu.Lock()
	for _, n := range counts {
		if a.min < 0 || n < a.min {
			a.min = n
		}
	}
	a.mu.Unlock()
	return nil
}

// firstWait bounds the WAIT sent in the marker's pipeline, which is read
// under the client's 5s read timeout; a longer wait continues with WAIT
// commands of their own, whose read deadline follows their timeout.
const firstWait = 2 * time.Second

func (a *Acknowledger) wait(ctx context.Context, t ackTarget) (int, error) {
	start := time.Now()
	// One connection for the marker and every WAIT: WAIT counts the
	// offset of its own connection's last write.
	conn := t.c.Conn()
	defer conn.Close()
	var mark *redis.IntCmd
	var wait *redis.Cmd
	_, _ = conn.Pipelined(ctx, func(p redis.Pipeliner) error {
		mark = p.Incr(ctx, t.key)
		wait = p.Do(ctx, "WAIT", 1, min(a.timeout, firstWait).Milliseconds())
		return nil
	})
	if err := mark.Err(); err != nil {
		return 0, fmt.Errorf("writing the replication marker on %s: %w", t.addr, err)
	}
	n, err := wait.Int64()
	for err == nil && n < 1 {
		left := a.timeout - time.Since(start)
		if left < time.Millisecond {
			break
		}
		n, err = conn.Wait(ctx, 1, left).Result()
	}
	if err != nil {
		return 0, fmt.Errorf("WAIT on %s: %w", t.addr, err)
	}
	if n < 1 {
		return 0, fmt.Errorf("writes to %s %w within %s", t.addr, ErrNotAcknowledged, a.timeout)
	}
	return int(n), nil
}
