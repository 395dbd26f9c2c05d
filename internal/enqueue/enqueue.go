// Package enqueue is the producer's side: it records a send in the
// idempotency store and queues its task, so that the same send offered
// twice, even after it has completed and asynq has forgotten it, is
// reported as a duplicate and never queued again.
package enqueue

import (
	"context"
	"errors"
	"fmt"
	"strings"
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
	published sync.Map // queues this producer has added to asynq's set of queues
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

// New returns a producer that records in store and queues into the
// store's Redis, writing asynq's keys as client would; client itself
// queues only tasks scheduled for later (WithProcessAt). client must be
// over the store's Redis, as every program opens both from one address.
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
	// Err, from EnqueueBatch, is a send refused before anything was
	// written: an *InvalidError. The other sends of the batch go on.
	Err error
}

// InvalidError is a send refused before anything was written.
type InvalidError struct{ Err error }

func (e *InvalidError) Error() string { return e.Err.Error() }
func (e *InvalidError) Unwrap() error { return e.Err }

// Enqueue validates args, records the send and queues it. An error other
// than *InvalidError means Redis failed; running the same Enqueue again
// is safe and completes the work.
func (p *Producer) Enqueue(ctx context.Context, args tasks.Args) (Result, error) {
	res, err := p.EnqueueBatch(ctx, []tasks.Args{args})
	if err != nil {
		return Result{}, err
	}
	if res[0].Err != nil {
		return Result{}, res[0].Err
	}
	return res[0], nil
}

// EnqueueBatch is Enqueue for many sends, in two round trips whatever
// their number (per campaign, and per queue in one pipeline): one that
// records them all, one that queues the new ones. res[i] is the result
// of batch[i]; a send refused as invalid has its *InvalidError in
// res[i].Err and nothing written. An error means Redis failed: none of
// the batch can be counted as done, and running the same batch again
// completes the work.
func (p *Producer) EnqueueBatch(ctx context.Context, batch []tasks.Args) ([]Result, error) {
	res := make([]Result, len(batch))
	retry := tasks.MaxRetry
	if p.maxRetry > 0 {
		retry = p.maxRetry
	}
	wire := make([]wireTask, len(batch))
	sends := make([]idempotency.Send, 0, len(batch))
	at := make([]int, 0, len(batch)) // batch index of each send
	multi := false
	for i, args := range batch {
		key := args.Key()
		queue := tasks.ShardQueue(p.queue, p.shards, key.OutRequestNo)
		task, err := tasks.NewTask(args, asynq.Queue(queue), asynq.MaxRetry(retry))
		if err == nil && strings.TrimSpace(queue) == "" {
			err = errors.New("the queue name is empty") // as asynq's client refuses it
		}
		if err != nil {
			res[i].Err = &InvalidError{Err: err}
			continue
		}
		res[i].TaskID = key.TaskID()
		wire[i] = wireTask{typ: task.Type(), payload: task.Payload(), id: res[i].TaskID, queue: queue, retry: retry, timeout: tasks.Timeout}
		b := args.Base()
		if len(sends) > 0 && sends[0].Campaign != b.Campaign {
			multi = true
		}
		if err := p.saveCampaign(ctx, b); err != nil {
			return nil, err
		}
		sends = append(sends, idempotency.Send{
			MchID: b.MchID, OutRequestNo: b.OutRequestNo, Campaign: b.Campaign, OpenID: b.OpenID, StockID: b.StockID,
			Task: tasks.KeepSlim(args, task), Queue: queue,
		})
		at = append(at, i)
	}
	if len(sends) == 0 {
		return res, nil
	}
	regs, err := p.register(ctx, sends, multi)
	if err != nil {
		return nil, err
	}
	var toQueue []wireTask
	var queuedAt []int
	for j, reg := range regs {
		i := at[j]
		res[i].State = reg.State
		if !reg.Created {
			res[i].Outcome = Duplicate
			if reg.State.Terminal() {
				// asynq has forgotten a finished task's id; the record has not.
				continue
			}
		}
		// A send registered but not yet queued is what an interrupted
		// earlier run leaves behind; queueing it now completes that run.
		toQueue = append(toQueue, wire[i])
		queuedAt = append(queuedAt, i)
	}
	if len(toQueue) == 0 {
		return res, nil
	}
	if p.processAt.After(time.Now()) {
		if err := p.schedule(ctx, batch, queuedAt, res); err != nil {
			return nil, err
		}
		return res, nil
	}
	queued, err := p.queueTasks(ctx, toQueue)
	if err != nil {
		return nil, err
	}
	for k, ok := range queued {
		i := queuedAt[k]
		if ok {
			// A send recorded by an interrupted run is queued by this one.
			res[i].Outcome, res[i].State = Enqueued, ""
		} else {
			res[i].Outcome = Duplicate
		}
	}
	return res, nil
}

// register records sends, one batch per campaign.
func (p *Producer) register(ctx context.Context, sends []idempotency.Send, multi bool) ([]idempotency.Registered, error) {
	if !multi {
		return p.store.RegisterBatch(ctx, sends)
	}
	regs := make([]idempotency.Registered, len(sends))
	byCampaign := map[string][]int{}
	var order []string
	for j, s := range sends {
		if _, ok := byCampaign[s.Campaign]; !ok {
			order = append(order, s.Campaign)
		}
		byCampaign[s.Campaign] = append(byCampaign[s.Campaign], j)
	}
	for _, c := range order {
		idx := byCampaign[c]
		group := make([]idempotency.Send, len(idx))
		for k, j := range idx {
			group[k] = sends[j]
		}
		got, err := p.store.RegisterBatch(ctx, group)
		if err != nil {
			return nil, err
		}
		for k, j := range idx {
			regs[j] = got[k]
		}
	}
	return regs, nil
}

// saveCampaign makes the campaign known to the store, which lists
// campaigns for status, the monitor and the sweeper.
func (p *Producer) saveCampaign(ctx context.Context, b tasks.Common) error {
	if _, ok := p.saved.Load(b.Campaign); ok {
		return nil
	}
	if _, err := p.store.SaveCampaign(ctx, idempotency.Campaign{Name: b.Campaign, MchID: b.MchID, Deadline: b.Deadline}); err != nil {
		return err
	}
	p.saved.Store(b.Campaign, true)
	return nil
}

// schedule queues the sends at queuedAt for p.processAt through asynq's
// client, one by one: a campaign scheduled ahead is not in a hurry.
func (p *Producer) schedule(ctx context.Context, batch []tasks.Args, queuedAt []int, res []Result) error {
	for _, i := range queuedAt {
		key := batch[i].Key()
		opts := []asynq.Option{asynq.Queue(tasks.ShardQueue(p.queue, p.shards, key.OutRequestNo)), asynq.ProcessAt(p.processAt)}
		if p.maxRetry > 0 {
			opts = append(opts, asynq.MaxRetry(p.maxRetry))
		}
		task, err := tasks.NewTask(batch[i], opts...)
		if err != nil {
			return err // validated above
		}
		_, err = p.client.EnqueueContext(ctx, task)
		switch {
		case errors.Is(err, asynq.ErrTaskIDConflict):
			res[i].Outcome = Duplicate
		case err != nil:
			return fmt.Errorf("enqueueing %s: %w", key.OutRequestNo, err)
		default:
			res[i].Outcome, res[i].State = Enqueued, ""
		}
	}
	return nil
}
