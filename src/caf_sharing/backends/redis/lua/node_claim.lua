-- Claim a node id for one live node instance, or extend its claim.
-- KEYS[1] claim of the node id; ARGV[1] the instance's nonce; ARGV[2] TTL in ms
-- Returns nil when the instance holds the claim now, or {PTTL of the claim}
-- when another instance holds it.

local holder = redis.call("GET", KEYS[1])
if holder and holder ~= ARGV[1] then
  return {redis.call("PTTL", KEYS[1])}
end
redis.call("SET", KEYS[1], ARGV[1], "PX", ARGV[2])
return nil
