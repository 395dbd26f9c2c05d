package e2e

import (
	"strings"
	"testing"
	"time"

	"github.com/hibiken/asynq"

	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/sandbox"
	"github.com/couponflow/dispatcher/internal/tasks"
)

// Tasks deleted by hand (asynqmon's delete button) leave records waiting
// with nothing queued: the fleet's sweeper finds the stalled campaign and
// queues them again, so it finishes instead of hanging at 45 of 50.
func TestLostTasksAreQueuedAgain(t *testing.T) {
	t.Parallel()
	r := newRig(t)
	path, openids := r.writeUsers("lost", 50)
	if out, code := r.enqueuer("campaign", "--file", path, "--stock-id", r.stockID(), "--campaign", "lost"); code != 0 {
		t.Fatal(out)
	}
	insp := asynq.NewInspectorFromRedisClient(r.rdb)
	pending, err := insp.ListPendingTasks(tasks.DefaultQueue, asynq.PageSize(5))
	if err != nil || len(pending) != 5 {
		t.Fatalf("%d pending tasks listed: %v", len(pending), err)
	}
	for _, info := range pending {
		if err := insp.DeleteTask(tasks.DefaultQueue, info.ID); err != nil {
			t.Fatal(err)
		}
	}
	w := r.worker("a", "--concurrency", "4", "--http-addr=", "--sweep-every", "500ms", "--sweep-stall", "2s")
	r.waitFor("lost", 45*time.Second, "every send done, the lost ones too", done)
	r.checkOneCouponEach(r.stockID(), openids)
	if !strings.Contains(w.out.String(), "queued again a send whose task was lost") {
		t.Fatalf("no sweep in the worker's log:\n%s", tail(w.out.String(), 20))
	}
}

// After a top-up and stock resume, the held sends go out ahead of another
// campaign's backlog in the same queue, not behind it.
func TestResumedSendsGoAheadOfABacklog(t *testing.T) {
	t.Parallel()
	r := newRig(t)
	r.sb.SetFaults(sandbox.Faults{RateLimit: 60})
	dry, err := r.sb.CreateStock(sandbox.StockSpec{Kind: "favor", Budget: 10, CouponValue: 100, CouponMinimum: 100})
	if err != nil {
		t.Fatal(err)
	}
	big, err := r.sb.CreateStock(sandbox.StockSpec{Kind: "favor", Budget: 5000, CouponValue: 100, CouponMinimum: 100})
	if err != nil {
		t.Fatal(err)
	}
	heldPath, heldUsers := r.writeUsers("held", 110)
	if out, code := r.enqueuer("campaign", "--file", heldPath, "--stock-id", dry.ID, "--campaign", "held"); code != 0 {
		t.Fatal(out)
	}
	r.worker("a", "--concurrency", "8", "--http-addr=", "--rate-limits", "favor_send=50/s",
		"--breaker-probe", "10m", "--breaker-probe-max", "10m")
	r.waitFor("held", 30*time.Second, "the budget spent and the rest held", func(st idempotency.Status) bool {
		return st.ByState[idempotency.Succeeded] == 10 && st.ByState[idempotency.WaitingBudget] == 100
	})
	backlogPath, _ := r.writeUsers("backlog", 3000)
	if out, code := r.enqueuer("campaign", "--file", backlogPath, "--stock-id", big.ID, "--campaign", "backlog"); code != 0 {
		t.Fatal(out)
	}
	if err := r.sb.TopUp(dry.ID, 100); err != nil {
		t.Fatal(err)
	}
	resumed := time.Now()
	out, code := r.enqueuer("stock", "resume", "--stock-id", dry.ID)
	if code != 0 || !strings.Contains(out, "100 held sends woken") {
		t.Fatalf("stock resume exited %d:\n%s", code, out)
	}
	r.waitFor("held", time.Minute, "the held sends done after the top-up", done)
	took := time.Since(resumed)
	st := r.waitFor("backlog", time.Second, "status", func(idempotency.Status) bool { return true })
	t.Logf("100 held sends done %s after resume, with %d of the backlog's 3000 still pending", took.Round(100*time.Millisecond), st.ByState[idempotency.Pending])
	// At 50 sends/s the backlog takes a minute; the woken sends must not
	// have waited behind it.
	if st.ByState[idempotency.Pending] < 1500 {
		t.Fatalf("the held sends finished only after %d of the backlog went out", 3000-st.ByState[idempotency.Pending])
	}
	r.checkOneCouponEach(dry.ID, heldUsers)
}
