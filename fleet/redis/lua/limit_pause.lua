-- limit_pause.lua: pause admissions (a provider said 429) unless a longer pause holds.
--
-- KEYS[1..4]  calls, cost, meta, flight of the limit (see _limit_prelude.lua)
-- ARGV[1]  the counted window (ms)
-- ARGV[2]  the pause (ms)
--
-- Returns {requests, tokens, in flight, pause ms}.
--!include _limit_prelude.lua
local ends = now + tonumber(ARGV[2])
local p = tonumber(redis.call('HGET', KEYS[3], 'paused_until')) or 0
if ends > p then
  redis.call('HSET', KEYS[3], 'paused_until', ends)
  keep(window + tonumber(ARGV[2]))
end
return {state()}
