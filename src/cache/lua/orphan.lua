-- Look up one indexed pending settlement.
-- KEYS[1] pending, KEYS[2] journal; ARGV[1] request id
-- Returns {0} when the pending entry is gone (the index entry is stale), {1} when it has no
-- journal record, {1, record} otherwise.
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  return {0}
end
local record = redis.call('HGET', KEYS[2], ARGV[1])
if not record then
  return {1}
end
return {1, record}
