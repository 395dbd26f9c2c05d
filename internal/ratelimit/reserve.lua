-- One slot of GCRA, as go-redis/redis_rate's allowN (same key, same state:
-- the theoretical arrival time in seconds since 2017-01-01, same TIME
-- call), with one difference: a slot that is not free now is reserved at
-- its time instead of refused, when that is no more than max_wait away.
-- At the limit the fleet's askers otherwise race for each slot as it
-- frees, and all but one lose a round trip.
-- KEYS: the GCRA state
-- ARGV: burst, rate, period (seconds), max_wait (seconds)
-- Returns {1 if reserved, else 0; the slot's wait in seconds, as a string}.
redis.replicate_commands()
local key = KEYS[1]
local burst, rate, period = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local max_wait = tonumber(ARGV[4])

local interval = period / rate
local jan_1_2017 = 1483228800
local t = redis.call('TIME')
local now = (t[1] - jan_1_2017) + (t[2] / 1000000)
local tat = math.max(tonumber(redis.call('GET', key) or now) or now, now)
local new_tat = tat + interval
local wait = new_tat - interval * burst - now
if wait > max_wait then
  return {0, tostring(wait)}
end
redis.call('SET', key, new_tat, 'EX', math.max(1, math.ceil(new_tat - now)))
return {1, tostring(wait)}
