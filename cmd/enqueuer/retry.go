package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"

	"github.com/hibiken/asynq"

	"github.com/couponflow/dispatcher/internal/idempotency"
	"github.com/couponflow/dispatcher/internal/tasks"
)

// cmdRetry queues a campaign's stopped sends again under their own
// out_request_no, from the tasks their records keep: it works whether
// asynq archived the task or dropped it, and nobody can get a second
// coupon, since WeChat answers a resend of an issued send with the coupon
// it issued.
func cmdRetry(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	c := newFlags("retry", "--campaign NAME [--state failed|unknown|cancelled] [--code C …] [--dry-run]", stderr)
	name := c.fs.String("campaign", "", "campaign name")
	state := c.fs.String("state", string(idempotency.Failed), "which sends: failed, unknown or cancelled")
	var codes []string
	c.fs.Func("code", "only sends whose last code is this one (repeatable, or comma-separated); default every code", func(v string) error {
		for _, s := range strings.Split(v, ",") {
			if s = strings.TrimSpace(s); s != "" {
				codes = append(codes, s)
			}
		}
		return nil
	})
	dryRun := c.fs.Bool("dry-run", false, "count what would be queued, queue nothing")
	force := c.fs.Bool("force", false, "queue sends whose code a resend cannot change (PARAM_ERROR for the same parameters…) too")
	queue := c.fs.String("queue", tasks.DefaultQueue, "queue for a send whose record names none")
	c.retryFlag()
	if err := c.parse(args); err != nil {
		return err
	}
	if err := need("--campaign", *name); err != nil {
		return err
	}
	from := idempotency.State(*state)
	if from != idempotency.Failed && from != idempotency.Unknown && from != idempotency.Cancelled {
		return &exitError{code: 2, err: fmt.Errorf("--state %q: want failed, unknown or cancelled", *state)}
	}
	rdb, err := c.redis(ctx, 4)
	if err != nil {
		return err
	}
	defer rdb.Close()
	store := c.store(rdb)
	camp, err := store.Campaign(ctx, *name)
	if err != nil {
		return err
	}
	if camp.Name == "" {
		return &exitError{code: 2, err: fmt.Errorf("no campaign %q in Redis", *name)}
	}
	if camp.Control == idempotency.CancelledByUser && !*dryRun {
		return &exitError{code: 2, err: fmt.Errorf("campaign %s is cancelled: its sends would end again without a call. Reopen it first: enqueuer campaign … --campaign %s --reopen, or enqueuer send … --reopen", *name, *name)}
	}

	var picked []idempotency.Record
	byCode := map[string]int{}
	final := map[string]string{} // code: why a resend cannot change it
	finalN := map[string]int{}
	err = store.Each(ctx, *name, func(r idempotency.Record) error {
		if r.State != from || (len(codes) > 0 && !contains(codes, r.Code)) {
			return nil
		}
		if ok, why := idempotency.FinalCode(r.Code, r.Message); ok && !*force {
			final[r.Code] = why
			finalN[r.Code]++
			return nil
		}
		picked = append(picked, r)
		byCode[r.Code]++
		return nil
	})
	if err != nil {
		return err
	}
	verb := "queueing"
	if *dryRun {
		verb = "would queue"
	}
	fmt.Fprintf(stdout, "campaign %s: %s %d %s sends again under their own out_request_no%s\n", *name, verb, len(picked), from, codeList(byCode))
	for _, code := range sortedKeys(final) {
		fmt.Fprintf(stdout, "  not queued: %d sends with %s: %s (--force queues them anyway)\n", finalN[code], code, final[code])
	}
	if *dryRun || len(picked) == 0 {
		return nil
	}

	// Its end, once these are done, is said again.
	if err := store.ClearDone(ctx, *name); err != nil {
		return err
	}
	insp := asynq.NewInspectorFromRedisClient(rdb)
	client := asynq.NewClientFromRedisClient(rdb)
	queued, moved := 0, 0
	for _, r := range picked {
		ok, err := store.Requeue(ctx, r, from)
		if err != nil {
			fmt.Fprintf(stderr, "enqueuer: %v\n", err)
			continue
		}
		if !ok {
			moved++ // it changed meanwhile
			continue
		}
		q := r.Queue
		if q == "" {
			q = *queue
		}
		t, err := tasks.Requeue(r.Task, q, asynq.MaxRetry(c.maxRetry))
		if err != nil {
			return fmt.Errorf("%s: its kept task: %w", r.OutRequestNo, err)
		}
		if err := enqueueOver(ctx, insp, client, t, q); err != nil {
			// The record waits as pending: the fleet's sweeper queues it
			// again if this enqueue is lost.
			return fmt.Errorf("%s is pending again, but queueing its task failed after %d were queued: %w; the fleet's sweeper queues such a send once the campaign stalls", r.OutRequestNo, queued, err)
		}
		queued++
	}
	if err := store.Note(ctx, *name, idempotency.Action{Who: operator(), Action: "retry", Sends: int64(queued),
		Note: fmt.Sprintf("state %s%s", from, codeList(byCode))}); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "campaign %s: %d sends queued again", *name, queued)
	if moved > 0 {
		fmt.Fprintf(stdout, "; %d had changed state meanwhile and were left", moved)
	}
	fmt.Fprintln(stdout)
	return nil
}

// enqueueOver queues t, taking the place of an archived or completed task
// that still holds its id; a task of that id that is queued or running is
// left to do the work.
func enqueueOver(ctx context.Context, insp *asynq.Inspector, client *asynq.Client, t *asynq.Task, queue string) error {
	_, err := client.EnqueueContext(ctx, t)
	if !errors.Is(err, asynq.ErrTaskIDConflict) {
		return err
	}
	id := taskIDOf(t)
	info, err := insp.GetTaskInfo(queue, id)
	if errors.Is(err, asynq.ErrTaskNotFound) {
		_, err = client.EnqueueContext(ctx, t)
		return err
	}
	if err != nil {
		return err
	}
	switch info.State {
	case asynq.TaskStateArchived, asynq.TaskStateCompleted:
		if err := insp.DeleteTask(queue, id); err != nil && !errors.Is(err, asynq.ErrTaskNotFound) {
			return err
		}
		_, err = client.EnqueueContext(ctx, t)
		return err
	}
	return nil // pending, scheduled, retry or active: it will claim the pending record
}

func taskIDOf(t *asynq.Task) string {
	args, err := tasks.Decode(t)
	if err != nil {
		return ""
	}
	return args.Key().TaskID()
}

func contains(list []string, v string) bool {
	for _, s := range list {
		if s == v {
			return true
		}
	}
	return false
}

func codeList(byCode map[string]int) string {
	if len(byCode) == 0 {
		return ""
	}
	var parts []string
	for _, code := range sortedKeys(byCode) {
		label := code
		if label == "" {
			label = "(no code)"
		}
		parts = append(parts, fmt.Sprintf("%s %d", label, byCode[code]))
	}
	return " (" + strings.Join(parts, ", ") + ")"
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
