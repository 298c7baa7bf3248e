-- fair_lock.lua: one acquisition attempt of a FairMutex: take the free lock,
-- re-enter it, claim a handoff, or queue (once) in arrival order.
--
-- KEYS[1..5], ARGV[1..2]: see fair_common.lua
-- ARGV[3]  waiter id: unique per Lock or TryLock call, reused by its retries
-- ARGV[4]  member of the waiter (see fair_common.lua)
-- ARGV[5]  owner id
-- ARGV[6]  lease, ms
-- ARGV[7]  place lease, ms: how long the queue place lives unless renewed
--          (the Client's watchdog timeout)
-- ARGV[8]  "0" when the owner may not re-enter a hold of its own (the
--          handle holds nothing and has no other call under way, see
--          ReentrantMutex.mayReenter): such a hold waits to run out, as
--          another owner's does (a handoff to this very waiter is still
--          claimed); "1" otherwise
-- ARGV[9]  'w' to queue when the lock is taken (Lock), 't' not to (TryLock)
--
-- Returns {1, token, count} when the owner holds the lock after the call
-- (count is its hold count; the token and the count may come as decimal
-- strings, see next_token), else {0, bound, queued}: bound is how long the
-- waiter may sleep before its next attempt, ms (the holder's remaining
-- lease, the earliest expiry of a queue place, a third of the place lease,
-- whichever is shortest), and queued is 1 when this call added the waiter
-- to the queue (at its tail: a new arrival, or one whose place had expired).
--
-- A waiter withdrawn before this attempt reached Redis (its tombstone is in
-- the fence key, see fence.lua) takes nothing and does not queue: its
-- caller is gone.
local fence = redis.call('GET', KEYS[4])
if fence_undone(fence, ARGV[3]) then
  return {0, 1, 0}
end
local now = now_ms()
-- settle, reading the hold once when it stands
local first = evict(now) -- expiry of the earliest place, or nil
-- The owner alone first: a waiter that queues needs nothing else.
local o = redis.call('HGET', KEYS[1], 'o')
if not o and grant(now) then
  fence = nil -- grant wrote it
  o = redis.call('HGET', KEYS[1], 'o')
end
local id, member, owner = ARGV[3], ARGV[4], ARGV[5]
local wl = tonumber(ARGV[7])
local v = o == owner and redis.call('HMGET', KEYS[1], 'c', 't', 'g', 'q')
if v and ARGV[8] == '0' and v[3] ~= id and not ids_has(v[4], id) then
  v = nil -- not to be re-entered: wait for it as for another owner's
end
if v then
  redis.call('ZREM', KEYS[2], member)
  redis.call('ZREM', KEYS[3], member)
  -- The full lease from now, never shorter than what is left: another
  -- handle of the owner may hold it on a longer lease (see renew.lua).
  -- A handoff claimed by its waiter, held by no one else of the owner yet:
  -- what is left is the rest of the waiter's queue place (up to its place
  -- lease), not a lease of this owner's, so the waiter's own lease replaces
  -- it (a WithLease waiter's fixed lease may be the shorter).
  local pttl = redis.call('PTTL', KEYS[1])
  if (v[3] == id and v[1] == '1') or pttl < tonumber(ARGV[6]) then
    redis.call('PEXPIRE', KEYS[1], ARGV[6])
  elseif v[3] == id or ids_has(v[4], id) then
    -- A run of this very call again (its reply lost) writes the TTL
    -- unchanged: something replicated, for the WAIT that follows it (see
    -- sem_prelude.lua's sem_store).
    redis.call('PEXPIRE', KEYS[1], pttl)
  end
  if v[3] == id or ids_has(v[4], id) then
    -- Granted to this waiter by a handoff (or taken by an earlier run of
    -- this very call): claimed.
    return {1, token_reply(v[2]), v[1]}
  end
  -- Re-entry by the owner (even while queued: it holds the lock already).
  local c = redis.call('HINCRBY', KEYS[1], 'c', '1')
  redis.call('HSET', KEYS[1], 'q', ids_add(v[4], id))
  return {1, token_reply(v[2]), c}
end
if not o then
  -- Free: settle left the queue empty, so no one is passed over.
  local token = next_token(KEYS[4], ARGV[2], nil, fence, time_reply)
  redis.call('HSET', KEYS[1], 'o', owner, 'c', '1', 't', token, 'g', id, 'q', id)
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
  redis.call('ZREM', KEYS[2], member)
  redis.call('ZREM', KEYS[3], member)
  return {1, token, 1}
end
local pttl = redis.call('PTTL', KEYS[1])
if ARGV[9] ~= 'w' then
  return {0, pttl, 0}
end
local queued = 0
local last = redis.call('ZRANGE', KEYS[2], '-1', '-1', 'WITHSCORES')
-- Numbers go to redis.call as decimal strings: Redis formats a Lua number
-- argument with %.17g, which costs a script about as much as a short
-- command, and %d a fraction of that (scores here are whole numbers).
local seq = '1'
if last[2] then
  seq = string.format('%d', tonumber(last[2]) + 1)
end
-- NX: a waiter queued already (a later attempt, or a retry after a lost
-- reply) keeps its place, unless the place expired: then it queues again,
-- at the tail.
local added = redis.call('ZADD', KEYS[2], 'NX', seq, member)
if added == 0 and not redis.call('ZSCORE', KEYS[3], member) then
  redis.call('ZADD', KEYS[2], seq, member)
  added = 1
end
if added == 1 then
  redis.call('ZADD', KEYS[3], string.format('%d', now + wl), member)
  queued = 1
end
-- The queue lives as long as its longest-lived place. Live waiters run this
-- script at least every wl/3 (and renew their places as often): a queue
-- whose TTL is at least 9wl/10 after each attempt outlives the wait for the
-- next one, so it is raised to wl only when it is below that. A TTL is
-- never lowered: another Client's waiters may have a longer place lease.
if redis.call('PTTL', KEYS[2]) < wl * 0.9 then
  for i = 2, 3 do
    if redis.call('PTTL', KEYS[i]) < wl then
      redis.call('PEXPIRE', KEYS[i], ARGV[7])
    end
  end
end
local bound = math.floor(wl / 3)
if pttl >= 0 and pttl < bound then
  bound = pttl
end
-- The earliest place, read before this attempt queued: a place of its own
-- expires after bound, its waiter renewing it every wl/3.
if first and first - now < bound then
  bound = first - now
end
if bound < 1 then
  bound = 1
end
return {0, bound, queued}
