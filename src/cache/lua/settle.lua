-- The request finished: its hold (if any) becomes a pending settlement, once.
-- KEYS[1] bucket hash, KEYS[2] holds, KEYS[3] pending, KEYS[4] journal, KEYS[5] progress
-- ARGV[1] request id, ARGV[2] cost, ARGV[3] journal record (optional)
-- Returns 1 when the pending settlement was added, 0 when it was already there.
-- The request has ended: its progress record is not needed any more.
redis.call('HDEL', KEYS[5], ARGV[1])
local hold = redis.call('HGET', KEYS[2], ARGV[1])
if hold then
  redis.call('HDEL', KEYS[2], ARGV[1])
  local amount = tonumber(string.match(hold, '^(%-?%d+)|')) or 0
  redis.call('HINCRBY', KEYS[1], 'held', string.format('%d', -amount))
end
if redis.call('HSETNX', KEYS[3], ARGV[1], ARGV[2]) == 0 then
  return 0
end
redis.call('HINCRBY', KEYS[1], 'pend', ARGV[2])
if ARGV[3] then
  redis.call('HSET', KEYS[4], ARGV[1], ARGV[3])
end
return 1
