-- unlock.lua: release one hold of an exclusive lock (Mutex, ReentrantMutex),
-- or undo an acquisition whose reply was lost.
--
-- KEYS[1]  lock hash (see lock.lua)
-- KEYS[2]  fence key of the lock name: the last token, the request id of
--          the last full release and the tombstones (see fence.lua)
-- KEYS[3]  wake-up channel of the lock; left out by a local transfer, which
--          the call is when it passes two keys
-- ARGV[1]  owner id
-- ARGV[2]  request id: unique per Unlock call, reused by its retries
-- ARGV[3]  a release or an undo: the publish command, PUBLISH, or SPUBLISH
--          on a Redis Cluster; a local transfer (see Client.acquire), which
--          hands the lock to a waiter of the same Client instead of
--          releasing it: that waiter's owner id
-- ARGV[4]  fence retention, ms
-- ARGV[5]  fencing token of the hold the caller releases, or "" when it does
--          not know it: a hold with another token is not the caller's, even
--          when its owner id is (a later hold of the same owner, taken after
--          this very call released the caller's, whose reply was lost)
-- ARGV[6..7] optional:
--   a release or an undo:
--     ARGV[6]  "1" when the Client releasing the lock has waiters of its
--              own for it: a release then publishes a wake-up even when no
--              attempt failed during the hold (the hash's w field, see
--              lock.lua); absent: "0"
--     ARGV[7]  for an undo, the request id of the acquisition to undo: the
--              hold is released only if that acquisition took it (and, when
--              ARGV[5] names a token, only if the hold has that token: the
--              give-back of a local transfer); "" or absent for an Unlock
--   a local transfer, both:
--     ARGV[6]  the waiter's lease, ms; "-<ms>" when the releasing
--              handle's owner id is shared (WithOwner): the transfer is
--              then refused when the hold has more lease left
--     ARGV[7]  its acquisition request id: its own attempt recognises the
--              transferred hold as one it took
-- ARGV[8]  optional, a release or a local transfer (never an undo): the
--          request id of an acquisition of the hold whose reply reached its
--          caller, which this release ends: a partial release drops it from
--          the hold's acquisitions (field q, see ids.lua), which then name
--          only acquisitions a caller may still undo or resend; ARGV[6..7]
--          are sent with it ("0" and "" when unused)
-- The optional arguments are left out when unused: each argument costs the
-- call about as much as a short command.
--
-- Returns {count, token[, receivers]}: count is the owner's remaining hold
-- count (0: the lock was released and one waiter per Client is woken, or it
-- was handed to the waiter), -1 when ARGV[1] does not hold the lock, or -2
-- when a local transfer was refused and nothing changed (the hold has more
-- lease left than the waiter's, see below: the caller then releases
-- publicly); token is
-- the new hold's fencing token (a decimal string, see next_token) when the
-- lock was handed to the waiter, else 0 (also when a transfer found the
-- waiter's acquisition undone, and released the lock unannounced instead);
-- receivers, after a release, is how many Clients heard the wake-up (0 when
-- none was published: no one waited). The wake-up's payload is the request
-- id ARGV[2]: the releasing Client knows its own release by it, whichever
-- of the reply and the message reaches it first; for every other Client it
-- is a plain wake-up (a request id is never "a" and never starts with "w:").
--
-- A request id seen again means the reply to an earlier run of this very
-- call was lost: its result is returned again and nothing is released twice
-- (a transfer is known again by its own request id, the last full release
-- in the fence key, and its waiter's request id in the hold; a partial
-- release, by its request id in the hold, or in the fence key once the
-- hold was released).
-- An undo that finds nothing to undo leaves a tombstone in the fence key
-- (see fence.lua), so that the acquisition takes nothing if it comes late.
local to, waited, undo, v
if #KEYS == 2 then
  -- A transfer keeps w as it is: no need to read it.
  to = ARGV[3]
  v = redis.call('HMGET', KEYS[1], 'o', 'c', 't', 'u')
else
  waited, undo = ARGV[6], ARGV[7]
  v = redis.call('HMGET', KEYS[1], 'o', 'c', 't', 'u', 'w')
end
undo = undo or ''
-- named: the caller names no token, or the hold's: the same digits, or,
-- when one of them is in a form an older version wrote (not plain digits,
-- see token_reply), the same number. Plain digits compare as digits only:
-- beyond 2^53 (see fence.lua) distinct tokens are the same Lua number.
-- (Inline, not a function: every function a script defines costs each of
-- its calls about as much as a short command.)
local named = ARGV[5] == '' or v[3] == ARGV[5] or (v[3] ~= false and v[3] ~= nil
  and not (string.find(v[3], '^%d+$') and string.find(ARGV[5], '^%d+$'))
  and tonumber(v[3]) == tonumber(ARGV[5]))
if undo ~= '' then
  -- An undo ends its acquisition call: leave a tombstone so that a copy
  -- of its attempt still on the way (a slow link, a client resend) takes
  -- nothing when it comes late.
  fence_tombstone(KEYS[2], undo, ARGV[4])
  -- An undo that names a token (the give-back of a local transfer) undoes
  -- that hold only: the acquisition request may have taken another hold
  -- since, with an attempt of its own (the transferred one was
  -- force-unlocked meanwhile), which is its caller's.
  local q = v[1] == ARGV[1] and named
    and redis.call('HGET', KEYS[1], 'q')
  if not q or not ids_has(q, undo) then
    return {-1, 0} -- it holds nothing: it failed, or it has not arrived
  end
  -- Undone: the hold no longer counts it (a re-entry undone leaves the
  -- hold to the others).
  redis.call('HSET', KEYS[1], 'q', ids_drop(q, undo))
end
if v[1] ~= ARGV[1] or not named then
  -- A resent release whose hold was released since (by this call, or,
  -- when this call was a partial release of it, by another one): the
  -- fence key names the final release and the hold's partial releases.
  local again = ids_has(fence_release(redis.call('GET', KEYS[2])), ARGV[2])
  -- A resent transfer: the waiter's hold, as it was given. (Not a first
  -- run that finds the waiter holding: its attempt took the lock after the
  -- caller's hold ended unannounced.)
  if again and to and v[1] == to and ids_has(redis.call('HGET', KEYS[1], 'q'), ARGV[7]) then
    return {0, v[3]}
  end
  if again then
    return {0, 0}
  end
  return {-1, 0}
end
if ids_has(v[4], ARGV[2]) then
  return {tonumber(v[2]), 0} -- a partial release done already (see ids.lua)
end
local c = tonumber(v[2]) - 1
if c > 0 then
  redis.call('HSET', KEYS[1], 'c', c, 'u', ids_add(v[4], ARGV[2]))
  if ARGV[8] and ARGV[8] ~= '' then
    local q = redis.call('HGET', KEYS[1], 'q')
    local left = ids_drop(q, ARGV[8])
    if left ~= q then
      redis.call('HSET', KEYS[1], 'q', left)
    end
  end
  return {c, 0}
end
-- The final release, with the hold's partial releases: one of them resent
-- after this release is recognised by the fence key.
local released = ARGV[2]
if v[4] and v[4] ~= '' then
  released = ARGV[2] .. ' ' .. v[4]
end
if to then
  local lease = ARGV[6]
  if string.byte(lease) == 45 then
    -- "-<ms>": the owner id is shared (WithOwner). Not to a waiter whose
    -- lease is shorter than what the hold has left (another handle of the
    -- owner re-entered it on a longer lease): other Clients' waiters sleep
    -- on that, and would not see the shorter one run out. Nothing changed:
    -- the caller releases publicly. (A hold of an owner id no other handle
    -- shares never has more left than the releasing handle's lease, which
    -- the caller compared.)
    lease = string.sub(lease, 2)
    if redis.call('PTTL', KEYS[1]) > tonumber(lease) then
      return {-2, 0}
    end
  end
  -- The hash becomes the new hold's in place: w stays (other Clients may
  -- still wait), u (a partial release of the old hold) goes. The token
  -- passes the old hold's, also when the fence key was lost meanwhile.
  local token, f = next_token(KEYS[2], ARGV[4], ':' .. released, nil, nil, v[3])
  local p = f and string.find(f, '|', 1, true)
  if p and string.find(string.sub(f, p) .. '|', '|' .. ARGV[7] .. '|', 1, true) then
    -- The waiter undid its acquisition (its tombstone, see fence.lua):
    -- its attempt failed just before, or this transfer came late (a slow
    -- link; its caller timed out, and the waiter, or the caller, gave back
    -- what it might have been handed). Handed on now, the lock would be
    -- nobody's for the waiter's whole lease: release it instead (the token
    -- just issued goes unused). A transfer names no channel: the Unlock
    -- publishes the release when this reply reaches it; when it does not,
    -- waiters fall back to their lease bound, as after an Unlock that never
    -- arrived.
    redis.call('DEL', KEYS[1])
    fence_set_release(KEYS[2], v[3], released, ARGV[4])
    return {0, 0, 0}
  end
  if v[4] then
    redis.call('HDEL', KEYS[1], 'u')
  end
  redis.call('HSET', KEYS[1], 'o', to, 'c', '1', 't', token, 'q', ARGV[7])
  redis.call('PEXPIRE', KEYS[1], lease)
  return {0, token}
end
redis.call('DEL', KEYS[1])
fence_set_release(KEYS[2], v[3], released, ARGV[4])
if not v[5] and waited ~= '1' then
  return {0, 0, 0}
end
-- pcall: a refused wake-up (an ACL user without the channel) must not
-- fail the release done above; waiters fall back to their lease bound.
local heard = redis.pcall(ARGV[3], KEYS[3], ARGV[2])
if type(heard) ~= 'number' then
  heard = 0
end
return {0, 0, heard}
