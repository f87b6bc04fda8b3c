"""Messages to idle actors begin in their caller's task (caf_sharing._eager).

What must not change with it: a message still runs in its actor's worker
task and context as far as it can tell, one at a time, in mailbox order; a
caller that stops waiting does not stop a message that began; cancellation,
``asyncio.timeout`` and ``TaskGroup`` inside a message act on the message;
and a caller whose messages never suspend still lets the loop run.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator
from typing import Any

import pytest

from caf_sharing import Actor, ActorHandle, Node
from caf_sharing._eager import BUDGET
from caf_sharing.errors import ActorStoppedError
from redisserver import RedisServer

where: contextvars.ContextVar[str] = contextvars.ContextVar("where", default="unset")


class Probe(Actor):
    async def init(self) -> None:
        self.sharing.add_writable_map("m", "m")
        self.log_: list[str] = []

    async def resume(self) -> None:
        self.log_ = []

    async def put(self, key: str, value: int) -> int:
        self.sharing.maps.m.set(key, value)
        return value

    async def task_name(self) -> str:
        task = asyncio.current_task()
        assert task is not None
        return task.get_name()

    async def set_var(self, value: str) -> str:
        old = where.get()
        where.set(value)
        return old

    async def get_var(self) -> str:
        return where.get()

    async def slow_put(self, key: str, value: int, delay: float) -> int:
        self.log_.append(f"begin {key}")
        try:
            await asyncio.sleep(delay)
            self.sharing.maps.m.set(key, value)
            return value
        finally:
            self.log_.append(f"end {key}")

    async def timed_out(self) -> str:
        try:
            async with asyncio.timeout(0.01):
                await asyncio.sleep(5)
        except TimeoutError:
            return "timed out"
        return "not timed out"

    async def group(self) -> None:
        async def fail() -> None:
            await asyncio.sleep(0)
            raise ValueError("child failed")

        async with asyncio.TaskGroup() as tg:
            tg.create_task(fail())
            await asyncio.sleep(5)

    async def get(self, key: str) -> Any:
        return self.sharing.maps.m.get(key)

    async def nap(self) -> None:
        self.log_.append("nap")
        await asyncio.sleep(0)


class Relay(Actor):
    """Calls the next actor of a chain, or another actor while it is busy."""

    async def chain(self, handles: list[ActorHandle[Any]], at: int) -> int:
        if at == len(handles):
            return at
        return int(await handles[at].call("chain", handles, at + 1))

    async def ping(self, other: ActorHandle[Any], me: ActorHandle[Any]) -> str:
        return str(await other.call("pong", me))

    async def pong(self, caller: ActorHandle[Any]) -> str:
        try:
            async with asyncio.timeout(0.2):  # the call begins in this very step
                return str(await caller.call("peek"))
        except TimeoutError:
            return "busy"

    async def peek(self) -> str:
        return "peeked"


@pytest.fixture(params=["memory", "redis"])
async def node(request: pytest.FixtureRequest) -> AsyncIterator[Node]:
    options: dict[str, Any] = {}
    if request.param == "memory":
        url = f"memory://eager-{id(request)}"
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        url, options["restart_grace"] = server.url, False
    async with Node(url, app=f"eager-{id(request)}", **options) as started:
        yield started


async def test_a_message_that_never_suspends_costs_no_turn_of_the_loop() -> None:
    async with Node("memory://eager-turn", app="eager") as node:
        probe = await node.start(Probe, "probe-a")
        await probe.call("put", "k", 0)  # the worker, just started, waits on its mailbox now
        turned: list[int] = []
        asyncio.get_running_loop().call_soon(turned.append, 1)
        assert await probe.call("put", "k", 1) == 1
        assert turned == []  # began and finished within this task's step
        await asyncio.sleep(0)
        assert turned == [1]


async def test_the_message_sees_its_worker_task_begun_eagerly_or_queued(node: Node) -> None:
    probe = await node.start(Probe, "probe-b")
    name = "caf-sharing actor probe-b"
    assert await probe.call("task_name") == name  # idle actor: begins in this task
    busy = asyncio.ensure_future(probe.call("slow_put", "x", 1, 0.05))
    await asyncio.sleep(0)
    queued = asyncio.ensure_future(probe.call("task_name"))  # the actor is busy: queued
    assert await queued == name
    assert await busy == 1


async def test_the_message_runs_in_its_actors_context_not_the_callers(node: Node) -> None:
    probe = await node.start(Probe, "probe-c")
    where.set("caller")
    assert await probe.call("set_var", "actor") == "unset"
    assert where.get() == "caller"
    assert await probe.call("get_var") == "actor"  # the actor's own context, kept
    busy = asyncio.ensure_future(probe.call("slow_put", "x", 1, 0.02))
    await asyncio.sleep(0)
    assert await probe.call("get_var") == "actor"  # queued behind: the same context
    await busy


async def test_messages_queued_behind_a_begun_one_run_after_it_in_order(node: Node) -> None:
    probe = await node.start(Probe, "probe-d")
    calls = [asyncio.ensure_future(probe.call("slow_put", f"k{i}", i, 0.01)) for i in range(4)]
    assert await asyncio.gather(*calls) == [0, 1, 2, 3]
    actor = probe.actor
    assert actor.log_ == [f"{edge} k{i}" for i in range(4) for edge in ("begin", "end")]


async def test_a_caller_that_stops_waiting_does_not_stop_a_begun_message(node: Node) -> None:
    probe = await node.start(Probe, "probe-e")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await probe.call("slow_put", "late", 7, 0.1)
    for _ in range(100):
        if await probe.call("get", "late") == 7:
            break
        await asyncio.sleep(0.01)
    assert await probe.call("get", "late") == 7


async def test_timeout_and_taskgroup_inside_a_message_act_on_the_message(node: Node) -> None:
    probe = await node.start(Probe, "probe-f")
    assert await probe.call("timed_out") == "timed out"
    with pytest.raises(ExceptionGroup) as caught:
        await probe.call("group")
    assert [str(e) for e in caught.value.exceptions] == ["child failed"]
    assert await probe.call("put", "after", 1) == 1  # the worker lives on


async def test_worker_cancelled_before_taking_a_begun_message_over_cancels_that_message() -> None:
    async with Node("memory://eager-cancel", app="eager") as node:
        probe = await node.start(Probe, "probe-g")
        worker = probe._host.worker
        assert worker is not None
        call = asyncio.ensure_future(probe.call("slow_put", "k", 1, 5))
        await asyncio.sleep(0)  # the call began and was handed over; the worker not run yet
        assert probe.actor.log_ == ["begin k"]
        worker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        # The message itself was cancelled where it waited (its finally ran)
        # and the worker stopped, as when cancelled inside a message.
        assert probe.actor.log_ == ["begin k", "end k"]
        await asyncio.sleep(0)
        assert worker.cancelled()
        probe._host.worker = None  # a cancelled worker's end would be re-raised by close()


async def test_an_actor_is_never_entered_twice_through_a_call_cycle(node: Node) -> None:
    a = await node.start(Relay, "relay-a")
    b = await node.start(Relay, "relay-b")
    await asyncio.sleep(0)  # both workers wait on their mailboxes: a's message begins here
    # a's message calls b, whose message calls a back: a is busy, so that call
    # queues (and times out), it does not run inside a's message.
    assert await a.call("ping", b, a) == "busy"


async def test_chains_longer_than_the_budget_still_run(node: Node) -> None:
    # Each idle actor's message begins inside its caller's: the budget bounds the nesting.
    handles = [await node.start(Relay, f"relay-{i}") for i in range(3 * BUDGET)]
    await asyncio.sleep(0)  # every worker waits on its mailbox: all are idle
    assert await handles[0].call("chain", handles, 1) == len(handles)


async def test_a_caller_of_messages_that_never_suspend_still_lets_the_loop_run() -> None:
    async with Node("memory://eager-fair", app="eager") as node:
        probe = await node.start(Probe, "probe-h")
        turns = 0
        stop = False

        async def count() -> None:
            nonlocal turns
            while not stop:
                turns += 1
                await asyncio.sleep(0)

        counter = asyncio.ensure_future(count())
        await asyncio.sleep(0)
        before = turns
        calls = 20 * BUDGET
        for i in range(calls):
            await probe.call("put", "k", i)
        stop = True
        await counter
        assert turns - before >= calls // (BUDGET + 1) - 1


async def test_a_begun_message_survives_a_lost_lease_as_any_begun_message() -> None:
    async with Node("memory://eager-kill", app="eager") as node:
        probe = await node.start(Probe, "probe-i")
        call = asyncio.ensure_future(probe.call("slow_put", "k", 1, 0.05))
        queued = asyncio.ensure_future(probe.call("get", "k"))
        await asyncio.sleep(0)
        # call began and was handed over, queued waits behind it, and the
        # worker has not taken either yet.
        assert probe._host.mailbox.qsize() == 2
        probe._host.kill()
        # The begun message runs to its end and commits (the lease is in fact
        # still held here); the queued one is refused; nothing is left waiting.
        _, pending = await asyncio.wait([call, queued], timeout=5)
        assert not pending
        assert call.result() == 1
        assert isinstance(queued.exception(), ActorStoppedError)
        assert probe.actor.log_ == ["begin k", "end k"]


async def test_messages_that_suspend_start_eagerly_only_first_in_a_turn() -> None:
    async with Node("memory://eager-turns", app="eager") as node:
        a, b = await node.start(Probe, "probe-j"), await node.start(Probe, "probe-k")
        await a.call("nap")  # each learns that nap suspends
        await b.call("nap")
        first = asyncio.ensure_future(a.call("nap"))
        second = asyncio.ensure_future(b.call("nap"))
        await asyncio.sleep(0)  # both calls made in this turn of the loop
        # The first began in its caller's task; the second waits for b's
        # worker (a burst of such messages is cheaper queued).
        assert (len(a.actor.log_), len(b.actor.log_)) == (2, 1)
        await asyncio.gather(first, second)
        assert (len(a.actor.log_), len(b.actor.log_)) == (2, 2)
        # Messages that do not suspend still all start eagerly.
        puts = [asyncio.ensure_future(h.call("put", "k", 1)) for h in (a, b)]
        await asyncio.sleep(0)  # queued, b's would still wait for its worker
        assert all(p.done() for p in puts)
