-- ids.lua: prelude of the scripts of reentrant holds (after the fence
-- preludes): lists of request ids. A hold's acquisitions (field q) and its
-- partial releases (field u) are remembered as the last ids_kept request
-- ids, space-separated (a request id holds no space): the calls of one
-- owner's goroutines and handles interleave, and the retry of one of them
-- after a lost reply may come after others. KEYS and ARGV: none of their
-- own.
local ids_kept = 8

-- ids_has reports whether id is in the list v (nil, false or "": none).
local function ids_has(v, id)
  return v and string.find(' ' .. v .. ' ', ' ' .. id .. ' ', 1, true) ~= nil or false
end

-- ids_add returns the list v (nil, false or "": none) with id appended, keeping the last ids_kept.
local function ids_add(v, id)
  if not v or v == '' then
    return id
  end
  v = v .. ' ' .. id
  local _, n = string.gsub(v, ' ', ' ')
  if n >= ids_kept then
    v = string.match(v, '^%S+ (.*)$')
  end
  return v
end

-- ids_drop returns the list v without id.
local function ids_drop(v, id)
  local s = ' ' .. (v or '') .. ' '
  local i, j = string.find(s, ' ' .. id .. ' ', 1, true)
  if not i then
    return v
  end
  s = string.sub(s, 1, i) .. string.sub(s, j + 1)
  return string.match(s, '^ *(.-) *$')
end
