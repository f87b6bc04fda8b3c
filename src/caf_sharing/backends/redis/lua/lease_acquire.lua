-- Take or extend a lease.
-- KEYS[1] lease; ARGV[1] node id; ARGV[2] TTL in ms; ARGV[3] "1" to wait after a restart
-- Returns nil when the node holds the lease now, {holder's node id, PTTL of
-- the lease} when another node holds it, or the milliseconds to wait when the lease is absent
-- but the server has been up for less than one TTL: it may have restarted
-- with older or no data, and the node that held the lease may still run and
-- must get the chance to put back what it holds before anybody else starts.

local holder = redis.call("GET", KEYS[1])
if holder and holder ~= ARGV[1] then
  return {holder, redis.call("PTTL", KEYS[1])}
end
if not holder and ARGV[3] == "1" then
  local uptime = tonumber(string.match(redis.call("INFO", "server"), "uptime_in_seconds:(%d+)"))
  local wait = tonumber(ARGV[2]) - uptime * 1000
  if wait > 0 then
    return wait
  end
end
redis.call("SET", KEYS[1], ARGV[1], "PX", ARGV[2])
return nil
