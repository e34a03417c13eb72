-- run_beat.lua: refresh the live run's heartbeat (not a superseded or ended run's).
--
-- KEYS[1]  {prefix}:workflow:{root_id}   the run record (hash)
-- ARGV[1]  the run id
--
-- Returns 1 when refreshed, else 0. The heartbeat is on the server's clock.
if redis.call('HGET', KEYS[1], 'run') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
local t = redis.call('TIME') local now = string.format('%d.%06d', t[1], t[2])
redis.call('HSET', KEYS[1], 'beat', now)
return 1
