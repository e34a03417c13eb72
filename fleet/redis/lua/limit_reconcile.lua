-- limit_reconcile.lua: count a call's real usage in place of its estimate; end its flight.
--
-- KEYS[1..4]  calls, cost, meta, flight of the limit (see _limit_prelude.lua)
-- ARGV[1]  the counted window (ms)
-- ARGV[2]  the admission id
-- ARGV[3]  tokens really used
-- ARGV[4]  how long after admission the call was sent (ms; shifts its window entry)
--
-- Returns {requests, tokens, in flight, pause ms}.
--!include _limit_prelude.lua
redis.call('ZREM', KEYS[4], ARGV[2])
local before = tonumber(redis.call('HGET', KEYS[2], ARGV[2]))
if before then
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
  local delta = tonumber(ARGV[3]) - before
  if delta ~= 0 then redis.call('HINCRBY', KEYS[3], 'tokens', delta) end
  if tonumber(ARGV[4]) > 0 then redis.call('ZINCRBY', KEYS[1], ARGV[4], ARGV[2]) end
end
return {state()}
