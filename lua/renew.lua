-- renew.lua: renew a batch of held leases; the watchdog's one call per batch.
--
-- KEYS[i]      a held key (all KEYS of one call are in one cluster slot)
-- ARGV[3i-2]   kind of hold on KEYS[i]:
--                'h'  exclusive lock hash, held while its field o = owner
--                't'  the same, held while o = owner and its fencing token
--                     t = token too (a later hold of the same owner id,
--                     taken after this one was lost, is not this one)
--                'z'  sorted set of leased entries (permits, read holds,
--                     queue places), held while the member exists; its score
--                     is the entry's expiry in server ms
--                'f'  hash field lease (RWMutex holds and waiting places),
--                     held while the field exists and its value, the expiry
--                     in server ms, has not passed; renewal sets it to
--                     now + lease and extends the hash's TTL to the lease
-- ARGV[3i-1]   owner id ('h'), "<token>:<owner id>" ('t'), member ('z')
--              or field name ('f')
-- ARGV[3i]     lease, ms
--
-- Returns an array with, for each key, 1 when the hold was renewed or 0 when
-- it is gone (expired, released, or taken by another owner).
local now
local out = {}
for i, key in ipairs(KEYS) do
  local kind, owner, lease = ARGV[3*i-2], ARGV[3*i-1], tonumber(ARGV[3*i])
  local ok = 0
  if kind == 'h' then
    local o = redis.pcall('HGET', key, 'o')
    if o == owner then
      redis.call('PEXPIRE', key, lease)
      ok = 1
    end
  elseif kind == 't' then
    local token, o = string.match(owner, '^(%d+):(.*)$')
    local v = redis.pcall('HMGET', key, 'o', 't')
    if v[1] == o and tonumber(v[2]) == tonumber(token) then
      redis.call('PEXPIRE', key, lease)
      ok = 1
    end
  elseif kind == 'z' then
    local s = redis.pcall('ZSCORE', key, owner)
    if type(s) == 'string' then
      if not now then
        local t = redis.call('TIME')
        now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
      end
      redis.call('ZADD', key, string.format('%.0f', now + lease), owner)
      if redis.call('PTTL', key) < lease then
        redis.call('PEXPIRE', key, lease)
      end
      ok = 1
    end
  elseif kind == 'f' then
    local e = redis.pcall('HGET', key, owner)
    if type(e) == 'string' and tonumber(e) then
      if not now then
        local t = redis.call('TIME')
        now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
      end
      if tonumber(e) > now then
        redis.call('HSET', key, owner, string.format('%.0f', now + lease))
        if redis.call('PTTL', key) < lease then
          redis.call('PEXPIRE', key, lease)
        end
        ok = 1
      end
    end
  end
  out[i] = ok
end
return out
