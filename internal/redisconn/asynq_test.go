package redisconn

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/redistest"
)

// asynqRig is an asynq client and a running asynq server over one shared
// redis.UniversalClient, as cmd/enqueuer and cmd/worker build them.
type asynqRig struct {
	t      *testing.T
	client *asynq.Client
	srv    *asynq.Server
	log    *bufLogger

	mu   sync.Mutex
	seen map[string]int // task id -> deliveries
	kick chan struct{}
}

const smokeTask = "smoke:task"

func startAsynq(t *testing.T, rdb redis.UniversalClient, queues ...string) *asynqRig {
	t.Helper()
	r := &asynqRig{t: t, client: asynq.NewClientFromRedisClient(rdb), log: &bufLogger{},
		seen: map[string]int{}, kick: make(chan struct{}, 1)}
	weights := map[string]int{}
	for _, q := range queues {
		weights[q] = 1
	}
	r.srv = asynq.NewServerFromRedisClient(rdb, asynq.Config{
		Concurrency:       4,
		Queues:            weights,
		TaskCheckInterval: 50 * time.Millisecond,
		ShutdownTimeout:   5 * time.Second,
		Logger:            r.log,
		LogLevel:          asynq.WarnLevel,
	})
	mux := asynq.NewServeMux()
	mux.HandleFunc(smokeTask, func(ctx context.Context, task *asynq.Task) error {
		id, _ := asynq.GetTaskID(ctx)
		if want := "payload-" + id; string(task.Payload()) != want {
			return fmt.Errorf("task %s: payload %q, want %q", id, task.Payload(), want)
		}
		r.mu.Lock()
		r.seen[id]++
		r.mu.Unlock()
		select {
		case r.kick <- struct{}{}:
		default:
		}
		return nil
	})
	if err := r.srv.Start(mux); err != nil {
		t.Fatalf("asynq server: %v", err)
	}
	t.Cleanup(func() {
		r.srv.Shutdown()
		if t.Failed() {
			t.Logf("asynq log:\n%s", r.log)
		}
	})
	return r
}

// enqueue queues one task per id on queue, retrying for a while (through a
// failover an enqueue may fail; one that did succeed comes back as a
// conflict on its task id).
func (r *asynqRig) enqueue(queue string, ids ...string) {
	r.t.Helper()
	for _, id := range ids {
		task := asynq.NewTask(smokeTask, []byte("payload-"+id))
		deadline := time.Now().Add(15 * time.Second)
		for {
			_, err := r.client.Enqueue(task, asynq.Queue(queue), asynq.TaskID(id), asynq.MaxRetry(3))
			if err == nil || errors.Is(err, asynq.ErrTaskIDConflict) {
				break
			}
			if time.Now().After(deadline) {
				r.t.Fatalf("enqueue %s on %s: %v", id, queue, err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}

// waitProcessed waits until every id was handled at least once.
func (r *asynqRig) waitProcessed(timeout time.Duration, ids ...string) {
	r.t.Helper()
	deadline := time.After(timeout)
	for {
		r.mu.Lock()
		var missing []string
		for _, id := range ids {
			if r.seen[id] == 0 {
				missing = append(missing, id)
			}
		}
		r.mu.Unlock()
		if len(missing) == 0 {
			return
		}
		select {
		case <-r.kick:
		case <-time.After(100 * time.Millisecond):
		case <-deadline:
			sort.Strings(missing)
			r.t.Fatalf("after %v, %d of %d tasks not processed: %v", timeout, len(missing), len(ids), missing)
		}
	}
}

func taskIDs(prefix string, n int) []string {
	ids := make([]string, n)
	for i := range ids {
		ids[i] = fmt.Sprintf("%s-%03d", prefix, i)
	}
	return ids
}

// bufLogger keeps asynq's log for a failing test's output.
type bufLogger struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *bufLogger) add(level string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	fmt.Fprintf(&l.b, "%s %s %s\n", time.Now().Format("15:04:05.000"), level, fmt.Sprint(args...))
}
func (l *bufLogger) Debug(args ...any) { l.add("DEBUG", args...) }
func (l *bufLogger) Info(args ...any)  { l.add("INFO", args...) }
func (l *bufLogger) Warn(args ...any)  { l.add("WARN", args...) }
func (l *bufLogger) Error(args ...any) { l.add("ERROR", args...) }
func (l *bufLogger) Fatal(args ...any) { l.add("FATAL", args...) }
func (l *bufLogger) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func TestAsynqStandalone(t *testing.T) {
	t.Parallel()
	srv := redistest.Start(t)
	rdb := openURL(t, srv.Addr)
	r := startAsynq(t, rdb, "coupons")
	ids := taskIDs("standalone", 20)
	r.enqueue("coupons", ids...)
	r.waitProcessed(15*time.Second, ids...)
}

// openURL parses raw and opens it, closing the client with the test.
func openURL(t *testing.T, raw string) redis.UniversalClient {
	t.Helper()
	spec, err := ParseURL(raw)
	if err != nil {
		t.Fatal(err)
	}
	c, err := OpenSpec(context.Background(), spec, 20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}
