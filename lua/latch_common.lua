-- latch_common.lua: prelude of the CountDownLatch scripts.
--
-- remember(ids, req) records request id req in the latch's set of recent
-- request ids (see latch_countdown.lua) with the server time, drops the
-- entries older than a minute, and has the set expire a minute from now.
-- KEYS and ARGV: none of its own; the caller passes the set's key from its
-- KEYS and the request id from its ARGV.
local memory_ms = 60000
local function remember(ids, req)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZREMRANGEBYSCORE', ids, '-inf', now - memory_ms)
  redis.call('ZADD', ids, now, req)
  redis.call('PEXPIRE', ids, memory_ms)
end

-- read_count(key) returns the count at key (a string of digits), false when
-- the latch is open, or nil when the key holds data redlatch did not write:
-- the caller then returns redis.error_reply(wrong_type), which the client
-- reports as ErrWrongType. GET itself fails with WRONGTYPE on a key of
-- another type. So no script counts down, reports as running, or deletes
-- another program's data.
local wrong_type = 'WRONGTYPE latch count key holds a value redlatch did not write'
-- A count is a positive integer as Redis's DECR reads it: no leading
-- zeros, no '+', within int64 (a string of digits DECR refuses is not a
-- count). "0" and negatives are not counts either: TrySetCount sets n >= 1
-- and the CountDown that reaches 0 deletes the key, so no script of
-- redlatch leaves one (and Count, which reads them so too, would call the
-- latch open while TrySetCount called it running).
local function is_count(v)
  local digits = string.match(v, '^([1-9]%d*)$')
  if not digits or #digits > 19 then
    return false
  end
  return #digits < 19 or digits <= '9223372036854775807'
end
local function read_count(key)
  local v = redis.call('GET', key)
  if v and not is_count(v) then
    return nil
  end
  return v
end
