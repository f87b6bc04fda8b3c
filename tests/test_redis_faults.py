"""The Redis backend under faults, against real redis-server processes.

These tests stop, restart, freeze (SIGSTOP) and cut the connections of a
server of their own, so they never disturb the session's shared server.
Retry settings are kept small so that failures are reported quickly.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import pytest

from caf_sharing.backends import MapCreate, MapWrite, make_backend
from caf_sharing.backends.redis import RedisBackend
from caf_sharing.errors import (
    BackendError,
    BackendUnavailableError,
    ChainError,
    LeaseHeldError,
    MapMissingError,
)
from caf_sharing.service import SharingService
from redisserver import RedisServer
from relay import Relay
from test_backend_contract import (
    ACTOR,
    MAP,
    NODE,
    OTHER,
    Inbox,
    V,
    as_dict,
    changes,
    dump,
    published,
    tx,
)
from test_service import Writer, two_maps, until, write_both

pytestmark = pytest.mark.redis

FAST = {"max_retries": 2, "retry_delay": 0.05, "connect_timeout": 1.0, "socket_timeout": 1.0}
# Most tests here restart the server and are not about leases: they take a
# lease on a young server at once (see the two data-loss tests for the wait).
NO_GRACE = {"restart_grace": False}


@pytest.fixture(scope="module")
def own_server(redis_server: RedisServer) -> Iterator[RedisServer]:
    # redis_server first: it skips (or fails under CI) without a binary.
    server = RedisServer()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def fresh_server(own_server: RedisServer) -> RedisServer:
    """The module's server, running and unfrozen whatever the last test did."""
    if not own_server.running:
        own_server.start()
    own_server.thaw()
    return own_server


class Backends:
    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self.app = f"f{uuid.uuid4().hex[:12]}"
        self.opened: list[RedisBackend] = []

    async def __call__(self, **options: Any) -> RedisBackend:
        backend = make_backend(self.server.url, app=self.app, **{**FAST, **NO_GRACE, **options})
        assert isinstance(backend, RedisBackend)
        await backend.start()
        self.opened.append(backend)
        return backend

    def key(self, what: str, name: str) -> str:
        owner = "-".join(name.split("-")[:2])
        return f"caf:{self.app}:{{{owner}}}:{what}:{name}"


@pytest.fixture
async def backends(fresh_server: RedisServer) -> AsyncIterator[Backends]:
    made = Backends(fresh_server)
    yield made
    fresh_server.thaw()
    if not fresh_server.running:
        fresh_server.start()
    for backend in made.opened:
        await backend.close()


async def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_pubsub_connection_killed_while_commits_continue(backends: Backends) -> None:
    writer = await backends()
    reader = await backends()
    await writer.acquire_lease(ACTOR, NODE, 30.0)
    await writer.create_map(MAP)
    reconnects: list[Sequence[str]] = []
    reader.add_reconnect_listener(reconnects.append)
    inbox = Inbox()
    await reader.subscribe(MAP, inbox)
    stop = asyncio.Event()
    committed = 0

    async def write() -> None:
        nonlocal committed
        while not stop.is_set():
            assert await writer.commit(tx(
                f"t{committed}", prev=f"t{committed - 1}" if committed else None,
                writes=[MapWrite(MAP, changes(committed, {"n": committed}))]))
            committed += 1
            await asyncio.sleep(0.002)

    writing = asyncio.create_task(write())
    await inbox.wait_for(5)
    assert backends.server.kill_pubsub_clients() == 1
    await wait_until(lambda: reconnects)
    after = committed
    await wait_until(lambda: inbox.versions()[-1] > after + 5)
    stop.set()
    await writing
    # Only the subscribed map is to resync.
    assert reconnects == [[MAP]]
    received = inbox.versions()
    assert received == sorted(received)
    # Messages published after the resubscription all arrived.
    assert set(range(after + 1, received[-1] + 1)) <= set(received)


async def test_restarted_empty_server(backends: Backends) -> None:
    backend = await backends()
    reader = await backends()
    await backend.acquire_lease(ACTOR, NODE, 30.0)
    await backend.create_map(MAP, dump(0, {"a": 1}))
    assert await backend.commit(tx("t0", writes=[MapWrite(MAP, changes(0, {"b": 2}))]))
    reconnected = asyncio.Event()
    reader.add_reconnect_listener(lambda names: reconnected.set())
    inbox = Inbox()
    await reader.subscribe(MAP, inbox)

    backends.server.restart()
    assert await backend.read_map(MAP) is None
    assert await backend.load_checkpoint(ACTOR) is None
    # The checkpoint is gone: a commit that follows t0 learns the store went back.
    write = MapWrite(MAP, changes(1, {"c": 3}))
    with pytest.raises(ChainError) as chain:
        await backend.commit(tx("t1", prev="t0", writes=[write]))
    assert chain.value.stored_txid is None
    # The writer re-asserts: its map (from its own state) and its checkpoint;
    # the lease, gone with the data, is taken back by the same call.
    full = dump(2, {"a": 1, "b": 2, "c": 3})
    assert await backend.commit(tx("t1", prev=None, reassert=True,
                                   writes=[MapWrite(MAP, write.changes, full)]))
    assert as_dict(await backend.read_map(MAP)) == {"a": 1, "b": 2, "c": 3, V: 2}
    with pytest.raises(LeaseHeldError) as held:
        await reader.acquire_lease(ACTOR, OTHER, 1.0)
    assert held.value.holder == NODE
    async with asyncio.timeout(5):
        await reconnected.wait()
    assert await backend.commit(tx("t2", prev="t1", writes=[MapWrite(MAP, changes(2))]))
    # t1 may have been published before the reader's resubscription; t2 not.
    await wait_until(lambda: inbox.messages and inbox.versions()[-1] == 3)


async def test_after_data_loss_a_new_node_waits_one_lease_for_the_old_holder(
        backends: Backends) -> None:
    a = await backends(restart_grace=True)
    b = await backends(restart_grace=True)
    ttl = 3.0  # room for a restart that is slow on a loaded machine
    await a.acquire_lease(ACTOR, NODE, ttl)
    await a.create_map(MAP)
    assert await a.commit(tx("a0", state="a", writes=[MapWrite(MAP, changes(0, {"by": "a"}))]))
    backends.server.restart()
    # Leases, checkpoints and maps are gone. A missing lease on a server up
    # for less than one lease is no proof the actor is free: B waits...
    taking = asyncio.ensure_future(b.acquire_lease(ACTOR, OTHER, ttl))
    await asyncio.sleep(0.2)
    assert not taking.done()
    # ... and A, whose renewal comes within a third of the lease, takes its
    # lease back and re-asserts what it holds.
    assert await a.renew_leases([ACTOR], NODE, ttl) == []
    assert await a.load_txids([ACTOR]) == [None]
    assert await a.commit(tx("a1", prev=None, reassert=True, state="a", writes=[
        MapWrite(MAP, changes(1, {"by": "a1"}), dump(2, {"by": "a1"}))]))
    # B, had it not waited, would hold the lease now.
    with pytest.raises(LeaseHeldError) as held:
        await taking
    assert held.value.holder == NODE
    assert await b.load_checkpoint(ACTOR) == {"txid": "a1", "state": "a", "maps": [MAP]}
    assert as_dict(await b.read_map(MAP)) == {"by": "a1", V: 2}


async def test_after_data_loss_without_the_old_holder_a_new_node_starts_after_one_lease(
        backends: Backends) -> None:
    a = await backends(restart_grace=True)
    b = await backends(restart_grace=True)
    ttl = 2.0
    await a.acquire_lease(ACTOR, NODE, ttl)
    await a.create_map(MAP)
    assert await a.commit(tx("a0", state="a", writes=[MapWrite(MAP, changes(0, {"by": "a"}))]))
    backends.server.restart()
    await b.acquire_lease(ACTOR, OTHER, ttl)  # A is gone: B gets it once the server aged
    with backends.server.client() as client:
        assert client.info("server")["uptime_in_seconds"] >= ttl
    assert await b.commit(tx("b0", node=OTHER, state="b", creates=[MapCreate(MAP)], writes=[
        MapWrite(MAP, changes(0, {"by": "b"}))]))
    # A comes back: its renewal cannot take the lease, and its commits
    # follow a0, not B's b0.
    assert await a.renew_leases([ACTOR], NODE, ttl) == [ACTOR]
    await b.release_lease(ACTOR, OTHER)
    with pytest.raises(ChainError) as info:
        await a.commit(tx("a1", prev="a0", state="a", writes=[
            MapWrite(MAP, changes(1, {"by": "a"}), dump(2, {"by": "a"}))]))
    assert info.value.stored_txid == "b0"
    assert await b.load_checkpoint(ACTOR) == {"txid": "b0", "state": "b", "maps": [MAP]}
    assert as_dict(await b.read_map(MAP)) == {"by": "b", V: 1}


async def test_garbage_on_a_channel_reaches_the_handler_as_bytes(backends: Backends) -> None:
    backend = await backends()
    await backend.acquire_lease(ACTOR, NODE, 30.0)
    await backend.create_map(MAP)
    inbox = Inbox()
    await backend.subscribe(MAP, inbox)
    garbage = [b"\xff\x00not json", b'{"version": "x"}', b"[]", b""]
    with backends.server.client() as client:
        for raw in garbage:
            client.spublish(backends.key("chan", MAP), raw)
    await inbox.wait_for(len(garbage))
    assert inbox.messages == garbage
    assert await backend.commit(tx("t0", writes=[MapWrite(MAP, changes(0))]))
    await inbox.wait_for(len(garbage) + 1)
    assert published(inbox.messages[-1]) == changes(0)


async def test_malformed_map_data_is_reported_with_map_and_field(backends: Backends) -> None:
    backend = await backends()
    await backend.create_map(MAP, dump(0, {"ok": 1}))
    with backends.server.client() as client:
        client.hset(backends.key("map", MAP), "broken", b"{nope")
        with pytest.raises(BackendError, match=r"alice-admin-x.*'broken'"):
            await backend.read_map(MAP)
        client.hset(backends.key("map", MAP), "broken", b"2")
        client.hset(backends.key("map", MAP), V, b"ten")
        with pytest.raises(BackendError, match=r"alice-admin-x.*__ca_version__"):
            await backend.read_map(MAP)


async def test_commit_while_redis_is_down(backends: Backends) -> None:
    backend = await backends()
    await backend.acquire_lease(ACTOR, NODE, 30.0)
    await backend.create_map(MAP)
    backends.server.stop()
    started = time.monotonic()
    with pytest.raises(BackendUnavailableError) as info:
        await backend.commit(tx("t0", writes=[MapWrite(MAP, changes(0))]))
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert backends.server.url.split("/0")[0] in message and "3 attempts" in message
    backends.server.start()
    # Back, empty: the backend reconnects by itself.
    assert await backend.read_map(MAP) is None
    with pytest.raises(MapMissingError):
        await backend.commit(tx("t0", writes=[MapWrite(MAP, changes(0))]))


async def test_commit_timing_out_on_a_frozen_server_applies_once(backends: Backends) -> None:
    backend = await backends(socket_timeout=0.3, max_retries=1)
    await backend.acquire_lease(ACTOR, NODE, 30.0)
    await backend.create_map(MAP)
    commit = tx("t0", writes=[MapWrite(MAP, changes(0, {"a": 1}))])
    backends.server.freeze()
    try:
        with pytest.raises(BackendUnavailableError):
            await backend.commit(commit)
    finally:
        backends.server.thaw()
    # The frozen server may still run the attempts it had received. Whatever
    # happened, sending the commit again neither fails its version check
    # (ConcurrentUpdateError, if the first attempt landed) nor applies it
    # twice: the checkpoint's txid answers the retry.
    await backend.commit(commit)
    assert as_dict(await backend.read_map(MAP)) == {"a": 1, V: 1}
    checkpoint = await backend.load_checkpoint(ACTOR)
    assert checkpoint is not None and checkpoint["txid"] == "t0"
    assert await backend.commit(commit) is False


async def test_group_commit_batches_and_never_delays_an_idle_writer(
        backends: Backends) -> None:
    backend = await backends(coalescing_interval=5.0, max_pending_updates=30)
    actors = [f"w{i}-a" for i in range(100)]
    for actor in actors:
        await backend.acquire_lease(actor, NODE, 30.0)
        await backend.create_map(f"{actor}-m")
    with backends.server.client() as client:
        def evalsha_calls() -> int:
            stats = client.info("commandstats").get("cmdstat_evalsha", {"calls": 0})
            calls: int = stats["calls"]
            return calls

        base_stats = (backend.stats.round_trips, backend.stats.commits)
        before = evalsha_calls()
        started = time.monotonic()
        assert await backend.commit(tx("idle", actor=actors[0], writes=[
            MapWrite(f"{actors[0]}-m", changes(0))]))
        # An idle commit goes at once, not after coalescing_interval (5 s).
        assert time.monotonic() - started < 1.0
        assert (backend.stats.round_trips, backend.stats.commits) == (base_stats[0] + 1,
                                                                      base_stats[1] + 1)
        started = time.monotonic()
        results = await asyncio.gather(*(
            backend.commit(tx(f"g{i}", actor=a, prev="idle" if i == 0 else None, writes=[
                MapWrite(f"{a}-m", changes(1 if i == 0 else 0, {"i": i}))]))
            for i, a in enumerate(actors)))
        assert time.monotonic() - started < 2.0
        assert all(results)
        trips = backend.stats.round_trips - base_stats[0] - 1
        assert backend.stats.commits - base_stats[1] == 101
        assert trips <= 100 // 30 + 2
        assert backend.stats.largest_batch == 30
        # Exactly one script call per transaction.
        assert evalsha_calls() - before == 101


async def test_queued_commit_waits_at_most_the_coalescing_interval(
        backends: Backends) -> None:
    backend = await backends(coalescing_interval=0.2, socket_timeout=5.0)
    for actor in ("a-a", "b-b"):
        await backend.acquire_lease(actor, NODE, 30.0)
        await backend.create_map(f"{actor}-m")
    trips = backend.stats.round_trips
    backends.server.freeze()
    try:
        first = asyncio.create_task(backend.commit(tx("1", actor="a-a", writes=[
            MapWrite("a-a-m", changes(0))])))
        await wait_until(lambda: backend.stats.round_trips == trips + 1)
        second = asyncio.create_task(backend.commit(tx("2", actor="b-b", writes=[
            MapWrite("b-b-m", changes(0))])))
        await asyncio.sleep(0.02)
        assert backend.stats.round_trips == trips + 1  # queued behind the first
        # The first is still stuck in the frozen server; the interval sends it anyway.
        await wait_until(lambda: backend.stats.round_trips == trips + 2, timeout=2.0)
        assert not first.done()
    finally:
        backends.server.thaw()
    assert await first and await second


async def test_large_maps_are_read_in_consistent_chunks(backends: Backends) -> None:
    writer = await backends()
    reader = await backends(read_chunk_size=500)
    await writer.acquire_lease(ACTOR, NODE, 30.0)
    filler = {f"f{i}": i for i in range(3000)}
    await writer.create_map(MAP, dump(0, {**filler, "first": 0, "last": 0}))
    assert as_dict(await reader.read_map(MAP)) == {**filler, "first": 0, "last": 0, V: 0}
    assert reader.stats.chunked_reads == 1
    pause = 0.005
    stop = asyncio.Event()

    async def write() -> None:
        v = 0
        while not stop.is_set():
            # "first" and "last" land in different HSCAN chunks; a read that
            # mixed two versions would see them differ.
            assert await writer.commit(tx(f"t{v}", prev=f"t{v - 1}" if v else None, writes=[
                MapWrite(MAP, changes(v, {"first": v + 1, "last": v + 1}))]))
            v += 1
            await asyncio.sleep(pause)

    writing = asyncio.create_task(write())
    try:
        for round_ in range(40):
            if round_ == 20:
                pause = 0  # now it moves faster than a chunked read
            seen = as_dict(await reader.read_map(MAP))
            assert len(seen) == 3003
            assert seen["first"] == seen["last"] == seen[V], "a mixed view"
    finally:
        stop.set()
        await writing
    stats = reader.stats
    assert stats.chunked_reads > 1 and stats.chunked_read_retries > 0 and stats.whole_reads > 0


async def test_a_chunked_read_leaves_out_maps_held_as_stored(backends: Backends) -> None:
    writer = await backends()
    reader = await backends(read_chunk_size=500)
    await writer.acquire_lease(ACTOR, NODE, 30.0)
    big, small = MAP, f"{ACTOR}-small"
    await writer.create_map(big, dump(0, {f"f{i}": i for i in range(3000)}))
    await writer.create_map(small, dump(0, {"a": 1}))
    held = await reader.read_map(big)
    assert held is not None and reader.stats.chunked_reads == 1
    # The big map is held as stored: the read is small enough for one call.
    assert await reader.read_maps([big, small], {big: (0, None)}) == {
        small: await reader.read_map(small)}
    assert reader.stats.chunked_reads == 1
    # Two big maps, one held: the other is read in chunks, alone.
    await writer.create_map(f"{ACTOR}-big2", dump(0, {f"g{i}": i for i in range(3000)}))
    got = await reader.read_maps([big, f"{ACTOR}-big2"], {big: (0, None)})
    assert list(got) == [f"{ACTOR}-big2"] and len(as_dict(got[f"{ACTOR}-big2"])) == 3001
    assert reader.stats.chunked_reads == 2


CHILD = r"""
import asyncio, sys
from caf_sharing.backends import MapWrite, Transaction, make_backend

async def main(url, app, count):
    backend = make_backend(url, app=app)
    await backend.start()
    inbox = asyncio.Queue()
    await backend.subscribe("alice-admin-x", inbox.put_nowait)
    print("ready", flush=True)
    for _ in range(count):
        print((await asyncio.wait_for(inbox.get(), 10)).decode(), flush=True)
    # Then write, as another actor, for the parent to receive.
    await backend.create_map("bob-admin-y")
    for v in range(count):
        prev = f"c{v - 1}" if v else None
        tx = Transaction("bob-admin", "child", f"c{v}", prev, {}, 30.0,
                         (MapWrite("bob-admin-y", {"version": v, "remove": [],
                                                   "add": ["v", v, "__ca_version__", v + 1]}),))
        assert await backend.commit(tx)
    await backend.close()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def test_two_processes_replicate_through_one_server(backends: Backends) -> None:
    backend = await backends()
    await backend.acquire_lease(ACTOR, NODE, 30.0)
    await backend.create_map(MAP)
    from_child = Inbox()
    await backend.subscribe("bob-admin-y", from_child)
    count = 20
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, backends.server.url, backends.app, str(count),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert child.stdout is not None
        async with asyncio.timeout(30):
            assert (await child.stdout.readline()).strip() == b"ready"
            sent = [changes(v, {"v": v, "l": [v, str(v)]}) for v in range(count)]
            for v, c in enumerate(sent):
                assert await backend.commit(tx(f"t{v}", prev=f"t{v - 1}" if v else None,
                                               writes=[MapWrite(MAP, c)]))
            lines = [published(await child.stdout.readline()) for _ in range(count)]
            assert lines == sent
            await from_child.wait_for(count, timeout=20)
            _, stderr = await child.communicate()
        assert child.returncode == 0, stderr.decode()
        assert from_child.versions() == list(range(1, count + 1))
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()


async def numsub(server: RedisServer, channel: str) -> int:
    with server.client() as client:
        # Change sets travel on sharded channels (Redis 7).
        count: int = client.pubsub_shardnumsub(channel)[0][1]
        return count


async def test_redis_channel_is_dropped_with_its_last_handler(backends: Backends) -> None:
    backend = await backends()
    channel = backends.key("chan", MAP)
    first, second = Inbox(), Inbox()
    await backend.subscribe(MAP, first)
    await backend.subscribe(MAP, second)
    assert await numsub(backends.server, channel) == 1
    await backend.unsubscribe(MAP, first)
    assert await numsub(backends.server, channel) == 1
    await backend.unsubscribe(MAP, second)
    async with asyncio.timeout(5):
        while await numsub(backends.server, channel):
            await asyncio.sleep(0.01)
    # Leaving and coming back at once leaves one live subscription.
    await backend.subscribe(MAP, first)
    await backend.unsubscribe(MAP, first)
    await backend.subscribe(MAP, second)
    assert await numsub(backends.server, channel) == 1
    await backend.acquire_lease(ACTOR, NODE, 30.0)
    await backend.create_map(MAP)
    await backend.commit(tx("t0", writes=[MapWrite(MAP, changes(0))]))
    await second.wait_for(1)


async def test_subscribe_while_redis_is_down(backends: Backends) -> None:
    backend = await backends()
    reconnected = asyncio.Event()
    missed: list[Sequence[str]] = []
    backend.add_reconnect_listener(lambda names: (missed.append(names), reconnected.set()))
    inbox = Inbox()
    await backend.subscribe("bob-admin-y", inbox)
    backends.server.stop()
    with pytest.raises(BackendUnavailableError, match="subscribe"):
        await backend.subscribe(MAP, inbox)
    backends.server.start()
    async with asyncio.timeout(10):
        await reconnected.wait()
    # The failed subscription left nothing behind to resubscribe.
    assert await numsub(backends.server, backends.key("chan", MAP)) == 0
    assert await numsub(backends.server, backends.key("chan", "bob-admin-y")) == 1
    assert missed == [["bob-admin-y"]]
    await backend.subscribe(MAP, inbox)
    await backend.acquire_lease(ACTOR, NODE, 30.0)
    await backend.create_map(MAP)
    await backend.commit(tx("t0", writes=[MapWrite(MAP, changes(0))]))
    await inbox.wait_for(1)


async def test_silent_pubsub_connection_is_detected(backends: Backends) -> None:
    backend = await backends(health_check_interval=0.2)
    reconnected = asyncio.Event()
    backend.add_reconnect_listener(lambda names: reconnected.set())
    inbox = Inbox()
    await backend.subscribe(MAP, inbox)
    backends.server.freeze()  # no RST, no FIN: only the PING can tell
    await asyncio.sleep(0.8)
    backends.server.thaw()
    async with asyncio.timeout(10):
        await reconnected.wait()
    writer = await backends()
    await writer.acquire_lease(ACTOR, NODE, 30.0)
    await writer.create_map(MAP)
    await writer.commit(tx("t0", writes=[MapWrite(MAP, changes(0))]))
    await inbox.wait_for(1)


@contextlib.asynccontextmanager
async def relayed_services(server: RedisServer, **reader_options: Any
                           ) -> AsyncIterator[tuple[Relay, SharingService, SharingService]]:
    """A writer's service on ``server`` and a reader's behind a relay."""
    app = f"f{uuid.uuid4().hex[:12]}"
    with Relay(server.port) as relay:
        reader = make_backend(relay.url, app=app, **{**FAST, **NO_GRACE, **reader_options})
        writer = make_backend(server.url, app=app, **{**FAST, **NO_GRACE})
        await reader.start()
        await writer.start()
        await writer.acquire_lease("alice-admin", "writer-node", 30)
        wsvc, rsvc = SharingService(writer), SharingService(reader)
        try:
            yield relay, wsvc, rsvc
        finally:
            await wsvc.close()
            await rsvc.close()
            await reader.close()
            await writer.close()


async def test_silent_pubsub_link_is_dropped_and_its_replicas_resynced(
        fresh_server: RedisServer) -> None:
    # The reader's link goes dead silently while a change set is published:
    # the health check must drop it, and the replica get the change by a resync.
    async with relayed_services(fresh_server, health_check_interval=0.2) as (relay, wsvc,
                                                                             rsvc):
        author = Writer(wsvc, "alice-admin", "alice-admin-m")
        await author.create(a=1)
        replica = await rsvc.replica_of("alice-admin-m")
        assert replica is not None
        relay.blackhole()
        version = await author.write(a=2)  # its message is lost on the way
        await asyncio.sleep(1.0)  # past 2.5 intervals: the link was dropped
        assert replica.version < version
        relay.forward()
        await until(lambda: replica.version == version)
        assert replica.ref().get("a") == 2 and rsvc.stats.resyncs >= 1
        assert rsvc.stats.applied == 0  # it came by the resync


async def test_a_commit_split_on_the_wire_lands_on_its_readers_at_once(
        fresh_server: RedisServer) -> None:
    # A slow link hands the reader each change set in pieces: the event loop
    # runs between those of m and m2, and must never show them at two commits.
    async with relayed_services(fresh_server) as (relay, wsvc, rsvc):
        writer, (first, second) = await two_maps(wsvc, rsvc, n=0)
        relay.trickle(4096, 0.002)
        looks = torn = 0
        for n in range(1, 4):
            await write_both(writer, n=n, blob=f"{n}" * 40_000)
            async with asyncio.timeout(10):
                while True:  # a look at every turn of the event loop
                    seen = first.ref().get("n"), second.ref().get("n")
                    looks, torn = looks + 1, torn + (seen[0] != seen[1])
                    if seen == (n, n):
                        break
                    await asyncio.sleep(0)
        assert looks > 30 and torn == 0
        assert (rsvc.stats.gaps, rsvc.stats.resyncs, rsvc.stats.applied) == (0, 0, 6)


async def test_quiet_pubsub_link_that_answers_ping_is_kept(backends: Backends) -> None:
    backend = await backends(health_check_interval=0.3)
    reconnects: list[Sequence[str]] = []
    backend.add_reconnect_listener(reconnects.append)
    await backend.subscribe(MAP, Inbox())
    await asyncio.sleep(2.0)  # several PINGs, each answered
    assert reconnects == []
    pubsub = [c for c in await asyncio.to_thread(backends.server.client().client_list)
              if c["cmd"] in ("ping", "ssubscribe", "subscribe")]
    assert [c["cmd"] for c in pubsub] == ["ping"]


async def test_cancelled_queued_commit_is_never_sent(backends: Backends) -> None:
    backend = await backends(coalescing_interval=5.0, socket_timeout=5.0)
    for actor in ("a-a", "b-b"):
        await backend.acquire_lease(actor, NODE, 30.0)
        await backend.create_map(f"{actor}-m")
    backends.server.freeze()
    try:
        first = asyncio.create_task(backend.commit(tx("1", actor="a-a", writes=[
            MapWrite("a-a-m", changes(0))])))
        await wait_until(lambda: backend.stats.commits >= 1)
        queued = asyncio.create_task(backend.commit(tx("2", actor="b-b", writes=[
            MapWrite("b-b-m", changes(0))])))
        await asyncio.sleep(0.01)
        queued.cancel()
    finally:
        backends.server.thaw()
    assert await first
    with pytest.raises(asyncio.CancelledError):
        await queued
    await asyncio.sleep(0.05)
    assert as_dict(await backend.read_map("b-b-m")) == {V: 0}
    assert await backend.load_checkpoint("b-b") is None
