"""Mailbox: the bounded queue of one actor's messages, with one reader.

``asyncio.Queue`` serves any number of readers and counts finished tasks;
an actor's mailbox has exactly one reader, its worker task, and a message
through it is only a few microseconds of work, so the bookkeeping it does not
need is a good part of a message's cost (about 0.9 us of the 6 us a minimal
queue-and-future actor takes per message). Same behaviour otherwise:
FIFO, ``put_nowait`` raises :class:`asyncio.QueueFull` at the bound, ``put``
waits for room. Beyond a queue: ``parked`` tells that the reader waits with
nothing queued (the actor is idle), ``put_front`` queues an item ahead of
the rest whatever the bound (the rest of a message that began elsewhere),
and may leave the reader waiting until ``wake``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

__all__ = ["Mailbox"]

T = TypeVar("T")


class Mailbox(Generic[T]):
    """A FIFO of at most ``maxsize`` items, read by one task at a time."""

    __slots__ = ("_ahead", "_items", "_maxsize", "_reader", "_writers")

    def __init__(self, maxsize: int) -> None:
        self._items: deque[T] = deque()
        self._maxsize = maxsize
        #: Items at the front put there by put_front: not counted against the bound.
        self._ahead = 0
        #: The reader's future while it waits for an item.
        self._reader: asyncio.Future[None] | None = None
        #: Futures of the writers waiting for room, oldest first.
        self._writers: deque[asyncio.Future[None]] = deque()

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    @property
    def parked(self) -> bool:
        """The reader waits in :meth:`get`, and nothing is queued."""
        return self._reader is not None and not self._items

    def front(self) -> T | None:
        """The oldest item, left in place (``None`` if there is none)."""
        return self._items[0] if self._items else None

    def put_nowait(self, item: T) -> None:
        if len(self._items) - self._ahead >= self._maxsize:
            raise asyncio.QueueFull
        self._items.append(item)
        self.wake()

    def wake(self) -> None:
        """Let a waiting reader take what is queued."""
        reader = self._reader
        if reader is not None:
            self._reader = None
            if not reader.done():
                reader.set_result(None)

    def put_front(self, item: T, *, wake: bool = True) -> None:
        """Queue ``item`` ahead of every other, even past the bound; without
        ``wake``, a waiting reader takes it with the next item or :meth:`wake`."""
        self._items.appendleft(item)
        self._ahead += 1
        if wake:
            self.wake()

    async def put(self, item: T) -> None:
        """Queue ``item``, waiting for room first if the mailbox is full."""
        while len(self._items) - self._ahead >= self._maxsize:
            writer = asyncio.get_running_loop().create_future()
            self._writers.append(writer)
            try:
                await writer
            except BaseException:
                # Cancelled: pass the room it was given on to the next writer.
                if writer.done() and not writer.cancelled():
                    self._wake_writer()
                raise
        self.put_nowait(item)

    def get_nowait(self) -> T:
        """The oldest item; :class:`asyncio.QueueEmpty` if there is none."""
        if not self._items:
            raise asyncio.QueueEmpty
        item = self._items.popleft()
        if self._ahead:
            self._ahead -= 1
        elif self._writers:
            self._wake_writer()
        return item

    async def get(self) -> T:
        """The oldest item, waiting for one if the mailbox is empty."""
        while not self._items:
            self._reader = reader = asyncio.get_running_loop().create_future()
            try:
                await reader
            finally:
                if self._reader is reader:
                    self._reader = None
        return self.get_nowait()

    def _wake_writer(self) -> None:
        while self._writers:
            writer = self._writers.popleft()
            if not writer.done():
                writer.set_result(None)
                return
