"""Connections and routing: which server each command goes to, and the
retries of a round trip.

A :class:`Router` sends a list of commands, each tagged with the actor whose
keys it touches (the keys' hash tag), as one pipeline per server, and returns
the replies in order. On one server every command goes to it. On a Redis
Cluster the router keeps the slot map (``CLUSTER SLOTS``), sends each
server's share in parallel and follows the cluster's answers:

* ``MOVED``: the slot has a new owner. Note it, refresh the slot map, send
  again to the new owner.
* ``ASK``: the slot is migrating and the key is already on the target. Send
  again there, after ``ASKING``.
* ``TRYAGAIN`` (a multi-key command meets a slot mid-migration),
  ``CLUSTERDOWN`` and ``MASTERDOWN`` (a failover in progress): send again
  after a pause.
* ``NOSCRIPT`` (that server restarted or flushed its scripts): load the
  scripts on the server that answered it, send again.

Sending a command again is safe for everything the backend sends. A
redirected or refused command did not run. After a lost connection it may
have run, and then: reads and lease scripts set or return absolute values,
and a commit is idempotent by txid, so one that landed before its reply was
lost answers "dup" the second time (``lua/commit.lua``).

Connection errors and timeouts are retried ``max_retries`` times, after
pauses that double from ``retry_delay`` up to ``max_retry_delay``, each
jittered (:meth:`Settings.backoff`), within ``call_timeout`` (on a cluster the slot map is
refreshed first: the server may have died and a replica taken over). Each
attempt may take ``socket_timeout`` seconds, plus time in proportion to what
it carries (:func:`allowance`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis import exceptions as rexc

from ...errors import BackendError, BackendUnavailableError
from ._resp import pack_command
from .codec import Command, pack, slot_of
from .connection import Connection, TLSNotAnsweredError, open_connection
from .options import Address, Endpoint, Settings
from .scripts import SCRIPTS

__all__ = ["FATAL", "RETRYABLE", "Router", "Server", "TLSNotAnsweredError", "allowance"]

_log = logging.getLogger("caf_sharing.backends.redis")

#: Errors after which a round trip is tried again (the connection is reset).
RETRYABLE = (rexc.ConnectionError, rexc.TimeoutError, OSError)
#: Connection errors that retrying cannot fix.
FATAL = (rexc.AuthenticationError, rexc.AuthorizationError)
#: Replies after which a command is sent again, after a pause, unchanged.
_WAIT_AND_RETRY = (rexc.TryAgainError, rexc.ClusterDownError)
#: The most redirections one command follows in one call (a cluster whose
#: nodes disagree for good), and how many it follows at once before pausing
#: between two (nodes disagree for a moment in a failover).
_MAX_REDIRECTS = 64
_EAGER_REDIRECTS = 2
#: The slowest a healthy server takes in a request (reading and running it
#: included), bytes per second: a 60 MB commit creating a 1M-key map took
#: 2-3 s on a loaded 2-core machine, about 20 MB/s.
_MIN_SEND_RATE = 10_000_000
#: The same for replies, in map fields per second (HGETALL of 1M fields: ~1 s).
_MIN_FIELD_RATE = 500_000
SLOTS = 16384
_ASKING = pack([("ASKING",)])
_CLUSTER_SLOTS = pack([("CLUSTER", "SLOTS")])


def allowance(sent: int, fields: int = 0) -> float:
    """Seconds a round trip may take beyond ``socket_timeout`` for the work it
    carries: ``sent`` bytes of requests, ``fields`` map fields in its reply.
    Most round trips are small (commits go in batches of at most
    max_pending_updates, large maps are read in chunks) and get almost none,
    so a dead server is noticed quickly; a commit that creates a huge map
    still gets the time it needs."""
    return sent / _MIN_SEND_RATE + fields / _MIN_FIELD_RATE


def _limit(timeout: float | None, deadline: float | None) -> float | None:
    """How long the next attempt may take: ``timeout``, cut short by ``deadline``."""
    if deadline is None:
        return timeout
    left = max(deadline - time.monotonic(), 0.001)
    return left if timeout is None else min(timeout, left)


class _Pool:
    """Command connections to one server, each used by one round trip at a time.

    Ours (:mod:`.connection`), not redis-py's: its pool and pipeline add a
    SCRIPT EXISTS round trip per pipeline with scripts and retry on their
    own, and its connection costs about half a commit's client time. One
    timeout bounds the whole round trip, connecting included.
    """

    def __init__(self, endpoint: Endpoint, size: int) -> None:
        #: How to reach the server (pub/sub opens its own connection with it).
        self.endpoint = endpoint
        self._idle: list[Connection] = []
        self._all: set[Connection] = set()
        self._slots = asyncio.Semaphore(size)
        self.closed = False

    async def exchange(self, packed: bytes, count: int, timeout: float | None) -> list[Any]:
        """Send ``count`` commands, RESP-encoded in ``packed``, in one write and
        read every reply within ``timeout`` seconds (from the moment a
        connection is free); a command that failed in Redis gives its
        ResponseError as its reply."""
        async with self._slots:
            if self.closed:
                raise rexc.ConnectionError("the connection pool is closed")
            conn = None
            while self._idle and conn is None:
                conn = self._idle.pop()
                if conn.closed:
                    self._all.discard(conn)
                    conn = None
            if conn is None:
                started = time.monotonic()
                conn = await self._open(timeout)
                if timeout is not None:
                    timeout = max(timeout - (time.monotonic() - started), 0.001)
            try:
                replies = await conn.exchange(packed, count, timeout)
            finally:
                # A caller that stopped waiting leaves the connection usable:
                # the replies it did not wait for are dropped as they come.
                if conn.closed:
                    self._all.discard(conn)
                else:
                    self._idle.append(conn)
        for reply in replies:
            # Replies that mean the connection is refused (NOAUTH, too many
            # clients) fail the round trip as redis-py raised them.
            if isinstance(reply, rexc.ConnectionError):
                raise reply
        return replies

    async def _open(self, timeout: float | None) -> Connection:
        conn = await open_connection(self.endpoint, timeout)
        self._all.add(conn)
        return conn

    async def close(self) -> None:
        self.closed = True
        for conn in self._all:
            conn.close()
        self._all.clear()
        self._idle.clear()


@dataclass(eq=False, slots=True)
class Server:
    """One Redis server the backend talks to, and its command connections."""

    address: Address
    pool: _Pool
    #: The scripts must be loaded before its next EVALSHA (it answered NOSCRIPT).
    reload: bool = False
    #: It answered once: it speaks our protocol (TLS or not, as configured).
    reached: bool = False

    @property
    def name(self) -> str:
        return self.address if isinstance(self.address, str) \
            else f"{self.address[0]}:{self.address[1]}"


@dataclass(slots=True)
class Routed:
    """The replies of :meth:`Router.call`, in the order of its commands."""

    replies: list[Any]
    #: Per command, the replies of the tail commands of the round trip that
    #: carried it (empty without a tail).
    tails: list[Sequence[Any]] = field(default_factory=list)


class Router:
    """The servers of one backend and the way to each actor's slot."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.url = settings.url
        self._servers: dict[Address, Server] = {}
        self.cluster = settings.cluster
        self._slots: list[Server | None] = [None] * SLOTS
        self._seeds = [self.server(address) for address in settings.seeds]
        self._refreshing: asyncio.Task[None] | None = None
        # A node that answers nothing must not hold the others' answers up.
        self._refresh_timeout = settings.socket_timeout or settings.call_timeout or 1.0
        self.closed = False
        #: Round trips sent again (after a lost connection, a redirection...).
        self.retries = 0
        #: Called whenever the slot map changes (pub/sub moves its channels).
        self.listeners: list[Callable[[], None]] = []

    # -- servers and slots ---------------------------------------------------

    def server(self, address: Address) -> Server:
        server = self._servers.get(address)
        if server is None:
            server = self._servers[address] = Server(
                address, _Pool(self._settings.endpoint(address),
                               self._settings.max_connections))
        return server

    def server_for(self, owner: str) -> Server:
        """The server that holds actor ``owner``'s keys, as far as known."""
        if not self.cluster:
            return self._seeds[0]
        return self._slots[slot_of(owner)] or self._seeds[0]

    def primaries(self) -> list[Server]:
        """Every server known to own slots (the seed, on one server)."""
        if not self.cluster:
            return [self._seeds[0]]
        return list({id(s): s for s in self._slots if s is not None}.values())

    async def servers_now(self) -> list[Server]:
        """Every primary, the slot map read again first on a cluster."""
        if self.cluster:
            await self.refresh()
        return self.primaries()

    async def refresh(self) -> None:
        """Read the slot map again; concurrent callers share one read."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
        await asyncio.shield(self._refreshing)

    async def _refresh(self) -> None:
        if not self.cluster:
            return
        known = [*self.primaries(), *self._seeds, *self._servers.values()]
        errors: list[str] = []
        for server in {id(s): s for s in known}.values():
            try:
                reply = await self._exchange(server, [_CLUSTER_SLOTS], self._refresh_timeout)
            except (*RETRYABLE, *FATAL) as exc:
                errors.append(f"{server.name}: {exc}")
                continue
            if isinstance(reply[0], rexc.ResponseError):
                errors.append(f"{server.name}: {reply[0]}")
                continue
            self._apply_slots(server, reply[0])
            return
        raise BackendUnavailableError(
            f"Redis Cluster at {self.url}: no node gave the slot map ({'; '.join(errors)})")

    def _apply_slots(self, asked: Server, ranges: Sequence[Any]) -> None:
        slots: list[Server | None] = [None] * SLOTS
        for start, end, primary, *_replicas in ranges:
            host = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
            if not host or host == "?":
                # The node does not know its own address: the one we asked it by.
                host = asked.address[0] if isinstance(asked.address, tuple) else host
            server = self.server((host, int(primary[1])))
            for slot in range(int(start), int(end) + 1):
                slots[slot] = server
        if slots != self._slots:
            self._slots = slots
            self._changed()

    def moved(self, error: rexc.MovedError) -> None:
        """Note a slot's new owner, as a MOVED reply gave it."""
        server = self.server(error.node_addr)
        if self._slots[error.slot_id] is not server:
            self._slots[error.slot_id] = server
            self._changed()

    def _changed(self) -> None:
        for listener in list(self.listeners):
            listener()

    # -- round trips ------------------------------------------------------------

    async def _exchange(self, server: Server, parts: Sequence[bytes],
                        timeout: float | None) -> list[Any]:
        """One attempt: ``parts`` (RESP-encoded commands) to ``server``."""
        if server.reload:
            server.reload = False
            loaded = await server.pool.exchange(
                pack([("SCRIPT", "LOAD", s.source) for s in SCRIPTS]), len(SCRIPTS), timeout)
            refused = [r for r in loaded if isinstance(r, rexc.ResponseError)]
            if refused:
                server.reload = True
                raise BackendError(f"Redis at {server.name} cannot load our scripts: "
                                   f"{refused[0]}")
        replies = await server.pool.exchange(b"".join(parts), len(parts), timeout)
        server.reached = True
        return replies

    async def _attempt(self, server: Server, parts: Sequence[bytes],
                       timeout: float | None) -> list[Any] | BaseException:
        try:
            return await self._exchange(server, parts, timeout)
        except (*RETRYABLE, *FATAL, BackendError) as exc:
            return exc
        except rexc.ResponseError as exc:
            # Raised, not replied: opening the connection failed (SELECT, AUTH).
            hint = ""
            if "DB index is out of range" in str(exc):
                hint = (" (the URL's /DB is beyond the server's number of databases, its "
                        "'databases' setting, 16 by default)")
            return BackendError(f"Redis at {server.name} refused the connection: {exc}{hint}")

    async def call(self, commands: Sequence[Command], owners: Sequence[str] | str, what: str,
                   *, tail: Callable[[str], Sequence[Command]] | None = None,
                   extra: float = 0.0,
                   partial: bool = False, to: Server | None = None) -> Routed:
        """Send ``commands`` (``owners[i]``: the actor whose keys command i
        touches; one str for all) and return their replies, a command that
        failed in Redis giving its ResponseError. ``to`` sends them all to
        that server instead (keyless commands). ``tail(owner)`` ends every
        round trip, given the owner of one of the round trip's commands (the
        WAIT of commits). ``extra``: seconds more per attempt.

        Past the retries, a server's failure raises
        :class:`BackendUnavailableError`; with ``partial``, its commands get
        that error as their reply instead and the other servers' replies
        stand (one shard down fails only its own actors)."""
        if self.closed:
            raise BackendUnavailableError(f"backend {self.url} is closed")
        settings = self._settings
        parts = [pack_command(c) for c in commands]
        extra += allowance(sum(map(len, parts)))
        timeout = None if settings.socket_timeout is None else settings.socket_timeout + extra
        deadline = None if settings.call_timeout is None \
            else time.monotonic() + settings.call_timeout + extra
        count = len(commands)
        owner_of: Callable[[int], str] = (lambda _: owners) if isinstance(owners, str) \
            else owners.__getitem__
        first: list[Any] | BaseException | None = None
        if not self.cluster:
            # One server, and most round trips answer at once: no grouping,
            # no bookkeeping of redirections, unless a reply asks for them.
            limit = _limit(timeout, deadline)
            whole = parts if tail is None else [*parts, *map(pack_command,
                                                            tail(owner_of(0)))]
            first = await self._attempt(to or self._seeds[0], whole, limit)
            if isinstance(first, list) and \
                    not any(isinstance(reply, rexc.ResponseError) for reply in first):
                return Routed(first[:count], [first[count:]] * count if tail is not None else [])
        routed = Routed([None] * count, [()] * count if tail is not None else [])
        todo: Sequence[int] = range(count)
        asking: dict[int, Server] = {}
        redirects = [0] * count
        failures = pauses = 0
        while True:
            groups: dict[Server, list[int]] = {}
            for i in todo:
                target = to or asking.get(i) or self.server_for(owner_of(i))
                groups.setdefault(target, []).append(i)
            limit = _limit(timeout, deadline)
            sends: list[tuple[Server, list[int], list[bytes]]] = []
            for server, indices in groups.items():
                sent: list[bytes] = []
                for i in indices:
                    if i in asking:
                        sent.append(_ASKING)
                    sent.append(parts[i])
                if tail is not None:
                    sent.extend(map(pack_command, tail(owner_of(indices[0]))))
                sends.append((server, indices, sent))
            if first is not None:  # what the one server already answered
                results, first = [first], None
            elif len(sends) == 1:
                results = [await self._attempt(sends[0][0], sends[0][2], limit)]
            else:
                results = await asyncio.gather(
                    *(self._attempt(server, sent, limit) for server, _, sent in sends))
            again: list[int] = []
            pause = refresh = False
            failure: BaseException | None = None
            failed_on: Server | None = None
            for (server, indices, _), result in zip(sends, results, strict=True):
                if isinstance(result, BaseException):
                    if isinstance(result, TLSNotAnsweredError) and not server.reached:
                        raise BackendUnavailableError(
                            f"Redis at {server.name} ({what}): {result}") from None
                    if isinstance(result, FATAL):
                        raise BackendUnavailableError(
                            f"Redis at {server.name} refused the connection ({what}): "
                            f"{result} (check the user name and password: in the URL, the "
                            "username/password options, or the server's ACL)") from None
                    if isinstance(result, BackendError):
                        raise result
                    failure, failed_on = result, server
                    again.extend(indices)
                    refresh = self.cluster
                    continue
                body = iter(result)
                answered: list[int] = []
                for i in indices:
                    if asking.pop(i, None) is not None:
                        next(body)  # ASKING's own OK
                    reply = next(body)
                    if isinstance(reply, rexc.ResponseError) and to is None \
                            and self._redirected(server, i, reply, asking):
                        redirects[i] += 1
                        if redirects[i] > _MAX_REDIRECTS:
                            raise BackendError(
                                f"Redis Cluster at {self.url}: {what}: still redirected "
                                f"after {_MAX_REDIRECTS} tries ({reply})")
                        again.append(i)
                        pause = pause or isinstance(reply, _WAIT_AND_RETRY) \
                            or redirects[i] > _EAGER_REDIRECTS
                        refresh = refresh or isinstance(reply, rexc.MovedError)
                        continue
                    routed.replies[i] = reply
                    answered.append(i)
                if tail is not None:
                    tail_replies = list(body)  # what is left: the tail's
                    for i in answered:
                        routed.tails[i] = tail_replies
            if not again:
                return routed
            todo = again
            self.retries += 1
            pauses += 1
            delay = settings.backoff(pauses)
            if failure is not None:
                failures += 1
                late = deadline is not None and time.monotonic() + delay >= deadline
                if failures > settings.max_retries or late:
                    where = f" (node {failed_on.name})" if self.cluster and failed_on else ""
                    error = BackendUnavailableError(
                        f"Redis at {self.url}{where} is unavailable ({what}, {failures} "
                        f"attempts): {failure}")
                    if not partial:
                        raise error
                    # What is left to do are the commands of the failed servers.
                    for i in todo:
                        routed.replies[i] = error
                    return routed
                _log.debug("Redis at %s: %s failed (%s), retry %d of %d", self.url, what,
                           failure, failures, settings.max_retries)
            elif deadline is not None and time.monotonic() >= deadline:
                raise BackendUnavailableError(
                    f"Redis Cluster at {self.url}: {what}: the cluster kept redirecting "
                    f"for {settings.call_timeout}s (a slot migrating or a failover)")
            if refresh:
                try:
                    await self.refresh()
                except BackendUnavailableError as exc:
                    _log.debug("%s", exc)
            if failure is not None or pause:
                await asyncio.sleep(delay)
            else:
                pauses -= 1  # went again at once

    def _redirected(self, server: Server, index: int, reply: rexc.ResponseError,
                    asking: dict[int, Server]) -> bool:
        """Whether ``reply`` means: send the command again (noting where)."""
        if isinstance(reply, rexc.MovedError):
            self.moved(reply)
            return True
        if isinstance(reply, rexc.AskError):
            asking[index] = self.server(reply.node_addr)
            return True
        if isinstance(reply, rexc.NoScriptError):
            _log.info("Redis at %s lost our scripts; loading them again", server.name)
            server.reload = True
            return True
        return isinstance(reply, _WAIT_AND_RETRY)

    async def call_one(self, command: Command, owner: str, what: str,
                       extra: float = 0.0) -> Any:
        """One command's reply; a Redis error raises :class:`BackendError`."""
        reply = (await self.call((command,), owner, what, extra=extra)).replies[0]
        if isinstance(reply, rexc.ResponseError):
            raise BackendError(f"Redis at {self.url}: {what} failed: {reply}")
        return reply

    async def on_each_primary(self, commands: Sequence[Command], what: str) -> list[list[Any]]:
        """Send ``commands`` to every primary (on a cluster, after reading the
        slot map); their replies, per server."""
        servers = await self.servers_now()
        if not servers:
            raise BackendError(f"Redis Cluster at {self.url} has no slots assigned")
        routed = await asyncio.gather(*(self.call(commands, "", what, to=server)
                                        for server in servers))
        return [r.replies for r in routed]

    async def close(self) -> None:
        self.closed = True
        if self._refreshing is not None:
            self._refreshing.cancel()
        for server in self._servers.values():
            await server.pool.close()
