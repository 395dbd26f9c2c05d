package sweep_test

import (
	"context"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/enqueue"
	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/redistest"
	"github.com/couponflow/dispatcher/internal/sweep"
	"github.com/couponflow/dispatcher/internal/tasks"
)

func send(campaign, orn string) tasks.SendCoupon {
	return tasks.SendCoupon{Common: tasks.Common{V: tasks.Version, Campaign: campaign, MchID: "1900000001", OpenID: "o_" + orn,
		StockID: "16000001", OutRequestNo: orn, AppID: "wx1", Deadline: time.Now().Add(time.Hour)}, StockCreatorMchID: "1900000001"}
}

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func newSweeper(rdb redis.UniversalClient, stall time.Duration) *sweep.Sweeper {
	return sweep.New(rdb, idempotency.New(rdb), sweep.WithStallAfter(stall), sweep.WithInterval(50*time.Millisecond), sweep.WithLogger(quiet()))
}

// Every way a send can lose its task, in one stalled campaign.
func TestStalledCampaignGetsItsLostTasksBack(t *testing.T) {
	rdb := redistest.Start(t).Client()
	ctx := context.Background()
	store := idempotency.New(rdb)
	p := enqueue.New(asynq.NewClientFromRedisClient(rdb), store)
	insp := asynq.NewInspectorFromRedisClient(rdb)
	for _, orn := range []string{"r-kept", "r-deleted", "r-archived"} {
		if _, err := p.Enqueue(ctx, send("c", orn)); err != nil {
			t.Fatal(err)
		}
	}
	id := func(orn string) string { return tasks.Key{MchID: "1900000001", OutRequestNo: orn}.TaskID() }
	// Deleted by hand in asynqmon; archived by hand.
	if err := insp.DeleteTask(tasks.DefaultQueue, id("r-deleted")); err != nil {
		t.Fatal(err)
	}
	if err := insp.ArchiveTask(tasks.DefaultQueue, id("r-archived")); err != nil {
		t.Fatal(err)
	}
	// A producer killed between its record and its enqueue.
	store.SaveCampaign(ctx, idempotency.Campaign{Name: "c", MchID: "1900000001"})
	task, _ := tasks.NewTask(send("c", "r-unqueued"))
	if _, _, err := store.Register(ctx, idempotency.Send{MchID: "1900000001", OutRequestNo: "r-unqueued", Campaign: "c",
		OpenID: "o_r-unqueued", StockID: "16000001", Task: tasks.Keep(task), Queue: tasks.DefaultQueue}); err != nil {
		t.Fatal(err)
	}
	// A send registered by an old version: no task kept.
	store.Register(ctx, idempotency.Send{MchID: "1900000001", OutRequestNo: "r-old", Campaign: "c", OpenID: "o_old", StockID: "16000001"})

	s := newSweeper(rdb, time.Hour)
	if res, err := s.Once(ctx); err != nil || res.Campaigns != 0 {
		t.Fatalf("a campaign that changed just now was swept: %+v %v", res, err)
	}
	// Stalled for 300ms: long beside the pauses below, so that a loaded
	// machine does not stretch them past it.
	time.Sleep(350 * time.Millisecond)
	s = newSweeper(rdb, 300*time.Millisecond)
	res, err := s.Once(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if res.Campaigns != 1 || res.Checked != 5 || res.Requeued != 3 || res.Unrecoverable != 1 {
		t.Fatalf("sweep %+v; want 5 checked, 3 queued again, 1 unrecoverable", res)
	}
	woken := tasks.WokenQueue(tasks.DefaultQueue)
	for _, orn := range []string{"r-deleted", "r-archived", "r-unqueued"} {
		info, err := insp.GetTaskInfo(woken, id(orn))
		if err != nil || info.State != asynq.TaskStatePending {
			t.Fatalf("%s in %s: %+v %v", orn, woken, info, err)
		}
		back, err := tasks.Decode(asynq.NewTask(info.Type, info.Payload))
		if err != nil || back.Key().OutRequestNo != orn {
			t.Fatalf("%s queued again as %+v %v", orn, back, err)
		}
	}
	if _, err := insp.GetTaskInfo(tasks.DefaultQueue, id("r-kept")); err != nil {
		t.Fatalf("the task that was never lost: %v", err)
	}
	// Swept once while it stays stalled: not again at once.
	time.Sleep(60 * time.Millisecond) // the lock expires
	if res, _ := s.Once(ctx); res.Campaigns != 0 {
		t.Fatalf("swept again at once: %+v", res)
	}
}

func TestOneSweeperAtATime(t *testing.T) {
	rdb := redistest.Start(t).Client()
	ctx := context.Background()
	p := enqueue.New(asynq.NewClientFromRedisClient(rdb), idempotency.New(rdb))
	p.Enqueue(ctx, send("c", "r1"))
	time.Sleep(20 * time.Millisecond)
	var wg sync.WaitGroup
	results := make([]sweep.Result, 4)
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i], _ = newSweeper(rdb, 10*time.Millisecond).Once(ctx)
		}()
	}
	wg.Wait()
	swept := 0
	for _, r := range results {
		swept += r.Campaigns
	}
	if swept != 1 {
		t.Fatalf("%d sweepers swept the campaign; want exactly 1: %+v", swept, results)
	}
}
