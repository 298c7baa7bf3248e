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
-- ARGV[8]  '1' when this call undoes an acquisition whose reply was lost,
--          else '': an undo leaves the tombstone of its record even when it
--          finds it, so that another copy of that attempt still on the way
--          (a client resend stuck in a slow link) takes nothing either
-- ARGV[9]  records to remove whole, from ARGV[9] on
--
-- Returns the number of permits returned. A record that is gone (expired,
-- reclaimed, released already) returns nothing, so the caller compares the
-- result with what it meant to return.
--
-- A release that returned permits is remembered by the member
-- '~<request id>', or '~<request id>!' when it returned only part of what
-- it meant to (no '|': never a record; it holds no permit), scored with
-- the time it is forgotten; each handle keeps one, replacing its previous
-- one, and the set lives as long as a remembered release does, even with no
-- permit in use (see sem_store). A request id seen again means the reply to
-- an earlier run of this very call was lost (the client retried): it
-- reports what that run did (all it meant to return, or less), and nothing
-- is returned twice. A set gone altogether was lost (a failover, a flush)
-- or forgot this release long ago: what it meant to return is not there,
-- so nothing is.
local meant = 0
if ARGV[5] ~= '' then
  meant = sem_n(ARGV[5]) - sem_n(ARGV[6])
end
for i = 9, #ARGV do
  meant = meant + sem_n(ARGV[i])
end
local exists = redis.call('EXISTS', KEYS[1]) == 1
if exists then
  local done = redis.call('ZMSCORE', KEYS[1], '~' .. ARGV[2], '~' .. ARGV[2] .. '!')
  if done[1] then
    return meant -- a retry of a release already done
  end
  if done[2] then
    -- A retry of a release that returned only part of what it meant to
    -- (some records were gone): it reports falling short again.
    return meant - 1
  end
end
for i = 9, #ARGV do
  if ARGV[8] == '1' or not exists or not redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    -- Gone (expired, lost) or not there yet: an acquisition undone before
    -- it reached Redis must take nothing when it comes late.
    fence_tombstone(KEYS[3], sem_req(ARGV[i]), ARGV[7])
  end
end
if not exists then
  return 0
end
local now = sem_now()
local used = sem_reclaim(KEYS[1], now)
local freed = 0
for i = 9, #ARGV do
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
  redis.call('ZREM', KEYS[1], '~' .. ARGV[3], '~' .. ARGV[3] .. '!')
end
if freed > 0 then
  -- '~<request id>!' remembers a release that fell short of what it meant.
  local mark = '~' .. ARGV[2]
  if freed < meant then
    mark = mark .. '!'
  end
  redis.call('ZADD', KEYS[1], string.format('%.0f', now + tonumber(ARGV[4])), mark)
end
sem_store(KEYS[1], used, now)
if freed > 0 then
  redis.pcall(ARGV[1], KEYS[2], 'a')
end
return freed
