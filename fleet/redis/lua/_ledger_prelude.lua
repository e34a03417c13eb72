-- _ledger_prelude.lua: what every ledger script starts with (included, not run alone).
--
-- KEYS     five per account of the chain, the workflow's account first:
--          {prefix}:budget:{A}:account, :held, :leases, :settled, :children
-- ARGV     the including script's
--
-- Defines `now` (Redis server time, ms), `n` (accounts), `first` (KEYS before the accounts':
-- 0; a script whose own keys come first sets it, and `n`), `key(i, part)`, `release(i, id)`,
-- `expire(i)` (releases account i's expired leases), `account(i)` and
-- `add(i, field, amount)`.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #KEYS / 5
local first = 0
local function key(i, part) return KEYS[first + (i - 1) * 5 + part] end
local function release(i, id)
  local v = redis.call('HGET', key(i, 2), id)
  if v then
    local tok, usd = string.match(v, '^(%d+)|(%d+)|')
    -- Redis refuses "-0" as an increment.
    if tok ~= '0' then redis.call('HINCRBY', key(i, 1), 'reserved', '-' .. tok) end
    if usd ~= '0' then redis.call('HINCRBY', key(i, 1), 'ureserved', '-' .. usd) end
    redis.call('HDEL', key(i, 2), id)
  end
  redis.call('ZREM', key(i, 3), id)
end
local function expire(i)
  local dead = redis.call('ZRANGEBYSCORE', key(i, 3), '-inf', now)
  for _, id in ipairs(dead) do release(i, id) end
end
local function add(i, field, amount)
  if amount ~= '0' then redis.call('HINCRBY', key(i, 1), field, amount) end
end
local function account(i)
  local a = redis.call('HMGET', key(i, 1), 'limit', 'consumed', 'reserved', 'ulimit',
    'uconsumed', 'ureserved', 'parents')
  return {tonumber(a[1]) or -2, tonumber(a[2]) or 0, tonumber(a[3]) or 0,
    tonumber(a[4]) or -2, tonumber(a[5]) or 0, tonumber(a[6]) or 0, a[7] or ''}
end
