package enqueue

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/protobuf/encoding/protowire"

	"github.com/couponflow/dispatcher/internal/keyspace"
)

// asynq v0.26 queues one task per round trip and has no batch enqueue, so
// the producer writes asynq's keys itself, a batch per script call,
// exactly as asynq's Client.Enqueue writes them (asynq/internal/rdb's
// enqueueCmd, repeated): the same task hash (msg, state, pending_since),
// the same LPUSH onto the pending list, the same conflict on an existing
// task id. TestQueuedAsAsynqWould holds it to asynq's own bytes.
//
// KEYS: pending, then one task key per task
// ARGV: now_ns, then two per task: msg, task id
// Returns, per task, 1 if queued, 0 if its id was taken.
var enqueueScript = redis.NewScript(`
local out = {}
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    out[i - 1] = 0
  else
    redis.call('HSET', KEYS[i], 'msg', ARGV[2 * i - 2], 'state', 'pending', 'pending_since', ARGV[1])
    redis.call('LPUSH', KEYS[1], ARGV[2 * i - 1])
    out[i - 1] = 1
  end
end
return out
`)

// wireTask is one task as asynq stores it.
type wireTask struct {
	typ     string
	payload []byte
	id      string
	queue   string
	retry   int
	timeout time.Duration
}

// encode is asynq's base.EncodeMessage of the TaskMessage its client
// builds for the task (asynq/internal/proto/asynq.proto): type 1, payload
// 2, id 3, queue 4, retry 5, timeout 8 (seconds); no deadline, unique key,
// group or headers, which our tasks never set. Protobuf writes fields in
// number order and omits zero values, as here.
func (t wireTask) encode(b []byte) []byte {
	b = appendString(b, 1, t.typ)
	if len(t.payload) > 0 {
		b = protowire.AppendTag(b, 2, protowire.BytesType)
		b = protowire.AppendBytes(b, t.payload)
	}
	b = appendString(b, 3, t.id)
	b = appendString(b, 4, t.queue)
	if t.retry != 0 {
		b = protowire.AppendTag(b, 5, protowire.VarintType)
		b = protowire.AppendVarint(b, uint64(int64(int32(t.retry))))
	}
	if s := int64(t.timeout.Seconds()); s != 0 {
		b = protowire.AppendTag(b, 8, protowire.VarintType)
		b = protowire.AppendVarint(b, uint64(s))
	}
	return b
}

func appendString(b []byte, num protowire.Number, s string) []byte {
	if s == "" {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendString(b, s)
}

// queueTasks queues ts in one round trip, one script call per queue, and
// reports for each whether it was queued (false: its id was taken). It
// first adds each queue not yet published to asynq's set of queues, as
// asynq's client does.
func (p *Producer) queueTasks(ctx context.Context, ts []wireTask) ([]bool, error) {
	rdb := p.store.Redis()
	for _, t := range ts {
		if _, ok := p.published.Load(t.queue); ok {
			continue
		}
		if err := rdb.SAdd(ctx, keyspace.AsynqQueues(), t.queue).Err(); err != nil {
			return nil, fmt.Errorf("publishing queue %s: %w", t.queue, err)
		}
		p.published.Store(t.queue, true)
	}
	type call struct {
		keys []string
		argv []any
		at   []int // ts index of each task
	}
	var calls []*call
	byQueue := map[string]*call{}
	now := time.Now().UnixNano()
	for i, t := range ts {
		c := byQueue[t.queue]
		if c == nil {
			c = &call{keys: []string{keyspace.AsynqPending(t.queue)}, argv: []any{now}}
			byQueue[t.queue] = c
			calls = append(calls, c)
		}
		c.keys = append(c.keys, keyspace.AsynqTask(t.queue, t.id))
		c.argv = append(c.argv, t.encode(nil), t.id)
		c.at = append(c.at, i)
	}
	cmds := make([]*redis.Cmd, len(calls))
	if len(calls) == 1 {
		cmds[0] = enqueueScript.Run(ctx, rdb, calls[0].keys, calls[0].argv...)
	} else {
		_, _ = rdb.Pipelined(ctx, func(pipe redis.Pipeliner) error {
			for i, c := range calls {
				cmds[i] = enqueueScript.EvalSha(ctx, pipe, c.keys, c.argv...)
			}
			return nil
		})
		for i, c := range calls {
			// A Redis that has not seen the script ran nothing of this
			// call: run it again, loading the script.
			if err := cmds[i].Err(); err != nil && strings.HasPrefix(err.Error(), "NOSCRIPT") {
				cmds[i] = enqueueScript.Run(ctx, rdb, c.keys, c.argv...)
			}
		}
	}
	queued := make([]bool, len(ts))
	for i, c := range calls {
		res, err := cmds[i].Int64Slice()
		if err == nil && len(res) != len(c.at) {
			err = errors.New("the script answered for another number of tasks")
		}
		if err != nil {
			return nil, fmt.Errorf("queueing %d tasks in %s: %w", len(c.at), ts[c.at[0]].queue, err)
		}
		for j, at := range c.at {
			queued[at] = res[j] == 1
		}
	}
	return queued, nil
}
