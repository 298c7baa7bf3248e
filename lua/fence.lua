-- fence.lua: prelude of every script that issues fencing tokens.
--
-- The fence key of a lock name holds
-- "<last token>[:<release>][|<undone>...]": the last fencing token issued
-- (empty when unknown), the request id of the last full release (so a
-- retried release is recognised), and the request ids of the last
-- tombstones_kept acquisitions undone, oldest first (tombstones: such an
-- acquisition may still reach Redis late, stuck in a slow link, and must
-- not take the lock then; see lock.lua and unlock.lua).
--
-- next_token(fence, retention[, suffix[, last[, now]]]) returns the next
-- fencing token of a lock name as a decimal string, to store and to reply
-- with (the client parses it). KEYS and ARGV: none of its own; the caller
-- passes
--   fence      the name's fence key, from its KEYS
--   retention  how long the fence key outlives its last use, ms, from its ARGV
--   suffix     nil, or ":<request id>" when the new token is issued by a full
--              release (a handoff): written after the token
--   last       the fence key's value when the caller read it already (false:
--              no key), or nil to have next_token read it
--   now        the reply of a TIME the script called already, or nil
-- The tombstone is kept, and so is the last release unless suffix replaces
-- it: a release resent after a lost reply is still recognised (see
-- fence_release) once the lock is taken again.
--
-- A token is the Redis server's clock in microseconds, raised to the last
-- token + 1 when the clock has not moved past it. So tokens strictly
-- increase while the fence key lives, and keep increasing when it is gone
-- (expiry, FLUSHALL, a restart without persistence) or stale (a restart
-- from an older snapshot, a failover to a replica that missed the last
-- writes, a release of another primitive of the same name writing its
-- older token back), because the clock has moved past every token issued:
-- issuing one takes a script run of more than a microsecond. Only a server
-- clock stepped back could repeat a token.
--
-- Tokens stay below 2^53, so Lua numbers hold them exactly. They are
-- handled as strings all the same: converting a 16-digit string to a number
-- or back costs a script about as much as a short Redis command. Every token is written
-- as plain digits (the clock's, or string.format's), so two tokens of the
-- same length compare as strings.

-- token_after returns the token that follows the last token p (a string,
-- "" when unknown) as a string, when p is not behind the clock's digits s;
-- else nil.
local function token_after(p, s)
  local ahead
  if #p == #s then
    ahead = p >= s
  else
    local n = tonumber(p)
    ahead = n ~= nil and n >= tonumber(s)
  end
  if ahead then
    return string.format('%.0f', tonumber(p) + 1)
  end
end

local function next_token(fence, retention, suffix, last, now)
  now = now or redis.call('TIME')
  -- The clock's digits as Redis gave them: seconds since 1970, then the
  -- microseconds padded to 6 digits.
  local s = now[1] .. string.rep('0', 6 - #now[2]) .. now[2]
  if last == nil and suffix then
    -- A handoff keeps only the tombstones of the old value, which are
    -- rare, and its token is almost always behind the clock: write first
    -- and read the old value in the same call, and write again only when
    -- it asks for it.
    local old = redis.call('SET', fence, s .. suffix, 'PX', retention, 'GET')
    if old then
      local up = token_after(string.match(old, '^[^:|]*'), s)
      local keep = string.match(old, '|.*$')
      if up or keep then
        s = up or s
        redis.call('SET', fence, s .. suffix .. (keep or ''), 'PX', retention)
      end
    end
    return s
  end
  if last == nil then
    last = redis.call('GET', fence)
  end
  local keep = ''
  if last then
    local p, rest = string.match(last, '^([^:|]*)(.*)$')
    s = token_after(p, s) or s
    if suffix then
      keep = string.match(rest, '|.*$') or ''
    else
      keep = rest
    end
  end
  redis.call('SET', fence, s .. (suffix or '') .. keep, 'PX', retention)
  return s
end

-- token_reply returns the token t of a live hold as plain digits, to reply
-- with: a hold written by an older version of these scripts, which stored
-- tokens as Lua numbers, holds it in exponent notation when Redis 7.2.0 to
-- 7.2.4 wrote it (8 or more trailing zeros), which the client cannot parse.
local function token_reply(t)
  if string.find(t, '^%d+$') then
    return t
  end
  return string.format('%.0f', tonumber(t))
end

-- fence_release returns the request id of the last full release recorded in
-- the fence value v (false or nil: no key), or nil.
local function fence_release(v)
  return v and string.match(v, '^[^:|]*:([^|]*)')
end

-- fence_undone reports whether the fence value v holds req's tombstone.
-- (One request id may be a prefix of another: the match is whole.)
local function fence_undone(v, req)
  local p = v and string.find(v, '|', 1, true)
  return p and string.find(string.sub(v, p) .. '|', '|' .. req .. '|', 1, true) ~= nil
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
