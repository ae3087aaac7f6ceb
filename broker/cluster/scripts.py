"""The Lua scripts the Redis Streams backplane runs on each shard, and their arguments.

Both begin by comparing what Redis holds of the shard with what the node calling knows of it
(`broker.cluster.epochs`): the shard's epoch (field `""` of its counters hash) and its write
count (field `.count`: how many entries were appended in that epoch, each entry carrying its
number as `c`). Redis that holds an older epoch than the node knows, or the same epoch with
fewer writes, went back in time (restarted from an older snapshot, or a replica without the
last writes took over); Redis without an epoch lost everything. Either way the shard starts a
new epoch at once: the counters hash is replaced (every topic numbered from 1 again) and an
entry without messages announces the epoch in the stream, so every node that reads the
stream ends the old one. A shard new to Redis, checked by a node that knows nothing of it (one
that starts), just gets its first epoch. Redis that holds as much as the node knows, or a later epoch, is
taken as it is: a node cannot tell what it never saw.

Epochs are compared as strings of digits (shorter is smaller): they reach 2^63 and Lua's
numbers are doubles. Field names start with "." or are empty, which no topic name can.
"""

from __future__ import annotations

COUNT_FIELD = ".count"

# KEYS[1] the counters hash, KEYS[2] the stream. ARGV[1] the epoch a new epoch gets (above
# ARGV[2]), ARGV[2] the epoch the node knows ("0": none), ARGV[3] the writes it knows of in
# that epoch, ARGV[4] the node, ARGV[5] MAXLEN|MINID and ARGV[6] its value (to trim with).
_SHARD = """
local function later(a, b)
  return #a > #b or (#a == #b and a > b)
end
local function shard()
  local epoch = redis.call('HGET', KEYS[1], '')
  local count = tonumber(redis.call('HGET', KEYS[1], '.count') or '0')
  if epoch and (later(epoch, ARGV[2]) or (epoch == ARGV[2] and count >= tonumber(ARGV[3]))) then
    return epoch, count, 0
  end
  redis.call('DEL', KEYS[1])
  if ARGV[2] == '0' then
    redis.call('HSET', KEYS[1], '', ARGV[1], '.count', 0)
    return ARGV[1], 0, 0
  end
  redis.call('HSET', KEYS[1], '', ARGV[1], '.count', 1)
  redis.call('XADD', KEYS[2], ARGV[5], '~', ARGV[6], '*', 'n', ARGV[4], 'w', 0, 'e', ARGV[1], 'c', 1, 's', '\\144', 'd', '\\144')
  return ARGV[1], 1, 1
end
"""

# The shard as it is (a new epoch first if Redis holds less than the node knows):
# {epoch, write count, 1 if this call started the epoch}. ARGV[7] "1": also a write that
# changes nothing, which a Redis out of memory refuses (the node learns it takes writes again).
CHECK = _SHARD + """
local epoch, count, moved = shard()
if ARGV[7] == '1' then
  redis.call('HINCRBY', KEYS[1], '.count', 0)
end
return {epoch, count, moved}
"""

# Numbers one block and appends its entry, after the shard check: per topic HINCRBY, then XADD
# (`n` node, `w` write number, `e` epoch, `c` write count, `s` first numbers, `d` data),
# trimmed. A write the node's mark says was made already (sent again after its reply was lost)
# gets the first one's numbers instead of a second entry. A write sent before in another epoch
# and not made there is not made now: the first one may have been appended before Redis lost
# it, and delivered then. KEYS[3] the node's mark; ARGV[7] the write number, ARGV[8] the epoch
# the write was first sent in ("" the first time), ARGV[9] the data, ARGV[10] MessagePack
# [topic, count, ...] in the order of the data (one argument: packing thousands of arguments
# costs the client more than the script's unpacking costs Redis).
#
# Publishes with a msg_id (ARGV[11]: MessagePack [topic, index in its batch, msg_id, ...], ""
# when none) are recognised across nodes: each one made is recorded in the shard's dedupe hash
# of the current window (KEYS[4], field "topic msg_id", value "epoch seq"; ARGV[12] how long the
# hash lives, in ms), and a block holding one the current or the previous window's hash
# (KEYS[5]) has is not made: the reply names those repeats with their first numbers, and the
# node sends the block again without them. ARGV[13] "1": the node follows the script with
# WAIT (redis_min_replicas); a reply with the numbers of an earlier write (again, repeat)
# then makes a write that changes nothing, so that WAIT, which waits for the connection's own
# writes, also waits for that earlier one.
# Reply: {entry id | "again" | "ended" | "repeat", epoch, write count,
#         MessagePack [first, ...] | MessagePack [topic, index, "epoch seq", ...] (repeat), moved}.
WRITE = _SHARD + """
local mark = redis.call('GET', KEYS[3])
if mark then
  local a = string.find(mark, '|', 1, true)
  if string.sub(mark, 1, a - 1) == ARGV[7] then
    if ARGV[13] == '1' then  -- a write of this connection's, after the first: WAIT then covers that one
      redis.call('PEXPIRE', KEYS[3], 86400000)
    end
    local b = string.find(mark, '|', a + 1, true)
    local c = string.find(mark, '|', b + 1, true)
    return {'again', string.sub(mark, a + 1, b - 1), tonumber(string.sub(mark, b + 1, c - 1)), string.sub(mark, c + 1), 0}
  end
end
local epoch, count, moved = shard()
if ARGV[8] ~= '' and ARGV[8] ~= epoch then
  return {'ended', epoch, count, '', moved}
end
local ids, fields = nil, nil
if ARGV[11] ~= '' then
  ids = cmsgpack.unpack(ARGV[11])
  fields = {}
  for i = 1, #ids, 3 do
    fields[#fields + 1] = ids[i] .. ' ' .. ids[i + 2]
  end
  local repeats = {}
  for from = 1, #fields, 1000 do  -- HMGET in chunks: unpack() has a bound on its results
    local upto = math.min(from + 999, #fields)
    local now = redis.call('HMGET', KEYS[4], unpack(fields, from, upto))
    local before = redis.call('HMGET', KEYS[5], unpack(fields, from, upto))
    for j = from, upto do
      local seen = now[j - from + 1] or before[j - from + 1]
      if seen then
        local i = 3 * j - 2
        repeats[#repeats + 1] = ids[i]
        repeats[#repeats + 1] = ids[i + 1]
        repeats[#repeats + 1] = seen
      end
    end
  end
  if #repeats > 0 then
    if ARGV[13] == '1' then  -- a write of this connection's, after the first ones: WAIT then covers those
      redis.call('HINCRBY', KEYS[1], '.count', 0)
    end
    return {'repeat', epoch, count, cmsgpack.pack(repeats), moved}
  end
end
local counts = cmsgpack.unpack(ARGV[10])
local firsts = {}
for i = 1, #counts, 2 do
  local n = counts[i + 1]
  firsts[#firsts + 1] = redis.call('HINCRBY', KEYS[1], counts[i], n) - n + 1
end
count = redis.call('HINCRBY', KEYS[1], '.count', 1)
local s = cmsgpack.pack(firsts)
local id = redis.call('XADD', KEYS[2], ARGV[5], '~', ARGV[6], '*', 'n', ARGV[4], 'w', ARGV[7], 'e', epoch, 'c', count, 's', s, 'd', ARGV[9])
redis.call('SET', KEYS[3], ARGV[7] .. '|' .. epoch .. '|' .. count .. '|' .. s, 'PX', 86400000)
if ids then
  local first_of = {}
  for i = 1, #counts, 2 do
    first_of[counts[i]] = firsts[(i + 1) / 2]
  end
  local pairs = {}
  for j = 1, #fields do
    local i = 3 * j - 2
    pairs[#pairs + 1] = fields[j]
    pairs[#pairs + 1] = epoch .. ' ' .. (first_of[ids[i]] + ids[i + 1])
    if #pairs == 2000 then
      redis.call('HSET', KEYS[4], unpack(pairs))
      pairs = {}
    end
  end
  if #pairs > 0 then
    redis.call('HSET', KEYS[4], unpack(pairs))
  end
  redis.call('PEXPIRE', KEYS[4], ARGV[12])
end
return {id, epoch, count, s, moved}
"""

AGAIN = b"again"
ENDED = b"ended"
REPEAT = b"repeat"
