-- fair_common.lua: prelude of the FairMutex scripts (after fence.lua).
--
-- Every FairMutex script takes the same KEYS and the same first two ARGV:
--   KEYS[1]  lock hash: o = owner id, c = hold count, t = fencing token,
--            g = waiter id the lock was granted to (by a handoff or a direct
--            take), q = request (waiter) ids of the last acquisitions
--            (the hold's and its re-entries', see ids.lua), u = request ids
--            of the last partial releases
--   KEYS[2]  queue: sorted set, member -> arrival number (1, 2, 3 ... from
--            the last score + 1: a server-side sequence, never a clock)
--   KEYS[3]  places: sorted set, member -> expiry of the queue place in
--            server ms; the watchdog of a live waiter renews it ('z' kind of
--            renew.lua), so a dead waiter's place expires
--   KEYS[4]  fence key of the lock name (see fence.lua)
--   KEYS[5]  prefix of the per-Client wake-up channels: the waiters of a
--            Client with id C listen on KEYS[5] .. C (same hash tag, same
--            cluster slot); the message "w:" .. X wakes the waiter X alone; "w:" .. X .. ":" .. T hands it the lock with token T
--   ARGV[1]  publish command: PUBLISH, or SPUBLISH on a Redis Cluster
--   ARGV[2]  fence retention, ms
--
-- A member is "<waiter id>|<lease ms>|<place lease ms>|<Client id>|<owner
-- id>": what a handoff needs to grant the lock to that waiter and wake it.
--
-- Invariant kept by every script: when the lock is free, the queue is empty
-- (a release hands the lock to the queue head). A holder whose lease ran out
-- breaks it until the next script, which settles it first.

-- now_ms returns the server's clock in ms, and keeps the TIME reply in
-- time_reply for the fencing tokens the script issues (see next_token).
local time_reply
local function now_ms()
  time_reply = redis.call('TIME')
  return tonumber(time_reply[1]) * 1000 + math.floor(tonumber(time_reply[2]) / 1000)
end

-- parse_member returns the fields of a member a grant needs: the waiter
-- id, its Client's id and its owner id.
local function parse_member(m)
  return string.match(m, '^([^|]*)|%d+|%d+|([^|]*)|(.*)$')
end

-- evict removes the waiters whose place expired (their process died), and
-- returns the expiry of the first live place (server ms, a number), or nil
-- when no one waits.
local function evict(now)
  local first = redis.call('ZRANGE', KEYS[3], '0', '0', 'WITHSCORES')
  local exp = first[2] and tonumber(first[2])
  if exp and exp <= now then
    local dead = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
    for _, m in ipairs(dead) do
      redis.call('ZREM', KEYS[2], m)
      redis.call('ZREM', KEYS[3], m)
    end
    first = redis.call('ZRANGE', KEYS[3], '0', '0', 'WITHSCORES')
    exp = first[2] and tonumber(first[2])
  end
  return exp
end

-- grant hands the free lock to the first live waiter in arrival order, and
-- wakes that waiter only. Until it claims the grant (which restarts its
-- full lease), the grant lasts what remained of its place: a waiter that
-- died after its last renewal stalls the queue no longer than it would have
-- as a dead queued one (its watchdog timeout from that renewal), and a live
-- one, renewing every third of that timeout, has at least two thirds of it
-- to claim.
--
-- A grant to a waiter of the Client named by local_client (set by the
-- script that includes this prelude; nil: none) is not published: it is
-- recorded in local_grant ("<waiter id>:<token>"), which the script returns
-- so that the Client delivers it in-process. The fence key gets the new
-- token followed by fence_suffix (see next_token; set by a full release).
-- The lock hash must be gone when grant is called, or be the hold that the
-- caller releases, which the new hold then replaces (the caller deletes it
-- when grant returns nil); stale_u says that hold has a u field, which the
-- new hold must not keep, and held is its token, which the new one passes
-- (see next_token).
-- now is the server's clock in ms, or nil: grant reads it when someone
-- waits. Returns the new fencing token, or nil when no one waits.
local local_client, local_grant, fence_suffix
local function grant(now, stale_u, held)
  while true do
    local head = redis.call('ZPOPMIN', KEYS[2])[1]
    if not head then
      return nil
    end
    local exp = redis.call('ZSCORE', KEYS[3], head)
    redis.call('ZREM', KEYS[3], head)
    now = now or now_ms()
    local id, client, owner = parse_member(head)
    if id and exp and tonumber(exp) > now then
      local token = next_token(KEYS[4], ARGV[2], fence_suffix, nil, time_reply, held)
      if stale_u then
        redis.call('HDEL', KEYS[1], 'u')
      end
      redis.call('HSET', KEYS[1], 'o', owner, 'c', '1', 't', token, 'g', id, 'q', id)
      -- The place's expiry as ZSCORE gave it (whole ms of the server clock,
      -- later than now): no number to format.
      if not string.find(exp, '^%d+$') then
        exp = string.format('%.0f', tonumber(exp)) -- miniredis: "1.8e+12"
      end
      redis.call('PEXPIREAT', KEYS[1], exp)
      if client == local_client then
        local_grant = id .. ':' .. token
      else
        redis.pcall(ARGV[1], KEYS[5] .. client, 'w:' .. id .. ':' .. token)
      end
      return token
    end
  end
end

-- settle evicts dead waiters and, when the lock is free (its holder's lease
-- ran out), hands it to the queue head.
local function settle(now)
  evict(now)
  if redis.call('EXISTS', KEYS[1]) == 0 then
    grant(now)
  end
end

