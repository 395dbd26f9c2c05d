package ratelimit_test

import (
	"context"
	"fmt"
	"log"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/ratelimit"
	"github.com/couponflow/dispatcher/internal/redistest"
)

// exampleRedis is a private redis-server for the examples: in the
// programs, REDIS_ADDR.
var exampleRedis string

func TestMain(m *testing.M) { redistest.Main(m, &exampleRedis) }

// The workers' --rate-limits: WeChat Pay's published limits, with the
// endpoints named replaced.
func ExampleParseLimits() {
	limits, err := ratelimit.ParseLimits("favor_send=200/s")
	if err != nil {
		log.Fatal(err)
	}
	for _, ep := range []ratelimit.Endpoint{ratelimit.SendCoupon, ratelimit.SendMultiuse, ratelimit.ListCoupons} {
		fmt.Println(ep, limits[ep])
	}
	_, err = ratelimit.ParseLimits("favor_send=200")
	fmt.Println(err)
	// Output:
	// favor_send 200/s
	// multiuse_send 1000/m
	// favor_list 500/s
	// rate limit "favor_send=200": want a positive number per s or m, like 500/s
}

// Two workers share one limit per merchant and endpoint. When WeChat
// answers one of them 429, the shared rate drops for both, and the fleet
// then measures what WeChat accepts (see aimd.lua).
func ExampleLimiter_Throttled() {
	ctx := context.Background()
	rdb := redis.NewClient(&redis.Options{Addr: exampleRedis})
	defer rdb.Close()
	limits := map[ratelimit.Endpoint]ratelimit.Limit{ratelimit.SendCoupon: {N: 400, Per: time.Second}}
	a := ratelimit.New(rdb, ratelimit.WithLimits(limits))
	b := ratelimit.New(rdb, ratelimit.WithLimits(limits))
	const mch = "1900000109"

	// A slot before each call, waiting for it up to a second.
	if _, err := a.Wait(ctx, mch, ratelimit.SendCoupon, time.Second); err != nil {
		log.Fatal(err)
	}
	rate, lowered, err := a.Throttled(ctx, mch, ratelimit.SendCoupon) // WeChat said 429
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("a: rate %.0f/s, lowered %v\n", rate, lowered)
	fleet, err := b.Fleet(ctx, mch, ratelimit.SendCoupon)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("b: rate %.0f/s of a configured %.0f/s, measuring %v\n", fleet.Rate, fleet.Limit, fleet.Measuring)
	// Output:
	// a: rate 100/s, lowered true
	// b: rate 100/s of a configured 400/s, measuring true
}
