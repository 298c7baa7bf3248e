-- rw_info.lua: state of an RWMutex, for IsLocked and TTL (purging expired
-- entries on the way).
--
-- KEYS[1]  lock hash (see rw_common.lua)
--
-- Returns {held, ttl}: held is 1 when a writer or a reader holds the lock,
-- else 0; ttl is the ms until the latest lease of a hold runs out (0 when
-- free).
local s = rw_load(KEYS[1])
local last
for k, v in pairs(s.f) do
  local p = string.sub(k, 1, 3)
  if p == 're:' or p == 'we:' then
    local e = tonumber(v)
    if not last or e > last then last = e end
  end
end
rw_commit(s)
if not last then
  return {0, 0}
end
return {1, math.max(1, last - s.now)}
