-- fair_force_unlock.lua: release a FairMutex whoever holds it, and hand it
-- to the queue head.
--
-- KEYS[1..5], ARGV[1..2]: see fair_common.lua
-- ARGV[3]  request id: unique per call, reused by its retries
--
-- Returns 1 when a hold was released, 0 when the lock was free.
--
-- A retry after a lost reply (go-redis resends the script) is recognised
-- (see fence_force.lua): it must not release the hold the first run handed
-- to the queue head, and hand the lock to the next waiter as well, nor a
-- hold taken after that.
local f = forced(redis.call('GET', KEYS[4]), ARGV[3])
if f then
  return f
end
local t = redis.call('HGET', KEYS[1], 't')
local held = redis.call('DEL', KEYS[1])
local now = now_ms()
evict(now)
fence_suffix = ':' .. ARGV[3]
if not grant(now, nil, t or nil) and held == 1 then
  fence_set_release(KEYS[4], t or '', ARGV[3], ARGV[2])
end
force_record(KEYS[4], ARGV[3], held, t or nil, ARGV[2])
return held
