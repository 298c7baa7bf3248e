-- rw_force_unlock.lua: release every hold of an RWMutex, the writer's and
-- the readers', and wake the waiters. Waiting writers keep their places.
--
-- KEYS[1]  lock hash (see rw_common.lua)
-- KEYS[2]  readers' wake-up channel
-- KEYS[3]  writers' wake-up channel
-- KEYS[4]  fence key of the lock name (see fence.lua)
-- ARGV[1]  publish command: PUBLISH, or SPUBLISH on a Redis Cluster
-- ARGV[2]  request id: unique per call, reused by its retries
-- ARGV[3]  fence retention, ms
--
-- Returns 1 when a hold was released, 0 when the lock was free.
--
-- The call is recorded as the name's last full release in the fence key
-- (ARGV[2], or ARGV[2] .. "~0" when the lock was free), so that a retry
-- after a lost reply (go-redis resends the script) is recognised and
-- reports what the first run did: it must not release the holds that woken
-- waiters took in between.
local fv = redis.call('GET', KEYS[4])
local done = fence_release(fv)
if done == ARGV[2] then
  return 1
elseif done == ARGV[2] .. '~0' then
  return 0
end
local s = rw_load(KEYS[1])
local held = s.f.w ~= nil
local wt = s.f.t
rw_drop_writer(s)
local readers = {}
for k in pairs(s.f) do
  if string.sub(k, 1, 3) == 'rc:' then
    readers[#readers + 1] = string.sub(k, 4)
  end
end
for _, o in ipairs(readers) do
  rw_drop_reader(s, o)
  held = true
end
rw_commit(s)
-- The last token stays: the fence key's, or the writer's when higher (the
-- fence key may have been lost during the hold).
local last = (fv and string.match(fv, '^[^:|]*')) or ''
if wt and string.match(wt, '^%d+$') and (not tonumber(last) or tonumber(wt) > tonumber(last)) then
  last = wt
end
local ttl = math.max(tonumber(ARGV[3]), redis.call('PTTL', KEYS[4]))
if not held then
  fence_set_release(KEYS[4], last, ARGV[2] .. '~0', ttl)
  return 0
end
fence_set_release(KEYS[4], last, ARGV[2], ttl)
redis.call(ARGV[1], KEYS[2], 'a')
redis.call(ARGV[1], KEYS[3], '1')
return 1
