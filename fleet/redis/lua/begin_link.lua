-- begin_link.lua: read what one pipeline chain link needs and claim it, in one round trip.
--
-- KEYS[1]  {prefix}:pipe:{pipe}                    the pipeline's hash: 'ctx', 'item:{i}'
-- KEYS[2]  {prefix}:result:{previous link}:{pipe}  the previous link's outcome (stage > 0)
-- KEYS[3]  {prefix}:result:{link}:{pipe}           this link's record (set when it ran)
-- KEYS[4]  {prefix}:lease:{link}                   the claim on this link (SET NX PX)
-- ARGV[1]  the item's field, 'item:{i}'
-- ARGV[2]  owner (random, names this claim)
-- ARGV[3]  lease in milliseconds
-- ARGV[4]  the stage index
--
-- Returns {'claimed', ctx, item, previous outcome ('' at stage 0)}, {'done'} when this
-- link already ran, {'held'} when another worker holds it, or {'expired'} when the
-- pipeline's context (or the previous outcome) is gone.
local ctx = redis.call('HGET', KEYS[1], 'ctx')
local item = redis.call('HGET', KEYS[1], ARGV[1])
local prev = ''
if tonumber(ARGV[4]) > 0 then prev = redis.call('GET', KEYS[2]) end
if not ctx or not item or not prev then return {'expired'} end
if redis.call('EXISTS', KEYS[3]) == 1 then return {'done'} end
if redis.call('SET', KEYS[4], ARGV[2], 'NX', 'PX', ARGV[3]) then
  return {'claimed', ctx, item, prev}
end
return {'held'}
