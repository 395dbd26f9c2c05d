-- KEYS: record, counts, rate bucket of this second
-- ARGV: owner, new state, coupon_id, code, message, now_ms, not_called (1 if no call was made)
local rec = KEYS[1]
local new = ARGV[2]
local st = redis.call('HGET', rec, 'state')
if st == 'succeeded' then
  return 'ok'
end
if redis.call('HGET', rec, 'owner') ~= ARGV[1] and new ~= 'succeeded' then
  -- Another delivery took over after our lease ran out; its result counts.
  return 'lost'
end
if st then
  redis.call('HINCRBY', KEYS[2], st, -1)
  if st == 'failed' then
    redis.call('HINCRBY', KEYS[2], 'failed:' .. (redis.call('HGET', rec, 'code') or ''), -1)
  end
end
redis.call('HINCRBY', KEYS[2], new, 1)
if new == 'failed' then
  redis.call('HINCRBY', KEYS[2], 'failed:' .. ARGV[4], 1)
end
redis.call('HSET', rec, 'state', new, 'code', ARGV[4], 'message', ARGV[5], 'owner', '', 'lease_until', 0,
  'done_at', ARGV[6])
if ARGV[7] == '1' then
  redis.call('HINCRBY', rec, 'attempts', -1)
end
if new == 'succeeded' then
  redis.call('HSET', rec, 'coupon_id', ARGV[3])
  redis.call('INCR', KEYS[3])
  redis.call('EXPIRE', KEYS[3], 600)
end
return 'ok'
