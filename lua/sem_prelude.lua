-- sem_prelude.lua: prelude of the semaphore scripts (sem_acquire.lua,
-- sem_release.lua, sem_available.lua). KEYS and ARGV: none of its own.
--
-- A semaphore is one sorted set, the permit set, holding:
--   '#'                       score = -(permits in use by live records)
--   '<owner>|<request>|<n>'   one permit record per acquisition: n permits
--                             taken by the Acquire/TryAcquire call <request>
--                             of <owner>; score = its expiry, server ms.
--                             The watchdog renews it as a 'p' hold (see
--                             renew.lua): ZADD now+lease.
--   '~<request>'              a release remembered until its score, server
--                             ms, for retries (see sem_release.lua);
--   '~<request>!'             the same for a release that returned only
--                             part of what it meant to
-- Records and remembered releases score above 0, '#' at 0 or below, so
-- score ranges tell them apart. The set's TTL is kept at least the longest
-- live lease or release memory, and the set is deleted when it holds
-- neither: no permit in use and no release remembered.

-- sem_now returns the server clock in ms.
local function sem_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- sem_n returns the permit count of a record, 0 for any other member.
local function sem_n(member)
  -- Not tonumber(string.match(...)): gopher-lua (miniredis) refuses
  -- tonumber() of a failed match, and a remembered release has no count.
  local d = string.match(member, '|(%d+)$')
  return d and tonumber(d) or 0
end

-- sem_req returns the request id of a record, its tombstone in the fence
-- key (see fence.lua), taken from the end: an owner id may contain '|'.
local function sem_req(member)
  return string.match(member, '|([^|]*)|%d+$') or member
end

-- sem_reclaim removes the records expired at now and returns the permits in
-- use by the live ones. A record scored e (a script's floor(now) + lease, in
-- ms) expires once now is past e, as a key's expiry does in Redis: expired
-- at e already, it could end up to 1ms before its holder's local deadline
-- (the send time of its acquisition plus the lease).
local function sem_reclaim(key, now)
  local used = -(tonumber(redis.call('ZSCORE', key, '#') or '0') or 0)
  local expired = redis.call('ZRANGEBYSCORE', key, '(0', '(' .. now)
  for _, m in ipairs(expired) do
    used = used - sem_n(m)
    redis.call('ZREM', key, m)
  end
  if used < 0 then
    used = 0
  end
  return used
end

-- sem_store writes the permits in use and keeps the set alive as long as its
-- longest live member (record or remembered release), or deletes the set
-- when it has none. With force set it writes the TTL even when unchanged:
-- a retry that finds its own record must still write something that is
-- replicated, for the WAIT that follows it (on Redis 7.2 and later WAIT
-- counts only the writes of its own connection, and a retry comes on a new
-- one; writes reach the replicas in order, so this one covers the record's).
local function sem_store(key, used, now, force)
  local last = redis.call('ZREVRANGEBYSCORE', key, '+inf', now, 'WITHSCORES', 'LIMIT', 0, 1)
  if not last[2] then
    redis.call('DEL', key)
    return
  end
  redis.call('ZADD', key, string.format('%d', -math.max(used, 0)), '#')
  local ttl = math.max(1, tonumber(last[2]) - now)
  -- With no permit in use only remembered releases are left: the set lives
  -- as long as they do, not as long as the leases it held.
  if force or used <= 0 or redis.call('PTTL', key) < ttl then
    redis.call('PEXPIRE', key, string.format('%.0f', ttl))
  end
end
