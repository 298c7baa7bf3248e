-- fair_force_unlock.lua: release a FairMutex whoever holds it, and hand it
-- to the queue head.
--
-- KEYS[1..5], ARGV[1..2]: see fair_common.lua
--
-- Returns 1 when a hold was released, 0 when the lock was free.
local held = redis.call('DEL', KEYS[1])
local now = now_ms()
evict(now)
grant(now)
return held
