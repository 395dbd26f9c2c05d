-- A per-stock budget breaker, and one per merchant for SIGN_ERROR.
-- KEYS: the target breaker hash (a stock's, or the merchant's), the merchant's set of open stock breakers,
--       the merchant's breaker hash (all three under one hash tag)
-- ARGV: op (check | exhausted | exhausted_probe | success | abandon), now_ms, first_ms, max_ms, probe_lease_ms, stock_id
--       ("" for the merchant's breaker), reason (exhausted: WeChat's code and message that opened or kept it open),
--       until_ms (exhausted: when the cause ends by itself, a daily budget at midnight; 0 if unknown)
-- A stock's hash and the set change together: a stock is in the set exactly
-- while its breaker is open. The merchant's breaker is in no set.
local k = KEYS[1]
local op = ARGV[1]
local now = tonumber(ARGV[2])
local inset = ARGV[6] ~= ''
if op == 'success' then
  if inset then redis.call('SREM', KEYS[2], ARGV[6]) end
  return {'closed', redis.call('DEL', k)}
end
if op == 'abandon' then
  -- The probe never got an answer about the budget: let another try now.
  if redis.call('EXISTS', k) == 1 then
    redis.call('HSET', k, 'probe_until', 0)
  end
  return {'open', 0}
end

-- check: nil while the breaker h is closed, else its verdict.
local function check(h)
  local next_ms = tonumber(redis.call('HGET', h, 'next_ms') or '-1')
  if next_ms < 0 then
    return nil
  end
  local reason = redis.call('HGET', h, 'reason') or ''
  if now < next_ms then
    return {'hold', next_ms, reason}
  end
  local probe_until = tonumber(redis.call('HGET', h, 'probe_until') or '0')
  if probe_until > now then
    -- A probe is in flight; its answer may close the breaker long before
    -- its lease ends, so come back after the first interval at the latest.
    return {'hold', math.min(probe_until, now + tonumber(ARGV[3])), reason}
  end
  -- One caller, and only one, probes; the others keep holding.
  redis.call('HSET', h, 'probe_until', now + tonumber(ARGV[5]))
  return {'probe', 0, ''}
end

if op == 'check' then
  -- The merchant's breaker comes first: while WeChat refuses its
  -- signature, no stock can say anything about its budget.
  local v = check(KEYS[3])
  if v then
    v[4] = 'merchant'
    return v
  end
  return check(k) or {'closed', 0}
end
-- exhausted
local next_ms = tonumber(redis.call('HGET', k, 'next_ms') or '-1')
local until_ms = tonumber(ARGV[8])
if next_ms < 0 then
  local first = tonumber(ARGV[3])
  local at = now + first
  if until_ms > now then at = until_ms end
  redis.call('HSET', k, 'opened_ms', now, 'interval_ms', first, 'next_ms', at, 'probes', 0, 'probe_until', 0,
    'reason', ARGV[7])
  if inset then redis.call('SADD', KEYS[2], ARGV[6]) end
  return {'opened', at}
end
if op == 'exhausted_probe' then
  local interval = tonumber(redis.call('HGET', k, 'interval_ms'))
  local at
  if until_ms > now then
    -- A known end: no doubling, the next probe is at that end.
    at = until_ms
  else
    interval = math.min(interval * 2, tonumber(ARGV[4]))
    at = now + interval
  end
  redis.call('HSET', k, 'interval_ms', interval, 'next_ms', at, 'probe_until', 0, 'reason', ARGV[7])
  redis.call('HINCRBY', k, 'probes', 1)
  return {'extended', at}
end
-- A call let through before the breaker opened: nothing to change, unless
-- it learned of a later end than the breaker knows.
if until_ms > next_ms then
  redis.call('HSET', k, 'next_ms', until_ms, 'reason', ARGV[7])
  return {'open', until_ms}
end
return {'open', next_ms}
