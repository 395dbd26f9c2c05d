// Package sweep finds sends that nothing will ever process again, and
// queues them again. The record says a send is not finished; asynq should
// hold its task, but may not: a task deleted by hand in asynqmon, a kill
// between the producer's record and its enqueue, an enqueue lost when a
// Redis master died before its replica had it. Such a campaign would hang
// at 399 of 400 for ever.
//
// Checking every record against asynq costs a round trip per send, so a
// campaign is swept only once it has stalled: not done, and no send of it
// has changed state for a while. Sweepers run in every worker; a lock in
// Redis lets one sweep at a time.
//
// A killed worker's tasks stay active in asynq until its recoverer, which
// runs once a minute and takes only tasks whose lease ran out 30 s before
// (neither is configurable): 60 to 120 s. The sweeper finds them sooner:
// a task active in asynq that no live server is working on, whose send's
// claim has run out, is copied into the woken queue. The copy and, later,
// asynq's own redelivery are both safe: the record lets one call through.
package sweep

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/tasks"
)

// Sweeper finds and queues again the sends of stalled campaigns whose
// task asynq no longer holds.
type Sweeper struct {
	rdb        redis.UniversalClient
	store      *idempotency.Store
	inspector  *asynq.Inspector
	client     *asynq.Client
	queues     []string
	log        *slog.Logger
	every      time.Duration
	stallAfter time.Duration
	now        func() time.Time
	// suspects: active tasks no live server listed, when first seen so.
	suspects map[string]time.Time
}

// Option configures a Sweeper.
type Option func(*Sweeper)

// WithInterval sets how often a sweeper looks for a dead worker's sends
// and for stalled campaigns (default 10s).
func WithInterval(d time.Duration) Option { return func(s *Sweeper) { s.every = d } }

// WithStallAfter sets how long a campaign that is not done must go without
// a change before it is swept, and how often it is swept again while it
// stays so (default 15m: longer than a budget breaker's longest probe
// interval, during which a held campaign is quiet but healthy).
func WithStallAfter(d time.Duration) Option { return func(s *Sweeper) { s.stallAfter = d } }

// WithLogger sets the logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option { return func(s *Sweeper) { s.log = l } }

// WithQueues names the queues the fleet serves, searched for the task of
// a record that does not name its queue.
func WithQueues(q ...string) Option { return func(s *Sweeper) { s.queues = q } }

// New returns a sweeper over the records in store and asynq's tasks in rdb.
func New(rdb redis.UniversalClient, store *idempotency.Store, opts ...Option) *Sweeper {
	s := &Sweeper{rdb: rdb, store: store, inspector: asynq.NewInspectorFromRedisClient(rdb),
		client: asynq.NewClientFromRedisClient(rdb), queues: []string{tasks.DefaultQueue}, log: slog.Default(),
		every: 10 * time.Second, stallAfter: 15 * time.Minute, now: time.Now}
	for _, o := range opts {
		o(s)
	}
	return s
}

// Its keys are the store's layout's (internal/keyspace).
func (s *Sweeper) lockKey() string  { return s.store.Keys().Lock("sweep") }
func (s *Sweeper) sweptKey() string { return s.store.Keys().Swept() }

// Run sweeps every interval until ctx ends.
func (s *Sweeper) Run(ctx context.Context) {
	t := time.NewTicker(s.every)
	defer t.Stop()
	for {
		if _, err := s.Once(ctx); err != nil && ctx.Err() == nil {
			s.log.Warn("sweeping for lost tasks failed; trying again at the next interval", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Result is what one sweep did.
type Result struct {
	Campaigns int // campaigns swept
	Checked   int // unfinished sends checked against asynq
	Requeued  int // sends whose task was lost, queued again
	// Unrecoverable: lost sends whose record keeps no task (registered by
	// an older version); re-running the producer's command queues them.
	Unrecoverable int
	// Abandoned: sends a dead worker held, copied into the woken queue.
	Abandoned int
}

// Once sweeps every stalled campaign, unless another sweeper holds the lock.
func (s *Sweeper) Once(ctx context.Context) (Result, error) {
	ok, err := s.rdb.SetNX(ctx, s.lockKey(), strconv.FormatInt(s.now().UnixMilli(), 10), s.every).Result()
	if err != nil || !ok {
		return Result{}, err
	}
	var total Result
	if total.Abandoned, err = s.abandoned(ctx); err != nil {
		return total, err
	}
	names, err := s.store.Campaigns(ctx)
	if err != nil {
		return total, err
	}
	for _, name := range names {
		st, err := s.store.Status(ctx, name)
		if err != nil {
			return total, err
		}
		now := s.now()
		if st.Total == 0 || st.Done() || now.Sub(st.ChangedAt) < s.stallAfter {
			continue
		}
		last, err := s.rdb.HGet(ctx, s.sweptKey(), name).Int64()
		if err != nil && !errors.Is(err, redis.Nil) {
			return total, err
		}
		if now.Sub(time.UnixMilli(last)) < s.stallAfter {
			continue // swept already while it stalled
		}
		res, err := s.Campaign(ctx, name)
		total.Campaigns++
		total.Checked += res.Checked
		total.Requeued += res.Requeued
		total.Unrecoverable += res.Unrecoverable
		if err != nil {
			return total, err
		}
		// From the sweep's end: a slow sweep does not shorten the wait
		// before the next one.
		if err := s.rdb.HSet(ctx, s.sweptKey(), name, s.now().UnixMilli()).Err(); err != nil {
			return total, err
		}
		s.log.Info("swept a stalled campaign", "campaign", name, "unchanged_for_s", int(now.Sub(st.ChangedAt).Seconds()),
			"checked", res.Checked, "requeued", res.Requeued, "unrecoverable", res.Unrecoverable)
	}
	return total, nil
}

// Campaign checks every unfinished send of a campaign against asynq and
// queues again those whose task is gone.
func (s *Sweeper) Campaign(ctx context.Context, name string) (Result, error) {
	var res Result
	err := s.store.Each(ctx, name, func(rec idempotency.Record) error {
		if !s.waiting(rec) {
			return nil
		}
		res.Checked++
		lost, err := s.lost(ctx, rec)
		if err != nil || !lost {
			return err
		}
		if len(rec.Task) == 0 {
			res.Unrecoverable++
			s.log.Warn("a send's task is lost and its record keeps no copy; re-run the producer's command to queue it",
				"campaign", name, "out_request_no", rec.OutRequestNo, "state", rec.State)
			return nil
		}
		queued, err := s.requeue(ctx, rec)
		if err != nil || !queued {
			return err
		}
		res.Requeued++
		s.log.Info("queued again a send whose task was lost", "campaign", name, "out_request_no", rec.OutRequestNo, "state", rec.State)
		return nil
	})
	return res, err
}

func (s *Sweeper) waiting(rec idempotency.Record) bool { return WaitsForTask(rec, s.now()) }

// WaitsForTask reports whether a send waits, at now, for a delivery that
// asynq must hold: a send whose task asynq no longer holds is lost (the
// monitor shows it as an orphan, the sweeper queues it again).
func WaitsForTask(rec idempotency.Record, now time.Time) bool {
	switch rec.State {
	case idempotency.Pending, idempotency.Retrying, idempotency.WaitingRate, idempotency.WaitingBudget:
		return true
	case idempotency.InFlight:
		// Under a live lease a delivery holds it; after, asynq must.
		return !rec.LeaseUntil.After(now)
	}
	return false
}

func (s *Sweeper) candidates(rec idempotency.Record) []string {
	qs := s.queues
	if rec.Queue != "" {
		qs = []string{rec.Queue}
	}
	out := make([]string, 0, 2*len(qs))
	for _, q := range qs {
		out = append(out, q, tasks.WokenQueue(q))
	}
	return out
}

// lost reports whether asynq holds no live task for the send. An archived
// task is as good as lost while the record waits: it is deleted here so
// that the send can be queued again under its id.
func (s *Sweeper) lost(ctx context.Context, rec idempotency.Record) (bool, error) {
	id := tasks.Key{MchID: rec.MchID, OutRequestNo: rec.OutRequestNo}.TaskID()
	for _, q := range s.candidates(rec) {
		info, err := s.inspector.GetTaskInfo(q, id)
		switch {
		case errors.Is(err, asynq.ErrQueueNotFound), errors.Is(err, asynq.ErrTaskNotFound):
			continue
		case err != nil:
			return false, fmt.Errorf("sweep: looking for task %s in %s: %w", id, q, err)
		}
		if info.State != asynq.TaskStateArchived && info.State != asynq.TaskStateCompleted {
			return false, nil
		}
		if err := s.inspector.DeleteTask(q, id); err != nil && !errors.Is(err, asynq.ErrTaskNotFound) {
			return false, fmt.Errorf("sweep: deleting the %s task %s in %s: %w", info.State, id, q, err)
		}
	}
	return true, nil
}

// requeue queues the kept task in the woken queue, so that the send does
// not wait behind the backlog it was lost from.
// It reports false when a copy is there already (queued by an earlier
// sweep, and not yet done).
func (s *Sweeper) requeue(ctx context.Context, rec idempotency.Record, opts ...asynq.Option) (bool, error) {
	q := rec.Queue
	if q == "" {
		q = s.queues[0]
	}
	target := tasks.WokenQueue(q)
	if base, ok := strings.CutSuffix(q, tasks.WokenQueue("")); ok {
		// Its id is still taken in the woken queue by the dead worker's
		// task: the copy goes to the queue it came from.
		target = base
	}
	t, err := tasks.Requeue(rec.Task, target, opts...)
	if err != nil {
		return false, fmt.Errorf("sweep: the kept task of %s: %w", rec.OutRequestNo, err)
	}
	_, err = s.client.EnqueueContext(ctx, t)
	if errors.Is(err, asynq.ErrTaskIDConflict) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("sweep: queueing %s again: %w", rec.OutRequestNo, err)
	}
	return true, nil
}

// heartbeat is how long a live asynq server may take to list a task it
// has taken: it writes its state every 5 s, with a TTL of 10 s.
const heartbeat = 10 * time.Second

// abandoned copies into the woken queue the sends that asynq holds as
// active for a worker that is gone: no live server lists the task, and
// the send's claim has run out, or it was never claimed (or was recorded
// and not finished) and the task has gone unlisted for a heartbeat.
func (s *Sweeper) abandoned(ctx context.Context) (int, error) {
	servers, err := s.inspector.Servers()
	if err != nil {
		return 0, fmt.Errorf("sweep: listing workers: %w", err)
	}
	live := map[string]bool{}
	for _, srv := range servers {
		for _, w := range srv.ActiveWorkers {
			live[w.Queue+"\x00"+w.TaskID] = true
		}
	}
	n := 0
	now := s.now()
	suspects := map[string]time.Time{}
	defer func() { s.suspects = suspects }()
	var queues []string
	for _, q := range s.queues {
		queues = append(queues, q, tasks.WokenQueue(q))
	}
	for _, q := range queues {
		active, err := s.inspector.ListActiveTasks(q, asynq.PageSize(1000))
		if errors.Is(err, asynq.ErrQueueNotFound) {
			continue
		}
		if err != nil {
			return n, fmt.Errorf("sweep: listing active tasks of %s: %w", q, err)
		}
		for _, info := range active {
			if live[q+"\x00"+info.ID] {
				continue
			}
			kept := tasks.Keep(asynq.NewTask(info.Type, info.Payload))
			args, err := tasks.Decode(asynq.NewTask(info.Type, info.Payload))
			if err != nil {
				continue
			}
			b := args.Base()
			rec, err := s.store.Get(ctx, idempotency.Send{MchID: b.MchID, OutRequestNo: b.OutRequestNo, Campaign: b.Campaign})
			if err != nil {
				return n, err
			}
			key := q + "\x00" + info.ID
			first, seen := s.suspects[key]
			if !seen || now.Sub(first) > heartbeat+3*s.every {
				// Unseen, or seen by this sweeper long ago (another held the
				// lock since): the task may have been listed meanwhile.
				first = now
			}
			switch {
			case rec.State.Stopped():
				continue // nothing left to do; asynq's recoverer tidies the task
			case rec.State == idempotency.InFlight:
				// A live delivery renews its claim.
				if rec.LeaseUntil.After(now) {
					continue
				}
			case now.Sub(first) < heartbeat:
				// Taken but not claimed: a live server that has just taken
				// it lists it within a heartbeat.
				suspects[key] = first
				continue
			}
			rec.Task, rec.Queue = kept, q
			queued, err := s.requeue(ctx, rec, asynq.MaxRetry(info.MaxRetry))
			if err != nil {
				return n, err
			}
			if !queued {
				continue
			}
			n++
			s.log.Info("queued again a send a dead worker held", "campaign", b.Campaign, "out_request_no", b.OutRequestNo,
				"queue", q, "claimed_until", rec.LeaseUntil)
		}
	}
	return n, nil
}
