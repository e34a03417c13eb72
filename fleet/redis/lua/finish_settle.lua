-- finish_settle.lua: finish.lua and ledger_settle.lua in one script, for a step that holds
-- a token reservation: record its outcome and settle its reservation, or, when the lease
-- no longer holds this attempt's token (fencing), record nothing and charge its usage on
-- the attempt's own id ('{reservation id}~{token}', as workers/fencing.py does).
--
-- KEYS[1..5]  as finish.lua's (result, lease, reply list, step record, journal)
-- KEYS[6..]   five per account of the reservation's chain (see _ledger_prelude.lua)
-- ARGV[1..11] as finish.lua's
-- ARGV[12]    the workflow id (the budget's)
-- ARGV[13]    the reservation id
-- ARGV[14]    used tokens
-- ARGV[15]    used micro-dollars
-- ARGV[16..]  notices to push to the reply list
--
-- Returns 1 when recorded and settled, 0 when refused (the attempt's usage then charged
-- on its own id; the reservation stays for the attempt that owns the step now).
--!include _ledger_prelude.lua
--!include _ledger_settle.lua
first, n = 5, n - 1
expire(1)
if redis.call('GET', KEYS[2]) ~= ARGV[3] then
  settle(ARGV[12], ARGV[13] .. '~' .. ARGV[3], ARGV[14], ARGV[15])
  return 0
end
--!include _finish_record.lua
settle(ARGV[12], ARGV[13], ARGV[14], ARGV[15])
for i = 16, #ARGV do redis.call('RPUSH', KEYS[3], ARGV[i]) end
if #ARGV >= 16 then redis.call('EXPIRE', KEYS[3], ARGV[4]) end
redis.call('DEL', KEYS[2])
return 1
