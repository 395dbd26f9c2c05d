-- GCRA, as go-redis/redis_rate's allowN (same key, same state: the
-- theoretical arrival time in seconds since 2017-01-01, same TIME call),
-- with one difference: it reserves slots ahead instead of refusing them.
-- Up to n slots are taken in one round trip; slot i (1-based) may be used
-- ARGV[5] + (i - 1) * emission_interval seconds from now, where ARGV[5]
-- is the first one's wait (0 or less: at once). No slot is reserved later
-- than max_wait from now: the caller would not wait for it.
-- KEYS: the GCRA state
-- ARGV: burst, rate, period (seconds), n, max_wait (seconds)
-- Returns {slots taken, the first slot's wait in seconds as a string,
-- the emission interval as a string}; with 0 slots the wait is when the
-- next one comes.
redis.replicate_commands()
local key = KEYS[1]
local burst, rate, period = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local n, max_wait = tonumber(ARGV[4]), tonumber(ARGV[5])

local interval = period / rate
local burst_offset = interval * burst
local jan_1_2017 = 1483228800
local t = redis.call('TIME')
local now = (t[1] - jan_1_2017) + (t[2] / 1000000)
local tat = math.max(tonumber(redis.call('GET', key) or now) or now, now)

-- The first slot's wait, as allowN computes it for one slot.
local first = tat + interval - burst_offset - now
if first > max_wait then
  return {0, tostring(first), tostring(interval)}
end
local k = math.min(n, math.floor((max_wait - first) / interval) + 1)
local new_tat = tat + k * interval
redis.call('SET', key, new_tat, 'EX', math.max(1, math.ceil(new_tat - now)))
return {k, tostring(first), tostring(interval)}
