-- Commit one actor transaction atomically: all checks first, then all writes
-- (a Lua error after a write would not roll the earlier writes back).
--
-- KEYS[1]                checkpoint hash of the actor ("txid", "blob")
-- KEYS[2]                lease of the actor (value: node id, with a TTL)
-- KEYS[3]                lineage hash of the actor: map name -> txid of its version
-- KEYS[4]                list of the actor's earlier txids, newest first
-- KEYS[5 .. 4+C]         maps the transaction creates when absent
-- KEYS[5+C .. 4+C+W]     maps the transaction writes
-- KEYS[5+C+W .. 4+C+W+R] maps the transaction restores
-- KEYS[5+C+W+R .. 4+C+W+R+D] maps the transaction deletes
-- KEYS[5+C+W+R+D ..]     staged contents of big maps (filled by the client in
--                        chunks, so that no call blocks the server for long):
--                        renamed into place, or unlinked when the commit is refused
--
-- ARGV[1] node id          ARGV[2] txid
-- ARGV[3] previous txid    ARGV[4] "1" if ARGV[3] is meaningful, else "0"
-- ARGV[5] TTL (ms) of a lease taken back by this commit
-- ARGV[6] checkpoint blob  ARGV[7] C  ARGV[8] W  ARGV[9] R
-- ARGV[10] "1" for a re-assert  ARGV[11] how many earlier txids to keep
-- ARGV[12] the publish command: SPUBLISH (sharded channels) or PUBLISH
-- ARGV[13] D  ARGV[14] the deletion marker published on a deleted map's channel
-- then, per create:  map name, version, n, n items (field, value, ...)
--                    (n = -2: one argument follows instead of the items, the
--                    index in KEYS of the staged hash holding them, here and
--                    for full dumps and restores)
-- then, per write:   map name, base version, new version, index of the create
--                    of the same map (0: none), version renumbered to base
--                    (-1: none), base txid ("": unknown), channel, payload to
--                    publish, r, a, f (-1: no full dump), then r removed
--                    fields, a items to set, f items of the full dump
--                    (a fixed header, so that a write is found by one index)
-- then, per restore: map name, version, txid ("": unknown), n, n items
-- then, per delete:  map name, channel
--
-- Values arrive already JSON-encoded by the client: the script never decodes
-- them, and versions are compared as numbers.
--
-- Returns {"ok"}, {"dup"} (txid already committed, nothing done),
-- {"lease", holder}, {"chain", stored txid or ""}, {"version", write index,
-- stored version}, {"lineage", write index, stored version, stored txid},
-- {"missing", write index, ...}, {"staged"} (a staged hash vanished: stage
-- again and retry).

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

local checkpoint, lease, lineage, recent = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local node, txid = ARGV[1], ARGV[2]
local fixed = 4 -- KEYS before the maps
local ncreates, nwrites, nrestores = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local ndeletes = tonumber(ARGV[13])
local first_stage = fixed + ncreates + nwrites + nrestores + ndeletes + 1

-- A refused commit leaves no staged hash behind.
local function refuse(reply)
  for k = first_stage, #KEYS do
    redis.call("UNLINK", KEYS[k])
  end
  return reply
end

local stored_txid = redis.call("HGET", checkpoint, "txid")
if stored_txid == txid then
  return refuse({"dup"})
end
local holder = redis.call("GET", lease)
-- The commits of an actor form a chain of txids: each must follow the one
-- stored, so a node that missed another node's commit for this actor (its
-- lease expired meanwhile) can never overwrite it, and a node whose store
-- went back (restarted with older or no data) learns it.
local prev = ARGV[4] == "1" and ARGV[3] or false
if (holder and holder ~= node) or (stored_txid or false) ~= prev then
  -- A retried commit whose first attempt landed (its reply was lost) is a
  -- success, even after later commits or another node's.
  if stored_txid and redis.call("LPOS", recent, txid, "MAXLEN", ARGV[11]) then
    return refuse({"dup"})
  end
  if holder and holder ~= node then
    return refuse({"lease", holder})
  end
  return refuse({"chain", stored_txid or ""})
end
-- A vanished lease (expired, or the server lost its data) is taken back: the
-- chain check above proves nobody else committed since our last commit.
local take_lease = not holder
local reassert = ARGV[10] == "1"

local publish = ARGV[12] == "SPUBLISH" and "SPUBLISH" or "PUBLISH"
local pos = 15
local creates = {}
local staged_ok = true
-- The ``count`` items at ARGV[at] (or, for count -2, a staged hash's index):
-- their first index, count, staged hash (or false), and the position after them.
local function items(count, at)
  if count == -2 then
    local stage = KEYS[tonumber(ARGV[at])]
    staged_ok = staged_ok and redis.call("EXISTS", stage) == 1
    return at, 0, stage, at + 1
  end
  return at, count, false, at + count
end
-- Write a whole map: from the staged hash (renamed into place: O(1)), or
-- from the arguments; the old content goes (UNLINK: freed in the background).
local function fill(key, first, count, stage, version)
  redis.call("UNLINK", key)
  if stage then
    redis.call("RENAME", stage, key)
    redis.call("PERSIST", key)
    redis.call("HSET", key, VERSION, version)
  else
    call_chunked("HSET", key, first, count, VERSION, version)
  end
end

for i = 1, ncreates do
  local key = KEYS[fixed + i]
  local c = {key = key, name = ARGV[pos], version = ARGV[pos + 1],
             absent = redis.call("EXISTS", key) == 0}
  c.first, c.count, c.stage, pos = items(tonumber(ARGV[pos + 2]), pos + 3)
  creates[i] = c
end

-- A write is read straight from its arguments (its header at ARGV[at[i]]):
-- a table per write cost more than the rest of its work.
local at, names, whole = {}, {}, {}
for i = 1, nwrites do
  at[i], names[i] = pos, ARGV[pos]
  local after = pos + 11 + tonumber(ARGV[pos + 8]) + tonumber(ARGV[pos + 9])
  local full = tonumber(ARGV[pos + 10])
  if full ~= -1 then
    local w = {}
    w.first, w.count, w.stage, after = items(full, after)
    whole[i] = w
  end
  pos = after
end

-- The lineage of every written map in one call (a few for thousands of maps,
-- to keep unpack() safe), then each map's version.
local lineages = {}
for first = 1, nwrites, CHUNK do
  local got = redis.call("HMGET", lineage, unpack(names, first, math.min(nwrites, first + CHUNK - 1)))
  for k = 1, #got do
    lineages[first + k - 1] = got[k]
  end
end
local recreate = {}
local missing = {"missing"}
for i = 1, nwrites do
  local h = at[i]
  local base, base_txid, rebase_from = ARGV[h + 1], ARGV[h + 5], tonumber(ARGV[h + 4])
  local full = whole[i] ~= nil
  local stored = redis.call("HGET", KEYS[fixed + ncreates + i], VERSION)
  local current, current_txid = stored, false
  if stored then
    current_txid = lineages[i]
  else
    local create = creates[tonumber(ARGV[h + 3])]
    if create and create.absent then
      current, current_txid = create.version, txid
    end
  end
  if reassert and full then
    recreate[i] = true
  elseif current and tonumber(current) == tonumber(base) then
    if base_txid ~= "" and current_txid and current_txid ~= base_txid then
      return refuse({"lineage", tostring(i), current, current_txid})
    end
    recreate[i] = false
  elseif stored and rebase_from >= 0 and tonumber(stored) == rebase_from
      and (current_txid or "") == base_txid then
    recreate[i] = false -- renumbered: the change set applies to the stored content
  elseif not stored and full then
    recreate[i] = true
  elseif not current then
    missing[#missing + 1] = tostring(i)
  else
    return refuse({"version", tostring(i), current})
  end
end
if #missing > 1 then
  return refuse(missing)
end

local restores = {}
for i = 1, nrestores do
  local r = {key = KEYS[fixed + ncreates + nwrites + i], name = ARGV[pos],
             version = ARGV[pos + 1], txid = ARGV[pos + 2]}
  r.first, r.count, r.stage, pos = items(tonumber(ARGV[pos + 3]), pos + 4)
  restores[i] = r
end
if not staged_ok then
  return refuse({"staged"})
end

local deletes = {}
for i = 1, ndeletes do
  deletes[i] = {key = KEYS[fixed + ncreates + nwrites + nrestores + i], name = ARGV[pos],
                channel = ARGV[pos + 1]}
  pos = pos + 2
end

-- Every check passed: write everything, then publish.
if take_lease then
  redis.call("SET", lease, node, "PX", ARGV[5])
end
for _, c in ipairs(creates) do
  if c.absent then
    fill(c.key, c.first, c.count, c.stage, c.version)
    redis.call("HSET", lineage, c.name, txid)
  elseif c.stage then
    redis.call("UNLINK", c.stage)
  end
end
for _, r in ipairs(restores) do
  fill(r.key, r.first, r.count, r.stage, r.version)
  if r.txid ~= "" then
    redis.call("HSET", lineage, r.name, r.txid)
  else
    redis.call("HDEL", lineage, r.name)
  end
end
local made = {}
for i = 1, nwrites do
  local h, key, w = at[i], KEYS[fixed + ncreates + i], whole[i]
  if recreate[i] then
    fill(key, w.first, w.count, w.stage, ARGV[h + 2])
  else
    if w and w.stage then
      redis.call("UNLINK", w.stage)
    end
    local removed = tonumber(ARGV[h + 8])
    call_chunked("HDEL", key, h + 11, removed)
    call_chunked("HSET", key, h + 11 + removed, tonumber(ARGV[h + 9]), VERSION, ARGV[h + 2])
  end
  made[2 * i - 1], made[2 * i] = ARGV[h], txid
end
for first = 1, #made, CHUNK do -- every written map's lineage in one call
  redis.call("HSET", lineage, unpack(made, first, math.min(#made, first + CHUNK - 1)))
end
for _, d in ipairs(deletes) do
  d.existed = redis.call("UNLINK", d.key) == 1
  redis.call("HDEL", lineage, d.name)
end
if stored_txid then
  -- Keep the last ARGV[11] txids before this one.
  -- The list holds up to twice that, and is cut back to it when it grows
  -- past: trimming at every commit cost a call a commit.
  local kept = tonumber(ARGV[11])
  if redis.call("LPUSH", recent, stored_txid) > 2 * kept then
    redis.call("LTRIM", recent, 0, kept - 1)
  end
end
redis.call("HSET", checkpoint, "txid", txid, "blob", ARGV[6])
for i = 1, nwrites do
  redis.call(publish, ARGV[at[i] + 6], ARGV[at[i] + 7])
end
for _, d in ipairs(deletes) do
  if d.existed then
    redis.call(publish, d.channel, ARGV[14])
  end
end
return {"ok"}
