-- _limit_prelude.lua: what every provider-limit script starts with (included, not run alone).
--
-- KEYS[1]  {prefix}:limit:{name}:calls    zset  admission id -> admitted at (ms)
-- KEYS[2]  {prefix}:limit:{name}:cost     hash  admission id -> tokens counted
-- KEYS[3]  {prefix}:limit:{name}:meta     hash  tokens (sum over the window), paused_until
-- KEYS[4]  {prefix}:limit:{name}:flight   zset  admission id -> in-flight lease expiry (ms)
-- ARGV[1]  the counted window (ms); the rest are the including script's
--
-- Defines `now` (Redis server time, ms) and `window`, drops admissions older than the
-- window and lapsed leases; `paused()`, `state()` -> requests, tokens, in flight, pause
-- left (ms), and `keep(ms)` (every key lives at least that long).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - window)
if #old > 0 then
  local freed = 0
  for _, id in ipairs(old) do
    freed = freed + (tonumber(redis.call('HGET', KEYS[2], id)) or 0)
    redis.call('HDEL', KEYS[2], id)
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  -- 0 - freed, not -freed: Lua's -0 is sent as "-0", which HINCRBY refuses.
  if freed ~= 0 then redis.call('HINCRBY', KEYS[3], 'tokens', 0 - freed) end
end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local function paused()
  local p = tonumber(redis.call('HGET', KEYS[3], 'paused_until')) or 0
  return math.max(p - now, 0)
end
local function state()
  return redis.call('ZCARD', KEYS[1]), tonumber(redis.call('HGET', KEYS[3], 'tokens')) or 0,
    redis.call('ZCARD', KEYS[4]), paused()
end
local function keep(ms)
  for i = 1, 4 do
    if redis.call('PTTL', KEYS[i]) < ms then redis.call('PEXPIRE', KEYS[i], ms) end
  end
end
