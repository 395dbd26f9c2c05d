-- A per-stock budget breaker.
-- KEYS: the breaker hash, the merchant's set of open breakers (same hash tag)
-- ARGV: op (check | exhausted | exhausted_probe | success | abandon), now_ms, first_ms, max_ms, probe_lease_ms, stock_id,
--       reason (exhausted: WeChat's code and message that opened or kept it open)
-- The hash and the set change together: a stock is in the set exactly
-- while its breaker is open.
local k = KEYS[1]
local op = ARGV[1]
local now = tonumber(ARGV[2])
if op == 'success' then
  redis.call('SREM', KEYS[2], ARGV[6])
  return {'closed', redis.call('DEL', k)}
end
if op == 'abandon' then
  -- The probe never got an answer about the budget: let another try now.
  if redis.call('EXISTS', k) == 1 then
    redis.call('HSET', k, 'probe_until', 0)
  end
  return {'open', 0}
end
local next_ms = tonumber(redis.call('HGET', k, 'next_ms') or '-1')
if op == 'check' then
  if next_ms < 0 then
    return {'closed', 0}
  end
  local reason = redis.call('HGET', k, 'reason') or ''
  if now < next_ms then
    return {'hold', next_ms, reason}
  end
  local probe_until = tonumber(redis.call('HGET', k, 'probe_until') or '0')
  if probe_until > now then
    -- A probe is in flight; its answer may close the breaker long before
    -- its lease ends, so come back after the first interval at the latest.
    return {'hold', math.min(probe_until, now + tonumber(ARGV[3])), reason}
  end
  -- One caller, and only one, probes; the others keep holding.
  redis.call('HSET', k, 'probe_until', now + tonumber(ARGV[5]))
  return {'probe', 0}
end
-- exhausted
if next_ms < 0 then
  local first = tonumber(ARGV[3])
  redis.call('HSET', k, 'opened_ms', now, 'interval_ms', first, 'next_ms', now + first, 'probes', 0, 'probe_until', 0,
    'reason', ARGV[7])
  redis.call('SADD', KEYS[2], ARGV[6])
  return {'opened', now + first}
end
if op == 'exhausted_probe' then
  local interval = math.min(tonumber(redis.call('HGET', k, 'interval_ms')) * 2, tonumber(ARGV[4]))
  redis.call('HSET', k, 'interval_ms', interval, 'next_ms', now + interval, 'probe_until', 0, 'reason', ARGV[7])
  redis.call('HINCRBY', k, 'probes', 1)
  return {'extended', now + interval}
end
-- A call let through before the breaker opened: nothing to change.
return {'open', next_ms}
