-- renew.lua: renew a batch of held leases; the watchdog's one call per batch.
--
-- KEYS[i]      a held key (all KEYS of one call are in one cluster slot)
-- ARGV[3i-2]   kind of hold on KEYS[i]:
--                'h'  exclusive lock hash, held while its field o = owner
--                't'  the same, held while o = owner and its fencing token
--                     t = token too (a later hold of the same owner id,
--                     taken after this one was lost, is not this one)
--                'z'  sorted set of leased entries (FairMutex queue
--                     places), held while the member exists and its score,
--                     the entry's expiry in server ms, is still ahead (a
--                     place is dead at its score: see evict in fair_common)
--                'p'  the same for a Semaphore permit record, held until
--                     the server clock is past its score (see sem_reclaim)
--                's'  the same for a permit record that a Release in flight
--                     shrinks (see sem_release.lua): the record under its
--                     old name, or once the Release ran, under its new one
--                'f'  hash field lease (RWMutex holds and waiting places),
--                     held while the field exists and its value, the expiry
--                     in server ms, has not passed; renewal sets it to
--                     now + lease and extends the hash's TTL to the lease
--                'g'  the same for an RWMutex hold, held only while it is
--                     the same hold (a later hold of the same owner id,
--                     taken after this one was lost, is not this one): for
--                     a write lease "we:<o>", while the writer's fencing
--                     token t = guard; for a read lease "re:<o>", while
--                     rg:<o> = guard, the request that began the read hold
-- ARGV[3i-1]   owner id ('h'), "<token>:<owner id>" ('t'), member ('z',
--              'p'), "<length of old>:<old><new>" ('s': the record's old
--              and new members), field name ('f') or "<guard>:<field
--              name>" ('g'; a guard holds no ':')
-- ARGV[3i]     lease, ms
--
-- Returns an array with, for each key, 1 when the hold was renewed, 0 when
-- it is gone (expired, released, or taken by another owner), or -1 when
-- Redis refused the write that renews it (ZADD or HSET at maxmemory with
-- noeviction, before the script wrote anything): not renewed, not gone.
-- On a replica (READONLY) the script fails with READONLY instead. A
-- refused write must not raise an error, which would end the script and
-- leave every other hold of the batch unrenewed, PEXPIRE renewals (which
-- Redis still allows then) included.

-- same_token reports whether a hold's token a (a string, or false/nil) is
-- the token b the renewal names (a string): the same digits, or, when one
-- of them is in a form an older version wrote (not plain digits, see
-- token_reply in fence_acquire.lua), the same number. Plain digits compare
-- as digits only: beyond 2^53 (see fence.lua) distinct tokens are the same
-- Lua number. (unlock.lua, fair_unlock.lua and rw_unlock.lua compare
-- inline: a function costs each call of a script.)
local function same_token(a, b)
  if a == b then
    return true
  end
  if not a or (string.find(a, '^%d+$') and string.find(b, '^%d+$')) then
    return false
  end
  return tonumber(a) == tonumber(b)
end

-- never_shorten sets key's TTL to ms (lease, as a number) unless it has
-- more left: the hold a hash stands for is shared by every handle of its
-- owner id, and another of them may hold it on a longer lease (WithLease,
-- or another Client's watchdog timeout), which a renewal must not cut.
local function never_shorten(key, lease, ms)
  -- PEXPIRE … GT (Redis 7) in one command; Redis 6.2 refuses the option.
  if type(redis.pcall('PEXPIRE', key, ms, 'GT')) == 'table' and redis.call('PTTL', key) < lease then
    redis.call('PEXPIRE', key, ms)
  end
end

-- rewrite runs the write that renews a hold of a sorted set or a hash
-- (ZADD key score member, HSET key field value) and raises the key's TTL
-- to ms when Redis took it; it returns 1, or -1 when Redis refused the
-- write (see above).
local function rewrite(cmd, key, a, b, lease, ms)
  local r = redis.pcall(cmd, key, a, b)
  if type(r) == 'table' then
    -- READONLY: a replica (a demoted master that a failover client still
    -- takes for the master), which takes no write of the batch: raised
    -- as the 'h' kinds' PEXPIRE raises it, for the caller to send the
    -- batch again on the master (go-redis does, and resendReadOnly).
    if string.sub(r.err, 1, 8) == 'READONLY' then
      error(r)
    end
    return -1
  end
  if redis.call('PTTL', key) < lease then
    redis.call('PEXPIRE', key, ms)
  end
  return 1
end

local now
local out = {}
for i, key in ipairs(KEYS) do
  -- The lease goes to PEXPIRE as the string it came as: a Lua number would
  -- be formatted back into one, which costs the script more than the call.
  local kind, owner, ms = ARGV[3*i-2], ARGV[3*i-1], ARGV[3*i]
  local lease = tonumber(ms)
  local ok = 0
  if kind == 'h' then
    local o = redis.pcall('HGET', key, 'o')
    if o == owner then
      never_shorten(key, lease, ms)
      ok = 1
    end
  elseif kind == 't' then
    local token, o = string.match(owner, '^(%d+):(.*)$')
    local v = redis.pcall('HMGET', key, 'o', 't')
    if v[1] == o and same_token(v[2], token) then
      never_shorten(key, lease, ms)
      ok = 1
    end
  elseif kind == 'z' or kind == 'p' or kind == 's' then
    local s
    if kind == 's' then
      -- A record being shrunk: whichever of its names it has now (the
      -- release script renames it in one step, keeping its score).
      local l, both = string.match(owner, '^(%d+):(.*)$')
      owner = string.sub(both, 1, tonumber(l))
      s = redis.pcall('ZSCORE', key, owner)
      if type(s) ~= 'string' then
        owner = string.sub(both, tonumber(l) + 1)
        s = redis.pcall('ZSCORE', key, owner)
      end
      kind = 'p'
    else
      s = redis.pcall('ZSCORE', key, owner)
    end
    if type(s) == 'string' then
      if not now then
        local t = redis.call('TIME')
        now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
      end
    end
    -- An entry whose expiry (its score) has passed is gone, though no
    -- script has removed it yet (the set lives on for other entries): a
    -- renewal that reaches Redis late (stuck in a frozen server, a slow
    -- link) must not bring it back after its holder was told it was lost.
    -- (A fair queue place is dead at its score, a permit once past it,
    -- as the primitive's own scripts judge them.)
    if type(s) == 'string' and (tonumber(s) > now or (kind == 'p' and tonumber(s) == now)) then
      ok = rewrite('ZADD', key, string.format('%.0f', now + lease), owner, lease, ms)
    end
  elseif kind == 'f' or kind == 'g' then
    local field, held = owner, true
    local e
    if kind == 'g' then
      local guard
      guard, field = string.match(owner, '^([^:]*):(.*)$')
      local reader = string.sub(field, 1, 3) == 're:'
      local by = 't'
      if reader then
        by = 'rg:' .. string.sub(field, 4)
      end
      local v = redis.pcall('HMGET', key, field, by)
      if type(v) == 'table' and not v.err then
        e = v[1]
        if reader then
          held = v[2] == guard
        else
          held = type(v[2]) == 'string' and tonumber(guard) ~= nil and same_token(v[2], guard)
        end
      end
    else
      e = redis.pcall('HGET', key, field)
    end
    if held and type(e) == 'string' and tonumber(e) then
      if not now then
        local t = redis.call('TIME')
        now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
      end
      if tonumber(e) >= now then -- ends once now is past it (see rw_load)
        -- Never shorten: another handle of the owner may hold it on a
        -- longer lease (WithLease, or another Client's watchdog timeout).
        ok = rewrite('HSET', key, field, string.format('%.0f', math.max(tonumber(e), now + lease)), lease, ms)
      end
    end
  end
  out[i] = ok
end
return out
