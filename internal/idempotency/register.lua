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
if admit(KEYS[2], KEYS[3], KEYS[4], KEYS[5]) == 'closed' then
  return 'closed'
end
redis.call('HSET', KEYS[1], 'state', 'pending', 'campaign', ARGV[1], 'openid', ARGV[4],
  'stock_id', ARGV[5], 'created_at', ARGV[6], 'attempts', 0, 'task', ARGV[7], 'queue', ARGV[8])
redis.call('HINCRBY', KEYS[2], 'pending', 1)
redis.call('HINCRBY', KEYS[2], 'total', 1)
redis.call('HSET', KEYS[2], 'changed_ms', ARGV[6])
redis.call('RPUSH', KEYS[3], ARGV[2] .. ':' .. ARGV[3])
return 'new'
