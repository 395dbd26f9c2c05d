-- Record a campaign the first time it is seen; a re-run keeps the first
-- values. A campaign whose retention has passed stays closed.
-- KEYS: meta, tomb
-- ARGV: mchid, deadline (unix s), created_at (unix s), retention_ms
if redis.call('EXISTS', KEYS[1]) == 0 and redis.call('EXISTS', KEYS[2]) == 1 then
  return 'expired'
end
redis.call('HSETNX', KEYS[1], 'mchid', ARGV[1])
redis.call('HSETNX', KEYS[1], 'deadline', ARGV[2])
redis.call('HSETNX', KEYS[1], 'created_at', ARGV[3])
redis.call('HSETNX', KEYS[1], 'retention', ARGV[4])
return 'ok'
