"""Command connections: one asyncio protocol per socket, replies parsed by
hiredis as they arrive and handed to the round trips in the order they were
sent.

redis-py's connection reads each reply through a stream reader, a few
coroutine layers and a timeout context of its own: about half the client
time of a commit round trip, measured (50 us against 31 us a round trip, 30
against 16 of CPU). This one parses in ``data_received`` and settles one
future per round trip. Its time-outs cost no timer per round trip: one timer
per connection watches the oldest round trip, and re-arms for the next when
it fires early.

A round trip whose caller stops waiting (cancelled) leaves the connection
usable: its replies still arrive in order and are dropped. A time-out or a
lost connection fails every round trip on it and closes it.

A pub/sub connection (:mod:`.pubsub`) is one in push mode: after its
handshake, every reply goes to ``on_push`` as it is parsed, in
``data_received`` itself, so a change set reaches its replica in the event
loop's pass that read it, not in a task woken in the next one (whose turn
may come after other tasks woken by the same pass, such as the commit whose
reply arrived with it).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import hiredis
from redis import exceptions as rexc
from redis._parsers.base import BaseParser

from .codec import Command, pack
from .options import Endpoint

__all__ = ["Connection", "TLSNotAnsweredError", "open_connection"]

_log = logging.getLogger("caf_sharing.backends.redis")


class TLSNotAnsweredError(rexc.ConnectionError):
    """A TLS connection got no answer in time: from a server never reached
    before, most likely a plaintext port (which waits for a line end a TLS
    hello never sends), and not retried; later, a slow or lost server,
    retried like any lost connection."""


@dataclass(eq=False, slots=True)
class _RoundTrip:
    future: asyncio.Future[list[Any]]
    count: int
    replies: list[Any]
    deadline: float
    timeout: float


class Connection(asyncio.Protocol):
    """One socket to a server, carrying round trips one after the other."""

    def __init__(self) -> None:
        # Error replies become redis-py's exception classes (MovedError,
        # NoScriptError...), as its own parser makes them.
        self._reader = hiredis.Reader(protocolError=rexc.InvalidResponse,
                                      replyError=BaseParser.parse_error)
        self._waiting: deque[_RoundTrip] = deque()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        #: Push mode: receives every reply no round trip waits for.
        self.on_push: Callable[[Any], None] | None = None
        #: Settles with the error that closed the connection.
        self.lost: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()

    @property
    def closed(self) -> bool:
        return self.lost.done()

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        reader, waiting, lost = self._reader, self._waiting, self.lost
        reader.feed(data)
        while waiting or self.on_push is not None:
            try:
                reply = reader.gets()
            except rexc.InvalidResponse as exc:
                self._fail(rexc.ConnectionError(f"the server sent a malformed reply: {exc}"))
                return
            if reply is False:
                return
            if not waiting:
                # Inline, not a method: a reader takes every change set it
                # replicates through here, and a call is a measurable part of it.
                if isinstance(reply, Exception) and not isinstance(reply, rexc.ResponseError):
                    # A refused connection (NOAUTH...): it is of no use any more.
                    self._fail(reply)
                    return
                try:
                    self.on_push(reply)  # type: ignore[misc]  # set: checked by the loop
                except Exception:
                    # A bug in the handler must not take the connection down with it.
                    _log.exception("handling a pushed reply failed: %.200r", reply)
                if lost.done():  # the handler closed it
                    return
                continue
            trip = waiting[0]
            trip.replies.append(reply)
            if len(trip.replies) == trip.count:
                waiting.popleft()
                if not trip.future.done():
                    trip.future.set_result(trip.replies)

    def eof_received(self) -> bool:
        self._fail(rexc.ConnectionError("the server closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(rexc.ConnectionError(
            f"connection lost: {exc}" if exc else "the connection was closed"))

    # -- round trips ---------------------------------------------------------------

    async def exchange(self, packed: bytes, count: int, timeout: float | None) -> list[Any]:
        """Send ``count`` commands, RESP-encoded in ``packed``, in one write;
        their replies, a command that failed in Redis giving its error (a
        :class:`redis.exceptions.ResponseError`) as its reply."""
        self.send(packed)  # its replies cannot come before the round trip is queued
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        deadline = loop.time() + timeout if timeout is not None else float("inf")
        self._waiting.append(_RoundTrip(future, count, [], deadline, timeout or 0.0))
        if self._timer is None and timeout is not None:
            self._timer = loop.call_at(deadline, self._check)
        return await future

    def _check(self) -> None:
        """The timer of the oldest round trip fired: fail it if it is late,
        else watch the one that is oldest now."""
        self._timer = None
        if not self._waiting:
            return
        oldest = self._waiting[0]
        loop = asyncio.get_running_loop()
        if oldest.deadline <= loop.time():
            self._fail(rexc.TimeoutError(f"no reply within {oldest.timeout:.3g}s"))
        elif oldest.deadline != float("inf"):
            self._timer = loop.call_at(oldest.deadline, self._check)

    def send(self, packed: bytes) -> None:
        """Write RESP-encoded commands (whose replies go to ``on_push``,
        unless :meth:`exchange` waits for them)."""
        if self.closed or self._transport is None:
            raise rexc.ConnectionError("the connection is closed")
        self._transport.write(packed)

    def _fail(self, error: Exception) -> None:
        """Fail every round trip on this connection and close it."""
        if not self.lost.done():
            self.lost.set_result(error)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._waiting:
            future = self._waiting.popleft().future
            if not future.done():
                future.set_exception(error)
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        self._fail(rexc.ConnectionError("the connection was closed"))


async def open_connection(endpoint: Endpoint, timeout: float | None) -> Connection:
    """Connect, then authenticate and select the database, within
    ``timeout`` seconds. What fails raises what redis-py raised: a connect
    that takes too long :class:`redis.exceptions.TimeoutError` (a TLS
    handshake :class:`TLSNotAnsweredError`), one refused
    :class:`redis.exceptions.ConnectionError`, an AUTH refused
    :class:`redis.exceptions.AuthenticationError` (or what the server's reply
    stands for), a SELECT refused its :class:`ResponseError`."""
    try:
        return await _open(endpoint, timeout)
    except TimeoutError:  # ours, or the system's (then with no timeout of ours)
        within = "" if timeout is None else f" within {timeout:.3g}s"
        if endpoint.tls is not None:
            # A plaintext server waits for a line end that never comes.
            raise TLSNotAnsweredError(
                f"the server did not answer TLS{within} (a plaintext port? then use "
                "redis://)") from None
        raise rexc.TimeoutError(f"could not connect{within}") from None
    except OSError as exc:  # ssl.SSLError included
        raise rexc.ConnectionError(f"could not connect: {exc}") from None


async def _open(endpoint: Endpoint, timeout: float | None) -> Connection:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        if isinstance(endpoint.address, str):
            _, conn = await loop.create_unix_connection(Connection, endpoint.address)
        else:
            host, port = endpoint.address
            transport, conn = await loop.create_connection(
                Connection, host, port, ssl=endpoint.tls,
                server_hostname=endpoint.server_hostname if endpoint.tls else None)
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        try:
            await _handshake(conn, endpoint)
        except BaseException:
            conn.close()
            raise
    return conn


async def _handshake(conn: Connection, endpoint: Endpoint) -> None:
    commands: list[Command] = []
    if endpoint.password is not None:
        commands.append(("AUTH", endpoint.username, endpoint.password)
                        if endpoint.username else ("AUTH", endpoint.password))
    if endpoint.db:
        commands.append(("SELECT", endpoint.db))
    if not commands:
        return
    for command, reply in zip(commands, await conn.exchange(pack(commands), len(commands), None),
                              strict=True):
        if isinstance(reply, Exception):
            raise reply
        if command[0] == "AUTH" and reply != b"OK":
            raise rexc.AuthenticationError("invalid username or password")
