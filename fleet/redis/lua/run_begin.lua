-- run_begin.lua: register a run (replacing any earlier run's record), its first heartbeat now.
--
-- KEYS[1]  {prefix}:workflow:{root_id}   the run record (hash)
-- ARGV[1]  the run id
-- ARGV[2]  started (the host's clock)
--
-- Returns 1. The heartbeat is on the server's clock (one clock for every host and reader).
local t = redis.call('TIME') local now = string.format('%d.%06d', t[1], t[2])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'run', ARGV[1], 'status', 'running', 'started', ARGV[2], 'beat', now)
return 1
