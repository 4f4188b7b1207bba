-- The ledger changed the bucket outside the request path: a newer snapshot wins.
-- KEYS[1] bucket hash; ARGV[1] balance, ARGV[2] rev, ARGV[3] next expiry ms ('' for none),
-- ARGV[4] lapsed
local cur = redis.call('HMGET', KEYS[1], 'bal', 'rev')
if cur[1] and tonumber(ARGV[2]) > tonumber(cur[2]) then
  redis.call('HSET', KEYS[1], 'bal', ARGV[1], 'rev', ARGV[2], 'nexp', ARGV[3], 'lapsed', ARGV[4])
  return 1
end
return 0
