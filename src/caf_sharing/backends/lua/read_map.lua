-- Read a map in one go when it is small.
-- KEYS[1] map; ARGV[1] largest number of fields returned at once
-- Returns HGETALL (empty when the map does not exist), or, for a larger map,
-- {number of fields, version} so the client reads it in HSCAN chunks instead
-- of stalling the server. HGETALL never returns integers, so the two shapes
-- cannot be confused.

local n = redis.call("HLEN", KEYS[1])
if n > tonumber(ARGV[1]) then
  return {n, redis.call("HGET", KEYS[1], "__ca_version__")}
end
return redis.call("HGETALL", KEYS[1])
