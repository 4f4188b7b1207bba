-- The request's settlement is in the ledger: drop the pending entry and its journal record,
-- and absorb the ledger's balance after it if that is newer than the cached snapshot. A hold
-- the request still has (its settlement never reached the cache: a Redis error or timeout at
-- the time) goes too: the ledger's balance now carries the charge, so the hold would count it
-- twice and stay until its deadline.
-- KEYS[1] bucket hash, KEYS[2] pending, KEYS[3] journal, KEYS[4] holds, KEYS[5] progress; on a
-- single server also KEYS[6] the index of pending settlements (in a cluster it lives in another
-- slot: the caller removes the entry after)
-- ARGV[1] request id, ARGV[2] balance, ARGV[3] rev, ARGV[4] next expiry ms ('' for none),
-- ARGV[5] lapsed, ARGV[6] index member (with KEYS[6])
-- Returns 1 when a journal record was dropped (its index entry can go too), else 0.
-- The request has ended: its progress record is not needed any more.
redis.call('HDEL', KEYS[5], ARGV[1])
local cost = redis.call('HGET', KEYS[2], ARGV[1])
if cost then
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('HINCRBY', KEYS[1], 'pend', string.format('%d', -tonumber(cost)))
end
local hold = redis.call('HGET', KEYS[4], ARGV[1])
if hold then
  redis.call('HDEL', KEYS[4], ARGV[1])
  local amount = tonumber(string.match(hold, '^(%-?%d+)|')) or 0
  redis.call('HINCRBY', KEYS[1], 'held', string.format('%d', -amount))
end
local journaled = redis.call('HDEL', KEYS[3], ARGV[1])
if journaled > 0 and KEYS[6] then
  redis.call('ZREM', KEYS[6], ARGV[6])
end
local cur = redis.call('HMGET', KEYS[1], 'bal', 'rev')
if cur[1] and tonumber(ARGV[3]) > tonumber(cur[2]) then
  redis.call('HSET', KEYS[1], 'bal', ARGV[2], 'rev', ARGV[3], 'nexp', ARGV[4], 'lapsed', ARGV[5])
end
return journaled
