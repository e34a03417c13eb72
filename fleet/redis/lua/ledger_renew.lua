-- ledger_renew.lua: extend a live reservation's lease in every account of its chain.
--
-- KEYS     five per account of the chain (see _ledger_prelude.lua)
-- ARGV[1]  the workflow id
-- ARGV[2]  the reservation id
-- ARGV[3]  lease in milliseconds
--
-- Returns 1 if the reservation is live (and renewed), else 0.
--!include _ledger_prelude.lua
for i = 1, n do expire(i) end
if redis.call('HEXISTS', key(1, 2), ARGV[2]) == 0 then return 0 end
for i = 1, n do
  local id = ARGV[2]
  if i > 1 then id = ARGV[1] .. '/' .. id end
  if redis.call('HEXISTS', key(i, 2), id) == 1 then
    redis.call('ZADD', key(i, 3), now + tonumber(ARGV[3]), id)
  end
end
return 1
