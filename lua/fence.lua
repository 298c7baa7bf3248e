-- fence.lua: prelude of every script that issues fencing tokens.
--
-- next_token(fence, retention[, suffix]) returns the next fencing token of a
-- lock name, as a Lua number. KEYS and ARGV: none of its own; the caller
-- passes
--   fence      the name's fence key, from its KEYS: a string "<last token>",
--              or "<last token>:<request id of the last full release>"
--   retention  how long the fence key outlives its last use, ms, from its ARGV
--   suffix     nil, or ":<request id>" when the new token is issued by a full
--              release (a handoff): written after the token
-- token_str(token) returns a token as a decimal string, for concatenation:
-- Lua's own number-to-string conversion loses digits past 14.
--
-- A token is the last token + 1 while the fence key lives, and the Redis
-- server's clock in microseconds when it is gone (the first use, expiry,
-- FLUSHALL, a restart without persistence). Issuing a token takes a script
-- run, which takes longer than a microsecond, so tokens trail the server
-- clock: they strictly increase while the fence key lives, and keep
-- increasing after it is gone because the clock has moved past them. Only a
-- server clock stepped back while the key is gone could repeat a token.
--
-- Tokens stay below 2^53, so Lua numbers hold them exactly. A number passed
-- to redis.call is written out by Redis as an integer (Redis 7.2.0 to 7.2.4
-- use exponent notation for numbers with 8 or more trailing zeros), so a
-- stored token is read back with tonumber of the whole part before ':'.
local function next_token(fence, retention, suffix)
  local token
  local last = redis.call('GET', fence)
  if last then
    token = tonumber(string.match(last, '^[^:]+'))
  end
  if token then
    token = token + 1
  else
    local now = redis.call('TIME')
    token = tonumber(now[1]) * 1000000 + tonumber(now[2])
  end
  if suffix then
    redis.call('SET', fence, string.format('%.0f', token) .. suffix, 'PX', retention)
  else
    redis.call('SET', fence, token, 'PX', retention)
  end
  return token
end

local function token_str(token)
  return string.format('%.0f', token)
end

