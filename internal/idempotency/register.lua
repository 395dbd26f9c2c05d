-- KEYS: record, counts, members, meta, tomb
-- ARGV: campaign, mchid, out_request_no, openid, stock_id, now_ms, task, queue
local st = redis.call('HGET', KEYS[1], 'state')
if st then
  return st
end
local bad = numbers(KEYS[2], {'pending', 'total'})
if bad then
  return bad
end
if redis.call('EXISTS', KEYS[5]) == 1 then
  -- The campaign was settled and sealed.
  if redis.call('EXISTS', KEYS[4]) == 0 then
    -- Its retention has passed: its records are gone, so a new record
    -- could be a second coupon. Refuse.
    return 'closed'
  end
  -- Still kept: a new send reopens it. Its keys lose their expiry now;
  -- the retention sweeper takes it off the records.
  redis.call('DEL', KEYS[5])
  redis.call('HDEL', KEYS[4], 'expires_at', 'finished_at')
  redis.call('PERSIST', KEYS[2])
  redis.call('PERSIST', KEYS[3])
  redis.call('PERSIST', KEYS[4])
end
redis.call('HSET', KEYS[1], 'state', 'pending', 'campaign', ARGV[1], 'openid', ARGV[4],
  'stock_id', ARGV[5], 'created_at', ARGV[6], 'attempts', 0, 'task', ARGV[7], 'queue', ARGV[8])
redis.call('HINCRBY', KEYS[2], 'pending', 1)
redis.call('HINCRBY', KEYS[2], 'total', 1)
redis.call('HSET', KEYS[2], 'changed_ms', ARGV[6])
redis.call('RPUSH', KEYS[3], ARGV[2] .. ':' .. ARGV[3])
return 'new'
