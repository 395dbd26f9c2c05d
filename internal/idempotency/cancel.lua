-- Cancel one send of a cancelled campaign (enqueuer campaign cancel).
-- KEYS: record, counts
-- ARGV: now_ms
-- Returns the send's new state ('cancelled', or 'unknown' when a call may
-- have issued it), or why it was left: 'missing', 'stopped' (its outcome
-- is known, or it is unknown already), 'in_flight' (its call finishes and
-- is recorded for what it is; a later claim stops it).
local st = redis.call('HGET', KEYS[1], 'state')
if not st then
  return 'missing'
end
if st == 'succeeded' or st == 'failed' or st == 'cancelled' or st == 'unknown' then
  return 'stopped'
end
if st == 'in_flight' then
  return 'in_flight'
end
local bad = numbers(KEYS[2], {st, 'cancelled', 'unknown'})
if bad then
  return bad
end
return stop_send(KEYS[1], KEYS[2], st, false, ARGV[1])
