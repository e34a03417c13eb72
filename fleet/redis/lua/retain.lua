-- retain.lua: set (or clear) the expiry of everything a workflow owns in Redis.
--
-- KEYS     what a workflow owns (see fleet.retention.workflow_keys)
-- ARGV[1]: seconds to keep them ('0': keep them for good, the run is live again)
-- ARGV[1 + i]: the kind of KEYS[i]: 'r' record, 'a' first key of an account (five keys;
--              skipped when its 'children' key exists: a shared account), 'm' cancel marker
--              (only lengthened), 'l' live data with an expiry of its own (only shortened)
--
-- Returns how many keys got (or lost) an expiry.
local ttl = tonumber(ARGV[1])
local touched = 0
local function apply(key)
  if ttl > 0 then touched = touched + redis.call('EXPIRE', key, ttl)
  else touched = touched + redis.call('PERSIST', key) end
end
local i = 1
while i <= #KEYS do
  local kind = ARGV[i + 1]
  if kind == 'a' then
    if redis.call('EXISTS', KEYS[i + 4]) == 0 then
      for j = i, i + 4 do apply(KEYS[j]) end
    end
    i = i + 5
  else
    if kind == 'r' then
      apply(KEYS[i])
    elseif ttl > 0 then
      local left = redis.call('TTL', KEYS[i])
      local longer = kind == 'm' and left >= 0 and left < ttl
      local shorter = kind == 'l' and (left == -1 or left > ttl)
      if longer or shorter then touched = touched + redis.call('EXPIRE', KEYS[i], ttl) end
    end
    i = i + 1
  end
end
return touched
