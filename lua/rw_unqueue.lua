-- rw_unqueue.lua: a writer stops waiting for the write lock of an RWMutex
-- (its wait ended without the lock).
--
-- KEYS[1]  lock hash (see rw_common.lua)
-- KEYS[2]  readers' wake-up channel
-- KEYS[3]  fence key of the lock name: when the place was the last lease in
--          the hash, the releases the hash remembered go there (see
--          rw_commit_fenced)
-- ARGV[1]  owner id
-- ARGV[2]  publish command: PUBLISH, or SPUBLISH on a Redis Cluster
-- ARGV[3]  fence retention, ms
-- ARGV[4]  request id of the Lock call that gave up
--
-- Returns 1 when the owner's waiting place was removed, else 0. The place
-- is removed only when that call was the last to queue the owner or to
-- refresh its place (see rw_lock.lua): an unqueue that comes late (run in
-- the background, or resent) leaves alone the place of the owner's next
-- Lock, or that of another Lock of the owner still waiting. When it was
-- the last waiting writer and no writer holds the lock, the readers queued
-- behind it are woken ("a" on KEYS[2]).
local s = rw_load(KEYS[1])
local o = ARGV[1]
local by = s.f['wr:' .. o]
if not s.f['ww:' .. o] or (by and by ~= ARGV[4]) then
  rw_commit_fenced(s, KEYS[3], ARGV[3])
  return 0
end
rw_unwait(s, o)
local _, waiting = rw_scan(s)
rw_commit_fenced(s, KEYS[3], ARGV[3])
if waiting == 0 and not s.f.w then
  redis.pcall(ARGV[2], KEYS[2], 'a')
end
return 1
