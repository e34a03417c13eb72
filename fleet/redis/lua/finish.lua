-- finish.lua: record the outcome of a step (or chain link), notify the host, drop the lease,
-- all only while the lease still holds this attempt's token (fencing).
--
-- KEYS[1]  {prefix}:result:{tid}:{nonce}   the outcome of this dispatch
-- KEYS[2]  {prefix}:lease:{tid}            our claim: its value must be ARGV[3]
-- KEYS[3]  {prefix}:reply:{name}           the host's reply list
-- KEYS[4]  {prefix}:steps:{owner}          the step record (done:{tid} set when ARGV[5]=='1')
-- KEYS[5]  {prefix}:journal:{workflow}     the journal hash (written when ARGV[9] ~= '')
-- ARGV[1]  the record (outcome json, or a link's "stopped" notice)
-- ARGV[2]  record TTL in seconds (while no host has read it)
-- ARGV[3]  the lease's token (this attempt's owner value)
-- ARGV[4]  reply list TTL in seconds
-- ARGV[5]  '1' to also set the done-marker, else '0'
-- ARGV[6]  the task id
-- ARGV[7]  the dispatch nonce
-- ARGV[8]  record TTL in seconds when the host is already past this dispatch
-- ARGV[9]  the journal field ('step:{task id}'), or '' to journal nothing
-- ARGV[10] the journal record json
-- ARGV[11] the journal's meta json (set if the journal has none)
-- ARGV[12..] notices to push to the reply list
--
-- Returns 1 when recorded, 0 when refused: the lease lapsed (or another attempt holds it),
-- so this attempt's outcome must not count and nothing was written.
if redis.call('GET', KEYS[2]) ~= ARGV[3] then return 0 end
--!include _finish_record.lua
for i = 12, #ARGV do redis.call('RPUSH', KEYS[3], ARGV[i]) end
if #ARGV >= 12 then redis.call('EXPIRE', KEYS[3], ARGV[4]) end
redis.call('DEL', KEYS[2])
return 1
