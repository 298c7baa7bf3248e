-- latch_countdown.lua: count a CountDownLatch down by one; at zero, delete
-- it and wake every waiter. Runs after latch_common.lua.
--
-- KEYS[1]  latch count: a string holding a positive integer while counting;
--          no key when finished or never set
-- KEYS[2]  wake-up channel of the latch
-- KEYS[3]  recent request ids of the latch: a sorted set, id -> server ms
--          when the call ran (a CountDown, a TrySetCount that set the
--          count, a Delete; a Delete that found no count, and a
--          TrySetCount that found a count running, as "<id>|0").
--          Entries older than a minute are dropped, and the key expires a
--          minute after its last entry. It outlives the count, so a call
--          resent after its latch opened and was set again is still
--          recognised and does not act on the new count.
-- ARGV[1]  publish command: PUBLISH, or SPUBLISH on a Redis Cluster
-- ARGV[2]  request id: unique per CountDown call, reused by its retries
--
-- Returns the count after the call: 0 when the latch is open (it was at 1,
-- or already open or unset: counting down an open latch does nothing).
--
-- A request id seen again means the reply to an earlier run of this very
-- call was lost (the client retried): the call acts once, at its first run.
-- The count is not decremented twice, whether it still runs or opened and
-- was set again since; and a call that found the latch open does nothing
-- when resent after a new count was set (so it is remembered too).
if redis.call('ZSCORE', KEYS[3], ARGV[2]) then
  return tonumber(redis.call('GET', KEYS[1]) or '0')
end
local v = read_count(KEYS[1])
if v == nil then
  return redis.error_reply(wrong_type)
end
if not v then
  remember(KEYS[3], ARGV[2])
  return 0
end
local c = redis.call('DECR', KEYS[1])
remember(KEYS[3], ARGV[2])
if c > 0 then
  return c
end
redis.call('DEL', KEYS[1])
redis.pcall(ARGV[1], KEYS[2], 'a')
return 0
