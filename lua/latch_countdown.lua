-- latch_countdown.lua: count a CountDownLatch down by one; at zero, delete
-- it and wake every waiter.
--
-- KEYS[1]  latch count: a string holding a positive integer while counting;
--          no key when finished or never set
-- KEYS[2]  wake-up channel of the latch
-- KEYS[3]  recent CountDown request ids: a sorted set, id -> server ms when
--          applied; entries older than a minute are dropped, and the key is
--          deleted with the count
-- ARGV[1]  publish command: PUBLISH, or SPUBLISH on a Redis Cluster
-- ARGV[2]  request id: unique per CountDown call, reused by its retries
--
-- Returns the count after the call: 0 when the latch is open (it was at 1,
-- or already open or unset: counting down an open latch does nothing).
--
-- A request id seen again means the reply to an earlier run of this very
-- call was lost (the client retried): the count is not decremented twice.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
if redis.call('ZSCORE', KEYS[3], ARGV[2]) then
  return tonumber(redis.call('GET', KEYS[1]))
end
local c = redis.call('DECR', KEYS[1])
if c > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - 60000)
  redis.call('ZADD', KEYS[3], now, ARGV[2])
  redis.call('PEXPIRE', KEYS[3], 60000)
  return c
end
redis.call('DEL', KEYS[1], KEYS[3])
redis.call(ARGV[1], KEYS[2], 'a')
return 0
