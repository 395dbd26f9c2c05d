-- The shared, adaptive rate of one (merchant, endpoint): additive increase
-- over time, multiplicative decrease on a 429.
-- KEYS: the state hash
-- ARGV: now_ms, max_rate, increase_per_s, op ("get" | "decrease"), factor, min_rate, cooldown_ms
local now = tonumber(ARGV[1])
local max = tonumber(ARGV[2])
local inc = tonumber(ARGV[3])
local st = redis.call('HMGET', KEYS[1], 'rate', 'at', 'dec_at')
local cur = max
local lowered = 0
if st[1] then
  cur = math.min(max, tonumber(st[1]) + (now - tonumber(st[2])) / 1000 * inc)
end
if ARGV[4] == 'decrease' then
  -- Every worker sees the same burst of 429s: one decrease per cooldown.
  if not st[3] or now - tonumber(st[3]) >= tonumber(ARGV[7]) then
    cur = math.max(tonumber(ARGV[6]), cur * tonumber(ARGV[5]))
    lowered = 1
    redis.call('HSET', KEYS[1], 'rate', tostring(cur), 'at', now, 'dec_at', now)
    redis.call('PEXPIRE', KEYS[1], 3600000)
  end
end
return {tostring(cur), lowered}
