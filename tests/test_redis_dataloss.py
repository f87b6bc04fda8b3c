"""Actors on a Redis that loses data the way Redis does by default.

Restarts from an older RDB snapshot (no AOF), restarts with no data
(``appendonly no``): the guarantees hold or heal (DESIGN.md section 9).
Each test runs its own server, since they all take its data away.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from caf_sharing import Actor, Node
from caf_sharing.backends import MapWrite, make_backend
from caf_sharing.errors import LeaseHeldError, SharingError
from caf_sharing.lineage import ADOPT_MARGIN
from conftest import until_version
from redisserver import RedisServer
from relay import Relay
from test_backend_contract import ACTOR, MAP, NODE, OTHER, V, as_dict, changes, tx

pytestmark = pytest.mark.redis

# A short lease: a node takes a lease on a server younger than one lease only
# once it is that old, and heals a store that went back within a third of it.
TTL = 1.5
OPTIONS: dict[str, Any] = {"max_retries": 2, "retry_delay": 0.05, "lease_ttl": TTL}


class Writer(Actor):
    """Writes a counter into two maps and its state, in one message."""

    async def init(self) -> None:
        self.sharing.add_writable_map("m", "m", initial_value={"n": 0})
        self.sharing.add_writable_map("m2", "m2", initial_value={"n": 0})
        self.state["n"] = 0

    async def bump(self) -> int:
        n = self.state["n"] + 1
        self.sharing.maps.m.set("n", n).set(f"k{n}", n)
        self.sharing.maps.m2.set("n", n)
        self.state["n"] = n
        return n

    async def read(self) -> tuple[int, int, int, int]:
        m, m2 = self.sharing.maps.m, self.sharing.maps.m2
        return m.version, m.get("n"), m2.get("n"), self.state["n"]


class Reader(Actor):
    async def init(self) -> None:
        self.sharing.add_read_only_map("m", "ann-writer-m")
        self.sharing.add_read_only_map("m2", "ann-writer-m2")

    async def read(self) -> tuple[int, int, int]:
        m, m2 = self.sharing.maps.m, self.sharing.maps.m2
        return m.version, m.get("n"), m2.get("n")


class CountingReader(Reader):
    """A reader with state of its own: every message commits."""

    async def read(self) -> tuple[int, int, int]:
        seen = await super().read()
        self.state["reads"] = self.state.get("reads", 0) + 1
        return seen


async def ten_bumps_snapshot_after_five(server: RedisServer, writer: Any,
                                        reader: Any) -> tuple[Path, int]:
    """Bump 10 times, snapshot the store after 5; return the snapshot and the
    version of the 10th bump, once the reader has it."""
    for _ in range(5):
        await writer.call("bump")
    old = server.snapshot()
    for _ in range(5):
        await writer.call("bump")
    top, *_ = await writer.call("read")
    assert await until_version(reader, top) == (top, 10, 10)
    return old, top


@asynccontextmanager
async def writer_and_reader_nodes(server: RedisServer) -> AsyncIterator[tuple[Node, Node]]:
    """A writer's node ("w") and a reader's node ("r") on ``server``."""
    async with Node(server.url, app="f", node_id="w", **OPTIONS) as wnode, \
            Node(server.url, app="f", node_id="r", **OPTIONS) as rnode:
        yield wnode, rnode


async def until(predicate: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.02)


async def test_older_restart_under_a_live_writer_loses_nothing(server: RedisServer) -> None:
    async with writer_and_reader_nodes(server) as (wnode, rnode):
        writer = await wnode.start(Writer, "ann-writer")
        reader = await rnode.start(Reader, "ann-reader")
        old, top = await ten_bumps_snapshot_after_five(server, writer, reader)
        history = [top]

        server.restart_from(old)  # the store is back at 5 bumps

        # With no message at all, the writer's node notices within a third of
        # the lease and puts back what it holds.
        async def healed() -> bool:
            history.append((await reader.call("read"))[0])
            stored = await wnode.backend.load_checkpoint("ann-writer")
            return stored is not None and stored["state"] == {"n": 10}
        await until(healed)
        assert wnode.service.stats.reasserts >= 1
        assert await writer.call("read") == (top, 10, 10, 10)  # state and maps agree
        # The next message succeeds (no writer wedged on ConcurrentUpdateError).
        assert await writer.call("bump") == 11
        assert await until_version(reader, top + 1) == (top + 1, 11, 11)
        history.append(top + 1)
        assert history == sorted(history), "the reader went back"
        stored = await wnode.backend.read_map("ann-writer-m")
        assert stored is not None
        assert {f"k{i}" for i in range(1, 12)} <= set(stored["add"][::2])


async def test_older_restart_without_the_writer_never_shows_a_version_twice(
        server: RedisServer) -> None:
    async with Node(server.url, app="f", node_id="r", **OPTIONS) as rnode:
        async with Node(server.url, app="f", node_id="w1", **OPTIONS) as w1:
            writer = await w1.start(Writer, "ann-writer")
            reader = await rnode.start(CountingReader, "ann-reader")
            old, top = await ten_bumps_snapshot_after_five(server, writer, reader)
        # The writer's node is gone; the store goes back to 5 bumps.
        server.restart_from(old)
        await rnode.service.resync_all()
        # The reader keeps what it showed, across its own restart on this node
        # too, and its own commits still land (its node re-asserts its state).
        assert await reader.call("read") == (top, 10, 10)
        await rnode.stop("ann-reader")
        reader = await rnode.start(CountingReader, "ann-reader")
        assert await reader.call("read") == (top, 10, 10)
        async with Node(server.url, app="f", node_id="w2", **OPTIONS) as w2:
            writer = await w2.start(Writer, "ann-writer")
            adopted, *rest = await writer.call("read")
            assert rest == [5, 5, 5]  # the store's state, taken whole
            # It continues above every version the lost writes made, so no
            # version the reader saw gets other content.
            assert adopted >= top + ADOPT_MARGIN
            assert await writer.call("bump") == 6
            seen = await until_version(reader, adopted + 1)
            assert seen == (adopted + 1, 6, 6)
        assert await reader.call("read") == seen


async def test_empty_restart_second_node_waits_and_the_holder_puts_its_data_back(
        server: RedisServer) -> None:
    async with Node(server.url, app="f", node_id="a", **OPTIONS) as a:
        writer = await a.start(Writer, "ann-writer")
        for _ in range(20):
            await writer.call("bump")
        server.restart()  # no data at all
        async with Node(server.url, app="f", node_id="b", **OPTIONS) as b:
            # B must not find an empty store and run init: it waits until the
            # server is one lease old, by which time A has put its data back.
            with pytest.raises(LeaseHeldError, match="'a'"):
                await b.start(Writer, "ann-writer")
            stored = await b.backend.load_checkpoint("ann-writer")
            assert stored is not None and stored["state"] == {"n": 20}
        assert await writer.call("bump") == 21
        assert a.service.stats.reasserts >= 1


async def test_empty_restart_keeps_readers_usable(server: RedisServer) -> None:
    async with Node(server.url, app="f", node_id="r", **OPTIONS) as rnode:
        async with Node(server.url, app="f", node_id="w", **OPTIONS) as wnode:
            writer = await wnode.start(Writer, "ann-writer")
            reader = await rnode.start(CountingReader, "ann-reader")
            for _ in range(3):
                await writer.call("bump")
            top, *_ = await writer.call("read")
            assert await until_version(reader, top) == (top, 3, 3)
        server.restart()  # the writer is gone and so are its maps
        await asyncio.sleep(0.3)
        await rnode.service.resync_all()
        # Messages keep working (each commits the reader's own state) and
        # read the last version, also after the actor reloads on this node.
        for _ in range(3):
            assert await reader.call("read") == (top, 3, 3)
        await rnode.stop("ann-reader")
        reader = await rnode.start(CountingReader, "ann-reader")
        assert await reader.call("read") == (top, 3, 3)


async def test_resyncs_never_tear_the_maps_of_one_message(server: RedisServer) -> None:
    async with writer_and_reader_nodes(server) as (wnode, rnode):
        writer = await wnode.start(Writer, "ann-writer")
        reader = await rnode.start(Reader, "ann-reader")
        observations = torn = 0
        for i in range(1, 201):
            await writer.call("bump")
            if i % 20 == 0:
                assert await asyncio.to_thread(server.kill_pubsub_clients) >= 1
            _, n, n2 = await reader.call("read")
            observations += 1
            torn += n != n2
        assert await until_version(reader, (await writer.call("read"))[0])
        assert rnode.service.stats.resyncs >= 5
        assert (observations, torn) == (200, 0)


class held_changes:
    """Hold back the change sets a node's pub/sub connections receive, as if
    still on their way, and deliver them in order on exit; (un)subscribe
    confirmations pass. A read on the command connection then overtakes them."""

    def __init__(self, node: Node) -> None:
        self._conns = [link._conn for link in  # type: ignore[attr-defined]
                       node.service.backend._pubsub._links.values()]
        self._delivers = [conn.on_push for conn in self._conns]
        self.held: list[tuple[Any, Any]] = []

    def __enter__(self) -> held_changes:
        for conn, deliver in zip(self._conns, self._delivers, strict=True):
            conn.on_push = partial(self._hold, deliver)
        return self

    def _hold(self, deliver: Any, push: Any) -> None:
        if type(push) is list and push[0] in (b"message", b"smessage"):
            self.held.append((deliver, push))
        else:
            deliver(push)

    def __exit__(self, *exc_info: object) -> None:
        for conn, deliver in zip(self._conns, self._delivers, strict=True):
            conn.on_push = deliver
        for deliver, push in self.held:
            deliver(push)


async def test_a_map_opened_beside_its_sibling_shows_both_at_one_commit(
        server: RedisServer) -> None:
    async with writer_and_reader_nodes(server) as (wnode, rnode):
        writer = await wnode.start(Writer, "ann-writer")
        await writer.call("bump")
        service = rnode.service
        first = await service.replica_of("ann-writer-m")
        assert first is not None and first.ref().get("n") == 1
        with held_changes(rnode) as held:
            await writer.call("bump")
            second = await service.replica_of("ann-writer-m2")
            assert second is not None and held.held
            # Read alone, m2 would show commit 2 beside m at commit 1.
            assert (first.ref().get("n"), second.ref().get("n")) == (2, 2)
        assert service.stats.resyncs == 0  # a first load is no resync
        await writer.call("bump")

        async def caught_up() -> bool:
            return second.ref().get("n") == 3
        await until(caught_up)
        assert first.ref().get("n") == 3


async def test_a_resync_s_read_between_two_change_sets_of_a_commit_shows_neither(
        server: RedisServer) -> None:
    # The read of a resync comes back older than a commit of which only one
    # change set has arrived (the next is still on its way): replayed after
    # the read, that one must wait for the other, not show beside its sibling.
    async with writer_and_reader_nodes(server) as (wnode, rnode):
        writer = await wnode.start(Writer, "ann-writer")
        await writer.call("bump")
        service = rnode.service
        first = await service.replica_of("ann-writer-m")
        second = await service.replica_of("ann-writer-m2")
        assert first is not None and second is not None
        read_maps, go_on = service.backend.read_maps, asyncio.Event()

        async def late(names: Any, known: Any = None) -> Any:
            got = await read_maps(names, known)
            await go_on.wait()  # its reply is on its way while the commit lands
            return got

        service.backend.read_maps = late  # type: ignore[method-assign]
        with held_changes(rnode) as held:
            service._on_reconnect(["ann-writer-m", "ann-writer-m2"])
            await asyncio.sleep(0.05)  # the read is done, at commit 1
            await writer.call("bump")
            async with asyncio.timeout(5):
                while len(held.held) < 2:
                    await asyncio.sleep(0.005)
            assert [push[1].endswith(b"-m") for _, push in held.held] == [True, False]
            deliver, push = held.held.pop(0)  # m's change set of commit 2 only
            deliver(push)
            go_on.set()
            async with asyncio.timeout(5):
                while service._resyncs:
                    await asyncio.sleep(0)
            # The resync is done: m's change set waits for m2's.
            assert (first.ref().get("n"), second.ref().get("n")) == (1, 1)
        # held_changes delivers m2's change set: both land.
        assert (first.ref().get("n"), second.ref().get("n")) == (2, 2)
        assert service.stats.gaps == 0


class Grower(Actor):
    """Writes ``m``, then creates ``m2`` in the commit that writes ``m`` again."""

    async def init(self) -> None:
        self.sharing.add_writable_map("m", "m", initial_value={"n": 0})

    async def grow(self) -> None:
        self.sharing.add_writable_map("m2", "m2", initial_value={"n": 1})
        self.sharing.maps.m.set("n", 1)


class LateReader(Actor):
    async def init(self) -> None:
        self.sharing.add_read_only_map("m", "ann-writer-m")
        self.sharing.add_read_only_map("m2", "ann-writer-m2", best_effort=True)

    async def read(self) -> tuple[int, int | None]:
        m2 = self.sharing.maps.m2
        return self.sharing.maps.m.get("n"), None if m2 is None else m2.get("n")


async def test_a_message_that_opens_a_map_snapshots_every_map_after(server: RedisServer) -> None:
    async with writer_and_reader_nodes(server) as (wnode, rnode):
        writer = await wnode.start(Grower, "ann-writer")
        reader = await rnode.start(LateReader, "ann-reader")
        assert await reader.call("read") == (0, None)
        with held_changes(rnode) as held:
            await writer.call("grow")
            # The message opens m2 (m's change set is still on its way): taken
            # before that, m's snapshot would show the commit before m2's.
            assert await reader.call("read") == (1, 1)
            assert held.held


async def test_commit_whose_reply_was_lost_is_reported_committed_after_a_takeover(
        server: RedisServer) -> None:
    with Relay(server.port) as relay:
        a = make_backend(relay.url, app="f", restart_grace=False, socket_timeout=5.0,
                         call_timeout=10.0, max_retries=3, retry_delay=0.05)
        b = make_backend(server.url, app="f", restart_grace=False)
        await a.start()
        await b.start()
        try:
            await a.acquire_lease(ACTOR, NODE, 0.3)
            await a.create_map(MAP)
            assert await a.commit(tx("t0", writes=[MapWrite(MAP, changes(0, {"by": "a"}))]))
            relay.drop_replies()
            commit = asyncio.ensure_future(a.commit(tx("t1", prev="t0", writes=[
                MapWrite(MAP, changes(1, {"by": "a1"}))])))
            async with asyncio.timeout(5):
                while (await b.load_txids([ACTOR])) != ["t1"]:
                    await asyncio.sleep(0.005)
            # t1 landed; its reply is lost. A's lease runs out and B moves on.
            await asyncio.sleep(0.35)
            await b.acquire_lease(ACTOR, OTHER, 10.0)
            assert await b.commit(tx("b2", prev="t1", node=OTHER, writes=[
                MapWrite(MAP, changes(2, {"by": "b"}))]))
            # A's retry finds t1 among the actor's recent commits: committed.
            relay.forward()
            relay.cut()
            assert await commit is False
            assert as_dict(await b.read_map(MAP)) == {"by": "b", V: 3}
        finally:
            await a.close()
            await b.close()


async def test_a_failed_reopen_keeps_what_the_replica_showed(server: RedisServer) -> None:
    async with writer_and_reader_nodes(server) as (wnode, rnode):
        writer = await wnode.start(Writer, "ann-writer")
        for _ in range(3):
            await writer.call("bump")
        top, *_ = await writer.call("read")
        service = rnode.service
        replica = await service.replica_of("ann-writer-m")
        assert replica is not None

        async def caught_up() -> bool:
            return replica.version == top
        await until(caught_up)
        await service.release_replica("ann-writer-m", replica)
        await wnode.stop("ann-writer")
        server.stop()  # reopening fails while the server is down...
        with pytest.raises(SharingError):
            await service.replica_of("ann-writer-m")
        server.start()  # ... and it comes back empty
        async with asyncio.timeout(15):
            while True:  # until the pub/sub connection is back
                try:
                    again = await service.replica_of("ann-writer-m")
                    break
                except SharingError:
                    await asyncio.sleep(0.1)
        assert again is replica and again.version == top and again.ref().get("n") == 3
