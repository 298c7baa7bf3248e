-- sem_release.lua: return permits of a semaphore, waking its waiters; also
-- undoes an acquisition whose reply was lost. Runs after sem_prelude.lua.
--
-- KEYS[1]  permit set (see sem_prelude.lua)
-- KEYS[2]  wake-up channel of the semaphore
-- ARGV[1]  publish command: PUBLISH, or SPUBLISH on a Redis Cluster
-- ARGV[2]  a record to shrink, or '' for none
-- ARGV[3]  the shrunk record's new name: same owner, a fresh request id and
--          the permits it keeps (it keeps the old record's expiry)
-- ARGV[4]  records to remove whole, from ARGV[4] on
--
-- Returns the number of permits returned. A record that is gone (expired,
-- reclaimed, released already) returns nothing, so the caller compares the
-- result with what it meant to return. A shrink already done (its new record
-- exists, the old one is gone) means the reply to an earlier run of this very
-- call was lost: everything it meant to return counts as returned.
local now = sem_now()
local used = sem_reclaim(KEYS[1], now)
local freed, meant = 0, 0
for i = 4, #ARGV do
  meant = meant + sem_n(ARGV[i])
  if redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then
    freed = freed + sem_n(ARGV[i])
  end
end
used = used - freed
if ARGV[2] ~= '' then
  local give = sem_n(ARGV[2]) - sem_n(ARGV[3])
  local s = redis.call('ZSCORE', KEYS[1], ARGV[2])
  if s then
    redis.call('ZREM', KEYS[1], ARGV[2])
    redis.call('ZADD', KEYS[1], s, ARGV[3])
    used = used - give
    freed = freed + give
  elseif redis.call('ZSCORE', KEYS[1], ARGV[3]) then
    -- A retry of a release that ran: all it meant to return was returned.
    sem_store(KEYS[1], used, now)
    return meant + give
  end
end
sem_store(KEYS[1], used, now)
if freed > 0 then
  redis.call(ARGV[1], KEYS[2], 'a')
end
return freed
