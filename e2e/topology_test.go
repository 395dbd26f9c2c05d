package e2e

import (
	"context"
	"testing"
	"time"

	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/redisconn"
	"github.com/couponflow/dispatcher/internal/redistest"
	"github.com/couponflow/dispatcher/internal/sandbox"
)

func openURL(t *testing.T, url string) *rig {
	t.Helper()
	spec, err := redisconn.ParseURL(url)
	if err != nil {
		t.Fatal(err)
	}
	rdb, err := redisconn.OpenSpec(context.Background(), spec, 20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rdb.Close() })
	return newRigOn(t, redisconn.EnvURL, url, rdb)
}

// A Sentinel failover in the middle of a campaign: workers and the test
// follow the new master; nothing is lost and nobody gets two coupons.
func TestSentinelFailoverMidCampaign(t *testing.T) {
	t.Parallel()
	s := redistest.StartSentinel(t)
	r := openURL(t, s.URL())
	r.sb.SetFaults(sandbox.Faults{Latency: 20 * time.Millisecond, LatencyRate: 1})
	path, openids := r.writeUsers("failover", 1000)
	if out, code := r.enqueuer("campaign", "--file", path, "--stock-id", r.stockID(), "--campaign", "failover"); code != 0 {
		t.Fatal(out)
	}
	r.worker("a", "--concurrency", "8")
	r.worker("b", "--concurrency", "8")
	r.waitFor("failover", time.Minute, "300 sent", func(st idempotency.Status) bool { return st.ByState[idempotency.Succeeded] >= 300 })
	old := s.Failover()
	now := s.WaitForNewMaster(old, 30*time.Second)
	t.Logf("failed over from %s to %s", old, now)
	st := r.waitFor("failover", 3*time.Minute, "every send done", done)
	if st.Total != 1000 {
		t.Fatalf("%d sends recorded after the failover, want 1000", st.Total)
	}
	r.checkOneCouponEach(r.stockID(), openids)
}

// A Redis Cluster of three masters, the campaign spread over three queues:
// one coupon per recipient.
func TestClusterCampaign(t *testing.T) {
	t.Parallel()
	c := redistest.StartCluster(t, 3)
	r := openURL(t, c.URL())
	r.env = append(r.env, "QUEUE_SHARDS=3")
	path, openids := r.writeUsers("cluster", 600)
	out, code := r.enqueuer("campaign", "--file", path, "--stock-id", r.stockID(), "--campaign", "cluster")
	if code != 0 {
		t.Fatal(out)
	}
	r.worker("a", "--concurrency", "8")
	r.worker("b", "--concurrency", "8")
	r.waitFor("cluster", 2*time.Minute, "every send done", done)
	r.checkOneCouponEach(r.stockID(), openids)
	rows := r.report("cluster")
	if len(rows) != 601 {
		t.Fatalf("report has %d lines", len(rows))
	}
}
