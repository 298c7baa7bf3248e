-- latch_set.lua: start a CountDownLatch's count if none is running.
--
-- KEYS[1]  latch count (see latch_countdown.lua)
-- KEYS[2]  recent request ids of the latch (see latch_countdown.lua)
-- ARGV[1]  the count, ≥ 1
-- ARGV[2]  request id: unique per TrySetCount call, reused by its retries
--
-- Returns 1 when this call set the count, 0 when another count runs. A
-- request id seen again means the reply to an earlier run of this very call
-- was lost (the client retried): it set the count, so 1 again.
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('ZSCORE', KEYS[2], ARGV[2]) then
    return 1
  end
  return 0
end
redis.call('SET', KEYS[1], ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 60000)
redis.call('ZADD', KEYS[2], now, ARGV[2])
redis.call('PEXPIRE', KEYS[2], 60000)
return 1
