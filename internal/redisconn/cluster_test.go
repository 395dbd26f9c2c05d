package redisconn

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/keyspace"
	"github.com/couponflow/dispatcher/internal/redistest"
)

func TestCluster(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	cl := redistest.StartCluster(t, 3)
	rdb := openURL(t, cl.URL())
	cc, ok := rdb.(*redis.ClusterClient)
	if !ok {
		t.Fatalf("OpenSpec gave a %T for a cluster", rdb)
	}
	if got := cc.Options().PoolSize; got != 20 {
		t.Errorf("pool size per node %d, want 20", got)
	}
	// One seed node is enough: the others are discovered.
	one := openURL(t, "redis-cluster://"+cl.Addrs()[1])
	if err := one.Set(ctx, "via-one-seed", 1, 0).Err(); err != nil {
		t.Fatal(err)
	}

	// A script may touch several keys that share a hash tag.
	script := redis.NewScript(`
redis.call('SET', KEYS[1], ARGV[1])
redis.call('INCRBY', KEYS[2], ARGV[2])
return redis.call('MGET', KEYS[1], KEYS[2])`)
	got, err := script.Run(ctx, rdb, []string{"cf:{c}:a", "cf:{c}:b"}, "x", 5).StringSlice()
	if err != nil || strings.Join(got, ",") != "x,5" {
		t.Fatalf("EVAL on {c}: %v, %v", got, err)
	}
	// ... but not keys of two tags on two slots.
	if err := script.Run(ctx, rdb, []string{"cf:{a}:x", "cf:{b}:x"}, "x", 1).Err(); err == nil || !strings.Contains(err.Error(), "CROSSSLOT") {
		t.Errorf("EVAL across {a} and {b}: %v, want CROSSSLOT", err)
	}

	// Campaigns spread over the masters; the keys of one campaign (record,
	// counters, members) share its slot, as idempotency's scripts need.
	byMaster := map[string][]string{}
	for i := range 30 {
		campaign := fmt.Sprintf("campaign-%d", i)
		keys := []string{
			keyspace.Default.Record(campaign, "1900000001", fmt.Sprintf("1900000001-%032x", i)),
			keyspace.Default.Counts(campaign),
			keyspace.Default.Members(campaign),
			keyspace.Default.Meta(campaign),
			keyspace.Default.Tomb(campaign),
			keyspace.Default.Rate(campaign, 1700000000),
		}
		slot := cc.ClusterKeySlot(ctx, keys[0]).Val()
		for _, k := range keys[1:] {
			if s := cc.ClusterKeySlot(ctx, k).Val(); s != slot {
				t.Errorf("%s is in slot %d, %s in %d", keys[0], slot, k, s)
			}
		}
		m, err := cc.MasterForKey(ctx, keys[1])
		if err != nil {
			t.Fatal(err)
		}
		addr := m.Options().Addr
		byMaster[addr] = append(byMaster[addr], campaign)
		if err := rdb.HIncrBy(ctx, keys[1], "pending", 1).Err(); err != nil {
			t.Fatal(err)
		}
		// The key really lives on that master: asked directly, it answers
		// without a redirection.
		direct := redis.NewClient(&redis.Options{Addr: addr})
		if v, err := direct.HGet(ctx, keys[1], "pending").Result(); err != nil || v != "1" {
			t.Errorf("%s on %s: %q, %v", keys[1], addr, v, err)
		}
		_ = direct.Close()
	}
	if len(byMaster) != 3 {
		t.Errorf("30 campaigns landed on %d masters, want 3: %v", len(byMaster), byMaster)
	}
	// The per-user lock has its own tag, its own slot.
	if ok, err := rdb.SetNX(ctx, "cf:user:{1900000001:oUser1}", "owner", time.Minute).Result(); err != nil || !ok {
		t.Errorf("user lock: %v, %v", ok, err)
	}

	// A cluster node given as a plain server, or a plain server given as a
	// cluster, is refused with a message that says so.
	plain := redistest.Start(t)
	for _, tc := range []struct{ raw, says string }{
		{"redis://" + cl.Addrs()[0], "is a Redis Cluster node: use redis-cluster://"},
		{"redis-cluster://" + plain.Addr, "cluster support disabled"},
	} {
		spec, _ := ParseURL(tc.raw)
		_, err := OpenSpec(ctx, spec, 10)
		if err == nil || !strings.Contains(err.Error(), tc.says) {
			t.Errorf("%s: %v, want an error saying %q", tc.raw, err, tc.says)
		}
		t.Logf("%v", err)
	}
}

// asynq on a cluster: each queue's keys share the tag {queue}, so a queue
// lives on one master; two queues on two masters both work, and the
// Inspector sees them.
func TestAsynqCluster(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	cl := redistest.StartCluster(t, 3)
	rdb := openURL(t, cl.URL())
	cc := rdb.(*redis.ClusterClient)
	masterOf := func(queue string) string {
		m, err := cc.MasterForKey(ctx, "asynq:{"+queue+"}:pending")
		if err != nil {
			t.Fatal(err)
		}
		return m.Options().Addr
	}
	queues := []string{"coupons"}
	for i := 1; len(queues) < 2; i++ {
		if q := fmt.Sprintf("coupons-%d", i); masterOf(q) != masterOf("coupons") {
			queues = append(queues, q)
		}
	}
	t.Logf("queue %s on %s, %s on %s", queues[0], masterOf(queues[0]), queues[1], masterOf(queues[1]))

	r := startAsynq(t, rdb, queues...)
	var all []string
	for _, q := range queues {
		ids := taskIDs(q, 15)
		r.enqueue(q, ids...)
		all = append(all, ids...)
	}
	r.waitProcessed(20*time.Second, all...)

	insp := asynq.NewInspectorFromRedisClient(rdb)
	names, err := insp.Queues()
	if err != nil || len(names) != 2 {
		t.Errorf("Inspector.Queues: %v, %v", names, err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for _, q := range queues {
		for {
			info, err := insp.GetQueueInfo(q)
			if err != nil {
				t.Fatalf("GetQueueInfo(%s): %v", q, err)
			}
			if info.Processed == 15 && info.Size == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("queue %s: processed %d, size %d", q, info.Processed, info.Size)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	if servers, err := insp.Servers(); err != nil || len(servers) != 1 {
		t.Errorf("Inspector.Servers: %d, %v", len(servers), err)
	}
}
