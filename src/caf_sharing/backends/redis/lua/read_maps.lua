-- Read maps of one owner, all at one instant.
-- KEYS[1] lineage hash of the owner; KEYS[2 ..] maps
-- ARGV[1] largest number of fields returned at once; ARGV[2 .. n+1] map names
-- (n maps), then optionally, per map, the version and txid its reader holds
-- ("" and "": none): a map the store holds at that version, made by that
-- txid, comes back as "same" instead of its content.
-- Returns {"all", {txid, HGETALL}, ...} (HGETALL empty for a missing map,
-- txid "" when unknown), or, when the maps hold more fields than ARGV[1],
-- {"big", {version, txid, number of fields}, ...} (false for a missing map's
-- version) so the client reads them in HSCAN chunks instead of stalling the
-- server, and checks with a second call that none changed meanwhile.

local n = #KEYS - 1
local same = {}
local total = 0
for j = 1, n do
  local held = ARGV[n + 2 * j]
  if held and held ~= "" and redis.call("HGET", KEYS[j + 1], "__ca_version__") == held
      and (redis.call("HGET", KEYS[1], ARGV[j + 1]) or "") == ARGV[n + 2 * j + 1] then
    same[j] = true
  else
    total = total + redis.call("HLEN", KEYS[j + 1])
  end
end
local out = {}
if total > tonumber(ARGV[1]) then
  out[1] = "big"
  for j = 1, n do
    if same[j] then
      out[j + 1] = "same"
    else
      out[j + 1] = {redis.call("HGET", KEYS[j + 1], "__ca_version__") or false,
                    redis.call("HGET", KEYS[1], ARGV[j + 1]) or "",
                    redis.call("HLEN", KEYS[j + 1])}
    end
  end
  return out
end
out[1] = "all"
for j = 1, n do
  if same[j] then
    out[j + 1] = "same"
  else
    out[j + 1] = {redis.call("HGET", KEYS[1], ARGV[j + 1]) or "",
                  redis.call("HGETALL", KEYS[j + 1])}
  end
end
return out
