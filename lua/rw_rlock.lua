-- rw_rlock.lua: take the read lock of an RWMutex.
--
-- KEYS[1]  lock hash (see rw_common.lua)
-- KEYS[2]  fence key of the lock name: an attempt whose undo ran first
--          (its tombstone is there, see fence.lua) takes nothing
-- ARGV[1]  owner id
-- ARGV[2]  lease, ms
-- ARGV[3]  request id: unique per RLock or TryRLock call, reused by its retries
-- ARGV[4]  optional: "0" when the owner may not re-enter a read hold of its
--          own (see ReentrantMutex.mayReenter): it waits for it to run out
--
-- Returns {1, count, begun} when ARGV[1] holds the read lock after the call
-- (its read hold count, and the request id that began this read hold: a
-- new one after a release), or {0, retry} when a writer holds the lock or
-- waits for it, retry being the ms until that writer's lease or waiting
-- place runs out.
--
-- A reader already holding the read lock, or holding the write lock (a
-- downgrade), is let in even when writers wait: it would otherwise wait for
-- itself.
if fence_undone(redis.call('GET', KEYS[2]), ARGV[3]) then
  return {0, 1}
end
local s = rw_load(KEYS[1])
local f, o, req = s.f, ARGV[1], ARGV[3]
local c = tonumber(f['rc:' .. o])
if c and ids_has(f['rq:' .. o], req) then
  rw_commit(s)
  return {1, c, f['rg:' .. o] or ''}
end
if c and ARGV[4] == '0' then
  rw_commit(s)
  return {0, math.max(1, tonumber(f['re:' .. o]) - s.now)}
end
local _, waiting, _, wmin = rw_scan(s)
if c or f.w == o or (not f.w and waiting == 0) then
  local rq = req
  if not c then
    rw_set(s, 'rg:' .. o, req)
  else
    rq = ids_add(f['rq:' .. o], req)
  end
  c = (c or 0) + 1
  local exp = s.now + tonumber(ARGV[2])
  rw_set(s, 'rc:' .. o, tostring(c))
  rw_set(s, 'rq:' .. o, rq)
  rw_set(s, 're:' .. o, rw_ms(math.max(exp, tonumber(f['re:' .. o]) or 0)))
  local begun = f['rg:' .. o] or ''
  rw_commit(s)
  return {1, c, begun}
end
local until_ = wmin
if f.w then
  until_ = tonumber(f['we:' .. f.w])
end
rw_commit(s)
return {0, math.max(1, until_ - s.now)}
