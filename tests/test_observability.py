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
from caf_sharing.errors import LeaseHeldError
from caf_sharing.metrics import Observer
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
        register(wnode, rnode, registry=registry)
        with pytest.raises(ValueError, match="Duplicated"):
            register(wnode, registry=registry)  # one collector of these names
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
    # Each family once, with a sample per node.
    assert text.count("# TYPE caf_sharing_commits_total counter") == 1


async def test_a_demo_run_exports_live_figures() -> None:
    from caf_sharing.demo import run_demo

    result = await run_demo("memory://", readers=2, commits=20, metrics=True)
    assert result.ok
    text = result.metrics
    assert 'caf_sharing_commits_total{node_id="demo-writer"} 21.0' in text  # init too
    assert 'caf_sharing_propagation_lag_seconds_count{map="alice-admin-counter",' \
           'node_id="demo-readers"} 20.0' in text


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
    fields = [(getattr(r, "node_id", None), getattr(r, "app", None),
               getattr(r, "actor", None)) for r in records]
    assert ("n-logs", "logs", "obs-writer") in fields and ("n-logs", "logs", None) in fields
    started = next(r for r in records if "started" in r.getMessage())
    assert isinstance(started.txid, str)


class Recorder(Observer):
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def on_commit(self, actor: str, txid: str, seconds: float) -> None:
        self.events.append(("commit", actor, txid, seconds >= 0))

    def on_abort(self, actor: str, error: BaseException) -> None:
        self.events.append(("abort", actor, str(error)))

    def on_apply(self, map_name: str, version: int, lag: float | None) -> None:
        self.events.append(("apply", map_name, version, lag is not None and lag >= 0))

    def on_resync(self, map_name: str) -> None:
        self.events.append(("resync", map_name))

    def on_lease_lost(self, actor: str) -> None:
        self.events.append(("lost", actor))


class Broken(Observer):
    def on_commit(self, actor: str, txid: str, seconds: float) -> None:
        raise RuntimeError("observer bug")


async def test_an_observer_hears_commits_aborts_applies_resyncs_and_lost_leases(
        backend_url: str, app: str, caplog: pytest.LogCaptureFixture) -> None:
    seen_w, seen_r = Recorder(), Recorder()
    async with Node(backend_url, app=app, observer=seen_w, lease_ttl=0.6) as wnode, \
            Node(backend_url, app=app, observer=seen_r) as rnode:
        writer = await wnode.start(Writer, "obs-writer")
        await rnode.start(Reader, "obs-reader")
        version = await writer.call("put", 1)
        with pytest.raises(RuntimeError):
            await writer.call("fail")
        await until(lambda: ("apply", "obs-writer-m", version, True) in seen_r.events)
        await rnode.service.resync_all()
        assert ("resync", "obs-writer-m") in seen_r.events
        # Another node takes the writer's lease: the writer's node hears it.
        async with asyncio.timeout(10):
            while True:  # the writer's renewals may take it back in between
                await wnode.backend.release_lease("obs-writer", wnode.node_id)
                try:
                    await rnode.backend.acquire_lease("obs-writer", "intruder", 1.0)
                    break
                except LeaseHeldError:
                    await asyncio.sleep(0.01)
        await until(lambda: ("lost", "obs-writer") in seen_w.events)
    commits = [e for e in seen_w.events if e[0] == "commit"]
    assert [e[1] for e in commits] == ["obs-writer", "obs-writer"] and all(e[3] for e in commits)
    assert ("abort", "obs-writer", "rolled back") in seen_w.events
    # A failing observer is logged, never passed on to the message.
    async with Node("memory://", app="broken", observer=Broken()) as node:
        handle = await node.start(Writer, "obs-writer")
        assert await handle.call("put", 1) == 1
    assert "observer" in caplog.text and "observer bug" in caplog.text
