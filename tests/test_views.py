"""Replica views (``Node.replica``) and ``on_change`` notifications, on every backend."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, ClassVar

import pytest

from caf_sharing import Actor, Node, ReplicaView
from caf_sharing.errors import (
    MapNotFoundError,
    ReadOnlyError,
    UnknownActorMethodError,
    ViewClosedError,
)
from redisserver import RedisServer

pytestmark = pytest.mark.asyncio

MAP = "alice-writer-data"
MAP2 = "alice-writer-data2"


@pytest.fixture
def app(backend_factory: Any) -> str:
    return str(backend_factory.app)


class Writer(Actor):
    async def init(self) -> None:
        self.sharing.add_writable_map("m", "data", initial_value={"n": 0})
        self.sharing.add_writable_map("m2", "data2", initial_value={"n": 0})

    async def bump(self) -> int:
        """The same counter in both maps, in one message."""
        m, m2 = self.sharing.maps.m, self.sharing.maps.m2
        n = m.get("n") + 1
        m.set("n", n)
        m2.set("n", n)
        return int(m.version) + 1


class Watcher(Actor):
    """Records every notification with what its message sees of both maps."""

    seen: ClassVar[dict[str, list[tuple[str, int, int, int]]]] = {}
    delay: ClassVar[float] = 0.0

    async def init(self) -> None:
        self.sharing.add_read_only_map("m", MAP, on_change="changed")
        self.sharing.add_read_only_map("m2", MAP2)

    async def changed(self, alias: str, version: int) -> None:
        m, m2 = self.sharing.maps.m, self.sharing.maps.m2
        Watcher.seen.setdefault(self.name, []).append((alias, version, m.get("n"), m2.get("n")))
        if Watcher.delay:
            await asyncio.sleep(Watcher.delay)

    async def read(self) -> int:
        return int(self.sharing.maps.m.version)


@pytest.fixture(autouse=True)
def _reset_watcher() -> None:
    Watcher.seen = {}
    Watcher.delay = 0.0


async def until(predicate: Any, timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


def versions(seen: list[tuple[str, int, int, int]]) -> list[int]:
    return [version for _, version, _, _ in seen]


async def collect_versions(view: ReplicaView, got: list[int]) -> None:
    """Append the version of each snapshot ``view.changes()`` yields."""
    async for ref in view.changes():
        got.append(ref.version)


async def test_view_shares_the_replica_of_the_nodes_actors(backend_url: str, app: str) -> None:
    async with Node(backend_url, app=app) as wnode, Node(backend_url, app=app) as rnode:
        writer = await wnode.start(Writer, "alice-writer")
        reader = await rnode.start(Watcher, "alice-reader")
        view = await rnode.replica(MAP)
        replica = rnode.service._replicas[MAP, False]
        assert replica.count == 2 and view._map is replica.map
        assert view.version == 1 and view.ref().get("n") == 0
        version = await writer.call("bump")
        ref = await view.wait_for(version, timeout=10)
        assert ref.version == version == view.version and ref.get("n") == 1
        assert ref.is_read_only and view.ref() is ref  # O(1): the same snapshot
        assert await reader.call("read") == version  # the actor's replica is that one
        with pytest.raises(ReadOnlyError):
            ref.set("n", 2)
        await view.close()
        assert replica.count == 1


async def test_view_of_a_map_that_does_not_exist_yet(backend_url: str, app: str) -> None:
    async with Node(backend_url, app=app) as wnode, Node(backend_url, app=app) as rnode:
        view = await rnode.replica(MAP)
        assert view.version == -1
        with pytest.raises(MapNotFoundError, match=MAP):
            view.ref()
        with pytest.raises(TimeoutError):
            await view.wait_for(timeout=0.05)
        waiter = asyncio.ensure_future(view.wait_for(timeout=10))
        writer = await wnode.start(Writer, "alice-writer")  # creates the map, publishes nothing
        ref = await waiter
        assert ref.version == 1 and ref.get("n") == 0
        version = await writer.call("bump")
        assert (await view.wait_for(version, timeout=10)).get("n") == 1


async def test_changes_are_coalesced_under_a_thousand_commits(backend_url: str,
                                                               app: str) -> None:
    commits = 1000
    async with Node(backend_url, app=app) as wnode, Node(backend_url, app=app) as rnode:
        writer = await wnode.start(Writer, "alice-writer")
        view = await rnode.replica(MAP)
        got: list[tuple[int, int]] = []

        async def consume() -> None:
            async for ref in view.changes():
                got.append((ref.version, ref.get("n")))
                await asyncio.sleep(0.01)  # a slow consumer

        consumer = asyncio.ensure_future(consume())
        last = 0
        for _ in range(commits):
            last = await writer.call("bump")
        await until(lambda: bool(got) and got[-1][0] == last)
        await view.close()
        await asyncio.wait_for(consumer, 5)  # close ends the iterator
    seen = [v for v, _ in got]
    assert seen == sorted(set(seen)), "not strictly increasing"
    assert got[0] == (1, 0)  # the current snapshot first
    assert got[-1] == (last, commits)
    assert len(got) < commits / 4, f"{len(got)} snapshots for {commits} commits"


async def test_on_change_is_coalesced_and_sees_the_newest_version(backend_url: str,
                                                                  app: str) -> None:
    commits = 1000
    Watcher.delay = 0.01
    async with Node(backend_url, app=app) as wnode, Node(backend_url, app=app) as rnode:
        writer = await wnode.start(Writer, "alice-writer")
        await rnode.start(Watcher, "alice-reader")
        host = rnode._hosts["alice-reader"]
        depth = 0
        last = 0
        for _ in range(commits):
            last = await writer.call("bump")
            depth = max(depth, host.mailbox.qsize())
        await until(lambda: versions(Watcher.seen.get("alice-reader", []))[-1:] == [last])
    seen = Watcher.seen["alice-reader"]
    assert versions(seen) == sorted(set(versions(seen)))
    assert seen[0][:2] == ("m", 1)  # the registration notifies once at once
    assert seen[-1] == ("m", last, commits, commits)
    assert len(seen) < commits / 4, f"{len(seen)} notifications for {commits} commits"
    assert depth <= 1, "more than one notification queued"


async def test_cross_map_atomicity_for_views_and_notifications(backend_url: str,
                                                               app: str) -> None:
    async with Node(backend_url, app=app) as wnode, Node(backend_url, app=app) as rnode:
        writer = await wnode.start(Writer, "alice-writer")
        await rnode.start(Watcher, "alice-reader")
        view, view2 = await rnode.replica(MAP), await rnode.replica(MAP2)
        torn: list[tuple[int, int]] = []
        stop = asyncio.Event()

        async def poll() -> None:  # reads both views with no await in between
            while not stop.is_set():
                a, b = view.ref().get("n"), view2.ref().get("n")
                if a != b:
                    torn.append((a, b))
                await asyncio.sleep(0)

        poller = asyncio.ensure_future(poll())
        last = 0
        for i in range(300):
            last = await writer.call("bump")
            if i % 50 == 0:  # resyncs install both replicas at once
                await rnode.service.resync_all()
        await view.wait_for(last, timeout=10)
        await view2.wait_for(last, timeout=10)
        await until(lambda: versions(Watcher.seen["alice-reader"])[-1:] == [last])
        stop.set()
        await poller
    assert torn == []
    assert all(a == b for _, _, a, b in Watcher.seen["alice-reader"])


async def test_monotonic_under_resync(backend_url: str, app: str) -> None:
    async with Node(backend_url, app=app) as wnode, Node(backend_url, app=app) as rnode:
        writer = await wnode.start(Writer, "alice-writer")
        await rnode.start(Watcher, "alice-reader")
        view = await rnode.replica(MAP)
        got: list[int] = []
        consumer = asyncio.ensure_future(collect_versions(view, got))
        last = 0
        resyncs = []
        for i in range(200):
            last = await writer.call("bump")
            if i % 20 == 0:  # while commits keep landing
                resyncs.append(asyncio.ensure_future(rnode.service.resync_all()))
        await asyncio.gather(*resyncs)
        await until(lambda: got[-1:] == [last]
                    and versions(Watcher.seen["alice-reader"])[-1:] == [last])
        await view.close()
        await consumer
    assert got == sorted(set(got))
    seen = versions(Watcher.seen["alice-reader"])
    assert seen == sorted(set(seen))


@pytest.mark.redis
async def test_monotonic_when_pubsub_connections_are_killed(server: RedisServer) -> None:
    options = {"max_retries": 50, "retry_delay": 0.02, "restart_grace": False}
    async with Node(server.url, app="v", **options) as wnode, \
            Node(server.url, app="v", **options) as rnode:
        writer = await wnode.start(Writer, "alice-writer")
        await rnode.start(Watcher, "alice-reader")
        view = await rnode.replica(MAP)
        got: list[int] = []
        consumer = asyncio.ensure_future(collect_versions(view, got))
        last = 0
        killed = 0
        for i in range(300):
            last = await writer.call("bump")
            if i % 30 == 10:
                killed += server.kill_pubsub_clients()
        assert killed >= 5
        # The last commit is published while nobody listens: only the resync
        # after the reconnect brings it (and must tell views and actors).
        assert server.kill_pubsub_clients() == 1
        last = await writer.call("bump")
        await until(lambda: got[-1:] == [last]
                    and versions(Watcher.seen["alice-reader"])[-1:] == [last])
        assert rnode.service.stats.resyncs > 0
        await view.close()
        await consumer
    assert got == sorted(set(got))
    seen = Watcher.seen["alice-reader"]
    assert versions(seen) == sorted(set(versions(seen)))
    assert all(a == b for _, _, a, b in seen)


class Picky(Actor):
    async def init(self) -> None:
        pass

    async def register(self, method: str) -> None:
        self.sharing.add_read_only_map("m", MAP, on_change=method)

    async def sync_method(self) -> None:
        pass

    def not_async(self, alias: str, version: int) -> None:
        pass


@pytest.mark.parametrize("method", ["nope", "_private", "init", "not_async"])
async def test_unknown_on_change_method_is_refused_at_the_call(backend_url: str, app: str,
                                                               method: str) -> None:
    async with Node(backend_url, app=app) as node:
        await node.start(Writer, "alice-writer")
        picky = await node.start(Picky, "alice-picky")
        with pytest.raises(UnknownActorMethodError, match=f"on_change refused: .*{method!r}"):
            await picky.call("register", method)
        await picky.call("register", "sync_method")  # any async method will do


async def test_on_change_survives_a_restart(backend_url: str, app: str) -> None:
    async with Node(backend_url, app=app) as wnode:
        writer = await wnode.start(Writer, "alice-writer")
        async with Node(backend_url, app=app) as rnode:
            await rnode.start(Watcher, "alice-reader")
            await until(lambda: bool(Watcher.seen.get("alice-reader")))
            checkpoint = await rnode.service.load_checkpoint("alice-reader")
            assert checkpoint is not None
            assert checkpoint["maps"]["m"]["on_change"] == "changed"
            assert "on_change" not in checkpoint["maps"]["m2"]  # format as before
        Watcher.seen.clear()
        for _ in range(5):  # while the reader is away
            last = await writer.call("bump")
        async with Node(backend_url, app=app) as rnode:
            await rnode.start(Watcher, "alice-reader")  # resumes from its checkpoint
            await until(lambda: versions(Watcher.seen.get("alice-reader", []))[-1:] == [last])
            last = await writer.call("bump")
            await until(lambda: versions(Watcher.seen["alice-reader"])[-1:] == [last])


class Busy(Watcher):
    gate: ClassVar[asyncio.Event | None] = None

    async def block(self) -> None:
        assert Busy.gate is not None
        await Busy.gate.wait()

    async def noop(self) -> None:
        pass


async def test_full_mailbox_delays_a_notification_without_losing_it(backend_url: str,
                                                                     app: str) -> None:
    async with Node(backend_url, app=app) as wnode, \
            Node(backend_url, app=app, mailbox_size=1) as rnode:
        writer = await wnode.start(Writer, "alice-writer")
        reader = await rnode.start(Busy, "alice-reader")
        await until(lambda: bool(Watcher.seen.get("alice-reader")))
        Busy.gate = asyncio.Event()
        blocked = asyncio.ensure_future(reader.call("block"))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(reader.call("noop"))  # the mailbox is now full
        await asyncio.sleep(0.05)
        for _ in range(3):
            last = await writer.call("bump")
        view = await rnode.replica(MAP)
        await view.wait_for(last, timeout=10)  # landed; the notification waits for room
        await asyncio.sleep(0.05)
        assert versions(Watcher.seen["alice-reader"]) == [1]
        Busy.gate.set()
        await blocked
        await queued
        await until(lambda: versions(Watcher.seen["alice-reader"])[-1:] == [last])
        assert len(Watcher.seen["alice-reader"]) == 2


class AclOwner(Actor):
    async def init(self) -> None:
        self.sharing.add_writable_map("acl", "acl", initial_value={"bob": "read"})

    async def grant(self, who: str, what: str) -> None:
        self.sharing.maps.acl.set(who, what)

    async def link(self, names: list[str]) -> None:
        self.sharing.maps.acl.set("__link_key__", names)


class AclReader(Actor):
    seen: ClassVar[list[tuple[int, list[Any]]]] = []

    async def init(self) -> None:
        self.sharing.add_read_only_map("acl", "alice-acl-acl", aggregate=True,
                                       on_change="acl_changed")

    async def acl_changed(self, alias: str, version: int) -> None:
        AclReader.seen.append((version, self.sharing.maps.acl.get_all("carol")))


async def test_on_change_of_an_aggregate_follows_its_linked_maps(backend_url: str,
                                                                 app: str) -> None:
    AclReader.seen = []
    async with Node(backend_url, app=app) as wnode, Node(backend_url, app=app) as rnode:
        root = await wnode.start(AclOwner, "alice-acl")
        group = await wnode.start(AclOwner, "bob-acl")
        await root.call("link", ["bob-acl-acl"])
        await rnode.start(AclReader, "carol-reader")
        await until(lambda: bool(AclReader.seen))
        await group.call("grant", "carol", "write")  # a linked map, not the first one
        await until(lambda: AclReader.seen[-1][1] == ["write"])
        assert AclReader.seen[-1][0] == 2  # the first map's version


async def test_close_semantics(backend_url: str, app: str) -> None:
    async with Node(backend_url, app=app) as wnode:
        writer = await wnode.start(Writer, "alice-writer")
        rnode = Node(backend_url, app=app)
        await rnode.open()
        async with await rnode.replica(MAP) as view:
            await view.wait_for(timeout=10)
            assert (MAP, False) in rnode.service._replicas
        assert view.closed and (MAP, False) not in rnode.service._replicas
        with pytest.raises(ViewClosedError, match="closed"):
            view.ref()
        with pytest.raises(ViewClosedError):
            await view.wait_for()
        assert [ref async for ref in view.changes()] == []
        await view.close()  # idempotent

        view = await rnode.replica(MAP)
        missing = await rnode.replica("alice-writer-never")
        items: list[int] = []

        async def consume(v: ReplicaView) -> None:
            async for ref in v.changes():
                items.append(ref.version)

        consumers = [asyncio.ensure_future(consume(v)) for v in (view, missing)]
        waiter = asyncio.ensure_future(missing.wait_for())
        version = await writer.call("bump")
        await until(lambda: items[-1:] == [version])
        await rnode.close()  # closes its views
        await asyncio.wait_for(asyncio.gather(*consumers), 5)
        with pytest.raises(ViewClosedError):
            await waiter
        assert view.closed and missing.closed and view.version == -1
        with pytest.raises(Exception, match="not open"):
            await rnode.replica(MAP)


class Early(Actor):
    seen: ClassVar[list[tuple[int, int]]] = []

    async def init(self) -> None:
        self.sharing.add_read_only_map("m", MAP, best_effort=True, on_change="changed")

    async def changed(self, alias: str, version: int) -> None:
        Early.seen.append((version, self.sharing.maps.m.get("n")))


async def test_on_change_of_a_best_effort_map_tells_when_it_appears(backend_url: str,
                                                                    app: str) -> None:
    Early.seen = []
    async with Node(backend_url, app=app) as wnode, Node(backend_url, app=app) as rnode:
        await rnode.start(Early, "alice-early")
        await asyncio.sleep(0.2)
        assert Early.seen == []  # nothing to tell yet, and no error
        writer = await wnode.start(Writer, "alice-writer")  # creates it, publishes nothing
        await until(lambda: Early.seen == [(1, 0)], timeout=5)
        version = await writer.call("bump")
        await until(lambda: Early.seen[-1] == (version, 1))


async def test_threads_read_views_with_no_message(backend_url: str, app: str) -> None:
    async with Node(backend_url, app=app) as wnode, Node(backend_url, app=app) as rnode:
        writer = await wnode.start(Writer, "alice-writer")
        view = await rnode.replica(MAP)
        await view.wait_for(timeout=10)
        stop = threading.Event()
        seen: list[tuple[int, int]] = []

        def read() -> None:
            while not stop.is_set():
                ref = view.ref()
                seen.append((ref.version, ref.get("n")))
                time.sleep(0)  # let the event loop's thread have the GIL too

        thread = threading.Thread(target=read)
        thread.start()
        try:
            for _ in range(200):
                last = await writer.call("bump")
            await view.wait_for(last, timeout=10)
            await asyncio.sleep(0.01)
        finally:
            stop.set()
            await asyncio.to_thread(thread.join)
    assert all(n == version - 1 for version, n in seen), "a torn snapshot"
    versions_seen = [version for version, _ in seen]
    assert versions_seen == sorted(versions_seen) and versions_seen[-1] == last


class Fragile(Actor):
    calls: ClassVar[list[int]] = []

    async def init(self) -> None:
        self.sharing.add_read_only_map("m", MAP, on_change="changed")

    async def changed(self, alias: str, version: int) -> None:
        Fragile.calls.append(version)
        self.state["last"] = version
        if version == 2:
            raise RuntimeError("boom in on_change")

    async def last(self) -> int | None:
        return self.state.get("last")


async def test_a_failing_on_change_aborts_its_message_and_is_logged(
        backend_url: str, app: str, caplog: pytest.LogCaptureFixture) -> None:
    Fragile.calls = []
    async with Node(backend_url, app=app) as wnode, Node(backend_url, app=app) as rnode:
        writer = await wnode.start(Writer, "alice-writer")
        reader = await rnode.start(Fragile, "alice-fragile")
        await until(lambda: Fragile.calls == [1])
        await writer.call("bump")
        await until(lambda: Fragile.calls[-1:] == [2])
        await until(lambda: "boom in on_change" in caplog.text)
        assert await reader.call("last") == 1  # the failed message changed nothing
        version = await writer.call("bump")
        await until(lambda: Fragile.calls[-1:] == [version])
        assert await reader.call("last") == version
    assert "alice-fragile" in caplog.text and "'m'" in caplog.text


class Dropper(Writer):
    async def drop(self) -> None:
        self.sharing.delete_map("m")  # deletes the map, data included

    async def recreate(self) -> None:
        self.sharing.add_writable_map("m", "data", initial_value={"n": 100})


class Follower(Actor):
    seen: ClassVar[list[tuple[int, int | None]]] = []

    async def init(self) -> None:
        self.sharing.add_read_only_map("m", MAP, best_effort=True, on_change="changed")

    async def changed(self, alias: str, version: int) -> None:
        ref = self.sharing.maps.m
        Follower.seen.append((version, None if ref is None else ref.get("n")))


async def test_a_deleted_map_reads_as_missing_and_its_new_life_starts_over(
        backend_url: str, app: str) -> None:
    Follower.seen = []
    async with Node(backend_url, app=app) as wnode, Node(backend_url, app=app) as rnode:
        writer = await wnode.start(Dropper, "alice-writer")
        await rnode.start(Follower, "alice-follower")
        view = await rnode.replica(MAP)
        got: list[tuple[int, int]] = []

        async def consume() -> None:
            async for ref in view.changes():
                got.append((ref.version, ref.get("n")))

        consumer = asyncio.ensure_future(consume())
        version = await writer.call("bump")
        await until(lambda: got[-1:] == [(version, 1)] and Follower.seen[-1:] == [(version, 1)])
        await writer.call("drop")
        await until(lambda: view.version == -1 and Follower.seen[-1] == (-1, None))
        with pytest.raises(MapNotFoundError):
            view.ref()
        await writer.call("recreate")
        # Creating a map publishes nothing: replicas (the view's, the
        # actor's) see the new map at its first write.
        assert await writer.call("bump") == 2
        ref = await view.wait_for(timeout=10)
        assert (ref.version, ref.get("n")) == (2, 101)
        await until(lambda: got[-1:] == [(2, 101)] and Follower.seen[-1] == (2, 101))
        await view.close()
        await consumer
    assert got == [(1, 0), (version, 1), (2, 101)]
