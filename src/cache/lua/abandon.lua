-- Drop the hold a reservation call may have taken when the caller never learned the outcome
-- (a timeout or a dropped connection after Redis ran the script), but only if the hold still
-- answers to that call's token: a later reservation of the same request keeps its hold.
-- KEYS[1] bucket hash, KEYS[2] holds; ARGV[1] request id, ARGV[2] token, ARGV[3] owner
-- Returns 1 when the hold was dropped, 0 otherwise.
local hold = redis.call('HGET', KEYS[2], ARGV[1])
if not hold then
  return 0
end
local amount, _, token, owner = string.match(hold, '^(%-?%d+)|(%-?%d+)|([^|]*)|(.*)$')
if not amount or token ~= ARGV[2] or owner ~= ARGV[3] then
  return 0
end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'held', string.format('%d', -tonumber(amount)))
return 1
