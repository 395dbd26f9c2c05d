package bench

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/enqueue"
	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/redisconn"
	"github.com/couponflow/dispatcher/internal/redistest"
	"github.com/couponflow/dispatcher/internal/tasks"
)

// The two benchmarks here take BenchmarkDispatch's worker apart without
// WeChat: what asynq alone costs per task, and what the idempotency store
// adds per send, both in CPU of the client process and of redis-server.

// BenchmarkAsynqNoop is asynq's own floor: an asynq.Server configured as
// the worker's (concurrency 32, same pool size) works off BENCH_SENDS × 4
// queued tasks (default 20,000) of our payload with a handler that does
// nothing.
func BenchmarkAsynqNoop(b *testing.B) {
	n := 4 * envInt(b, "BENCH_SENDS", 5000)
	var tasksDone int64
	var wall, cpu, rcpu time.Duration
	for b.Loop() {
		b.StopTimer()
		rs := redistest.Start(b)
		rdb := openWorkerRedis(b, rs.Addr)
		c := campaignFor("noop")
		plainEnqueue(b, asynq.NewClientFromRedisClient(rdb), c, 0, n)
		var handled atomic.Int64
		srv := asynq.NewServerFromRedisClient(rdb, asynq.Config{
			Concurrency: workerConcurrency, Queues: map[string]int{tasks.DefaultQueue: 1},
			DelayedTaskCheckInterval: time.Second, LogLevel: asynq.WarnLevel,
		})
		b.Cleanup(srv.Shutdown)
		b.StartTimer()
		err := srv.Start(asynq.HandlerFunc(func(context.Context, *asynq.Task) error {
			handled.Add(1)
			return nil
		}))
		if err != nil {
			b.Fatal(err)
		}
		var t0 time.Time
		var cpu0, rcpu0 time.Duration
		var at0 int64
		deadline := time.Now().Add(5 * time.Minute)
		for {
			h := handled.Load()
			if h > 0 && t0.IsZero() {
				t0, cpu0, rcpu0, at0 = time.Now(), selfCPU(b), redisCPU(b, rdb), h
			}
			if h == int64(n) {
				break
			}
			if time.Now().After(deadline) {
				b.Fatalf("%d of %d tasks handled in 5 minutes", h, n)
			}
			time.Sleep(5 * time.Millisecond)
		}
		wall += time.Since(t0)
		cpu += selfCPU(b) - cpu0
		rcpu += redisCPU(b, rdb) - rcpu0
		tasksDone += int64(n) - at0
		b.StopTimer()
		srv.Shutdown()
		b.StartTimer()
	}
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(float64(tasksDone)/wall.Seconds(), "tasks/s")
	b.ReportMetric(float64(cpu.Microseconds())/float64(tasksDone), "worker-cpu-us/task")
	b.ReportMetric(float64(rcpu.Microseconds())/float64(tasksDone), "redis-cpu-us/task")
}

// BenchmarkStoreClaimFinish is the idempotency store's part of a send:
// TryClaim then Finish(Succeeded), as the handler calls them, from 32
// goroutines over BENCH_SENDS × 4 registered sends (default 20,000).
func BenchmarkStoreClaimFinish(b *testing.B) {
	n := 4 * envInt(b, "BENCH_SENDS", 5000)
	ctx := context.Background()
	var sends int64
	var wall, cpu, rcpu time.Duration
	for b.Loop() {
		b.StopTimer()
		rs := redistest.Start(b)
		rdb := openWorkerRedis(b, rs.Addr)
		store := idempotency.New(rdb)
		c := campaignFor("store")
		send := func(i int) idempotency.Send {
			return idempotency.Send{MchID: c.MchID, OutRequestNo: tasks.DeriveOutRequestNo(c.MchID, c.Name, openID("oSto", i)),
				Campaign: c.Name, OpenID: openID("oSto", i), StockID: c.StockID}
		}
		for i := range n {
			if _, _, err := store.Register(ctx, send(i)); err != nil {
				b.Fatal(err)
			}
		}
		b.StartTimer()
		t0, cpu0, rcpu0 := time.Now(), selfCPU(b), redisCPU(b, rdb)
		var next atomic.Int64
		var wg sync.WaitGroup
		for range workerConcurrency {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					i := int(next.Add(1) - 1)
					if i >= n {
						return
					}
					s, owner := send(i), newOwner()
					cl, err := store.TryClaim(ctx, s, owner, 40*time.Second)
					if err != nil || !cl.Acquired {
						b.Errorf("claim %d: %+v %v", i, cl, err)
						return
					}
					if err := store.Finish(ctx, s, owner, idempotency.Result{State: idempotency.Succeeded, CouponID: "98765432100"}); err != nil {
						b.Error(err)
						return
					}
				}
			}()
		}
		wg.Wait()
		wall += time.Since(t0)
		cpu += selfCPU(b) - cpu0
		rcpu += redisCPU(b, rdb) - rcpu0
		sends += int64(n)
		b.StopTimer()
		st, err := store.Status(ctx, c.Name)
		if err != nil || st.ByState[idempotency.Succeeded] != int64(n) {
			b.Fatalf("status %+v %v", st, err)
		}
		b.StartTimer()
	}
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(float64(sends)/wall.Seconds(), "sends/s")
	b.ReportMetric(float64(cpu.Microseconds())/float64(sends), "client-cpu-us/send")
	b.ReportMetric(float64(rcpu.Microseconds())/float64(sends), "redis-cpu-us/send")
}

// openWorkerRedis opens Redis as cmd/worker does: a pool of 2 × concurrency + 10.
func openWorkerRedis(b *testing.B, addr string) redis.UniversalClient {
	b.Helper()
	rdb, err := redisconn.Open(context.Background(), addr, workerConcurrency*2+10)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { rdb.Close() })
	return rdb
}

func campaignFor(name string) enqueue.Campaign {
	return enqueue.Campaign{Name: name, MchID: benchMchID, AppID: benchAppID, StockID: benchStockID,
		Deadline: time.Unix(time.Now().Add(72*time.Hour).Unix(), 0)}
}

// newOwner is the handler's owner token: 8 random bytes in hex.
func newOwner() string {
	var b [8]byte
	_, _ = crand.Read(b[:])
	return hex.EncodeToString(b[:])
}
