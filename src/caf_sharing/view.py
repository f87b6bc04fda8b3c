"""ReplicaView: a node's replica of one map, for code that is not an actor.

``view = await node.replica("alice-admin-config")`` gives plain async code (a
request handler, a background task) the map an actor would see with
``add_read_only_map``, with no message:

* ``view.ref()`` — the snapshot of the current version, an immutable
  read-only :class:`~caf_sharing.MapRef` (O(1): the view keeps it ready);
* ``view.version`` — its version, -1 while the map does not exist (or
  after its owner deleted it);
* ``await view.wait_for(version=None, timeout=None)`` — the snapshot once the
  map exists (or reaches ``version``);
* ``async for ref in view.changes()`` — the current snapshot, then each newer
  one, coalesced;
* ``await view.close()`` or ``async with view`` — lets go of the replica.

It is the very replica the node's actors read (reference counted by the
sharing service), so it keeps their guarantees: it never goes back, a
snapshot never changes, and a commit shows whole. Across maps too: the
replicas of one writer move together (a resync installs them all at once),
so coroutines that read several views without awaiting in between see them at
one commit. A thread may call ``ref()`` and ``version`` at any time (it reads
one attribute); ``wait_for`` and ``changes`` run on the node's event loop.

A map that does not exist yet is looked up again, every
``POLL_DELAYS[0]`` seconds at first, then less often, up to
``POLL_DELAYS[1]``: a writer that creates a map publishes nothing until it
first changes it. A map deleted by its owner reads as missing again; created
again, it is a new map whose versions start over (so does ``changes()``),
seen from its first write on, as the node's actors see it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from ._fastmap import MapRef, SharedMap
from .errors import MapNotFoundError, SharingError, ViewClosedError
from .service import SharingService

__all__ = ["POLL_DELAYS", "ReplicaView"]

log = logging.getLogger("caf_sharing.view")

#: First and longest pause (seconds) between lookups of a map that is missing.
POLL_DELAYS = (0.02, 0.5)


class ReplicaView:
    """A read-only view of one map's replica on a node (see the module doc).

    Made by :meth:`caf_sharing.Node.replica`; not meant to be built directly.
    """

    __slots__ = ("_closed", "_lives", "_map", "_name", "_no_exec", "_on_close", "_poller",
                 "_ref", "_service", "_stop_watch", "_waiters")

    def __init__(self, service: SharingService, name: str, *, no_exec: bool = False,
                 on_close: Callable[[ReplicaView], None] | None = None) -> None:
        self._service = service
        self._name = name
        self._no_exec = no_exec
        self._on_close = on_close
        self._map: SharedMap | None = None
        # The snapshot ref() hands out, renewed by the replica's watcher.
        self._ref: MapRef | None = None
        self._stop_watch: Callable[[], None] | None = None
        self._poller: asyncio.Task[None] | None = None
        # One future per coroutine waiting for the next change (or close).
        self._waiters: list[asyncio.Future[None]] = []
        # Deletions seen: a map created again is a new life, numbered anew.
        self._lives = 0
        self._closed = False

    @property
    def name(self) -> str:
        """The full name of the map."""
        return self._name

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def version(self) -> int:
        """The current version; -1 while the map does not exist (and after close)."""
        ref = self._ref
        return -1 if ref is None else ref.version

    def ref(self) -> MapRef:
        """The snapshot of the current version (immutable, read-only).

        Raises :class:`~caf_sharing.errors.MapNotFoundError` while the map
        does not exist (``await wait_for()`` first) and
        :class:`~caf_sharing.errors.ViewClosedError` once the view is closed.
        """
        ref = self._ref
        if ref is None:
            self._check_open()
            raise MapNotFoundError(self._name)
        return ref

    async def wait_for(self, version: int | None = None,
                       timeout: float | None = None) -> MapRef:
        """The snapshot, once the map exists (and is at ``version`` or newer).

        Raises :class:`TimeoutError` after ``timeout`` seconds, and
        :class:`~caf_sharing.errors.ViewClosedError` if the view closes first.
        """
        async with asyncio.timeout(timeout):
            while True:
                self._check_open()
                ref = self._ref
                if ref is not None and (version is None or ref.version >= version):
                    return ref
                await self._next_change()

    async def changes(self) -> AsyncIterator[MapRef]:
        """The current snapshot (once the map exists), then each newer one.

        Coalesced: nothing queues up, a consumer that takes its time gets the
        newest snapshot next and skips the ones in between, so each snapshot
        yielded has a higher version than the one before (within one life
        of the map: one deleted and created again starts over from its first
        version). It ends when the view closes.
        """
        last, life = -1, self._lives
        while not self._closed:
            ref = self._ref
            if life != self._lives:
                last, life = -1, self._lives
            if ref is not None and ref.version > last:
                last = ref.version
                yield ref
            else:
                await self._next_change()

    async def close(self) -> None:
        """Let go of the replica; ``changes()`` iterators end and ``wait_for``
        raises :class:`~caf_sharing.errors.ViewClosedError`. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        shared, self._map, self._ref = self._map, None, None
        if self._stop_watch is not None:
            self._stop_watch()
        self._wake()
        if self._on_close is not None:
            self._on_close(self)
        if shared is not None:
            try:
                await self._service.release_replica(self._name, shared)
            except SharingError as exc:
                log.warning(
                    "could not release the replica of map %s: %s", self._name, exc)

    async def __aenter__(self) -> ReplicaView:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"version {self.version}"
        return f"<ReplicaView {self._name} {state}>"

    # -- internals ---------------------------------------------------------

    async def _start(self) -> None:
        """Take the node's replica, or start looking for the map (called by
        :meth:`caf_sharing.Node.replica`)."""
        if not await self._attach():
            self._poller = asyncio.get_running_loop().create_task(
                self._poll(), name=f"caf-sharing view {self._name}")

    async def _attach(self) -> bool:
        shared = await self._service.replica_of(self._name, best_effort=True,
                                                no_exec=self._no_exec)
        if shared is None:
            return False
        if self._closed:  # closed while the replica opened
            await self._service.release_replica(self._name, shared)
            return True
        self._map = shared
        self._stop_watch = self._service.watch(self._name, shared, self._changed)
        self._changed()
        return True

    async def _poll(self) -> None:
        first, longest = POLL_DELAYS
        delay = first
        while True:
            await asyncio.sleep(delay)
            if await self._attach():
                return
            delay = min(delay * 2, longest)

    def _changed(self) -> None:
        shared = self._map
        if shared is not None:
            if self._service.is_deleted(self._name, shared):
                if self._ref is not None:
                    self._lives += 1
                self._ref = None
            else:
                self._ref = shared.ref(True)
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():  # a cancelled waiter is done
                waiter.set_result(None)

    async def _next_change(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    def _check_open(self) -> None:
        if self._closed:
            raise ViewClosedError(f"view of map {self._name!r} is closed (closing its node "
                                  "closes it too)")
