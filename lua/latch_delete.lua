-- latch_delete.lua: delete a CountDownLatch, opening it: every waiter is
-- woken as if the count had reached zero. Runs after latch_common.lua.
--
-- KEYS[1]  latch count (see latch_countdown.lua)
-- KEYS[2]  wake-up channel of the latch
-- KEYS[3]  recent request ids of the latch (see latch_countdown.lua)
-- ARGV[1]  publish command: PUBLISH, or SPUBLISH on a Redis Cluster
-- ARGV[2]  request id: unique per Delete call, reused by its retries
--
-- Returns 1 when a count was running, 0 when the latch was open already
-- (finished, never set, or deleted by someone else).
--
-- A request id seen again means the reply to an earlier run of this very
-- call was lost (the client retried): the call acts once, at its first run,
-- and its resend reports what that run did. A count set since then is left
-- alone, also when the first run found none.
if redis.call('ZSCORE', KEYS[3], ARGV[2]) then
  return 1
end
if redis.call('ZSCORE', KEYS[3], ARGV[2] .. '|0') then
  return 0
end
local v = read_count(KEYS[1])
if v == nil then
  return redis.error_reply(wrong_type)
end
if not v then
  remember(KEYS[3], ARGV[2] .. '|0')
  return 0
end
redis.call('DEL', KEYS[1])
remember(KEYS[3], ARGV[2])
redis.pcall(ARGV[1], KEYS[2], 'a')
return 1
