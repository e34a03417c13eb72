-- claim_step.lua: a worker takes one step, unless its outcome is already recorded.
--
-- KEYS[1]  {prefix}:steps:{owner}          the step record (fields done:, ran:, over:)
-- KEYS[2]  {prefix}:result:{tid}:{nonce}   the outcome of this dispatch (duplicates read it)
-- KEYS[3]  {prefix}:lease:{tid}            the claim on the running step (SET NX PX)
-- KEYS[4]  {prefix}:reply:{name}           the host's reply list
-- KEYS[5..] {prefix}:cancel:{marker}       the step's cancel markers (any present: drop)
-- ARGV[1]  owner (random, names this claim)
-- ARGV[2]  lease in milliseconds
-- ARGV[3]  the "started" notice to push ('' for none)
-- ARGV[4]  reply list TTL in seconds
-- ARGV[5]  the task id
-- ARGV[6]  the dispatch nonce
--
-- Returns {'cancelled', marker json} when a cancel marker is present (nothing taken),
-- {'done', outcome json} when recorded, {'over', ''} when the host already has this
-- dispatch's outcome (a late duplicate), {'claimed', ''} when taken,
-- {'held', owner} when another worker holds the lease.
for i = 5, #KEYS do
  local c = redis.call('GET', KEYS[i])
  if c then return {'cancelled', c} end
end
local d = redis.call('HGET', KEYS[1], 'done:' .. ARGV[5])
if d then return {'done', d} end
d = redis.call('GET', KEYS[2])
if d then return {'done', d} end
if redis.call('HGET', KEYS[1], 'ran:' .. ARGV[5]) == ARGV[6]
    or redis.call('HEXISTS', KEYS[1], 'over:' .. ARGV[6]) == 1 then
  return {'over', ''}
end
if redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if ARGV[3] ~= '' then
    redis.call('RPUSH', KEYS[4], ARGV[3])
    redis.call('EXPIRE', KEYS[4], ARGV[4])
  end
  return {'claimed', ''}
end
return {'held', redis.call('GET', KEYS[3]) or ''}
