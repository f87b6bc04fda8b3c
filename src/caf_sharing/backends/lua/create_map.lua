-- Create a map unless it exists.
-- KEYS[1] map; ARGV[1] version; ARGV[2 ..] field, value pairs (JSON-encoded values)
-- Returns 1 if it was created, 0 if it already existed.

local CHUNK = 4000

if redis.call("EXISTS", KEYS[1]) == 1 then
  return 0
end
local first, last = 2, #ARGV
local upto = math.min(last, first + CHUNK - 1)
redis.call("HSET", KEYS[1], "__ca_version__", ARGV[1], unpack(ARGV, first, upto))
first = upto + 1
while first <= last do
  upto = math.min(last, first + CHUNK - 1)
  redis.call("HSET", KEYS[1], unpack(ARGV, first, upto))
  first = upto + 1
end
return 1
