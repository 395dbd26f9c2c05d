package redisconn

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/redistest"
)

// A standalone server has no replica: nothing to wait for.
func TestAcknowledgerStandalone(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	srv := redistest.Start(t)
	a, err := NewAcknowledger(ctx, openURL(t, "redis://"+srv.Addr), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if a.Enabled() {
		t.Fatal("enabled on a standalone server")
	}
	if err := a.Acknowledge(ctx); err != nil {
		t.Fatal(err)
	}
}

// With a lagging replica: once Acknowledge returns, the replica holds
// every write completed before it, whichever of the pool's connections
// made it; a replica that stops answering makes it fail in time.
func TestAcknowledgerReplica(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	master := redistest.Start(t)
	_, port, _ := net.SplitHostPort(master.Addr)
	replica := redistest.Start(t, "--replicaof", "127.0.0.1", port)
	waitReplicaUp(t, replica.Client())

	rdb := openURL(t, "redis://"+master.Addr)
	a, err := NewAcknowledger(ctx, rdb, 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if !a.Enabled() {
		t.Fatal("not enabled on a master with a replica")
	}
	stopLag := replica.Lag(200*time.Millisecond, 20*time.Millisecond)

	const writers, each = 16, 100
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				if err := rdb.Set(ctx, fmt.Sprintf("k:%d:%d", w, i), 1, 0).Err(); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	start := time.Now()
	if err := a.Acknowledge(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("acknowledged in %s by %d replica(s)", time.Since(start).Round(time.Millisecond), a.Replicas())
	if a.Replicas() != 1 {
		t.Errorf("Replicas() = %d, want 1", a.Replicas())
	}
	// Read the replica while it is paused no more: what it holds now is
	// what it held when Acknowledge returned, or more.
	stopLag()
	rc := replica.Client()
	missing := 0
	for w := range writers {
		for i := range each {
			if n, err := rc.Exists(ctx, fmt.Sprintf("k:%d:%d", w, i)).Result(); err != nil {
				t.Fatal(err)
			} else if n == 0 {
				missing++
			}
		}
	}
	if missing > 0 {
		t.Fatalf("the replica lacks %d of %d acknowledged writes", missing, writers*each)
	}

	// A replica that does not answer: a clear error after the timeout.
	a, err = NewAcknowledger(ctx, rdb, 300*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	replica.Pause()
	defer replica.Resume()
	if err := rdb.Set(ctx, "late", 1, 0).Err(); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	err = a.Acknowledge(ctx)
	if !errors.Is(err, ErrNotAcknowledged) {
		t.Fatalf("Acknowledge with the replica paused: %v, want ErrNotAcknowledged", err)
	}
	if d := time.Since(start); d < 300*time.Millisecond || d > 2*time.Second {
		t.Errorf("failed after %s, want about 300ms", d)
	}
	t.Logf("%v", err)
}

// A cluster of masters without replicas: nothing to wait for.
func TestAcknowledgerClusterWithoutReplicas(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	c := redistest.StartCluster(t, 3)
	a, err := NewAcknowledger(ctx, openURL(t, c.URL()), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if a.Enabled() {
		t.Fatal("enabled on a cluster without replicas")
	}
}

func waitReplicaUp(t *testing.T, c *redis.Client) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		info, err := c.Info(context.Background(), "replication").Result()
		if err == nil && infoField(info, "master_link_status") == "up" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the replica did not sync: %v %s", err, info)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A cluster whose first master has a replica: that master is waited for,
// with a key of its own; the others are not.
func TestAcknowledgerClusterReplica(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	c := redistest.StartCluster(t, 3)
	replica := c.AddReplica(0)
	rdb := openURL(t, c.URL())
	// A replica acknowledges within milliseconds, but make test runs many
	// packages at once on 2 cores: 300 ms was once missed there.
	a, err := NewAcknowledger(ctx, rdb, 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if len(a.targets) != 1 || a.targets[0].addr != c.Nodes[0].Addr {
		t.Fatalf("targets %+v, want the first master only", a.targets)
	}
	cc := rdb.(*redis.ClusterClient)
	if m, err := cc.MasterForKey(ctx, a.targets[0].key); err != nil || m.Options().Addr != c.Nodes[0].Addr {
		t.Fatalf("marker key %s lives on %v (%v)", a.targets[0].key, m, err)
	}
	for i := range 300 {
		if err := rdb.Set(ctx, fmt.Sprintf("k:%d", i), 1, 0).Err(); err != nil {
			t.Fatal(err)
		}
	}
	if err := a.Acknowledge(ctx); err != nil || a.Replicas() != 1 {
		t.Fatalf("Acknowledge: %v, %d replica(s)", err, a.Replicas())
	}
	replica.Pause()
	defer replica.Resume()
	a, err = NewAcknowledger(ctx, rdb, 300*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Acknowledge(ctx); !errors.Is(err, ErrNotAcknowledged) {
		t.Fatalf("Acknowledge with the replica paused: %v", err)
	}
}
