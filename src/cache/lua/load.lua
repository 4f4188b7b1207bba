-- Install a snapshot read from the ledger.
-- KEYS[1] bucket hash, KEYS[2] holds, KEYS[3] pending
-- ARGV[1] balance, ARGV[2] rev, ARGV[3] generation the load started in, ARGV[4] next expiry ms
-- ('' for none), ARGV[5] lapsed (the snapshot's fields travel together)
local cur = redis.call('HMGET', KEYS[1], 'bal', 'rev', 'gen')
if not cur[1] then
  -- No snapshot (first use, flushed, or the hash alone was lost): rebuild the totals from the
  -- entries so they can never disagree with the holds and pending settlements they sum.
  local held = 0
  for _, v in ipairs(redis.call('HVALS', KEYS[2])) do
    held = held + (tonumber(string.match(v, '^(%-?%d+)|')) or 0)
  end
  local pend = 0
  for _, v in ipairs(redis.call('HVALS', KEYS[3])) do
    pend = pend + (tonumber(v) or 0)
  end
  redis.call('HSET', KEYS[1], 'bal', ARGV[1], 'rev', ARGV[2], 'nexp', ARGV[4], 'lapsed', ARGV[5],
    'gen', ARGV[3], 'held', string.format('%d', held), 'pend', string.format('%d', pend))
  return 1
end
-- A load is fresh as of its start, so an equal revision is current too; an older one lost a
-- race with a commit or another load and must not win.
if tonumber(ARGV[2]) >= tonumber(cur[2]) then
  redis.call('HSET', KEYS[1], 'bal', ARGV[1], 'rev', ARGV[2], 'nexp', ARGV[4], 'lapsed', ARGV[5])
end
if tonumber(ARGV[3]) > tonumber(cur[3] or '-1') then
  redis.call('HSET', KEYS[1], 'gen', ARGV[3])
end
return 1
