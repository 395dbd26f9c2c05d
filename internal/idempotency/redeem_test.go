package idempotency

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"
)

// succeed registers, claims and records a success with coupon, as a worker does.
func succeed(t *testing.T, s *Store, snd Send, coupon string) {
	t.Helper()
	ctx := context.Background()
	if _, _, err := s.Register(ctx, snd); err != nil {
		t.Fatal(err)
	}
	if c, err := s.TryClaim(ctx, snd, "w1", time.Minute); err != nil || !c.Acquired {
		t.Fatalf("claim: %+v %v", c, err)
	}
	if err := s.Finish(ctx, snd, "w1", Result{State: Succeeded, CouponID: coupon, Answered: true}); err != nil {
		t.Fatal(err)
	}
}

func TestRedeemOncePerCoupon(t *testing.T) {
	s, ctx := newStore(t), context.Background()
	succeed(t, s, send(1), "cp1")
	succeed(t, s, send(2), "cp2")

	// The success wrote the coupon index: a notification finds its send.
	found, err := s.FindCoupon(ctx, "cp2", []string{"other", "c1"})
	if err != nil || found != (CouponSend{Campaign: "c1", MchID: "1900000001", OutRequestNo: "r2"}) {
		t.Fatalf("FindCoupon: %+v %v", found, err)
	}
	if _, err := s.FindCoupon(ctx, "cp-other", []string{"c1"}); !errors.Is(err, ErrNotOurs) {
		t.Fatalf("a coupon not ours: %v", err)
	}

	rec, _ := s.Get(ctx, send(2))
	used := rec.DoneAt.Add(90 * time.Minute)
	r := Redemption{CouponID: "cp2", NotificationID: "EV-1", ConsumeTime: used, ConsumeMchID: "1900000009",
		TransactionID: "4200000001", Amount: 100, Source: RedeemedByNotify}
	// Concurrent deliveries of the same notification and another
	// notification of the same coupon: recorded once.
	var wg sync.WaitGroup
	var mu sync.Mutex
	recorded := 0
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := r
			if i%2 == 1 {
				r.NotificationID = "EV-2"
			}
			out, err := s.Redeem(ctx, found.Send(), r)
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			defer mu.Unlock()
			if out.Recorded {
				recorded++
				if got := used.Sub(out.SentAt); got < 90*time.Minute-time.Millisecond || got > 90*time.Minute+time.Millisecond {
					t.Errorf("time to redemption %v, want 90m", got)
				}
			} else if !out.Duplicate {
				t.Errorf("neither recorded nor duplicate: %+v", out)
			}
		}()
	}
	wg.Wait()
	if recorded != 1 {
		t.Fatalf("recorded %d times, want once", recorded)
	}
	// A sync after the notification: a duplicate too.
	if out, err := s.Redeem(ctx, found.Send(), Redemption{CouponID: "cp2", ConsumeTime: used, Source: RedeemedBySync}); err != nil || !out.Duplicate {
		t.Fatalf("sync after the notification: %+v %v", out, err)
	}
	st := wantCounts(t, s, map[State]int64{Succeeded: 2})
	if st.Redeemed != 1 || st.RedeemedAmount != 100 || st.RedemptionRate() != 0.5 {
		t.Fatalf("status: redeemed %d amount %d rate %v", st.Redeemed, st.RedeemedAmount, st.RedemptionRate())
	}
	if d := st.MeanTimeToRedemption(); d < 90*time.Minute-time.Second || d > 90*time.Minute+time.Second {
		t.Fatalf("mean time to redemption %v", d)
	}
	rec, _ = s.Get(ctx, send(2))
	if !rec.UsedAt.Equal(used.Truncate(time.Millisecond)) || rec.UsedMchID != "1900000009" || rec.UsedTransactionID != "4200000001" ||
		rec.UsedAmount != 100 || rec.RedeemedAt.IsZero() {
		t.Fatalf("record: %+v", rec)
	}
	row := rec.ReportRowWithRedemption()
	if len(row) != len(ReportHeaderWithRedemptions) || len(rec.ReportRow()) != len(ReportHeader) || row[9] == "" || row[10] != "100" || row[11] != "1900000009" || row[12] != "4200000001" {
		t.Fatalf("report row %q for header %q", row, ReportHeaderWithRedemptions)
	}
	if strings.Join(ReportHeaderWithRedemptions[:9], ",") != "out_request_no,openid,state,coupon_id,error_code,error_message,attempts,first_attempt,last_attempt" {
		t.Fatalf("the first nine columns moved: %q", ReportHeader)
	}
	sum, err := s.Redemptions(ctx, "c1")
	if err != nil || sum.Redeemed != 1 || sum.Amount != 100 || sum.Quantile(0.5) < 89*time.Minute {
		t.Fatalf("summary %+v %v", sum, err)
	}

	// The record holds another coupon: not ours, nothing written.
	if _, err := s.Redeem(ctx, send(1), Redemption{CouponID: "cp2", ConsumeTime: used, Source: RedeemedByNotify}); !errors.Is(err, ErrNotOurs) {
		t.Fatalf("mismatched coupon: %v", err)
	}
	if _, err := s.Redeem(ctx, send(9), Redemption{CouponID: "cp9", ConsumeTime: used, Source: RedeemedByNotify}); !errors.Is(err, ErrNotOurs) {
		t.Fatalf("no record: %v", err)
	}
	if _, err := s.Redeem(ctx, send(1), Redemption{CouponID: "cp1", ConsumeTime: used, Source: "carrier pigeon"}); err == nil {
		t.Fatal("an unknown source was accepted")
	}

	// A sync finding what no notification brought is counted as such.
	if out, err := s.Redeem(ctx, send(1), Redemption{CouponID: "cp1", ConsumeTime: used, Amount: 100, Source: RedeemedBySync}); err != nil || !out.Recorded {
		t.Fatalf("sync: %+v %v", out, err)
	}
	if st, _ := s.Status(ctx, "c1"); st.Redeemed != 2 || st.RedeemedBySync != 1 || st.RedemptionRate() != 1 {
		t.Fatalf("after sync: %+v", st)
	}
}

func TestFirstNotificationAndIndex(t *testing.T) {
	s, ctx := newStore(t), context.Background()
	for i, want := range []bool{true, false, false} {
		if first, err := s.FirstNotification(ctx, "EV-9"); err != nil || first != want {
			t.Fatalf("#%d: %v %v", i, first, err)
		}
	}
	_ = s.CountRedeemStat(ctx, StatNotOurs)
	if m, err := s.RedeemStats(ctx); err != nil || m[StatNotOurs] != 1 {
		t.Fatalf("stats %v %v", m, err)
	}

	// A success recorded before the index existed is found once indexed.
	succeed(t, s, send(1), "cp1")
	s.rdb.Del(ctx, s.keys.Coupons("c1"))
	if _, err := s.FindCoupon(ctx, "cp1", []string{"c1"}); !errors.Is(err, ErrNotOurs) {
		t.Fatal(err)
	}
	if n, err := s.IndexCoupons(ctx, "c1"); err != nil || n != 1 {
		t.Fatalf("indexed %d %v", n, err)
	}
	if _, err := s.FindCoupon(ctx, "cp1", []string{"c1"}); err != nil {
		t.Fatal(err)
	}
}
