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
-- was lost (the client retried): it set the count, so 1 again, and nothing
-- is set twice, even when that count has finished since.
if redis.call('ZSCORE', KEYS[2], ARGV[2]) then
  return 1
end
local v = read_count(KEYS[1])
if v == nil then
  return redis.error_reply(wrong_type)
end
if v then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1])
remember(KEYS[2], ARGV[2])
return 1
