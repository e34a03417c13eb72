-- gc_prune.lua: delete a root's keys, unless its run changed since gc judged it.
--
-- KEYS[1]  {p}:workflow:{R} (the run record); KEYS[2..] the keys to delete
-- ARGV[1] the run id gc judged ('' = there was no record), ARGV[2] its status,
-- ARGV[3] 'orphan' when KEYS[2..] are budget parts whose account hash (KEYS[1]) is gone
--
-- Returns how many keys it deleted, or -1 when the run record changed (nothing deleted).
if ARGV[3] == 'orphan' then
  if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
else
  local run = redis.call('HGET', KEYS[1], 'run') or ''
  local status = redis.call('HGET', KEYS[1], 'status') or ''
  if run ~= ARGV[1] or status ~= ARGV[2] then return -1 end
end
local n = 0
for i = 2, #KEYS do n = n + redis.call('UNLINK', KEYS[i]) end
return n
