-- lock.lua: take an exclusive lock (Mutex, ReentrantMutex) in one step.
--
-- KEYS[1]  lock hash: o = owner id, c = hold count, t = fencing token,
--          q = request ids of the last acquisitions (the hold's and its
--          re-entries', see ids.lua), u = request ids of the last partial
--          releases (see unlock.lua), w = set when an attempt
--          failed during this hold: someone may wait, so the release
--          publishes a wake-up
-- KEYS[2]  fence key of the lock name (see fence.lua)
-- ARGV[1]  owner id
-- ARGV[2]  lease, ms
-- ARGV[3]  request id: unique per Lock or TryLock call, reused by its retries
-- ARGV[4]  "1" when the owner may re-enter (ReentrantMutex), "0" otherwise
-- ARGV[5]  fence retention, ms
--
-- Returns {1, token, count} when ARGV[1] holds the lock after the call (count
-- is its hold count; 1 means this call took the lock), or {0, pttl} when
-- another owner holds it, pttl being that hold's remaining lease in ms, or
-- {0, pttl, 1} when ARGV[1] itself holds it and may not re-enter (another
-- acquisition of the owner's, maybe one whose undo is on its way).
-- The token and the count may come as decimal strings (see next_token):
-- the client reads both forms.
--
-- A request id seen again means the reply to an earlier run of this very
-- call was lost (the client retried): the hold it took is reported again and
-- not counted twice. A request id whose undo ran first (its tombstone is in
-- the fence key, see fence.lua) takes nothing: it reached Redis after its
-- caller gave up, and no one would renew or release what it took.
-- The owner alone first: reading the other fields of a free lock would
-- cost the uncontended call about as much as another command.
local o = redis.call('HGET', KEYS[1], 'o')
if not o then
  local f = redis.call('GET', KEYS[2])
  if fence_undone(f, ARGV[3]) then
    return {0, 1} -- undone already (see unlock.lua): its caller is gone
  end
  local token = next_token(KEYS[2], ARGV[5], nil, f)
  redis.call('HSET', KEYS[1], 'o', ARGV[1], 'c', '1', 't', token, 'q', ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, token, 1}
end
if o == ARGV[1] then
  local v = redis.call('HMGET', KEYS[1], 'c', 't', 'q')
  -- A retry of this call, or the claim of a local transfer to it (see
  -- unlock.lua): its request id is among the hold's last acquisitions.
  local again = ids_has(v[3], ARGV[3])
  if again or ARGV[4] == '1' then
    local c = v[1]
    if not again then
      if fence_undone(redis.call('GET', KEYS[2]), ARGV[3]) then
        return {0, 1}
      end
      c = redis.call('HINCRBY', KEYS[1], 'c', '1')
      redis.call('HSET', KEYS[1], 'q', ids_add(v[3], ARGV[3]))
    end
    -- The caller's lease runs from this call: restart it, but never
    -- shorten it (another handle of the owner may hold it on a longer
    -- lease, see renew.lua).
    -- A retry (again) writes the TTL even when unchanged: it must write
    -- something replicated for the WAIT that follows it (see
    -- sem_prelude.lua's sem_store).
    local pttl = redis.call('PTTL', KEYS[1])
    if pttl < tonumber(ARGV[2]) then
      redis.call('PEXPIRE', KEYS[1], ARGV[2])
    elseif again then
      redis.call('PEXPIRE', KEYS[1], pttl)
    end
    return {1, token_reply(v[2]), c}
  end
end
redis.call('HSETNX', KEYS[1], 'w', '1')
if o == ARGV[1] then
  return {0, redis.call('PTTL', KEYS[1]), 1}
end
return {0, redis.call('PTTL', KEYS[1])}
