-- Commit one actor transaction atomically: all checks first, then all writes
-- (a Lua error after a write would not roll the earlier writes back).
--
-- KEYS[1]            checkpoint hash of the actor (fields "txid", "blob")
-- KEYS[2]            lease of the actor (value: node id, with a TTL)
-- KEYS[3 .. 2+C]     maps the transaction creates when absent
-- KEYS[3+C .. 2+C+W] maps the transaction writes
--
-- ARGV[1] node id          ARGV[2] txid
-- ARGV[3] previous txid    ARGV[4] "1" if ARGV[3] is meaningful, else "0"
-- ARGV[5] TTL (ms) of a lease taken back by this commit
-- ARGV[6] checkpoint blob  ARGV[7] C  ARGV[8] W
-- then, per create: version, n, n items (field, value, ...)
-- then, per write:  base version, new version, index of the create of the same
--                   map (0: none), n, n removed fields, n, n items to set,
--                   n (-1: no full dump), n items of the full dump, channel,
--                   payload to publish
--
-- Values arrive already JSON-encoded by the client: the script never decodes
-- them, and versions are compared as numbers.
--
-- Returns {"ok"}, {"dup"} (txid already committed, nothing done),
-- {"lease", holder}, {"chain", stored txid}, {"version", write index, stored version},
-- {"missing", write index, ...}.

local VERSION = "__ca_version__"
local CHUNK = 4000 -- stay far below Lua's unpack() limit; even, so pairs never split

-- command key [field value] ARGV[first .. first+count-1], in calls of at
-- most CHUNK arguments; the optional field/value pair goes with the first.
local function call_chunked(command, key, first, count, field, value)
  local last = first + count - 1
  if field then
    local upto = math.min(last, first + CHUNK - 1)
    redis.call(command, key, field, value, unpack(ARGV, first, upto))
    first = upto + 1
  end
  while first <= last do
    local upto = math.min(last, first + CHUNK - 1)
    redis.call(command, key, unpack(ARGV, first, upto))
    first = upto + 1
  end
end

local checkpoint, lease = KEYS[1], KEYS[2]
local node, txid = ARGV[1], ARGV[2]

local stored_txid = redis.call("HGET", checkpoint, "txid")
if stored_txid == txid then
  return {"dup"}
end

local holder = redis.call("GET", lease)
if holder and holder ~= node then
  return {"lease", holder}
end
-- The commits of an actor form a chain of txids: each must follow the one
-- stored, so a node that missed another node's commit for this actor (its
-- lease expired meanwhile) can never overwrite it.
if stored_txid and (ARGV[4] ~= "1" or stored_txid ~= ARGV[3]) then
  return {"chain", stored_txid}
end
-- A vanished lease (expired, or the server lost its data) is taken back: the
-- chain check above proves nobody else committed since our last commit.
local take_lease = not holder

local ncreates, nwrites = tonumber(ARGV[7]), tonumber(ARGV[8])
local pos = 9
local creates = {}
for i = 1, ncreates do
  local key = KEYS[2 + i]
  local count = tonumber(ARGV[pos + 1])
  creates[i] = {key = key, version = ARGV[pos], first = pos + 2, count = count,
                absent = redis.call("EXISTS", key) == 0}
  pos = pos + 2 + count
end

local writes = {}
local missing = {"missing"}
for i = 1, nwrites do
  local w = {key = KEYS[2 + ncreates + i], base = ARGV[pos], version = ARGV[pos + 1]}
  local create = tonumber(ARGV[pos + 2])
  w.rm_count = tonumber(ARGV[pos + 3])
  w.rm_first = pos + 4
  pos = w.rm_first + w.rm_count
  w.add_count = tonumber(ARGV[pos])
  w.add_first = pos + 1
  pos = w.add_first + w.add_count
  local full_count = tonumber(ARGV[pos])
  w.full_first = pos + 1
  w.full_count = math.max(full_count, 0)
  pos = w.full_first + w.full_count
  w.channel, w.payload = ARGV[pos], ARGV[pos + 1]
  pos = pos + 2
  writes[i] = w

  local stored = redis.call("HGET", w.key, VERSION)
  local current = stored
  if not current and create > 0 and creates[create].absent then
    current = creates[create].version
  end
  if current and tonumber(current) == tonumber(w.base) then
    w.recreate = false
  elseif not stored and full_count >= 0 then
    w.recreate = true
  elseif not current then
    missing[#missing + 1] = tostring(i)
  else
    return {"version", tostring(i), current}
  end
end
if #missing > 1 then
  return missing
end

-- Every check passed: write everything, then publish.
if take_lease then
  redis.call("SET", lease, node, "PX", ARGV[5])
end
for _, c in ipairs(creates) do
  if c.absent then
    call_chunked("HSET", c.key, c.first, c.count, VERSION, c.version)
  end
end
for _, w in ipairs(writes) do
  if w.recreate then
    redis.call("DEL", w.key)
    call_chunked("HSET", w.key, w.full_first, w.full_count, VERSION, w.version)
  else
    call_chunked("HDEL", w.key, w.rm_first, w.rm_count)
    call_chunked("HSET", w.key, w.add_first, w.add_count, VERSION, w.version)
  end
end
redis.call("HSET", checkpoint, "txid", txid, "blob", ARGV[6])
for _, w in ipairs(writes) do
  redis.call("PUBLISH", w.channel, w.payload)
end
return {"ok"}
