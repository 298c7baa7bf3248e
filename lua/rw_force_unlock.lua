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
-- Returns 1 when a hold was released, 0 when the lock was free. A resend
-- after a lost reply (go-redis resends the script) returns what the first
-- run did and changes nothing (see fence_force.lua): it must not release
-- the holds that woken waiters took in between.
local f = forced(redis.call('GET', KEYS[4]), ARGV[2])
if f then
  return f
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
-- The releases the hash remembered go to the fence key when it goes (see
-- rw_commit_fenced): a release resent after this call is still recognised.
rw_commit_fenced(s, KEYS[4], ARGV[3])
force_record(KEYS[4], ARGV[2], held and 1 or 0, wt, ARGV[3])
if not held then
  return 0
end
redis.pcall(ARGV[1], KEYS[2], 'a')
redis.pcall(ARGV[1], KEYS[3], '1')
return 1
