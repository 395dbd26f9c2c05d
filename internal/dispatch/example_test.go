package dispatch_test

import (
	"context"
	"fmt"
	"log"
	"os"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/dispatch"
	"github.com/couponflow/dispatcher/internal/enqueue"
	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/redistest"
	"github.com/couponflow/dispatcher/internal/sandbox"
	"github.com/couponflow/dispatcher/internal/sandbox/sandboxtest"
	"github.com/couponflow/dispatcher/internal/tasks"
	"github.com/couponflow/dispatcher/internal/wechat"
)

// For the examples, which have no testing.T: one private redis-server
// (REDIS_ADDR in the programs) and one local WeChat Pay sandbox (the
// WECHATPAY_* variables).
var (
	exampleRedis   string
	exampleSandbox *sandbox.Server
)

func TestMain(m *testing.M) {
	os.Exit(func() int {
		sb, stopSandbox, err := sandboxtest.ForMain()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer stopSandbox()
		exampleSandbox = sb
		addr, stopRedis, err := redistest.ForMain()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer stopRedis()
		exampleRedis = addr
		return m.Run()
	}())
}

// The path of one coupon. A producer (cmd/enqueuer) records the send and
// queues its task; a worker (cmd/worker: an asynq server running the
// Handler) claims it, calls WeChat and records the coupon. Queuing the same
// send again changes nothing: its record says it succeeded.
func ExampleHandler() {
	ctx := context.Background()
	env := exampleSandbox.Env()
	rdb := redis.NewClient(&redis.Options{Addr: exampleRedis})
	defer rdb.Close()
	store := idempotency.New(rdb)

	// The producer.
	producer := enqueue.New(asynq.NewClientFromRedisClient(rdb), store)
	send := tasks.SendCoupon{
		Common: tasks.Common{
			V: tasks.Version, Campaign: "example", MchID: env[wechat.EnvMchID],
			OpenID: "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o", StockID: env["SANDBOX_STOCK_ID"],
			AppID: env[wechat.EnvAppID], Deadline: time.Now().Add(72 * time.Hour),
		},
		StockCreatorMchID: env[wechat.EnvMchID],
	}
	send.OutRequestNo = tasks.DeriveOutRequestNo(send.MchID, send.Campaign, send.OpenID)
	res, err := producer.Enqueue(ctx, send)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("queued:", res.Outcome)

	// The worker.
	wx, err := wechat.New(ctx, wechat.Config{
		MchID: env[wechat.EnvMchID], MchSerial: env[wechat.EnvMchSerial], PrivateKeyPath: env[wechat.EnvPrivateKey],
		PublicKeyPath: env[wechat.EnvPublicKey], PublicKeyID: env[wechat.EnvPublicKeyID],
		AppID: env[wechat.EnvAppID], BaseURL: env[wechat.EnvBaseURL],
	})
	if err != nil {
		log.Fatal(err)
	}
	h := dispatch.New(dispatch.WeChat(wx), store, dispatch.WithMerchant(send.MchID))
	srv := asynq.NewServerFromRedisClient(rdb, asynq.Config{
		Concurrency: 4, Queues: map[string]int{tasks.DefaultQueue: 1},
		RetryDelayFunc: h.RetryDelay, IsFailure: dispatch.IsFailure, ShutdownTimeout: h.ShutdownTimeout(),
		LogLevel: asynq.ErrorLevel,
	})
	mux := asynq.NewServeMux()
	mux.Handle(tasks.TypeSendCoupon, h)
	if err := srv.Start(mux); err != nil {
		log.Fatal(err)
	}
	defer srv.Shutdown()

	// The record.
	key := idempotency.Send{MchID: send.MchID, OutRequestNo: send.OutRequestNo, Campaign: send.Campaign}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		rec, err := store.Get(ctx, key)
		if err != nil {
			log.Fatal(err)
		}
		if rec.State == idempotency.Succeeded {
			fmt.Println("record:", rec.State, "with a coupon id:", rec.CouponID != "")
			break
		}
		if time.Now().After(deadline) {
			log.Fatalf("the send is %s after 30 s", rec.State)
		}
	}
	res, err = producer.Enqueue(ctx, send)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("queued again:", res.Outcome, res.State)
	// Output:
	// queued: enqueued
	// record: succeeded with a coupon id: true
	// queued again: duplicate succeeded
}
