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
-- release's request id, and the tombstone already there.
local function fence_set_release(fence, token, req, retention)
  local v = token .. ':' .. req
  local old = redis.call('SET', fence, v, 'PX', retention, 'GET')
  if old and string.find(old, '|', 1, true) then
    redis.call('SET', fence, v .. string.match(old, '|.*$'), 'PX', retention)
  end
end

-- fence_tombstone records req as an acquisition undone: the lock scripts
-- refuse it from now on. The last tombstones_kept of them are kept per
-- name; an older one is dropped (its request, if it is still on the way
-- after that many later undos, takes a hold no one renews or releases,
-- which ends with its lease).
local tombstones_kept = 8
local function fence_tombstone(fence, req, retention)
  local v = redis.call('GET', fence) or ''
  local ttl = math.max(tonumber(retention), redis.call('PTTL', fence))
  local head, tombs = string.match(v, '^([^|]*)(.*)$')
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
