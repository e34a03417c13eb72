-- ask_swap.lua: store an ask's new record only if the stored one is still the expected one.
--
-- KEYS[1] {p}:asks:{ROOT}   hash: ask name -> record JSON
-- ARGV[1]  the ask's name
-- ARGV[2]  the record expected ('' when there should be none)
-- ARGV[3]  the new record
--
-- Returns 1 when stored, 0 when the stored record was not the expected one.
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current == false then current = '' end
if current ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
