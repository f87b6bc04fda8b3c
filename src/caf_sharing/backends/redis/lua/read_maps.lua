-- Read maps of one owner, all at one instant.
-- KEYS[1] lineage hash of the owner; KEYS[2 ..] maps
-- ARGV[1] largest number of fields returned at once; ARGV[2 ..] map names
-- Returns {"all", {txid, HGETALL}, ...} (HGETALL empty for a missing map,
-- txid "" when unknown), or, when the maps hold more fields than ARGV[1],
-- {"big", {version, txid, number of fields}, ...} (false for a missing map's
-- version) so the client reads them in HSCAN chunks instead of stalling the
-- server, and checks with a second call that none changed meanwhile.

local total = 0
for i = 2, #KEYS do
  total = total + redis.call("HLEN", KEYS[i])
end
local out = {}
if total > tonumber(ARGV[1]) then
  out[1] = "big"
  for i = 2, #KEYS do
    out[i] = {redis.call("HGET", KEYS[i], "__ca_version__") or false,
              redis.call("HGET", KEYS[1], ARGV[i]) or "", redis.call("HLEN", KEYS[i])}
  end
  return out
end
out[1] = "all"
for i = 2, #KEYS do
  out[i] = {redis.call("HGET", KEYS[1], ARGV[i]) or "", redis.call("HGETALL", KEYS[i])}
end
return out
