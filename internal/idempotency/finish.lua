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
  -- What finish reads of the record, in one call.
  local f = redis.call('HMGET', rec, 'state', 'owner', 'code', 'attempts')
  local st = f[1]
  if st == 'succeeded' then
    return 'ok'
  end
  if f[2] ~= ARGV[1] and new ~= 'succeeded' then
    -- Another delivery took over after our lease ran out; its result counts.
    -- Our call may still have issued a coupon: say so, so that the other
    -- delivery cannot record a failure without WeChat's answer.
    if ARGV[8] == 'set' and st and st ~= 'failed' then
      redis.call('HSET', rec, 'maybe_issued', '1')
    end
    return 'lost'
  end
  local old_code = f[3] or ''
  local fields = {new, 'failed:' .. ARGV[4]}
  if st then
    table.insert(fields, st)
    table.insert(fields, 'failed:' .. old_code)
  end
  local bad = numbers(KEYS[2], fields) or valid(rec, {'attempts'}, {f[4]})
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
    if redis.call('INCR', KEYS[5]) == 1 then
      redis.call('EXPIRE', KEYS[5], 600)
    end
  end
  -- The record's changes in one HSET and one HDEL.
  local set = {'state', new, 'code', ARGV[4], 'message', ARGV[5], 'owner', '', 'lease_until', 0, 'done_at', ARGV[6]}
  local del = {}
  if ARGV[7] == '1' then
    table.insert(set, 'attempts')
    table.insert(set, (tonumber(f[4]) or 0) - 1)
  end
  if ARGV[8] == 'set' then
    table.insert(set, 'maybe_issued')
    table.insert(set, '1')
  elseif ARGV[8] == 'clear' then
    table.insert(del, 'maybe_issued')
  end
  -- The task is kept until the coupon exists: a failed send keeps it for
  -- enqueuer retry, which queues it again after asynq has dropped it.
  if new == 'unknown' and ARGV[9] ~= '' then
    table.insert(set, 'task')
    table.insert(set, ARGV[9])
  elseif new == 'succeeded' then
    table.insert(del, 'task')
  end
  if new == 'succeeded' then
    table.insert(set, 'coupon_id')
    table.insert(set, ARGV[3])
  end
  redis.call('HSET', rec, unpack(set))
  if #del > 0 then
    redis.call('HDEL', rec, unpack(del))
  end
  if new == 'succeeded' then
    -- A redemption notification names only the coupon: the index, written
    -- in the same step as the success, leads it to this record.
    if ARGV[3] ~= '' then
      redis.call('HSET', KEYS[4], ARGV[3], ARGV[10])
    end
    if redis.call('INCR', KEYS[3]) == 1 then
      redis.call('EXPIRE', KEYS[3], 600)
    end
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
