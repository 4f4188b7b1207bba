-- A request still running pushes its hold's deadline out, if the hold is still there, and
-- (ARGV[3], optional) records its progress: the settlement of what it has delivered so far,
-- which a sibling writes if this instance dies before the request ends.
-- KEYS[1] holds, KEYS[2] progress; ARGV[1] request id, ARGV[2] new deadline ms,
-- ARGV[3] progress record
-- Returns 1 when renewed, 0 when the hold is gone (released by a sibling that took this
-- instance for dead, or expired): the request is no longer covered and must stop.
local hold = redis.call('HGET', KEYS[1], ARGV[1])
if not hold then
  return 0
end
local amount, _, token, owner = string.match(hold, '^(%-?%d+)|(%-?%d+)|([^|]*)|(.*)$')
if not amount then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], amount .. '|' .. ARGV[2] .. '|' .. token .. '|' .. owner)
if ARGV[3] then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
end
return 1
