-- Prepended to every script of the store. Redis keeps the writes of a
-- script that fails halfway, so a script checks what could fail before it
-- writes anything.

-- numbers returns an error reply naming the first field of hash key that
-- holds something other than a number, or nil.
local function numbers(key, fields)
  for _, f in ipairs(fields) do
    local v = redis.call('HGET', key, f)
    if v and not tonumber(v) then
      return redis.error_reply(f .. ' of ' .. key .. ' is not a number: ' .. v)
    end
  end
  return nil
end
