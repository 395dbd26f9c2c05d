package dispatch_test

import (
	"context"
	"testing"
	"time"

	"github.com/hibiken/asynq"

	"github.com/couponflow/dispatcher/internal/tasks"
)

// A task that outlived its campaign's records (an archived task run again
// after the retention) is not sent: nothing could tell whether it was.
func TestTaskOfAnExpiredCampaignIsNotSent(t *testing.T) {
	w := newWorld(t, 2)
	ctx := context.Background()
	// What retention leaves of campaign "c": its tombstone alone.
	w.rdb.HSet(ctx, w.store.Keys().Tomb("c"), "finished_at", time.Now().Add(-time.Hour).UnixMilli(),
		"expires_at", time.Now().Add(-time.Minute).UnixMilli(), "total", 1, "succeeded", 1, "failed", 0)
	a := w.send(w.sb.Env()["SANDBOX_STOCK_ID"], "oExpired", "orn-expired", time.Now().Add(time.Hour))
	insp := asynq.NewInspectorFromRedisClient(w.rdb)
	deadline := time.Now().Add(10 * time.Second)
	for {
		archived, _ := insp.ListArchivedTasks(tasks.DefaultQueue)
		if len(archived) == 1 {
			if archived[0].LastErr == "" {
				t.Fatalf("archived without a reason: %+v", archived[0])
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the task was not archived")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if led := w.sb.Ledger(); len(led.Coupons) != 0 || len(led.Requests) != 0 {
		t.Fatalf("WeChat was called: %+v", led.Requests)
	}
	if rec := w.record(a); rec.State != "" {
		t.Fatalf("a record was written: %+v", rec)
	}
	if keys := w.rdb.Keys(ctx, w.store.Keys().CampaignPattern("c")).Val(); len(keys) != 1 {
		t.Fatalf("campaign keys %v, want the tombstone alone", keys)
	}
}
