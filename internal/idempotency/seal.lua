-- Seal a settled campaign: write its tombstone and when its keys expire.
-- KEYS: counts, meta, tomb (one hash tag, the campaign)
-- ARGV: now_ms, default retention_ms
if redis.call('EXISTS', KEYS[3]) == 1 then
  return 'sealed'
end
local c = redis.call('HMGET', KEYS[1], 'total', 'succeeded', 'failed', 'cancelled')
local total = tonumber(c[1] or '0')
local ok = tonumber(c[2] or '0')
local failed = tonumber(c[3] or '0')
local cancelled = tonumber(c[4] or '0')
-- Settled: every send succeeded, failed or was cancelled; nothing
-- pending, in flight, retrying, waiting or unknown.
if total == 0 or ok + failed + cancelled ~= total then
  return 'open'
end
local now = tonumber(ARGV[1])
local retention = tonumber(redis.call('HGET', KEYS[2], 'retention') or ARGV[2])
local expires = now + retention
redis.call('HSET', KEYS[3], 'finished_at', now, 'expires_at', expires, 'retention', retention,
  'total', total, 'succeeded', ok, 'failed', failed)
local report = redis.call('HMGET', KEYS[2], 'report', 'report_at', 'mchid')
if report[1] then
  redis.call('HSET', KEYS[3], 'report', report[1], 'report_at', report[2])
end
if report[3] then
  redis.call('HSET', KEYS[3], 'mchid', report[3])
end
redis.call('HSET', KEYS[2], 'finished_at', now, 'expires_at', expires)
return 'sealed_now'
