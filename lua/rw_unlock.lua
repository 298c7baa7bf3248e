-- rw_unlock.lua: release one write hold of an RWMutex, or undo a write
-- acquisition whose reply was lost.
--
-- KEYS[1]  lock hash (see rw_common.lua)
-- KEYS[2]  fence key of the lock name: the last token, the request ids of
--          the last full releases (see rw_fence_release) and the
--          tombstones (see fence.lua)
-- KEYS[3]  readers' wake-up channel
-- KEYS[4]  writers' wake-up channel
-- ARGV[1]  owner id
-- ARGV[2]  request id: unique per Unlock call, reused by its retries
-- ARGV[3]  publish command: PUBLISH, or SPUBLISH on a Redis Cluster
-- ARGV[4]  fence retention, ms
-- ARGV[5]  "" for an Unlock; for an undo, the request id of the acquisition
--          to undo: a hold is released only if that acquisition took it
-- ARGV[6]  fencing token of the write hold the caller releases, or "" when
--          it does not know it (see unlock.lua): a write hold with another
--          token is not the caller's, even when its owner id is
-- ARGV[7]  optional, an Unlock only (never an undo): the request id of a
--          write acquisition whose reply reached its caller, which this
--          release ends: a partial release drops it from wq (see ids.lua),
--          which then names only acquisitions a caller may still undo or
--          resend (see unlock.lua). Left out when unused: each argument
--          costs the call about as much as a short command.
--
-- Returns the owner's remaining write hold count, or -1 when ARGV[1] does not
-- hold the write lock. The last write hold's release wakes every local reader
-- of each Client ("a" on KEYS[3]) and one writer ("1" on KEYS[4]); the owner
-- keeps its read holds, if any (a downgrade).
local s = rw_load(KEYS[1])
local f, o, req = s.f, ARGV[1], ARGV[2]
if ARGV[5] ~= '' then
  -- An undo ends its acquisition call: leave a tombstone so that a copy
  -- of its attempt still on the way takes nothing when it comes late
  -- (see fence.lua).
  fence_tombstone(KEYS[2], ARGV[5], ARGV[4])
  if f.w ~= o or not ids_has(f.wq, ARGV[5]) then
    rw_commit(s)
    return -1
  end
  rw_set(s, 'wq', ids_drop(f.wq, ARGV[5]))
end
-- The token named is the writer's: as in unlock.lua (named), the same
-- digits, or the same number for a form an older version wrote.
local named = ARGV[6] == '' or f.t == ARGV[6] or (f.t ~= nil
  and not (string.find(f.t, '^%d+$') and string.find(ARGV[6], '^%d+$'))
  and tonumber(f.t) == tonumber(ARGV[6]))
if f.w ~= o or not named then
  local done = rw_was_released(s, KEYS[2], req)
  rw_commit(s)
  if done then
    return 0
  end
  return -1
end
if ids_has(f.wu, req) then
  rw_commit(s)
  return tonumber(f.wc)
end
local c = tonumber(f.wc) - 1
if c > 0 then
  rw_set(s, 'wc', tostring(c))
  rw_set(s, 'wu', ids_add(f.wu, req))
  if ARGV[7] and ARGV[7] ~= '' then
    local left = ids_drop(f.wq, ARGV[7])
    if left ~= f.wq then
      rw_set(s, 'wq', left)
    end
  end
  rw_commit(s)
  return c
end
local token = f.t
rw_released(s, req, f.wu) -- before rw_drop_writer drops wu
rw_drop_writer(s)
-- Whether or not the hash stays (a writer waits, or the owner reads on),
-- the fence key records the release (see rw_fence_release) and passes this
-- hold's token, which it may have lost during the hold (see next_token's
-- held), or the next writer's token comes from the clock alone.
rw_commit(s)
rw_fence_release(KEYS[2], s, ARGV[4], token)
redis.pcall(ARGV[3], KEYS[3], 'a')
redis.pcall(ARGV[3], KEYS[4], '1')
return 0
