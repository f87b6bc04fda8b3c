"""Actors on Redis while Redis misbehaves: restarts, outages, dropped pub/sub."""

from __future__ import annotations

import asyncio

import pytest

from caf_sharing import Actor, Node
from caf_sharing.errors import BackendUnavailableError
from conftest import until_version
from redisserver import RedisServer

pytestmark = pytest.mark.redis

# A short lease: each test starts its own server, and a node takes a lease on
# a server younger than one lease only once it is that old.
FAST = {"max_retries": 2, "retry_delay": 0.05, "lease_ttl": 1.5}


class Writer(Actor):
    async def init(self) -> None:
        self.sharing.add_writable_map("m", "m", initial_value={"n": 0})
        self.state["n"] = 0

    async def bump(self) -> int:
        ref = self.sharing.maps.m
        n = ref.get("n") + 1
        ref.set("n", n).set(f"k{n}", n)
        self.state["n"] = n
        return ref.version + 1

    async def read(self) -> tuple[int, int, int]:
        return self.sharing.maps.m.version, self.sharing.maps.m.get("n"), self.state["n"]


class Reader(Actor):
    async def init(self) -> None:
        self.sharing.add_read_only_map("m", "ann-writer-m")

    async def read(self) -> tuple[int, int]:
        return self.sharing.maps.m.version, self.sharing.maps.m.get("n")


async def test_redis_restarted_empty(server: RedisServer) -> None:
    async with Node(server.url, app="f", **FAST) as wnode, \
            Node(server.url, app="f", **FAST) as rnode:
        writer = await wnode.start(Writer, "ann-writer")
        reader = await rnode.start(Reader, "ann-reader")
        for _ in range(3):
            version = await writer.call("bump")
        assert await until_version(reader, version) == (version, 3)
        server.restart()  # no persistence: every map, checkpoint and lease is gone
        await asyncio.sleep(0.3)
        # The replica keeps what it had: a resync that finds nothing never rolls back.
        await rnode.service.resync_all()
        assert await reader.call("read") == (version, 3)
        # The writer's next commit re-creates the map from its own state.
        async with asyncio.timeout(15):
            while True:
                try:
                    after = await writer.call("bump")
                    break
                except BackendUnavailableError:
                    await asyncio.sleep(0.1)
        assert after == version + 1
        assert await until_version(reader, after) == (after, 4)
        assert await writer.call("read") == (after, 4, 4)
        stored = await wnode.backend.read_map("ann-writer-m")
        assert stored is not None and len(stored["add"]) == 2 * 6  # n, k1..k4, version


async def test_commit_while_redis_is_down(server: RedisServer) -> None:
    async with Node(server.url, app="f", **FAST) as node:
        writer = await node.start(Writer, "ann-writer")
        version = await writer.call("bump")
        server.stop()
        with pytest.raises(BackendUnavailableError) as info:
            await writer.call("bump")
        assert "redis://" in str(info.value) and "Traceback" not in str(info.value)
        # Nothing half-applied: the actor's state and map are as before.
        assert writer.actor.state == {"n": 1}
        server.start()
        async with asyncio.timeout(15):
            while True:
                try:
                    assert await writer.call("read") == (version, 1, 1)
                    break
                except BackendUnavailableError:
                    await asyncio.sleep(0.1)
        assert await writer.call("bump") == version + 1
        assert await writer.call("read") == (version + 1, 2, 2)


async def test_pubsub_killed_while_commits_continue(server: RedisServer) -> None:
    async with Node(server.url, app="f", lease_ttl=1.5) as wnode, \
            Node(server.url, app="f", lease_ttl=1.5) as rnode:
        writer = await wnode.start(Writer, "ann-writer")
        readers = [await rnode.start(Reader, f"ann-r{i}") for i in range(3)]
        seen: list[list[int]] = [[] for _ in readers]
        for i in range(40):
            version = await writer.call("bump")
            if i % 10 == 5:
                assert await asyncio.to_thread(server.kill_pubsub_clients) >= 1
            for handle, history in zip(readers, seen, strict=True):
                history.append((await handle.call("read"))[0])
        for handle, history in zip(readers, seen, strict=True):
            history.append((await until_version(handle, version))[0])
            assert history == sorted(history), "a replica went back in time"
            assert history[-1] == version
        assert rnode.service.stats.resyncs >= 1
