-- Extend a lease the node holds, or take back one that vanished (expired
-- with nobody taking it, or the server lost its data): the commit script's
-- txid chain still fences off a node that missed someone else's commits.
-- KEYS[1] lease; ARGV[1] node id; ARGV[2] TTL in ms
-- Returns 1 if the node holds the lease now, 0 if another node does.

local holder = redis.call("GET", KEYS[1])
if holder == ARGV[1] then
  redis.call("PEXPIRE", KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call("SET", KEYS[1], ARGV[1], "PX", ARGV[2])
  return 1
end
return 0
