package bench

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/campaign"
	"github.com/couponflow/dispatcher/internal/dispatch"
	"github.com/couponflow/dispatcher/internal/enqueue"
	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/logging"
	"github.com/couponflow/dispatcher/internal/redisconn"
	"github.com/couponflow/dispatcher/internal/redistest"
	"github.com/couponflow/dispatcher/internal/sandbox/sandboxtest"
	"github.com/couponflow/dispatcher/internal/tasks"
	"github.com/couponflow/dispatcher/internal/wechat"
)

// BenchmarkRetentionMemory runs campaigns through the whole pipeline
// (producer, asynq, an in-process worker, the sandbox) with a retention of
// a few seconds, and reads Redis's used_memory at each stage: before the
// campaign (after a warm-up campaign has come and gone, so that scripts,
// asynq's own keys and its daily counters are in the baseline), once
// queued, once sent, once sealed, and once its retention has passed.
// BENCH_RETENTION_SENDS sets the campaign's size (default 5,000).
func BenchmarkRetentionMemory(b *testing.B) {
	n := envInt(b, "BENCH_RETENTION_SENDS", 5000)
	ctx := context.Background()
	const retention = 2 * time.Second
	for b.Loop() {
		b.StopTimer()
		srv, sb := redistest.Start(b), sandboxtest.Start(b)
		rdb := openRedis(b, srv.Addr)
		store := idempotency.New(rdb)
		env := sb.Env()
		logFile, err := os.Create(filepath.Join(b.TempDir(), "worker.log"))
		if err != nil {
			b.Fatal(err)
		}
		log, _ := logging.New(logFile, "json", "warn")
		wx, err := wechat.New(ctx, wechat.Config{
			MchID: env[wechat.EnvMchID], MchSerial: env[wechat.EnvMchSerial], PrivateKeyPath: env[wechat.EnvPrivateKey],
			PublicKeyPath: env[wechat.EnvPublicKey], PublicKeyID: env[wechat.EnvPublicKeyID], AppID: env[wechat.EnvAppID],
			BaseURL: env[wechat.EnvBaseURL],
		}, wechat.WithConcurrency(workerConcurrency))
		if err != nil {
			b.Fatal(err)
		}
		wrdb, err := redisconn.Open(ctx, srv.Addr, workerConcurrency*2+10)
		if err != nil {
			b.Fatal(err)
		}
		h := dispatch.New(dispatch.WeChat(wx), idempotency.New(wrdb), dispatch.WithLogger(log))
		asrv := asynq.NewServerFromRedisClient(wrdb, asynq.Config{
			Concurrency: workerConcurrency, Queues: map[string]int{tasks.DefaultQueue: 1},
			RetryDelayFunc: h.RetryDelay, IsFailure: dispatch.IsFailure, ShutdownTimeout: h.ShutdownTimeout(),
			DelayedTaskCheckInterval: time.Second, Logger: logging.Asynq{L: log}, LogLevel: asynq.WarnLevel,
		})
		mux := asynq.NewServeMux()
		mux.Handle(tasks.TypeSendCoupon, h)
		if err := asrv.Start(mux); err != nil {
			b.Fatal(err)
		}

		// run sends a campaign of size sends, reading used_memory when it is
		// queued, sent and sealed, and returns once its keys are gone.
		run := func(name string, size int) (queued, sent, sealed, gone int64, took time.Duration) {
			path := filepath.Join(b.TempDir(), name+".csv")
			writeCampaignCSV(b, path, "oRet"+name, size)
			c := idempotency.Campaign{Name: name, MchID: env[wechat.EnvMchID], Deadline: time.Now().Add(time.Hour), Retention: retention}
			if _, err := store.SaveCampaign(ctx, c); err != nil {
				b.Fatal(err)
			}
			rd, closer, err := campaign.Open(path, campaign.Options{})
			if err != nil {
				b.Fatal(err)
			}
			var stats enqueue.Stats
			start := time.Now()
			err = enqueue.New(asynq.NewClientFromRedisClient(rdb), store).Bulk(ctx, rd, enqueue.Campaign{
				Name: name, MchID: c.MchID, AppID: env[wechat.EnvAppID], StockID: env["SANDBOX_STOCK_ID"], Deadline: c.Deadline,
			}, &stats, enqueue.BulkOptions{})
			closer.Close()
			if err != nil || stats.Enqueued.Load() != int64(size) {
				b.Fatalf("enqueued %d of %d: %v", stats.Enqueued.Load(), size, err)
			}
			queued = usedMemory(b, rdb)
			for {
				st, err := store.Status(ctx, name)
				if err != nil {
					b.Fatal(err)
				}
				if st.Settled() {
					break
				}
				if time.Since(start) > 10*time.Minute {
					b.Fatalf("campaign %s not settled: %+v", name, st)
				}
				time.Sleep(50 * time.Millisecond)
			}
			took = time.Since(start)
			time.Sleep(200 * time.Millisecond) // the last tasks' completion in asynq
			sent = usedMemory(b, rdb)
			res, err := store.Sweep(ctx)
			if err != nil || len(res.Sealed) != 1 {
				b.Fatalf("sweep: %+v %v", res, err)
			}
			sealed = usedMemory(b, rdb)
			tomb, _, _ := store.Tomb(ctx, name)
			time.Sleep(time.Until(tomb.ExpiresAt))
			// Redis expires keys lazily and in a background cycle: wait
			// for the cycle to remove them all.
			for rdb.DBSize(ctx).Val() > 0 {
				left := 0
				iter := rdb.Scan(ctx, 0, store.Keys().CampaignPattern(name), 1000).Iterator()
				for iter.Next(ctx) {
					left++
				}
				if left <= 1 { // the tombstone
					break
				}
				time.Sleep(100 * time.Millisecond)
			}
			if res, err := store.Sweep(ctx); err != nil || len(res.Expired) != 1 {
				b.Fatalf("sweep after expiry: %+v %v", res, err)
			}
			gone = steadyMemory(b, rdb)
			return
		}
		run("warmup", 50)
		base := steadyMemory(b, rdb)
		datasetBase, overheadBase := memoryStats(b, rdb)
		b.StartTimer()
		queued, sent, sealed, gone, took := run("measured", n)
		b.StopTimer()
		asrv.Shutdown()
		wrdb.Close()
		logFile.Close()
		per := func(v int64) float64 { return float64(v-base) / float64(n) }
		b.Logf("%d sends in %s; Redis used_memory: baseline %d B; queued %+d B (%.0f B/send); sent %+d B (%.0f B/send); sealed %+d B; retention passed %+d B (%.2f B/send)",
			n, took.Round(time.Millisecond), base, queued-base, per(queued), sent-base, per(sent), sealed-base, gone-base, per(gone))
		datasetGone, overheadGone := memoryStats(b, rdb)
		// used_memory also holds client buffers and allocator overheads
		// that come and go with traffic; dataset.bytes (MEMORY STATS) is
		// the data alone.
		data := datasetGone - datasetBase
		b.Logf("MEMORY STATS dataset.bytes: %d at the baseline, %+d B after the retention (%.3f B/send); overhead.total %d → %d",
			datasetBase, data, float64(data)/float64(n), overheadBase, overheadGone)
		keys := rdb.Keys(ctx, "*").Val()
		b.Logf("keys left: %d: %v", len(keys), fmt.Sprint(keys))
		// Back at the baseline: what is left does not grow with the
		// campaign (its tombstone, a few hundred bytes).
		if data > 64<<10 {
			b.Errorf("%d B of data left in Redis after the retention of a campaign of %d sends", data, n)
		}
		b.ReportMetric(per(queued), "B/send-queued")
		b.ReportMetric(per(sent), "B/send-sent")
		b.ReportMetric(per(gone), "B/send-after-retention")
		b.ReportMetric(float64(gone-base), "B-residue")
		b.ReportMetric(float64(data), "B-dataset-residue")
		b.StartTimer()
	}
	b.ReportMetric(0, "ns/op")
}

// steadyMemory reads used_memory until it stops falling for 4 s: Redis
// shrinks its key tables in its background cron once they are nearly
// empty, a step at a time, and the query buffers of clients idle for 2 s.
func steadyMemory(b *testing.B, rdb redis.UniversalClient) int64 {
	b.Helper()
	low := usedMemory(b, rdb)
	for i, steady := 0, 0; i < 300 && steady < 20; i++ {
		time.Sleep(200 * time.Millisecond)
		m := usedMemory(b, rdb)
		if m < low {
			steady = 0
		} else {
			steady++
		}
		low = min(low, m)
	}
	return low
}

// memoryStats reads dataset.bytes and overhead.total from MEMORY STATS.
func memoryStats(b *testing.B, rdb redis.UniversalClient) (dataset, overhead int64) {
	b.Helper()
	v, err := rdb.Do(context.Background(), "MEMORY", "STATS").Result()
	if err != nil {
		b.Fatal(err)
	}
	m, _ := v.(map[any]any)
	dataset, _ = m["dataset.bytes"].(int64)
	overhead, _ = m["overhead.total"].(int64)
	if dataset == 0 {
		b.Fatalf("MEMORY STATS without dataset.bytes: %v", m)
	}
	return dataset, overhead
}
