-- fair_force_unlock.lua: release a FairMutex whoever holds it, and hand it
-- to the queue head.
--
-- KEYS[1..5], ARGV[1..2]: see fair_common.lua
-- ARGV[3]  request id: unique per call, reused by its retries
--
-- Returns 1 when a hold was released, 0 when the lock was free.
--
-- The release is recorded in the fence key (see fence.lua) with the request
-- id, so that a retry after a lost reply (go-redis resends the script) is
-- recognised: it must not release the hold the first run handed to the
-- queue head, and hand the lock to the next waiter as well. A call that
-- found the lock free is recorded as ARGV[3] .. "~0": its retry must not
-- release a hold taken in between either.
local fv = redis.call('GET', KEYS[4])
local done = fence_release(fv)
if done == ARGV[3] then
  return 1
elseif done == ARGV[3] .. '~0' then
  return 0
end
local t = redis.call('HGET', KEYS[1], 't')
local held = redis.call('DEL', KEYS[1])
local now = now_ms()
evict(now)
fence_suffix = ':' .. ARGV[3]
if not grant(now, nil, t or nil) then
  if held == 1 then
    fence_set_release(KEYS[4], t or '', ARGV[3], ARGV[2])
  else
    local last = (fv and string.match(fv, '^[^:|]*')) or ''
    fence_set_release(KEYS[4], last, ARGV[3] .. '~0',
      math.max(tonumber(ARGV[2]), redis.call('PTTL', KEYS[4])))
  end
end
return held
