-- Prepended to every script of the store. Redis keeps the writes of a
-- script that fails halfway, so a script checks what could fail before it
-- writes anything.

-- valid returns an error reply naming the first of fields of hash key
-- whose value, already read (values[i] for fields[i]), is something other
-- than a number, or nil.
local function valid(key, fields, values)
  for i, f in ipairs(fields) do
    local v = values[i]
    if v and not tonumber(v) then
      return redis.error_reply(f .. ' of ' .. key .. ' is not a number: ' .. v)
    end
  end
  return nil
end

-- numbers returns an error reply naming the first field of hash key that
-- holds something other than a number, or nil. One HMGET: each call from
-- a script costs Redis more than the work it does on a small hash.
local function numbers(key, fields)
  -- Up to the first nil, as ipairs reads a list: HMGET takes no nil.
  local list = {}
  for _, f in ipairs(fields) do
    list[#list + 1] = f
  end
  if #list == 0 then
    return nil
  end
  return valid(key, list, redis.call('HMGET', key, unpack(list)))
end

-- admit decides whether a campaign takes a new record. A campaign that
-- has settled is sealed (seal.lua): its tombstone exists and its keys
-- expire. Once its retention has passed its records are gone, so a new
-- record could be a second coupon: admit returns 'closed'. Until then a
-- new send reopens it: its tombstone goes and its keys lose their expiry
-- (the retention sweeper takes it off the records). Checks nothing that
-- can fail, so it may run after the checks and before the writes.
local function admit(counts, members, meta, tomb)
  if redis.call('EXISTS', tomb) == 0 then
    return nil
  end
  if redis.call('EXISTS', meta) == 0 then
    return 'closed'
  end
  redis.call('DEL', tomb)
  redis.call('HDEL', meta, 'expires_at', 'finished_at')
  redis.call('PERSIST', counts)
  redis.call('PERSIST', members)
  redis.call('PERSIST', meta)
  return nil
end

-- stop_send ends a send that an operator cancelled before it was called:
-- 'cancelled', or 'unknown' if a call of it may have issued a coupon
-- (maybe, or its record says so), since only WeChat's answer can say it
-- did not. The caller has checked the counters with numbers().
local function stop_send(rec, counts, st, maybe, now)
  local new = 'cancelled'
  if maybe or redis.call('HGET', rec, 'maybe_issued') == '1' then
    new = 'unknown'
    redis.call('HSET', rec, 'maybe_issued', '1', 'message',
      'cancelled by an operator after a call that may have issued a coupon: run enqueuer reconcile, which resends the identical request')
  else
    redis.call('HSET', rec, 'code', 'CANCELLED', 'message', 'cancelled by an operator before it was called; nothing was issued')
  end
  redis.call('HINCRBY', counts, st, -1)
  redis.call('HINCRBY', counts, new, 1)
  redis.call('HSET', counts, 'changed_ms', now)
  redis.call('HSET', rec, 'state', new, 'owner', '', 'lease_until', 0, 'done_at', now)
  return new
end
