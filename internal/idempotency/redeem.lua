-- Records a coupon's redemption (WeChat's COUPON.USE notification, or
-- the list API's consume_information found by enqueuer redemptions sync)
-- on its send's record, once: a second report of the same coupon, by the
-- same notification or another, changes nothing and says 'duplicate'.
-- KEYS: record, counts
-- ARGV: coupon_id, notification id ('' from sync), consume time (unix ms),
--       consume_mchid, transaction_id, amount (fen), now_ms, source ('notify' or 'sync')
local rec = KEYS[1]
local st = redis.call('HGET', rec, 'state')
if not st then
  return {'missing', ''}
end
if redis.call('HGET', rec, 'coupon_id') ~= ARGV[1] then
  return {'mismatch', ''}
end
if redis.call('HEXISTS', rec, 'used_at') == 1 then
  return {'duplicate', redis.call('HGET', rec, 'redeem_src') or ''}
end
local bad = numbers(KEYS[2], {'redeemed', 'redeemed_amount', 'redeemed_wait_ms', 'redeemed_by_sync'})
  or numbers(rec, {'done_at'})
if bad then
  return bad
end
local sent = tonumber(redis.call('HGET', rec, 'done_at') or '0') or 0
local wait = 0
if sent > 0 and tonumber(ARGV[3]) > sent then
  wait = tonumber(ARGV[3]) - sent
end
redis.call('HSET', rec, 'used_at', ARGV[3], 'used_mchid', ARGV[4], 'used_txn', ARGV[5], 'used_amount', ARGV[6],
  'redeemed_at', ARGV[7], 'redeem_src', ARGV[8])
if ARGV[2] ~= '' then
  redis.call('HSET', rec, 'notify_id', ARGV[2])
end
redis.call('HINCRBY', KEYS[2], 'redeemed', 1)
redis.call('HINCRBY', KEYS[2], 'redeemed_amount', tonumber(ARGV[6]) or 0)
redis.call('HINCRBY', KEYS[2], 'redeemed_wait_ms', wait)
if ARGV[8] == 'sync' then
  redis.call('HINCRBY', KEYS[2], 'redeemed_by_sync', 1)
end
return {'recorded', tostring(sent)}
