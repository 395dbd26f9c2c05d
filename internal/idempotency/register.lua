-- Registers a batch of sends of one campaign in one step (one round trip,
-- one slot): each send's record is created as pending unless it exists.
-- KEYS: counts, members, meta, tomb, then one record per send
-- ARGV: campaign, now_ms, then six per send: mchid, out_request_no,
--       openid, stock_id, task, queue
-- Returns, per send, 'new' or the state its record was already in; or
-- 'closed' (nothing written) if a send is new and the campaign's
-- retention has passed.
local n = #KEYS - 4
local out, fresh = {}, 0
for i = 1, n do
  local st = redis.call('HGET', KEYS[4 + i], 'state')
  out[i] = st or 'new'
  if not st then
    fresh = fresh + 1
  end
end
if fresh == 0 then
  return out
end
local bad = numbers(KEYS[1], {'pending', 'total'})
if bad then
  return bad
end
if admit(KEYS[1], KEYS[2], KEYS[3], KEYS[4]) == 'closed' then
  return 'closed'
end
-- A file may name one send twice: the second is a duplicate of the first.
local members, written = {}, {}
for i = 1, n do
  local rec = KEYS[4 + i]
  if out[i] == 'new' then
    if written[rec] then
      out[i] = 'pending'
    else
      written[rec] = true
      local a = 2 + (i - 1) * 6
      redis.call('HSET', rec, 'state', 'pending', 'campaign', ARGV[1], 'openid', ARGV[a + 3],
        'stock_id', ARGV[a + 4], 'created_at', ARGV[2], 'attempts', 0, 'task', ARGV[a + 5], 'queue', ARGV[a + 6])
      members[#members + 1] = ARGV[a + 1] .. ':' .. ARGV[a + 2]
    end
  end
end
redis.call('HINCRBY', KEYS[1], 'pending', #members)
redis.call('HINCRBY', KEYS[1], 'total', #members)
redis.call('HSET', KEYS[1], 'changed_ms', ARGV[2])
redis.call('RPUSH', KEYS[2], unpack(members))
return out
