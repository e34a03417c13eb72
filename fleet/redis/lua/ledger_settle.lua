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
--!include _ledger_settle.lua
expire(1)
settle(ARGV[1], ARGV[2], ARGV[3], ARGV[4])
local a = account(1)
return {a[2], a[3], a[1], a[5], a[6], a[4], a[7]}
