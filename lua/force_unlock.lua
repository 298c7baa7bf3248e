-- force_unlock.lua: release a lock whoever holds it, and wake its waiters.
--
-- KEYS[1]  the lock's key
-- KEYS[2]  wake-up channel of the lock
-- ARGV[1]  publish command: PUBLISH, or SPUBLISH on a Redis Cluster
-- ARGV[2]  wake-up message: "1" wakes one waiter per client, "a" all
--
-- Returns 1 when a hold was released, 0 when the lock was free.
if redis.call('DEL', KEYS[1]) == 0 then
  return 0
end
redis.call(ARGV[1], KEYS[2], ARGV[2])
return 1
