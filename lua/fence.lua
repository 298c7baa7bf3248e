-- fence.lua: prelude of every script that issues fencing tokens. Two more
-- preludes handle the rest of the fence key's value: fence_acquire.lua
-- (read by the scripts that take a hold) and fence_release.lua (the last
-- release and the tombstones, written by the scripts that release or
-- undo). A script includes only the preludes it uses: each function one
-- defines is made again at every call of the script (measured on Redis
-- 7.0: 12 unused functions add 0.27 µs to a 1.1 µs call).
--
-- The fence key of a lock name holds
-- "<last token>[:<release>][|<undone>...]": the last fencing token issued
-- (empty when unknown), the request id of the last full release (so a
-- retried release is recognised; a reentrant lock's adds, space-separated,
-- the partial releases of the hold it ended, see unlock.lua,
-- fair_unlock.lua and rw_common.lua), and the
-- request ids of the last tombstones_kept acquisitions undone, oldest
-- first (tombstones: such an acquisition may still reach Redis late,
-- stuck in a slow link, and must not take the lock then; see lock.lua and
-- unlock.lua; a ForceUnlock leaves one too, see fence_force.lua). Every
-- primitive of the name shares the key.
--
-- next_token(fence, retention[, suffix[, last[, now[, held]]]]) returns the
-- next fencing token of a lock name as a decimal string, to store and to
-- reply with (the client parses it), and the fence key's value before the
-- call (false: no key). KEYS and ARGV: none of its own; the
-- caller passes
--   fence      the name's fence key, from its KEYS
--   retention  how long the fence key outlives its last use, ms, from its ARGV
--   suffix     nil, or ":<request id>" when the new token is issued by a full
--              release (a handoff): written after the token
--   last       the fence key's value when the caller read it already (false:
--              no key), or nil to have next_token read it
--   now        the reply of a TIME the script called already, or nil
--   held       the token of the hold a handoff replaces, or nil: the new
--              token passes it too (the fence key may have been lost
--              during the hold)
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
-- Tokens are handled as strings: converting a 16-digit string to a number
-- or back costs a script about as much as a short Redis command. Every
-- token is written as plain digits (the clock's, or token_after's), so two
-- tokens of the same length compare as strings. Tokens from the clock stay
-- below 2^53 (until 2255), but a server whose clock was far ahead may have
-- issued higher ones, which Lua numbers do not hold exactly: token_after
-- raises such a token as digits.

-- token_after returns the token that follows the last token p (a string,
-- "" when unknown) as a string, when p is not behind the clock's digits s;
-- else nil. A token of plain digits is raised digit by digit: a Lua number
-- holds no odd integer beyond 2^53, so tonumber(p) + 1 would give p back,
-- or less, for a token issued by a server whose clock was far ahead. (A
-- token of the clock's length behind it, the common case, is judged by one
-- string comparison.)
local function token_after(p, s)
  local digits
  if #p == #s then
    if p < s then
      return nil
    end
    digits = string.find(p, '^%d+$') ~= nil
  else
    digits = string.find(p, '^%d+$') ~= nil
    if digits then
      if #p < #s then
        return nil
      end
    else
      local n = tonumber(p)
      if n == nil or n < tonumber(s) then
        return nil
      end
    end
  end
  if not digits then
    return string.format('%.0f', tonumber(p) + 1)
  end
  local i = #p
  while i > 0 and string.byte(p, i) == 57 do -- '9'
    i = i - 1
  end
  if i == 0 then
    return '1' .. string.rep('0', #p)
  end
  return string.sub(p, 1, i - 1) .. string.char(string.byte(p, i) + 1) .. string.rep('0', #p - i)
end

local function next_token(fence, retention, suffix, last, now, held)
  now = now or redis.call('TIME')
  -- The clock's digits as Redis gave them: seconds since 1970, then the
  -- microseconds padded to 6 digits.
  local s = now[1] .. string.rep('0', 6 - #now[2]) .. now[2]
  if held then
    s = token_after(held, s) or s
  end
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
    return s, old
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
  return s, last
end
