package idempotency_test

import (
	"context"
	"fmt"
	"log"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/redistest"
)

// exampleRedis is a private redis-server for the examples: in the
// programs, REDIS_ADDR.
var exampleRedis string

func TestMain(m *testing.M) { redistest.Main(m, &exampleRedis) }

// Two deliveries of one send (asynq redelivered it, or two workers hold
// copies): the first claims it and calls WeChat, the second is told the
// send is busy and calls nothing. Once the first records the coupon, any
// later delivery finds the send done, with its coupon.
func ExampleStore_TryClaim() {
	ctx := context.Background()
	rdb := redis.NewClient(&redis.Options{Addr: exampleRedis})
	defer rdb.Close()
	store := idempotency.New(rdb)
	send := idempotency.Send{MchID: "1900000109", OutRequestNo: "1900000109-0001", Campaign: "spring",
		OpenID: "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o", StockID: "9856000"}

	first, err := store.TryClaim(ctx, send, "worker-a", time.Minute)
	if err != nil {
		log.Fatal(err)
	}
	second, err := store.TryClaim(ctx, send, "worker-b", time.Minute)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("worker-a claimed: %v; worker-b claimed: %v, busy: %v\n", first.Acquired, second.Acquired, second.Busy)

	// worker-a's call returned a coupon.
	if err := store.Finish(ctx, send, "worker-a", idempotency.Result{State: idempotency.Succeeded, CouponID: "10000000001", Answered: true}); err != nil {
		log.Fatal(err)
	}
	late, err := store.TryClaim(ctx, send, "worker-b", time.Minute)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("worker-b, later: claimed: %v; the send is %s, coupon %s\n", late.Acquired, late.Record.State, late.Record.CouponID)
	// Output:
	// worker-a claimed: true; worker-b claimed: false, busy: true
	// worker-b, later: claimed: false; the send is succeeded, coupon 10000000001
}
