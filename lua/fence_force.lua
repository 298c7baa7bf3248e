-- fence_force.lua: prelude of the ForceUnlock scripts (after
-- fence_release.lua). A ForceUnlock records its request id among the
-- name's tombstones (see fence.lua), not as its last release, so that a
-- resend after a lost reply is recognised however many releases of any
-- primitive of the name came in between: it must not release the hold a
-- woken waiter took since, nor one taken after that. KEYS and ARGV: none
-- of their own.

-- forced returns what an earlier run of the ForceUnlock req did, as the
-- fence value v records it: 1 (it released a hold), 0 (it found the lock
-- free), or nil (this is its first run).
local function forced(v, req)
  local tombs = v and string.match(v, '|.*$')
  if not tombs then
    return nil
  end
  tombs = tombs .. '|'
  if string.find(tombs, '|' .. req .. '|', 1, true) then
    return 1
  elseif string.find(tombs, '|' .. req .. '~0|', 1, true) then
    return 0
  end
  return nil
end

-- force_record records the ForceUnlock req: it released a hold (held 1)
-- whose token was token (nil: unknown), or found the lock free (held 0).
-- The fence key's last token becomes that token when it is higher (the
-- fence key may have been lost during the hold).
local function force_record(fence, req, held, token, retention)
  if held == 0 then
    req = req .. '~0'
  end
  fence_tombstone(fence, req, retention, token)
end
