"""The Redis backend on a real local Redis Cluster: routing by slot, sharded
pub/sub, and the cluster's own faults (a slot migrating mid-stream, a
failover, flushed scripts, a dead shard), each judged by what a user would
see: every acknowledged commit kept, replicas monotonic and converging,
errors only for the actors of a failed shard.

The shared 3-master cluster (``redis_cluster``) serves the tests that only
migrate slots; those that fail over, kill or flush get a cluster of their own.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from caf_sharing import Actor, Node
from caf_sharing.backends import MapWrite, make_backend
from caf_sharing.backends.redis import RedisBackend
from caf_sharing.errors import (
    ActorStoppedError,
    BackendUnavailableError,
    ConfigError,
    DurabilityError,
    ShardUnavailableError,
)
from conftest import require_redis_cli, require_redis_server
from rediscluster import RedisCluster
from redisserver import RedisServer
from test_backend_contract import NODE, Inbox, as_dict, changes, tx

pytestmark = pytest.mark.redis

FAST = {"max_retries": 3, "retry_delay": 0.05, "socket_timeout": 1.0, "call_timeout": 3.0,
        "restart_grace": False}


def actors_on_every_shard(cluster: RedisCluster, per_shard: int, prefix: str) -> list[str]:
    """Actor names (``<prefix><i>-app``), ``per_shard`` owned by each master."""
    masters = cluster.masters()
    found: dict[int, list[str]] = {m.port: [] for m in masters}
    i = 0
    while any(len(names) < per_shard for names in found.values()):
        name = f"{prefix}{i}-app"
        owner = cluster.node_for_slot(cluster.key_slot(name))
        if len(found[owner.port]) < per_shard:
            found[owner.port].append(name)
        i += 1
    return [name for names in found.values() for name in names]


def shard_of(cluster: RedisCluster, actor: str) -> RedisServer:
    return cluster.node_for_slot(cluster.key_slot(actor))


class Backends:
    """Started cluster backends sharing one app namespace; closed at the end."""

    def __init__(self, cluster: RedisCluster) -> None:
        self.cluster = cluster
        self.app = f"c{uuid.uuid4().hex[:12]}"
        self.opened: list[RedisBackend] = []

    async def __call__(self, **options: Any) -> RedisBackend:
        backend = make_backend(self.cluster.url, app=self.app, **{**FAST, **options})
        assert isinstance(backend, RedisBackend)
        await backend.start()
        self.opened.append(backend)
        return backend

    async def close(self) -> None:
        for backend in self.opened:
            await backend.close()


@pytest.fixture
async def backends(redis_cluster: RedisCluster) -> AsyncIterator[Backends]:
    made = Backends(redis_cluster)
    yield made
    await made.close()


def publish_counts(cluster: RedisCluster) -> tuple[int, int]:
    """Cluster-bus messages sent so far, over all nodes: (PUBLISH, SPUBLISH)."""
    classic = sharded = 0
    for node in cluster.masters():
        with cluster.client(node) as client:
            info = client.execute_command("CLUSTER", "INFO").decode()
        stats = dict(line.split(":", 1) for line in info.split() if ":" in line)
        classic += int(stats.get("cluster_stats_messages_publish_sent", 0))
        sharded += int(stats.get("cluster_stats_messages_publishshard_sent", 0))
    return classic, sharded


class Committer:
    """Commits a chain of change sets to one map of ``actor`` as fast as it
    can, recording which versions were acknowledged and which failed."""

    def __init__(self, backend: RedisBackend, actor: str) -> None:
        self.backend = backend
        self.actor = actor
        self.map = f"{actor}-m"
        self.version = 0
        self.acked: list[int] = []
        self.errors: list[BaseException] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def setup(self) -> None:
        await self.backend.acquire_lease(self.actor, NODE, 30.0)
        await self.backend.create_map(self.map)

    async def _run(self) -> None:
        prev: str | None = None
        while not self._stop.is_set():
            txid = f"{self.actor}-t{self.version}"
            try:
                await self.backend.commit(tx(
                    txid, prev=prev, actor=self.actor, ttl=30.0,
                    writes=[MapWrite(self.map, changes(self.version, {"n": self.version + 1}))]))
            except (BackendUnavailableError, DurabilityError) as exc:
                # Ambiguous: retried with the same txid (False: it had landed).
                self.errors.append(exc)
                continue
            self.version += 1
            self.acked.append(self.version)
            prev = txid
            await asyncio.sleep(0.001)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.acked) < count:
                await asyncio.sleep(0.005)


# -- URLs and start ------------------------------------------------------------


async def test_a_redis_url_to_a_cluster_node_says_to_use_redis_cluster(
        redis_cluster: RedisCluster) -> None:
    backend = make_backend(redis_cluster.seed_url, app="x")
    with pytest.raises(ConfigError, match=r"is a cluster node; use redis\+cluster://"):
        await backend.start()
    await backend.close()
    backend = make_backend(redis_cluster.seed_url.replace("/0", "/1"), app="x")
    with pytest.raises(ConfigError, match=r"cluster node; use redis\+cluster:// \(database 0"):
        await backend.start()
    await backend.close()


async def test_any_node_is_a_seed_and_scripts_load_on_every_primary(
        redis_cluster: RedisCluster, backends: Backends) -> None:
    one = redis_cluster.masters()[-1]
    backend = make_backend(f"redis+cluster://127.0.0.1:{one.port}", app=backends.app, **FAST)
    await backend.start()
    try:
        for master in redis_cluster.masters():
            with redis_cluster.client(master) as client:
                assert all(client.script_exists(*(s for s in _script_shas())))
    finally:
        await backend.close()


def _script_shas() -> list[str]:
    from caf_sharing.backends.redis.scripts import SCRIPTS
    return [s.sha for s in SCRIPTS]


# -- routing and sharded pub/sub ------------------------------------------------


async def test_actors_on_every_shard_with_one_reader_of_all(
        redis_cluster: RedisCluster, backends: Backends) -> None:
    actors = actors_on_every_shard(redis_cluster, 2, "w")
    assert {shard_of(redis_cluster, a).port for a in actors} == \
        {m.port for m in redis_cluster.masters()}
    writer = await backends()
    reader = await backends()
    inboxes = {a: Inbox() for a in actors}
    for actor in actors:
        await writer.acquire_lease(actor, NODE, 30.0)
        await writer.create_map(f"{actor}-m")
        await reader.subscribe(f"{actor}-m", inboxes[actor])
    classic_before, _ = publish_counts(redis_cluster)
    rounds = 10

    async def write(actor: str) -> None:
        prev = None
        for v in range(rounds):
            await writer.commit(tx(f"{actor}-{v}", prev=prev, actor=actor, writes=[
                MapWrite(f"{actor}-m", changes(v, {"n": v + 1}))]))
            prev = f"{actor}-{v}"

    await asyncio.gather(*(write(a) for a in actors))
    for actor in actors:
        await inboxes[actor].wait_for(rounds)
        assert inboxes[actor].versions() == list(range(1, rounds + 1))
    dumps = {a: as_dict(await reader.read_map(f"{a}-m")) for a in actors}
    assert all(d["n"] == rounds for d in dumps.values())
    # Sharded pub/sub: no change set went over the cluster bus to every node.
    assert publish_counts(redis_cluster)[0] == classic_before
    # Renewals and txids are read per shard, in one call.
    assert await writer.renew_leases(actors, NODE, 30.0) == []
    assert await writer.load_txids(actors) == [f"{a}-{rounds - 1}" for a in actors]


class Counter(Actor):
    async def init(self) -> None:
        self.sharing.add_writable_map("m", "m")

    async def bump(self) -> int:
        ref = self.sharing.maps.m
        ref.set("n", ref.get("n", 0) + 1)
        return ref.version + 1


class Watcher(Actor):
    #: The maps the next Watcher started reads.
    names: Sequence[str] = ()

    async def init(self) -> None:
        for i, name in enumerate(Watcher.names):
            self.sharing.add_read_only_map(f"m{i}", name)
        self.state["count"] = len(Watcher.names)

    async def read(self) -> list[tuple[int, int]]:
        refs = [getattr(self.sharing.maps, f"m{i}") for i in range(self.state["count"])]
        return [(ref.version, ref.get("n", 0)) for ref in refs]


async def test_nodes_on_a_cluster_keep_the_guarantees(redis_cluster: RedisCluster) -> None:
    app = f"c{uuid.uuid4().hex[:12]}"
    actors = actors_on_every_shard(redis_cluster, 2, "n")
    names = [f"{a}-m" for a in actors]
    async with Node(redis_cluster.url, app=app) as wnode, \
            Node(redis_cluster.url, app=app) as rnode:
        handles = [await wnode.start(Counter, a) for a in actors]
        for _ in range(5):
            await asyncio.gather(*(h.call("bump") for h in handles))
        Watcher.names = names
        watcher = await rnode.start(Watcher, "watch-all")
        seen: list[list[tuple[int, int]]] = []
        async with asyncio.timeout(10):
            while True:
                state = await watcher.call("read")
                seen.append(state)
                if all(n == 5 for _, n in state):
                    break
                await asyncio.sleep(0.01)
        # Monotonic per map, and each version shows its own commit whole.
        for i in range(len(names)):
            versions = [s[i][0] for s in seen]
            assert versions == sorted(versions)
        await asyncio.gather(*(h.call("bump") for h in handles))
        async with asyncio.timeout(10):
            while not all(n == 6 for _, n in await watcher.call("read")):
                await asyncio.sleep(0.01)


# -- topology changes ------------------------------------------------------------


async def test_slot_migrating_mid_stream_loses_nothing(
        redis_cluster: RedisCluster, backends: Backends) -> None:
    actor = f"mig{uuid.uuid4().hex[:6]}-app"
    writer = await backends()
    reader = await backends()
    committer = Committer(writer, actor)
    await committer.setup()
    inbox = Inbox()
    missed: list[Sequence[str]] = []
    reader.add_reconnect_listener(missed.append)
    await reader.subscribe(committer.map, inbox)
    committer.start()
    await committer.wait_for(20)
    slot = redis_cluster.key_slot(actor)
    source = redis_cluster.node_for_slot(slot)
    target = next(m for m in redis_cluster.masters() if m.port != source.port)
    migration = redis_cluster.begin_migration(slot, target)
    await asyncio.sleep(0.05)  # commits meet a MIGRATING slot
    redis_cluster.move_keys(migration, [f"caf:{backends.app}:{{{actor}}}:map:{committer.map}"])
    await asyncio.sleep(0.05)  # ...with some keys moved: ASK, TRYAGAIN
    await asyncio.to_thread(redis_cluster.finish_migration, migration)
    # The reader moves its subscription to the new owner and is told to
    # resync exactly that map (messages published in between are missed).
    async with asyncio.timeout(10):
        while not missed:
            await asyncio.sleep(0.01)
    assert all(list(names) == [committer.map] for names in missed)
    await committer.wait_for(len(committer.acked) + 20)
    await committer.stop()
    assert redis_cluster.node_for_slot(slot).port == target.port
    final = committer.version
    stored = as_dict(await reader.read_map(committer.map))
    assert stored["n"] == final and stored["__ca_version__"] == final
    # Acknowledged commits form an unbroken chain: none lost, none twice.
    assert committer.acked == list(range(1, final + 1))
    # What was published after the move arrives, in order.
    await inbox.wait_for(1)
    async with asyncio.timeout(5):
        while final not in inbox.versions():
            await asyncio.sleep(0.01)
    received = inbox.versions()
    assert received == sorted(received)


async def test_failover_keeps_every_acknowledged_commit(cluster6: RedisCluster) -> None:
    made = Backends(cluster6)
    try:
        writer = await made(wait_replicas=1, wait_timeout_ms=500)
        reader = await made()
        actor = "fo-app"
        committer = Committer(writer, actor)
        await committer.setup()
        inbox = Inbox()
        await reader.subscribe(committer.map, inbox)
        committer.start()
        await committer.wait_for(20)
        new_primary = await asyncio.to_thread(cluster6.failover_slot, cluster6.key_slot(actor))
        before = len(committer.acked)
        await committer.wait_for(before + 20)
        await committer.stop()
        assert cluster6.node_for_slot(cluster6.key_slot(actor)).port == new_primary.port
        stored = as_dict(await reader.read_map(committer.map))
        assert stored["n"] == committer.version
        assert committer.acked == list(range(1, committer.version + 1))
        async with asyncio.timeout(10):
            while committer.version not in inbox.versions():
                await asyncio.sleep(0.01)
        assert inbox.versions() == sorted(inbox.versions())
    finally:
        await made.close()


async def test_script_flush_on_one_node_is_invisible(
        redis_cluster: RedisCluster, backends: Backends,
        caplog: pytest.LogCaptureFixture) -> None:
    backend = await backends()
    actor = f"fl{uuid.uuid4().hex[:6]}-app"
    committer = Committer(backend, actor)
    await committer.setup()
    owner = shard_of(redis_cluster, actor)
    with caplog.at_level(logging.INFO, logger="caf_sharing.backends.redis"):
        redis_cluster.script_flush(owner)
        committer.start()
        await committer.wait_for(5)
        await committer.stop()
        redis_cluster.script_flush(owner)
        assert await backend.renew_leases([actor], NODE, 30.0) == []
        assert (await backend.read_map(committer.map)) is not None
    assert committer.errors == []
    assert any("lost our scripts" in r.getMessage() for r in caplog.records)


async def test_one_shard_down_fails_only_its_own_actors() -> None:
    require_redis_server()
    require_redis_cli()
    # Without full coverage the other shards serve on while one is down.
    with RedisCluster(masters=3, extra_args=(
            "--cluster-require-full-coverage", "no")) as cluster:
        made = Backends(cluster)
        try:
            backend = await made(max_retries=1, call_timeout=1.5)
            actors = actors_on_every_shard(cluster, 1, "k")
            committers = [Committer(backend, a) for a in actors]
            for committer in committers:
                await committer.setup()
            dead = shard_of(cluster, actors[0])
            victim, survivors = committers[0], committers[1:]
            cluster.kill(dead)
            for committer in committers:
                committer.start()
            for committer in survivors:
                await committer.wait_for(20)
            await asyncio.sleep(0.5)
            for committer in committers:
                await committer.stop()
            assert victim.acked == [] and victim.errors
            assert f"{dead.port}" in str(victim.errors[0]) or "unavailable" in str(
                victim.errors[0])
            assert all(not c.errors for c in survivors)
            with pytest.raises(ShardUnavailableError) as info:
                await backend.renew_leases(actors, NODE, 30.0)
            assert info.value.failed == [victim.actor]
            assert info.value.partial == []  # the others renewed; none lost
        finally:
            await made.close()


async def test_a_lost_pubsub_connection_resyncs_only_its_shards_maps(
        redis_cluster: RedisCluster, backends: Backends) -> None:
    actors = actors_on_every_shard(redis_cluster, 1, f"p{uuid.uuid4().hex[:4]}")
    writer = await backends()
    reader = await backends()
    inboxes = {a: Inbox() for a in actors}
    missed: list[Sequence[str]] = []
    reader.add_reconnect_listener(missed.append)
    for actor in actors:
        await writer.acquire_lease(actor, NODE, 30.0)
        await writer.create_map(f"{actor}-m")
        await reader.subscribe(f"{actor}-m", inboxes[actor])
    cut = shard_of(redis_cluster, actors[0])
    with redis_cluster.client(cut) as client:
        assert client.execute_command("CLIENT", "KILL", "TYPE", "pubsub") == 1
    async with asyncio.timeout(10):
        while not missed:
            await asyncio.sleep(0.01)
    assert missed == [[f"{actors[0]}-m"]]
    for actor in actors:
        await writer.commit(tx(f"{actor}-0", actor=actor, ttl=30.0,
                               writes=[MapWrite(f"{actor}-m", changes(0, {"n": 1}))]))
    for actor in actors:
        assert inboxes[actor].versions() == [1] or await inboxes[actor].wait_for(1)


async def test_an_unplanned_failover_keeps_what_replicas_acknowledged(
        cluster6: RedisCluster) -> None:
    made = Backends(cluster6)
    try:
        # The promotion takes the node timeout (2 s) and an election: give
        # each commit longer than that, as a deployment sized for it would.
        writer = await made(wait_replicas=1, wait_timeout_ms=500, call_timeout=8.0,
                            max_retries=100)
        actor = "crash-app"
        committer = Committer(writer, actor)
        await committer.setup()
        committer.start()
        await committer.wait_for(20)
        slot = cluster6.key_slot(actor)
        primary = cluster6.node_for_slot(slot)
        cluster6.kill(primary)
        await asyncio.to_thread(cluster6.wait_ready, 20.0)
        assert cluster6.node_for_slot(slot).port != primary.port
        # The promoted replica has no replica of its own: no commit is
        # acknowledged until the old primary is back, as its replica.
        before = len(committer.acked)
        await asyncio.sleep(0.5)
        assert len(committer.acked) == before
        await asyncio.to_thread(cluster6.restart, primary)
        await committer.wait_for(before + 20, timeout=30)
        await committer.stop()
        reader = await made()
        stored = as_dict(await reader.read_map(committer.map))
        # Every commit WAIT confirmed on a replica survived the crash.
        assert stored["n"] == committer.version
        assert committer.acked == list(range(1, committer.version + 1))
    finally:
        await made.close()


async def test_a_node_keeps_renewing_the_leases_on_the_live_shards() -> None:
    require_redis_server()
    require_redis_cli()
    with RedisCluster(masters=3, extra_args=(
            "--cluster-require-full-coverage", "no")) as cluster:
        app = f"c{uuid.uuid4().hex[:12]}"
        actors = actors_on_every_shard(cluster, 1, "r")
        async with Node(cluster.url, app=app, lease_ttl=1.0, max_retries=1,
                        call_timeout=0.5, restart_grace=False) as node:
            handles = [await node.start(Counter, a) for a in actors]
            for handle in handles:
                await handle.call("bump")
            cluster.kill(shard_of(cluster, actors[0]))
            # Three lease lifetimes: only renewals keep the others' leases.
            await asyncio.sleep(3.0)
            for actor in actors[1:]:
                with cluster.client(shard_of(cluster, actor)) as client:
                    key = f"caf:{app}:{{{actor}}}:lease"
                    assert client.get(key) == node.node_id.encode()
                    assert client.pttl(key) > 0
            for handle in handles[1:]:
                assert await handle.call("bump") == 2
            with pytest.raises(BackendUnavailableError):
                await handles[0].call("bump")
            # Another node takes an actor of a live shard: this node learns it
            # at its next renewal, shard down or not, and stops the actor.
            with cluster.client(shard_of(cluster, actors[1])) as client:
                client.set(f"caf:{app}:{{{actors[1]}}}:lease", "intruder", px=30_000)
            await asyncio.sleep(1.0)
            with pytest.raises(ActorStoppedError):
                await handles[1].call("bump")
            assert await handles[2].call("bump") == 3
