-- The request is abandoned: drop its hold if it is still there.
-- KEYS[1] bucket hash, KEYS[2] holds, KEYS[3] progress; ARGV[1] request id
-- Returns 1 when a hold was dropped, 0 otherwise.
-- The request has ended: its progress record is not needed any more.
redis.call('HDEL', KEYS[3], ARGV[1])
local hold = redis.call('HGET', KEYS[2], ARGV[1])
if not hold then
  return 0
end
redis.call('HDEL', KEYS[2], ARGV[1])
local amount = tonumber(string.match(hold, '^(%-?%d+)|')) or 0
redis.call('HINCRBY', KEYS[1], 'held', string.format('%d', -amount))
return 1
