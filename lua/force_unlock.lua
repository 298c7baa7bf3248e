-- force_unlock.lua: release a lock whoever holds it, and wake its waiters.
-- Runs after fence_release.lua and fence_force.lua.
--
-- KEYS[1]  the lock's key
-- KEYS[2]  wake-up channel of the lock
-- KEYS[3]  fence key of the lock name (see fence.lua)
-- ARGV[1]  publish command: PUBLISH, or SPUBLISH on a Redis Cluster
-- ARGV[2]  wake-up message: "1" wakes one waiter per client, "a" all
-- ARGV[3]  request id: unique per call, reused by its retries
-- ARGV[4]  fence retention, ms
--
-- Returns 1 when a hold was released, 0 when the lock was free, or a
-- WRONGTYPE error, touching nothing, when the key is not a hash. A resend
-- after a lost reply (go-redis resends the script) returns what the first
-- run did and changes nothing (see fence_force.lua).
local f = forced(redis.call('GET', KEYS[3]), ARGV[3])
if f then
  return f
end
local t = redis.pcall('HGET', KEYS[1], 't')
if type(t) == 'table' and t.err then
  -- Not a hash: a value redlatch did not write. Lock reports it as
  -- ErrWrongType; so does ForceUnlock, which leaves it alone.
  return t
end
if type(t) ~= 'string' then
  t = nil -- no hold
end
local held = redis.call('DEL', KEYS[1])
force_record(KEYS[3], ARGV[3], held, t, ARGV[4])
if held == 1 then
  redis.pcall(ARGV[1], KEYS[2], ARGV[2])
end
return held
