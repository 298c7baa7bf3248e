-- rw_unqueue.lua: a writer stops waiting for the write lock of an RWMutex
-- (its wait ended without the lock).
--
-- KEYS[1]  lock hash (see rw_common.lua)
-- KEYS[2]  readers' wake-up channel
-- ARGV[1]  owner id
-- ARGV[2]  publish command: PUBLISH, or SPUBLISH on a Redis Cluster
--
-- Returns 1 when the owner's waiting place was removed, else 0. When it was
-- the last waiting writer and no writer holds the lock, the readers queued
-- behind it are woken ("a" on KEYS[2]).
local s = rw_load(KEYS[1])
local k = 'ww:' .. ARGV[1]
if not s.f[k] then
  rw_commit(s)
  return 0
end
rw_del(s, k)
local _, waiting = rw_scan(s)
rw_commit(s)
if waiting == 0 and not s.f.w then
  redis.call(ARGV[2], KEYS[2], 'a')
end
return 1
