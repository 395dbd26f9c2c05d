package monitor_test

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/hibiken/asynq"

	"github.com/couponflow/dispatcher/internal/monitor"
	"github.com/couponflow/dispatcher/internal/redisconn"
	"github.com/couponflow/dispatcher/internal/redistest"
)

func TestAsynqConnOptFollowsTheSpec(t *testing.T) {
	parse := func(raw string) redisconn.Spec {
		t.Helper()
		spec, err := redisconn.ParseURL(raw)
		if err != nil {
			t.Fatal(err)
		}
		return spec
	}

	c, ok := parse("rediss://u:p@h1:6380/3?insecure_skip_verify=true").AsynqConnOpt().(asynq.RedisClientOpt)
	if !ok || c.Addr != "h1:6380" || c.Username != "u" || c.Password != "p" || c.DB != 3 ||
		c.TLSConfig == nil || !c.TLSConfig.InsecureSkipVerify || c.DialTimeout != 5*time.Second {
		t.Errorf("standalone: %T %+v", c, c)
	}
	if c := parse("127.0.0.1:6379").AsynqConnOpt().(asynq.RedisClientOpt); c.TLSConfig != nil || c.Addr != "127.0.0.1:6379" {
		t.Errorf("plain host:port: %+v", c)
	}

	f, ok := parse("redis-sentinel://u:p@s1:26379,s2:26379/mymaster?db=2&sentinel_password=sp").AsynqConnOpt().(asynq.RedisFailoverClientOpt)
	if !ok || f.MasterName != "mymaster" || len(f.SentinelAddrs) != 2 || f.SentinelPassword != "sp" ||
		f.Username != "u" || f.Password != "p" || f.DB != 2 || f.TLSConfig != nil {
		t.Errorf("sentinel: %T %+v", f, f)
	}

	k, ok := parse("redis-cluster://:p@n1:7000,n2:7001?tls=true").AsynqConnOpt().(asynq.RedisClusterClientOpt)
	if !ok || len(k.Addrs) != 2 || k.Password != "p" || k.TLSConfig == nil || k.TLSConfig.InsecureSkipVerify {
		t.Errorf("cluster: %T %+v", k, k)
	}
}

// TestAsynqmonOnCluster: asynqmon reaches a Redis Cluster through ConnOpt.
func TestAsynqmonOnCluster(t *testing.T) {
	cl := redistest.StartCluster(t, 3)
	spec, err := redisconn.ParseURL(cl.URL())
	if err != nil {
		t.Fatal(err)
	}
	rdb := cl.Client()
	m, err := monitor.New(rdb, spec.AsynqConnOpt(), monitor.WithToken(testToken))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Close() })
	hs := httptest.NewServer(m.Handler())
	t.Cleanup(hs.Close)
	if _, err := asynq.NewClientFromRedisClient(rdb).Enqueue(asynq.NewTask("coupon:send", nil), asynq.Queue("coupons-1")); err != nil {
		t.Fatal(err)
	}
	r := &rig{t: t, url: hs.URL}
	resp, body := r.get("/monitoring/api/queues", bearer(testToken))
	var got struct {
		Queues []struct{ Queue string } `json:"queues"`
	}
	if err := json.Unmarshal([]byte(body), &got); err != nil || resp.StatusCode != http.StatusOK ||
		len(got.Queues) != 1 || got.Queues[0].Queue != "coupons-1" {
		t.Errorf("queues on a cluster: %d %v %s", resp.StatusCode, err, body)
	}
	if resp, body := r.get("/monitoring/api/redis_info", bearer(testToken)); resp.StatusCode != http.StatusOK {
		t.Errorf("redis_info on a cluster: %d %s", resp.StatusCode, body)
	}
	if resp, _ := r.get("/readyz", noAuth); resp.StatusCode != http.StatusOK {
		t.Errorf("/readyz on a cluster: %d", resp.StatusCode)
	}
	mustContain(t, "/", func() string { _, b := r.get("/", bearer(testToken)); return b }(), `href="/monitoring/queues/coupons-1"`)
}
