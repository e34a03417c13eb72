-- _finish_record.lua: the writes of finish.lua once the lease is known to hold (included).
--
-- KEYS[1..5]  as finish.lua's
-- ARGV[1..11] as finish.lua's
--
-- Records the outcome (briefly, when the host is already past this dispatch), the
-- done-marker and the journal record. The caller checks the lease first.
local late = redis.call('HGET', KEYS[4], 'ran:' .. ARGV[6]) == ARGV[7]
    or redis.call('HEXISTS', KEYS[4], 'over:' .. ARGV[7]) == 1
if late then
  -- The host resolved the step without this record: keep it briefly, mark nothing done
  -- (a later run of the workflow must run the step again).
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[8])
else
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  if ARGV[5] == '1' then redis.call('HSET', KEYS[4], 'done:' .. ARGV[6], ARGV[1]) end
end
if ARGV[9] ~= '' then
  redis.call('HSETNX', KEYS[5], 'meta', ARGV[11])
  redis.call('HSET', KEYS[5], ARGV[9], ARGV[10])
end
