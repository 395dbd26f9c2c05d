-- KEYS: record, counts, members, meta, tomb[, the user lock]
-- ARGV: owner, now_ms, lease_ms, campaign, mchid, out_request_no, openid, stock_id,
--       settle ('1': a final delivery by reconcile, which a paused or cancelled campaign does not stop),
--       the user lock's value (with the lock's key)
-- Given the user lock's key (one Redis, where a script may touch any key),
-- the lock is taken here, in the same round trip as the claim. On a Redis
-- Cluster the lock is on another slot: TryClaim takes it first, on its own.
local rec = KEYS[1]
local now = tonumber(ARGV[2])

local function claim()
  -- What the claim reads of the record, in one call.
  local f = redis.call('HMGET', rec, 'state', 'owner', 'lease_until', 'attempts', 'first_at')
  local st = f[1]
  -- Each answer carries the record as it now stands, saving a read-back.
  if st == 'succeeded' or st == 'failed' or st == 'cancelled' then
    return {'terminal', redis.call('HGETALL', rec)}
  end
  local takeover = false
  if st == 'in_flight' then
    local owner = f[2]
    local lease_until = tonumber(f[3] or '0')
    if owner ~= ARGV[1] and lease_until > now then
      return {'busy', redis.call('HGETALL', rec)}
    end
    -- The holder's lease ran out (it crashed, hangs, or could not record):
    -- its call may have issued the coupon.
    takeover = true
  end
  -- An operator's pause or cancel (enqueuer campaign pause|cancel) is read
  -- here, in the step that would start a call, so that no call starts after
  -- the command has returned.
  local control = ''
  if ARGV[9] ~= '1' then
    control = redis.call('HGET', KEYS[4], 'control') or ''
  end
  if control == 'paused' then
    return {'paused', redis.call('HGETALL', rec)}
  end
  local bad = numbers(KEYS[2], {st or 'pending', 'in_flight', 'total', 'cancelled', 'unknown'}) or valid(rec, {'attempts'}, {f[4]})
  if bad then
    return bad
  end
  if control == 'cancelled' then
    if st and st ~= 'unknown' then
      stop_send(rec, KEYS[2], st, takeover, ARGV[2])
    end
    return {'cancelled', redis.call('HGETALL', rec)}
  end
  if not st then
    if admit(KEYS[2], KEYS[3], KEYS[4], KEYS[5]) == 'closed' then
      -- A task that outlived its campaign's records (an archived task run
      -- again) is not sent.
      return {'closed', {}}
    end
    -- Enqueued by a producer that did not register it: register it now, so
    -- that nothing is ever sent without a record.
    redis.call('HSET', rec, 'state', 'pending', 'campaign', ARGV[4], 'openid', ARGV[7],
      'stock_id', ARGV[8], 'created_at', ARGV[2], 'attempts', 0)
    redis.call('HINCRBY', KEYS[2], 'pending', 1)
    redis.call('HINCRBY', KEYS[2], 'total', 1)
    redis.call('RPUSH', KEYS[3], ARGV[5] .. ':' .. ARGV[6])
    st = 'pending'
  end
  redis.call('HINCRBY', KEYS[2], st, -1)
  redis.call('HINCRBY', KEYS[2], 'in_flight', 1)
  redis.call('HSET', KEYS[2], 'changed_ms', ARGV[2])
  -- claimed_from lets a delivery stopped before its call give the send back as it was.
  local set = {'state', 'in_flight', 'owner', ARGV[1], 'lease_until', now + tonumber(ARGV[3]),
    'last_at', ARGV[2], 'claimed_from', st, 'attempts', (tonumber(f[4]) or 0) + 1}
  if not f[5] then
    table.insert(set, 'first_at')
    table.insert(set, ARGV[2])
  end
  if takeover then
    -- Kept until WeChat answers this out_request_no: only its answer can
    -- say that nothing was issued.
    table.insert(set, 'maybe_issued')
    table.insert(set, '1')
  end
  redis.call('HSET', rec, unpack(set))
  return {'claimed', redis.call('HGETALL', rec)}
end

local lock, held = KEYS[6], ARGV[10]
if lock and not redis.call('SET', lock, held, 'NX', 'PX', ARGV[3]) then
  -- Our own earlier attempt may hold it (a redelivery of the same send by
  -- the same owner); otherwise another send to the user is in flight.
  if redis.call('GET', lock) ~= held then
    -- A lock without a TTL (written by hand, or by an old version) would
    -- hold the user for ever: bound it.
    if redis.call('PTTL', lock) == -1 then
      redis.call('PEXPIRE', lock, ARGV[3])
    end
    local st = redis.call('HGET', rec, 'state')
    if st == 'succeeded' or st == 'failed' or st == 'cancelled' then
      return {'terminal', redis.call('HGETALL', rec)}
    end
    return {'busy', redis.call('HGETALL', rec)}
  end
  redis.call('PEXPIRE', lock, ARGV[3])
end
local r = claim()
-- Only a claimed send keeps its user locked (an error reply has no r[1]).
if lock and r[1] ~= 'claimed' and redis.call('GET', lock) == held then
  redis.call('DEL', lock)
end
return r
