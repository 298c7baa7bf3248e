-- fair_unlock.lua: release one hold of a FairMutex, handing the lock to the
-- queue head on the last one; or withdraw a waiter (its wait ended, or the
-- reply to one of its attempts was lost), releasing what it was granted.
--
-- KEYS[1..5], ARGV[1..2]: see fair_common.lua
-- ARGV[3]  owner id
-- ARGV[4]  request id: unique per call, reused by its retries
-- ARGV[5]  id of the calling Client: a grant to one of its own waiters is
--          returned instead of published (see grant)
-- ARGV[6]  fencing token of the hold the caller releases, or "" when it does
--          not know it (see unlock.lua): a hold with another token is not
--          the caller's, even when its owner id is
-- ARGV[7]  absent (or "") for an Unlock; for a withdrawal, the waiter id:
--          its queue place is removed, and the hold is released only if that
--          waiter was granted it (or took it)
-- ARGV[8]  member of the waiter, for a withdrawal
-- ARGV[9]  optional:
--   an Unlock (ARGV[7] and ARGV[8] are then ""): the request (waiter) id of
--          an acquisition of the hold whose reply reached its caller, which
--          this release ends: a partial release drops it from the hold's
--          acquisitions (field q, see ids.lua), which then name only
--          acquisitions a caller may still withdraw
--   a withdrawal: "1" when an attempt of the waiter may still be on its way
--          (its outcome is unknown): a tombstone is left for it; absent
--          when every attempt was answered (a name keeps only the last 32
--          tombstones: those of waiters whose wait ended while they slept
--          would push out the one that matters)
-- (An Unlock leaves ARGV[7..9] out when it names no acquisition: each
-- argument costs the call about as much as a short command.)
--
-- Returns {count, grant}: count is the owner's remaining hold count (0: the
-- lock was released and handed to the queue head, if any), or -1 when the
-- owner holds nothing (for a withdrawal: nothing granted to that waiter);
-- grant is "<waiter id>:<token>" when the lock went to a waiter of the
-- calling Client, which must deliver it, else "".
local_client = ARGV[5]
local withdraw = ARGV[7] or ''
local function reply(n)
  return {n, local_grant or ''}
end
local now -- read when needed: an uncontended release needs no clock
if withdraw ~= '' then
  redis.call('ZREM', KEYS[2], ARGV[8])
  redis.call('ZREM', KEYS[3], ARGV[8])
end
-- o, c, u, t; a withdrawal also reads g and q (fields 5 and 6)
local v = redis.call('HMGET', KEYS[1], 'o', 'c', 'u', 't')
-- An Unlock by an owner that holds nothing releases nothing: a grant settle
-- makes below is the queue head's, even when its owner id is the caller's
-- (a tokenless Unlock could not tell the holds apart).
local mine = v[1] == ARGV[3] or withdraw ~= ''
if v[1] ~= ARGV[3] or withdraw ~= '' then
  -- The holder's release needs no settling: its lock is not free, and
  -- grant passes over expired places itself.
  now = now_ms()
  settle(now)
  v = redis.call('HMGET', KEYS[1], 'o', 'c', 'u', 't', 'g', 'q')
end
-- released reports whether this request is a full release done already,
-- or a partial release of the hold that the last full release ended (see
-- below): a retry after a lost reply. The full release may have granted
-- the lock to a waiter of this Client without publishing: the pending grant
-- is reported again, and the Client ignores it unless one of its waiters
-- has that id.
local function released()
  if not ids_has(fence_release(redis.call('GET', KEYS[4])), ARGV[4]) then
    return false
  end
  local g = redis.call('HMGET', KEYS[1], 'g', 't')
  if g[1] and g[1] ~= '' and g[2] then
    local_grant = g[1] .. ':' .. g[2]
  end
  return true
end
if withdraw ~= '' then
  -- A withdrawal ends the waiter's call: leave a tombstone so that an
  -- attempt of it still on the way takes nothing, and does not queue, when
  -- it comes late.
  if ARGV[9] == '1' then
    fence_tombstone(KEYS[4], withdraw, ARGV[2])
  end
  if v[1] ~= ARGV[3] or (v[5] ~= withdraw and not ids_has(v[6], withdraw)) then
    -- It holds nothing: queued, failed, or not arrived; or a resend of a
    -- withdrawal whose first run released what it held, which may have
    -- handed the lock to a waiter of this Client: reported again.
    released()
    return reply(-1)
  end
end
-- The token named is the hold's: as in unlock.lua (named), the same
-- digits, or the same number for a form an older version wrote.
local named = ARGV[6] == '' or v[4] == ARGV[6] or (v[4] ~= false and v[4] ~= nil
  and not (string.find(v[4], '^%d+$') and string.find(ARGV[6], '^%d+$'))
  and tonumber(v[4]) == tonumber(ARGV[6]))
if not mine or v[1] ~= ARGV[3] or not named then
  if released() then
    return reply(0)
  end
  return reply(-1)
end
if ids_has(v[3], ARGV[4]) then
  return reply(tonumber(v[2])) -- a partial release done already (see ids.lua)
end
local c = tonumber(v[2]) - 1
if c > 0 then
  redis.call('HSET', KEYS[1], 'c', c, 'u', ids_add(v[3], ARGV[4]))
  if withdraw ~= '' then
    -- The withdrawn acquisition is undone: it can no longer be claimed,
    -- and the others the hold counts stay.
    local g = v[5]
    if g == withdraw then
      g = ''
    end
    redis.call('HSET', KEYS[1], 'g', g, 'q', ids_drop(v[6], withdraw))
  elseif ARGV[9] and ARGV[9] ~= '' then
    local q = redis.call('HGET', KEYS[1], 'q')
    local left = ids_drop(q, ARGV[9])
    if left ~= q then
      redis.call('HSET', KEYS[1], 'q', left)
    end
  end
  return reply(c)
end
-- The final release, with the hold's partial releases (space-separated,
-- see fence.lua): one of them resent after this release (its reply was
-- lost while another goroutine's Unlock ended the hold) is recognised.
local ended = ARGV[4]
if v[3] and v[3] ~= '' then
  ended = ARGV[4] .. ' ' .. v[3]
end
-- The hash becomes the new hold's in place when someone waits.
fence_suffix = ':' .. ended
if not grant(now, v[3], v[4]) then
  redis.call('DEL', KEYS[1])
  fence_set_release(KEYS[4], v[4], ended, ARGV[2])
end
return reply(0)
