"""SharingService on every backend: replicas, resyncs, aggregates, faults."""

from __future__ import annotations

import asyncio
import time
import uuid

import orjson
import pytest

from caf_sharing import SharedMap
from caf_sharing.aggregate import DEFAULT_RETRY_DELAYS
from caf_sharing.backends import Backend, MapCreate
from caf_sharing.errors import MapNotFoundError
from caf_sharing.service import SharingService


class Writer:
    """Commits to one map through a service, as an actor's node would."""

    def __init__(self, service: SharingService, actor: str, map_name: str) -> None:
        self.service, self.actor, self.name = service, actor, map_name
        self.txid: str | None = None

    async def create(self, **initial: object) -> SharedMap:
        dump = None
        if initial:
            scratch = SharedMap()
            ref = scratch.ref()
            for key, value in initial.items():
                ref.set(key, value)
            ref.prepare()
            scratch.commit(ref)
            dump = dict(scratch.ref().dump())
        await self.commit_refs({}, creates=[MapCreate(self.name, dump)])
        return await self.service.primary(self.name)

    async def commit_refs(self, refs, creates=()) -> None:
        txid = uuid.uuid4().hex
        await self.service.commit(actor=self.actor, node_id="writer-node", txid=txid,
                                  prev_txid=self.txid, checkpoint={"txid": txid, "state": {}},
                                  lease_ttl=30, refs=refs, creates=creates)
        self.txid = txid

    async def write(self, **values: object) -> int:
        ref = (await self.service.primary(self.name)).ref()
        for key, value in values.items():
            ref.set(key, value)
        ref.prepare()
        await self.commit_refs({self.name: ref})
        return ref.version + 1


async def until(predicate, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


async def publish_raw(backend: Backend, name: str, payload: bytes, redis_server=None) -> None:
    """Put bytes on a map's channel by hand, as a faulty or hostile peer would."""
    if redis_server is None:
        backend._publish(name, payload)  # type: ignore[attr-defined]
    else:
        client = redis_server.client()
        try:
            await asyncio.to_thread(client.publish, backend._channel_key(name), payload)  # type: ignore[attr-defined]
        finally:
            client.close()


@pytest.fixture
async def pair(backend_factory, backend_kind):
    """A writer node's service and a reader node's service on one store."""
    wb = await backend_factory(backend_kind)
    rb = await backend_factory(backend_kind)
    await wb.acquire_lease("alice-admin", "writer-node", 30)
    wsvc, rsvc = SharingService(wb), SharingService(rb)
    yield wsvc, rsvc
    await wsvc.close()
    await rsvc.close()


async def test_replica_follows_and_old_snapshots_stay(pair) -> None:
    wsvc, rsvc = pair
    writer = Writer(wsvc, "alice-admin", "alice-admin-m")
    await writer.create(a=1)
    replica = await rsvc.replica_of("alice-admin-m")
    assert replica is not None
    old = replica.ref(read_only=True)
    version = await writer.write(a=2)
    await until(lambda: replica.version == version)
    assert old.get("a") == 1 and replica.ref().get("a") == 2
    assert rsvc.stats.applied >= 1


async def test_replicas_are_shared_and_reference_counted(pair) -> None:
    wsvc, rsvc = pair
    writer = Writer(wsvc, "alice-admin", "alice-admin-m")
    await writer.create(a=1)
    first = await rsvc.replica_of("alice-admin-m")
    second = await rsvc.replica_of("alice-admin-m")
    assert first is second and first is not None
    await rsvc.release_replica("alice-admin-m", first)
    v = await writer.write(a=2)
    await until(lambda: first.version == v)  # still subscribed
    await rsvc.release_replica("alice-admin-m", first)
    await writer.write(a=3)
    await asyncio.sleep(0.2)
    assert first.version == v  # unsubscribed at zero
    third = await rsvc.replica_of("alice-admin-m")
    assert third is not first and third is not None and third.ref().get("a") == 3


async def test_missing_map_and_best_effort(pair) -> None:
    _, rsvc = pair
    with pytest.raises(MapNotFoundError, match="alice-admin-none"):
        await rsvc.replica_of("alice-admin-none")
    assert await rsvc.replica_of("alice-admin-none", best_effort=True) is None


async def test_subscribe_then_read_leaves_no_window(pair) -> None:
    wsvc, rsvc = pair
    writer = Writer(wsvc, "alice-admin", "alice-admin-m")
    await writer.create(n=0)
    stop = asyncio.Event()

    async def keep_writing() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            await writer.write(n=n)
            await asyncio.sleep(0.001)

    task = asyncio.ensure_future(keep_writing())
    replicas = []
    for _ in range(5):
        await asyncio.sleep(0.01)
        replica = await rsvc.replica_of("alice-admin-m", no_exec=len(replicas) % 2 == 1)
        replicas.append(replica)
    stop.set()
    await task
    final = (await wsvc.primary("alice-admin-m")).version
    await until(lambda: all(r.version == final for r in replicas))
    assert rsvc.stats.resyncs == 0, "a replica needed a resync: a window was missed"


@pytest.mark.parametrize("garbage", [b"not json", b"[1, 2]", b'{"version": "x"}',
                                     b'{"version": 1, "remove": [3], "add": []}',
                                     b'{"version": 1, "remove": [], "add": ["k"]}'])
async def test_malformed_message_is_counted_and_resynced(pair, backend_kind, garbage,
                                                         request) -> None:
    wsvc, rsvc = pair
    server = request.getfixturevalue("redis_server") if backend_kind == "redis" else None
    writer = Writer(wsvc, "alice-admin", "alice-admin-m")
    await writer.create(a=1)
    replica = await rsvc.replica_of("alice-admin-m")
    await publish_raw(rsvc.backend, "alice-admin-m", garbage, server)
    await until(lambda: rsvc.stats.malformed == 1 and rsvc.stats.resyncs >= 1)
    v = await writer.write(a=5)  # the node is alive and still replicating
    await until(lambda: replica.version == v)
    assert replica.ref().get("a") == 5


async def test_gap_triggers_resync(pair, backend_kind, request) -> None:
    wsvc, rsvc = pair
    server = request.getfixturevalue("redis_server") if backend_kind == "redis" else None
    writer = Writer(wsvc, "alice-admin", "alice-admin-m")
    await writer.create(a=1)
    replica = await rsvc.replica_of("alice-admin-m")
    ahead = orjson.dumps({"version": 50, "remove": [], "add": ["a", 9]})
    await publish_raw(rsvc.backend, "alice-admin-m", ahead, server)
    await until(lambda: rsvc.stats.gaps == 1 and rsvc.stats.resyncs >= 1)
    assert replica.ref().get("a") == 1  # nothing from the bogus future applied
    v = await writer.write(a=2)
    await until(lambda: replica.version == v)


async def test_reconnect_resyncs_and_never_rolls_back(pair) -> None:
    wsvc, rsvc = pair
    writer = Writer(wsvc, "alice-admin", "alice-admin-m")
    await writer.create(a=1)
    replica = await rsvc.replica_of("alice-admin-m")
    v = await writer.write(a=2)
    await until(lambda: replica.version == v)
    await rsvc.resync_all()
    assert replica.version == v and rsvc.stats.resyncs == 1


async def test_aggregate_best_effort_and_release(pair) -> None:
    wsvc, rsvc = pair
    a = Writer(wsvc, "alice-admin", "alice-admin-acl")
    await a.create(__link_key__=["alice-admin-group", "alice-admin-late"], bob=True)
    g = Writer(wsvc, "alice-admin", "alice-admin-group")
    g.txid = a.txid
    await g.create(carol=True, bob=False)
    agg = await rsvc.aggregate_of("alice-admin-acl")
    snap = await agg.assemble()
    assert snap.get_all("bob") == [True, False] and snap.get_all("carol") == [True]
    late = Writer(wsvc, "alice-admin", "alice-admin-late")
    late.txid = g.txid
    await late.create(dave=1)
    assert (await agg.assemble()).get_all("dave") == []  # not looked up again so soon
    # found by the first assembly after the retry delay
    agg._clock = lambda: time.monotonic() + DEFAULT_RETRY_DELAYS[0]
    assert (await agg.assemble()).get_all("dave") == [1]
    assert await rsvc.aggregate_of("alice-admin-acl") is agg
    await rsvc.release_aggregate("alice-admin-acl", agg)
    assert rsvc._replicas  # still held by the second reference
    await rsvc.release_aggregate("alice-admin-acl", agg)
    assert not rsvc._replicas
