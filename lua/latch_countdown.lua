-- latch_countdown.lua: count a CountDownLatch down by one; at zero, delete
-- it and wake every waiter.
--
-- KEYS[1]  latch count: a string holding a positive integer while counting;
--          no key when finished or never set
-- KEYS[2]  wake-up channel of the latch
-- ARGV[1]  publish command: PUBLISH, or SPUBLISH on a Redis Cluster
--
-- Returns the count after the call: 0 when the latch is open (it was at 1,
-- or already open or unset: counting down an open latch does nothing).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local c = redis.call('DECR', KEYS[1])
if c > 0 then
  return c
end
redis.call('DEL', KEYS[1])
redis.call(ARGV[1], KEYS[2], 'a')
return 0
