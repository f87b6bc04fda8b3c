"""SharingService on every backend: replicas, resyncs, aggregates, faults."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import orjson
import pytest

from caf_sharing import SharedMap
from caf_sharing import service as service_module
from caf_sharing.aggregate import DEFAULT_RETRY_DELAYS
from caf_sharing.backends import Backend, MapCreate
from caf_sharing.backends.redis.codec import Keys
from caf_sharing.errors import MapNotFoundError
from caf_sharing.lineage import _parse_txid
from caf_sharing.names import map_owner
from caf_sharing.service import MAX_BUFFERED_BYTES, SharingService, txid_of
from rediscluster import RedisCluster


class Stay:
    """An actor's stay on a node: its chain of txids, as a node makes them."""

    def __init__(self, service: SharingService, actor: str) -> None:
        self.epoch, self.seq = uuid.uuid4().hex[:16], 0
        self.txid: str | None = None
        service.host_actor(actor, self.epoch, None)

    def next(self) -> str:
        self.seq += 1
        return txid_of(self.epoch, self.seq)


class Writer:
    """Commits to one map through a service, as an actor's node would."""

    def __init__(self, service: SharingService, actor: str, map_name: str, *,
                 stay: Stay | None = None) -> None:
        self.service, self.actor, self.name = service, actor, map_name
        self.stay = stay or Stay(service, actor)

    @property
    def txid(self) -> str | None:
        return self.stay.txid

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
        txid = self.stay.next()
        await self.service.commit(actor=self.actor, node_id="writer-node", txid=txid,
                                  prev_txid=self.txid, checkpoint={"txid": txid, "state": {}},
                                  lease_ttl=30, refs=refs, creates=creates)
        self.stay.txid = txid

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


def raw_target(request: pytest.FixtureRequest, backend_kind: str) -> Any:
    """Where a hostile peer publishes for ``backend_kind``: None (memory), the
    shared server or the shared cluster."""
    if backend_kind == "memory":
        return None
    return request.getfixturevalue("redis_server" if backend_kind == "redis"
                                    else "redis_cluster")


async def publish_raw(backend: Backend, name: str, payload: bytes, target: Any = None) -> None:
    """Put bytes on a map's channel by hand, as a faulty or hostile peer would."""
    if target is None:
        backend._publish(name, payload)  # type: ignore[attr-defined]
        return
    channel = Keys(backend.app).channel(name)
    if isinstance(target, RedisCluster):  # the channel's shard
        client = target.client(target.node_for_slot(target.key_slot(map_owner(name))))
    else:
        client = target.client()
    try:
        # Redis 7 and clusters carry change sets on sharded channels.
        await asyncio.to_thread(client.spublish, channel, payload)
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
    # Re-opened from the released replicas the service keeps (so that a
    # reader never goes back), caught up from the store.
    third = await rsvc.replica_of("alice-admin-m")
    assert third is first and third.ref().get("a") == 3


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
    server = raw_target(request, backend_kind)
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
    server = raw_target(request, backend_kind)
    writer = Writer(wsvc, "alice-admin", "alice-admin-m")
    await writer.create(a=1)
    replica = await rsvc.replica_of("alice-admin-m")
    ahead = orjson.dumps({"version": 50, "remove": [], "add": ["a", 9], "txid": "t50",
                          "base_txid": "t49"})
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
    g = Writer(wsvc, "alice-admin", "alice-admin-group", stay=a.stay)
    await g.create(carol=True, bob=False)
    agg = await rsvc.aggregate_of("alice-admin-acl")
    snap = await agg.assemble()
    assert snap.get_all("bob") == [True, False] and snap.get_all("carol") == [True]
    late = Writer(wsvc, "alice-admin", "alice-admin-late", stay=a.stay)
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


def guessed_txid(seen: str | None) -> str:
    """A forger's best guess of the txid after ``seen``, read on the channel:
    the same epoch, one commit further (the random tail it cannot know)."""
    parsed = _parse_txid(seen)
    return "guess" if parsed is None else f"{parsed[0]}-{parsed[1] + 1}"


@pytest.mark.parametrize("guess", [False, True], ids=["own txid", "next commit's txid"])
async def test_forged_change_set_is_undone_by_the_real_commit(pair, backend_kind, request,
                                                              guess) -> None:
    wsvc, rsvc = pair
    server = raw_target(request, backend_kind)
    writer = Writer(wsvc, "alice-admin", "alice-admin-m")
    await writer.create(a=1)
    replica = await rsvc.replica_of("alice-admin-m")
    assert replica is not None
    v = await writer.write(a=2)
    await until(lambda: replica.version == v)
    # A well-formed change set at the replica's version, lineage included (a
    # forger can read the channel), lands first, under a txid of its own or
    # its guess of the next commit's...
    forged = {"version": v, "remove": [], "add": ["a", 666, "__ca_version__", v + 1],
              "txid": guessed_txid(writer.txid) if guess else "forged",
              "base_txid": writer.txid}
    await publish_raw(rsvc.backend, "alice-admin-m", orjson.dumps(forged), server)
    await until(lambda: replica.version == v + 1)
    assert replica.ref().get("a") == 666
    # ... then the real commit of that version arrives: the replica sees two
    # contents for one version (a guess lacks the commit's random tail, so it
    # is no copy of it), counts a fork and takes the store's.
    real = await writer.write(a=3)
    assert real == v + 1
    await until(lambda: rsvc.stats.forks == 1 and replica.ref().get("a") == 3)
    assert replica.version == real
    # Later commits apply on the real content.
    await writer.write(b=4)
    await until(lambda: replica.version == real + 1)
    assert replica.ref().to_dict() == {"a": 3, "b": 4}


async def two_maps(wsvc: SharingService, rsvc: SharingService, *, twin: bool = False,
                   **initial: object) -> tuple[Writer, list[SharedMap]]:
    """alice-admin's maps m and m2 (``initial``, else a=1), and replicas of
    both on ``rsvc`` (with ``twin``, a no_exec replica of m too)."""
    initial = initial or {"a": 1}
    m = Writer(wsvc, "alice-admin", "alice-admin-m")
    await m.create(**initial)
    await Writer(wsvc, "alice-admin", "alice-admin-m2", stay=m.stay).create(**initial)
    names = ["alice-admin-m", "alice-admin-m2"]
    replicas = [await rsvc.replica_of(name) for name in names]
    if twin:
        replicas.append(await rsvc.replica_of("alice-admin-m", no_exec=True))
    assert all(replica is not None for replica in replicas)
    return m, replicas  # type: ignore[return-value]


async def write_both(writer: Writer, **values: object) -> None:
    """One commit setting ``values`` in both of :func:`two_maps`'s maps."""
    refs = {}
    for name in ("alice-admin-m", "alice-admin-m2"):
        ref = (await writer.service.primary(name)).ref()
        for key, value in values.items():
            ref.set(key, value)
        ref.prepare()
        refs[name] = ref
    await writer.commit_refs(refs)


async def test_replica_reads_several_maps_of_one_writer_at_one_commit(pair) -> None:
    wsvc, rsvc = pair
    writer, (first, second) = await two_maps(wsvc, rsvc, n=0)
    # Both maps written by each commit; resyncs run all the while.
    for n in range(1, 30):
        await write_both(writer, n=n)
        if n % 3 == 0:
            resync = asyncio.ensure_future(rsvc.resync_all())
        for _ in range(3):
            assert first.ref().get("n") == second.ref().get("n"), "a torn resync"
            await asyncio.sleep(0)
    await resync
    await until(lambda: first.ref().get("n") == 29)
    assert second.ref().get("n") == 29


async def test_a_flood_during_a_resync_is_dropped_past_the_bound(pair) -> None:
    wsvc, rsvc = pair
    writer = Writer(wsvc, "alice-admin", "alice-admin-m")
    await writer.create(a=1)
    v = await writer.write(a=2)
    replica = await rsvc.replica_of("alice-admin-m")
    assert replica is not None
    entry = rsvc._replicas[("alice-admin-m", False)]
    # A resync starts; before it can read, 2,000 messages of 100 KB arrive
    # (the handler is what the backend calls for each message).
    rsvc._schedule_resync(entry)
    flood = orjson.dumps({"version": 10**6, "remove": [], "add": ["x", "y" * 100_000],
                          "txid": "f", "base_txid": "g"})
    peak = 0
    for _ in range(2000):
        entry.handle(flood)
        peak = max(peak, entry.buffered)
    assert peak <= MAX_BUFFERED_BYTES + len(flood)
    assert rsvc.stats.overflows >= 2000 * len(flood) // MAX_BUFFERED_BYTES - 1
    # The resyncs that follow leave the replica at the store's version.
    await until(lambda: not rsvc._resyncs)
    assert replica.version == v and replica.ref().to_dict() == {"a": 2}
    assert await writer.write(a=3) == v + 1
    await until(lambda: replica.version == v + 1)


# Refused once the map has a lineage: a change set without one, and a dump
# (writers publish change sets only), however plausible (lineage fields and
# all): it would otherwise hold the replica until the writer caught up.
FORGERIES = {
    "no lineage": lambda v: {"version": v, "remove": [],
                             "add": ["a", 666, "__ca_version__", v + 1]},
    "a dump far ahead": lambda v: {"version": 0, "remove": [],
                                   "add": ["a", 666, "__ca_version__", v + 1000],
                                   "txid": "forged", "base_txid": None},
}


@pytest.mark.parametrize("forge", list(FORGERIES.values()), ids=list(FORGERIES))
async def test_a_forged_message_never_moves_a_replica(pair, backend_kind, request,
                                                      forge) -> None:
    wsvc, rsvc = pair
    server = raw_target(request, backend_kind)
    writer = Writer(wsvc, "alice-admin", "alice-admin-m")
    await writer.create(a=1)
    v = await writer.write(a=2)
    replica = await rsvc.replica_of("alice-admin-m")
    assert replica is not None and replica.version == v
    await publish_raw(rsvc.backend, "alice-admin-m", orjson.dumps(forge(v)), server)
    await until(lambda: rsvc.stats.malformed == 1 and rsvc.stats.resyncs >= 1)
    assert replica.version == v and replica.ref().to_dict() == {"a": 2}
    assert await writer.write(a=3) == v + 1
    await until(lambda: replica.version == v + 1)
    assert replica.ref().get("a") == 3


async def test_a_commit_s_change_sets_land_together_on_every_replica(pair) -> None:
    wsvc, rsvc = pair
    writer, replicas = await two_maps(wsvc, rsvc, twin=True)
    for a in (2, 3):
        await write_both(writer, a=a)
        await until(lambda: all(r.ref().get("a") == a for r in replicas))  # noqa: B023
    # Each change set said what followed it, and nothing had to be read again.
    assert (rsvc.stats.applied, rsvc.stats.gaps, rsvc.stats.resyncs) == (6, 0, 0)
    assert not rsvc._groups


async def test_a_sibling_opened_later_reads_again_only_what_is_not_held(pair) -> None:
    wsvc, rsvc = pair
    m = Writer(wsvc, "alice-admin", "alice-admin-m")
    await m.create(a=1)
    await Writer(wsvc, "alice-admin", "alice-admin-m2", stay=m.stay).create(a=1)
    first = await rsvc.replica_of("alice-admin-m")
    assert first is not None
    reads: list[tuple[list[str], list[str]]] = []
    read_maps = rsvc.backend.read_maps

    async def counted(names: Any, known: Any = None) -> Any:
        got = await read_maps(names, known)
        reads.append((list(names), sorted(got)))
        return got

    rsvc.backend.read_maps = counted  # type: ignore[method-assign]
    second = await rsvc.replica_of("alice-admin-m2")
    # Both read at one instant; m, held as stored, did not come back.
    assert second is not None and reads == [(["alice-admin-m", "alice-admin-m2"],
                                             ["alice-admin-m2"])]
    # A resync reads everything again.
    await rsvc.resync_all()
    assert reads[1:] == [(["alice-admin-m", "alice-admin-m2"],
                          ["alice-admin-m", "alice-admin-m2"])]


async def test_a_forged_promise_of_more_change_sets_holds_nothing_for_long(
        pair, backend_kind, request, monkeypatch) -> None:
    monkeypatch.setattr(service_module, "GROUP_WAIT", 0.2)
    wsvc, rsvc = pair
    server = raw_target(request, backend_kind)
    writer, (first, second) = await two_maps(wsvc, rsvc)
    v = first.version
    forged = {"version": v, "remove": [], "add": ["a", 666], "txid": "forged",
              "more": ["m2"]}
    await publish_raw(rsvc.backend, "alice-admin-m", orjson.dumps(forged), server)
    await until(lambda: rsvc.stats.gaps == 1 and rsvc.stats.resyncs >= 1)
    # Held, never shown; then given up for a read of the store.
    assert first.version == v and first.ref().get("a") == 1 and not rsvc._groups
    await write_both(writer, a=2)
    await until(lambda: first.ref().get("a") == second.ref().get("a") == 2)


@pytest.mark.parametrize("more", ["m2", [2], {"m2": 1}])
async def test_a_malformed_promise_of_more_change_sets_is_refused(
        pair, backend_kind, request, more) -> None:
    wsvc, rsvc = pair
    server = raw_target(request, backend_kind)
    writer, (first, second) = await two_maps(wsvc, rsvc)
    v = first.version
    forged = {"version": v, "remove": [], "add": ["a", 666], "txid": "forged", "more": more}
    await publish_raw(rsvc.backend, "alice-admin-m", orjson.dumps(forged), server)
    await until(lambda: rsvc.stats.malformed == 1 and rsvc.stats.resyncs >= 1)
    assert first.version == v and first.ref().get("a") == 1 and not rsvc._groups
    await write_both(writer, a=2)
    await until(lambda: first.ref().get("a") == second.ref().get("a") == 2)


async def test_a_released_sibling_is_not_waited_for(pair, backend_kind, request) -> None:
    wsvc, rsvc = pair
    server = raw_target(request, backend_kind)
    _, (first, second) = await two_maps(wsvc, rsvc)
    v = first.version
    part = {"version": v, "remove": [], "add": ["a", 2], "txid": "t-held", "more": ["m2"]}
    await publish_raw(rsvc.backend, "alice-admin-m", orjson.dumps(part), server)
    await until(lambda: bool(rsvc._groups))
    await rsvc.release_replica("alice-admin-m2", second)
    assert not rsvc._groups and first.ref().get("a") == 2


async def test_a_watcher_stopped_during_a_notification(pair) -> None:
    """Watchers are notified from the list as it was when the change landed:
    one that a watcher before it stops still hears of that change, and only
    of it; the others go on."""
    wsvc, rsvc = pair
    writer = Writer(wsvc, "alice-admin", "alice-admin-m")
    await writer.create(a=1)
    replica = await rsvc.replica_of("alice-admin-m")
    assert replica is not None
    heard: list[str] = []
    stops: dict[str, Any] = {}

    def first() -> None:
        heard.append("first")
        stops.pop("second", lambda: None)()

    stops["first"] = rsvc.watch("alice-admin-m", replica, first)
    stops["second"] = rsvc.watch("alice-admin-m", replica, lambda: heard.append("second"))
    rsvc.watch("alice-admin-m", replica, lambda: heard.append("third"))
    await writer.write(a=2)
    await until(lambda: len(heard) == 3)
    assert heard == ["first", "second", "third"]
    await writer.write(a=3)
    await until(lambda: len(heard) == 5)
    assert heard[3:] == ["first", "third"]
    stops["first"]()
    stops["first"]()  # stopping twice is harmless
    await writer.write(a=4)
    await until(lambda: len(heard) == 6)
    assert heard[5:] == ["third"]


@pytest.mark.parametrize("backend_kind", ["redis"])
async def test_a_subscription_dropped_during_a_push_is_not_called(backend, backend_kind,
                                                                  redis_server) -> None:
    """A handler may drop another subscription of the channel as a push is
    delivered (an eagerly started actor message releasing a replica, say):
    the dropped one is not called, the others are, and later pushes reach
    only those left."""
    name = "alice-admin-m"
    heard: list[tuple[str, bytes]] = []

    def second(payload: bytes) -> None:
        heard.append(("second", payload))

    def first(payload: bytes) -> None:
        heard.append(("first", payload))
        drop = backend.unsubscribe(name, second)
        with pytest.raises(StopIteration):  # runs to its end at once
            drop.send(None)

    def third(payload: bytes) -> None:
        heard.append(("third", payload))

    for handler in (first, second, third):
        await backend.subscribe(name, handler)
    await publish_raw(backend, name, b"one", redis_server)
    await until(lambda: len(heard) == 2)
    await publish_raw(backend, name, b"two", redis_server)
    await until(lambda: len(heard) == 4)
    assert heard == [("first", b"one"), ("third", b"one"), ("first", b"two"),
                     ("third", b"two")]
