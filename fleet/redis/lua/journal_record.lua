-- journal_record.lua: add step records to a journal, giving it its meta if it has none.
--
-- KEYS[1]  {prefix}:journal:{workflow}   the journal hash ('meta', 'step:{task id}', ...)
-- ARGV[1]  the journal's meta json (set only if the journal has none)
-- ARGV[2..] field, value pairs: 'step:{task id}', the step's record json
--
-- Returns 1.
redis.call('HSETNX', KEYS[1], 'meta', ARGV[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
