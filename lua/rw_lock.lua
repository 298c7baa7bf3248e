-- rw_lock.lua: take the write lock of an RWMutex, or queue for it.
--
-- KEYS[1]  lock hash (see rw_common.lua)
-- KEYS[2]  fence key of the lock name (see fence.lua)
-- ARGV[1]  owner id
-- ARGV[2]  lease, ms
-- ARGV[3]  request id: unique per Lock or TryLock call, reused by its retries
-- ARGV[4]  fence retention, ms
-- ARGV[5]  lease of the waiting place, ms, taken when the lock is busy (new
--          readers then queue behind this writer); "0": do not queue (TryLock)
-- ARGV[6]  optional: "0" when the owner may not re-enter a write hold of
--          its own (see ReentrantMutex.mayReenter): it waits for it to run
--          out, as for another owner's
-- ARGV[7]  optional: "0" when a read hold of the owner is not the caller's
--          (its handle holds and takes no read lock, see RWMutex.acquireW):
--          no upgrade, it waits for that read hold as for another owner's
--
-- Returns {1, token, count} when ARGV[1] holds the write lock after the call
-- (count 1: this call took it), {0, retry} when it is busy, retry being the
-- ms until the earliest lease in the way runs out, or {2} when ARGV[1] holds
-- the read lock but not the write lock (an upgrade, refused).
if fence_undone(redis.call('GET', KEYS[2]), ARGV[3]) then
  return {0, 1} -- undone already (see rw_unlock.lua): its caller is gone
end
local s = rw_load(KEYS[1])
local f, o, req = s.f, ARGV[1], ARGV[3]
local exp = s.now + tonumber(ARGV[2])
if f.w == o and (ARGV[6] ~= '0' or ids_has(f.wq, req)) then
  if ids_has(f.wq, req) then
    rw_commit(s)
    return {1, token_reply(f.t), tonumber(f.wc)}
  end
  local c = tonumber(f.wc) + 1
  rw_set(s, 'wc', tostring(c))
  rw_set(s, 'wq', ids_add(f.wq, req))
  rw_set(s, 'we:' .. o, rw_ms(math.max(exp, tonumber(f['we:' .. o]))))
  rw_unwait(s, o)
  rw_commit(s)
  return {1, token_reply(f.t), c}
end
if f['rc:' .. o] and ARGV[7] ~= '0' then
  rw_commit(s)
  return {2}
end
local readers, _, rmin = rw_scan(s)
if not f.w and readers == 0 then
  local token = next_token(KEYS[2], ARGV[4])
  rw_set(s, 'w', o)
  rw_set(s, 'wc', '1')
  rw_set(s, 't', token)
  rw_set(s, 'wq', req)
  rw_set(s, 'we:' .. o, rw_ms(exp))
  rw_unwait(s, o)
  rw_commit(s)
  return {1, token, 1}
end
if ARGV[5] ~= '0' then
  local w = s.now + tonumber(ARGV[5])
  rw_set(s, 'ww:' .. o, rw_ms(math.max(w, tonumber(f['ww:' .. o]) or 0)))
  if f['wr:' .. o] ~= req then
    rw_set(s, 'wr:' .. o, req)
  end
end
local until_ = rmin
if f.w then
  until_ = tonumber(f['we:' .. f.w])
end
rw_commit(s)
return {0, math.max(1, until_ - s.now)}
