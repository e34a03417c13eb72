-- run_request.lua: if the root id has a live run, mark it cancelled and leave its marker.
--
-- KEYS[1]  {prefix}:workflow:{root_id}   the run record (hash)
-- KEYS[2]  {prefix}:cancel:              the marker prefix (the run id is appended)
-- ARGV[1]  reason
-- ARGV[2]  now (the host's clock)
-- ARGV[3]  the marker's ttl in seconds
-- ARGV[4]  the record's ttl in seconds
-- ARGV[5]  only this run id ('' for any)
-- ARGV[6]  the notice json without its run id (the script appends it)
--
-- Returns the notice json, or nil when no live run (of that id) was found.
local run = redis.call('HGET', KEYS[1], 'run')
if not run or redis.call('HGET', KEYS[1], 'status') ~= 'running' then return false end
if ARGV[5] ~= '' and ARGV[5] ~= run then return false end
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'ended', ARGV[2], 'reason', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
local notice = ARGV[6] .. cjson.encode(run) .. '}'
redis.call('SET', KEYS[2] .. run, notice, 'EX', ARGV[3])
return notice
