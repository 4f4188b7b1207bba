-- Move the global invalidation generation forward. It becomes max(current + 1, Redis time in
-- ms): increasing like INCR, and still ahead of every generation already stamped on a bucket
-- if the key itself was lost (a failover that dropped it) and starts again from nothing.
-- KEYS[1] generation key
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local next = math.max(tonumber(redis.call('GET', KEYS[1]) or '0') + 1, ms)
redis.call('SET', KEYS[1], string.format('%d', next))
return next
