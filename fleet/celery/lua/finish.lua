-- finish.lua: record the outcome of a step (or chain link), notify the host, drop the lease.
--
-- KEYS[1]  {prefix}:result:{tid}:{nonce}   the outcome of this dispatch
-- KEYS[2]  {prefix}:lease:{tid}            our claim (deleted only if still ours)
-- KEYS[3]  {prefix}:reply:{name}           the host's reply list
-- KEYS[4]  {prefix}:done:{tid}             a journaled step's success (set when ARGV[5]=='1')
-- ARGV[1]  the record (outcome json, or a link's "stopped" notice)
-- ARGV[2]  record TTL in seconds
-- ARGV[3]  owner of our lease
-- ARGV[4]  reply list TTL in seconds
-- ARGV[5]  '1' to also set the done-marker, else '0'
-- ARGV[6..] notices to push to the reply list
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
if ARGV[5] == '1' then redis.call('SET', KEYS[4], ARGV[1], 'EX', ARGV[2]) end
for i = 6, #ARGV do redis.call('RPUSH', KEYS[3], ARGV[i]) end
if #ARGV >= 6 then redis.call('EXPIRE', KEYS[3], ARGV[4]) end
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
return 1
