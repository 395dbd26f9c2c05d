package campaignctl

import (
	"context"
	"errors"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/tasks"
)

// Wake moves the sends that match (a stock's, a campaign's) and wait in a
// queue's retry set (and in its woken queue's) into the woken queue, to be
// processed now. A kill between a task's delete and its enqueue loses
// nothing: its record still waits, and the fleet's sweeper queues it again.
func Wake(ctx context.Context, rdb redis.UniversalClient, queue string, match func(tasks.Common) bool) (int, error) {
	insp := asynq.NewInspectorFromRedisClient(rdb)
	client := asynq.NewClientFromRedisClient(rdb)
	woken := tasks.WokenQueue(queue)
	moved := 0
	for _, q := range []string{queue, woken} {
		// The ids first: deleting while paging would shift the pages.
		var ids []string
		for page := 1; ; page++ {
			infos, err := insp.ListRetryTasks(q, asynq.PageSize(1000), asynq.Page(page))
			if errors.Is(err, asynq.ErrQueueNotFound) {
				break
			}
			if err != nil {
				return moved, err
			}
			for _, info := range infos {
				args, err := tasks.Decode(asynq.NewTask(info.Type, info.Payload))
				if err == nil && match(args.Base()) {
					ids = append(ids, info.ID)
				}
			}
			if len(infos) < 1000 {
				break
			}
		}
		for _, id := range ids {
			info, err := insp.GetTaskInfo(q, id)
			if errors.Is(err, asynq.ErrTaskNotFound) || (err == nil && info.State == asynq.TaskStateActive) {
				continue // done, or being sent, meanwhile
			}
			if err != nil {
				return moved, err
			}
			t, err := tasks.Requeue(append([]byte(info.Type+"\n"), info.Payload...), woken, asynq.MaxRetry(info.MaxRetry))
			if err != nil {
				return moved, err
			}
			if err := insp.DeleteTask(q, id); err != nil {
				if errors.Is(err, asynq.ErrTaskNotFound) {
					continue
				}
				return moved, err
			}
			if _, err := client.EnqueueContext(ctx, t); err != nil && !errors.Is(err, asynq.ErrTaskIDConflict) {
				return moved, err
			}
			moved++
		}
	}
	return moved, nil
}
