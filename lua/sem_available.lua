-- sem_available.lua: reclaim the expired permits of a semaphore and count
-- the permits in use. Runs after sem_prelude.lua.
--
-- KEYS[1]  permit set (see sem_prelude.lua)
--
-- Returns the permits in use by live records.
local now = sem_now()
local used = sem_reclaim(KEYS[1], now)
sem_store(KEYS[1], used, now)
return used
