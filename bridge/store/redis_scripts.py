"""Lua scripts that make the Redis store's multi-key updates atomic (one script runs at a time)."""

from __future__ import annotations

# KEYS: pending zset, entry hash, done marker. ARGV: id, payload, accepted_at, attempts.
INBOX_ADD = """
if redis.call('EXISTS', KEYS[3]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end
redis.call('HSET', KEYS[2], 'payload', ARGV[2], 'accepted_at', ARGV[3], 'attempts', ARGV[4])
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
"""

# KEYS: entry hash.
INBOX_ATTEMPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
return redis.call('HINCRBY', KEYS[1], 'attempts', 1)
"""

# KEYS: counter. ARGV: ttl_ms.
INCR = """
local n = redis.call('INCR', KEYS[1])
if n == 1 or redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return n
"""

# KEYS: header hash, events zset.
# ARGV: last_seq, first_seq, topics json, updated_at, ttl_ms, open_jobs json.
SAVE_SESSION = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[2])
end
redis.call('HSET', KEYS[1], 'last_seq', ARGV[1], 'first_seq', ARGV[2], 'topics', ARGV[3],
  'updated_at', ARGV[4], 'open_jobs', ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return 1
"""

# KEYS: header hash, events zset. ARGV: now, ttl_ms, then seq, member pairs (seq ascending).
APPEND_EVENTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'last_seq', '0', 'first_seq', '1', 'topics', '[]',
    'updated_at', ARGV[1])
end
local last_s = redis.call('HGET', KEYS[1], 'last_seq')
local last = tonumber(last_s)
for i = 3, #ARGV, 2 do
  local seq = tonumber(ARGV[i])
  if seq > last then
    redis.call('ZADD', KEYS[2], ARGV[i], ARGV[i + 1])
    last = seq
    last_s = ARGV[i]
  end
end
redis.call('HSET', KEYS[1], 'last_seq', last_s, 'updated_at', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""

# KEYS: header hash, events zset. ARGV: through_seq.
TRIM_EVENTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
local last = tonumber(redis.call('HGET', KEYS[1], 'last_seq'))
local first = tonumber(redis.call('HGET', KEYS[1], 'first_seq'))
local through = tonumber(ARGV[1])
if through > last then
  through = last
end
if through + 1 > first then
  redis.call('HSET', KEYS[1], 'first_seq', string.format('%d', through + 1))
end
return 1
"""
