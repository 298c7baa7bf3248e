-- fair_unlock.lua: release one hold of a FairMutex, handing the lock to the
-- queue head on the last one; or withdraw a waiter (its wait ended, or the
-- reply to one of its attempts was lost), releasing what it was granted.
--
-- KEYS[1..5], ARGV[1..2]: see fair_common.lua
-- ARGV[3]  owner id
-- ARGV[4]  request id: unique per call, reused by its retries
-- ARGV[5]  "" for an Unlock; for a withdrawal, the waiter id: its queue
--          place is removed, and the hold is released only if that waiter
--          was granted it (or took it)
-- ARGV[6]  member of the waiter, for a withdrawal; else ""
--
-- Returns the owner's remaining hold count (0: the lock was released and
-- handed to the queue head, if any), or -1 when the owner holds nothing (for
-- a withdrawal: nothing granted to that waiter).
local now = now_ms()
if ARGV[5] ~= '' then
  redis.call('ZREM', KEYS[2], ARGV[6])
  redis.call('ZREM', KEYS[3], ARGV[6])
end
settle(now)
local v = redis.call('HMGET', KEYS[1], 'o', 'c', 'g', 'q', 'u', 't')
if v[1] ~= ARGV[3] then
  local f = redis.call('GET', KEYS[4])
  if f and string.match(f, ':(.*)$') == ARGV[4] then
    return 0
  end
  return -1
end
if ARGV[5] ~= '' and v[3] ~= ARGV[5] and v[4] ~= ARGV[5] then
  return -1
end
if v[5] == ARGV[4] then
  return tonumber(v[2])
end
local c = tonumber(v[2]) - 1
if c > 0 then
  redis.call('HSET', KEYS[1], 'c', c, 'u', ARGV[4])
  if ARGV[5] ~= '' then
    -- The withdrawn acquisition is undone: it can no longer be claimed.
    redis.call('HSET', KEYS[1], 'g', '', 'q', '')
  end
  return c
end
redis.call('DEL', KEYS[1])
local token = grant(now) or v[6]
redis.call('SET', KEYS[4], token .. ':' .. ARGV[4], 'PX', ARGV[2])
return 0
