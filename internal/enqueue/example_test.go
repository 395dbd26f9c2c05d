package enqueue_test

import (
	"context"
	"fmt"
	"log"
	"strings"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/campaign"
	"github.com/couponflow/dispatcher/internal/enqueue"
	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/redistest"
)

// exampleRedis is a private redis-server for the examples: in the
// programs, REDIS_ADDR.
var exampleRedis string

func TestMain(m *testing.M) { redistest.Main(m, &exampleRedis) }

// A campaign file queued as enqueuer campaign queues it: each row
// recorded and queued once, a row WeChat would refuse reported by its
// line and left out, and a second run of the same file a run of
// duplicates that queues nothing.
func ExampleProducer_Bulk() {
	ctx := context.Background()
	rdb := redis.NewClient(&redis.Options{Addr: exampleRedis})
	defer rdb.Close()
	producer := enqueue.New(asynq.NewClientFromRedisClient(rdb), idempotency.New(rdb))
	c := enqueue.Campaign{Name: "spring", MchID: "1900000109", AppID: "wxd678efh567hg6787",
		StockID: "9856000", Deadline: time.Now().Add(72 * time.Hour)}
	const file = "openid\noUpF8u0001\noUpF8u0002\noUpF8u 0003\noUpF8u0004\n"

	for run := 1; run <= 2; run++ {
		r, err := campaign.NewReader(strings.NewReader(file), campaign.Options{Format: "csv", Name: "users.csv"})
		if err != nil {
			log.Fatal(err)
		}
		var stats enqueue.Stats
		if err := producer.Bulk(ctx, r, c, &stats, enqueue.BulkOptions{}); err != nil {
			log.Fatal(err)
		}
		fmt.Printf("run %d: %d queued, %d already queued, %d invalid\n", run,
			stats.Enqueued.Load(), stats.Duplicates.Load(), stats.Invalid.Load())
		for _, row := range stats.InvalidRows() {
			fmt.Println("  ", row)
		}
	}
	// Output:
	// run 1: 3 queued, 0 already queued, 1 invalid
	//    line 4: openid "oUpF8u 0003": has a character outside letters, digits, _ and -
	// run 2: 0 queued, 3 already queued, 1 invalid
	//    line 4: openid "oUpF8u 0003": has a character outside letters, digits, _ and -
}
