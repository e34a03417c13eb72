-- renew_lease.lua: extend a step's lease, only if we still hold it.
--
-- KEYS[1]  {prefix}:lease:{tid}
-- ARGV[1]  owner of the lease
-- ARGV[2]  new lease in milliseconds
--
-- Returns 1 when renewed, 0 when the lease is gone or someone else's.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
