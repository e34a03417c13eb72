-- gc_restore.lua: give the keys of an ended workflow that lost their expiry the time it has left,
-- unless its run changed since gc judged it (a run that began again keeps its keys for good).
--
-- KEYS[1]  {p}:workflow:{R} (the run record); KEYS[2..] the workflow's keys
-- ARGV[1]  the run id gc judged ('' = there was no record), ARGV[2] its status,
-- ARGV[3]  seconds its retention has left
--
-- Returns how many keys got an expiry, or -1 when the run record changed (nothing set).
local run = redis.call('HGET', KEYS[1], 'run') or ''
local status = redis.call('HGET', KEYS[1], 'status') or ''
if run ~= ARGV[1] or status ~= ARGV[2] then return -1 end
local n = 0
for i = 2, #KEYS do
  if redis.call('TTL', KEYS[i]) == -1 then n = n + redis.call('EXPIRE', KEYS[i], ARGV[3]) end
end
return n
