-- Record that instance ARGV[1] is alive, on the Redis clock (immune to gateway clock skew).
-- KEYS[1] instances sorted set
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], string.format('%d', ms), ARGV[1])
return ms
