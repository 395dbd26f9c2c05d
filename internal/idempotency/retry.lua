-- Queue a stopped send again (enqueuer retry): back to pending, under the
-- same out_request_no, so WeChat answers a resend of an issued one with
-- the coupon it issued.
-- KEYS: record, counts
-- ARGV: from state, now_ms
-- Returns 'ok', 'changed' (it is no longer in that state) or 'no_task'.
local st = redis.call('HGET', KEYS[1], 'state')
if st ~= ARGV[1] then
  return 'changed'
end
if redis.call('HEXISTS', KEYS[1], 'task') == 0 then
  return 'no_task'
end
local code = redis.call('HGET', KEYS[1], 'code') or ''
local bad = numbers(KEYS[2], {st, 'pending', 'failed:' .. code})
if bad then
  return bad
end
redis.call('HINCRBY', KEYS[2], st, -1)
if st == 'failed' then
  redis.call('HINCRBY', KEYS[2], 'failed:' .. code, -1)
end
redis.call('HINCRBY', KEYS[2], 'pending', 1)
redis.call('HSET', KEYS[2], 'changed_ms', ARGV[2])
redis.call('HSET', KEYS[1], 'state', 'pending', 'retried_from', st, 'retried_at', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'retries', 1)
return 'ok'
