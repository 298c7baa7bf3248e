-- sem_release.lua: return permits of a semaphore, waking its waiters; also
-- undoes an acquisition whose reply was lost. Runs after sem_prelude.lua.
--
-- KEYS[1]  permit set (see sem_prelude.lua)
-- KEYS[2]  wake-up channel of the semaphore
-- KEYS[3]  fence key of the name: a record to remove that is not in the set
--          (expired, or an acquisition undone before it reached Redis) gets
--          a tombstone there, its request id (see sem_req), so that it takes
--          nothing if it comes late
-- ARGV[1]  publish command: PUBLISH, or SPUBLISH on a Redis Cluster
-- ARGV[2]  request id: unique per Release call, reused by its retries
-- ARGV[3]  request id of the handle's previous Release, or ''
-- ARGV[4]  how long a release is remembered, ms
-- ARGV[5]  a record to shrink, or '' for none
-- ARGV[6]  the shrunk record's new name: same owner, a fresh request id and
--          the permits it keeps (it keeps the old record's expiry)
-- ARGV[7]  how long a tombstone lives, ms (the fence retention)
-- ARGV[8]  records to remove whole, from ARGV[8] on
--
-- Returns the number of permits returned. A record that is gone (expired,
-- reclaimed, released already) returns nothing, so the caller compares the
-- result with what it meant to return.
--
-- A release is remembered by the member '~<request id>' (no '|': never a
-- record; it holds no permit), scored with the time it is forgotten; each
-- handle keeps one, replacing its previous one. A release that returns the
-- last permits in use deletes the set, so it is remembered in the fence key
-- instead, as the name's last full release (see fence.lua). A request id
-- seen again means the reply to an earlier run of this very call was lost
-- (the client retried): everything it meant to return counts as returned,
-- and nothing is returned twice.
local meant = 0
if ARGV[5] ~= '' then
  meant = sem_n(ARGV[5]) - sem_n(ARGV[6])
end
for i = 8, #ARGV do
  meant = meant + sem_n(ARGV[i])
end
local exists = redis.call('EXISTS', KEYS[1]) == 1
if exists and redis.call('ZSCORE', KEYS[1], '~' .. ARGV[2]) then
  return meant -- a retry of a release already done
end
local gone = {}
for i = 8, #ARGV do
  if not exists or not redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    gone[#gone + 1] = ARGV[i]
  end
end
local shrunk = ARGV[5] ~= '' and (not exists or not redis.call('ZSCORE', KEYS[1], ARGV[5]))
if (#gone > 0 or shrunk) and fence_release(redis.call('GET', KEYS[3])) == ARGV[2] then
  return meant -- a retry of a release that returned the last permits
end
for _, m in ipairs(gone) do
  -- Gone (expired, lost) or not there yet: an acquisition undone before
  -- it reached Redis must take nothing when it comes late.
  fence_tombstone(KEYS[3], sem_req(m), ARGV[7])
end
if not exists then
  return 0
end
local now = sem_now()
local used = sem_reclaim(KEYS[1], now)
local freed = 0
for i = 8, #ARGV do
  if redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then
    freed = freed + sem_n(ARGV[i])
  end
end
if ARGV[5] ~= '' then
  local s = redis.call('ZSCORE', KEYS[1], ARGV[5])
  if s then
    redis.call('ZREM', KEYS[1], ARGV[5])
    redis.call('ZADD', KEYS[1], s, ARGV[6])
    freed = freed + sem_n(ARGV[5]) - sem_n(ARGV[6])
  end
end
used = used - freed
if ARGV[3] ~= '' then
  redis.call('ZREM', KEYS[1], '~' .. ARGV[3])
end
if used > 0 then
  redis.call('ZADD', KEYS[1], string.format('%.0f', now + tonumber(ARGV[4])), '~' .. ARGV[2])
elseif freed > 0 then
  fence_note_release(KEYS[3], ARGV[2], ARGV[7])
end
sem_store(KEYS[1], used, now)
if freed > 0 then
  redis.call(ARGV[1], KEYS[2], 'a')
end
return freed
