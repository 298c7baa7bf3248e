-- fence.lua: prelude of every script that issues fencing tokens.
--
-- next_token(fence, retention) returns the next fencing token of a lock name,
-- as a decimal string. KEYS and ARGV: none of its own; the caller passes
--   fence      the name's fence key, from its KEYS: a string "<last token>",
--              or "<last token>:<request id of the last full release>"
--   retention  how long the fence key outlives its last use, ms, from its ARGV
--
-- A token is the Redis server's clock in microseconds, raised to the last
-- token + 1 when the clock has not moved past it. So tokens strictly increase
-- while the fence key lives, and keep increasing after it is gone (expired,
-- FLUSHALL, a restart without persistence) because the server clock has moved
-- on; only a server clock stepped back by more than the retention while the
-- key is gone could repeat a token.
local function next_token(fence, retention)
  local now = redis.call('TIME')
  local token = tonumber(now[1]) * 1000000 + tonumber(now[2])
  local last = redis.call('GET', fence)
  if last then
    last = tonumber(string.match(last, '^%d+'))
    if last and token <= last then
      token = last + 1
    end
  end
  token = string.format('%.0f', token)
  redis.call('SET', fence, token, 'PX', retention)
  return token
end

