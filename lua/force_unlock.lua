-- force_unlock.lua: release a lock whoever holds it, and wake its waiters.
-- Runs after fence_release.lua.
--
-- KEYS[1]  the lock's key
-- KEYS[2]  wake-up channel of the lock
-- KEYS[3]  fence key of the lock name (see fence.lua)
-- ARGV[1]  publish command: PUBLISH, or SPUBLISH on a Redis Cluster
-- ARGV[2]  wake-up message: "1" wakes one waiter per client, "a" all
-- ARGV[3]  request id: unique per call, reused by its retries
-- ARGV[4]  fence retention, ms
--
-- Returns 1 when a hold was released, 0 when the lock was free.
--
-- The call is recorded as the name's last full release in the fence key
-- (ARGV[3], or ARGV[3] .. "~0" when the lock was free), so that a retry
-- after a lost reply (go-redis resends the script) is recognised and
-- reports what the first run did: it must not release the hold a woken
-- waiter took in between.
local v = redis.call('GET', KEYS[3])
local done = fence_release(v)
if done == ARGV[3] then
  return 1
elseif done == ARGV[3] .. '~0' then
  return 0
end
local t = redis.pcall('HGET', KEYS[1], 't')
local held = redis.call('DEL', KEYS[1])
-- The last token stays: the fence key's, or the hold's when higher (the
-- fence key may have been lost during the hold).
local last = (v and string.match(v, '^[^:|]*')) or ''
if held == 1 and type(t) == 'string' and string.match(t, '^%d+$') and
    (not tonumber(last) or tonumber(t) > tonumber(last)) then
  last = t
end
local ttl = math.max(tonumber(ARGV[4]), redis.call('PTTL', KEYS[3]))
if held == 0 then
  fence_set_release(KEYS[3], last, ARGV[3] .. '~0', ttl)
  return 0
end
fence_set_release(KEYS[3], last, ARGV[3], ttl)
redis.call(ARGV[1], KEYS[2], ARGV[2])
return 1
