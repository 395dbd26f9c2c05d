-- KEYS: record, counts, rate bucket of this second, the campaign's coupon index,
--       failure rate bucket of this second[, the user lock]
-- ARGV: owner, new state, coupon_id, code, message, now_ms,
--       not_called ('1': no call was made), issued ('set': the call may have
--       issued a coupon, 'clear': WeChat answered and nothing was issued, '': no news),
--       the kept task (stored with an unknown send, for reconcile),
--       the send as the index names it (<mchid>:<out_request_no>),
--       the user lock's value (with the lock's key)
-- Given the user lock's key (one Redis; see claim.lua), the user is unlocked
-- here, in the same round trip as the record.
local rec = KEYS[1]
local new = ARGV[2]

local function finish()
  local st = redis.call('HGET', rec, 'state')
  if st == 'succeeded' then
    return 'ok'
  end
  if redis.call('HGET', rec, 'owner') ~= ARGV[1] and new ~= 'succeeded' then
    -- Another delivery took over after our lease ran out; its result counts.
    -- Our call may still have issued a coupon: say so, so that the other
    -- delivery cannot record a failure without WeChat's answer.
    if ARGV[8] == 'set' and st and st ~= 'failed' then
      redis.call('HSET', rec, 'maybe_issued', '1')
    end
    return 'lost'
  end
  local old_code = redis.call('HGET', rec, 'code') or ''
  local fields = {new, 'failed:' .. ARGV[4]}
  if st then
    table.insert(fields, st)
    table.insert(fields, 'failed:' .. old_code)
  end
  local bad = numbers(KEYS[2], fields) or numbers(rec, {'attempts'})
  if bad then
    return bad
  end
  if st then
    redis.call('HINCRBY', KEYS[2], st, -1)
    if st == 'failed' then
      redis.call('HINCRBY', KEYS[2], 'failed:' .. old_code, -1)
    end
  end
  redis.call('HINCRBY', KEYS[2], new, 1)
  redis.call('HSET', KEYS[2], 'changed_ms', ARGV[6])
  if new == 'failed' then
    redis.call('HINCRBY', KEYS[2], 'failed:' .. ARGV[4], 1)
    redis.call('INCR', KEYS[5])
    redis.call('EXPIRE', KEYS[5], 600)
  end
  redis.call('HSET', rec, 'state', new, 'code', ARGV[4], 'message', ARGV[5], 'owner', '', 'lease_until', 0,
    'done_at', ARGV[6])
  if ARGV[7] == '1' then
    redis.call('HINCRBY', rec, 'attempts', -1)
  end
  if ARGV[8] == 'set' then
    redis.call('HSET', rec, 'maybe_issued', '1')
  elseif ARGV[8] == 'clear' then
    redis.call('HDEL', rec, 'maybe_issued')
  end
  -- The task is kept until the coupon exists: a failed send keeps it for
  -- enqueuer retry, which queues it again after asynq has dropped it.
  if new == 'unknown' and ARGV[9] ~= '' then
    redis.call('HSET', rec, 'task', ARGV[9])
  elseif new == 'succeeded' then
    redis.call('HDEL', rec, 'task')
  end
  if new == 'succeeded' then
    redis.call('HSET', rec, 'coupon_id', ARGV[3])
    -- A redemption notification names only the coupon: the index, written
    -- in the same step as the success, leads it to this record.
    if ARGV[3] ~= '' then
      redis.call('HSET', KEYS[4], ARGV[3], ARGV[10])
    end
    redis.call('INCR', KEYS[3])
    redis.call('EXPIRE', KEYS[3], 600)
  end
  return 'ok'
end

local r = finish()
-- An error reply (a table) leaves the lock to expire with its lease, as
-- the claim it belongs to stays in flight until then.
if KEYS[6] and type(r) == 'string' and redis.call('GET', KEYS[6]) == ARGV[11] then
  redis.call('DEL', KEYS[6])
end
return r
