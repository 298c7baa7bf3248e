-- latch_delete.lua: delete a CountDownLatch, opening it: every waiter is
-- woken as if the count had reached zero.
--
-- KEYS[1]  latch count (see latch_countdown.lua)
-- KEYS[2]  wake-up channel of the latch
-- KEYS[3]  recent request ids of the latch (see latch_countdown.lua)
-- ARGV[1]  publish command: PUBLISH, or SPUBLISH on a Redis Cluster
--
-- Returns 1 when a count was running, 0 when the latch was open already
-- (finished, never set, or deleted by an earlier run of this very call
-- whose reply was lost).
if redis.call('DEL', KEYS[1]) == 0 then
  return 0
end
redis.call('DEL', KEYS[3])
redis.call(ARGV[1], KEYS[2], 'a')
return 1
