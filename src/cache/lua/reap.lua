-- Release the holds of one bucket whose deadline has passed, and (ARGV[3] == '1') every hold
-- of owner ARGV[2], an instance whose heartbeat stopped.
-- KEYS[1] bucket hash, KEYS[2] holds; ARGV[1] now ms, ARGV[2] owner, ARGV[3] '1' or '0'
-- Returns {released, holds of ARGV[2] still there}.
local now = tonumber(ARGV[1])
local everything = ARGV[3] == '1'
local released, remaining, freed = 0, 0, 0
local entries = redis.call('HGETALL', KEYS[2])
for i = 1, #entries, 2 do
  local amount, deadline, _, owner =
    string.match(entries[i + 1], '^(%-?%d+)|(%-?%d+)|([^|]*)|(.*)$')
  if amount then
    if tonumber(deadline) < now or (everything and owner == ARGV[2]) then
      redis.call('HDEL', KEYS[2], entries[i])
      freed = freed + tonumber(amount)
      released = released + 1
    elseif owner == ARGV[2] then
      remaining = remaining + 1
    end
  end
end
if released > 0 then
  redis.call('HINCRBY', KEYS[1], 'held', string.format('%d', -freed))
end
return {released, remaining}
