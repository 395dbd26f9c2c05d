-- Note where a campaign's report was archived, in its meta and its
-- tombstone, whichever exist; never creating either.
-- KEYS: meta, tomb
-- ARGV: where, now_ms
local n = 0
for i = 1, 2 do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('HSET', KEYS[i], 'report', ARGV[1], 'report_at', ARGV[2])
    n = n + 1
  end
end
return n
