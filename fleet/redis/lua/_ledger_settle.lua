-- _ledger_settle.lua: the settle of ledger_settle.lua, as a function (included, not run alone).
--
-- KEYS     the including script's (the chain's accounts, see _ledger_prelude.lua)
-- ARGV     the including script's
--
-- Defines `settle(wid, id, tokens, micros)`: charges reservation `id` of workflow `wid` once
-- and releases its hold in every account of the chain (a second settle of `id` does nothing).
-- Needs _ledger_prelude.lua included first.
local function settle(wid, id, tokens, micros)
  if redis.call('HSETNX', key(1, 4), id, tokens .. '|' .. micros) == 1 then
    for i = 1, n do
      if i == 1 then release(i, id) else release(i, wid .. '/' .. id) end
      add(i, 'consumed', tokens)
      add(i, 'uconsumed', micros)
      if i > 1 then
        redis.call('HINCRBY', key(i, 5), 't:' .. wid, tokens)  -- lists the child, even at 0
        if micros ~= '0' then redis.call('HINCRBY', key(i, 5), 'u:' .. wid, micros) end
      end
    end
  end
end
