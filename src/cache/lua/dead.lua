-- Instances whose last heartbeat is older than ARGV[1] ms on the Redis clock, except ARGV[2]
-- (the caller, alive by definition), at most ARGV[3] of them.
-- KEYS[1] instances sorted set
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cutoff = string.format('(%d', ms - tonumber(ARGV[1]))
local limit = tonumber(ARGV[3])
local found = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', cutoff, 'LIMIT', 0, limit + 1)
local dead = {}
for _, member in ipairs(found) do
  if member ~= ARGV[2] and #dead < limit then
    dead[#dead + 1] = member
  end
end
return dead
