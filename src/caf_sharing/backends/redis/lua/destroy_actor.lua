-- Delete everything stored for an actor nobody holds the lease of.
-- KEYS[1] checkpoint hash; KEYS[2] lease; KEYS[3] lineage hash; KEYS[4] earlier txids
-- ARGV[1] txid of the checkpoint the client read ("": none), whose registrations
--         named the maps ARGV[6 ..]
-- ARGV[2] key prefix of the actor's maps; ARGV[3] channel prefix of its maps
-- ARGV[4] the publish command (SPUBLISH or PUBLISH); ARGV[5] the deletion marker
-- ARGV[6 ..] names of maps to delete besides those the lineage hash lists
-- (every map a commit wrote or created is in it).
-- The map keys are built here: they carry the actor's hash tag, so they live
-- in the slot of KEYS[1].
-- Returns {"lease", holder, PTTL}, {"moved"} (the checkpoint changed since
-- the client read it: read it again), or {"ok", keys deleted}.

local checkpoint, lease, lineage, recent = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local holder = redis.call("GET", lease)
if holder then
  return {"lease", holder, redis.call("PTTL", lease)}
end
if (redis.call("HGET", checkpoint, "txid") or "") ~= ARGV[1] then
  return {"moved"}
end
local names = {}
for _, name in ipairs(redis.call("HKEYS", lineage)) do
  names[name] = true
end
for i = 6, #ARGV do
  names[ARGV[i]] = true
end
local deleted = redis.call("UNLINK", checkpoint, lineage, recent)
for name in pairs(names) do
  if redis.call("UNLINK", ARGV[2] .. name) == 1 then
    deleted = deleted + 1
    redis.call(ARGV[4], ARGV[3] .. name, ARGV[5])
  end
end
return {"ok", deleted}
