"""The five guarantees, checked at actor level on every backend."""

from __future__ import annotations

import asyncio
import random

import pytest

from caf_sharing import Actor, Node
from caf_sharing.errors import LeaseHeldError
from caf_sharing.lineage import ADOPT_MARGIN
from conftest import until_version

pytestmark = pytest.mark.asyncio


class Writer(Actor):
    async def init(self) -> None:
        self.sharing.add_writable_map("m", "data", initial_value={"a": 0, "b": 0})
        self.state["commits"] = 0

    async def bump(self) -> int:
        ref = self.sharing.maps.m
        n = ref.get("a") + 1
        ref.set("a", n).set("b", n)
        self.state["commits"] += 1
        return ref.version + 1

    async def bump_then_fail(self, n: int) -> None:
        ref = self.sharing.maps.m
        ref.set("a", n)
        await asyncio.sleep(0)
        ref.set("b", n).set("c", "partial")
        self.state["commits"] = -1
        raise RuntimeError("boom after writes")

    async def read(self) -> tuple[int, int, int]:
        ref = self.sharing.maps.m
        return ref.version, ref.get("a"), ref.get("b")


class Reader(Actor):
    gate: asyncio.Event | None = None

    async def init(self) -> None:
        self.sharing.add_read_only_map("m", "alice-writer-data")

    async def read(self) -> tuple[int, int, int, bool]:
        ref = self.sharing.maps.m
        return ref.version, ref.get("a"), ref.get("b"), "c" in ref

    async def read_across_await(self, gate_wait: float) -> tuple[tuple, tuple]:
        before = self.sharing.maps.m
        first = (before.version, before.get("a"))
        assert Reader.gate is not None
        await asyncio.wait_for(Reader.gate.wait(), gate_wait)
        after = self.sharing.maps.m
        return first, (after.version, after.get("a"))


async def test_isolation_across_awaits_and_fairness(backend_url, app) -> None:
    async with Node(backend_url, app=app) as wnode, Node(backend_url, app=app) as rnode:
        writer = await wnode.start(Writer, "alice-writer")
        reader = await rnode.start(Reader, "alice-reader")
        other = await rnode.start(Reader, "alice-other")
        v1 = await writer.call("bump")
        await until_version(other, v1)
        Reader.gate = asyncio.Event()
        pending = asyncio.ensure_future(reader.call("read_across_await", 10.0))
        await asyncio.sleep(0.01)
        v2 = await writer.call("bump")
        await until_version(other, v2)  # the replica has moved on...
        Reader.gate.set()
        first, after = await pending
        assert first == after == (v1, 1)  # ...but not inside the running message
        assert (await reader.call("read"))[:2] == (v2, 2)  # the next message sees it


async def test_writer_atomicity(backend_url, app) -> None:
    async with Node(backend_url, app=app) as wnode, Node(backend_url, app=app) as rnode:
        writer = await wnode.start(Writer, "alice-writer")
        reader = await rnode.start(Reader, "alice-reader")
        version = await writer.call("bump")
        with pytest.raises(RuntimeError, match="boom after writes"):
            await writer.call("bump_then_fail", 99)
        assert await writer.call("read") == (version, 1, 1)
        assert writer.actor.state == {"commits": 1}
        after = await writer.call("bump")
        assert after == version + 1
        seen = await until_version(reader, after)
        assert seen == (after, 2, 2, False)


async def test_monotonic_reads_many_readers(backend_url, app) -> None:
    commits = 60
    async with Node(backend_url, app=app) as wnode, Node(backend_url, app=app) as rnode:
        writer = await wnode.start(Writer, "alice-writer")
        readers = [await rnode.start(Reader, f"alice-r{i}") for i in range(6)]
        stop = asyncio.Event()
        histories: list[list[tuple]] = [[] for _ in readers]

        async def poll(handle, history) -> None:
            while not stop.is_set():
                history.append(await handle.call("read"))
                await asyncio.sleep(random.random() / 500)

        tasks = [asyncio.ensure_future(poll(h, hist))
                 for h, hist in zip(readers, histories, strict=True)]
        last = 0
        for _ in range(commits):
            last = await writer.call("bump")
        for handle, history in zip(readers, histories, strict=True):
            history.append(await until_version(handle, last))
        stop.set()
        await asyncio.gather(*tasks)
    for history in histories:
        versions = [h[0] for h in history]
        assert versions == sorted(versions), "a reader went back in time"
        for _version, a, b, partial in history:
            assert a == b and not partial, "a partial commit leaked"
        assert history[-1][0] == last


async def test_second_node_cannot_take_a_leased_actor(backend_url, app) -> None:
    async with Node(backend_url, app=app, node_id="n1", lease_ttl=0.6) as n1:
        await n1.start(Writer, "alice-writer")
        async with Node(backend_url, app=app, node_id="n2", lease_ttl=0.6) as n2:
            with pytest.raises(LeaseHeldError, match="n1"):
                await n2.start(Writer, "alice-writer")
            await asyncio.sleep(1.0)  # n1 keeps renewing
            with pytest.raises(LeaseHeldError):
                await n2.start(Writer, "alice-writer")


async def test_lease_taken_after_expiry_and_old_node_fenced(backend_url, app) -> None:
    n1 = Node(backend_url, app=app, node_id="n1", lease_ttl=0.5)
    await n1.open()
    w1 = await n1.start(Writer, "alice-writer")
    version = await w1.call("bump")
    assert n1._renewer is not None
    n1._renewer.cancel()  # n1 hangs: it stops renewing but keeps running
    await asyncio.sleep(0.8)
    async with Node(backend_url, app=app, node_id="n2", lease_ttl=5) as n2:
        w2 = await n2.start(Writer, "alice-writer")
        # n2 adopts the map and renumbers it above every version n1 made.
        adopted, a, b = await w2.call("read")
        assert adopted >= version + ADOPT_MARGIN and (a, b) == (1, 1)
        assert w2.actor.state == {"commits": 1}
        v2 = await w2.call("bump")
        # n1 wakes up and tries to write: fenced off, nothing stored.
        with pytest.raises(Exception) as info:
            await w1.call("bump")
        assert type(info.value).__name__ in {"LeaseLostError", "ConcurrentUpdateError"}
        assert await w2.call("read") == (v2, 2, 2)
    await n1.close()


async def test_restart_resumes_from_checkpoint(backend_url, app) -> None:
    async with Node(backend_url, app=app) as node:
        writer = await node.start(Writer, "alice-writer")
        for _ in range(3):
            version = await writer.call("bump")
    async with Node(backend_url, app=app) as node:
        writer = await node.start(Writer, "alice-writer")
        assert writer.actor.state == {"commits": 3}
        adopted, a, b = await writer.call("read")
        assert adopted >= version + ADOPT_MARGIN and (a, b) == (3, 3)
        assert await writer.call("bump") == adopted + 1


@pytest.fixture
def app(backend_factory) -> str:
    return backend_factory.app


class AclOwner(Actor):
    async def init(self) -> None:
        self.sharing.add_writable_map("acl", "acl", initial_value={"bob": "read"})

    async def link(self, *names: str) -> None:
        self.sharing.maps.acl.set("__link_key__", list(names))

    async def grant(self, who: str, right: str) -> None:
        self.sharing.maps.acl.set(who, right)


class AclChecker(Actor):
    async def init(self) -> None:
        self.sharing.add_read_only_map("acl", "alice-acl-acl", aggregate=True)

    async def rights(self, who: str) -> list[str]:
        return sorted(self.sharing.maps.acl.get_all(who))


async def test_aggregate_maps_follow_links(backend_url, app) -> None:
    async with Node(backend_url, app=app) as wnode, Node(backend_url, app=app) as rnode:
        alice = await wnode.start(AclOwner, "alice-acl")
        group = await wnode.start(AclOwner, "team-acl")
        await alice.call("link", "team-acl-acl", "nobody-acl-acl")  # one link missing
        checker = await rnode.start(AclChecker, "carol-check")
        async with asyncio.timeout(10):
            while await checker.call("rights", "bob") != ["read", "read"]:
                await asyncio.sleep(0.01)
        await group.call("grant", "bob", "write")
        async with asyncio.timeout(10):
            while await checker.call("rights", "bob") != ["read", "write"]:
                await asyncio.sleep(0.01)
        await rnode.stop("carol-check")
        assert not rnode.service._replicas  # every linked replica released


async def test_actor_moves_between_nodes_and_back(backend_url, app) -> None:
    async with Node(backend_url, app=app, node_id="a") as a, \
            Node(backend_url, app=app, node_id="b") as b:
        w = await a.start(Writer, "alice-writer")
        v1 = await w.call("bump")
        await a.stop("alice-writer")
        w = await b.start(Writer, "alice-writer")
        v2 = await w.call("bump")
        v3 = await w.call("bump")
        await b.stop("alice-writer")
        # Back on the first node: it must not write from its old copy of the map.
        w = await a.start(Writer, "alice-writer")
        adopted, x, y = await w.call("read")
        assert adopted >= v3 + ADOPT_MARGIN and (x, y) == (3, 3)
        assert await w.call("bump") == adopted + 1
        assert v1 < v2 < v3
