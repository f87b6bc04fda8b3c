"""The Redis implementation of the backend protocol: maps, leases,
checkpoints and commits, on one server or a Redis Cluster.

Every update runs in one of the Lua scripts (:mod:`.scripts`). A transaction
is one script call on the actor's slot: all checks (txid, lease, versions
compared as numbers), then all writes, then one (S)PUBLISH per change set.
The client encodes every value and every published payload with orjson; the
scripts never decode JSON. Commits to one server share round trips
(:mod:`.group_commit`); :mod:`.routing` sends each command to the server of
its slot and retries; :mod:`.pubsub` delivers the change sets.

Replica acknowledgement: with ``wait_replicas=N`` every commit round trip
ends with ``WAIT N wait_timeout_ms`` on the same connection, so one WAIT
covers the whole batch. A commit is acknowledged only when WAIT counts N
replicas; short of that it raises :class:`DurabilityError` (the primary holds
it, a failover may lose it). A write of a short-lived key goes just before
the WAIT: WAIT only covers what its own connection wrote, and a commit that
landed in an earlier attempt (a lost reply) writes nothing the second time,
yet must be covered too. Only commits wait: the runtime writes through
commits alone; ``create_map``, ``delete_map``, ``destroy_actor`` and leases
do not.

At start the backend warns (once) when a server's ``maxmemory-policy`` is
not ``noeviction``: an eviction silently drops checkpoints, leases or maps.

The backend's ``url`` and every message it logs or raises carry the URL with
the password redacted.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, TypeVar

import orjson
from redis import exceptions as rexc

from ...errors import (
    BackendError,
    BackendUnavailableError,
    ConfigError,
    DurabilityError,
    LeaseHeldError,
    NodeIdInUseError,
    ShardUnavailableError,
    SharingError,
)
from ...names import check_actor_name, check_map_name, map_owner
from .. import BackendURL, parse_url
from ..base import (
    ChangeSet,
    Checkpoint,
    Known,
    MessageHandler,
    ReconnectListener,
    StoredActor,
    StoredMap,
    Transaction,
)
from ..wire import (
    VERSION_FIELD,
    EncodedTransaction,
    Fields,
    check_app,
    check_known,
    check_one_owner,
    check_open,
    decode_checkpoint,
    decode_version,
    deleted_marker,
    encode_dump,
    encode_transaction,
    finish_dump,
    load_chunk,
    make_dump,
    ttl_to_ms,
)
from .codec import (
    SAME,
    Command,
    Keys,
    StageLostError,
    commit_outcome,
    decode_all,
    decode_txid,
    flatten,
    held_args,
)
from .group_commit import GroupCommit, PendingCommit
from .options import Settings
from .pubsub import PubSub
from .routing import Router, Server, allowance
from .scripts import ACQUIRE, CLAIM, CREATE, DESTROY, READ, RELEASE, RENEW, SCRIPTS

__all__ = ["RedisBackend", "RedisStats"]

_log = logging.getLogger("caf_sharing.backends.redis")
_T = TypeVar("_T")

#: A map written whole with more fields or bytes than this is staged first,
#: in chunks of this size: one chunk is one HSET, a few ms of server time.
STAGE_FIELDS = 5000
STAGE_BYTES = 1 << 20
#: How long a staged hash no commit claimed lives.
STAGE_TTL_MS = 600_000


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
    #: Round trips sent again: lost connections, time-outs, MOVED/ASK/TRYAGAIN,
    #: NOSCRIPT.
    retries: int = 0


class RedisBackend:
    """The Redis implementation of :class:`~caf_sharing.backends.base.Backend`,
    for ``redis://``, ``rediss://`` (TLS), ``unix://``, and a Redis Cluster
    with ``redis+cluster://`` and ``rediss+cluster://``.

    Options (keyword arguments; the URL query may carry the TLS ones and
    ``wait_replicas``/``wait_timeout_ms``; a keyword argument wins over the
    URL):

    * ``coalescing_interval`` (s, 0.01): longest wait of a queued commit;
    * ``max_pending_updates`` (20): most commits in one round trip;
    * ``max_retries`` (10): retries per round trip; ``retry_delay`` (s, 0.1):
      the first pause, doubling up to ``max_retry_delay`` (s, 1, or
      ``retry_delay`` if longer), each with a random half taken off (jitter);
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
    * ``max_connections`` (16): command connections per server (pub/sub has
      its own);
    * ``read_chunk_size`` (1000): maps larger than this are read with HSCAN
      of this COUNT, between two reads of the version, instead of HGETALL;
    * ``health_check_interval`` (s, 5; 0: never): PING a pub/sub
      connection silent that long (looked at every half of it), and drop it
      if no answer comes within as long again (a dead link is noticed
      within 12.5 s);
    * ``restart_grace`` (True): a lease that is absent on a server up for
      less than one lease TTL is granted only once the server is that old
      (the node that held it may still run and put back what the restart
      lost); turn it off only for a server that loses no acknowledged write
      (``appendfsync always``);
    * ``username``, ``password``: override the URL's;
    * ``ssl_cert_reqs`` ("none" | "optional" | "required"), ``ssl_ca_certs``,
      ``ssl_certfile``, ``ssl_keyfile``, ``ssl_check_hostname``: ``rediss://``.
    """

    #: The keyword options it takes.
    OPTIONS = frozenset(inspect.signature(Settings.make).parameters) - {"cls", "target"}

    def __init__(self, url: str | BackendURL, *, app: str = "default",
                 **options: Any) -> None:
        target = url if isinstance(url, BackendURL) else parse_url(url)
        unknown = sorted(set(options) - self.OPTIONS)
        if unknown:
            raise ConfigError(f"unknown option(s) for {target.redacted}: {', '.join(unknown)}")
        #: Every option, checked.
        self.settings = settings = Settings.make(target, **options)
        self.url = settings.url
        self.app = check_app(app)
        self._keys = Keys(self.app)
        self._wait_tail = self._wait if settings.wait_replicas else None
        self._router = Router(settings)
        self._pubsub = PubSub(self._router, settings)
        self._committers: dict[Server, GroupCommit] = {}
        self._stats = RedisStats()
        self._started = False
        self._closed = False

    def __repr__(self) -> str:
        return f"RedisBackend({self.url!r}, app={self.app!r})"

    @property
    def stats(self) -> RedisStats:
        """Counters of this backend, for monitoring."""
        self._stats.retries = self._router.retries
        return self._stats

    @property
    def cluster(self) -> bool:
        """Whether this backend talks to a Redis Cluster."""
        return self._router.cluster

    def shard_of(self, actor: str) -> str:
        """``host:port`` (or socket path) of the server that holds ``actor``'s
        keys: on a cluster, the primary of its slot as last learned."""
        return self._router.server_for(actor).name

    def _check_open(self) -> None:
        check_open(self.url, self.app, self._started, self._closed)

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Check that every server answers and is what the URL says (one
        server, or a cluster), load the scripts and check the eviction policy."""
        if self._closed:
            raise BackendUnavailableError(f"backend {self.url} was closed; make a new one")
        if self._started:
            return
        try:
            per_server = await self._router.on_each_primary(
                [("INFO", "server"), ("INFO", "cluster"),
                 *(("SCRIPT", "LOAD", s.source) for s in SCRIPTS),
                 ("CONFIG", "GET", "maxmemory-policy")], "start")
        except BackendError as exc:
            if "SELECT is not allowed in cluster mode" in str(exc):
                raise ConfigError(f"Redis at {self.url} is a cluster node; use "
                                  "redis+cluster:// (database 0 only)") from None
            raise
        versions = []
        for server_info, cluster_info, *loaded, policy in per_server:
            for reply in (server_info, cluster_info, *loaded):
                if isinstance(reply, rexc.ResponseError):
                    raise BackendError(f"Redis at {self.url} cannot run our scripts: {reply}")
            if not self.cluster and b"cluster_enabled:1" in cluster_info:
                raise ConfigError(f"Redis at {self.url} is a cluster node; use "
                                  "redis+cluster:// instead of redis://")
            versions.append(_major_version(server_info))
            self._check_eviction(policy)
        # Sharded pub/sub where every server has it (Redis 7): see pubsub.py.
        sharded = self.cluster or min(versions) >= 7
        self._pubsub.use_sharded(sharded)
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
        for committer in list(self._committers.values()):
            await committer.drain()
        await self._pubsub.close()
        await self._router.close()

    # -- maps -------------------------------------------------------------

    async def create_map(self, name: str, initial: ChangeSet | None = None) -> ChangeSet:
        check_map_name(name)
        version, fields = (0, []) if initial is None else encode_dump(name, initial,
                                                                      "initial value")
        self._check_open()
        owner = map_owner(name)
        command = ("EVALSHA", CREATE.sha, 2, self._keys.map(name),
                   self._keys.actor(owner, "lineage"), name, version, *flatten(fields))
        # Someone may delete the map between the create and the read: try again.
        for _ in range(3):
            if await self._router.call_one(command, owner, f"create_map {name}") == 1:
                items: list[Any] = []
                for key, raw in fields:
                    items.append(key)
                    items.append(orjson.loads(raw))
                return make_dump(version, items)
            dump = await self.read_map(name)
            if dump is not None:
                return dump
        raise BackendError(f"map {name!r} keeps vanishing while it is created")

    async def read_map(self, name: str) -> ChangeSet | None:
        return (await self.read_maps([name]))[name]

    async def read_maps(self, names: Sequence[str], known: Known | None = None
                        ) -> dict[str, ChangeSet | None]:
        owner = check_one_owner(names)
        known = check_known(known)
        self._check_open()
        if owner is None:
            return {}
        keys = [self._keys.actor(owner, "lineage"), *map(self._keys.map, names)]
        what = f"read_map {', '.join(names)}"
        chunk = self.settings.read_chunk_size
        # Up to read_chunk_size fields come back per round trip.
        chunk_time = allowance(0, chunk)
        held = held_args(names, known)

        def command(limit: int) -> Command:
            return ("EVALSHA", READ.sha, len(keys), *keys, limit, *names, *held)

        call = self._router.call_one
        for _ in range(3):
            reply = await call(command(chunk), owner, what, chunk_time)
            if reply[0] == b"all":
                return decode_all(names, reply)
            before = reply[1:]
            scans = {name: await self._scan(name, key, owner, what, chunk_time)
                     if state != SAME and state[0] else None
                     for name, key, state in zip(names, keys[1:], before, strict=True)}
            # The same versions and txids before and after: no commit of the
            # owner happened in between, so the chunks make one consistent view.
            after = await call(command(-1), owner, what)
            if [s[:2] for s in before] == [s[:2] for s in after[1:]]:
                self._stats.chunked_reads += 1
                return {name: None if scan is None
                        else scan.dump(name, decode_txid(name, state[1]), state[2])
                        for (name, scan), state in zip(scans.items(), before, strict=True)
                        if state != SAME}
            self._stats.chunked_read_retries += 1
        # Written too often to scan: one atomic read, stalling Redis briefly.
        self._stats.whole_reads += 1
        _log.info("maps %s kept changing while read in chunks; reading them at once", names)
        reply = await call(command(2**62), owner, what,
                           allowance(0, sum(s[2] for s in before if s != SAME)))
        return decode_all(names, reply)

    async def map_stamp(self, name: str) -> tuple[int, str | None] | None:
        """The version of ``name`` and the txid that made it (``None``: no
        such map), without reading its content (see :mod:`.base`)."""
        check_map_name(name)
        self._check_open()
        owner = map_owner(name)
        # One slot (the owner's hash tag), one round trip, run back to back.
        version, txid = (await self._router.call(
            [("HGET", self._keys.map(name), VERSION_FIELD),
             ("HGET", self._keys.actor(owner, "lineage"), name)],
            owner, f"map_stamp {name}")).replies
        for reply in (version, txid):
            if isinstance(reply, rexc.ResponseError):
                raise BackendError(f"Redis at {self.url}: map_stamp {name} failed: {reply}")
        if version is None:
            return None
        return decode_version(name, version), _txid(txid) or None

    async def _scan(self, name: str, key: str, owner: str, what: str,
                    chunk_time: float) -> _Scan:
        """Read map ``name`` (at ``key``) in HSCAN chunks, each decoded as it
        comes (not while the next one is on its way: the time a chunk's call
        may take would then include ours, a GC pause of a big heap say)."""
        scan = _Scan()
        command = functools.partial(self._router.call_one, owner=owner, what=what,
                                    extra=chunk_time)
        count = self.settings.read_chunk_size
        cursor: bytes | int = 0
        while True:
            cursor, chunk = await command(("HSCAN", key, cursor, "COUNT", count))
            scan.add(name, chunk)
            if cursor in (0, b"0"):
                return scan

    async def delete_map(self, name: str) -> bool:
        check_map_name(name)
        self._check_open()
        what = f"delete_map {name}"
        owner = map_owner(name)
        routed = await self._router.call(
            [("DEL", self._keys.map(name)),
             ("HDEL", self._keys.actor(owner, "lineage"), name)], owner, what)
        for reply in routed.replies:
            if isinstance(reply, rexc.ResponseError):
                raise BackendError(f"Redis at {self.url}: {what} failed: {reply}")
        existed = bool(routed.replies[0])
        if existed:
            await self._router.call_one(
                (self._pubsub.publish, self._keys.channel(name), deleted_marker(None)), owner, what)
        return existed

    # -- leases and checkpoints -------------------------------------------------

    async def acquire_lease(self, actor: str, node_id: str, ttl: float) -> None:
        check_actor_name(actor)
        ms = ttl_to_ms(ttl)
        self._check_open()
        command = ("EVALSHA", ACQUIRE.sha, 1, self._keys.actor(actor, "lease"), node_id, ms,
                   1 if self.settings.restart_grace else 0)
        while True:
            reply = await self._router.call_one(command, actor, f"acquire_lease {actor}")
            if not isinstance(reply, int):
                break
            _log.warning("Redis at %s restarted %.1fs ago and may have lost data: waiting "
                         "%.1fs before taking the lease of %s, so that a node that held it "
                         "can put back what it holds", self.url, (ms - reply) / 1000,
                         reply / 1000, actor)
            await asyncio.sleep(reply / 1000)
        if reply is not None:
            holder, pttl = reply
            raise LeaseHeldError(actor, holder.decode(errors="replace"),
                                 pttl / 1000 if pttl >= 0 else None)

    async def _per_actor(self, commands: Sequence[Command], actors: Sequence[str], what: str,
                         result: Callable[[list[Any]], _T]) -> _T:
        """``result`` of the replies of one command per actor, each sent to
        its actor's shard (a failed actor's reply is ``None``). A shard that
        fails fails only its own actors: :class:`ShardUnavailableError`
        names them and carries the result all the same."""
        routed = await self._router.call(commands, actors, what, partial=True)
        failed: dict[str, BackendUnavailableError] = {}
        replies: list[Any] = []
        for actor, reply in zip(actors, routed.replies, strict=True):
            if isinstance(reply, BackendUnavailableError):
                failed[actor] = reply
                reply = None
            elif isinstance(reply, rexc.ResponseError):
                raise BackendError(f"Redis at {self.url}: {what} failed: {reply}")
            replies.append(reply)
        if not failed:
            return result(replies)
        first = next(iter(failed.values()))
        if len(failed) == len(actors):
            raise first
        raise ShardUnavailableError(
            f"{first} (actors {', '.join(sorted(failed))}; the others' {what} went through)",
            failed=sorted(failed), partial=result(replies))

    async def renew_leases(self, actors: Sequence[str], node_id: str, ttl: float) -> list[str]:
        for actor in actors:
            check_actor_name(actor)
        ms = ttl_to_ms(ttl)
        self._check_open()
        if not actors:
            return []
        commands = [("EVALSHA", RENEW.sha, 1, self._keys.actor(a, "lease"), node_id, ms)
                    for a in actors]
        # The script answers 0 where another node holds the lease (and a
        # failed actor's reply is None: unknown).
        return await self._per_actor(commands, actors, "renew_leases", lambda replies: [
            a for a, reply in zip(actors, replies, strict=True) if reply == 0])

    async def release_lease(self, actor: str, node_id: str) -> None:
        check_actor_name(actor)
        self._check_open()
        await self._router.call_one(
            ("EVALSHA", RELEASE.sha, 1, self._keys.actor(actor, "lease"), node_id), actor,
            f"release_lease {actor}")

    async def destroy_actor(self, actor: str) -> bool:
        check_actor_name(actor)
        self._check_open()
        what = f"destroy_actor {actor}"
        prefix = self._keys.actor(actor, "")
        for _ in range(5):
            checkpoint = await self.load_checkpoint(actor)
            txid = "" if checkpoint is None else str(checkpoint.get("txid") or "")
            registered = _registered_maps(actor, checkpoint)
            reply = await self._router.call_one(
                ("EVALSHA", DESTROY.sha, 4, prefix + "cp", prefix + "lease",
                 prefix + "lineage", prefix + "recent", txid, prefix + "map:",
                 prefix + "chan:", self._pubsub.publish, deleted_marker(None), *registered),
                actor, what)
            if reply[0] == b"lease":
                raise LeaseHeldError(actor, reply[1].decode(errors="replace"),
                                     reply[2] / 1000 if reply[2] >= 0 else None)
            if reply[0] == b"ok":
                return bool(reply[1])
        raise BackendError(f"Redis at {self.url}: {what}: its checkpoint keeps changing")

    async def claim_node(self, node_id: str, nonce: str, ttl: float) -> None:
        ms = ttl_to_ms(ttl)
        self._check_open()
        key = self._keys.node(node_id)
        # The key is its own routing owner: its hash tag picks its slot.
        reply = await self._router.call_one(("EVALSHA", CLAIM.sha, 1, key, nonce, ms), key,
                                            f"claim_node {node_id}")
        if reply is not None:
            raise NodeIdInUseError(node_id, f"{self.url} (app {self.app!r})",
                                   reply[0] / 1000 if reply[0] >= 0 else None)

    async def release_node(self, node_id: str, nonce: str) -> None:
        self._check_open()
        key = self._keys.node(node_id)
        await self._router.call_one(("EVALSHA", RELEASE.sha, 1, key, nonce), key,
                                    f"release_node {node_id}")

    async def load_checkpoint(self, actor: str) -> Checkpoint | None:
        check_actor_name(actor)
        self._check_open()
        raw = await self._router.call_one(("HGET", self._keys.actor(actor, "cp"), "blob"),
                                          actor, f"load_checkpoint {actor}")
        return None if raw is None else decode_checkpoint(actor, raw)

    async def load_txids(self, actors: Sequence[str]) -> list[str | None]:
        for actor in actors:
            check_actor_name(actor)
        self._check_open()
        if not actors:
            return []
        commands = [("HGET", self._keys.actor(a, "cp"), "txid") for a in actors]
        return await self._per_actor(commands, actors, "load_txids",
                                     lambda replies: [_txid(reply) for reply in replies])

    # -- commits ------------------------------------------------------------

    async def commit(self, tx: Transaction) -> bool:
        enc = encode_transaction(tx)
        del tx  # not held while in flight (see EncodedTransaction.drop_writes)
        self._check_open()
        try:
            return await self._commit(enc)
        except StageLostError:
            # The server lost a staged hash (a failover, say): once more.
            _log.warning("Redis at %s: commit %s lost its staged maps; staging them again",
                         self.url, enc.txid)
            return await self._commit(enc)

    async def _commit(self, enc: EncodedTransaction) -> bool:
        big = _big_wholes(enc)
        staged = await self._stage(enc, big) if big else None
        command = self._keys.commit(enc, self._pubsub.publish, staged)
        if staged is None:  # else StageLostError sends it again, writes and all
            enc.drop_writes()
        pending = PendingCommit(enc, command, asyncio.get_running_loop().create_future())
        server = self._router.server_for(enc.actor)
        committer = self._committers.get(server)
        if committer is None:
            committer = self._committers[server] = GroupCommit(
                self._round_trip, self.settings.coalescing_interval,
                self.settings.max_pending_updates)
        return await committer.commit(pending)

    async def _stage(self, enc: EncodedTransaction,
                     big: list[tuple[str, str, Fields]]) -> dict[str, str]:
        """Write the content of each big map the commit writes whole (a create,
        a full dump, a restore: ``big``, from :func:`_big_wholes`) to a hash of
        its own first, in chunks of one round trip each, so that no call
        stalls the server (a 1M-key map in one script blocked Redis for
        seconds). The commit renames it into place, atomically with the rest;
        until then readers see nothing of it. A hash no commit claims expires."""
        staged: dict[str, str] = {}
        for item, name, fields in big:
            key = staged[item] = self._keys.stage(enc, item)
            what = f"commit {enc.txid}: staging map {name}"
            # Each chunk is encoded just before it is sent and dropped once
            # sent: the client never holds the whole map encoded.
            for n, chunk in enumerate(fields.chunks(STAGE_FIELDS, STAGE_BYTES)):
                commands: list[Command] = [("HSET", key, *flatten(chunk))]
                del chunk
                if n == 0:
                    # What an earlier attempt of this txid staged goes first.
                    commands = [("UNLINK", key), *commands, ("PEXPIRE", key, STAGE_TTL_MS)]
                for reply in (await self._router.call(commands, enc.actor, what)).replies:
                    if isinstance(reply, rexc.ResponseError):
                        raise BackendError(f"Redis at {self.url}: {what} failed: {reply}")
        return staged

    async def _round_trip(self, batch: list[PendingCommit]) -> None:
        self._stats.round_trips += 1
        self._stats.commits += len(batch)
        self._stats.largest_batch = max(self._stats.largest_batch, len(batch))
        tail = self._wait_tail
        try:
            routed = await self._router.call(
                [p.command for p in batch], [p.tx.actor for p in batch], "commit", tail=tail,
                extra=self.settings.wait_timeout_ms / 1000 if tail is not None else 0.0)
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
            for i, (pending, reply) in enumerate(zip(batch, routed.replies, strict=True)):
                if pending.future.done():
                    continue
                try:
                    outcome = commit_outcome(self.url, pending.tx, reply)
                    if tail is not None:
                        self._check_replicated(pending.tx, routed.tails[i][-1])
                    pending.future.set_result(outcome)
                except SharingError as error:
                    pending.future.set_exception(error)

    def _wait(self, owner: str) -> tuple[Command, ...]:
        """What ends a commit round trip with wait_replicas: a write of this
        connection's own, then WAIT (see the module docstring). The write is
        to a key of the slot of ``owner``, an actor of the round trip, so that
        it runs on that shard; PUBLISH would not do on a cluster, where it
        travels over the cluster bus, not the replication stream WAIT
        counts."""
        return (("SET", self._keys.actor(owner, "wait"), "", "PX", self.settings.wait_timeout_ms),
                ("WAIT", self.settings.wait_replicas, self.settings.wait_timeout_ms))

    def _check_replicated(self, tx: EncodedTransaction, confirmed: Any) -> None:
        """Raise DurabilityError unless the batch's WAIT counted enough replicas."""
        wanted = self.settings.wait_replicas
        if isinstance(confirmed, int) and confirmed >= wanted:
            return
        if isinstance(confirmed, int):
            why = (f"{confirmed} of {wanted} replica(s) confirmed it within "
                   f"{self.settings.wait_timeout_ms} ms")
        else:
            why = f"WAIT failed: {confirmed}"
            confirmed = 0
        self._stats.unconfirmed += 1
        raise DurabilityError(
            f"Redis at {self.url}: commit {tx.txid} of {tx.actor}: {why}; the outcome is "
            "ambiguous: the primary holds the commit, but a failover may lose it",
            required=wanted, confirmed=confirmed)

    # -- survey and purge ------------------------------------------------------

    async def _scan_keys(self, pattern: str, what: str) -> AsyncIterator[list[bytes]]:
        """The keys matching ``pattern`` on every primary, a SCAN page at a time."""
        for server in await self._router.servers_now():
            cursor: bytes | int = 0
            while True:
                cursor, keys = (await self._router.call(
                    [("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)], "", what,
                    to=server)).replies[0]
                yield keys
                if cursor in (0, b"0"):
                    break

    async def purge(self, expire_after: float | None = None) -> int:
        self._check_open()
        count = 0
        async for page in self._scan_keys(f"caf:{self.app}:*", "purge"):
            tags = [_TAG.search(raw) for raw in page]
            commands: list[Command] = [
                ("UNLINK", raw) if expire_after is None
                else ("PEXPIRE", raw, max(1, round(expire_after * 1000))) for raw in page]
            if commands:
                # One key a command: on a cluster the keys of a page span slots.
                await self._router.call(commands, [t.group(1).decode() if t else ""
                                                   for t in tags], "purge")
                count += len(commands)
        return count

    async def survey(self, every_app: bool = False) -> tuple[list[StoredMap], list[StoredActor]]:
        self._check_open()
        pattern = "caf:*" if every_app else f"caf:{self.app}:*"
        maps: set[tuple[str, str, str]] = set()  # (app, owner, name)
        actors: set[tuple[str, str]] = set()
        async for page in self._scan_keys(pattern, "survey"):
            for raw in page:
                found = _KEY.fullmatch(raw)
                if found is None:
                    continue
                app, owner, what = (part.decode(errors="replace") for part in found.groups())
                if what.startswith("map:"):
                    maps.add((app, owner, what[4:]))
                else:
                    actors.add((app, owner))
        map_list, actor_list = sorted(maps), sorted(actors)
        commands: list[Command] = []
        for app, owner, name in map_list:
            key = f"caf:{app}:{{{owner}}}:map:{name}"
            commands += [("HGET", key, "__ca_version__"), ("HLEN", key),
                         ("MEMORY", "USAGE", key)]
        for app, actor in actor_list:
            prefix = f"caf:{app}:{{{actor}}}:"
            commands += [("HGET", prefix + "cp", "txid"), ("GET", prefix + "lease"),
                         ("PTTL", prefix + "lease")]
        owners = [owner for _, owner, _ in map_list for _ in range(3)] + \
            [actor for _, actor in actor_list for _ in range(3)]
        replies = (await self._router.call(commands, owners, "survey")).replies if commands \
            else []
        stored_maps = []
        for i, (app, _, name) in enumerate(map_list):
            version, size, usage = replies[3 * i:3 * i + 3]
            if version is None or isinstance(version, rexc.ResponseError):
                continue  # deleted meanwhile
            stored_maps.append(StoredMap(app, name, int(version), max(int(size) - 1, 0),
                                         usage if isinstance(usage, int) else 0))
        stored_actors = []
        base = 3 * len(map_list)
        for i, (app, actor) in enumerate(actor_list):
            txid, holder, pttl = replies[base + 3 * i:base + 3 * i + 3]
            stored_actors.append(StoredActor(
                app, actor, _txid(txid), _txid(holder),
                pttl / 1000 if holder is not None and isinstance(pttl, int) and pttl > 0
                else None))
        return stored_maps, stored_actors

    # -- pub/sub ------------------------------------------------------------

    def add_reconnect_listener(self, listener: ReconnectListener) -> None:
        self._pubsub.add_listener(listener)

    async def subscribe(self, name: str, handler: MessageHandler) -> None:
        check_map_name(name)
        if not callable(handler):
            raise TypeError(f"handler must be callable, got {type(handler).__name__}")
        self._check_open()
        await self._pubsub.subscribe(self._keys.channel(name).encode(), name, handler)

    async def unsubscribe(self, name: str, handler: MessageHandler) -> None:
        check_map_name(name)
        self._check_open()
        await self._pubsub.unsubscribe(self._keys.channel(name).encode(), handler)


class _Scan:
    """What HSCAN chunks of one map gave: decoded fields (str, frozen value,
    ...), the raw version field, or the error of a bad field (raised only if
    the read turns out consistent: a map written meanwhile is read again)."""

    __slots__ = ("error", "items", "version")

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.version: bytes | None = None
        self.error: BackendError | None = None

    def add(self, name: str, chunk: list[Any]) -> None:
        if self.error is not None:
            return
        try:
            version = load_chunk(name, chunk, self.items)
        except BackendError as exc:
            self.error, self.items = exc, []
            return
        if version is not None:
            self.version = version

    def dump(self, name: str, txid: str | None, fields: int) -> ChangeSet:
        """The dump of map ``name``, made by ``txid``, of ``fields`` fields
        (its HLEN, the version field included)."""
        if self.error is not None:
            raise self.error
        items = self.items
        if len(items) // 2 + (self.version is not None) > fields:
            # HSCAN returned a field twice (the hash was resized meanwhile).
            pairs = dict(zip(items[::2], items[1::2], strict=True))
            items = list(chain.from_iterable(pairs.items()))
        return finish_dump(name, items, self.version, txid)


_TAG = re.compile(rb"\{([^}]*)\}")
_KEY = re.compile(rb"caf:([A-Za-z0-9_.\-]+):\{([^}]*)\}:(cp|lease|map:.+)")


def _big_wholes(enc: EncodedTransaction) -> list[tuple[str, str, Fields]]:
    """The whole maps of ``enc`` (creates, full dumps, restores) too big for
    the commit script itself: (item, map name, fields) each, the item naming
    it in the commit's arguments (see :meth:`Keys.commit`)."""
    if not enc.creates and not enc.restores:
        # A plain commit, as nearly all are (a loop: a generator costs more).
        for write in enc.writes:
            if write.full is not None:
                break
        else:
            return []
    wholes = [*((f"c{i}", c.name, c.fields) for i, c in enumerate(enc.creates)),
              *((f"w{i}", w.name, w.full) for i, w in enumerate(enc.writes)
                if w.full is not None),
              *((f"r{i}", r.name, r.fields) for i, r in enumerate(enc.restores))]
    return [(item, name, fields) for item, name, fields in wholes
            if len(fields) > STAGE_FIELDS or fields.size > STAGE_BYTES]


def _registered_maps(actor: str, checkpoint: Checkpoint | None) -> list[str]:
    """The maps of ``actor`` its checkpoint registers (a map made outside any
    commit is in no lineage hash, but may be registered)."""
    maps = None if checkpoint is None else checkpoint.get("maps")
    if not isinstance(maps, dict):
        return []
    names = {entry.get("name") for entry in maps.values() if isinstance(entry, dict)}
    return sorted(name for name in names
                  if isinstance(name, str) and _owned_by(name, actor))


def _owned_by(name: str, actor: str) -> bool:
    try:
        return map_owner(name) == actor
    except ValueError:
        return False


def _txid(reply: Any) -> str | None:
    return None if reply is None else reply.decode(errors="replace")


def _major_version(info: bytes) -> int:
    for line in info.splitlines():
        if line.startswith(b"redis_version:"):
            try:
                return int(line.split(b":", 1)[1].split(b".", 1)[0])
            except ValueError:
                break
    return 0
