-- gc_children.lua: drop from an account's per-child breakdown the workflows that are gone.
--
-- KEYS[1]     {p}:budget:{A}:children (fields 't:W' / 'u:W': what workflow W consumed under A)
-- KEYS[1 + i] {p}:budget:{W_i}:account, the account of child workflow W_i
-- ARGV[i]     W_i
--
-- The breakdown is only that: A's totals are in its own account hash, which is not touched.
-- A child's fields go only while its account does not exist (it expired with its
-- retention, or gc removed it): a settle writes both in one script, so a child that runs
-- again meanwhile keeps its fields. Returns how many fields were removed.
local n = 0
for i = 1, #ARGV do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then
    n = n + redis.call('HDEL', KEYS[1], 't:' .. ARGV[i], 'u:' .. ARGV[i])
  end
end
return n
