package redisconn

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/couponflow/dispatcher/internal/redistest"
)

// KillMaster, with the client writing all along: it follows the promoted
// replica and keeps what was replicated before the crash. First, on the
// same deployment, the errors of a wrong configuration.
func TestSentinelKillMaster(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := redistest.StartSentinel(t)

	// A wrong master name, or a Sentinel given as a plain server, fails
	// at once and says so.
	badName := strings.Replace(s.URL(), "/"+redistest.MasterName, "/nosuch", 1)
	for _, tc := range []struct{ raw, says string }{
		{badName, `does not know master "nosuch"`},
		{"redis://" + s.Sentinels[0].Addr, "is a Sentinel, not a Redis server: use redis-sentinel://"},
	} {
		spec, err := ParseURL(tc.raw)
		if err != nil {
			t.Fatal(err)
		}
		_, err = OpenSpec(ctx, spec, 10)
		if err == nil || !strings.Contains(err.Error(), tc.says) {
			t.Errorf("%s: %v, want an error saying %s", tc.raw, err, tc.says)
		}
		t.Logf("%v", err)
	}

	c := openURL(t, s.URL())
	const n = 100
	for i := range n {
		if err := c.Set(ctx, fmt.Sprintf("pre:%d", i), i, 0).Err(); err != nil {
			t.Fatal(err)
		}
	}
	// A crash loses what the replica has not received: WAIT makes sure it
	// has everything so far.
	if got, err := c.Do(ctx, "WAIT", 1, 2000).Int(); err != nil || got != 1 {
		t.Fatalf("WAIT: %d replicas, %v", got, err)
	}
	t0 := time.Now()
	old := s.KillMaster()
	written, failures := followUntilMoved(t, c, old, 20*time.Second)
	t.Logf("the client followed to the promoted replica in %v: %d writes meanwhile, %d operations failed", time.Since(t0), len(written), failures)
	newMaster := s.WaitForNewMaster(old, 10*time.Second)
	if port, _, err := whereIs(ctx, c); err != nil || port != portOf(newMaster) {
		t.Fatalf("the client talks to port %s (%v); the Sentinels name %s", port, err, newMaster)
	}
	for i := range n {
		k := fmt.Sprintf("pre:%d", i)
		if got, err := c.Get(ctx, k).Int(); err != nil || got != i {
			t.Fatalf("%s after the failover: %d, %v", k, got, err)
		}
	}
}

// asynq keeps working through a failover: tasks queued before are
// processed, and the same client and server go on with the new master.
func TestAsynqSentinel(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := redistest.StartSentinel(t)
	rdb := openURL(t, s.URL())
	r := startAsynq(t, rdb, "coupons")
	before := taskIDs("before", 10)
	r.enqueue("coupons", before...)
	r.waitProcessed(15*time.Second, before...)

	old := s.Failover()
	newMaster := s.WaitForNewMaster(old, 15*time.Second)
	// Writes made before the client hears of the switch go to the old
	// master and are lost when it becomes a replica: wait for the switch.
	deadline := time.Now().Add(10 * time.Second)
	for {
		if port, _, err := whereIs(ctx, rdb); err == nil && port == portOf(newMaster) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the client did not switch to %s", newMaster)
		}
		time.Sleep(20 * time.Millisecond)
	}
	after := taskIDs("after", 10)
	r.enqueue("coupons", after...)
	r.waitProcessed(20*time.Second, append(before, after...)...)
}
