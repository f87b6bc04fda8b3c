"""Group commit: the commits bound for one server share round trips.

A commit made when no commit round trip to its server is in flight is sent
at once, by the calling task itself (an idle writer never waits). While one
is in flight, later commits queue and go together in the next round trip, as
one pipeline of EVALSHAs: when the round trip in flight ends, or when
``max_pending_updates`` commits are queued, or at the latest
``coalescing_interval`` seconds after the first of them queued (then even
with the previous round trip still in flight). Each commit gets its own
result or error; a caller cancelled while its commit is still queued
withdraws it.

On a cluster there is one :class:`GroupCommit` per primary, so a slow or
dead shard holds back only the commits of its own actors.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..wire import EncodedTransaction
from .codec import Command

__all__ = ["GroupCommit", "PendingCommit"]


@dataclass(eq=False, slots=True)
class PendingCommit:
    tx: EncodedTransaction
    command: Command
    future: asyncio.Future[bool]


#: Sends a batch and settles every future of it.
RoundTrip = Callable[[list[PendingCommit]], Awaitable[None]]


class GroupCommit:
    """The queue of commits for one server, and when they go."""

    def __init__(self, round_trip: RoundTrip, interval: float, max_pending: int) -> None:
        self._round_trip = round_trip
        self._interval = interval
        self._max_pending = max_pending
        self._queue: deque[PendingCommit] = deque()
        self._in_flight = 0
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def commit(self, pending: PendingCommit) -> bool:
        if self._in_flight == 0 and not self._queue:
            # Idle: this task makes the round trip itself, no hop through the loop.
            self._in_flight += 1
            try:
                await self._round_trip([pending])
            finally:
                self._in_flight -= 1
                self._kick()
            return pending.future.result()
        self._queue.append(pending)
        self._kick()
        # A caller cancelled before its commit was sent withdraws it: the
        # batch skips futures that are already done.
        return await pending.future

    def _kick(self) -> None:
        if not self._queue or self._flush_scheduled:
            return
        if self._in_flight == 0 or len(self._queue) >= self._max_pending:
            # call_soon: commits made in this loop iteration join the batch.
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._interval, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._queue and not self._flush_scheduled:
            self._flush()

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._queue:
            batch: list[PendingCommit] = []
            while self._queue and len(batch) < self._max_pending:
                pending = self._queue.popleft()
                if not pending.future.done():
                    batch.append(pending)
            if batch:
                self._in_flight += 1
                task = asyncio.get_running_loop().create_task(self._send(batch))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            if len(self._queue) < self._max_pending:
                break
        self._kick()

    async def _send(self, batch: list[PendingCommit]) -> None:
        try:
            await self._round_trip(batch)
        finally:
            self._in_flight -= 1
            self._kick()

    async def drain(self) -> None:
        """Send what is queued and wait for every round trip in flight."""
        while self._queue or self._in_flight:
            if self._queue:
                self._flush()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            else:  # a caller's own (idle) round trip is finishing
                await asyncio.sleep(0.001)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

