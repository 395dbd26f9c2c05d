package dispatch_test

import (
	"strings"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/breaker"
	"github.com/couponflow/dispatcher/internal/dispatch"
	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/sandbox"
	"github.com/couponflow/dispatcher/internal/tasks"
)

// enqueueAs queues a send as given (w.send names the merchant itself as
// the stock's creator).
func (w *world) enqueueAs(a tasks.SendCoupon) tasks.SendCoupon {
	w.t.Helper()
	task, err := tasks.NewTask(a)
	if err != nil {
		w.t.Fatal(err)
	}
	if _, err := asynq.NewClientFromRedisClient(w.rdb).Enqueue(task); err != nil {
		w.t.Fatal(err)
	}
	return a
}

// Another merchant's stock that has not authorised this one (403
// REQUEST_BLOCKED 批次不支持跨商户发券) is the operator's to fix, like a
// paused stock: its sends are held, go out once the creator authorises,
// and fail only at the deadline, saying why.
func TestCrossMerchantStockIsHeldUntilAuthorised(t *testing.T) {
	t.Parallel()
	w := newWorld(t, 2, func(rdb *redis.Client) dispatch.Option {
		return dispatch.WithBreakers(breaker.New(rdb, breaker.WithProbeInterval(300*time.Millisecond, 300*time.Millisecond)))
	})
	const creator = "1900000777"
	stock := w.stock(sandbox.StockSpec{Budget: 10, CreatorMchID: creator})
	send := func(openid, orn string, deadline time.Time) tasks.SendCoupon {
		return w.enqueueAs(tasks.SendCoupon{Common: tasks.Common{V: tasks.Version, Campaign: "c", MchID: w.mchID, OpenID: openid,
			StockID: stock, OutRequestNo: orn, AppID: w.appID, Deadline: deadline}, StockCreatorMchID: creator})
	}
	held := send("o1", "r-cross-1", far())
	late := send("o2", "r-cross-2", time.Now().Add(2*time.Second))
	w.heldUntilMended(held, late, "REQUEST_BLOCKED", "批次不支持跨商户发券", func() error { return w.sb.AuthorizeMchID(stock, w.mchID) })
}

// An abnormal user (403 USER_ACCOUNT_ABNORMAL) fails that recipient for
// good, at once, under WeChat's code; the rest of the stock goes on.
func TestAbnormalUserFailsForGood(t *testing.T) {
	t.Parallel()
	w := newWorld(t, 2)
	if _, err := w.sb.RegisterUser(sandbox.User{OpenID: "o_abnormal", Abnormal: true}); err != nil {
		t.Fatal(err)
	}
	stock := w.stock(sandbox.StockSpec{Budget: 10})
	bad := w.send(stock, "o_abnormal", "r-abnormal-1", far())
	good := w.send(stock, "o_normal", "r-abnormal-2", far())
	rec := w.waitState(bad, idempotency.Failed, 10*time.Second)
	if rec.Code != "USER_ACCOUNT_ABNORMAL" || !strings.Contains(rec.Message, "用户非法") || rec.Attempts != 1 || rec.MaybeIssued {
		t.Fatalf("record %+v", rec)
	}
	w.waitState(good, idempotency.Succeeded, 10*time.Second)
	if n := w.sb.Ledger().Requests["403 USER_ACCOUNT_ABNORMAL"]; n != 1 {
		t.Fatalf("%d USER_ACCOUNT_ABNORMAL answers; a permanent failure is not retried", n)
	}
}
