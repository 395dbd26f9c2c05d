-- Change a campaign's retention; a sealed campaign's expiry moves with it.
-- KEYS: meta, tomb
-- ARGV: retention_ms
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 'gone'
end
redis.call('HSET', KEYS[1], 'retention', ARGV[1])
local fin = redis.call('HGET', KEYS[1], 'finished_at')
if fin and redis.call('EXISTS', KEYS[2]) == 1 then
  local exp = tonumber(fin) + tonumber(ARGV[1])
  redis.call('HSET', KEYS[1], 'expires_at', exp)
  redis.call('HSET', KEYS[2], 'expires_at', exp, 'retention', ARGV[1])
end
return 'ok'
