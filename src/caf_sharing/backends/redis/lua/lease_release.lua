-- Drop a lease the node holds.
-- KEYS[1] lease; ARGV[1] node id
-- Returns 1 if it was dropped, 0 if the node did not hold it.

if redis.call("GET", KEYS[1]) == ARGV[1] then
  redis.call("DEL", KEYS[1])
  return 1
end
return 0
