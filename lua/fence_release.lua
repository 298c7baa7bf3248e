-- fence_release.lua: prelude of the scripts that release a hold or undo an
-- acquisition (after fence.lua, or alone): helpers that read and write the
-- release and the tombstones in the fence key, whose format fence.lua
-- describes. KEYS and ARGV: none of their own.

-- fence_release returns the request id of the last full release recorded in
-- the fence value v (false or nil: no key), or nil (for a reentrant lock,
-- followed by the partial releases of the hold it ended, space-separated:
-- look a request id up with ids_has).
local function fence_release(v)
  return v and string.match(v, '^[^:|]*:([^|]*)')
end

-- fence_set_release records a full release: the hold's token, the
-- release's request id, and the tombstones already there. A token recorded
-- already that is higher stays: another primitive of the name (a FairMutex
-- beside a Mutex, say) may have issued it during the hold, and it must not
-- go back.
local function fence_set_release(fence, token, req, retention)
  local old = redis.call('SET', fence, token .. ':' .. req, 'PX', retention, 'GET')
  if not old then
    return
  end
  -- Usually the token recorded is the hold's own: checked first without a
  -- pattern (every release pays for this line).
  local up
  local b = string.byte(old, #token + 1)
  if token == '' or string.find(old, token, 1, true) ~= 1 or (b and b >= 48 and b <= 57) then
    local p = string.match(old, '^%d+')
    if p and (not string.find(token, '^%d+$') or #p > #token or (#p == #token and p > token)) then
      up = p
    end
  end
  local tombs = string.find(old, '|', 1, true)
  if up or tombs then
    redis.call('SET', fence, (up or token) .. ':' .. req .. (tombs and string.sub(old, tombs) or ''),
      'PX', retention)
  end
end

-- fence_ttl returns the lifetime the fence key's next write keeps, ms, as
-- a string: the retention (a string, from ARGV), or what the key has left
-- when that is longer. A Lua number given to redis.call is written in
-- exponent notation by Redis 7.2.0 to 7.2.4 when it has 8 or more trailing
-- zeros, which PX refuses.
local function fence_ttl(fence, retention)
  local left = redis.call('PTTL', fence)
  if left > tonumber(retention) then
    return string.format('%d', left)
  end
  return retention
end

-- fence_tombstone records req as an acquisition undone: the lock scripts
-- refuse it from now on (or a ForceUnlock done, see fence_force.lua). The
-- last tombstones_kept of them are kept per name; an older one is dropped
-- (its request, if it is still on the way after that many later undos,
-- takes a hold no one renews or releases, which ends with its lease).
-- token, optional, becomes the last token when it is higher.
local tombstones_kept = 32
local function fence_tombstone(fence, req, retention, token)
  local v = redis.call('GET', fence) or ''
  local ttl = fence_ttl(fence, retention)
  local head, tombs = string.match(v, '^([^|]*)(.*)$')
  if token and string.find(token, '^%d+$') then
    local p, rest = string.match(head, '^([^:]*)(.*)$')
    if not string.find(p, '^%d+$') or #token > #p or (#token == #p and token > p) then
      head = token .. rest
    end
  end
  local ids = {}
  for id in string.gmatch(tombs, '[^|]+') do
    if id ~= req then
      ids[#ids + 1] = id
    end
  end
  while #ids >= tombstones_kept do
    table.remove(ids, 1)
  end
  ids[#ids + 1] = req
  redis.call('SET', fence, head .. '|' .. table.concat(ids, '|'), 'PX', ttl)
end
