"""Durability against real servers: replica acknowledgement (``WAIT``),
failover behind a relay, time-outs that fit a lease, the eviction-policy
warning and the options that set them up.

Replication tests run a primary and a replica (``--replicaof``) of their own,
reached through :class:`relay.Relay` when the test moves, silences or cuts
the connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from caf_sharing import Actor, Node
from caf_sharing.backends import MapCreate, MapWrite, make_backend, parse_url
from caf_sharing.backends.redis import RedisBackend
from caf_sharing.errors import (
    BackendError,
    BackendUnavailableError,
    ConfigError,
    DurabilityError,
    SharingError,
)
from conftest import require_redis_server
from failover import PRIMARY_ARGS, fail_over_while_writing, start_replica
from redisserver import RedisServer
from relay import Relay
from test_backend_contract import ACTOR, MAP, NODE, V, as_dict, changes, dump, tx

pytestmark = pytest.mark.redis


@pytest.fixture
def pair() -> Iterator[tuple[RedisServer, RedisServer]]:
    """A primary and its replica, both this test's own."""
    require_redis_server()
    primary = RedisServer(PRIMARY_ARGS)
    primary.start()
    replica = start_replica(primary.port)
    yield primary, replica
    replica.cleanup()
    primary.cleanup()


@pytest.fixture
def relay(pair: tuple[RedisServer, RedisServer]) -> Iterator[Relay]:
    """A relay to the pair's primary."""
    with Relay(pair[0].port) as made:
        yield made


class Opened:
    """Backends of one test, on one app namespace; closed at teardown."""

    def __init__(self) -> None:
        self.app = f"d{uuid.uuid4().hex[:12]}"
        self.backends: list[RedisBackend] = []

    async def __call__(self, url: str, **options: Any) -> RedisBackend:
        # restart_grace off: each server here is new, and no lease is lost.
        backend = make_backend(url, app=self.app, **{"restart_grace": False, **options})
        assert isinstance(backend, RedisBackend)
        await backend.start()
        self.backends.append(backend)
        return backend

    def key(self, what: str, actor: str = ACTOR) -> str:
        return f"caf:{self.app}:{{{actor}}}:{what}"


@pytest.fixture
async def opened() -> AsyncIterator[Opened]:
    made = Opened()
    yield made
    for backend in made.backends:
        await backend.close()


def write(n: int) -> Any:
    """Commit ``n`` of a chain that sets key ``k<n>`` of MAP."""
    return tx(f"t{n}", prev=f"t{n - 1}" if n else None,
              writes=[MapWrite(MAP, changes(n, {f"k{n}": n}))])


def wait_calls(server: RedisServer) -> int:
    with server.client() as client:
        stats = client.info("commandstats").get("cmdstat_wait", {"calls": 0})
        calls: int = stats["calls"]
        return calls


# -- replica acknowledgement ----------------------------------------------------


async def test_commits_wait_for_the_replica_with_one_wait_per_batch(
        pair: tuple[RedisServer, RedisServer], opened: Opened) -> None:
    primary, replica = pair
    backend = await opened(primary.url, wait_replicas=1, wait_timeout_ms=2000)
    actors = [f"ann-w{i}" for i in range(40)]
    for actor in actors:
        await backend.acquire_lease(actor, NODE, 30.0)
    waits = wait_calls(primary)
    outcomes = await asyncio.gather(*(backend.commit(tx(
        "t0", actor=actor, creates=[MapCreate(f"{actor}-m", dump(1, {"a": actor}))]))
        for actor in actors))
    assert outcomes == [True] * len(actors)
    # Group commit still batches: one WAIT ends each round trip.
    assert backend.stats.round_trips < len(actors)
    assert wait_calls(primary) - waits == backend.stats.round_trips
    # Acknowledged means on the replica, the moment the commit returns.
    with replica.client() as client:
        for actor in actors:
            assert client.hget(opened.key(f"map:{actor}-m", actor), "a") == f'"{actor}"'.encode()


async def test_a_frozen_replica_makes_commits_raise_durability_error_in_time(
        pair: tuple[RedisServer, RedisServer], opened: Opened) -> None:
    primary, replica = pair
    backend = await opened(primary.url, wait_replicas=1, wait_timeout_ms=300)
    await backend.acquire_lease(ACTOR, NODE, 30.0)
    await backend.create_map(MAP)
    assert await backend.commit(write(0)) is True
    replica.freeze()
    try:
        started = time.monotonic()
        with pytest.raises(DurabilityError) as raised:
            await backend.commit(write(1))
        assert time.monotonic() - started < 2.0
    finally:
        replica.thaw()
    error = raised.value
    assert isinstance(error, BackendError) and backend.stats.unconfirmed == 1
    assert (error.required, error.confirmed) == (1, 0)
    assert "ambiguous" in str(error) and "0 of 1 replica" in str(error)
    # Ambiguous, not failed: the primary holds the commit.
    checkpoint = await backend.load_checkpoint(ACTOR)
    assert checkpoint is not None and checkpoint["txid"] == "t1"
    # With the replica back the next commit is acknowledged, and WAIT covered
    # the earlier one too (replication is in order).
    assert await backend.commit(write(2)) is True
    with replica.client() as client:
        assert client.hget(opened.key(f"map:{MAP}"), "k1") == b"1"


async def test_a_commit_whose_reply_was_lost_is_still_checked_by_wait(
        pair: tuple[RedisServer, RedisServer], relay: Relay, opened: Opened) -> None:
    primary, replica = pair
    backend = await opened(relay.url, wait_replicas=1, wait_timeout_ms=300,
                           socket_timeout=2.0, max_retries=3, retry_delay=0.05)
    await backend.acquire_lease(ACTOR, NODE, 30.0)
    await backend.create_map(MAP)
    assert await backend.commit(write(0)) is True
    replica.freeze()
    try:
        relay.drop_replies()
        commit = asyncio.create_task(backend.commit(write(1)))
        with primary.client() as client:
            async with asyncio.timeout(5):
                while client.hget(opened.key("cp"), "txid") != b"t1":
                    await asyncio.sleep(0.005)
        # The reply is lost with its connection: the retry finds the commit
        # there already and writes nothing. WAIT on that new connection alone
        # would count the frozen replica; the commit must still not pass.
        relay.forward()
        relay.cut()
        with pytest.raises(DurabilityError):
            await commit
    finally:
        replica.thaw()
    assert await backend.commit(write(2)) is True


async def test_with_fewer_replicas_than_asked_every_commit_is_ambiguous(
        pair: tuple[RedisServer, RedisServer], opened: Opened) -> None:
    backend = await opened(pair[0].url, wait_replicas=2, wait_timeout_ms=100)
    await backend.acquire_lease(ACTOR, NODE, 30.0)
    await backend.create_map(MAP)
    with pytest.raises(DurabilityError) as raised:
        await backend.commit(write(0))
    assert (raised.value.required, raised.value.confirmed) == (2, 1)
    # Refused commits say why they were refused, not that they are ambiguous.
    with pytest.raises(SharingError) as refused:
        await backend.commit(tx("t9", prev="nope", writes=[MapWrite(MAP, changes(1))]))
    assert not isinstance(refused.value, DurabilityError)


@pytest.mark.slow
@pytest.mark.parametrize("wait", [True, False], ids=["wait_replicas", "async"])
async def test_failover_with_a_lagging_replica_loses_no_acknowledged_commit(
        wait: bool) -> None:
    require_redis_server()
    options = {"wait_replicas": 1, "wait_timeout_ms": 200} if wait else {}
    run = await fail_over_while_writing(lag=0.6, **options)
    assert len(run.acked) > 10, "the writer committed before the failover"
    if wait:
        assert run.lost == set()
        assert run.ambiguous > 0, "commits made while the replica lagged were acknowledged"
    else:
        # Without WAIT the promoted replica lacks the last commits, but the
        # writer's node survived and puts back what it holds (lineage).
        assert run.lost == set() and run.ambiguous == 0
        assert run.reasserts >= 1, "the promoted replica had everything: not a lagging one"


# -- time-outs ------------------------------------------------------------------


class Counter(Actor):
    async def init(self) -> None:
        self.sharing.add_writable_map("m", "m", initial_value={"n": 0})

    async def bump(self) -> int:
        ref = self.sharing.maps.m
        n: int = ref.get("n") + 1
        ref.set("n", n)
        return n


@pytest.mark.slow
async def test_blackholed_redis_fails_a_message_quickly_and_close_fits_the_lease() -> None:
    require_redis_server()
    ttl = 10.0
    with RedisServer() as server, Relay(server.port) as relay:
        # Default time-outs; restart_grace off, since the server is new.
        node = Node(relay.url, app="bh", lease_ttl=ttl, restart_grace=False)
        await node.open()
        counter = await node.start(Counter, "ann-count")
        for i in range(4):  # more actors: close() releases their leases together
            await node.start(Counter, f"ann-more{i}")
        assert await counter.call("bump") == 1
        relay.blackhole()
        started = time.monotonic()
        with pytest.raises(BackendUnavailableError):
            await counter.call("bump")
        assert time.monotonic() - started < 5.0
        started = time.monotonic()
        await node.close()
        assert time.monotonic() - started < ttl


async def test_round_trips_carrying_much_get_time_for_it(opened: Opened) -> None:
    require_redis_server()
    with RedisServer() as server:
        # 0.1 s is far less than a 6 MB commit or a 100k-field read takes:
        # only the allowance for what a round trip carries lets them pass.
        backend = await opened(server.url, socket_timeout=0.1, call_timeout=0.1,
                               read_chunk_size=1_000_000)
        items = {f"key{i}": {"v": i, "s": "x" * 20} for i in range(100_000)}
        await backend.acquire_lease(ACTOR, NODE, 30.0)
        assert await backend.commit(tx("t0", creates=[MapCreate(MAP, dump(1, items))]))
        assert len(as_dict(await backend.read_map(MAP))) == len(items) + 1
        # Chunked reads stay small round trips.
        chunked = await opened(server.url, socket_timeout=0.1, call_timeout=0.1)
        assert as_dict(await chunked.read_map(MAP)) == {**items, V: 1}
        assert chunked.stats.chunked_reads == 1


# -- eviction policy --------------------------------------------------------------


POLICY_LOG = "caf_sharing.backends.redis"


async def test_a_server_that_may_evict_is_warned_about_once(
        opened: Opened, caplog: pytest.LogCaptureFixture) -> None:
    require_redis_server()
    with RedisServer(["--maxmemory-policy", "allkeys-lru"]) as server:
        caplog.set_level(logging.DEBUG, POLICY_LOG)
        backend = await opened(server.url)
        await backend.start()
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        message = warnings[0].getMessage()
        assert "allkeys-lru" in message and "noeviction" in message and "evict" in message


@pytest.mark.parametrize("args", [
    [],
    ["--rename-command", "CONFIG", ""],
    ["--user", "default", "on", "nopass", "~*", "&*", "+@all", "-config"],
], ids=["noeviction", "config-renamed", "config-denied-by-acl"])
async def test_no_warning_when_noeviction_or_unknowable(
        opened: Opened, caplog: pytest.LogCaptureFixture, args: list[str]) -> None:
    require_redis_server()
    with RedisServer(args) as server:
        caplog.set_level(logging.DEBUG, POLICY_LOG)
        backend = await opened(server.url)
        assert as_dict(await backend.create_map(MAP)) == {V: 0}
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        if args:
            assert any("maxmemory-policy" in r.getMessage() for r in caplog.records)


# -- options ----------------------------------------------------------------------


def wait_settings(url: str, **options: Any) -> tuple[int, int]:
    backend = make_backend(url, **options)
    assert isinstance(backend, RedisBackend)
    return backend.settings.wait_replicas, backend.settings.wait_timeout_ms


def test_wait_options_from_the_url_and_keywords() -> None:
    url = "redis://127.0.0.1:6390/0?wait_replicas=2&wait_timeout_ms=250"
    assert parse_url(url).options == {"wait_replicas": "2", "wait_timeout_ms": "250"}
    assert wait_settings(url) == (2, 250)
    # A keyword argument wins over the URL.
    assert wait_settings(url, wait_replicas=1) == (1, 250)
    assert wait_settings("unix:///tmp/r.sock?db=1&wait_replicas=1") == (1, 1000)
    assert wait_settings("rediss://h/0?wait_replicas=1&ssl_cert_reqs=none") == (1, 1000)
    assert wait_settings("redis://h/0") == (0, 1000)


@pytest.mark.parametrize(("url", "options", "words"), [
    ("memory://", {"wait_replicas": 1}, "need a Redis backend"),
    ("memory://x?wait_replicas=1", {}, "needs a Redis backend"),
    ("memory://?wait_timeout_ms=5", {}, "needs a Redis backend"),
    ("redis://h/0?wait_replicas=one", {}, "wait_replicas must be an int"),
    ("redis://h/0?wait_replicas=-1", {}, "wait_replicas must be an int >= 0"),
    ("redis://h/0", {"wait_replicas": 1.5}, "wait_replicas must be an int"),
    ("redis://h/0?wait_replicas=1&wait_timeout_ms=0", {}, "wait_timeout_ms must be an int > 0"),
    ("redis://h/0", {"wait_timeout_ms": True}, "wait_timeout_ms"),
    ("redis://h/0?wait_replicas=1&wait_replicas=2", {}, "given twice"),
    ("redis://h/0", {"call_timeout": 0}, "call_timeout must be a number > 0"),
])
def test_bad_durability_options_are_refused(url: str, options: dict[str, Any],
                                            words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        make_backend(url, **options)


def test_retry_pauses_double_with_jitter_up_to_their_bound() -> None:
    backend = make_backend("redis://h/0", retry_delay=0.1, max_retry_delay=0.5)
    assert isinstance(backend, RedisBackend)
    settings = backend.settings
    for attempt, pause in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (30, 0.5)]:
        seen = [settings.backoff(attempt) for _ in range(200)]
        assert all(pause / 2 <= s <= pause for s in seen)
        assert max(seen) - min(seen) > pause / 10  # jittered, not fixed
    assert max(settings.backoff(50, 5.0) for _ in range(50)) > 2.5
    # The bound defaults to 1 s, or to retry_delay when that is longer.
    assert make_backend("redis://h/0").settings.max_retry_delay == 1.0  # type: ignore[attr-defined]
    assert make_backend("redis://h/0", retry_delay=2.0).settings.max_retry_delay == 2.0  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"max_retry_delay .* must be >= retry_delay"):
        make_backend("redis://h/0", retry_delay=0.5, max_retry_delay=0.1)
