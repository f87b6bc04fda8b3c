"""Eager start: a message to an idle actor begins in its caller's task.

A message through an actor's mailbox costs two task switches: the caller's
task hands it to the actor's worker task, whose reply wakes the caller. When
the actor is idle (its worker waits on an empty mailbox), the message may as
well begin at once, in the caller's task: one that never suspends (a read, a
``memory://`` commit) then costs no switch at all, and one that does (a Redis
commit) has sent its commit before the caller yields.

What the message sees stays as it was in the worker: its first step runs in
the worker's context (contextvars) with the worker as the current task, so
that ``asyncio.timeout``, ``TaskGroup`` and ``current_task()`` inside it
address the worker; from its first suspension on, the worker itself runs the
rest (a :class:`Resumption`, queued ahead of everything else). A caller that
stops waiting never reaches a message that has begun, as before. The worker
is woken only once what the message waits on is done (or another message
arrives): a step of its own just to start waiting would cost as much as the
switch saved.

Python 3.11 has no public way to run a step as another task (3.12's eager
tasks use these same functions of ``asyncio.tasks``); where they are missing,
every message goes through the mailbox.

A caller whose messages all finish eagerly would never yield to the loop: a
:class:`Budget` lets :data:`BUDGET` of them run per turn of the loop, after
which messages queue (and their callers yield) until the loop turns.

A message that suspends (a Redis commit) gains latency by starting eagerly
(its commit is sent before the caller yields, and the worker finishes it
after the loop has run what was ready) but costs more CPU than queueing it
(with 100 actors committing at once, 41 against 36 us a message): such a
message starts eagerly only as the first eager start of a turn of the loop,
which a lone caller always is and a burst of callers mostly is not.
"""

from __future__ import annotations

import asyncio
import asyncio.tasks
import contextvars
from collections.abc import Callable, Coroutine, Generator
from typing import Any

__all__ = ["BUDGET", "FINISHED", "Budget", "Resumption", "first_step"]

_enter_task = getattr(asyncio.tasks, "_enter_task", None)
_leave_task = getattr(asyncio.tasks, "_leave_task", None)

#: Messages that may start eagerly in one turn of the loop, per node. It
#: bounds their nesting too (a message calling another idle actor runs that
#: one inside its own step, a few frames deeper each).
BUDGET = 16

#: What :func:`first_step` returns for a message that finished in its first step.
FINISHED: Any = object()


class Budget:
    """How many more messages may start eagerly in this turn of the loop."""

    __slots__ = ("_left",)

    def __init__(self) -> None:
        self._left = BUDGET if _enter_task is not None and _leave_task is not None else 0

    def take(self, loop: asyncio.AbstractEventLoop, suspends: bool) -> bool:
        """Take one eager start, for a message that ``suspends`` or not (as
        it did last time); refilled when the loop has turned."""
        left = self._left
        if left <= 0 or (suspends and left != BUDGET):
            return False
        if left == BUDGET:
            loop.call_soon(self._refill)
        self._left = left - 1
        return True

    def _refill(self) -> None:
        self._left = BUDGET


def first_step(loop: asyncio.AbstractEventLoop, caller: asyncio.Task[Any],
               worker: asyncio.Task[Any], context: contextvars.Context,
               coro: Coroutine[Any, Any, None]) -> Any:
    """Run ``coro`` up to its first suspension as ``worker`` would, in ``context``.

    Returns what it waits on there, or :data:`FINISHED`; raises what it
    raised. The caller is the current task again on return.
    """
    assert _enter_task is not None and _leave_task is not None  # Budget.take said so
    _leave_task(loop, caller)
    _enter_task(loop, worker)
    try:
        return context.run(coro.send, None)
    except StopIteration:
        return FINISHED
    finally:
        _leave_task(loop, worker)
        _enter_task(loop, caller)


class Resumption:
    """The rest of a message that began eagerly; the worker awaits it.

    Its task waits on exactly what the message waits on, and passes every
    outcome through, cancellation included, as if it had run the message
    from the start. ``wake`` (the mailbox's) is called once that is done,
    unless the worker took the message over before.
    """

    __slots__ = ("_coro", "_error", "_pending", "_taken", "_wake")

    def __init__(self, coro: Coroutine[Any, Any, None], pending: Any,
                 wake: Callable[[], None]) -> None:
        self._coro = coro
        self._pending = pending
        self._error: BaseException | None = None
        self._taken = False
        self._wake = wake
        if isinstance(pending, asyncio.Future) and not pending.done():
            pending.add_done_callback(self._ready)
        else:  # a bare yield (asyncio.sleep(0)), or a done future: at once
            wake()

    def _ready(self, _: object) -> None:
        if not self._taken:
            self._wake()

    def interrupt(self, error: BaseException) -> None:
        """Resume by raising ``error`` where the message waits: its worker was
        cancelled before it took the message over."""
        pending = self._pending
        if isinstance(pending, asyncio.Future) and not pending.done():
            pending.cancel()  # what cancelling the task would have done
        self._error = error

    def __await__(self) -> Generator[Any, None, None]:
        self._taken = True
        coro, pending, error = self._coro, self._pending, self._error
        ready = isinstance(pending, asyncio.Future) and pending.done()
        if ready:  # woken by it: the message takes its outcome at once
            pending._asyncio_future_blocking = False
        while True:
            if error is None and not ready:
                try:
                    yield pending
                except BaseException as exc:  # handed on to the message, whatever it is
                    error = exc
            ready = False
            try:
                if error is None:
                    pending = coro.send(None)
                else:
                    thrown, error = error, None
                    pending = coro.throw(thrown)
            except StopIteration:
                return
