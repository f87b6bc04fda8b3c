"""pytest-benchmark suite of the actor message path and the commit path.

    pytest benchmarks/bench_actors.py --benchmark-enable

Each benchmark times a batch of ``BATCH`` awaits run in one event-loop pass
(an await costs microseconds, less than a loop start), so its figures are
per ``BATCH`` messages or commits:

* ``handle.call`` of a no-op message and of a message setting one key, on
  ``memory://`` and on Redis (a redis-server of the benchmark's own), beside
  a minimal asyncio actor (a queue, a worker task, a future per message): the
  reference of M1 in compare_actors.py;
* a one-key commit straight through the backend (no actor, no Node), on
  ``memory://`` and on Redis: the part of a message the backend costs.

Without --benchmark-enable each runs once, as a smoke test. The pass/fail
ratios (M1, M3) are checked by benchmarks/compare_actors.py.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from caf_sharing import Actor, Node
from caf_sharing.backends import make_backend
from caf_sharing.backends.base import Backend
from compare_actors import MinimalActor, nothing
from compare_redis import transaction
from redisserver import RedisServer

BATCH = 100


class Writer(Actor):
    async def init(self) -> None:
        self.sharing.add_writable_map("m", "m")

    async def put(self, n: int) -> None:
        self.sharing.maps.m.set("n", n)

    async def noop(self) -> None:
        pass


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module", params=["memory", "redis"])
def url(request: pytest.FixtureRequest, server: RedisServer) -> str:
    return f"memory://bench-{uuid.uuid4().hex[:8]}" if request.param == "memory" \
        else server.url


def batch(loop: asyncio.AbstractEventLoop, step: Callable[[int], Awaitable[Any]]
          ) -> Callable[[], None]:
    async def run() -> None:
        for i in range(BATCH):
            await step(i)

    return lambda: loop.run_until_complete(run())


@pytest.fixture(scope="module")
def node(loop: asyncio.AbstractEventLoop, url: str) -> Iterator[Node]:
    node = Node(url, app=f"bench-{uuid.uuid4().hex[:8]}", restart_grace=False) \
        if url.startswith("redis") else Node(url, app="bench")
    loop.run_until_complete(node.open())
    yield node
    loop.run_until_complete(node.close())


def test_minimal_actor_message(benchmark: Any, loop: asyncio.AbstractEventLoop) -> None:
    async def start() -> MinimalActor:
        return MinimalActor(nothing)

    minimal = loop.run_until_complete(start())
    try:
        benchmark(batch(loop, minimal.call))
    finally:
        minimal.stop()


@pytest.mark.parametrize("method", ["noop", "put"])
def test_message(benchmark: Any, loop: asyncio.AbstractEventLoop, node: Node,
                 method: str) -> None:
    handle = loop.run_until_complete(node.start(Writer, f"w{uuid.uuid4().hex[:8]}-{method}"))
    if method == "noop":
        benchmark(batch(loop, lambda _: handle.call(Writer.noop)))
    else:
        benchmark(batch(loop, lambda i: handle.call(Writer.put, i)))
    loop.run_until_complete(node.stop(handle.name))


def test_backend_commit(benchmark: Any, loop: asyncio.AbstractEventLoop, url: str) -> None:
    actor = f"c{uuid.uuid4().hex[:8]}-app"
    backend: Backend = make_backend(url, app="bench-commit", restart_grace=False) \
        if url.startswith("redis") else make_backend(url, app="bench-commit")
    version = 0

    async def setup() -> None:
        await backend.start()
        await backend.acquire_lease(actor, "bench", 600.0)
        await backend.create_map(f"{actor}-m")

    async def commit(_: int) -> None:
        nonlocal version
        await backend.commit(transaction(actor, version))
        version += 1

    loop.run_until_complete(setup())
    try:
        benchmark(batch(loop, commit))
    finally:
        loop.run_until_complete(backend.close())
