"""The Redis Cluster test helper (tests/rediscluster.py) against real nodes,
and the Redis 7 cluster behaviours the client side relies on: redirections
while a slot migrates, and what a sharded subscriber is sent when its slot
leaves the node."""

from __future__ import annotations

import socket
import time
import uuid

import pytest
import redis
from redis.exceptions import AskError, MovedError, TryAgainError

from rediscluster import RedisCluster
from redisserver import RedisServer

pytestmark = pytest.mark.redis

TWO_KEYS = "return {redis.call('GET', KEYS[1]), redis.call('GET', KEYS[2])}"


def _tag() -> str:
    """A hash tag of this test's own: its keys share one slot nobody else uses."""
    return "{" + uuid.uuid4().hex[:10] + "}"


def _other_master(cluster: RedisCluster, slot: int) -> RedisServer:
    owner = cluster.node_for_slot(slot)
    return next(node for node in cluster.masters() if node is not owner)


def _resp(*args: str | int) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _read(sock: socket.socket, expected: bytes, timeout: float = 5.0) -> bytes:
    """Read until as many bytes as ``expected`` arrived (or time is up)."""
    data = b""
    deadline = time.monotonic() + timeout
    while len(data) < len(expected) and time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
    return data


def _read_through(sock: socket.socket, end: bytes, timeout: float = 5.0) -> bytes:
    """Read until the data ends with ``end`` (or time is up)."""
    data = b""
    while not data.endswith(end):
        chunk = _read(sock, b"?", timeout)
        if not chunk:
            break
        data += chunk
    return data


def _asking(client: redis.Redis, *command: str | int) -> object:
    """``command`` right after ``ASKING`` on the same connection."""
    pipe = client.pipeline(transaction=False)
    pipe.execute_command("ASKING")
    pipe.execute_command(*command)
    return pipe.execute(raise_on_error=False)[1]


def test_cluster_covers_every_slot(redis_cluster: RedisCluster) -> None:
    assert redis_cluster.masters() == redis_cluster.nodes
    assert redis_cluster.replicas() == []
    ports = [node.port for node in redis_cluster.nodes]
    assert redis_cluster.url == "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)
    assert redis_cluster.seed_url == f"redis://127.0.0.1:{ports[0]}/0"
    for node in redis_cluster.nodes:
        with redis_cluster.client(node) as client:
            assert client.cluster("INFO")["cluster_state"] == "ok"
            slots = client.execute_command("CLUSTER", "SLOTS")
        covered = sorted((int(entry[0]), int(entry[1])) for entry in slots)
        assert sum(last - first + 1 for first, last in covered) == 16384
        assert {int(entry[2][1]) for entry in slots} == set(ports)


def test_key_lands_on_the_slot_owner(redis_cluster: RedisCluster) -> None:
    key = f"{_tag()}:k"
    with redis.RedisCluster(host="127.0.0.1", port=redis_cluster.nodes[0].port) as cluster_client:
        cluster_client.set(key, b"v")
    slot = redis_cluster.key_slot(key)
    assert slot == redis_cluster.key_slot(key.encode())
    owner = redis_cluster.node_for_slot(slot)
    with redis_cluster.client(owner) as client:
        assert client.get(key) == b"v"
    with redis_cluster.client(_other_master(redis_cluster, slot)) as client, \
            pytest.raises(MovedError, match=f"{slot} 127.0.0.1:{owner.port}"):
        client.get(key)


def test_migrate_slot_takes_the_keys_along(redis_cluster: RedisCluster) -> None:
    tag = _tag()
    keys = [f"{tag}:{i}" for i in range(150)]  # more than one GETKEYSINSLOT batch
    slot = redis_cluster.key_slot(keys[0])
    source = redis_cluster.node_for_slot(slot)
    target = _other_master(redis_cluster, slot)
    with redis_cluster.client(source) as client:
        client.mset({key: key.encode() for key in keys})

    migration = redis_cluster.migrate_slot(slot, target)

    assert migration.source is source
    assert redis_cluster.node_for_slot(slot) is target
    with redis_cluster.client(target) as client:
        assert client.mget(keys) == [key.encode() for key in keys]
    with redis_cluster.client(source) as client:
        assert client.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
        with pytest.raises(MovedError, match=f"127.0.0.1:{target.port}"):
            client.get(keys[0])
    for node in redis_cluster.nodes:
        with redis_cluster.client(node) as client:
            owners = {int(e[2][1]) for e in client.execute_command("CLUSTER", "SLOTS")
                      if int(e[0]) <= slot <= int(e[1])}
        assert owners == {target.port}


def test_a_two_key_script_mid_migration(redis_cluster: RedisCluster) -> None:
    """Half-way through a migration (one key moved, the other in no node),
    Redis 7 sends a two-key script from the source to the target with ASK,
    and the target, even ASKed, answers TRYAGAIN until the slot is done."""
    tag = _tag()
    moved, absent = f"{tag}:moved", f"{tag}:absent"
    slot = redis_cluster.key_slot(moved)
    target = _other_master(redis_cluster, slot)
    source_client = redis_cluster.client(redis_cluster.node_for_slot(slot))
    target_client = redis_cluster.client(target)
    with source_client, target_client:
        source_client.set(moved, b"m")
        sha = source_client.script_load(TWO_KEYS)
        assert target_client.script_load(TWO_KEYS) == sha

        migration = redis_cluster.begin_migration(slot, target)
        assert redis_cluster.node_for_slot(slot) is migration.source
        with pytest.raises(TryAgainError):  # one key here, one nowhere
            source_client.evalsha(sha, 2, moved, absent)
        assert redis_cluster.move_keys(migration, [moved]) == 1

        with pytest.raises(AskError, match=f"{slot} 127.0.0.1:{target.port}"):
            source_client.evalsha(sha, 2, moved, absent)
        with pytest.raises(MovedError):
            target_client.evalsha(sha, 2, moved, absent)
        assert isinstance(_asking(target_client, "EVALSHA", sha, 2, moved, absent),
                          TryAgainError)
        assert _asking(target_client, "GET", moved) == b"m"

        redis_cluster.finish_migration(migration)
        assert target_client.evalsha(sha, 2, moved, absent) == [b"m", None]
        redis_cluster.script_flush(target)
        assert target_client.script_exists(sha) == [False]


@pytest.mark.parametrize("protocol", [2, 3])
def test_sharded_subscriber_is_unsubscribed_when_its_slot_leaves(
        redis_cluster: RedisCluster, protocol: int) -> None:
    channel = f"{_tag()}news"
    slot = redis_cluster.key_slot(channel)
    owner = redis_cluster.node_for_slot(slot)
    push = b"*" if protocol == 2 else b">"
    with socket.create_connection(("127.0.0.1", owner.port), timeout=5) as sock, \
            redis.RedisCluster(host="127.0.0.1", port=owner.port) as publisher:
        if protocol == 3:
            # ECHO marks the end of HELLO's reply, a map of unknown length.
            sock.sendall(_resp("HELLO", 3) + _resp("ECHO", "end-of-hello"))
            assert _read_through(sock, b"$12\r\nend-of-hello\r\n").startswith(b"%7\r\n")
        sock.sendall(_resp("SSUBSCRIBE", channel))
        subscribed = push + b"3\r\n$10\r\nssubscribe\r\n$%d\r\n%s\r\n:1\r\n" % (
            len(channel), channel.encode())
        assert _read(sock, subscribed) == subscribed

        assert publisher.spublish(channel, "hello") == 1
        message = push + b"3\r\n$8\r\nsmessage\r\n$%d\r\n%s\r\n$5\r\nhello\r\n" % (
            len(channel), channel.encode())
        assert _read(sock, message) == message

        redis_cluster.migrate_slot(slot, _other_master(redis_cluster, slot))
        gone = push + b"3\r\n$12\r\nsunsubscribe\r\n$%d\r\n%s\r\n:0\r\n" % (
            len(channel), channel.encode())
        assert _read(sock, gone) == gone
        # No subscription left: the connection is a plain one again.
        sock.sendall(_resp("PING"))
        assert _read(sock, b"+PONG\r\n") == b"+PONG\r\n"


def test_failover_swaps_roles(cluster6: RedisCluster) -> None:
    assert len(cluster6.masters()) == 3 and len(cluster6.replicas()) == 3
    key = f"{_tag()}:k"
    slot = cluster6.key_slot(key)
    old = cluster6.node_for_slot(slot)
    with cluster6.client(old) as client:
        client.set(key, b"v")
        assert client.wait(1, 2000) == 1

    new = cluster6.failover_slot(slot)

    assert new is not old
    assert cluster6.node_for_slot(slot) is new
    assert new in cluster6.masters() and old in cluster6.replicas()
    assert cluster6.replicas_of(new) == [old]
    with cluster6.client(new) as client:
        assert client.get(key) == b"v"


def test_killed_master_is_replaced_and_rejoins_as_replica(cluster6: RedisCluster) -> None:
    slot = 0
    old = cluster6.node_for_slot(slot)
    (replica,) = cluster6.replicas_of(old)

    cluster6.kill(old)
    cluster6.wait_ready()  # the replica is elected after the 2 s node timeout

    assert cluster6.node_for_slot(slot) is replica
    cluster6.restart(old)
    assert cluster6.replicas_of(replica) == [old]
