package idempotency

import (
	"context"
	"testing"
	"time"
)

// A pause is read by every claim: no send of the campaign is claimed
// while it holds, but reconcile's final delivery is; resume lets them go.
func TestPauseStopsClaims(t *testing.T) {
	s, ctx := newStore(t), context.Background()
	for i := range 2 {
		if _, _, err := s.Register(ctx, send(i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.SetControl(ctx, "c1", Paused, Action{Who: "ops", Action: "pause", Sends: 2}); err != nil {
		t.Fatal(err)
	}
	c, err := s.TryClaim(ctx, send(0), "w1", time.Minute)
	if err != nil || !c.Paused || c.Acquired || c.Record.State != Pending {
		t.Fatalf("claim while paused: %+v %v", c, err)
	}
	// The user is not left locked by the refused claim.
	other := send(0)
	other.OutRequestNo = "r-other"
	if c, _ := s.TryClaim(ctx, other, "w2", time.Minute); c.Busy {
		t.Fatal("a paused claim left its user locked")
	}
	settle := send(1)
	settle.Settle = true
	if c, err := s.TryClaim(ctx, settle, "w1", time.Minute); err != nil || !c.Acquired {
		t.Fatalf("reconcile's claim while paused: %+v %v", c, err)
	}
	if err := s.SetControl(ctx, "c1", Running, Action{Who: "ops", Action: "resume"}); err != nil {
		t.Fatal(err)
	}
	if c, err := s.TryClaim(ctx, send(0), "w1", time.Minute); err != nil || !c.Acquired {
		t.Fatalf("after resume: %+v %v", c, err)
	}
	trail, err := s.Audit(ctx, "c1")
	if err != nil || len(trail) != 2 || trail[0].Action != "pause" || trail[0].Who != "ops" || trail[0].Sends != 2 || trail[1].Action != "resume" {
		t.Fatalf("audit %+v %v", trail, err)
	}
	if c, _ := s.Campaign(ctx, "c1"); c.Control != Running {
		t.Fatalf("control %q after resume", c.Control)
	}
}

// Cancel: a send never called is cancelled, one that may have been issued
// ends unknown, one in flight is left to record what it is, and a claim
// after the cancel stops whatever the sweep missed.
func TestCancelSettlesWhatWaits(t *testing.T) {
	s, ctx := newStore(t), context.Background()
	for i := range 5 {
		sd := send(i)
		sd.Task = []byte("coupon:send\n{}")
		if _, _, err := s.Register(ctx, sd); err != nil {
			t.Fatal(err)
		}
	}
	// r1 ambiguous (maybe issued), r2 in flight, r3 succeeded.
	for i, res := range map[int]Result{1: {State: Retrying, MaybeIssued: true, Code: "SYSTEM_ERROR"}, 3: {State: Succeeded, CouponID: "c3"}} {
		if _, err := s.TryClaim(ctx, send(i), "w", time.Minute); err != nil {
			t.Fatal(err)
		}
		if err := s.Finish(ctx, send(i), "w", res); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.TryClaim(ctx, send(2), "w2", time.Minute); err != nil {
		t.Fatal(err)
	}
	if err := s.SetControl(ctx, "c1", CancelledByUser, Action{Who: "ops", Action: "cancel"}); err != nil {
		t.Fatal(err)
	}
	n, err := s.CancelSends(ctx, "c1")
	if err != nil {
		t.Fatal(err)
	}
	if n.Cancelled != 2 || len(n.Unknown) != 1 || n.Unknown[0].OutRequestNo != "r1" || n.InFlight != 1 || n.Stopped != 1 {
		t.Fatalf("cancel: %+v", n)
	}
	wantCounts(t, s, map[State]int64{Cancelled: 2, Unknown: 1, InFlight: 1, Succeeded: 1})
	// The call in flight ends in a rate wait: its next claim cancels it.
	if err := s.Finish(ctx, send(2), "w2", Result{State: WaitingRate, Code: "FREQUENCY_LIMIT_EXCEED"}); err != nil {
		t.Fatal(err)
	}
	c, err := s.TryClaim(ctx, send(2), "w3", time.Minute)
	if err != nil || !c.Cancelled || c.Record.State != Cancelled || c.Record.Code != "CANCELLED" {
		t.Fatalf("claim after cancel: %+v %v", c, err)
	}
	// An unknown send is not resent by a plain delivery, but reconcile may.
	if c, _ := s.TryClaim(ctx, send(1), "w3", time.Minute); !c.Cancelled || c.Record.State != Unknown {
		t.Fatalf("unknown send claimed in a cancelled campaign: %+v", c)
	}
	settle := send(1)
	settle.Settle = true
	if c, _ := s.TryClaim(ctx, settle, "w3", time.Minute); !c.Acquired {
		t.Fatalf("reconcile could not claim: %+v", c)
	}
	st := wantCounts(t, s, map[State]int64{Cancelled: 3, InFlight: 1, Succeeded: 1})
	if st.Done() {
		t.Fatal("done with a send in flight")
	}
}

// retry puts a failed send back to pending with its kept task; a send
// that moved on meanwhile is left alone.
func TestRequeueFailed(t *testing.T) {
	s, ctx := newStore(t), context.Background()
	sd := send(1)
	sd.Task = []byte("coupon:send\n{}")
	if _, _, err := s.Register(ctx, sd); err != nil {
		t.Fatal(err)
	}
	if _, err := s.TryClaim(ctx, sd, "w", time.Minute); err != nil {
		t.Fatal(err)
	}
	if err := s.Finish(ctx, sd, "w", Result{State: Failed, Code: "NOT_ENOUGH", Answered: true}); err != nil {
		t.Fatal(err)
	}
	rec, _ := s.Get(ctx, sd)
	if len(rec.Task) == 0 {
		t.Fatal("a failed send dropped its task")
	}
	st := wantCounts(t, s, map[State]int64{Failed: 1})
	if st.FailedByCode["NOT_ENOUGH"] != 1 {
		t.Fatalf("by code %v", st.FailedByCode)
	}
	ok, err := s.Requeue(ctx, rec, Failed)
	if err != nil || !ok {
		t.Fatalf("requeue: %v %v", ok, err)
	}
	st = wantCounts(t, s, map[State]int64{Pending: 1})
	if st.FailedByCode["NOT_ENOUGH"] != 0 {
		t.Fatalf("by code after requeue %v", st.FailedByCode)
	}
	if ok, err := s.Requeue(ctx, rec, Failed); ok || err != nil {
		t.Fatalf("second requeue: %v %v", ok, err)
	}
}

func TestFinalCode(t *testing.T) {
	for _, c := range []struct {
		code, msg string
		final     bool
	}{
		{"PARAM_ERROR", "批次号必填", true},
		{"INVALID_ARGUMENT", "", true},
		{"APPID_MCHID_NOT_MATCH", "", true},
		{"INVALID_REQUEST", "out_request_no r1 已使用: it was already used with different parameters", true},
		{"INVALID_REQUEST", "openid与appid不匹配", true},
		{"INVALID_REQUEST", "活动已结束或未激活", false},
		{"NOT_ENOUGH", "批次预算不足", false},
		{"REQUEST_BLOCKED", "用户被限领拦截", false},
		{"USER_ACCOUNT_ABNORMAL", "用户非法", false},
		{"USER_MONTHLY_LIMIT", "INVALID_REQUEST 暂时无法领取", false},
		{"CANCELLED", "", false},
	} {
		if final, why := FinalCode(c.code, c.msg); final != c.final || (final && why == "") {
			t.Errorf("%s %q: final %v (%q), want %v", c.code, c.msg, final, why, c.final)
		}
	}
}
