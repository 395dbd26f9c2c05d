package enqueue

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/keyspace"
	"github.com/couponflow/dispatcher/internal/redistest"
	"github.com/couponflow/dispatcher/internal/tasks"
)

func coupon(campaign, orn string) tasks.SendCoupon {
	return tasks.SendCoupon{Common: tasks.Common{V: tasks.Version, Campaign: campaign, MchID: "1900000001", OpenID: "o_" + orn,
		StockID: "16000001", OutRequestNo: orn, AppID: "wx1", Deadline: time.Unix(1893456000, 0)},
		StockCreatorMchID: "1900000001", CouponValue: 100, CouponMinimum: int64(len(orn)) * 100}
}

// The producer's tasks are the very tasks asynq's Client.Enqueue writes:
// the same keys, the same fields, the same message bytes, the same
// pending lists in the same order and the same set of queues; asynq's
// Inspector reads them as pending with their payload, retry bound and
// timeout, and asynq's server runs them.
func TestQueuedAsAsynqWould(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		opts []Option
	}{
		{"defaults", nil},
		{"max retry", []Option{WithMaxRetry(3)}},
		{"queue and shards", []Option{WithQueue("spring"), WithQueueShards(4)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			ours, theirs := redistest.Start(t).Client(), redistest.Start(t).Client()
			p := New(asynq.NewClientFromRedisClient(ours), idempotency.New(ours), tc.opts...)
			var batch []tasks.Args
			for i := range 40 {
				batch = append(batch, coupon("c", fmt.Sprintf("r-%02d", i)))
			}
			res, err := p.EnqueueBatch(ctx, batch)
			if err != nil {
				t.Fatal(err)
			}
			// asynq's own client, with the options the producer gives.
			client := asynq.NewClientFromRedisClient(theirs)
			for i, args := range batch {
				if res[i].Outcome != Enqueued || res[i].Err != nil {
					t.Fatalf("send %d: %+v", i, res[i])
				}
				key := args.Key()
				opts := []asynq.Option{asynq.Queue(tasks.ShardQueue(p.queue, p.shards, key.OutRequestNo))}
				if p.maxRetry > 0 {
					opts = append(opts, asynq.MaxRetry(p.maxRetry))
				}
				task, err := tasks.NewTask(args, opts...)
				if err != nil {
					t.Fatal(err)
				}
				if _, err := client.EnqueueContext(ctx, task); err != nil {
					t.Fatal(err)
				}
			}
			asynqKeys := func(rdb redis.UniversalClient) []string {
				keys, err := rdb.Keys(ctx, "asynq:*").Result()
				if err != nil {
					t.Fatal(err)
				}
				return keys
			}
			if o, a := len(asynqKeys(ours)), len(asynqKeys(theirs)); o != a {
				t.Errorf("%d asynq keys in ours, %d in asynq's", o, a)
			}
			for _, key := range asynqKeys(theirs) {
				switch typ := theirs.Type(ctx, key).Val(); typ {
				case "set":
					o, a := ours.SMembers(ctx, key).Val(), theirs.SMembers(ctx, key).Val()
					slices.Sort(o)
					slices.Sort(a)
					if fmt.Sprint(o) != fmt.Sprint(a) {
						t.Errorf("%s: %v, asynq's %v", key, o, a)
					}
				case "list":
					o, a := ours.LRange(ctx, key, 0, -1).Val(), theirs.LRange(ctx, key, 0, -1).Val()
					if fmt.Sprint(o) != fmt.Sprint(a) {
						t.Errorf("%s: %v, asynq's %v", key, o, a)
					}
				case "hash":
					o, a := ours.HGetAll(ctx, key).Val(), theirs.HGetAll(ctx, key).Val()
					if len(o) != 3 || len(a) != 3 || o["msg"] != a["msg"] || o["state"] != a["state"] {
						t.Errorf("%s: %q, asynq's %q", key, o, a)
					}
					if since, err := strconv.ParseInt(o["pending_since"], 10, 64); err != nil || time.Since(time.Unix(0, since)) > time.Minute {
						t.Errorf("%s: pending_since %q", key, o["pending_since"])
					}
				default:
					t.Errorf("%s: a %s", key, typ)
				}
			}

			insp := asynq.NewInspectorFromRedisClient(ours)
			queues, err := insp.Queues()
			if err != nil {
				t.Fatal(err)
			}
			if want := tasks.ShardQueues(p.queue, p.shards); len(queues) != len(want) {
				t.Errorf("inspector lists queues %v, want %v", queues, want)
			}
			retry := tasks.MaxRetry
			if p.maxRetry > 0 {
				retry = p.maxRetry
			}
			for i, args := range batch {
				key := args.Key()
				q := tasks.ShardQueue(p.queue, p.shards, key.OutRequestNo)
				info, err := insp.GetTaskInfo(q, key.TaskID())
				if err != nil {
					t.Fatal(err)
				}
				want, _ := tasks.NewTask(args)
				if info.State != asynq.TaskStatePending || info.Type != tasks.TypeSendCoupon || string(info.Payload) != string(want.Payload()) ||
					info.MaxRetry != retry || info.Timeout != tasks.Timeout || !info.Deadline.IsZero() || info.Queue != q {
					t.Errorf("send %d: inspector reads %+v", i, info)
				}
			}

			// asynq's server runs every task, with its id, queue and bounds.
			var mu sync.Mutex
			ran := map[string]string{}
			srv := asynq.NewServerFromRedisClient(ours, asynq.Config{Concurrency: 4, Queues: weights(queues),
				Logger: quietLogger{}, LogLevel: asynq.ErrorLevel})
			mux := asynq.NewServeMux()
			mux.HandleFunc(tasks.TypeSendCoupon, func(ctx context.Context, task *asynq.Task) error {
				id, _ := asynq.GetTaskID(ctx)
				q, _ := asynq.GetQueueName(ctx)
				max, _ := asynq.GetMaxRetry(ctx)
				args, err := tasks.Decode(task)
				if err != nil {
					return err
				}
				mu.Lock()
				ran[id] = fmt.Sprintf("%s %s %d", q, args.Key().OutRequestNo, max)
				mu.Unlock()
				return nil
			})
			if err := srv.Start(mux); err != nil {
				t.Fatal(err)
			}
			defer srv.Shutdown()
			deadline := time.Now().Add(20 * time.Second)
			for {
				mu.Lock()
				n := len(ran)
				mu.Unlock()
				if n == len(batch) || time.Now().After(deadline) {
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
			mu.Lock()
			defer mu.Unlock()
			for _, args := range batch {
				key := args.Key()
				want := fmt.Sprintf("%s %s %d", tasks.ShardQueue(p.queue, p.shards, key.OutRequestNo), key.OutRequestNo, retry)
				if ran[key.TaskID()] != want {
					t.Errorf("%s ran as %q, want %q", key.TaskID(), ran[key.TaskID()], want)
				}
			}
		})
	}
}

func weights(queues []string) map[string]int {
	m := map[string]int{}
	for _, q := range queues {
		m[q] = 1
	}
	return m
}

type quietLogger struct{}

func (quietLogger) Debug(...any) {}
func (quietLogger) Info(...any)  {}
func (quietLogger) Warn(...any)  {}
func (quietLogger) Error(...any) {}
func (quietLogger) Fatal(...any) {}

// A task id already taken is never reported as new: not a second batch of
// the same sends, not a send named twice in one batch, and not a send whose
// task asynq holds though the record was never written.
func TestBatchDuplicatesAreNotNew(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	rdb := redistest.Start(t).Client()
	store := idempotency.New(rdb)
	p := New(asynq.NewClientFromRedisClient(rdb), store)

	// Queued by asynq's client alone, with no record.
	task, err := tasks.NewTask(coupon("c", "r-asynq-only"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := asynq.NewClientFromRedisClient(rdb).Enqueue(task); err != nil {
		t.Fatal(err)
	}
	bad := coupon("c", "r-bad")
	bad.AppID = ""
	batch := []tasks.Args{coupon("c", "r-1"), coupon("c", "r-2"), coupon("c", "r-1"), coupon("c", "r-asynq-only"), bad}
	res, err := p.EnqueueBatch(ctx, batch)
	if err != nil {
		t.Fatal(err)
	}
	want := []Outcome{Enqueued, Enqueued, Duplicate, Duplicate}
	for i, o := range want {
		if res[i].Outcome != o || res[i].Err != nil {
			t.Errorf("first batch, send %d: %+v, want %v", i, res[i], o)
		}
	}
	if _, ok := res[4].Err.(*InvalidError); !ok {
		t.Errorf("an invalid send: %+v, want an *InvalidError", res[4])
	}
	if n := rdb.LLen(ctx, keyspace.AsynqPending(tasks.DefaultQueue)).Val(); n != 3 {
		t.Errorf("%d tasks pending, want 3", n)
	}
	st, err := store.Status(ctx, "c")
	if err != nil {
		t.Fatal(err)
	}
	if st.Total != 3 || st.ByState[idempotency.Pending] != 3 {
		t.Errorf("recorded %d sends (%v), want 3 pending", st.Total, st.ByState)
	}

	// Again: nothing is new, and a finished send is not queued again.
	rec := idempotency.Send{MchID: "1900000001", OutRequestNo: "r-2", Campaign: "c", OpenID: "o_r-2"}
	if c, err := store.TryClaim(ctx, rec, "w", time.Minute); err != nil || !c.Acquired {
		t.Fatal(c, err)
	}
	if err := store.Finish(ctx, rec, "w", idempotency.Result{State: idempotency.Succeeded, CouponID: "cp-2"}); err != nil {
		t.Fatal(err)
	}
	if err := rdb.Del(ctx, keyspace.AsynqTask(tasks.DefaultQueue, coupon("c", "r-2").Key().TaskID())).Err(); err != nil {
		t.Fatal(err) // as asynq forgets a task that succeeded
	}
	res, err = p.EnqueueBatch(ctx, batch[:4])
	if err != nil {
		t.Fatal(err)
	}
	for i, r := range res {
		if r.Outcome != Duplicate {
			t.Errorf("second batch, send %d: %+v, want a duplicate", i, r)
		}
	}
	if res[1].State != idempotency.Succeeded {
		t.Errorf("the finished send reads %q", res[1].State)
	}
	if n := rdb.LLen(ctx, keyspace.AsynqPending(tasks.DefaultQueue)).Val(); n != 3 {
		t.Errorf("%d tasks pending after the second batch, want 3", n)
	}
}

// A campaign that starts later is recorded in a batch and scheduled
// through asynq's client: asynq holds its tasks as scheduled, and a
// second run queues none of them again.
func TestBatchScheduledForLater(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	rdb := redistest.Start(t).Client()
	start := time.Now().Add(time.Hour)
	p := New(asynq.NewClientFromRedisClient(rdb), idempotency.New(rdb), WithProcessAt(start))
	batch := []tasks.Args{coupon("c", "r-1"), coupon("c", "r-2")}
	for run, want := range []Outcome{Enqueued, Duplicate} {
		res, err := p.EnqueueBatch(ctx, batch)
		if err != nil {
			t.Fatal(err)
		}
		for i, r := range res {
			if r.Outcome != want || r.Err != nil {
				t.Errorf("run %d, send %d: %+v, want %v", run+1, i, r, want)
			}
		}
	}
	insp := asynq.NewInspectorFromRedisClient(rdb)
	for _, args := range batch {
		info, err := insp.GetTaskInfo(tasks.DefaultQueue, args.Key().TaskID())
		if err != nil {
			t.Fatal(err)
		}
		if info.State != asynq.TaskStateScheduled || info.NextProcessAt.Unix() != start.Unix() {
			t.Errorf("%s: %v at %s, want scheduled at %s", info.ID, info.State, info.NextProcessAt, start)
		}
	}
}
