"""node.stats(), the Prometheus export of the same, and the structured fields
and DEBUG lifecycle records of the logs."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from caf_sharing import Actor, Node
from caf_sharing.prometheus import register
from redisserver import RedisServer


class Writer(Actor):
    async def init(self) -> None:
        self.sharing.add_writable_map("m", "m")

    async def put(self, n: int) -> int:
        self.sharing.maps.m.set("n", n)
        return self.sharing.maps.m.version + 1

    async def fail(self) -> None:
        self.sharing.maps.m.set("n", -1)
        raise RuntimeError("rolled back")

    async def slow(self) -> None:
        await asyncio.sleep(0.2)


class Reader(Actor):
    async def init(self) -> None:
        self.sharing.add_read_only_map("m", "obs-writer-m")

    async def read(self) -> int:
        return self.sharing.maps.m.version


@pytest.fixture
def app(backend_factory: Any) -> str:
    return str(backend_factory.app)


async def until(predicate: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_stats_count_commits_aborts_latency_lag_mailboxes_and_renewals(
        backend_url: str, app: str) -> None:
    async with Node(backend_url, app=app, lease_ttl=0.6) as wnode, \
            Node(backend_url, app=app, lease_ttl=0.6) as rnode:
        writer = await wnode.start(Writer, "obs-writer")
        await rnode.start(Reader, "obs-reader")
        for n in range(5):
            await writer.call("put", n)
        with pytest.raises(RuntimeError):
            await writer.call("fail")
        slow = [asyncio.ensure_future(writer.call("slow")) for _ in range(3)]
        await asyncio.sleep(0.05)
        stats = wnode.stats()
        assert stats.node_id == wnode.node_id
        assert stats.commits == 6  # init and five puts; slow and fail change nothing
        assert stats.aborts == 1 and stats.commit_failures == 0
        assert stats.commit_latency["count"] == 6
        assert 0 < stats.commit_latency["p50"] <= stats.commit_latency["max"] < 5
        assert stats.commit_latency["buckets"][-1] == ("+Inf", 6)
        assert stats.mailbox_depth["obs-writer"] >= 1  # the slow messages queue
        await asyncio.gather(*slow)
        await until(lambda: rnode.stats().propagation_lag.get("obs-writer-m", {})
                    .get("count", 0) >= 5)
        lag = rnode.stats().propagation_lag["obs-writer-m"]
        assert 0 <= lag["p50"] <= lag["max"] < 5
        await until(lambda: wnode.stats().lease_renewals >= 2)
        assert wnode.stats().leases_lost == 0
        assert isinstance(wnode.stats().retries, int)


async def test_retries_are_counted(server: RedisServer) -> None:
    async with Node(server.url, app=f"r{uuid.uuid4().hex[:8]}", restart_grace=False) as node:
        writer = await node.start(Writer, "obs-writer")
        first = await writer.call("put", 1)
        with server.client() as client:
            client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        assert await writer.call("put", 2) == first + 1  # the lost connection is retried
        stats = node.stats()
        assert stats.retries >= 1 and stats.backend["retries"] == stats.retries
        assert stats.backend["commits"] >= 3


async def test_prometheus_exposition(backend_url: str, app: str) -> None:
    registry = CollectorRegistry()
    async with Node(backend_url, app=app) as wnode, Node(backend_url, app=app) as rnode:
        register(wnode, registry)
        register(rnode, registry)
        writer = await wnode.start(Writer, "obs-writer")
        reader = await rnode.start(Reader, "obs-reader")
        for n in range(3):
            await writer.call("put", n)
        await until(lambda: rnode.stats().propagation_lag.get("obs-writer-m", {})
                    .get("count", 0) >= 3)
        assert await reader.call("read") >= 3
        text = generate_latest(registry).decode()
    w, r = wnode.node_id, rnode.node_id
    assert f'caf_sharing_commits_total{{node_id="{w}"}} 4.0' in text
    assert f'caf_sharing_commit_latency_seconds_count{{node_id="{w}"}} 4.0' in text
    assert f'caf_sharing_commit_latency_seconds_bucket{{le="+Inf",node_id="{w}"}} 4.0' in text
    assert f'caf_sharing_propagation_lag_seconds_count{{map="obs-writer-m",node_id="{r}"}}' \
        in text
    assert f'caf_sharing_mailbox_depth{{actor="obs-writer",node_id="{w}"}} 0.0' in text
    assert "# TYPE caf_sharing_propagation_lag_seconds histogram" in text
    assert f'caf_sharing_leases_lost_total{{node_id="{r}"}} 0.0' in text


async def test_lifecycle_is_logged_at_debug_with_structured_fields(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="caf_sharing.node"):
        async with Node("memory://", app="logs", node_id="n-logs") as node:
            await node.start(Writer, "obs-writer")
            await node.stop("obs-writer")
    records = [r for r in caplog.records if r.name == "caf_sharing.node"]
    messages = [r.getMessage() for r in records]
    assert any("node n-logs open on memory://" in m for m in messages)
    assert any("actor obs-writer started on node n-logs" in m for m in messages)
    assert any("actor obs-writer stopped on node n-logs" in m for m in messages)
    assert any("node n-logs closed" in m for m in messages)
    fields = [(getattr(r, "caf_node_id", None), getattr(r, "caf_app", None),
               getattr(r, "caf_actor", None)) for r in records]
    assert ("n-logs", "logs", "obs-writer") in fields and ("n-logs", "logs", None) in fields
