-- The shared, adaptive rate of one (merchant, endpoint), and what the fleet
-- has learned of WeChat's real limit.
--
-- Halving on every burst of 429s and growing back towards the configured
-- limit meets the real limit again every recovery period. Instead, the
-- first 429 of a burst opens an episode: the rate is cut at once (damage
-- control), and after a settling time the fleet's accepted calls (slots
-- granted minus 429s, both counted here) are measured over a window. If
-- the window still saw 429s, the fleet was above the real limit the whole
-- time, so the accepted rate is the real limit: it becomes the learned
-- ceiling and the rate is set just under it. If it saw none, the cut went
-- below the real limit: the rate goes half way back up and measures again.
-- A window the cut's late 429s spoiled is measured again rather than
-- trusted: more 429s than slots granted (same rate), or half the rate or
-- less accepted (the rate halves first: the limit is under it).
-- Outside episodes the rate probes above the ceiling slowly, and only while
-- the fleet uses it, since an unused rate tests nothing. One exception: a
-- rate the fleet used for a whole probe interval without a 429 ("best") in
-- the last best_for_ms is known to be WeChat's to take. Below it the rate
-- grows back linearly, as fast as before (0 to best in recover_ms), so that
-- a 429 storm of a few seconds does not leave the fleet crawling for
-- minutes.
--
-- KEYS: the state hash, the GCRA state (redis_rate's format)
-- ARGV: now_ms, max_rate (the caller's configured limit), op, granted,
--       floor, cut_unknown, cut_known, settle_ms, window_ms, margin,
--       probe_ms, probe_step, cooldown_ms, ttl_ms, recover_ms, best_for_ms
-- op: "get" (a worker reads the rate; granted is the slots it took since
--     its last report), "decrease" (a worker saw a 429), "peek" (a reader:
--     the state as the workers left it, nothing written).
-- Returns {rate, lowered, ceiling or "", workers' limit or "", episode open}.
-- The GCRA state is written below with TIME: effects, not the script, are
-- replicated (the default since Redis 5; redis_rate asks the same).
redis.replicate_commands()
local h = KEYS[1]
local now = tonumber(ARGV[1])
local max = tonumber(ARGV[2])
local op = ARGV[3]
local s = redis.call('HMGET', h, 'rate', 'ceil', 'limit', 'g', 'l', 'ep', 'ep_at', 'ep_g', 'ep_l', 'hi',
  'dec_at', 'probe_at', 'probe_g', 'steps', 'at', 'best', 'best_at', 'probe_l', 'settle_at', 'settle_l')

if op == 'peek' then
  local limit = tonumber(s[3]) or max
  local rate = math.min(tonumber(s[1]) or limit, limit)
  local open = 0
  if s[6] and s[6] ~= '0' then open = 1 end
  return {tostring(rate), 0, s[2] or '', s[3] or '', open}
end

local floor = tonumber(ARGV[5])
local cur = math.min(tonumber(s[1]) or max, max)
local was = cur
local ceil = tonumber(s[2])
local g = (tonumber(s[4]) or 0) + tonumber(ARGV[4])
local l = tonumber(s[5]) or 0
local ep = tonumber(s[6]) or 0
local ep_at, ep_g, ep_l, hi = tonumber(s[7]), tonumber(s[8]), tonumber(s[9]), tonumber(s[10])
local dec_at = tonumber(s[11])
local probe_at, probe_g, probe_l = tonumber(s[12]) or now, tonumber(s[13]) or g, tonumber(s[18]) or l
local at = tonumber(s[15]) or now
local best, best_at = tonumber(s[16]), tonumber(s[17])
if best and now - best_at > tonumber(ARGV[16]) then best, best_at = nil, nil end
local lowered = 0
local settle_at, settle_l

if op == 'decrease' then
  l = l + 1
  -- Every worker sees the same burst: one episode at a time, and none
  -- for a cooldown after one closed (the calls granted before the workers
  -- read the new rate still come back 429).
  if ep == 0 and (not dec_at or now - dec_at >= tonumber(ARGV[13])) then
    -- Close to a known ceiling, the real limit drifted a little; far
    -- above it, or with none, the configured limit is simply wrong.
    local cut = tonumber(ARGV[6])
    if ceil and cur <= 1.5 * ceil then cut = tonumber(ARGV[7]) end
    hi = cur
    cur = math.max(floor, cur * cut)
    ep, ep_at, dec_at, lowered = 1, now, now, 1
    settle_at, settle_l = now, l
  end
end

if ep == 1 and now - ep_at >= tonumber(ARGV[8]) then
  -- Measure once the 429s of calls granted before the cut (and by workers
  -- that had not read it yet) have come back: over the last settling time
  -- no more 429s than the new rate could have granted calls. Counting them
  -- in the window would take them for calls WeChat refused at the new
  -- rate, and make the limit look lower than it is.
  local since, at_l = tonumber(s[19]) or ep_at, tonumber(s[20]) or l
  if now - since >= tonumber(ARGV[8]) then
    if l - at_l <= cur * (now - since) / 1000 + 1 or now - ep_at >= 10 * tonumber(ARGV[8]) then
      ep, ep_at, ep_g, ep_l = 2, now, g, l
    else
      settle_at, settle_l = now, l
    end
  end
elseif ep == 2 and now - ep_at >= tonumber(ARGV[9]) then
  local dt = (now - ep_at) / 1000
  local dg, dl = g - ep_g, l - ep_l
  local est = (dg - dl) / dt
  if dl > 0 and dl < dg and est >= 0.5 * cur then
    ceil = math.max(floor, est)
    cur = math.min(max, math.max(floor, ceil * tonumber(ARGV[10])))
    ep = 0
  elseif dl > 0 and dl < dg then
    -- Half the rate or less got through: rather than trust one short
    -- window that far down (late 429s may still have fallen in it), halve
    -- and measure again; the limit is under this rate.
    hi = cur
    cur = math.max(floor, cur / 2)
    ep, ep_at = 1, now
    settle_at, settle_l = now, l
  elseif dl > 0 then
    -- More 429s than slots granted in the window: late 429s of the cut
    -- fell in it. Measure again at the same rate.
    ep, ep_at = 1, now
    settle_at, settle_l = now, l
  else
    cur = (cur + hi) / 2
    if hi - cur > 0.02 * hi then
      ep, ep_at = 1, now
      settle_at, settle_l = now, l
    else
      ep = 0
    end
  end
  dec_at = now
  probe_at, probe_g, probe_l = now, g, l
end

if ep == 0 and best and cur < best and dec_at ~= now then
  cur = math.min(best, cur + (now - at) / tonumber(ARGV[15]) * best)
end

-- Each clean probe doubles the next step (up to 16 times the first), so
-- that a limit that was low for a while (a storm) is left within minutes,
-- while near the ceiling the fleet creeps up by a step at a time.
local steps = tonumber(s[14]) or 1
if lowered == 1 or dec_at == now then steps = 1 end
if ep == 0 and now - probe_at >= tonumber(ARGV[11]) then
  local used = (g - probe_g) / ((now - probe_at) / 1000)
  if used >= 0.9 * cur and l == probe_l then
    best, best_at = math.max(best or 0, math.min(used, cur)), now
    if cur < max and cur >= best then
      cur = math.min(max, cur * (1 + steps * tonumber(ARGV[12])))
      steps = math.min(16, steps * 2)
    end
  end
  probe_at, probe_g, probe_l = now, g, l
end

local fields = {'rate', tostring(cur), 'limit', tostring(max), 'g', tostring(g), 'l', tostring(l), 'ep', ep,
  'probe_at', probe_at, 'probe_g', tostring(probe_g), 'probe_l', tostring(probe_l), 'steps', steps, 'at', now}
if best then
  fields[#fields + 1] = 'best'
  fields[#fields + 1] = tostring(best)
  fields[#fields + 1] = 'best_at'
  fields[#fields + 1] = best_at
end
if ceil then
  fields[#fields + 1] = 'ceil'
  fields[#fields + 1] = tostring(ceil)
end
if ep ~= 0 then
  for _, kv in ipairs({{'ep_at', ep_at}, {'ep_g', ep_g}, {'ep_l', ep_l}, {'hi', hi}}) do
    if kv[2] then
      fields[#fields + 1] = kv[1]
      fields[#fields + 1] = tostring(kv[2])
    end
  end
end
if settle_at then
  fields[#fields + 1] = 'settle_at'
  fields[#fields + 1] = settle_at
  fields[#fields + 1] = 'settle_l'
  fields[#fields + 1] = tostring(settle_l)
end
if dec_at then
  fields[#fields + 1] = 'dec_at'
  fields[#fields + 1] = dec_at
end
redis.call('HSET', h, unpack(fields))
if cur < was then
  -- The GCRA state holds a burst's worth of slots at the old pace (a tenth
  -- of a second): granted at once after a cut, they are calls WeChat
  -- refuses too (the real limit is below the old rate). The next slot
  -- comes one interval at the new rate from now. TIME and the epoch are
  -- redis_rate's, whose script reads this key.
  local t = redis.call('TIME')
  local tnow = (t[1] - 1483228800) + t[2] / 1000000
  local burst = math.max(1, math.floor(cur / 10))
  local drained = tnow + burst / cur
  local tat = tonumber(redis.call('GET', KEYS[2]))
  if not tat or tat < drained then
    redis.call('SET', KEYS[2], tostring(drained), 'EX', math.ceil(drained - tnow))
  end
end
redis.call('PEXPIRE', h, tonumber(ARGV[14]))
local open = 0
if ep ~= 0 then open = 1 end
return {tostring(cur), lowered, ceil and tostring(ceil) or '', tostring(max), open}
