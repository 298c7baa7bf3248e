-- latch_set.lua: start a CountDownLatch's count if none is running. Runs
-- after latch_common.lua.
--
-- KEYS[1]  latch count (see latch_countdown.lua)
-- KEYS[2]  recent request ids of the latch (see latch_countdown.lua)
-- ARGV[1]  the count, ≥ 1
-- ARGV[2]  request id: unique per TrySetCount call, reused by its retries
--
-- Returns 1 when this call set the count, 0 when another count runs. A
-- request id seen again means the reply to an earlier run of this very call
-- was lost (the client retried): the call acts once, at its first run, and
-- reports what that run did. One that set the count reports 1 again, and
-- nothing is set twice, even when that count has finished since; one that
-- found a count running (remembered as "<id>|0") reports 0 again and sets
-- nothing when that count has finished since (its caller may have been
-- told 0 already, by a copy that came first: a count set now would block
-- every waiter, with no expiry).
local seen = redis.call('ZMSCORE', KEYS[2], ARGV[2], ARGV[2] .. '|0')
if seen[1] then
  return 1
end
if seen[2] then
  return 0
end
local v = read_count(KEYS[1])
if v == nil then
  return redis.error_reply(wrong_type)
end
if v then
  remember(KEYS[2], ARGV[2] .. '|0')
  return 0
end
redis.call('SET', KEYS[1], ARGV[1])
remember(KEYS[2], ARGV[2])
return 1
