-- fence_acquire.lua: prelude of the scripts that take a hold (after
-- fence.lua, or alone): helpers that read the fence key's value, whose
-- format fence.lua describes. KEYS and ARGV: none of its own.

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

-- fence_undone reports whether the fence value v holds req's tombstone.
-- (One request id may be a prefix of another: the match is whole.)
local function fence_undone(v, req)
  local p = v and string.find(v, '|', 1, true)
  return p and string.find(string.sub(v, p) .. '|', '|' .. req .. '|', 1, true) ~= nil
end
