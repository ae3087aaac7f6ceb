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

# shard(h, s, new, known, writes, node, kind, value): h the counters hash, s the stream; `new`
# the epoch a new epoch gets (above `known`), `known` the epoch the node knows ("0": none),
# `writes` the writes it knows of in that epoch, `node` the node, `kind` MAXLEN|MINID and
# `value` its value (to trim with). Returns epoch, write count, 1 if it started the epoch.
_SHARD = """
local function later(a, b)
  return #a > #b or (#a == #b and a > b)
end
local function shard(h, s, new, known, writes, node, kind, value)
  local epoch = redis.call('HGET', h, '')
  local count = tonumber(redis.call('HGET', h, '.count') or '0')
  if epoch and (later(epoch, known) or (epoch == known and count >= tonumber(writes))) then
    return epoch, count, 0
  end
  redis.call('DEL', h)
  if known == '0' then
    redis.call('HSET', h, '', new, '.count', 0)
    return new, 0, 0
  end
  redis.call('HSET', h, '', new, '.count', 1)
  redis.call('XADD', s, kind, '~', value, '*', 'n', node, 'w', 0, 'e', new, 'c', 1, 's', '\\144', 'd', '\\144')
  return new, 1, 1
end
"""

# The shard as it is (a new epoch first if Redis holds less than the node knows): KEYS[1]
# the counters hash, KEYS[2] the stream; ARGV[1..6] as shard()'s `new` ... `value`. Reply:
# {epoch, write count, 1 if this call started the epoch}. ARGV[7] "1": also a write that
# changes nothing, which a Redis out of memory refuses (the node learns it takes writes again).
CHECK = (
    _SHARD
    + """
local epoch, count, moved = shard(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
if ARGV[7] == '1' then
  redis.call('HINCRBY', KEYS[1], '.count', 0)
end
return {epoch, count, moved}
"""
)

# One write of a node: a block for each of N shards (every shard on one Redis; one on a Redis
# Cluster, where a script touches one slot), then what the node reads of the streams since
# its positions, so that a node that writes needs no other command to read.
#
# Per block, after the shard check: the topics' numbers (HMGET, then HSET of the new last
# numbers: two commands per block, whatever its topics), then XADD of the entry (`n` node,
# `w` write number, `e` epoch, `c` write count, `s` first numbers, `d` data), trimmed. A write
# the node's mark says was made already (sent again after its reply was lost) gets the first
# one's numbers instead of a second entry. A write sent before in another epoch and not made
# there is not made now: the first one may have been appended before Redis lost it, and
# delivered then. Publishes with a msg_id are recognised across nodes: each one made is
# recorded in the shard's dedupe hash of the current window (field "topic msg_id", value
# "epoch seq"), and a block holding one the current or the previous window's hash has is not
# made: its reply names those repeats with their first numbers, and the node sends the block
# again without them.
#
# ARGV[1] the node, ARGV[2] MAXLEN|MINID, ARGV[3] its value, ARGV[4] how long a dedupe hash
# lives (ms), ARGV[5] "1": the node follows the script with WAIT (redis_min_replicas): a
# reply with the numbers of an earlier write (again, repeat) then makes a write that changes
# nothing, so that WAIT, which waits for the connection's own writes, waits for that one;
# ARGV[6] N, ARGV[7] COUNT for the read. Block i (0-based): KEYS[5i+1..5i+5] the counters
# hash, the stream, the node's mark, the current and the previous window's dedupe hash;
# ARGV[8+9i..8+9i+8] the new epoch, the known epoch, the known writes, the write number, the
# epoch the write was first sent in ("" the first time), the data (MessagePack [[topic,
# [payload, ...]], ...]), MessagePack [topic, ...] in the order of the data, the msg_ids
# (MessagePack [topic, index in its batch, msg_id, ...], "" when none), MessagePack [count,
# ...] of the topics' messages (lists in one argument each: packing thousands of arguments
# costs the client more than unpacking costs Redis; the per-topic work is most of what the
# script costs). Then the streams to read (KEYS[5N+1..]) and their positions (ARGV[8+9N..]).
#
# Reply: {{block reply, ...}, XREAD reply or nil}; a block reply is {entry id | "again" |
# "ended" | "repeat", epoch, write count, MessagePack [first, ...] | MessagePack [topic, index,
# "epoch seq", ...] (repeat), moved}.
WRITE = (
    _SHARD
    + """
local function write(k, a)  -- block at KEYS[k + 1 ..], ARGV[a + 1 ..]
  local h, s, mark_key = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  local mark = redis.call('GET', mark_key)
  if mark then
    local i = string.find(mark, '|', 1, true)
    if string.sub(mark, 1, i - 1) == ARGV[a + 4] then
      if ARGV[5] == '1' then
        redis.call('PEXPIRE', mark_key, 86400000)
      end
      local j = string.find(mark, '|', i + 1, true)
      local l = string.find(mark, '|', j + 1, true)
      return {'again', string.sub(mark, i + 1, j - 1), tonumber(string.sub(mark, j + 1, l - 1)), string.sub(mark, l + 1), 0}
    end
  end
  local epoch, count, moved = shard(h, s, ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[1], ARGV[2], ARGV[3])
  if ARGV[a + 5] ~= '' and ARGV[a + 5] ~= epoch then
    return {'ended', epoch, count, '', moved}
  end
  local ids, fields = nil, nil
  if ARGV[a + 8] ~= '' then
    ids = cmsgpack.unpack(ARGV[a + 8])
    fields = {}
    for i = 1, #ids, 3 do
      fields[#fields + 1] = ids[i] .. ' ' .. ids[i + 2]
    end
    local repeats = {}
    for from = 1, #fields, 1000 do  -- in chunks: unpack() has a bound on its results
      local upto = math.min(from + 999, #fields)
      local now = redis.call('HMGET', KEYS[k + 4], unpack(fields, from, upto))
      local before = redis.call('HMGET', KEYS[k + 5], unpack(fields, from, upto))
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
      if ARGV[5] == '1' then
        redis.call('HINCRBY', h, '.count', 0)
      end
      return {'repeat', epoch, count, cmsgpack.pack(repeats), moved}
    end
  end
  local names, adds, firsts = cmsgpack.unpack(ARGV[a + 7]), cmsgpack.unpack(ARGV[a + 9]), {}
  for from = 1, #names, 1000 do
    local upto = math.min(from + 999, #names)
    local olds = redis.call('HMGET', h, unpack(names, from, upto))
    local sets = {}
    local k = 0
    for j = from, upto do
      local old = tonumber(olds[j - from + 1] or 0)
      firsts[j] = old + 1
      sets[k + 1] = names[j]
      sets[k + 2] = old + adds[j]  -- a Lua number: Redis stores it as its digits (exact below 10^14)
      k = k + 2
    end
    redis.call('HSET', h, unpack(sets))
  end
  count = redis.call('HINCRBY', h, '.count', 1)
  local packed = cmsgpack.pack(firsts)
  local id = redis.call('XADD', s, ARGV[2], '~', ARGV[3], '*', 'n', ARGV[1], 'w', ARGV[a + 4], 'e', epoch, 'c', count, 's', packed, 'd', ARGV[a + 6])
  redis.call('SET', mark_key, ARGV[a + 4] .. '|' .. epoch .. '|' .. count .. '|' .. packed, 'PX', 86400000)
  if ids then
    local first_of = {}
    for j = 1, #names do
      first_of[names[j]] = firsts[j]
    end
    local sets = {}
    for j = 1, #fields do
      local i = 3 * j - 2
      sets[#sets + 1] = fields[j]
      sets[#sets + 1] = epoch .. ' ' .. (first_of[ids[i]] + ids[i + 1])
      if #sets == 2000 then
        redis.call('HSET', KEYS[k + 4], unpack(sets))
        sets = {}
      end
    end
    if #sets > 0 then
      redis.call('HSET', KEYS[k + 4], unpack(sets))
    end
    redis.call('PEXPIRE', KEYS[k + 4], ARGV[4])
  end
  return {id, epoch, count, packed, moved}
end
local n = tonumber(ARGV[6])
local replies = {}
for i = 0, n - 1 do
  replies[#replies + 1] = write(5 * i, 7 + 9 * i)
end
local read = false
if #KEYS > 5 * n then
  local streams = {}
  for i = 5 * n + 1, #KEYS do
    streams[#streams + 1] = KEYS[i]
  end
  for i = 8 + 9 * n, #ARGV do
    streams[#streams + 1] = ARGV[i]
  end
  read = redis.call('XREAD', 'COUNT', ARGV[7], 'STREAMS', unpack(streams))
end
return {replies, read}
"""
)

WRITE_KEYS = 5  # keys per block
WRITE_ARGS = 9  # arguments per block

AGAIN = b"again"
ENDED = b"ended"
REPEAT = b"repeat"
