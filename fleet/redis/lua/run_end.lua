-- run_end.lua: record how a run ended, unless a newer run replaced it or it was cancelled.
--
-- KEYS[1]  {prefix}:workflow:{root_id}   the run record (hash)
-- ARGV[1]  the run id
-- ARGV[2]  its status
-- ARGV[3]  now (the host's clock)
-- ARGV[4]  the record's ttl in seconds (a 'closed' run's record is kept: it may resume)
--
-- Returns 1 when recorded, else 0.
if redis.call('HGET', KEYS[1], 'run') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'ended', ARGV[3])
-- A closed run may resume: its record stays, like its journals, until `fleet gc`.
if ARGV[2] == 'closed' then redis.call('PERSIST', KEYS[1])
else redis.call('EXPIRE', KEYS[1], ARGV[4]) end
return 1
