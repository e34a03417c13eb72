-- ledger_reserve.lua: hold tokens and micro-dollars in every account of a chain, or refuse.
--
-- KEYS     five per account of the chain (see _ledger_prelude.lua)
-- ARGV[1]  the workflow id
-- ARGV[2]  the reservation id
-- ARGV[3]  tokens
-- ARGV[4]  micro-dollars
-- ARGV[5]  holder
-- ARGV[6]  lease in milliseconds
-- ARGV[7]  the workflow's limit if it has none yet (-1 = uncapped)
-- ARGV[8]  the workflow's dollar limit (micro-dollars) if it has none yet (-1 = uncapped)
--
-- Returns {status, tokens, micros, account 1..., blocking index, unit, retry_ms, room,
-- blocking account...}; status 0 granted, 1 wait, 2 refused; unit 0 tokens, 1 usd;
-- room -1 = uncapped. A repeated reserve renews the lease and charges nothing more.
--!include _ledger_prelude.lua
for i = 1, n do expire(i) end
local wid, id = ARGV[1], ARGV[2]
local tokens, micros = tonumber(ARGV[3]), tonumber(ARGV[4])
local lease = tonumber(ARGV[6])
local function rid(i) if i == 1 then return id end return wid .. '/' .. id end
local accounts, room = {}, -1
for i = 1, n do
  accounts[i] = account(i)
  local a = accounts[i]
  if i == 1 and a[1] == -2 then
    redis.call('HSET', key(1, 1), 'limit', ARGV[7])
    a[1] = tonumber(ARGV[7])
  end
  if i == 1 and a[4] == -2 then
    redis.call('HSET', key(1, 1), 'ulimit', ARGV[8])
    a[4] = tonumber(ARGV[8])
  end
  if a[4] >= 0 and (room < 0 or a[4] - a[5] < room) then room = math.max(a[4] - a[5], 0) end
end
local existing = redis.call('HGET', key(1, 2), id)
if existing then
  for i = 1, n do
    if redis.call('HEXISTS', key(i, 2), rid(i)) == 1 then
      redis.call('ZADD', key(i, 3), now + lease, rid(i))
    end
  end
  local tok, usd = string.match(existing, '^(%d+)|(%d+)|')
  local a = accounts[1]
  return {0, tonumber(tok), tonumber(usd), a[2], a[3], a[1], a[5], a[6], a[4], a[7],
    0, 0, 0, room}
end
local function verdict(limit, consumed, reserved, request)
  if limit < 0 then return 0 end
  if consumed >= limit or consumed + request > limit then return 2 end
  if consumed + reserved + request > limit then return 1 end
  return 0
end
local status, who, unit = 0, 0, 0
for i = 1, n do
  local a = accounts[i]
  local st, u = verdict(a[1], a[2], a[3], tokens), 0
  local su = verdict(a[4], a[5], a[6], micros)
  if su > st then st, u = su, 1 end
  if st > status then status, who, unit = st, i, u end
  if status == 2 then break end
end
local a = accounts[1]
if status > 0 then
  local retry = 0
  if status == 1 then
    local soonest = redis.call('ZRANGE', key(who, 3), 0, 0, 'WITHSCORES')
    if soonest[2] then retry = tonumber(soonest[2]) - now end
  end
  local b = accounts[who]
  return {status, 0, 0, a[2], a[3], a[1], a[5], a[6], a[4], a[7], who, unit, retry, room,
    b[2], b[3], b[1], b[5], b[6], b[4], b[7]}
end
-- A settled id reserved again is a new attempt of the same step: settle anew.
redis.call('HDEL', key(1, 4), id)
local value = ARGV[3] .. '|' .. ARGV[4] .. '|' .. ARGV[5]
for i = 1, n do
  redis.call('HSET', key(i, 2), rid(i), value)
  redis.call('ZADD', key(i, 3), now + lease, rid(i))
  add(i, 'reserved', ARGV[3])
  add(i, 'ureserved', ARGV[4])
end
return {0, tokens, micros, a[2], a[3] + tokens, a[1], a[5], a[6] + micros, a[4], a[7],
  0, 0, 0, room}
