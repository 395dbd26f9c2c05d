package bench

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"log/slog"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/breaker"
	"github.com/couponflow/dispatcher/internal/dispatch"
	"github.com/couponflow/dispatcher/internal/enqueue"
	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/ratelimit"
	"github.com/couponflow/dispatcher/internal/redisconn"
	"github.com/couponflow/dispatcher/internal/redistest"
	"github.com/couponflow/dispatcher/internal/tasks"
	"github.com/couponflow/dispatcher/internal/wechat"
)

// The two benchmarks here take BenchmarkDispatch's worker apart without
// WeChat: what asynq alone costs per task, and what the idempotency store
// adds per send, both in CPU of the client process and of redis-server.

// BenchmarkAsynqNoop is asynq's own floor: an asynq.Server configured as
// the worker's (concurrency 32, same pool size) works off BENCH_SENDS × 4
// queued tasks (default 20,000) of our payload with a handler that does
// nothing (or sleeps BENCH_FLOOR_CALL, for asynq's part of
// BenchmarkRedisFloor at the same pace).
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
		pace := floorCall(b, 0)
		err := srv.Start(asynq.HandlerFunc(func(context.Context, *asynq.Task) error {
			time.Sleep(pace)
			handled.Add(1)
			return nil
		}))
		if err != nil {
			b.Fatal(err)
		}
		var cpu0, rcpu0 time.Duration
		t0, at0 := fromFirstDone(b, int64(n), "tasks handled", 5*time.Millisecond, handled.Load, func() {
			cpu0, rcpu0 = selfCPU(b), redisCPU(b, rdb)
		})
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

// pacedCaller stands where WeChat would: it answers every call with a new
// coupon after d, so that the worker's Redis work runs at the pace
// BenchmarkDispatch's does, without its signatures.
type pacedCaller struct {
	d time.Duration
	n atomic.Int64
}

func (c *pacedCaller) Call(ctx context.Context, _ tasks.Args) (string, error) {
	select {
	case <-time.After(c.d):
	case <-ctx.Done():
		return "", ctx.Err()
	}
	return strconv.FormatInt(10000000000+c.n.Add(1), 10), nil
}

// BenchmarkRedisFloor is the worker's Redis work alone, at the pace of a
// real one: the handler as cmd/worker builds it (the store, the shared
// limiter, the breakers' closed cache, an asynq server of concurrency 32
// on the queue), with a call that takes BENCH_FLOOR_CALL (default 30 ms,
// about 1,000 sends/s at concurrency 32) and signs nothing. Its
// redis-cpu-us/send is what any send costs Redis with asynq and one record
// a send, whatever the WeChat call costs: the floor under
// BenchmarkDispatch's figure.
func BenchmarkRedisFloor(b *testing.B) {
	n := envInt(b, "BENCH_SENDS", 5000)
	call := floorCall(b, 30*time.Millisecond)
	var sends, trips int64
	var wall, rcpu time.Duration
	for b.Loop() {
		b.StopTimer()
		r := newDispatchRig(b, n)
		rdb := openWorkerRedis(b, r.redis.Addr)
		mch := r.sb.Env()[wechat.EnvMchID]
		limiter := ratelimit.New(rdb, ratelimit.WithLimits(map[ratelimit.Endpoint]ratelimit.Limit{ratelimit.SendCoupon: {N: 100000, Per: time.Second}}))
		breakers := breaker.New(rdb, breaker.WithClosedCache(time.Second))
		h := dispatch.New(&pacedCaller{d: call}, idempotency.New(rdb), dispatch.WithLimiter(limiter, 10*time.Second),
			dispatch.WithBreakers(breakers), dispatch.WithMerchant(mch), dispatch.WithLogger(slog.New(slog.DiscardHandler)))
		srv := asynq.NewServerFromRedisClient(rdb, asynq.Config{
			Concurrency: workerConcurrency, Queues: map[string]int{tasks.DefaultQueue: 1},
			RetryDelayFunc: h.RetryDelay, IsFailure: dispatch.IsFailure, ShutdownTimeout: h.ShutdownTimeout(),
			DelayedTaskCheckInterval: time.Second, LogLevel: asynq.WarnLevel,
		})
		mux := asynq.NewServeMux()
		mux.Handle(tasks.TypeSendCoupon, h)
		b.StartTimer()
		if err := srv.Start(mux); err != nil {
			b.Fatal(err)
		}
		var rcpu0 time.Duration
		succeeded := func() int64 {
			st, err := r.store.Status(context.Background(), r.campaign)
			if err != nil {
				b.Fatal(err)
			}
			return st.ByState[idempotency.Succeeded]
		}
		t0, at0 := fromFirstDone(b, int64(n), "sends succeeded", 20*time.Millisecond, succeeded, func() {
			rcpu0 = redisCPU(b, r.rdb)
		})
		wall += time.Since(t0)
		rcpu += redisCPU(b, r.rdb) - rcpu0
		sends += int64(n) - at0
		b.StopTimer()
		srv.Shutdown()
		trips += r.workerRoundTrips(b)
		b.StartTimer()
	}
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(float64(sends)/wall.Seconds(), "sends/s")
	b.ReportMetric(float64(rcpu.Microseconds())/float64(sends), "redis-cpu-us/send")
	b.ReportMetric(float64(trips)/float64(b.N*n), "redis-round-trips/send")
}

// floorCall is BENCH_FLOOR_CALL, or def.
func floorCall(b *testing.B, def time.Duration) time.Duration {
	s := os.Getenv("BENCH_FLOOR_CALL")
	if s == "" {
		return def
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		b.Fatalf("BENCH_FLOOR_CALL: %v", err)
	}
	return d
}

// fromFirstDone polls done every interval until it reaches n, failing after
// five minutes, and returns when it first saw one done and how many then:
// the measured window starts there, after the start-up. mark runs at that
// moment, for the CPU counters read at the window's start.
func fromFirstDone(b *testing.B, n int64, what string, every time.Duration, done func() int64, mark func()) (t0 time.Time, at0 int64) {
	b.Helper()
	deadline := time.Now().Add(5 * time.Minute)
	for {
		d := done()
		if d > 0 && t0.IsZero() {
			t0, at0 = time.Now(), d
			mark()
		}
		if d == n {
			return t0, at0
		}
		if time.Now().After(deadline) {
			b.Fatalf("%d of %d %s in 5 minutes", d, n, what)
		}
		time.Sleep(every)
	}
}
