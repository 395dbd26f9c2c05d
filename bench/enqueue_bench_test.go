package bench

import (
	"context"
	"encoding/json"
	"path/filepath"
	"runtime/metrics"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/campaign"
	"github.com/couponflow/dispatcher/internal/enqueue"
	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/keyspace"
	"github.com/couponflow/dispatcher/internal/redisconn"
	"github.com/couponflow/dispatcher/internal/redistest"
	"github.com/couponflow/dispatcher/internal/tasks"
)

const (
	benchMchID   = "1900000001"
	benchAppID   = "wxd678efh567hg6787"
	benchStockID = "9856000"
	// enqueueConcurrency is Bulk's default and the enqueuer's --concurrency.
	enqueueConcurrency = 32
	pendingKey         = "asynq:{" + tasks.DefaultQueue + "}:pending"
)

// BenchmarkEnqueue enqueues a BENCH_ROWS-row campaign file (default
// 1,000,000) through the producer's real path, campaign.Open and
// Producer.Bulk with its default 32 batches (of 64 rows) in flight, into a private
// Redis; and, in the same run, the same number of equivalent tasks (the
// same payload bytes and TaskIDs) with plain asynq.Client.Enqueue from 32
// goroutines into another private Redis. The plain run is split in two
// halves, one before ours and one after, so that a change in the machine's
// load during the run weighs on both sides alike.
//
// Metrics: rows/s (ours), plain-tasks/s, ratio (ours ÷ plain), the Redis
// memory each pending send costs (used_memory after − before, ÷ rows), and
// where the CPU went (this process, the producer; and redis-server), per row.
// peak-heap-MB is the most Go heap this process held while Bulk ran
// (live and not yet collected objects, sampled every 10 ms): flat in the
// file's size. Then the same file is run again, every row already queued: rerun-rows/s,
// and rerun-ratio (the re-run's rows/s ÷ the first run's).
func BenchmarkEnqueue(b *testing.B) {
	n := envInt(b, "BENCH_ROWS", 1_000_000)
	ctx := context.Background()
	path := filepath.Join(b.TempDir(), "bench.csv")
	writeCampaignCSV(b, path, "oUpF8u", n)
	deadline := time.Unix(time.Now().Add(72*time.Hour).Unix(), 0) // as SaveCampaign keeps it
	c := enqueue.Campaign{Name: "bench", MchID: benchMchID, AppID: benchAppID, StockID: benchStockID, Deadline: deadline}

	var ours, plain, rerun side
	var peakHeap uint64
	for b.Loop() {
		b.StopTimer()
		oursRedis, plainRedis := redistest.Start(b), redistest.Start(b)
		// As the enqueuer opens it: a pool of --concurrency + 4.
		oursRDB := openRedis(b, oursRedis.Addr)
		plainRDB := openRedis(b, plainRedis.Addr)
		store := idempotency.New(oursRDB)
		if _, err := store.SaveCampaign(ctx, idempotency.Campaign{Name: c.Name, MchID: c.MchID, Deadline: deadline}); err != nil {
			b.Fatal(err)
		}
		producer := enqueue.New(asynq.NewClientFromRedisClient(oursRDB), store)
		plainClient := asynq.NewClientFromRedisClient(plainRDB)
		b.StartTimer()

		plain.begin(b, plainRDB)
		plain.run(b, plainRDB, func() { plainEnqueue(b, plainClient, c, 0, n/2) })
		bulk := func(wantNew bool) {
			r, closer, err := campaign.Open(path, campaign.Options{})
			if err != nil {
				b.Fatal(err)
			}
			defer closer.Close()
			var stats enqueue.Stats
			if err := producer.Bulk(ctx, r, c, &stats, enqueue.BulkOptions{}); err != nil {
				b.Fatal(err)
			}
			got, want := stats.Enqueued.Load(), int64(n)
			if !wantNew {
				got = stats.Duplicates.Load()
			}
			if got != want {
				b.Fatalf("Bulk enqueued %d of %d rows (duplicates %d, invalid %d)", stats.Enqueued.Load(), n, stats.Duplicates.Load(), stats.Invalid.Load())
			}
		}
		ours.begin(b, oursRDB)
		stopHeap := watchHeap(&peakHeap)
		ours.run(b, oursRDB, func() { bulk(true) })
		stopHeap()
		ours.end(b, oursRDB)
		plain.run(b, plainRDB, func() { plainEnqueue(b, plainClient, c, n/2, n) })
		plain.end(b, plainRDB)

		b.StopTimer()
		for _, rdb := range []redis.UniversalClient{oursRDB, plainRDB} {
			if got := rdb.LLen(ctx, pendingKey).Val(); got != int64(n) {
				b.Fatalf("%d tasks pending, want %d", got, n)
			}
		}
		// The two sides must have queued the same bytes.
		taskKey := "asynq:{" + tasks.DefaultQueue + "}:t:" + tasks.Key{MchID: c.MchID,
			OutRequestNo: tasks.DeriveOutRequestNo(c.MchID, c.Name, openID("oUpF8u", n-1))}.TaskID()
		o, p := oursRDB.HStrLen(ctx, taskKey, "msg").Val(), plainRDB.HStrLen(ctx, taskKey, "msg").Val()
		if o == 0 || o != p || oursRDB.HGet(ctx, taskKey, "msg").Val() != plainRDB.HGet(ctx, taskKey, "msg").Val() {
			b.Fatalf("task message is %d bytes in ours, %d in plain, or their bytes differ", o, p)
		}
		recKey := keyspace.Default.Record(c.Name, c.MchID, tasks.DeriveOutRequestNo(c.MchID, c.Name, openID("oUpF8u", n-1)))
		b.Logf("one send: asynq task hash %d B (msg %d B), idempotency record hash %d B (MEMORY USAGE)",
			oursRDB.MemoryUsage(ctx, taskKey).Val(), o, oursRDB.MemoryUsage(ctx, recKey).Val())
		b.Logf("ours, redis commandstats per row: %s", commandStats(b, oursRDB, int64(n)))
		b.Logf("plain, redis commandstats per task: %s", commandStats(b, plainRDB, int64(n)))
		// The same file again: every row is already queued (after
		// the commandstats above, which are the first run's alone).
		rerun.run(b, oursRDB, func() { bulk(false) })
		rerun.rows += n
		b.StartTimer()
	}

	rows := float64(ours.rows)
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(rows/ours.wall.Seconds(), "rows/s")
	b.ReportMetric(float64(plain.rows)/plain.wall.Seconds(), "plain-tasks/s")
	b.ReportMetric((rows/ours.wall.Seconds())/(float64(plain.rows)/plain.wall.Seconds()), "ratio")
	b.ReportMetric(float64(ours.mem)/rows, "bytes/task")
	b.ReportMetric(float64(plain.mem)/float64(plain.rows), "plain-bytes/task")
	b.ReportMetric(float64(ours.clientCPU.Microseconds())/rows, "client-cpu-us/row")
	b.ReportMetric(float64(ours.redisCPU.Microseconds())/rows, "redis-cpu-us/row")
	b.ReportMetric(float64(plain.clientCPU.Microseconds())/float64(plain.rows), "plain-client-cpu-us/task")
	b.ReportMetric(float64(plain.redisCPU.Microseconds())/float64(plain.rows), "plain-redis-cpu-us/task")
	b.ReportMetric(float64(peakHeap)/(1<<20), "peak-heap-MB")
	b.ReportMetric(float64(rerun.rows)/rerun.wall.Seconds(), "rerun-rows/s")
	b.ReportMetric((float64(rerun.rows)/rerun.wall.Seconds())/(rows/ours.wall.Seconds()), "rerun-ratio")
	b.Logf("ours: %d rows in %s; plain: %d tasks in %s; the same file again: %d rows in %s (CPU per row: producer %.1f µs, redis-server %.1f µs)",
		ours.rows, ours.wall.Round(time.Millisecond), plain.rows, plain.wall.Round(time.Millisecond), rerun.rows, rerun.wall.Round(time.Millisecond),
		float64(rerun.clientCPU.Microseconds())/float64(rerun.rows), float64(rerun.redisCPU.Microseconds())/float64(rerun.rows))
}

func openRedis(b *testing.B, addr string) redis.UniversalClient {
	b.Helper()
	rdb, err := redisconn.Open(context.Background(), addr, enqueueConcurrency+4)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { rdb.Close() })
	return rdb
}

// side accumulates one side's measurements: wall time, CPU of this process
// and of its redis-server, and Redis memory.
type side struct {
	rows                         int
	wall, clientCPU, redisCPU    time.Duration
	mem                          int64
	memBefore, countBefore       int64
	redisCPUBefore, selfCPUStart time.Duration
}

func (s *side) begin(b *testing.B, rdb redis.UniversalClient) {
	if err := rdb.ConfigResetStat(context.Background()).Err(); err != nil {
		b.Fatal(err)
	}
	s.memBefore = usedMemory(b, rdb)
	s.countBefore = rdb.LLen(context.Background(), pendingKey).Val()
}

func (s *side) run(b *testing.B, rdb redis.UniversalClient, f func()) {
	cpu0, rcpu0, t0 := selfCPU(b), redisCPU(b, rdb), time.Now()
	f()
	s.wall += time.Since(t0)
	s.clientCPU += selfCPU(b) - cpu0
	s.redisCPU += redisCPU(b, rdb) - rcpu0
}

func (s *side) end(b *testing.B, rdb redis.UniversalClient) {
	s.mem += usedMemory(b, rdb) - s.memBefore
	s.rows += int(rdb.LLen(context.Background(), pendingKey).Val() - s.countBefore)
}

// plainEnqueue queues rows [from, to) of the campaign as asynq tasks with
// the payload, TaskID and options our producer gives them, from
// enqueueConcurrency goroutines, and nothing else: no file, no
// validation, no idempotency record.
func plainEnqueue(b *testing.B, client *asynq.Client, c enqueue.Campaign, from, to int) {
	ctx := context.Background()
	var next atomic.Int64
	next.Store(int64(from))
	var wg sync.WaitGroup
	for range enqueueConcurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= to {
					return
				}
				oid := openID("oUpF8u", i)
				args := tasks.SendCoupon{
					Common: tasks.Common{
						V: tasks.Version, Campaign: c.Name, MchID: c.MchID, OpenID: oid, StockID: c.StockID,
						OutRequestNo: tasks.DeriveOutRequestNo(c.MchID, c.Name, oid), AppID: c.AppID, Deadline: c.Deadline,
					},
					StockCreatorMchID: c.MchID,
				}
				payload, err := json.Marshal(args)
				if err != nil {
					b.Error(err)
					return
				}
				task := asynq.NewTask(tasks.TypeSendCoupon, payload, asynq.TaskID(args.Key().TaskID()),
					asynq.Queue(tasks.DefaultQueue), asynq.MaxRetry(tasks.MaxRetry), asynq.Timeout(2*time.Minute))
				if _, err := client.EnqueueContext(ctx, task); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
}

// watchHeap samples the Go heap's objects every 10 ms into *peak until
// the returned stop is called.
func watchHeap(peak *uint64) (stop func()) {
	sample := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
	done, finished := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(finished)
		t := time.NewTicker(10 * time.Millisecond)
		defer t.Stop()
		for {
			metrics.Read(sample)
			*peak = max(*peak, sample[0].Value.Uint64())
			select {
			case <-done:
				return
			case <-t.C:
			}
		}
	}()
	return func() { close(done); <-finished }
}
