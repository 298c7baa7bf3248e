-- sem_acquire.lua: take n permits of a semaphore in one step, after
-- reclaiming expired ones. Runs after sem_prelude.lua.
--
-- KEYS[1]  permit set (see sem_prelude.lua)
-- KEYS[2]  fence key of the name: a record whose undo ran first (its
--          tombstone is there, see fence.lua and sem_release.lua) takes
--          nothing: it reached Redis after its caller gave up
-- ARGV[1]  record: '<owner>|<request id>|<n>'; the request id is unique per
--          Acquire or TryAcquire call and reused by its retries
-- ARGV[2]  n, permits to take
-- ARGV[3]  size of the semaphore, as the caller's handle knows it
-- ARGV[4]  lease, ms
--
-- Returns {1, used} when the record holds the permits after the call (used:
-- the permits in use, this record's included), or {0, wait} when fewer than
-- n are free, wait being the ms until the earliest live record expires (-1
-- when there is none).
--
-- A record seen again means the reply to an earlier run of this very call was
-- lost (the client retried), or a late copy of an earlier attempt of the call
-- took it: its permits are reported again, not taken twice, and its lease
-- restarts from this run (the caller counts it from this attempt's send).
if fence_undone(redis.call('GET', KEYS[2]), sem_req(ARGV[1])) then
  return {0, 1}
end
local now = sem_now()
local used = sem_reclaim(KEYS[1], now)
local n, size, lease = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local found = redis.call('ZSCORE', KEYS[1], ARGV[1])
if found then
  -- At maxmemory (noeviction) Redis refuses a script's first write that
  -- may add memory (ZADD), but not PEXPIRE, nor any write after one: the
  -- set's TTL is raised first (sem_store sets it exactly below), or this
  -- resend, after a lost reply, failed with OOM while the first run had
  -- taken the permits, and the caller, told of an error, left them taken
  -- by nobody for their lease.
  redis.call('PEXPIRE', KEYS[1], string.format('%.0f', math.max(redis.call('PTTL', KEYS[1]), lease, 1)))
  -- The caller's lease runs from this run, which may be a later attempt of
  -- the call finding what a late copy of an earlier one took: restart it,
  -- never shorten it (as lock.lua does for a retry).
  if tonumber(found) < now + lease then
    redis.call('ZADD', KEYS[1], string.format('%.0f', now + lease), ARGV[1])
  end
  sem_store(KEYS[1], used, now, true)
  return {1, used}
end
if used + n <= size then
  used = used + n
  redis.call('ZADD', KEYS[1], string.format('%.0f', now + lease), ARGV[1])
  sem_store(KEYS[1], used, now)
  return {1, used}
end
sem_store(KEYS[1], used, now)
local first = redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
if first[2] then
  return {0, tonumber(first[2]) - now}
end
return {0, -1}
