-- limit_state.lua: the limit's use now.
--
-- KEYS[1..4]  calls, cost, meta, flight of the limit (see _limit_prelude.lua)
-- ARGV[1]  the counted window (ms)
--
-- Returns {requests, tokens, in flight, pause ms}.
--!include _limit_prelude.lua
return {state()}
