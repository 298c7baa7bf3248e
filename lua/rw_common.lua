-- rw_common.lua: prelude of every RWMutex script (rw_*.lua). KEYS and ARGV:
-- none of its own; the scripts pass their KEYS[1], the lock hash.
--
-- An RWMutex is one hash (plus the fence key of fence.lua). Its fields:
--   w        the writer's owner id            wc  the writer's hold count
--   t        the writer's fencing token       wq  request ids of its last acquisitions
--   wu       request ids of the writer's last partial releases (lists: see ids.lua)
--   we:<o>   writer o's lease expiry, server ms
--   rc:<o>   reader o's hold count            re:<o>  reader o's lease expiry, server ms
--   rq:<o>   request ids of reader o's last acquisitions
--            (wq and rq:<o> leave out those a partial release named as
--            ended: their replies came, so no undo or resend names them)
--   ru:<o>   request ids of reader o's last partial releases
--   rg:<o>   request id of the acquisition that began reader o's read hold
--            (its count went from 0 to 1): tells one read hold from the next
--   ww:<o>   writer o is waiting, until this server ms: while a writer waits,
--            new readers queue behind it
--   wr:<o>   request id of the Lock call that last queued writer o or
--            refreshed its place: a call that gave up removes the place only
--            while it is still its own (see rw_unqueue.lua)
--   rr       request ids of the last few full releases, space-separated;
--            each joined by ',' to the partial releases of the hold it
--            ended, if any (see rw_released)
--
-- Every lease is a field of its own ("we:", "re:", "ww:"), renewed by the
-- watchdog (kind 'g' of renew.lua for holds, which also checks t or rg:<o>;
-- kind 'f' for waiting places), so each read hold expires on its own while
-- the others are renewed. rw_load purges every expired entry; the
-- hash's TTL is kept at its latest expiry, and the hash is deleted when no
-- lease is left in it, so an idle lock leaves only its fence key.

-- rw_load reads the lock hash at the server's time and purges expired
-- entries (in memory; rw_commit writes the changes).
local function rw_del(s, k)
  if s.f[k] ~= nil then
    s.f[k] = nil
    s.sets[k] = nil
    s.dels[k] = true
  end
end

local function rw_set(s, k, v)
  s.f[k] = v
  s.sets[k] = v
  s.dels[k] = nil
end

local function rw_ms(n)
  return string.format('%.0f', n)
end

local function rw_drop_writer(s)
  local w = s.f.w
  if w then
    rw_del(s, 'we:' .. w)
  end
  for _, k in ipairs({'w', 'wc', 't', 'wq', 'wu'}) do
    rw_del(s, k)
  end
end

-- rw_unwait removes writer o's waiting place.
local function rw_unwait(s, o)
  rw_del(s, 'ww:' .. o)
  rw_del(s, 'wr:' .. o)
end

local function rw_drop_reader(s, o)
  for _, p in ipairs({'rc:', 're:', 'rq:', 'ru:', 'rg:'}) do
    rw_del(s, p .. o)
  end
end

local function rw_load(key)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local raw = redis.call('HGETALL', key)
  local s = {key = key, now = now, f = {}, sets = {}, dels = {}}
  for i = 1, #raw, 2 do
    s.f[raw[i]] = raw[i + 1]
  end
  -- A lease stored as e (a script's floor(now) + lease, in ms) ends once
  -- now is past it, as a key's expiry does in Redis: ended at e already, it
  -- could end up to 1ms before its holder's local deadline (the send time of
  -- its acquisition plus the lease), which may be under 1ms before the
  -- script ran.
  local gone = {}
  for k, v in pairs(s.f) do
    local p = string.sub(k, 1, 3)
    if (p == 're:' or p == 'we:' or p == 'ww:') and (tonumber(v) or 0) < now then
      gone[#gone + 1] = k
    end
  end
  for _, k in ipairs(gone) do
    local p, o = string.sub(k, 1, 3), string.sub(k, 4)
    rw_del(s, k)
    if p == 'ww:' then
      rw_unwait(s, o)
    elseif p == 're:' then
      rw_drop_reader(s, o)
    elseif p == 'we:' and s.f.w == o then
      rw_drop_writer(s)
    end
  end
  if s.f.w and not s.f['we:' .. s.f.w] then
    rw_drop_writer(s)
  end
  return s
end

-- rw_scan returns the number of readers, of waiting writers, and the
-- earliest expiry of each (nil when there is none).
local function rw_scan(s)
  local readers, waiting, rmin, wmin = 0, 0, nil, nil
  for k, v in pairs(s.f) do
    local p = string.sub(k, 1, 3)
    if p == 're:' then
      readers = readers + 1
      local e = tonumber(v)
      if not rmin or e < rmin then rmin = e end
    elseif p == 'ww:' then
      waiting = waiting + 1
      local e = tonumber(v)
      if not wmin or e < wmin then wmin = e end
    end
  end
  return readers, waiting, rmin, wmin
end

-- rw_call_chunked runs cmd on key with the arguments args, in calls of at
-- most 1,000 arguments (an even number: HSET's field-value pairs stay
-- whole): unpack refuses about 8,000 results in Redis (a few thousand in
-- miniredis), and a purge of the read holds of a few thousand owners that
-- ran out together deletes four or five fields each.
local function rw_call_chunked(cmd, key, args)
  for i = 1, #args, 1000 do
    redis.call(cmd, key, unpack(args, i, math.min(i + 999, #args)))
  end
end

-- rw_commit writes the changes, sets the hash's TTL to its latest expiry,
-- and deletes it when no lease is left. It reports whether the hash remains.
local function rw_commit(s)
  local last
  for k, v in pairs(s.f) do
    local p = string.sub(k, 1, 3)
    if p == 're:' or p == 'we:' or p == 'ww:' then
      local e = tonumber(v)
      if not last or e > last then last = e end
    end
  end
  if not last then
    redis.call('DEL', s.key)
    return false
  end
  local d = {}
  for k in pairs(s.dels) do d[#d + 1] = k end
  rw_call_chunked('HDEL', s.key, d)
  local a = {}
  for k, v in pairs(s.sets) do
    a[#a + 1] = k
    a[#a + 1] = v
  end
  rw_call_chunked('HSET', s.key, a)
  redis.call('PEXPIRE', s.key, math.max(1, last - s.now))
  return true
end

-- rw_released remembers req as a full release, with partial, the list of
-- the partial releases of the hold it ended (see ids.lua; nil or "":
-- none), so that a retry of any of them is recognised (see
-- rw_was_released): a partial release whose reply was lost may be resent
-- after another goroutine's release ended the hold. They make one entry of
-- rr, joined by ',' (a request id holds neither ' ' nor ','), so that rr
-- still remembers the last few full releases (and the fence key too:
-- see rw_fence_release).
local function rw_released(s, req, partial)
  if not partial or partial == '' then
    rw_set(s, 'rr', ids_add(s.f.rr, req))
    return
  end
  rw_set(s, 'rr', ids_add(s.f.rr, req .. ',' .. (string.gsub(partial, ' ', ','))))
end

-- rw_fence_ended returns what a full release records in the fence key, whose
-- value was v (see rw_fence_release): the releases rr remembered (rr goes
-- with the hash, when it is deleted or expires), after those the fence key
-- recorded already (the releases of the hash before, deleted in turn), the
-- last ids_kept entries in all, in rr's format. A release whose reply was
-- lost may be resent after other owners' releases emptied the hash, once or
-- more: two readers releasing at about the same time, or a reader coming and
-- going between.
local function rw_fence_ended(s, v)
  local e = fence_release(v) or ''
  for entry in string.gmatch(s.f.rr or '', '%S+') do
    -- A release that left the hash recorded itself in the fence key already
    -- (see rw_fence_release): not twice.
    if not ids_has(e, entry) then
      e = ids_add(e, entry)
    end
  end
  return e
end

-- rw_fence_release records the releases ended (see rw_fence_ended) in the
-- fence key ("<token>:<ended>") after a full release: when it deleted the
-- hash, and with it the rr field; and when it left the hash to other holds
-- or waiting places, whose leases may run out before a resend of this
-- release arrives (its holder crashed): Redis then expires the hash, rr
-- with it, and no script records what rr remembered. token: the hold's,
-- for a write hold; nil keeps the fence key's.
local function rw_fence_release(fence, s, retention, token)
  local v = redis.call('GET', fence)
  -- An unknown token stays empty: the next one comes from the clock.
  local last = token or (v and string.match(v, '^[^:|]*')) or ''
  fence_set_release(fence, last, rw_fence_ended(s, v), fence_ttl(fence, retention))
end

-- rw_was_released reports whether req is a full release already done, or
-- a partial release of a hold one of them ended.
local function rw_was_released(s, fence, req)
  local rr = s.f.rr
  if ids_has(rr, req) then
    return true
  end
  if rr and string.find(rr, ',', 1, true) and ids_has((string.gsub(rr, ',', ' ')), req) then
    return true
  end
  local ended = fence_release(redis.call('GET', fence))
  return ended and ids_has((string.gsub(ended, ',', ' ')), req) or false
end

-- rw_commit_fenced is rw_commit for a script that may delete the hash
-- without a release of its own (a waiting place removed): the releases rr
-- remembered go to the fence key, as a release's do (see rw_fence_release).
local function rw_commit_fenced(s, fence, retention)
  if rw_commit(s) then
    return true
  end
  if s.f.rr then
    rw_fence_release(fence, s, retention)
  end
  return false
end
