-- An expiry sweep (or a reload) is about to take grants lapsed at or before ARGV[1] out of this
-- account's balance. In one step: raise the fence to ARGV[1], so that no later reserve or view
-- trusts a snapshot counting such a grant as live (whatever clock its caller read), and return
-- what is held or pending now: only those requests may still draw from the lapsed grants, so
-- that is what the sweep keeps back.
-- KEYS[1] bucket hash, KEYS[2] holds, KEYS[3] pending; ARGV[1] the sweep's cutoff (ms)
local b = redis.call('HMGET', KEYS[1], 'bal', 'held', 'pend', 'fence')
if b[1] then
  if tonumber(ARGV[1]) > (tonumber(b[4]) or 0) then
    redis.call('HSET', KEYS[1], 'fence', ARGV[1])
  end
  return string.format('%d', (tonumber(b[2]) or 0) + (tonumber(b[3]) or 0))
end
-- No snapshot: every reservation loads (and sweeps) first, so no fence is needed; the entries
-- themselves say what is in flight (as load.lua rebuilds the totals).
local total = 0
for _, v in ipairs(redis.call('HVALS', KEYS[2])) do
  total = total + (tonumber(string.match(v, '^(%-?%d+)|')) or 0)
end
for _, v in ipairs(redis.call('HVALS', KEYS[3])) do
  total = total + (tonumber(v) or 0)
end
return string.format('%d', total)
