-- The last step of applying a campaign's expiry, once every record has it:
-- the counters, the member list and the meta get it too, unless the
-- campaign was reopened or its retention changed meanwhile ('changed'), or
-- its keys are gone ('gone': nothing is written, least of all a new meta).
-- KEYS: counts, members, meta, the coupon index
-- ARGV: the expiry applied to the records (unix ms, or '' for none)
if redis.call('EXISTS', KEYS[3]) == 0 then
  return 'gone'
end
local want = redis.call('HGET', KEYS[3], 'expires_at') or ''
if want ~= ARGV[1] then
  return 'changed'
end
redis.call('HSET', KEYS[3], 'expiry_applied', ARGV[1])
for i = 1, 4 do
  if ARGV[1] == '' then
    redis.call('PERSIST', KEYS[i])
  else
    redis.call('PEXPIREAT', KEYS[i], ARGV[1])
  end
end
return 'ok'
