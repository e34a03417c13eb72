-- ledger_state.lua: read (and optionally configure) the workflow's account.
--
-- KEYS     five per account of the chain (see _ledger_prelude.lua)
-- ARGV     pairs of field, value to store (limit, ulimit, parents); none to only read
--
-- Returns the account: consumed, reserved, limit, uconsumed, ureserved, ulimit, parents.
--!include _ledger_prelude.lua
for i = 1, n do expire(i) end
for i = 1, #ARGV, 2 do redis.call('HSET', key(1, 1), ARGV[i], ARGV[i + 1]) end
local a = account(1)
return {a[2], a[3], a[1], a[5], a[6], a[4], a[7]}
