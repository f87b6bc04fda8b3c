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

-- This script runs at every commit, on the path of every change to its
-- readers: its own Lua work is kept to what the commit at hand needs.
-- Numbers the client sent are coerced by arithmetic (cheaper than a
-- tonumber() call); the tables of creates, full dumps, restores and deletes
-- exist only when there are some; a function is made anew at every call, and
-- costs more with upvalues, so the two below read globals (a table lookup
-- each use: they are seldom used) and ``fill`` is made only when needed.

-- A refused commit leaves no staged hash behind: they are the last KEYS,
-- after the 4 + C + W + R + D others.
local function refuse(reply)
  for k = 5 + ARGV[7] + ARGV[8] + ARGV[9] + ARGV[13], #KEYS do
    redis.call("UNLINK", KEYS[k])
  end
  return reply
end

-- The ``count`` items at ARGV[at] (or, for count -2, a staged hash's index):
-- their first index, count, staged hash (or false), and the position after
-- them.
local function items(count, at)
  if count == -2 then
    return at, 0, KEYS[ARGV[at] + 0], at + 1
  end
  return at, count, false, at + count
end

local call, unpack, KEYS, ARGV = redis.call, unpack, KEYS, ARGV -- read once

-- command key [field value] ARGV[first .. first+count-1], in calls of at
-- most CHUNK arguments; the optional field/value pair goes with the first.
local function call_chunked(command, key, first, count, field, value)
  local last = first + count - 1
  if field then
    local upto = first + CHUNK - 1
    if upto > last then upto = last end
    call(command, key, field, value, unpack(ARGV, first, upto))
    first = upto + 1
  end
  while first <= last do
    local upto = first + CHUNK - 1
    if upto > last then upto = last end
    call(command, key, unpack(ARGV, first, upto))
    first = upto + 1
  end
end

local checkpoint, lease, lineage, recent = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local node, txid = ARGV[1], ARGV[2]
local ncreates, nwrites, nrestores = ARGV[7] + 0, ARGV[8] + 0, ARGV[9] + 0
local ndeletes = ARGV[13] + 0
local first_write = 5 + ncreates -- KEYS index of the first written map
local first_stage = first_write + nwrites + nrestores + ndeletes

local stored_txid = call("HGET", checkpoint, "txid")
if stored_txid == txid then
  return refuse({"dup"})
end
local holder = call("GET", lease)
-- The commits of an actor form a chain of txids: each must follow the one
-- stored, so a node that missed another node's commit for this actor (its
-- lease expired meanwhile) can never overwrite it, and a node whose store
-- went back (restarted with older or no data) learns it.
local prev = ARGV[4] == "1" and ARGV[3] or false
if (holder and holder ~= node) or (stored_txid or false) ~= prev then
  -- A retried commit whose first attempt landed (its reply was lost) is a
  -- success, even after later commits or another node's.
  if stored_txid and call("LPOS", recent, txid, "MAXLEN", ARGV[11]) then
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
local creates
if ncreates > 0 then
  creates = {}
  for i = 1, ncreates do
    local key = KEYS[4 + i]
    local c = {key = key, name = ARGV[pos], version = ARGV[pos + 1],
               absent = call("EXISTS", key) == 0}
    c.first, c.count, c.stage, pos = items(ARGV[pos + 2] + 0, pos + 3)
    creates[i] = c
  end
end

-- A write is read straight from its arguments (its header at ARGV[at[i]]):
-- a table per write cost more than the rest of its work. Only a write with
-- a full dump has one, in ``whole`` (made for the first).
local at, names, whole = {}, {}, false
for i = 1, nwrites do
  at[i], names[i] = pos, ARGV[pos]
  local after = pos + 11 + ARGV[pos + 8] + ARGV[pos + 9]
  local full = ARGV[pos + 10] + 0
  if full ~= -1 then
    local w = {}
    w.first, w.count, w.stage, after = items(full, after)
    whole = whole or {}
    whole[i] = w
  end
  pos = after
end

-- The lineage of every written map in one call (a few for thousands of maps,
-- to keep unpack() safe: the first reply takes the others), then each map's
-- version.
local lineages
for first = 1, nwrites, CHUNK do
  local last = first + CHUNK - 1
  if last > nwrites then last = nwrites end
  local got = call("HMGET", lineage, unpack(names, first, last))
  if lineages then
    for k = 1, #got do
      lineages[first + k - 1] = got[k]
    end
  else
    lineages = got
  end
end
local missing
for i = 1, nwrites do
  local h = at[i]
  local w = whole and whole[i]
  local stored = call("HGET", KEYS[first_write + i - 1], VERSION)
  local current, current_txid = stored, false
  if stored then
    current_txid = lineages[i]
  elseif creates then
    local create = creates[ARGV[h + 3] + 0]
    if create and create.absent then
      current, current_txid = create.version, txid
    end
  end
  local base = ARGV[h + 1]
  -- Versions compare as numbers; the client's base is a plain integer, so
  -- equal strings are equal numbers (the common case, without tonumber()).
  if reassert and w then
    w.recreate = true
  elseif current and (current == base or tonumber(current) == tonumber(base)) then
    local base_txid = ARGV[h + 5]
    if base_txid ~= "" and current_txid and current_txid ~= base_txid then
      return refuse({"lineage", tostring(i), current, current_txid})
    end
  elseif stored and ARGV[h + 4] + 0 >= 0 and tonumber(stored) == ARGV[h + 4] + 0
      and (current_txid or "") == ARGV[h + 5] then
    -- renumbered: the change set applies to the stored content
  elseif not stored and w then
    w.recreate = true
  elseif not current then
    missing = missing or {"missing"}
    missing[#missing + 1] = tostring(i)
  else
    return refuse({"version", tostring(i), current})
  end
end
if missing then
  return refuse(missing)
end

local restores
if nrestores > 0 then
  restores = {}
  for i = 1, nrestores do
    local r = {key = KEYS[first_write + nwrites + i - 1], name = ARGV[pos],
               version = ARGV[pos + 1], txid = ARGV[pos + 2]}
    r.first, r.count, r.stage, pos = items(ARGV[pos + 3] + 0, pos + 4)
    restores[i] = r
  end
end
-- Each staged hash holds the content of one whole map.
if #KEYS >= first_stage
    and call("EXISTS", unpack(KEYS, first_stage, #KEYS)) ~= #KEYS - first_stage + 1 then
  return refuse({"staged"})
end

local deletes
if ndeletes > 0 then
  deletes = {}
  for i = 1, ndeletes do
    deletes[i] = {key = KEYS[first_write + nwrites + nrestores + i - 1], name = ARGV[pos],
                  channel = ARGV[pos + 1]}
    pos = pos + 2
  end
end

-- Write a whole map: from the staged hash (renamed into place: O(1)), or
-- from the arguments; the old content goes (UNLINK: freed in the background).
-- Made only for a commit that has whole maps (a closure costs every commit).
local fill
if creates or whole or restores then
  function fill(key, first, count, stage, version)
    call("UNLINK", key)
    if stage then
      call("RENAME", stage, key)
      call("PERSIST", key)
      call("HSET", key, VERSION, version)
    else
      call_chunked("HSET", key, first, count, VERSION, version)
    end
  end
end

-- Every check passed: write everything, then publish.
if take_lease then
  call("SET", lease, node, "PX", ARGV[5])
end
for i = 1, ncreates do
  local c = creates[i]
  if c.absent then
    fill(c.key, c.first, c.count, c.stage, c.version)
    call("HSET", lineage, c.name, txid)
  elseif c.stage then
    call("UNLINK", c.stage)
  end
end
for i = 1, nrestores do
  local r = restores[i]
  fill(r.key, r.first, r.count, r.stage, r.version)
  if r.txid ~= "" then
    call("HSET", lineage, r.name, r.txid)
  else
    call("HDEL", lineage, r.name)
  end
end
local made = {}
for i = 1, nwrites do
  local h, key, w = at[i], KEYS[first_write + i - 1], whole and whole[i]
  if w and w.recreate then
    fill(key, w.first, w.count, w.stage, ARGV[h + 2])
  else
    if w and w.stage then
      call("UNLINK", w.stage)
    end
    local removed = ARGV[h + 8] + 0
    if removed > 0 then
      call_chunked("HDEL", key, h + 11, removed)
    end
    call_chunked("HSET", key, h + 11 + removed, ARGV[h + 9] + 0, VERSION, ARGV[h + 2])
  end
  made[2 * i - 1], made[2 * i] = ARGV[h], txid
end
for first = 1, 2 * nwrites, CHUNK do -- every written map's lineage in one call
  local last = first + CHUNK - 1
  if last > 2 * nwrites then last = 2 * nwrites end
  call("HSET", lineage, unpack(made, first, last))
end
for i = 1, ndeletes do
  local d = deletes[i]
  d.existed = call("UNLINK", d.key) == 1
  call("HDEL", lineage, d.name)
end
if stored_txid then
  -- Keep the last ARGV[11] txids before this one.
  -- The list holds up to twice that, and is cut back to it when it grows
  -- past: trimming at every commit cost a call a commit.
  if call("LPUSH", recent, stored_txid) > 2 * ARGV[11] then
    call("LTRIM", recent, 0, ARGV[11] - 1)
  end
end
call("HSET", checkpoint, "txid", txid, "blob", ARGV[6])
for i = 1, nwrites do
  local h = at[i]
  call(publish, ARGV[h + 6], ARGV[h + 7])
end
for i = 1, ndeletes do
  local d = deletes[i]
  if d.existed then
    call(publish, d.channel, ARGV[14])
  end
end
return {"ok"}
