package monitor

import (
	"context"
	"errors"
	"sort"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/couponflow/dispatcher/internal/keyspace"
	"github.com/couponflow/dispatcher/internal/tasks"
)

// An orphan is a send whose record waits for a delivery while asynq holds
// no live task for it: deleted or archived in asynqmon, or lost with a
// Redis that failed over. Nothing will ever run it until the workers'
// sweeper queues it again, which it does only once the campaign has
// stalled (WORKER_SWEEP_STALL, 15 min by default): the page shows them
// meanwhile.

// orphanEvery is the least time between two orphan checks of a campaign,
// and orphanConfirm how long a send must have been seen without a task
// before it is shown: a producer registers a send a moment before it
// queues its task, and that moment is no orphan.
const (
	orphanEvery   = 2 * time.Second
	orphanConfirm = 3 * time.Second
	// maxOrphanSample is how many orphans' out_request_nos a card lists.
	maxOrphanSample = 5
)

// orphanCache keeps, per campaign, when it was last checked, since when
// each suspect has been seen without a task, and what was shown.
type orphanCache struct {
	mu sync.Mutex
	m  map[string]*orphanState
}

type orphanState struct {
	checked  time.Time
	suspects map[string]time.Time
	shown    []string // confirmed orphans, sorted
}

// taskQueues are the queues that may hold a send's task: the one its
// record names (every shard of ours when it names none) and its woken
// queue, where resumes and the sweeper put tasks.
func (s *Server) taskQueues(queue string) []string {
	qs := []string{queue}
	if queue == "" {
		qs = tasks.ShardQueues(s.queue, s.queueShards)
	}
	out := make([]string, 0, 2*len(qs))
	for _, q := range qs {
		out = append(out, q, tasks.WokenQueue(q))
	}
	return out
}

// taskless returns the refs asynq holds no live task for: in none of
// their queues, or only archived or completed there (the sweeper treats
// those as lost too). One pipeline of HGETs on asynq's task hashes.
func taskless(ctx context.Context, rdb redis.Cmdable, refs []taskRef) ([]string, error) {
	if len(refs) == 0 {
		return nil, nil
	}
	pipe := rdb.Pipeline()
	cmds := make([][]*redis.StringCmd, len(refs))
	for i, r := range refs {
		for _, q := range r.queues {
			cmds[i] = append(cmds[i], pipe.HGet(ctx, keyspace.AsynqTask(q, r.id), "state"))
		}
	}
	if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) {
		return nil, err
	}
	var out []string
	for i, r := range refs {
		live := false
		for _, c := range cmds[i] {
			st, err := c.Result()
			if err == nil && st != "archived" && st != "completed" {
				live = true
				break
			}
		}
		if !live {
			out = append(out, r.outRequestNo)
		}
	}
	return out, nil
}

// orphans returns the campaign's confirmed orphans among the waiting
// sends its scan read, checking asynq at most every orphanEvery.
func (s *Server) orphans(ctx context.Context, name string, waiting []taskRef, now time.Time) ([]string, error) {
	s.orphaned.mu.Lock()
	if s.orphaned.m == nil {
		s.orphaned.m = map[string]*orphanState{}
	}
	st := s.orphaned.m[name]
	if st == nil {
		st = &orphanState{suspects: map[string]time.Time{}}
		s.orphaned.m[name] = st
	}
	if now.Sub(st.checked) < orphanEvery {
		shown := st.shown
		s.orphaned.mu.Unlock()
		return shown, nil
	}
	s.orphaned.mu.Unlock()

	found, err := taskless(ctx, s.rdb, waiting)
	if err != nil {
		return nil, err
	}
	s.orphaned.mu.Lock()
	defer s.orphaned.mu.Unlock()
	suspects := make(map[string]time.Time, len(found))
	var shown []string
	for _, no := range found {
		first, seen := st.suspects[no]
		if !seen {
			first = now
		}
		suspects[no] = first
		if now.Sub(first) >= orphanConfirm {
			shown = append(shown, no)
		}
	}
	sort.Strings(shown)
	st.checked, st.suspects, st.shown = now, suspects, shown
	return shown, nil
}

// forgetOrphans drops a campaign's orphan checks, so that the monitor
// keeps no state for the campaigns that are done.
func (s *Server) forgetOrphans(name string) {
	s.orphaned.mu.Lock()
	delete(s.orphaned.m, name)
	s.orphaned.mu.Unlock()
}
