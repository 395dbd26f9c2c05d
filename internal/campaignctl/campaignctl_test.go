package campaignctl_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/hibiken/asynq"

	"github.com/couponflow/dispatcher/internal/campaignctl"
	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/redistest"
	"github.com/couponflow/dispatcher/internal/tasks"
)

const mch = "1900000109"

// A campaign of five sends, one succeeded and one held in flight by a
// worker: pause counts four waiting and holds the other claims; cancel
// settles the three that wait and leaves the in-flight one to its worker,
// which the drain waits for.
func TestPauseResumeCancel(t *testing.T) {
	rdb := redistest.Start(t).Client()
	store := idempotency.New(rdb)
	ctx := context.Background()
	if _, err := store.SaveCampaign(ctx, idempotency.Campaign{Name: "c", MchID: mch, Deadline: time.Now().Add(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	sends := make([]idempotency.Send, 5)
	for i := range sends {
		sends[i] = idempotency.Send{MchID: mch, OutRequestNo: fmt.Sprintf("c-%d", i), Campaign: "c", OpenID: fmt.Sprintf("o%d", i), StockID: "1"}
		if _, _, err := store.Register(ctx, sends[i]); err != nil {
			t.Fatal(err)
		}
	}
	claim := func(s idempotency.Send) idempotency.Claim {
		t.Helper()
		c, err := store.TryClaim(ctx, s, "w", time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	if !claim(sends[0]).Acquired {
		t.Fatal("first claim not acquired")
	}
	if err := store.Finish(ctx, sends[0], "w", idempotency.Result{State: idempotency.Succeeded, CouponID: "C0"}); err != nil {
		t.Fatal(err)
	}
	ctl := &campaignctl.Controller{Store: store, Redis: rdb, Queues: []string{tasks.DefaultQueue}, DrainWait: 5 * time.Second}

	if _, err := ctl.Pause(ctx, "nope", "tester"); !campaignctl.IsRefused(err) {
		t.Fatalf("pausing an unknown campaign: %v, want a refusal", err)
	}
	r, err := ctl.Pause(ctx, "c", "tester")
	if err != nil || r.Waiting != 4 || r.InFlight != 0 {
		t.Fatalf("pause: %+v, %v; want 4 waiting, none in flight", r, err)
	}
	if c := claim(sends[1]); c.Acquired {
		t.Fatalf("a send of a paused campaign was claimed: %+v", c)
	}
	if _, err := ctl.Resume(ctx, "c", "tester"); err != nil {
		t.Fatal(err)
	}
	if !claim(sends[1]).Acquired { // in flight from here on
		t.Fatal("a send of a resumed campaign could not be claimed")
	}
	// The worker records its call a little after the cancel began.
	go func() {
		time.Sleep(300 * time.Millisecond)
		_ = store.Finish(ctx, sends[1], "w", idempotency.Result{State: idempotency.Succeeded, CouponID: "C1"})
	}()
	r, err = ctl.Cancel(ctx, "c", "tester")
	if err != nil || r.InFlight != 0 || r.AlreadyCancelled {
		t.Fatalf("cancel: %+v, %v", r, err)
	}
	if got := r.Status.ByState; got[idempotency.Cancelled] != 3 || got[idempotency.Succeeded] != 2 {
		t.Fatalf("after cancel: %v, want 3 cancelled and 2 succeeded", got)
	}
	if _, err := ctl.Pause(ctx, "c", "tester"); !campaignctl.IsRefused(err) {
		t.Fatalf("pausing a cancelled campaign: %v, want a refusal", err)
	}
	audit, err := store.Audit(ctx, "c")
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, a := range audit {
		got = append(got, fmt.Sprintf("%s/%s/%d", a.Action, a.Who, a.Sends))
	}
	if want := "[pause/tester/4 resume/tester/4 cancel/tester/4]"; fmt.Sprint(got) != want {
		t.Fatalf("audit trail %v, want %s", got, want)
	}
}

// Wake moves only the matching tasks out of the retry set, into the woken
// queue. The tasks get there as a worker's do: a real asynq server whose
// handler asks for a retry an hour away.
func TestWake(t *testing.T) {
	srv := redistest.Start(t)
	rdb := srv.Client()
	ctx := context.Background()
	q := tasks.DefaultQueue
	client := asynq.NewClientFromRedisClient(rdb)
	for i, camp := range []string{"a", "b", "a"} {
		task, err := tasks.NewTask(tasks.SendCoupon{Common: tasks.Common{V: tasks.Version, MchID: mch, Campaign: camp,
			OutRequestNo: fmt.Sprintf("%s-%d", camp, i), StockID: "1", OpenID: "o", AppID: "wx1", Deadline: time.Now().Add(time.Hour)},
			StockCreatorMchID: mch}, asynq.Queue(q))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := client.Enqueue(task); err != nil {
			t.Fatal(err)
		}
	}
	worker := asynq.NewServerFromRedisClient(rdb, asynq.Config{Concurrency: 1, Queues: map[string]int{q: 1},
		RetryDelayFunc: func(int, error, *asynq.Task) time.Duration { return time.Hour }, LogLevel: asynq.FatalLevel})
	if err := worker.Start(asynq.HandlerFunc(func(context.Context, *asynq.Task) error { return errors.New("wait") })); err != nil {
		t.Fatal(err)
	}
	insp := asynq.NewInspectorFromRedisClient(rdb)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if info, err := insp.GetQueueInfo(q); err == nil && info.Retry == 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the three tasks did not reach the retry set within 10s")
		}
	}
	worker.Shutdown()

	n, err := campaignctl.Wake(ctx, rdb, q, func(b tasks.Common) bool { return b.Campaign == "a" })
	if err != nil || n != 2 {
		t.Fatalf("woke %d (%v), want 2", n, err)
	}
	woken, err := insp.ListPendingTasks(tasks.WokenQueue(q))
	if err != nil || len(woken) != 2 {
		t.Fatalf("woken queue holds %d (%v), want 2", len(woken), err)
	}
	left, err := insp.ListRetryTasks(q)
	if err != nil || len(left) != 1 {
		t.Fatalf("retry set holds %d (%v), want campaign b's 1", len(left), err)
	}
}
