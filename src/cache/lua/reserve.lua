-- Hold ARGV[2] micro-credits for request ARGV[1] if the bucket can cover it.
-- KEYS[1] bucket hash, KEYS[2] holds; on a single server also KEYS[3] the invalidation
-- generation and KEYS[4] this instance's owner set (in a cluster they live in other slots: the
-- caller reads the one and adds to the other before calling)
-- ARGV[1] request id, ARGV[2] amount, ARGV[3] floor, ARGV[4] deadline ms, ARGV[5] owner,
-- ARGV[6] invalidation generation read by the caller (without KEYS[3]), ARGV[7] token of this
-- call, ARGV[8] the caller's clock (ms; grant expiries are written in gateway time),
-- ARGV[9] the bucket hash's name, for the owner set (with KEYS[4])
-- A hold is `amount|deadline|token|owner` (owner last: it may contain `|`).
-- Returns {0, generation} when the snapshot is missing, older than the generation, or counts a
-- grant that has lapsed by the caller's clock or by an expiry sweep's fence (load stamped with
-- that generation, then retry), {1} when held (or already held by this request),
-- {2, available} when it does not fit.
local generation = tonumber(ARGV[6])
if KEYS[3] then
  generation = tonumber(redis.call('GET', KEYS[3]) or '0')
  -- The bucket joins the owner set before any hold exists in it (here: in the same step).
  redis.call('SADD', KEYS[4], ARGV[9])
end
local b = redis.call('HMGET', KEYS[1], 'bal', 'gen', 'held', 'pend', 'nexp', 'lapsed', 'fence')
if not b[1] or tonumber(b[2] or '-1') < generation then
  return {0, generation}
end
local nexp = tonumber(b[5])
if nexp and math.max(tonumber(ARGV[8]), tonumber(b[7]) or 0) >= nexp then
  return {0, generation}
end
-- Idempotent per request: a retried reservation holds once. The hold now answers to this
-- call's token, so an abandon sent for an earlier call whose answer was lost cannot drop it.
local existing = redis.call('HGET', KEYS[2], ARGV[1])
if existing then
  local amount, deadline, _, owner =
    string.match(existing, '^(%-?%d+)|(%-?%d+)|([^|]*)|(.*)$')
  if amount then
    local renewed = amount .. '|' .. deadline .. '|' .. ARGV[7] .. '|' .. owner
    redis.call('HSET', KEYS[2], ARGV[1], renewed)
  end
  return {1}
end
-- Lapsed credits not swept yet are kept for requests that started before they lapsed.
local available = tonumber(b[1]) - tonumber(b[6] or '0') - tonumber(b[4] or '0')
  - tonumber(b[3] or '0')
if available - tonumber(ARGV[2]) < tonumber(ARGV[3]) then
  return {2, available}
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. '|' .. ARGV[4] .. '|' .. ARGV[7] .. '|' .. ARGV[5])
redis.call('HINCRBY', KEYS[1], 'held', ARGV[2])
return {1}
