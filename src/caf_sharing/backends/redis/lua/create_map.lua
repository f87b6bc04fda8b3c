-- Create a map unless it exists.
-- KEYS[1] map; KEYS[2] lineage hash of its owner
-- ARGV[1] map name; ARGV[2] version; ARGV[3 ..] field, value pairs (JSON-encoded values)
-- Returns 1 if it was created, 0 if it already existed.

local CHUNK = 4000

if redis.call("EXISTS", KEYS[1]) == 1 then
  return 0
end
-- Made outside any commit: no txid made this version.
redis.call("HDEL", KEYS[2], ARGV[1])
local first, last = 3, #ARGV
local upto = math.min(last, first + CHUNK - 1)
redis.call("HSET", KEYS[1], "__ca_version__", ARGV[2], unpack(ARGV, first, upto))
first = upto + 1
while first <= last do
  upto = math.min(last, first + CHUNK - 1)
  redis.call("HSET", KEYS[1], unpack(ARGV, first, upto))
  first = upto + 1
end
return 1
