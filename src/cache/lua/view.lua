-- Read the bucket as callers see it, in one consistent step.
-- KEYS[1] bucket hash; ARGV[1] invalidation generation read by the caller
-- Returns {0} when a load is needed, else {1, balance less pending, held}.
local b = redis.call('HMGET', KEYS[1], 'bal', 'gen', 'held', 'pend')
if not b[1] or tonumber(b[2] or '-1') < tonumber(ARGV[1]) then
  return {0}
end
return {1, tonumber(b[1]) - tonumber(b[4] or '0'), tonumber(b[3] or '0')}
