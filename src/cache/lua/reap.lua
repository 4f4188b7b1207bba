-- Release the holds of one bucket whose deadline has passed, and (ARGV[3] == '1') every hold
-- of owner ARGV[2], an instance whose heartbeat stopped. A hold whose request left a progress
-- record (a stream billed for what it had delivered so far) is not released but listed, so the
-- caller turns it into a pending settlement with that record.
-- KEYS[1] bucket hash, KEYS[2] holds, KEYS[3] progress; ARGV[1] now ms, ARGV[2] owner,
-- ARGV[3] '1' or '0'
-- Returns {released, holds of ARGV[2] still there, {request ids with progress}}.
local now = tonumber(ARGV[1])
local everything = ARGV[3] == '1'
local released, remaining, freed = 0, 0, 0
local progressed = {}
local entries = redis.call('HGETALL', KEYS[2])
for i = 1, #entries, 2 do
  local amount, deadline, _, owner =
    string.match(entries[i + 1], '^(%-?%d+)|(%-?%d+)|([^|]*)|(.*)$')
  if amount then
    if tonumber(deadline) < now or (everything and owner == ARGV[2]) then
      if redis.call('HEXISTS', KEYS[3], entries[i]) == 1 then
        progressed[#progressed + 1] = entries[i]
      else
        redis.call('HDEL', KEYS[2], entries[i])
        freed = freed + tonumber(amount)
        released = released + 1
      end
    elseif owner == ARGV[2] then
      remaining = remaining + 1
    end
  end
end
if released > 0 then
  redis.call('HINCRBY', KEYS[1], 'held', string.format('%d', -freed))
end
return {released, remaining, progressed}
