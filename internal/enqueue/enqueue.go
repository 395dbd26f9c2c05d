// Package enqueue is the producer's side: it records a send in the
// idempotency store and queues its task, so that the same send offered
// twice, even after it has completed and asynq has forgotten it, is
// reported as a duplicate and never queued again.
package enqueue

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/hibiken/asynq"

	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/tasks"
)

// Producer enqueues sends.
type Producer struct {
	client   *asynq.Client
	store    *idempotency.Store
	queue    string
	shards   int
	maxRetry int
	// processAt schedules every task for then (zero: at once).
	processAt time.Time
	saved     sync.Map // campaigns this producer has made known to the store
}

// Option configures a Producer.
type Option func(*Producer)

// WithQueue sends tasks to queue instead of tasks.DefaultQueue.
func WithQueue(q string) Option { return func(p *Producer) { p.queue = q } }

// WithQueueShards spreads sends over n queues (see tasks.ShardQueue);
// workers must then listen on all of them.
func WithQueueShards(n int) Option { return func(p *Producer) { p.shards = n } }

// WithMaxRetry bounds the ambiguous outcomes a send may meet before it
// ends unknown (default tasks.MaxRetry); waits on a rate limit or a budget
// do not count.
func WithMaxRetry(n int) Option { return func(p *Producer) { p.maxRetry = n } }

// WithProcessAt has the tasks processed from t (asynq's ProcessAt) rather
// than at once; a t already past means at once.
func WithProcessAt(t time.Time) Option { return func(p *Producer) { p.processAt = t } }

// New returns a producer that queues through client and records in store.
func New(client *asynq.Client, store *idempotency.Store, opts ...Option) *Producer {
	p := &Producer{client: client, store: store, queue: tasks.DefaultQueue}
	for _, o := range opts {
		o(p)
	}
	return p
}

// Outcome of one Enqueue.
type Outcome int

const (
	// Enqueued: the task is queued now.
	Enqueued Outcome = iota
	// Duplicate: the send was queued or done already; nothing changed.
	Duplicate
)

func (o Outcome) String() string {
	if o == Duplicate {
		return "duplicate"
	}
	return "enqueued"
}

// Result says what Enqueue did.
type Result struct {
	Outcome Outcome
	TaskID  string
	// State is the state the send was already in, for a duplicate.
	State idempotency.State
}

// InvalidError is a send refused before anything was written.
type InvalidError struct{ Err error }

func (e *InvalidError) Error() string { return e.Err.Error() }
func (e *InvalidError) Unwrap() error { return e.Err }

// Enqueue validates args, records the send and queues it. An error other
// than *InvalidError means Redis failed; running the same Enqueue again
// is safe and completes the work.
func (p *Producer) Enqueue(ctx context.Context, args tasks.Args) (Result, error) {
	opts := []asynq.Option{asynq.Queue(tasks.ShardQueue(p.queue, p.shards, args.Key().OutRequestNo))}
	if p.maxRetry > 0 {
		opts = append(opts, asynq.MaxRetry(p.maxRetry))
	}
	if !p.processAt.IsZero() {
		opts = append(opts, asynq.ProcessAt(p.processAt))
	}
	task, err := tasks.NewTask(args, opts...)
	if err != nil {
		return Result{}, &InvalidError{Err: err}
	}
	b := args.Base()
	if _, ok := p.saved.Load(b.Campaign); !ok {
		// The store lists campaigns for status, the monitor and the sweeper.
		if _, err := p.store.SaveCampaign(ctx, idempotency.Campaign{Name: b.Campaign, MchID: b.MchID, Deadline: b.Deadline}); err != nil {
			return Result{}, err
		}
		p.saved.Store(b.Campaign, true)
	}
	res := Result{TaskID: args.Key().TaskID()}
	queue := tasks.ShardQueue(p.queue, p.shards, args.Key().OutRequestNo)
	created, state, err := p.store.Register(ctx, idempotency.Send{
		MchID: b.MchID, OutRequestNo: b.OutRequestNo, Campaign: b.Campaign, OpenID: b.OpenID, StockID: b.StockID,
		Task: tasks.Keep(task), Queue: queue,
	})
	if err != nil {
		return Result{}, err
	}
	if !created && state.Terminal() {
		// asynq has forgotten a finished task's id; the record has not.
		return Result{Outcome: Duplicate, TaskID: res.TaskID, State: state}, nil
	}
	// A send registered but not yet queued is what an interrupted earlier
	// run leaves behind; queueing it now completes that run.
	_, err = p.client.EnqueueContext(ctx, task)
	switch {
	case errors.Is(err, asynq.ErrTaskIDConflict):
		return Result{Outcome: Duplicate, TaskID: res.TaskID, State: state}, nil
	case err != nil:
		return Result{}, fmt.Errorf("enqueueing %s: %w", b.OutRequestNo, err)
	}
	return res, nil
}
