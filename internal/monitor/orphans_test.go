package monitor_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/hibiken/asynq"

	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/keyspace"
	"github.com/couponflow/dispatcher/internal/monitor"
	"github.com/couponflow/dispatcher/internal/tasks"
)

// The monitor reads asynq's task hashes itself (one pipeline, not an
// Inspector call a send): the key and its state field must be asynq's.
func TestAsynqTaskKey(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()
	for _, tc := range []struct {
		opts []asynq.Option
		want string
	}{
		{[]asynq.Option{asynq.TaskID("send:1:a.b")}, "pending"},
		{[]asynq.Option{asynq.TaskID("send:1:a.c"), asynq.ProcessIn(time.Hour)}, "scheduled"},
	} {
		info, err := r.asynq.Enqueue(asynq.NewTask(tasks.TypeSendCoupon, nil), append(tc.opts, asynq.Queue("coupons"))...)
		if err != nil {
			t.Fatal(err)
		}
		if st, err := r.rdb.HGet(ctx, keyspace.AsynqTask("coupons", info.ID), "state").Result(); err != nil || st != tc.want {
			t.Errorf("%s: state %q (%v), want %q: asynq's task key or field moved", info.ID, st, err, tc.want)
		}
	}
}

// A send whose task was deleted in asynqmon is shown as an orphan (after
// a moment: a producer registers just before it queues); the campaign
// whose every send left is an orphan is stalled and says why; once the
// sweeper queues them again, they are no orphans.
func TestOrphansShown(t *testing.T) {
	r := newRig(t, monitor.WithBasicAuth(testUser, testPassword), monitor.WithMchID(testMchID))
	startWorker(t, r)
	sends := r.campaign("holes", 3)
	finish(t, r.store, sends[0], succeeded("C-0"))
	insp := asynq.NewInspectorFromRedisClient(r.rdb)
	del := func(i int) {
		t.Helper()
		id := tasks.Key{MchID: testMchID, OutRequestNo: sends[i].OutRequestNo}.TaskID()
		if err := insp.DeleteTask(tasks.DefaultQueue, id); err != nil {
			t.Fatal(err)
		}
	}
	del(1)
	if c := detail(t, r, "holes"); c.Orphans != 0 {
		t.Fatalf("an orphan shown at once: %d (a send registered a moment before its task is no orphan)", c.Orphans)
	}
	time.Sleep(3200 * time.Millisecond) // a page read later confirms it
	c := detail(t, r, "holes")
	if c.Orphans != 1 || len(c.OrphanSample) != 1 || c.OrphanSample[0] != sends[1].OutRequestNo || c.State == monitor.StateStalled {
		t.Fatalf("orphans %d %q, state %s; want 1, %s, not stalled (another send can still move)", c.Orphans, c.OrphanSample, c.State, sends[1].OutRequestNo)
	}
	_, body := r.get("/campaigns/holes", operator)
	mustContain(t, "campaign page", body, `data-orphans="1"`, "1 send waits for a task asynq no longer holds", sends[1].OutRequestNo, "WORKER_SWEEP_STALL")

	del(2)
	time.Sleep(2100 * time.Millisecond) // the next check suspects it,
	detail(t, r, "holes")
	time.Sleep(3200 * time.Millisecond) // the one after confirms it
	if c = detail(t, r, "holes"); c.Orphans != 2 || c.State != monitor.StateStalled || !strings.Contains(c.StateWhy, "tasks asynq no longer holds") {
		t.Fatalf("orphans %d, state %s (%s); want 2, stalled", c.Orphans, c.State, c.StateWhy)
	}

	// Queued again, as the fleet's sweeper does once the campaign has
	// stalled (e2e's TestOrphanInBrowser runs the real one).
	r.queueTask(sends[1])
	r.queueTask(sends[2])
	time.Sleep(2100 * time.Millisecond) // the next orphan check
	if c = detail(t, r, "holes"); c.Orphans != 0 || c.State == monitor.StateStalled {
		t.Fatalf("after the sweep: orphans %d, state %s (%s)", c.Orphans, c.State, c.StateWhy)
	}
}

// The index sets the campaigns' waiting sends beside asynq's live tasks,
// and says why they differ.
func TestTallyShown(t *testing.T) {
	r := newRig(t, monitor.WithBasicAuth(testUser, testPassword))
	sends := r.campaign("even", 3)
	finish(t, r.store, sends[0], succeeded("C-0"))
	// The settled send's task: asynq lets it go once the worker is done.
	if err := asynq.NewInspectorFromRedisClient(r.rdb).DeleteTask(tasks.DefaultQueue,
		tasks.Key{MchID: testMchID, OutRequestNo: sends[0].OutRequestNo}.TaskID()); err != nil {
		t.Fatal(err)
	}
	_, body := r.get("/", operator)
	mustContain(t, "index", body, `id="tally" data-waiting="2" data-tasks="2"`, "They agree")
	r.queueTask(idempotencySend("stray"))
	_, body = r.get("/", operator)
	mustContain(t, "index", body, `data-waiting="2" data-tasks="3"`, `id="tally-why">asynq holds 1 more tasks than sends wait`)
}

func idempotencySend(no string) idempotency.Send {
	return idempotency.Send{MchID: testMchID, OutRequestNo: no}
}
