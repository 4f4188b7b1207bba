-- Remove instance ARGV[1] from the heartbeat set unless it beat again meanwhile.
-- KEYS[1] instances sorted set; ARGV[2] max heartbeat age ms
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then
  return 0
end
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if tonumber(score) < ms - tonumber(ARGV[2]) then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
