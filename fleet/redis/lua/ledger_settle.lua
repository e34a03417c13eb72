-- ledger_settle.lua: charge what a reservation used and release its hold (once per id).
--
-- KEYS     five per account of the chain (see _ledger_prelude.lua)
-- ARGV[1]  the workflow id
-- ARGV[2]  the reservation id
-- ARGV[3]  used tokens
-- ARGV[4]  used micro-dollars
--
-- Returns the workflow's account. It expires only the workflow's leases (whose state it
-- returns): settling needs no other account's expiry, and every script that decides on
-- an ancestor's room expires it first.
--!include _ledger_prelude.lua
expire(1)
local wid, id = ARGV[1], ARGV[2]
if redis.call('HSETNX', key(1, 4), id, ARGV[3] .. '|' .. ARGV[4]) == 1 then
  for i = 1, n do
    if i == 1 then release(i, id) else release(i, wid .. '/' .. id) end
    add(i, 'consumed', ARGV[3])
    add(i, 'uconsumed', ARGV[4])
    if i > 1 then
      redis.call('HINCRBY', key(i, 5), 't:' .. wid, ARGV[3])  -- lists the child, even at 0
      if ARGV[4] ~= '0' then redis.call('HINCRBY', key(i, 5), 'u:' .. wid, ARGV[4]) end
    end
  end
end
local a = account(1)
return {a[2], a[3], a[1], a[5], a[6], a[4], a[7]}
