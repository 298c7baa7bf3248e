-- rw_runlock.lua: release one read hold of an RWMutex, or undo a read
-- acquisition whose reply was lost.
--
-- KEYS[1]  lock hash (see rw_common.lua)
-- KEYS[2]  fence key of the lock name (see rw_unlock.lua)
-- KEYS[3]  writers' wake-up channel
-- ARGV[1]  owner id
-- ARGV[2]  request id: unique per RUnlock call, reused by its retries
-- ARGV[3]  publish command: PUBLISH, or SPUBLISH on a Redis Cluster
-- ARGV[4]  fence retention, ms
-- ARGV[5]  "" for an RUnlock; for an undo, the request id of the acquisition
--          to undo
-- ARGV[6]  the request id that began the read hold the caller releases (see
--          rw_rlock.lua), or "" when it does not know it: a read hold begun
--          by another request is not the caller's, even when its owner id
--          is (a later read hold of the same owner, taken after the
--          caller's ended without this release)
-- ARGV[7]  optional, an RUnlock only (never an undo): the request id of a
--          read acquisition whose reply reached its caller, which this
--          release ends: a partial release drops it from rq:<owner> (see
--          rw_unlock.lua). Left out when unused.
--
-- Returns the owner's remaining read hold count, or -1 when ARGV[1] does not
-- hold the read lock. A release that leaves the lock free while writers wait
-- wakes one writer of each Client ("1" on KEYS[3]).
local s = rw_load(KEYS[1])
local f, o, req = s.f, ARGV[1], ARGV[2]
local c = tonumber(f['rc:' .. o])
if ARGV[5] ~= '' then
  -- An undo ends its acquisition call: leave a tombstone so that a copy
  -- of its attempt still on the way takes nothing when it comes late
  -- (see fence.lua).
  fence_tombstone(KEYS[2], ARGV[5], ARGV[4])
  if not c or not ids_has(f['rq:' .. o], ARGV[5]) then
    rw_commit(s)
    return -1
  end
  rw_set(s, 'rq:' .. o, ids_drop(f['rq:' .. o], ARGV[5]))
end
if c and ARGV[6] ~= '' and f['rg:' .. o] ~= ARGV[6] then
  c = nil -- not the caller's read hold
end
if not c then
  local done = rw_was_released(s, KEYS[2], req)
  rw_commit(s)
  if done then
    return 0
  end
  return -1
end
-- A full release seen already: resent after a lost reply, once the owner
-- (another handle sharing its id, or another goroutine) read again.
if rw_was_released(s, KEYS[2], req) then
  rw_commit(s)
  return 0
end
if ids_has(f['ru:' .. o], req) then
  rw_commit(s)
  return c
end
c = c - 1
if c > 0 then
  rw_set(s, 'rc:' .. o, tostring(c))
  rw_set(s, 'ru:' .. o, ids_add(f['ru:' .. o], req))
  if ARGV[7] and ARGV[7] ~= '' then
    local q = f['rq:' .. o]
    local left = ids_drop(q, ARGV[7])
    if left ~= q then
      rw_set(s, 'rq:' .. o, left)
    end
  end
  rw_commit(s)
  return c
end
rw_released(s, req, f['ru:' .. o]) -- before rw_drop_reader drops ru:<owner>
rw_drop_reader(s, o)
local readers, waiting = rw_scan(s)
rw_commit(s)
rw_fence_release(KEYS[2], s, ARGV[4])
if readers == 0 and not f.w and waiting > 0 then
  redis.pcall(ARGV[3], KEYS[3], '1')
end
return 0
