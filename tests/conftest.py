"""Shared fixtures: a real redis-server and started backends of every kind.

* ``server``: a server of the test's own (it may stop, restart, lose data).
* ``redis_server`` (session): a :class:`tests.redisserver.RedisServer` on a
  free port. Without a redis-server binary the tests that need it are
  skipped — or fail when the environment variable CI is "true", so CI never
  passes by skipping them.
* ``redis_cluster`` (session): a :class:`tests.rediscluster.RedisCluster` of
  3 masters, no replicas (also needs redis-cli). Tests share it and may
  migrate slots, so they ask it who owns a slot; they must not kill nodes.
* ``cluster6``: 3 masters with a replica each, fresh for the test, which may
  fail over, kill or freeze nodes.
* ``backend_kind``: parametrizes a test over ``"memory"``, ``"redis"`` and
  ``"cluster"`` (the shared ``redis_cluster``).
* ``backend_factory``: ``await backend_factory(kind, **options)`` returns a
  new started backend; all backends of one test share one store (a unique
  ``memory://`` name, or a unique ``app`` namespace on the shared Redis), so
  two of them act as two nodes. They are closed, and the memory store
  dropped, at teardown.
* ``backend``: one started backend of ``backend_kind``.
* ``backend_url``: the URL the factory uses for ``backend_kind``.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from caf_sharing.backends import Backend, MemoryStore, make_backend
from rediscluster import RedisCluster, find_redis_cli
from redisserver import RedisServer, find_redis_server

BACKEND_KINDS = ["memory", pytest.param("redis", marks=pytest.mark.redis),
                 pytest.param("cluster", marks=pytest.mark.redis)]


async def until_version(handle: Any, version: int, timeout: float = 15.0) -> Any:
    """Call ``read`` on an actor until the version it reports reaches ``version``."""
    async with asyncio.timeout(timeout):
        while True:
            seen = await handle.call("read")
            if seen[0] >= version:
                return seen
            await asyncio.sleep(0.005)


def _require(found: str | None, reason: str) -> None:
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI must run the Redis tests")
        pytest.skip(reason)


def require_redis_server() -> None:
    """Skip the calling test when redis-server is missing (fail under CI)."""
    _require(find_redis_server(),
             "redis-server is not on PATH (Debian: apt-get install redis-server)")


def require_redis_cli() -> None:
    """Skip the calling test when redis-cli is missing (fail under CI)."""
    _require(find_redis_cli(), "redis-cli is not on PATH (Debian: apt-get install redis-tools)")


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A redis-server of this test's own, for tests that stop, restart or
    empty it."""
    require_redis_server()
    with RedisServer() as started:
        yield started


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    require_redis_server()
    server = RedisServer()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    require_redis_server()
    require_redis_cli()
    with RedisCluster(masters=3) as cluster:
        yield cluster


@pytest.fixture
def cluster6() -> Iterator[RedisCluster]:
    require_redis_server()
    require_redis_cli()
    with RedisCluster(masters=3, replicas_per_master=1) as cluster:
        yield cluster


@pytest.fixture(params=BACKEND_KINDS)
def backend_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


class BackendFactory:
    """Makes started backends that share one store; closes them all."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._request = request
        unique = uuid.uuid4().hex[:12]
        self.store_name = f"test-{unique}"
        self.app = f"t{unique}"
        self.backends: list[Backend] = []

    def url(self, kind: str) -> str:
        if kind == "memory":
            return f"memory://{self.store_name}"
        if kind == "redis":
            server: RedisServer = self._request.getfixturevalue("redis_server")
            return server.url
        if kind == "cluster":
            cluster: RedisCluster = self._request.getfixturevalue("redis_cluster")
            return cluster.url
        raise ValueError(f"unknown backend kind {kind!r}")

    async def __call__(self, kind: str, **options: Any) -> Backend:
        backend = make_backend(self.url(kind), app=self.app, **options)
        await backend.start()
        self.backends.append(backend)
        return backend

    async def close(self) -> None:
        for backend in reversed(self.backends):
            await backend.close()
        self.backends.clear()
        MemoryStore.drop(self.store_name)


@pytest.fixture
async def backend_factory(request: pytest.FixtureRequest) -> AsyncIterator[BackendFactory]:
    factory = BackendFactory(request)
    yield factory
    await factory.close()


@pytest.fixture
async def backend(backend_factory: BackendFactory, backend_kind: str) -> Backend:
    return await backend_factory(backend_kind)


@pytest.fixture
def backend_url(backend_factory: BackendFactory, backend_kind: str) -> str:
    return backend_factory.url(backend_kind)
