-- The request finished: its hold (if any) becomes a pending settlement, once.
-- KEYS[1] bucket hash, KEYS[2] holds, KEYS[3] pending, KEYS[4] journal, KEYS[5] progress; on a
-- single server also KEYS[6] the index of pending settlements (in a cluster it lives in another
-- slot: the caller indexes the record before calling)
-- ARGV[1] request id, ARGV[2] cost, ARGV[3] journal record ('' for none), ARGV[4] index member,
-- ARGV[5] index score (settled at, ms) (both with KEYS[6])
-- Returns 1 when the pending settlement was added, 0 when it was already there.
local record = ARGV[3] ~= '' and ARGV[3] or nil
if record and KEYS[6] then
  -- NX keeps the first settle time of a repeated settle.
  redis.call('ZADD', KEYS[6], 'NX', ARGV[5], ARGV[4])
end
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
if record then
  redis.call('HSET', KEYS[4], ARGV[1], record)
end
return 1
