-- Take or extend a lease.
-- KEYS[1] lease; ARGV[1] node id; ARGV[2] TTL in ms
-- Returns nil when the node holds the lease now, else the holder's node id.

local holder = redis.call("GET", KEYS[1])
if holder and holder ~= ARGV[1] then
  return holder
end
redis.call("SET", KEYS[1], ARGV[1], "PX", ARGV[2])
return nil
