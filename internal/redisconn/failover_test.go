package redisconn

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/redistest"
)

// With min-replicas-to-write equal to the number of replicas, the old
// master refuses writes (NOREPLICAS) once its replica is promoted and has
// dropped its link: instead of every write of the ~1s switch, at most the
// one in flight at that instant is lost (this client has one at a time).
// The price: the new master refuses writes until the old one has become its
// replica, some 10s later.
func TestSentinelFailoverMinReplicas(t *testing.T) {
	t.Parallel()
	s := redistest.StartSentinelWith(t, redistest.SentinelOptions{
		Replicas:   1,
		ServerArgs: []string{"--min-replicas-to-write", "1", "--min-replicas-max-lag", "10"},
	})
	lost := failoverWhileWriting(t, s)
	t.Logf("with min-replicas-to-write: %d writes acknowledged during the switch were lost", lost)
	if lost > 1 {
		t.Errorf("%d writes acknowledged during the switch were lost, want at most the one in flight", lost)
	}
}

// SENTINEL FAILOVER, with the client writing all along: it follows the new
// master, and nothing written before the failover is lost.
func TestSentinelFailover(t *testing.T) {
	t.Parallel()
	lost := failoverWhileWriting(t, redistest.StartSentinel(t))
	t.Logf("without min-replicas-to-write: %d writes acknowledged during the switch were lost", lost)
}

// failoverWhileWriting writes keys, fails over, and keeps writing and
// reading through the same client until it talks to the new master. It
// checks that the keys written before are all there and that writes go to
// the new master afterwards, and returns how many writes acknowledged
// during the switch did not survive it.
func failoverWhileWriting(t *testing.T, s *redistest.Sentinel) (lost int) {
	t.Helper()
	ctx := context.Background()
	c := openURL(t, s.URL())
	if c.(*redis.Client).Options().PoolSize != 20 {
		t.Errorf("pool size %d, want 20", c.(*redis.Client).Options().PoolSize)
	}
	const n = 200
	for i := range n {
		if err := c.Set(ctx, fmt.Sprintf("pre:%d", i), i, 0).Err(); err != nil {
			t.Fatal(err)
		}
	}
	t0 := time.Now()
	old := s.Failover()
	written, failures := followUntilMoved(t, c, old, 20*time.Second)
	t.Logf("the client followed the failover in %v: %d writes acknowledged meanwhile, %d operations failed", time.Since(t0), len(written), failures)
	newMaster := s.WaitForNewMaster(old, 10*time.Second)
	if port, _, err := whereIs(ctx, c); err != nil || port != portOf(newMaster) {
		t.Fatalf("the client talks to port %s (%v); the Sentinels name %s", port, err, newMaster)
	}

	// Nothing written before the failover is lost, seen through the client
	// and on the new master itself.
	direct := redis.NewClient(&redis.Options{Addr: newMaster})
	defer direct.Close()
	for i := range n {
		k := fmt.Sprintf("pre:%d", i)
		for _, r := range []redis.Cmdable{c, direct} {
			if got, err := r.Get(ctx, k).Int(); err != nil || got != i {
				t.Fatalf("%s after the failover: %d, %v", k, got, err)
			}
		}
	}
	// Writes the old master acknowledged after the promotion never reach
	// the new master, and are discarded when the old one becomes its
	// replica (some 10s later).
	for _, k := range written {
		if direct.Exists(ctx, k).Val() == 0 {
			lost++
		}
	}

	// From now on every write lands on the new master (which, with
	// min-replicas-to-write, may refuse them until it has a replica).
	t1 := time.Now()
	for {
		err := c.Set(ctx, "post:first", 1, 0).Err()
		if err == nil {
			break
		}
		if time.Since(t1) > 25*time.Second {
			t.Fatalf("the new master refuses writes for 25s: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("the new master accepts writes %v after the client followed it", time.Since(t1).Round(time.Millisecond))
	for i := range 50 {
		k := fmt.Sprintf("post:%d", i)
		if err := c.Set(ctx, k, i, 0).Err(); err != nil {
			t.Fatalf("SET %s after the failover: %v", k, err)
		}
		if got, err := direct.Get(ctx, k).Int(); err != nil || got != i {
			t.Fatalf("%s on the new master: %d, %v", k, got, err)
		}
	}
	return lost
}

// whereIs says which server a client's connections reach: its port and
// its role.
func whereIs(ctx context.Context, c redis.UniversalClient) (port, role string, err error) {
	info, err := c.Info(ctx, "server", "replication").Result()
	if err != nil {
		return "", "", err
	}
	return infoField(info, "tcp_port"), infoField(info, "role"), nil
}

func portOf(addr string) string {
	_, p, _ := net.SplitHostPort(addr)
	return p
}

// followUntilMoved writes and reads keys through c, as a worker would, until
// c talks to a master other than old. It returns the keys it wrote (and
// Redis acknowledged), and how many operations failed on the way.
func followUntilMoved(t *testing.T, c redis.UniversalClient, old string, timeout time.Duration) (written []string, failures int) {
	t.Helper()
	ctx := context.Background()
	deadline := time.Now().Add(timeout)
	var lastErr error
	for i := 0; ; i++ {
		k, v := fmt.Sprintf("during:%d", i), strconv.Itoa(i)
		if err := c.Set(ctx, k, v, 0).Err(); err != nil {
			failures, lastErr = failures+1, err
		} else {
			written = append(written, k)
			if got, err := c.Get(ctx, k).Result(); err != nil {
				failures, lastErr = failures+1, err
			} else if got != v {
				t.Logf("read %s = %q right after writing %q (the two went to different servers)", k, got, v)
			}
		}
		port, role, err := whereIs(ctx, c)
		if err == nil && port != portOf(old) && role == "master" {
			return written, failures
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v the client still talks to port %s (%s), not a new master; last error: %v", timeout, port, role, lastErr)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
