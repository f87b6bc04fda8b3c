"""The Redis backend: ``redis://``, ``rediss://`` (TLS) and ``unix://``.

Layout (``app`` namespaces everything; the actor name in braces is a Redis
Cluster hash tag, so all keys of one actor, its maps included, share a slot
and one script call can touch them all)::

    caf:{app}:{<actor>}:cp            hash: "txid", "blob" (the checkpoint JSON)
    caf:{app}:{<actor>}:recent        list: earlier txids, newest first (retried commits)
    caf:{app}:{<actor>}:lease         string: node id, with a TTL
    caf:{app}:{<owner>}:lineage       hash: map name -> txid that made its version
    caf:{app}:{<owner>}:map:<name>    hash: "__ca_version__" -> int, key -> JSON value
    caf:{app}:{<owner>}:chan:<name>   pub/sub channel of the map's change sets

Every update runs in one of the Lua scripts shipped in ``backends/lua``
(loaded with :mod:`importlib.resources`, called with EVALSHA and loaded again
on NOSCRIPT). A transaction is one script call: all checks (txid, lease,
versions compared as numbers), then all writes, then one PUBLISH per change
set. The client encodes every value and every published payload with orjson;
the scripts never decode JSON.

Group commit: a commit made when no commit round trip is in flight is sent at
once, by the calling task itself (an idle writer never waits). While one is in
flight, later commits queue and go together in the next round trip, as one
pipeline of EVALSHAs: when the round trip in flight ends, or when
``max_pending_updates`` commits are queued, or at the latest
``coalescing_interval`` seconds after the first of them queued (then even
with the previous round trip still in flight). Each commit gets its own
result or error; a caller cancelled while its commit is still queued
withdraws it.

Replica acknowledgement: with ``wait_replicas=N`` every commit round trip
ends with ``WAIT N wait_timeout_ms`` on the same connection, so one WAIT
covers the whole batch. A commit is acknowledged only when WAIT counts N
replicas; short of that it raises :class:`DurabilityError` (the primary holds
it, a failover may lose it). A PUBLISH to an unwatched channel goes just
before the WAIT: WAIT only covers what its own connection wrote, and a commit
that landed in an earlier attempt (a lost reply) writes nothing the second
time, yet must be covered too. Only commits wait: the runtime writes through
commits alone; ``create_map``, ``delete_map`` and leases do not.

Failures: each round trip is retried ``max_retries`` times, ``retry_delay``
seconds apart, on connection errors and timeouts, for at most
``call_timeout`` seconds; then the call fails with
:class:`BackendUnavailableError`. Each attempt may take ``socket_timeout``
seconds, plus time in proportion to what it carries (see :func:`_allowance`),
plus the WAIT's own timeout. The defaults fit a lease of 10 s: against a
server that answers nothing, a call fails after about 3 s. Retrying a commit
is safe: the checkpoint carries the txid, so a commit that did land the first
time returns ``False``.

At start the backend warns (once) when the server's ``maxmemory-policy`` is
not ``noeviction``: an eviction silently drops checkpoints, leases or maps.

Pub/sub runs on a connection of its own, read by one task that calls the
handlers. ``subscribe`` returns once Redis confirmed the subscription, so a
read made after it misses nothing. When that connection is lost the task
reconnects (``retry_delay`` apart; past ``max_retries`` attempts it logs an
error, fails waiting subscribers and keeps trying, more slowly, so that a
long outage does not silently end replication), subscribes every channel
again and then calls the reconnect listeners, which resync replicas.

The backend's ``url`` and every message it logs or raises carry the URL with
the password redacted.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import hiredis
import orjson
from redis import exceptions as rexc
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..errors import (
    BackendError,
    BackendUnavailableError,
    ConcurrentUpdateError,
    ConfigError,
    DurabilityError,
    LeaseHeldError,
    LeaseLostError,
    MapMissingError,
    SharingError,
)
from ..names import check_actor_name, check_map_name, map_owner
from . import BackendURL, parse_url
from .base import (
    RECENT_TXIDS,
    ChangeSet,
    Checkpoint,
    MessageHandler,
    ReconnectListener,
    Transaction,
)
from .wire import (
    EncodedTransaction,
    chain_broken,
    check_app,
    check_one_owner,
    check_open,
    decode_checkpoint,
    decode_fields,
    decode_version,
    encode_dump,
    encode_transaction,
    make_dump,
    ttl_to_ms,
)

__all__ = ["RedisBackend", "RedisStats"]

_log = logging.getLogger("caf_sharing.backends.redis")

Command = tuple[Any, ...]

#: Errors after which a round trip is tried again (the connection is reset).
_RETRYABLE = (rexc.ConnectionError, rexc.TimeoutError, OSError)
#: Connection errors that retrying cannot fix.
_FATAL = (rexc.AuthenticationError, rexc.AuthorizationError)
#: Longest pause between two pub/sub reconnection attempts, past max_retries.
_MAX_SLOW_DELAY = 5.0
#: The slowest a healthy server takes in a request (reading and running it
#: included), bytes per second: a 60 MB commit creating a 1M-key map took
#: 2-3 s on a loaded 2-core machine, about 20 MB/s.
_MIN_SEND_RATE = 10_000_000
#: The same for replies, in map fields per second (HGETALL of 1M fields: ~1 s).
_MIN_FIELD_RATE = 500_000


def _allowance(sent: int, fields: int = 0) -> float:
    """Seconds a round trip may take beyond ``socket_timeout`` for the work it
    carries: ``sent`` bytes of requests, ``fields`` map fields in its reply.
    Most round trips are small (commits go in batches of at most
    max_pending_updates, large maps are read in chunks) and get almost none,
    so a dead server is noticed quickly; a commit that creates a huge map
    still gets the time it needs."""
    return sent / _MIN_SEND_RATE + fields / _MIN_FIELD_RATE


@dataclass(frozen=True, slots=True)
class _Script:
    name: str
    source: bytes
    sha: str


def _load_script(name: str) -> _Script:
    source = resources.files(__package__).joinpath("lua", f"{name}.lua").read_bytes()
    return _Script(name, source, hashlib.sha1(source, usedforsecurity=False).hexdigest())


_COMMIT = _load_script("commit")
_CREATE = _load_script("create_map")
_READ = _load_script("read_maps")
_ACQUIRE = _load_script("lease_acquire")
_RENEW = _load_script("lease_renew")
_RELEASE = _load_script("lease_release")
_SCRIPTS = (_COMMIT, _CREATE, _READ, _ACQUIRE, _RENEW, _RELEASE)


@dataclass(slots=True)
class RedisStats:
    """Counters of the group commit and of chunked reads, for monitoring."""

    #: Commit round trips (pipelines of EVALSHA) sent, retries not counted.
    round_trips: int = 0
    #: Commits sent in those round trips.
    commits: int = 0
    #: The most commits one round trip carried.
    largest_batch: int = 0
    #: Maps read in HSCAN chunks (larger than ``read_chunk_size``).
    chunked_reads: int = 0
    #: Chunked reads started again because a commit moved the map meanwhile.
    chunked_read_retries: int = 0
    #: Chunked reads that gave up and used one HGETALL.
    whole_reads: int = 0
    #: Commits WAIT did not confirm on wait_replicas replicas (DurabilityError).
    unconfirmed: int = 0


@dataclass(eq=False, slots=True)
class _PendingCommit:
    tx: EncodedTransaction
    command: Command
    future: asyncio.Future[bool]


@dataclass(eq=False, slots=True)
class _Subscription:
    handler: MessageHandler
    active: bool = True


@dataclass(eq=False, slots=True)
class _Channel:
    """The local subscribers of one Redis channel."""

    map_name: str
    subs: list[_Subscription] = field(default_factory=list)
    #: Redis confirmed the subscription on the current pub/sub connection.
    active: bool = False
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
    """A command sent on the pub/sub connection, waiting for its replies."""

    #: The kind of reply it gets: b"subscribe", b"unsubscribe" or b"pong".
    reply: bytes
    #: The channels still to be acknowledged, in order, each with the local
    #: channel its acknowledgement confirms.
    due: deque[tuple[bytes, _Channel | None]]
    #: The resubscription after a reconnect: call the listeners once done.
    reconnect: bool = False


def _flatten(pairs: Sequence[tuple[str, bytes]]) -> list[str | bytes]:
    flat: list[str | bytes] = []
    for key, value in pairs:
        flat.append(key)
        flat.append(value)
    return flat


def _pack(commands: Sequence[Command]) -> bytes:
    """RESP-encode ``commands`` (args: bytes, str or int) with hiredis's C
    packer: redis-py's generic one was the largest client cost of a commit,
    whose EVALSHA has ~20 arguments."""
    return b"".join(map(hiredis.pack_command, commands))


class _Pool:
    """Command connections, each used by one round trip at a time.

    redis-py's own pool and pipeline add a SCRIPT EXISTS round trip per
    pipeline with scripts and retry on their own; this keeps both under the
    backend's control. One timeout bounds the whole round trip.
    """

    def __init__(self, factory: Callable[[], AbstractConnection], size: int) -> None:
        self._factory = factory
        self._idle: list[AbstractConnection] = []
        self._all: set[AbstractConnection] = set()
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
            if self._idle:
                conn = self._idle.pop()
            else:
                conn = self._factory()
                self._all.add(conn)
            try:
                async with asyncio.timeout(timeout):
                    await conn.send_packed_command(packed, check_health=False)
                    replies: list[Any] = []
                    for _ in range(count):
                        try:
                            replies.append(await conn.read_response())
                        except rexc.ResponseError as exc:
                            replies.append(exc)
            except BaseException as exc:
                # Unread replies may be left on it: start the next use afresh.
                await conn.disconnect(nowait=True)
                if isinstance(exc, TimeoutError):
                    raise rexc.TimeoutError(f"no reply within {timeout:.3g}s") from None
                raise
            finally:
                self._idle.append(conn)
            return replies

    async def close(self) -> None:
        self.closed = True
        for conn in self._all:
            await conn.disconnect(nowait=True)
        self._all.clear()
        self._idle.clear()


def _number(name: str, value: object, *, zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise ConfigError(f"option {name} must be a number {'>=' if zero else '>'} 0, "
                          f"got {value!r}")
    return float(value)


def _query_int(name: str, given: int | None, query: dict[str, str], default: int) -> object:
    """Option ``name``: the keyword argument if given, else the URL query's
    (checked by the caller like any other value), else ``default``."""
    if given is not None:
        return given
    text = query.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"URL option {name} must be an int, got {text!r}") from None


def _count(name: str, value: object, *, zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero else 1):
        raise ConfigError(f"option {name} must be an int {'>=' if zero else '>'} 0, "
                          f"got {value!r}")
    return value


_CERT_REQS = ("none", "optional", "required")


class RedisBackend:
    """The Redis implementation of :class:`~caf_sharing.backends.base.Backend`.

    Options (keyword arguments; the URL query may carry the TLS ones and
    ``wait_replicas``/``wait_timeout_ms``; a keyword argument wins over the
    URL):

    * ``coalescing_interval`` (s, 0.01): longest wait of a queued commit;
    * ``max_pending_updates`` (20): most commits in one round trip;
    * ``max_retries`` (10), ``retry_delay`` (s, 0.1): per round trip;
    * ``call_timeout`` (s, 3; ``None``: no bound): longest time one round
      trip may take, its retries and their pauses included (plus the same
      allowances as ``socket_timeout``); past it the call fails with
      :class:`BackendUnavailableError` even if retries are left;
    * ``socket_timeout`` (s, 1; ``None``: only ``call_timeout``): longest
      wait for the replies of one attempt, plus 1 s per 10 MB it sends and
      per 500k map fields a whole read returns, plus ``wait_timeout_ms`` for
      a commit with ``wait_replicas``;
    * ``connect_timeout`` (s, 1): opening a connection (within the attempt);
    * ``wait_replicas`` (0: off): acknowledge a commit only once ``WAIT``
      counts this many replicas holding it, else raise
      :class:`DurabilityError`; ``wait_timeout_ms`` (1000, >= 1): how long
      WAIT waits for them;
    * ``max_connections`` (16): command connections (pub/sub has its own);
    * ``read_chunk_size`` (1000): maps larger than this are read with HSCAN
      of this COUNT, between two reads of the version, instead of HGETALL;
    * ``health_check_interval`` (s, 5; 0: never): PING the pub/sub
      connection when it was silent that long, and drop it if no answer
      comes within as long again (a dead link is noticed within 10 s);
    * ``restart_grace`` (True): a lease that is absent on a server up for
      less than one lease TTL is granted only once the server is that old
      (the node that held it may still run and put back what the restart
      lost); turn it off only for a server that loses no acknowledged write
      (``appendfsync always``);
    * ``username``, ``password``: override the URL's;
    * ``ssl_cert_reqs`` ("none" | "optional" | "required"), ``ssl_ca_certs``,
      ``ssl_certfile``, ``ssl_keyfile``, ``ssl_check_hostname``: ``rediss://``.
    """

    def __init__(self, url: str | BackendURL, *, app: str = "default",
                 coalescing_interval: float = 0.01, max_pending_updates: int = 20,
                 max_retries: int = 10, retry_delay: float = 0.1,
                 call_timeout: float | None = 3.0, socket_timeout: float | None = 1.0,
                 connect_timeout: float = 1.0,
                 wait_replicas: int | None = None, wait_timeout_ms: int | None = None,
                 max_connections: int = 16, read_chunk_size: int = 1000,
                 health_check_interval: float = 5.0, restart_grace: bool = True,
                 username: str | None = None, password: str | None = None,
                 ssl_cert_reqs: str | None = None, ssl_ca_certs: str | None = None,
                 ssl_certfile: str | None = None, ssl_keyfile: str | None = None,
                 ssl_check_hostname: bool | None = None) -> None:
        target = url if isinstance(url, BackendURL) else parse_url(url)
        if target.scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(f"RedisBackend cannot use {target.redacted!r}")
        self.url = target.redacted
        self.app = check_app(app)
        self._interval = _number("coalescing_interval", coalescing_interval, zero=True)
        if not isinstance(restart_grace, bool):
            raise ConfigError(f"option restart_grace must be true or false, got {restart_grace!r}")
        self._restart_grace = restart_grace
        self._max_pending = _count("max_pending_updates", max_pending_updates)
        self._max_retries = _count("max_retries", max_retries, zero=True)
        self._retry_delay = _number("retry_delay", retry_delay, zero=True)
        self._chunk = _count("read_chunk_size", read_chunk_size)
        self._health = _number("health_check_interval", health_check_interval, zero=True)
        _number("connect_timeout", connect_timeout)
        self._socket_timeout = None if socket_timeout is None \
            else _number("socket_timeout", socket_timeout)
        self._call_timeout = None if call_timeout is None \
            else _number("call_timeout", call_timeout)
        self._wait_replicas = _count("wait_replicas", _query_int(
            "wait_replicas", wait_replicas, target.options, 0), zero=True)
        self._wait_ms = _count("wait_timeout_ms", _query_int(
            "wait_timeout_ms", wait_timeout_ms, target.options, 1000))
        #: Ends every commit round trip when wait_replicas is set: a write of
        #: this connection's own (see the module docstring), then WAIT.
        self._wait_tail: tuple[Command, ...] = () if not self._wait_replicas else (
            ("PUBLISH", f"caf:{self.app}:wait", ""),
            ("WAIT", self._wait_replicas, self._wait_ms))
        _count("max_connections", max_connections)
        for name, value in (("username", username), ("password", password)):
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"option {name} must be a str")
        kwargs: dict[str, Any] = {
            "db": target.db,
            "username": username if username is not None else target.username,
            "password": password if password is not None else target.password,
            "socket_connect_timeout": connect_timeout,
            # Retries are ours (max_retries/retry_delay), never redis-py's.
            "retry": Retry(NoBackoff(), 0),
            # RESP2: reply shapes the code relies on, pub/sub messages as plain
            # replies, and no HELLO (servers before 6 do not know it).
            "protocol": 2,
        }
        tls = {"ssl_cert_reqs": ssl_cert_reqs, "ssl_ca_certs": ssl_ca_certs,
               "ssl_certfile": ssl_certfile, "ssl_keyfile": ssl_keyfile,
               "ssl_check_hostname": ssl_check_hostname}
        given_tls = {k: v for k, v in tls.items() if v is not None}
        if target.scheme == "rediss":
            kwargs.update(self._tls_options({**target.options, **given_tls}))
        elif given_tls:
            raise ConfigError(f"TLS options {', '.join(sorted(given_tls))} need a rediss:// "
                              f"URL, not {self.url!r}")
        if target.scheme == "unix":
            conn_class: type[AbstractConnection] = UnixDomainSocketConnection
            kwargs["path"] = target.path
        else:
            conn_class = SSLConnection if target.scheme == "rediss" else Connection
            kwargs.update(host=target.host, port=target.port, socket_keepalive=True)
        self._conn_class = conn_class
        self._conn_kwargs = kwargs
        # Connections get no socket timeout of their own: the pool bounds each
        # round trip as a whole, and pub/sub reads wait as long as they must.
        kwargs["socket_timeout"] = None
        self._pool = _Pool(lambda: conn_class(**kwargs), max_connections)
        self.stats = RedisStats()

        self._started = False
        self._closed = False
        # Group commit.
        self._queue: deque[_PendingCommit] = deque()
        self._in_flight = 0
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Pub/sub.
        self._channels: dict[bytes, _Channel] = {}
        self._sent: deque[_Sent] = deque()
        self._sub_conn: AbstractConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        #: Set while the pub/sub connection is down past max_retries.
        self._down: BackendUnavailableError | None = None
        self._listeners: list[ReconnectListener] = []

    def __repr__(self) -> str:
        return f"RedisBackend({self.url!r}, app={self.app!r})"

    @staticmethod
    def _tls_options(options: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        reqs = options.get("ssl_cert_reqs")
        if reqs is not None:
            if reqs not in _CERT_REQS:
                raise ConfigError(f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}, "
                                  f"got {reqs!r}")
            out["ssl_cert_reqs"] = reqs
        for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
            if options.get(name) is not None:
                out[name] = str(options[name])
        check = options.get("ssl_check_hostname")
        if isinstance(check, str):
            if check.lower() not in ("true", "false", "1", "0"):
                raise ConfigError(f"ssl_check_hostname must be true or false, got {check!r}")
            check = check.lower() in ("true", "1")
        if check is not None:
            out["ssl_check_hostname"] = bool(check)
        elif reqs == "none":
            # Checking the name of a certificate nobody verifies cannot work.
            out["ssl_check_hostname"] = False
        return out

    # -- keys -------------------------------------------------------------

    def _actor_key(self, actor: str, what: str) -> str:
        return f"caf:{self.app}:{{{actor}}}:{what}"

    def _map_key(self, name: str) -> str:
        return f"caf:{self.app}:{{{map_owner(name)}}}:map:{name}"

    def _channel_key(self, name: str) -> str:
        return f"caf:{self.app}:{{{map_owner(name)}}}:chan:{name}"

    # -- round trips ----------------------------------------------------------

    def _check_open(self) -> None:
        check_open(self.url, self.app, self._started, self._closed)

    async def _exchange(self, commands: Sequence[Command], what: str,
                        extra: float = 0.0) -> list[Any]:
        """One round trip, tried again on connection errors and timeouts within
        the retry settings; ``extra`` seconds more for each attempt."""
        packed = _pack(commands)
        extra += _allowance(len(packed))
        timeout = None if self._socket_timeout is None else self._socket_timeout + extra
        deadline = None if self._call_timeout is None \
            else time.monotonic() + self._call_timeout + extra
        attempt = 0
        while True:
            if self._pool.closed:
                raise BackendUnavailableError(f"backend {self.url} (app {self.app!r}) is closed")
            limit = timeout
            if deadline is not None:
                left = deadline - time.monotonic()
                limit = left if limit is None else min(limit, left)
            try:
                return await self._pool.exchange(packed, len(commands), limit)
            except _FATAL as exc:
                raise BackendUnavailableError(
                    f"Redis at {self.url} refused the connection ({what}): {exc}") from None
            except _RETRYABLE as exc:
                attempt += 1
                if attempt > self._max_retries or (
                        deadline is not None
                        and time.monotonic() + self._retry_delay >= deadline):
                    raise BackendUnavailableError(
                        f"Redis at {self.url} is unavailable ({what}, {attempt} attempts): "
                        f"{exc}") from None
                _log.debug("Redis at %s: %s failed (%s), retry %d of %d", self.url, what, exc,
                           attempt, self._max_retries)
                await asyncio.sleep(self._retry_delay)

    async def _call(self, commands: Sequence[Command], what: str, *,
                    tail: Sequence[Command] = (), extra: float = 0.0) -> list[Any]:
        """One round trip with retries; EVALSHAs that met NOSCRIPT (the server
        restarted or flushed its scripts) are sent again after loading them.
        ``tail`` ends every exchange (the WAIT of commits), and its replies
        from the last exchange end the list."""
        replies = await self._exchange([*commands, *tail], what, extra)
        noscript = [i for i, r in enumerate(replies[:len(commands)])
                    if isinstance(r, rexc.NoScriptError)]
        if noscript:
            _log.info("Redis at %s lost our scripts; loading them again", self.url)
            await self._exchange([("SCRIPT", "LOAD", s.source) for s in _SCRIPTS],
                                 "loading scripts")
            again = await self._exchange([*(commands[i] for i in noscript), *tail], what,
                                         extra)
            for i, reply in zip(noscript, again, strict=False):
                replies[i] = reply
            replies[len(commands):] = again[len(noscript):]
        return replies

    async def _call_one(self, command: Command, what: str, extra: float = 0.0) -> Any:
        reply = (await self._call((command,), what, extra=extra))[0]
        if isinstance(reply, rexc.ResponseError):
            raise BackendError(f"Redis at {self.url}: {what} failed: {reply}")
        return reply

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Check that Redis answers, load the scripts and check the eviction
        policy."""
        if self._closed:
            raise BackendUnavailableError(f"backend {self.url} was closed; make a new one")
        if self._started:
            return
        *replies, policy = await self._call(
            [("PING",), *(("SCRIPT", "LOAD", s.source) for s in _SCRIPTS),
             ("CONFIG", "GET", "maxmemory-policy")], "start")
        for reply in replies:
            if isinstance(reply, rexc.ResponseError):
                raise BackendError(f"Redis at {self.url} cannot run our scripts: {reply}")
        self._check_eviction(policy)
        self._started = True

    def _check_eviction(self, reply: Any) -> None:
        if isinstance(reply, rexc.ResponseError):
            # CONFIG renamed away or denied by an ACL: nothing to check with.
            _log.debug("Redis at %s: cannot read maxmemory-policy (%s)", self.url, reply)
            return
        policy = bytes(reply[1]).decode(errors="replace") if len(reply) == 2 else None
        if policy is not None and policy != "noeviction":
            _log.warning(
                "Redis at %s runs maxmemory-policy %s: under memory pressure it may evict "
                "checkpoints, leases or maps, silently losing acknowledged commits and "
                "unfencing writers; caf-sharing needs maxmemory-policy noeviction (then a "
                "full server refuses commits instead)", self.url, policy)

    async def close(self) -> None:
        """Send the queued commits, wait for those in flight, then disconnect."""
        if self._closed:
            return
        self._closed = True
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
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        closed = BackendUnavailableError(f"backend {self.url} (app {self.app!r}) is closed")
        for channel in self._channels.values():
            channel.fail(closed)
        self._channels.clear()
        await self._pool.close()

    # -- maps -------------------------------------------------------------

    async def create_map(self, name: str, initial: ChangeSet | None = None) -> ChangeSet:
        check_map_name(name)
        version, fields = (0, []) if initial is None else encode_dump(name, initial,
                                                                      "initial value")
        self._check_open()
        command = ("EVALSHA", _CREATE.sha, 2, self._map_key(name),
                   self._actor_key(map_owner(name), "lineage"), name, version,
                   *_flatten(fields))
        # Someone may delete the map between the create and the read: try again.
        for _ in range(3):
            if await self._call_one(command, f"create_map {name}") == 1:
                items: list[Any] = []
                for key, raw in fields:
                    items.append(key)
                    items.append(orjson.loads(raw))
                return make_dump(version, items)
            dump = await self.read_map(name)
            if dump is not None:
                return dump
        raise BackendError(f"map {name!r} keeps vanishing while it is created")

    @staticmethod
    def _decode_all(names: Sequence[str], reply: Sequence[Any]) -> dict[str, ChangeSet | None]:
        """The dumps of an "all" reply of the read script."""
        out: dict[str, ChangeSet | None] = {}
        for name, (txid, flat) in zip(names, reply[1:], strict=True):
            it = iter(flat)
            out[name] = RedisBackend._decode_pairs(name, zip(it, it, strict=True), txid) \
                if flat else None
        return out

    @staticmethod
    def _decode_pairs(name: str, pairs: Iterable[tuple[bytes, bytes]],
                      txid: bytes) -> ChangeSet:
        try:
            lineage = txid.decode() if txid else None
        except UnicodeDecodeError:
            raise BackendError(f"map {name!r}: its lineage txid is undecodable") from None
        return decode_fields(name, pairs, lineage)

    async def read_map(self, name: str) -> ChangeSet | None:
        return (await self.read_maps([name]))[name]

    async def read_maps(self, names: Sequence[str]) -> dict[str, ChangeSet | None]:
        owner = check_one_owner(names)
        self._check_open()
        if owner is None:
            return {}
        keys = [self._actor_key(owner, "lineage"), *map(self._map_key, names)]
        what = f"read_map {', '.join(names)}"

        # Up to read_chunk_size fields come back per round trip.
        chunk_time = _allowance(0, self._chunk)

        def command(limit: int) -> Command:
            return ("EVALSHA", _READ.sha, len(keys), *keys, limit, *names)

        for _ in range(3):
            reply = await self._call_one(command(self._chunk), what, chunk_time)
            if reply[0] == b"all":
                return self._decode_all(names, reply)
            before = reply[1:]
            chunks = {name: await self._scan(key, what, chunk_time) if state[0] else None
                      for name, key, state in zip(names, keys[1:], before, strict=True)}
            # The same versions and txids before and after: no commit of the
            # owner happened in between, so the chunks make one consistent view.
            after = await self._call_one(command(-1), what)
            if [s[:2] for s in before] == [s[:2] for s in after[1:]]:
                self.stats.chunked_reads += 1
                return {name: None if fields is None
                        else self._decode_pairs(name, fields.items(), state[1])
                        for (name, fields), state in zip(chunks.items(), before, strict=True)}
            self.stats.chunked_read_retries += 1
        # Written too often to scan: one atomic read, stalling Redis briefly.
        self.stats.whole_reads += 1
        _log.info("maps %s kept changing while read in chunks; reading them at once", names)
        reply = await self._call_one(command(2**62), what,
                                     extra=_allowance(0, sum(s[2] for s in before)))
        return self._decode_all(names, reply)

    async def _scan(self, key: str, what: str, chunk_time: float) -> dict[bytes, bytes]:
        fields: dict[bytes, bytes] = {}
        cursor: bytes | int = 0
        while True:
            cursor, chunk = await self._call_one(
                ("HSCAN", key, cursor, "COUNT", self._chunk), what, chunk_time)
            it = iter(chunk)
            fields.update(zip(it, it, strict=True))
            if cursor in (0, b"0"):
                return fields

    async def delete_map(self, name: str) -> bool:
        check_map_name(name)
        self._check_open()
        what = f"delete_map {name}"
        replies = await self._call(
            [("DEL", self._map_key(name)),
             ("HDEL", self._actor_key(map_owner(name), "lineage"), name)], what)
        for reply in replies:
            if isinstance(reply, rexc.ResponseError):
                raise BackendError(f"Redis at {self.url}: {what} failed: {reply}")
        return bool(replies[0])

    # -- leases and checkpoints -------------------------------------------------

    async def acquire_lease(self, actor: str, node_id: str, ttl: float) -> None:
        check_actor_name(actor)
        ms = ttl_to_ms(ttl)
        self._check_open()
        command = ("EVALSHA", _ACQUIRE.sha, 1, self._actor_key(actor, "lease"), node_id, ms,
                   1 if self._restart_grace else 0)
        while True:
            reply = await self._call_one(command, f"acquire_lease {actor}")
            if not isinstance(reply, int):
                break
            _log.warning("Redis at %s restarted %.1fs ago and may have lost data: waiting "
                         "%.1fs before taking the lease of %s, so that a node that held it "
                         "can put back what it holds", self.url, (ms - reply) / 1000,
                         reply / 1000, actor)
            await asyncio.sleep(reply / 1000)
        if reply is not None:
            raise LeaseHeldError(actor, reply.decode(errors="replace"))

    async def renew_leases(self, actors: Sequence[str], node_id: str, ttl: float) -> list[str]:
        for actor in actors:
            check_actor_name(actor)
        ms = ttl_to_ms(ttl)
        self._check_open()
        if not actors:
            return []
        # One script call per actor (its lease is in its own slot), one round trip.
        replies = await self._call(
            [("EVALSHA", _RENEW.sha, 1, self._actor_key(a, "lease"), node_id, ms)
             for a in actors], "renew_leases")
        lost: list[str] = []
        for actor, reply in zip(actors, replies, strict=True):
            if isinstance(reply, rexc.ResponseError):
                raise BackendError(f"Redis at {self.url}: renew_leases failed: {reply}")
            if reply != 1:
                lost.append(actor)
        return lost

    async def release_lease(self, actor: str, node_id: str) -> None:
        check_actor_name(actor)
        self._check_open()
        await self._call_one(
            ("EVALSHA", _RELEASE.sha, 1, self._actor_key(actor, "lease"), node_id),
            f"release_lease {actor}")

    async def load_checkpoint(self, actor: str) -> Checkpoint | None:
        check_actor_name(actor)
        self._check_open()
        raw = await self._call_one(("HGET", self._actor_key(actor, "cp"), "blob"),
                                   f"load_checkpoint {actor}")
        return None if raw is None else decode_checkpoint(actor, raw)

    async def load_txids(self, actors: Sequence[str]) -> list[str | None]:
        for actor in actors:
            check_actor_name(actor)
        self._check_open()
        if not actors:
            return []
        replies = await self._call([("HGET", self._actor_key(a, "cp"), "txid") for a in actors],
                                   "load_txids")
        out: list[str | None] = []
        for reply in replies:
            if isinstance(reply, rexc.ResponseError):
                raise BackendError(f"Redis at {self.url}: load_txids failed: {reply}")
            out.append(None if reply is None else reply.decode(errors="replace"))
        return out

    # -- commits ------------------------------------------------------------

    def _commit_command(self, tx: EncodedTransaction) -> Command:
        # Every map of a transaction is owned by its actor (checked when encoded).
        prefix = f"caf:{self.app}:{{{tx.actor}}}:"
        keys = [prefix + "cp", prefix + "lease", prefix + "lineage", prefix + "recent"]
        keys.extend(f"{prefix}map:{c.name}" for c in tx.creates)
        keys.extend(f"{prefix}map:{w.name}" for w in tx.writes)
        keys.extend(f"{prefix}map:{r.name}" for r in tx.restores)
        argv: list[Any] = [
            tx.node_id, tx.txid, tx.prev_txid or "", 0 if tx.prev_txid is None else 1,
            tx.lease_ttl_ms, tx.checkpoint, len(tx.creates), len(tx.writes),
            len(tx.restores), 1 if tx.reassert else 0, RECENT_TXIDS]
        create_index: dict[str, int] = {}
        for i, create in enumerate(tx.creates, 1):
            create_index[create.name] = i
            argv.extend((create.name, create.version, 2 * len(create.fields)))
            argv.extend(_flatten(create.fields))
        for write in tx.writes:
            argv.extend((write.name, write.base, write.new_version,
                         create_index.get(write.name, 0),
                         -1 if write.rebase_from is None else write.rebase_from,
                         write.base_txid or "", len(write.remove)))
            argv.extend(write.remove)
            argv.append(2 * len(write.add))
            argv.extend(_flatten(write.add))
            if write.full is None:
                argv.append(-1)
            else:
                argv.append(2 * len(write.full))
                argv.extend(_flatten(write.full))
            argv.append(f"{prefix}chan:{write.name}")
            argv.append(write.payload)
        for restore in tx.restores:
            argv.extend((restore.name, restore.version, restore.txid or "",
                         2 * len(restore.fields)))
            argv.extend(_flatten(restore.fields))
        return ("EVALSHA", _COMMIT.sha, len(keys), *keys, *argv)

    def _commit_outcome(self, tx: EncodedTransaction, reply: Any) -> bool:
        if isinstance(reply, rexc.ResponseError):
            raise BackendError(f"Redis at {self.url}: commit of {tx.actor} failed: {reply}")
        status = reply[0]
        if status == b"ok":
            return True
        if status == b"dup":
            return False
        if status == b"lease":
            holder = reply[1].decode(errors="replace") if len(reply) > 1 else None
            raise LeaseLostError(tx.actor, tx.node_id, holder)
        if status == b"chain":
            raise chain_broken(tx, reply[1].decode(errors="replace") or None)
        if status == b"lineage":
            write = tx.writes[int(reply[1]) - 1]
            current = decode_version(write.name, reply[2])
            raise ConcurrentUpdateError(
                f"map {write.name!r} holds version {current} of commit "
                f"{reply[3].decode(errors='replace')!r}, the change set's base is of "
                f"{write.base_txid!r}", name=write.name, expected=write.base, current=current)
        if status == b"version":
            write = tx.writes[int(reply[1]) - 1]
            current = decode_version(write.name, reply[2])
            raise ConcurrentUpdateError(
                f"map {write.name!r} is at version {current}, the change set expects "
                f"{write.base}", name=write.name, expected=write.base, current=current)
        if status == b"missing":
            raise MapMissingError([tx.writes[int(i) - 1].name for i in reply[1:]])
        raise BackendError(f"Redis at {self.url}: unexpected commit reply {reply!r}")

    def _check_replicated(self, tx: EncodedTransaction, confirmed: Any) -> None:
        """Raise DurabilityError unless the batch's WAIT counted enough replicas."""
        if isinstance(confirmed, int) and confirmed >= self._wait_replicas:
            return
        if isinstance(confirmed, int):
            why = (f"{confirmed} of {self._wait_replicas} replica(s) confirmed it within "
                   f"{self._wait_ms} ms")
        else:
            why = f"WAIT failed: {confirmed}"
            confirmed = 0
        self.stats.unconfirmed += 1
        raise DurabilityError(
            f"Redis at {self.url}: commit {tx.txid} of {tx.actor}: {why}; the outcome is "
            "ambiguous: the primary holds the commit, but a failover may lose it",
            required=self._wait_replicas, confirmed=confirmed)

    async def commit(self, tx: Transaction) -> bool:
        enc = encode_transaction(tx)
        self._check_open()
        pending = _PendingCommit(enc, self._commit_command(enc),
                                 asyncio.get_running_loop().create_future())
        if self._in_flight == 0 and not self._queue:
            # Idle: this task makes the round trip itself, no hop through the loop.
            self._in_flight += 1
            await self._round_trip([pending])
            return pending.future.result()
        self._queue.append(pending)
        self._kick()
        # A caller cancelled before its commit was sent withdraws it: the
        # batch skips futures that are already done.
        return await pending.future

    def _kick(self) -> None:
        """Decide when the queued commits go (see the module docstring)."""
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
            batch: list[_PendingCommit] = []
            while self._queue and len(batch) < self._max_pending:
                pending = self._queue.popleft()
                if not pending.future.done():
                    batch.append(pending)
            if batch:
                self._in_flight += 1
                task = asyncio.get_running_loop().create_task(self._round_trip(batch))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            if len(self._queue) < self._max_pending:
                break
        self._kick()

    async def _round_trip(self, batch: list[_PendingCommit]) -> None:
        self.stats.round_trips += 1
        self.stats.commits += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        try:
            replies = await self._call([p.command for p in batch], "commit",
                                       tail=self._wait_tail,
                                       extra=self._wait_ms / 1000 if self._wait_tail else 0.0)
        except Exception as exc:
            # One exception object each: raised in several tasks, a shared one
            # would pile their tracebacks up.
            kind = BackendUnavailableError if isinstance(exc, BackendUnavailableError) \
                else BackendError
            message = str(exc) if isinstance(exc, SharingError) \
                else f"Redis at {self.url}: commit failed: {exc!r}"
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(kind(message))
        except BaseException:
            # Cancelled (only an inline round trip can be): the outcome is unknown.
            for pending in batch:
                pending.future.cancel()
            raise
        else:
            confirmed = replies[-1] if self._wait_tail else None
            for pending, reply in zip(batch, replies[:len(batch)], strict=True):
                if pending.future.done():
                    continue
                try:
                    outcome = self._commit_outcome(pending.tx, reply)
                    if self._wait_tail:
                        self._check_replicated(pending.tx, confirmed)
                    pending.future.set_result(outcome)
                except SharingError as error:
                    pending.future.set_exception(error)
        finally:
            self._in_flight -= 1
            self._kick()

    # -- pub/sub ------------------------------------------------------------

    def add_reconnect_listener(self, listener: ReconnectListener) -> None:
        self._listeners.append(listener)

    async def subscribe(self, name: str, handler: MessageHandler) -> None:
        check_map_name(name)
        if not callable(handler):
            raise TypeError(f"handler must be callable, got {type(handler).__name__}")
        self._check_open()
        key = self._channel_key(name).encode()
        channel = self._channels.get(key)
        new = channel is None
        if channel is None:
            channel = self._channels[key] = _Channel(name)
        sub = _Subscription(handler)
        channel.subs.append(sub)
        waiter: asyncio.Future[None] | None = None
        if not channel.active:
            if self._down is not None:
                await self._drop(key, channel, sub)
                raise self._down
            waiter = asyncio.get_running_loop().create_future()
            channel.waiters.append(waiter)
        try:
            if new:
                if self._reader is None:
                    self._reader = asyncio.get_running_loop().create_task(
                        self._read_loop(), name=f"caf-sharing pub/sub {self.url}")
                else:
                    await self._send("SUBSCRIBE", b"subscribe", [(key, channel)])
            if waiter is not None:
                await waiter
        except BaseException:
            await self._drop(key, channel, sub)
            raise

    async def unsubscribe(self, name: str, handler: MessageHandler) -> None:
        check_map_name(name)
        self._check_open()
        key = self._channel_key(name).encode()
        channel = self._channels.get(key)
        if channel is None:
            return
        for sub in reversed(channel.subs):
            if sub.handler == handler:
                await self._drop(key, channel, sub)
                return

    async def _drop(self, key: bytes, channel: _Channel, sub: _Subscription) -> None:
        sub.active = False
        if sub in channel.subs:
            channel.subs.remove(sub)
        if not channel.subs and self._channels.get(key) is channel:
            del self._channels[key]
            await self._send("UNSUBSCRIBE", b"unsubscribe", [(key, None)])

    async def _send(self, command: str, reply: bytes,
                    channels: list[tuple[bytes, _Channel | None]],
                    reconnect: bool = False) -> None:
        """Send ``command`` on the live pub/sub connection, if there is one
        (when it comes back, the reader subscribes every channel anyway)."""
        conn = self._sub_conn
        if conn is None or not conn.is_connected:
            return
        # Registered before sending: Redis answers commands in order.
        self._sent.append(_Sent(reply, deque(channels), reconnect))
        try:
            await conn.send_command(command, *(key for key, _ in channels), check_health=False)
        except _RETRYABLE as exc:
            # The reader sees the same failure and reconnects.
            _log.debug("Redis at %s: %s failed: %s", self.url, command, exc)

    def _reconnect_delay(self, failures: int) -> float:
        if failures <= self._max_retries:
            return self._retry_delay
        slow = max(self._retry_delay, 0.1) * 2.0 ** min(failures - self._max_retries, 10)
        return min(slow, _MAX_SLOW_DELAY)

    async def _read_loop(self) -> None:
        failures = 0
        lost = False
        while True:
            conn = self._conn_class(**self._conn_kwargs)
            try:
                await conn.connect_check_health(check_health=False)
            except Exception as exc:  # refused, timed out, bad TLS setup...
                failures += 1
                if failures > self._max_retries:
                    if self._down is None:
                        _log.error("pub/sub connection to Redis at %s still down after %d "
                                   "attempts (%s); retrying", self.url, failures, exc)
                    self._down = BackendUnavailableError(
                        f"Redis at {self.url} is unavailable (subscribe, {failures} attempts): "
                        f"{exc}")
                    for channel in self._channels.values():
                        channel.fail(self._down)
                await asyncio.sleep(self._reconnect_delay(failures))
                continue
            if lost:
                _log.info("pub/sub connection to Redis at %s restored after %d failed "
                          "attempts", self.url, failures)
            failures = 0
            self._down = None
            try:
                await self._serve(conn, lost)
            except (*_RETRYABLE, *_FATAL) as exc:
                _log.warning("pub/sub connection to Redis at %s lost: %s", self.url, exc)
            except Exception:
                _log.exception("pub/sub reader of Redis at %s failed; reconnecting", self.url)
            finally:
                self._sub_conn = None
                for channel in self._channels.values():
                    channel.active = False
                await conn.disconnect(nowait=True)
            lost = True

    async def _serve(self, conn: AbstractConnection, reconnected: bool) -> None:
        """Subscribe everything on a fresh connection, then read it until it fails."""
        self._sub_conn = conn
        self._sent = deque()
        channels: list[tuple[bytes, _Channel | None]] = list(self._channels.items())
        if channels:
            await self._send("SUBSCRIBE", b"subscribe", channels, reconnect=reconnected)
        elif reconnected:
            self._notify_reconnected()
        timeout = self._health or math.inf
        pinged = False
        while True:
            try:
                message = await conn.read_response(timeout=timeout)
            except rexc.ResponseError as exc:
                self._on_error(exc)
                continue
            if message is None:  # silent for health_check_interval seconds
                if pinged:
                    raise rexc.TimeoutError("pub/sub connection does not answer PING")
                await self._send("PING", b"pong", [])
                pinged = True
                continue
            pinged = False
            if message[0] == b"message":
                self._dispatch(message[1], message[2])
            else:
                self._on_reply(message)

    def _on_reply(self, message: list[Any]) -> None:
        """Match a (un)subscribe acknowledgement or a pong to what was sent."""
        kind = message[0]
        head = self._sent[0] if self._sent else None
        if head is None or head.reply != kind:
            _log.warning("Redis at %s: unexpected pub/sub reply %r", self.url, message[:2])
            return
        if head.due:
            key, channel = head.due.popleft()
            if key != message[1]:
                _log.warning("Redis at %s: %r acknowledged instead of %r", self.url,
                             message[1], key)
            elif channel is not None and self._channels.get(key) is channel:
                channel.confirm()
        if not head.due:
            self._sent.popleft()
            if head.reconnect:
                self._notify_reconnected()

    def _on_error(self, error: rexc.ResponseError) -> None:
        """A command on the pub/sub connection failed (an ACL without access
        to the channels, say): fail whoever waits for it."""
        head = self._sent.popleft() if self._sent else None
        _log.error("Redis at %s refused a pub/sub command: %s", self.url, error)
        if head is None:
            return
        refused = BackendError(f"Redis at {self.url} refused to subscribe: {error}")
        for _, channel in head.due:
            if channel is not None:
                channel.fail(refused)
        if head.reconnect:
            self._notify_reconnected()

    def _notify_reconnected(self) -> None:
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:
                _log.exception("reconnect listener %r failed", listener)

    def _dispatch(self, key: bytes, payload: bytes) -> None:
        channel = self._channels.get(key)
        if channel is None:
            return
        for sub in tuple(channel.subs):
            if sub.active:
                try:
                    sub.handler(payload)
                except Exception:
                    _log.exception("handler %r of map %s failed", sub.handler, channel.map_name)
