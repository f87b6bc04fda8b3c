"""Pub/sub: the change sets of subscribed maps, read from one connection per
server that has subscribed channels.

Commits publish each map's change set on the map's channel, which carries the
map's hash tag (see :mod:`.codec`). With sharded pub/sub (Redis 7, and
always on a cluster) the commit script runs ``SPUBLISH`` and readers
``SSUBSCRIBE`` on the server that owns the channel's slot: a message then
travels to that shard's subscribers only, never over the cluster bus. An
older single server gets ``PUBLISH``/``SUBSCRIBE``, the same way.

Each connection is read by a task of its own that calls the handlers.
``subscribe`` returns once the server confirmed the subscription, so a read
made after it misses nothing (per shard, as the read goes to the same
shard). When a connection is lost its task reconnects (with the backoff of
commands, see :mod:`.routing`; past ``max_retries`` attempts it logs an
error, fails waiting subscribers and keeps trying, more slowly, so that a
long outage does not silently end replication), subscribes its channels
again and then tells the listeners which maps may have missed messages, so
that only those are resynced.

On a cluster a channel moves when its slot does. The old owner says so with
an unsolicited ``sunsubscribe`` (slot migrated) or by failing (failover): the
slot map is read again, the channel subscribed at its new owner and, once
that is confirmed, its map resynced.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis import exceptions as rexc

from ...errors import BackendError, BackendUnavailableError
from ...names import map_owner
from ..base import MessageHandler
from .codec import pack, slot_of
from .connection import Connection, open_connection
from .options import Settings
from .routing import FATAL, RETRYABLE, Router, Server

__all__ = ["PubSub"]

_log = logging.getLogger("caf_sharing.backends.redis")

#: Longest pause between two reconnection attempts, past max_retries.
_MAX_SLOW_DELAY = 5.0

#: Told the names of the maps that may have missed messages.
MissedListener = Callable[[Sequence[str]], None]


@dataclass(frozen=True, slots=True)
class _Verbs:
    publish: str
    subscribe: str
    unsubscribe: str
    subscribed: bytes
    unsubscribed: bytes
    message: bytes


_SHARDED = _Verbs("SPUBLISH", "SSUBSCRIBE", "SUNSUBSCRIBE", b"ssubscribe", b"sunsubscribe",
                  b"smessage")
_CLASSIC = _Verbs("PUBLISH", "SUBSCRIBE", "UNSUBSCRIBE", b"subscribe", b"unsubscribe",
                  b"message")


@dataclass(eq=False, slots=True)
class _Subscription:
    handler: MessageHandler
    active: bool = True


@dataclass(eq=False, slots=True)
class _Channel:
    """The local subscribers of one channel."""

    key: bytes
    map_name: str
    #: The actor whose hash tag the channel carries, and its slot.
    owner: str
    slot: int
    link: _Link
    #: Replaced, never changed in place: a push walks it while a handler
    #: may unsubscribe, with no copy per message.
    subs: tuple[_Subscription, ...] = ()
    #: The server confirmed the subscription on the link's current connection.
    active: bool = False
    #: Messages may have been missed: resync the map once subscribed again.
    missed: bool = False
    #: ``subscribe`` calls waiting for that confirmation.
    waiters: list[asyncio.Future[None]] = field(default_factory=list)

    def confirm(self) -> None:
        self.active = True
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.waiters.clear()

    def fail(self, error: BaseException) -> None:
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_exception(error)
        self.waiters.clear()


@dataclass(eq=False, slots=True)
class _Sent:
    """A command sent on a link, waiting for its replies."""

    #: The kind of reply it gets: (s)subscribe, (s)unsubscribe or pong.
    reply: bytes
    #: The channels still to be acknowledged, in order, each with the local
    #: channel its acknowledgement confirms.
    due: deque[tuple[bytes, _Channel | None]]


class _Link:
    """One pub/sub connection to one server, and the channels homed on it."""

    def __init__(self, hub: PubSub, server: Server) -> None:
        self.hub = hub
        self.server = server
        self.channels: dict[bytes, _Channel] = {}
        self._sent: deque[_Sent] = deque()
        self._conn: Connection | None = None
        self._task: asyncio.Task[None] | None = None
        #: Replies and pushes read so far (the health check watches it).
        self.heard = 0
        #: Set while the connection is down past max_retries.
        self.down: BackendUnavailableError | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"caf-sharing pub/sub {self.server.name}")

    async def stop(self) -> None:
        """Stop reading (from its own task: it ends once it has no channels)."""
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def send(self, command: str, reply: bytes,
                   channels: list[tuple[bytes, _Channel | None]]) -> None:
        """Send ``command`` on the live connection, if there is one (when it
        comes back, the link subscribes all its channels anyway)."""
        conn = self._conn
        if conn is None or conn.closed:
            return
        # Registered before sending: Redis answers commands in order.
        self._sent.append(_Sent(reply, deque(channels)))
        try:
            conn.send(pack([(command, *(key for key, _ in channels))]))
        except RETRYABLE as exc:
            # The reader sees the same failure and reconnects.
            _log.debug("Redis at %s: %s failed: %s", self.server.name, command, exc)

    async def subscribe(self, channels: Sequence[_Channel]) -> None:
        """Subscribe ``channels`` (sharded: one command per slot, as a cluster
        refuses channels of several slots in one)."""
        verbs = self.hub.verbs
        if verbs is _CLASSIC:
            if channels:
                await self.send(verbs.subscribe, verbs.subscribed, [(c.key, c) for c in channels])
            return
        by_slot: dict[int, list[tuple[bytes, _Channel | None]]] = {}
        for channel in channels:
            by_slot.setdefault(channel.slot, []).append((channel.key, channel))
        for group in by_slot.values():
            await self.send(verbs.subscribe, verbs.subscribed, group)

    def _delay(self, failures: int) -> float:
        settings = self.hub.settings
        # Past max_retries: keep trying, up to _MAX_SLOW_DELAY apart.
        longest = None if failures <= settings.max_retries \
            else max(settings.max_retry_delay, _MAX_SLOW_DELAY)
        return settings.backoff(failures, longest)

    async def _run(self) -> None:
        settings = self.hub.settings
        # The handshake too: a server that accepts but never answers (behind
        # a dead link) would otherwise hold the link for good.
        connect_timeout = settings.connect_timeout \
            + (settings.socket_timeout or 0)
        failures = 0
        lost = False
        while True:
            try:
                conn = await open_connection(self.server.pool.endpoint, connect_timeout)
            except Exception as exc:  # refused, timed out, bad TLS setup...
                failures += 1
                if failures > settings.max_retries:
                    if self.down is None:
                        _log.error("pub/sub connection to Redis at %s still down after %d "
                                   "attempts (%s); retrying", self.server.name, failures, exc)
                    self.down = BackendUnavailableError(
                        f"Redis at {self.hub.url} is unavailable (subscribe to "
                        f"{self.server.name}, {failures} attempts): {exc}")
                    for channel in self.channels.values():
                        channel.fail(self.down)
                if self.hub.router.cluster:
                    # A replica may have taken over: channels move to it.
                    await self.hub.relocate()
                    if not self.channels:
                        return
                await asyncio.sleep(self._delay(failures))
                continue
            if lost:
                _log.info("pub/sub connection to Redis at %s restored after %d failed "
                          "attempts", self.server.name, failures)
            failures = 0
            self.down = None
            try:
                await self._serve(conn, lost)
            except (*RETRYABLE, *FATAL) as exc:
                _log.warning("pub/sub connection to Redis at %s lost: %s", self.server.name, exc)
            except Exception:
                _log.exception("pub/sub reader of Redis at %s failed; reconnecting",
                               self.server.name)
            finally:
                self._conn = None
                for channel in self.channels.values():
                    channel.active = False
                conn.close()
            lost = True
            if self.hub.router.cluster:
                await self.hub.relocate()
                if not self.channels:
                    return

    async def _serve(self, conn: Connection, reconnected: bool) -> None:
        """Subscribe everything on a fresh connection, then take what it
        pushes (:meth:`_on_push`, as the event loop reads it) until it fails
        or, with a health check, stays silent: PINGed once nothing came for
        ``health_check_interval`` seconds (counted in halves of it), it is
        dropped when nothing comes back within as long again."""
        self._conn = conn
        self._sent = deque()
        if reconnected:
            for channel in self.channels.values():
                channel.missed = True
        conn.on_push = self._on_push
        await self.subscribe(list(self.channels.values()))
        interval = self.hub.settings.health_check_interval
        heard, quiet = self.heard, 0
        while not (await asyncio.wait((conn.lost,), timeout=interval / 2 or None))[0]:
            quiet = 0 if self.heard != heard else quiet + 1
            heard = self.heard
            if quiet == 2:
                await self.send("PING", b"pong", [])
            elif quiet == 4:
                raise rexc.TimeoutError("pub/sub connection does not answer PING")
        raise conn.lost.result()

    def _on_push(self, message: Any) -> None:
        """A push or a reply read off the connection: count it in ``heard``
        and hand it on (a message to its channel's handlers, here: each
        change set a reader replicates comes this way, and a call less per
        message is measurable)."""
        self.heard += 1
        if type(message) is list and message[0] == self.hub.verbs.message:
            channel = self.channels.get(message[1])
            if channel is None:
                return
            payload = message[2]
            for sub in channel.subs:
                if sub.active:
                    try:
                        sub.handler(payload)
                    except Exception:
                        _log.exception("handler %r of map %s failed", sub.handler,
                                       channel.map_name)
        elif isinstance(message, rexc.ResponseError):
            self._on_error(message)
        elif isinstance(message, bytes):  # PONG on a connection with no subscription
            self._on_reply([b"pong", b""])
        else:
            self._on_reply(message)

    def _on_reply(self, message: list[Any]) -> None:
        """Match a (un)subscribe acknowledgement or a pong to what was sent."""
        kind = message[0]
        head = self._sent[0] if self._sent else None
        if head is None or head.reply != kind or (head.due and head.due[0][0] != message[1]):
            if kind == self.hub.verbs.unsubscribed:
                self._pushed_out(message[1])
            else:
                _log.warning("Redis at %s: unexpected pub/sub reply %r", self.server.name,
                             message[:2])
            return
        missed: list[str] = []
        if head.due:
            key, channel = head.due.popleft()
            if channel is not None and self.channels.get(key) is channel:
                channel.confirm()
                if channel.missed:
                    channel.missed = False
                    missed.append(channel.map_name)
        if not head.due:
            self._sent.popleft()
        if missed:
            self.hub.notify(missed)

    def _pushed_out(self, key: bytes) -> None:
        """The server dropped a subscription of ours on its own: it no longer
        owns the channel's slot (the slot migrated)."""
        channel = self.channels.get(key)
        if channel is None:
            return
        _log.info("Redis at %s no longer serves the channel of map %s: moving it",
                  self.server.name, channel.map_name)
        channel.active = False
        channel.missed = True
        self.hub.moved_out()

    def _on_error(self, error: rexc.ResponseError) -> None:
        """A command on the connection failed: a cluster says where the
        channel lives now (MOVED), or the server refuses it (an ACL without
        access to the channels, say): fail whoever waits for it."""
        head = self._sent.popleft() if self._sent else None
        if head is None:
            _log.error("Redis at %s: pub/sub error %s", self.server.name, error)
            return
        channels = [c for _, c in head.due if c is not None and self.channels.get(c.key) is c]
        if isinstance(error, rexc.MovedError | rexc.TryAgainError | rexc.ClusterDownError) \
                and self.hub.router.cluster:
            if isinstance(error, rexc.MovedError):
                self.hub.router.moved(error)
            for channel in channels:
                channel.missed = True
            self.hub.moved_out()
            return
        _log.error("Redis at %s refused a pub/sub command: %s", self.server.name, error)
        refused = BackendError(f"Redis at {self.hub.url} refused to subscribe: {error}")
        for channel in channels:
            channel.fail(refused)


class PubSub:
    """The subscriptions of one backend."""

    def __init__(self, router: Router, settings: Settings) -> None:
        self.router = router
        self.settings = settings
        self.url = settings.url
        self.verbs = _SHARDED if router.cluster else _CLASSIC
        self._channels: dict[bytes, _Channel] = {}
        self._links: dict[Server, _Link] = {}
        self._listeners: list[MissedListener] = []
        self._moving: asyncio.Task[None] | None = None
        self._closed = False
        router.listeners.append(self._topology_changed)

    @property
    def publish(self) -> str:
        """The command commits publish change sets with, to match the readers'."""
        return self.verbs.publish

    def use_sharded(self, sharded: bool) -> None:
        """Choose the verbs (before the first subscription)."""
        self.verbs = _SHARDED if sharded else _CLASSIC

    def add_listener(self, listener: MissedListener) -> None:
        self._listeners.append(listener)

    def notify(self, names: Sequence[str]) -> None:
        for listener in list(self._listeners):
            try:
                listener(names)
            except Exception:
                _log.exception("reconnect listener %r failed", listener)

    def _link(self, server: Server) -> _Link:
        link = self._links.get(server)
        if link is None:
            link = self._links[server] = _Link(self, server)
        return link

    async def subscribe(self, key: bytes, name: str, handler: MessageHandler) -> None:
        channel = self._channels.get(key)
        new = channel is None
        if channel is None:
            owner = map_owner(name)
            link = self._link(self.router.server_for(owner))
            channel = self._channels[key] = _Channel(key, name, owner, slot_of(owner), link)
            link.channels[key] = channel
        sub = _Subscription(handler)
        channel.subs += (sub,)
        waiter: asyncio.Future[None] | None = None
        if not channel.active:
            if channel.link.down is not None:
                await self._drop(channel, sub)
                raise channel.link.down
            waiter = asyncio.get_running_loop().create_future()
            channel.waiters.append(waiter)
        try:
            if new:
                channel.link.start()
                await channel.link.subscribe([channel])
            if waiter is not None:
                await waiter
        except BaseException:
            await self._drop(channel, sub)
            raise

    async def unsubscribe(self, key: bytes, handler: MessageHandler) -> None:
        channel = self._channels.get(key)
        if channel is None:
            return
        for sub in reversed(channel.subs):
            if sub.handler == handler:
                await self._drop(channel, sub)
                return

    async def _drop(self, channel: _Channel, sub: _Subscription) -> None:
        sub.active = False
        channel.subs = tuple(s for s in channel.subs if s is not sub)
        if not channel.subs and self._channels.get(channel.key) is channel:
            del self._channels[channel.key]
            link = channel.link
            del link.channels[channel.key]
            await link.send(self.verbs.unsubscribe, self.verbs.unsubscribed,
                            [(channel.key, None)])

    # -- channels moving between servers ----------------------------------------

    def _topology_changed(self) -> None:
        if self._channels and not self._closed:
            self._schedule_move()

    def moved_out(self) -> None:
        """A server no longer serves some of our channels (marked ``missed``
        and inactive): find their owners again."""
        self._schedule_move(refresh=True)

    def _schedule_move(self, refresh: bool = False) -> None:
        if self._moving is None or self._moving.done():
            self._moving = asyncio.get_running_loop().create_task(self._move(refresh))

    async def _move(self, refresh: bool) -> None:
        if refresh:
            await asyncio.sleep(self.settings.backoff(1))
            moved = await self.relocate()
        else:
            moved = await self.rehome()
        # Channels pushed out that still map to the same server: the slot map
        # was not updated yet; subscribe them again there.
        stale = [c for c in self._channels.values()
                 if c.missed and not c.active and c not in moved]
        for link in {id(c.link): c.link for c in stale}.values():
            await link.subscribe([c for c in stale if c.link is link])

    async def relocate(self) -> set[_Channel]:
        """Read the slot map again, then :meth:`rehome`."""
        try:
            await self.router.refresh()
        except BackendUnavailableError as exc:
            _log.warning("%s", exc)
        return await self.rehome()

    async def rehome(self) -> set[_Channel]:
        """Move every channel to the link of its slot's current owner; the
        channels moved."""
        moved: dict[_Link, list[_Channel]] = {}
        for channel in list(self._channels.values()):
            owner = self.router.server_for(channel.owner)
            if channel.link.server is owner:
                continue
            old = channel.link
            del old.channels[channel.key]
            if old.channels:
                # The old server may still hold the subscription (a MOVED
                # seen by commands first): drop it there.
                await old.send(self.verbs.unsubscribe, self.verbs.unsubscribed,
                               [(channel.key, None)])
            channel.link = self._link(owner)
            channel.link.channels[channel.key] = channel
            channel.active = False
            channel.missed = True
            moved.setdefault(channel.link, []).append(channel)
        for link, channels in moved.items():
            _log.info("pub/sub: %d channel(s) move to Redis at %s", len(channels),
                      link.server.name)
            link.start()
            await link.subscribe(channels)
        for server, link in list(self._links.items()):
            if not link.channels:
                del self._links[server]
                await link.stop()
        return {c for channels in moved.values() for c in channels}

    async def close(self) -> None:
        self._closed = True
        if self._moving is not None:
            self._moving.cancel()
            await asyncio.gather(self._moving, return_exceptions=True)
        for link in list(self._links.values()):
            await link.stop()
        self._links.clear()
        closed = BackendUnavailableError(f"backend {self.url} is closed")
        for channel in self._channels.values():
            channel.fail(closed)
        self._channels.clear()

