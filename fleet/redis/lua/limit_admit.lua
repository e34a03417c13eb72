-- limit_admit.lua: admit one call under a provider limit now, or say how long to wait.
--
-- KEYS[1..4]  calls, cost, meta, flight of the limit (see _limit_prelude.lua)
-- ARGV[1]  the counted window (ms)
-- ARGV[2]  the admission id
-- ARGV[3]  tokens (the call's estimate)
-- ARGV[4]  max requests in the window (0: no cap)
-- ARGV[5]  max tokens in the window (0: no cap)
-- ARGV[6]  max calls in flight (0: no cap)
-- ARGV[7]  the in-flight lease (ms)
--
-- Returns {status, wait ms, requests, tokens, in flight, pause ms}; status 0 admitted,
-- 1 wait, 2 too large for the limit.
--!include _limit_prelude.lua
local id, tokens = ARGV[2], tonumber(ARGV[3])
local max_req, max_tok, max_flight = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local n, used, flying, pause = state()
if max_tok > 0 and tokens > max_tok then return {2, 0, n, used, flying, pause} end
local wait = pause
if max_req > 0 and n >= max_req then
  local at = redis.call('ZRANGE', KEYS[1], n - max_req, n - max_req, 'WITHSCORES')
  wait = math.max(wait, tonumber(at[2]) + window - now)
end
local excess = used + tokens - max_tok
if max_tok > 0 and excess > 0 then
  local rows = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
  local fits_at = now + window
  for i = 1, #rows, 2 do
    excess = excess - (tonumber(redis.call('HGET', KEYS[2], rows[i])) or 0)
    if excess <= 0 then
      fits_at = tonumber(rows[i + 1]) + window
      break
    end
  end
  wait = math.max(wait, fits_at - now)
end
if max_flight > 0 and flying >= max_flight then
  local soonest = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
  wait = math.max(wait, math.min(tonumber(soonest[2]) - now, 50))
end
if wait > 0 then return {1, wait, n, used, flying, pause} end
redis.call('ZADD', KEYS[1], now, id)
redis.call('HSET', KEYS[2], id, ARGV[3])
used = redis.call('HINCRBY', KEYS[3], 'tokens', ARGV[3])
if max_flight > 0 then
  redis.call('ZADD', KEYS[4], now + tonumber(ARGV[7]), id)
  flying = flying + 1
end
keep(window + tonumber(ARGV[7]) + pause)
return {0, 0, n + 1, used, flying, pause}
