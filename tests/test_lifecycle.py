"""Node lifecycle and clear errors: serve() on SIGTERM/SIGINT, destroy(),
CAF_SHARING_URL, map deletion reaching readers, typed calls, node_id claims,
and the errors that replace surprises (self-calls, state that is not JSON
data, read-only writes, missing maps, held leases)."""

from __future__ import annotations

import asyncio
import datetime
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from caf_sharing import Actor, ActorHandle, Node
from caf_sharing.backends import MemoryStore
from caf_sharing.errors import (
    ActorError,
    ActorStoppedError,
    InvalidTypeError,
    InvalidValueError,
    LeaseHeldError,
    MapNotFoundError,
    NodeIdInUseError,
    ReadOnlyError,
    UnknownActorMethodError,
)
from redisserver import RedisServer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def url() -> Iterator[str]:
    name = f"life-{uuid.uuid4().hex}"
    yield f"memory://{name}"
    MemoryStore.drop(name)


class Counter(Actor):
    async def init(self) -> None:
        self.sharing.add_writable_map("mine", "x", initial_value={"n": 0})

    async def increment(self, by: int) -> int:
        mine = self.sharing.maps.mine
        n: int = mine.get("n") + by
        mine.set("n", n)
        return n

    async def version_seen(self) -> tuple[int, int]:
        """The version a writing message sees before and after its write."""
        mine = self.sharing.maps.mine
        before = mine.version
        mine.set("n", mine.get("n") + 1)
        return before, mine.version

    async def slow_increment(self, gate: asyncio.Event) -> None:
        await gate.wait()
        mine = self.sharing.maps.mine
        mine.set("n", mine.get("n") + 1)

    async def drop(self) -> None:
        self.sharing.delete_map("mine")

    async def when(self) -> None:
        self.state["when"] = datetime.datetime(2026, 1, 1)

    async def nan(self) -> None:
        self.state["stats"] = {"ratio": [1.0, float("nan")]}

    async def call_myself(self, handle: ActorHandle[Counter]) -> None:
        await handle.call(Counter.increment, 1)

    async def call_myself_in_a_task(self, handle: ActorHandle[Counter]) -> None:
        await asyncio.create_task(handle.call("increment", 1))


class Reader(Actor):
    async def follow(self, name: str, best_effort: bool) -> None:
        self.sharing.add_read_only_map("other", name, best_effort=best_effort)

    async def read(self) -> int | None:
        ref = self.sharing.maps.other
        return None if ref is None else ref.get("n")

    async def write(self) -> None:
        self.sharing.maps.other.set("n", 1)


class Other(Actor):
    async def increment(self, by: int) -> int:
        return by


async def _until(predicate: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.01)


# -- CAF_SHARING_URL ------------------------------------------------------------


async def test_node_without_url_reads_caf_sharing_url(monkeypatch: pytest.MonkeyPatch,
                                                      url: str) -> None:
    monkeypatch.setenv("CAF_SHARING_URL", url)
    async with Node() as a, Node(url) as b:
        assert a.backend.url == url
        await a.start(Counter, "ann-counter")
        with pytest.raises(LeaseHeldError):  # the same store as b's
            await b.start(Counter, "ann-counter")
    monkeypatch.setenv("CAF_SHARING_URL", "")
    assert Node().backend.url == "memory://"
    monkeypatch.delenv("CAF_SHARING_URL")
    assert Node().backend.url == "memory://"


# -- serve() -------------------------------------------------------------------------


async def test_serve_closes_on_sigterm_and_restores_the_handlers(url: str) -> None:
    calls: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: calls.append(sig))
    try:
        node = Node(url)
        server = asyncio.create_task(node.serve())
        await _until(lambda: _async(_installed(signal.SIGTERM)))
        counter = await node.start(Counter, "ann-counter")
        gate = asyncio.Event()
        running = asyncio.create_task(counter.call(Counter.slow_increment, gate))
        await asyncio.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.05)
        # Closing: new messages are refused, the one under way finishes.
        with pytest.raises(ActorStoppedError):
            await counter.call(Counter.increment, 1)
        assert not server.done()
        gate.set()
        assert await asyncio.wait_for(server, 5) == signal.SIGTERM
        await running
        assert calls == []  # asyncio's handler took it, not ours
        assert node.actors == []
        async with Node(url, lease_ttl=30) as other:
            counter = await other.start(Counter, "ann-counter")  # the lease was released
            assert await counter.call(Counter.increment, 0) == 1  # and the message committed
        # Our handler is back.
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.05)
        assert calls == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def _installed(sig: signal.Signals) -> bool:
    loop = asyncio.get_running_loop()
    return sig in getattr(loop, "_signal_handlers", {})


async def _async(value: bool) -> bool:
    return value


CHILD = textwrap.dedent("""
    import asyncio, sys
    from caf_sharing import Actor, Node

    class Counter(Actor):
        async def init(self):
            self.sharing.add_writable_map("mine", "x", initial_value={"n": 0})

    async def main():
        node = Node(sys.argv[1], app=sys.argv[2], node_id="child", lease_ttl=30,
                    restart_grace=False)
        await node.open()
        await node.start(Counter, "ann-counter")
        print("ready", flush=True)
        sig = await node.serve()
        print("closed", sig.name, flush=True)

    asyncio.run(main())
""")


@pytest.mark.redis
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
async def test_sigterm_releases_the_lease_and_another_node_starts_the_actor_at_once(
        server: RedisServer, sig: signal.Signals) -> None:
    app = f"t{uuid.uuid4().hex[:8]}"
    # The child imports caf_sharing as this process does: installed (CI
    # installs the package, its source tree has no compiled core) or editable.
    child = subprocess.Popen([sys.executable, "-c", CHILD, server.url, app],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        line = await asyncio.to_thread(child.stdout.readline)
        assert line.strip() == "ready", child.stderr.read() if child.stderr else ""
        async with Node(server.url, app=app, node_id="parent", lease_ttl=30,
                        restart_grace=False) as node:
            with pytest.raises(LeaseHeldError):
                await node.start(Counter, "ann-counter")
            sent = time.monotonic()
            child.send_signal(sig)
            # Within seconds the lease is free and this node starts the actor:
            # a lease of 30 s would hold it up for 30 s had it not been
            # released. (5 s, not 1: a loaded machine took over 1 s to start
            # the child's shutdown.)
            async with asyncio.timeout(5.0):
                while True:
                    try:
                        handle = await node.start(Counter, "ann-counter")
                        break
                    except LeaseHeldError:
                        await asyncio.sleep(0.02)
            assert time.monotonic() - sent < 5.0
            assert await handle.call("increment", 2) == 2  # the child's checkpoint
        out, err = await asyncio.to_thread(child.communicate, timeout=10)
        assert child.returncode == 0, err
        assert out.strip() == f"closed {sig.name}"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


# -- destroy() -------------------------------------------------------------------------


async def test_destroy_deletes_an_unheld_actor_and_its_readers_see_it(url: str) -> None:
    async with Node(url, lease_ttl=30) as a, Node(url, lease_ttl=30) as b:
        counter = await a.start(Counter, "ann-counter")
        await counter.call(Counter.increment, 5)
        strict = await b.start(Reader, "bob-strict")
        lenient = await b.start(Reader, "bob-lenient")
        await strict.call(Reader.follow, "ann-counter-x", False)
        await lenient.call(Reader.follow, "ann-counter-x", True)
        await _until(lambda: _equals(strict.call(Reader.read), 5))
        with pytest.raises(ActorError, match="stop it first"):
            await a.destroy("ann-counter")
        with pytest.raises(LeaseHeldError, match="expires in"):
            await b.destroy("ann-counter")
        await a.stop("ann-counter")
        assert await b.destroy("ann-counter") is True
        assert await b.backend.read_map("ann-counter-x") is None
        assert await b.backend.load_checkpoint("ann-counter") is None
        # The readers learn of it: None with best_effort, else MapNotFoundError.
        await _until(lambda: _equals(lenient.call(Reader.read), None))
        with pytest.raises(MapNotFoundError, match="best_effort=True"):
            await strict.call(Reader.read)
        # It starts afresh (init runs again), and its readers follow it again.
        counter = await a.start(Counter, "ann-counter")
        assert await counter.call(Counter.increment, 1) == 1
        await _until(lambda: _equals(lenient.call(Reader.read), 1))
        assert await strict.call(Reader.read) == 1
        assert await a.destroy("nobody-there") is False


async def _equals(call: Awaitable[object], expected: object) -> bool:
    try:
        return bool(await call == expected)
    except MapNotFoundError:
        return False


# -- delete_map ----------------------------------------------------------------------


@pytest.mark.parametrize("backend_kind", ["memory", pytest.param("redis", marks=pytest.mark.redis),
                                          pytest.param("cluster", marks=pytest.mark.redis)])
async def test_delete_map_deletes_the_data_at_commit(backend_factory: Any,
                                                     backend_kind: str) -> None:
    url = backend_factory.url(backend_kind)
    # A fresh server delays absent leases by one TTL (restart_grace): not here.
    options = {} if backend_kind == "memory" else {"restart_grace": False}
    app = backend_factory.app
    async with Node(url, app=app, **options) as a, Node(url, app=app, **options) as b:
        counter = await a.start(Counter, "ann-counter")
        await counter.call(Counter.increment, 3)
        lenient = await b.start(Reader, "bob-lenient")
        await lenient.call(Reader.follow, "ann-counter-x", True)
        await _until(lambda: _equals(lenient.call(Reader.read), 3))
        await counter.call(Counter.drop)
        assert await a.backend.read_map("ann-counter-x") is None
        await _until(lambda: _equals(lenient.call(Reader.read), None))
        # A reader that opens it now is told it does not exist, and how to wait for it.
        strict = await b.start(Reader, "bob-strict")
        with pytest.raises(MapNotFoundError,
                           match=r"does not exist; add it with .*best_effort=True"):
            await strict.call(Reader.follow, "ann-counter-x", False)


@pytest.mark.redis
async def test_a_forged_deletion_marker_does_not_empty_a_replica(
        redis_server: RedisServer) -> None:
    app = f"t{uuid.uuid4().hex[:8]}"
    async with Node(redis_server.url, app=app, restart_grace=False) as node:
        counter = await node.start(Counter, "ann-counter")
        await counter.call(Counter.increment, 4)
        reader = await node.start(Reader, "bob-reader")
        await reader.call(Reader.follow, "ann-counter-x", False)
        resyncs = node.service.stats.resyncs
        channel = f"caf:{app}:{{ann-counter}}:chan:ann-counter-x"
        with redis_server.client() as client:
            client.execute_command("SPUBLISH", channel, b'{"deleted": true, "txid": null}')
        # The marker makes the replica read the store, which still has the map.
        await _until(lambda: _async(node.service.stats.resyncs > resyncs))
        assert await reader.call(Reader.read) == 4
        assert node.service.stats.deletions == 0


# -- typed calls -------------------------------------------------------------------------


async def test_typed_calls_and_their_refusals(url: str) -> None:
    async with Node(url) as node:
        counter = await node.start(Counter, "ann-counter")
        assert await counter.call(Counter.increment, 3) == 3
        assert await counter.call("increment", 2) == 5  # the string form still works
        assert counter.actor.name == "ann-counter"
        with pytest.raises(UnknownActorMethodError, match=r"pass Cls\.method of its class"):
            await counter.call(Other.increment, 1)
        with pytest.raises(UnknownActorMethodError):
            await counter.call(Counter.init)


# -- clear errors --------------------------------------------------------------------------


async def test_an_actor_calling_itself_is_refused_not_deadlocked(url: str) -> None:
    async with Node(url) as node:
        counter = await node.start(Counter, "ann-counter")
        async with asyncio.timeout(5):
            with pytest.raises(ActorError, match="would deadlock"):
                await counter.call(Counter.call_myself, counter)
            with pytest.raises(ActorError, match="would deadlock"):
                await counter.call(Counter.call_myself_in_a_task, counter)
        assert await counter.call(Counter.increment, 1) == 1  # nothing was committed


async def test_state_is_checked_like_map_values(url: str) -> None:
    async with Node(url) as node:
        counter = await node.start(Counter, "ann-counter")
        with pytest.raises(InvalidTypeError, match=r"state\['when'\]: type datetime"):
            await counter.call(Counter.when)
        with pytest.raises(InvalidValueError, match=r"state\['stats'\]\['ratio'\]\[1\]: float nan"):
            await counter.call(Counter.nan)
        assert counter.actor.state == {}


async def test_a_second_live_node_with_the_same_node_id_is_refused(url: str) -> None:
    async with Node(url, node_id="web-1"):
        other = Node(url, node_id="web-1")
        with pytest.raises(NodeIdInUseError, match="node_id 'web-1' is already used"):
            await other.open()
        async with Node(url, node_id="web-2"):
            pass
    async with Node(url, node_id="web-1"):  # closed nodes release their id
        pass
    # A live node renews its claim with its leases: it outlives the TTL.
    async with Node(url, node_id="web-3", lease_ttl=0.3):
        await asyncio.sleep(0.8)
        with pytest.raises(NodeIdInUseError):
            await Node(url, node_id="web-3").open()


async def test_read_only_error_names_the_map_and_its_owner(url: str) -> None:
    async with Node(url) as node:
        await node.start(Counter, "ann-counter")
        reader = await node.start(Reader, "bob-reader")
        await reader.call(Reader.follow, "ann-counter-x", False)
        with pytest.raises(ReadOnlyError, match="map 'ann-counter-x' is read-only here; only "
                                                "its owner, actor 'ann-counter', writes it"):
            await reader.call(Reader.write)


async def test_lease_held_error_says_when_the_lease_expires(url: str) -> None:
    async with Node(url, lease_ttl=20) as a, Node(url) as b:
        await a.start(Counter, "ann-counter")
        with pytest.raises(LeaseHeldError, match=r"the lease expires in (19|20)\.\ds") as held:
            await b.start(Counter, "ann-counter")
        assert held.value.holder == a.node_id


async def test_a_callers_timeout_does_not_stop_a_started_message(url: str) -> None:
    async with Node(url) as node:
        counter = await node.start(Counter, "ann-counter")
        gate = asyncio.Event()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await counter.call(Counter.slow_increment, gate)
        gate.set()
        # It ran to its end and committed: the caller only lost the reply.
        assert await counter.call(Counter.increment, 0) == 1


async def test_ref_version_in_a_writing_message_is_the_base_version(url: str) -> None:
    async with Node(url) as node:
        counter = await node.start(Counter, "ann-counter")
        before, after = await counter.call(Counter.version_seen)
        assert before == after  # the write takes effect at the commit...
        again, _ = await counter.call(Counter.version_seen)
        assert again == before + 1  # ...which makes the next version


# -- typing (mypy --strict) ----------------------------------------------------------------


def _mypy(path: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental",
         "--cache-dir", str(tmp_path / "mypy-cache"), "--config-file", os.devnull, str(path)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "MYPYPATH": str(ROOT / "src")})


def test_typed_calls_check_under_mypy_strict(tmp_path: Path) -> None:
    ok = _mypy(ROOT / "tests" / "data" / "typed_ok.py", tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    path = ROOT / "tests" / "data" / "typed_bad.py"
    bad = _mypy(path, tmp_path)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    expected = {i for i, line in enumerate(path.read_text().splitlines(), 1)
                if "# error:" in line}
    errors = [line for line in bad.stdout.splitlines() if ": error:" in line]
    assert {int(line.split(":")[1]) for line in errors} == expected, bad.stdout
    assert len(errors) == len(expected) == 4
    assert all('of "call" of "ActorHandle"' in line for line in errors), bad.stdout
    # The first names the argument mypy refused: a str where an int goes.
    assert 'argument types "Callable[[Hello, int], Coroutine[Any, Any, int]]", "str"' \
        in errors[0]
