-- Read the bucket as callers see it, in one consistent step.
-- KEYS[1] bucket hash; ARGV[1] invalidation generation read by the caller, ARGV[2] the caller's
-- clock (ms)
-- Returns {0} when a load is needed (as reserve.lua decides it), else
-- {1, balance less pending, held, lapsed}.
local b = redis.call('HMGET', KEYS[1], 'bal', 'gen', 'held', 'pend', 'nexp', 'lapsed', 'fence')
if not b[1] or tonumber(b[2] or '-1') < tonumber(ARGV[1]) then
  return {0}
end
local nexp = tonumber(b[5])
if nexp and math.max(tonumber(ARGV[2]), tonumber(b[7]) or 0) >= nexp then
  return {0}
end
return {1, tonumber(b[1]) - tonumber(b[4] or '0'), tonumber(b[3] or '0'), tonumber(b[6] or '0')}
