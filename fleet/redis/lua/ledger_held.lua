-- ledger_held.lua: the live reservations of the workflow's account.
--
-- KEYS     five per account (see _ledger_prelude.lua); only the first account is read
-- ARGV     none
--
-- Returns a flat list: id, "<tokens>|<micros>|<holder>", expires_in_ms, ...
--!include _ledger_prelude.lua
for i = 1, n do expire(i) end
local out = {}
local leases = redis.call('ZRANGE', key(1, 3), 0, -1, 'WITHSCORES')
for i = 1, #leases, 2 do
  local v = redis.call('HGET', key(1, 2), leases[i])
  if v then
    table.insert(out, leases[i])
    table.insert(out, v)
    table.insert(out, tonumber(leases[i + 1]) - now)
  end
end
return out
