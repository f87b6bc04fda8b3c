"""SharingService: the per-node registry of SharedMaps.

One service per node sits between the actors' sharing plugs and the backend:

* **primaries** — one writable SharedMap per map owned by a local actor. It
  advances only after the backend confirmed a commit, so it always holds a
  version that is durable.
* **replicas** — read-only copies of maps, shared by every local actor that
  reads them and reference counted: the backend subscription is dropped when
  the last reader lets go. A replica subscribes first, then reads the map,
  then applies what arrived in between, so no update falls in a window.
  The replicas of one writer's maps move together, so that a message finds
  them at one commit: a replica loads in one read with its open siblings,
  and the change sets of one commit are held until all that this node reads
  came, then applied at once (see :data:`~.backends.wire.MORE`).
  Gaps and malformed messages trigger a resync from a full read. Watchers
  (:meth:`SharingService.watch`) hear of every change of a replica's content;
  views and ``on_change`` notifications are built on them.
* **aggregates** — AggregateMaps whose linked maps are found best-effort
  through replicas.

Updates land as new versions of the SharedMap, so snapshots that actors hold
stay valid while replicas move on (readers isolation, fairness).

**Lineage** (DESIGN.md section 9): the rules that keep the guarantees when
the store loses data live in :mod:`caf_sharing.lineage`; this module applies
them to its replicas (fork detection, never going back, atomic resyncs per
writer) and primaries (adoption above every seen version, re-asserts).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

from ._fastmap import MapRef, SharedMap
from .aggregate import DEFAULT_LINK_KEY, AggregateMap
from .backends.base import (
    DELETED,
    Backend,
    ChangeSet,
    Checkpoint,
    MapCreate,
    MapRestore,
    MapWrite,
    MessageHandler,
    Transaction,
)
from .backends.wire import MORE, TIMESTAMP, decode_changes
from .errors import (
    ChainError,
    InvalidChangeSetError,
    MapMissingError,
    MapNotFoundError,
    MissedUpdateError,
    PrepareRequiredError,
    SharingError,
)
from .lineage import (
    Relation,
    ReplicaLineage,
    Stays,
    adopted_version,
    dump_version,
    renumbered,
    txid_of,
)
from .methods import MethodLimits, check_limits
from .metrics import LatencySummary, Observer, notify
from .names import SEPARATOR, map_owner

__all__ = ["ServiceStats", "SharingService", "Watcher", "txid_of"]

log = logging.getLogger("caf_sharing.service")


@dataclass(slots=True)
class ServiceStats:
    """Counters a node exposes for monitoring and tests."""

    #: Change sets applied to replicas.
    applied: int = 0
    #: Messages that were not valid change sets (undecodable or wrong shape).
    malformed: int = 0
    #: Change sets that skipped a version (a missed update).
    gaps: int = 0
    #: Full reads done to bring a replica back in line.
    resyncs: int = 0
    #: Times a replica was found holding history the store does not have.
    forks: int = 0
    #: Times a resync buffer overflowed and was dropped for a new resync.
    overflows: int = 0
    #: Re-asserts: this node put back what the store lost of one of its actors.
    reasserts: int = 0
    #: Maps a writer took from the store and renumbered above what it held.
    adoptions: int = 0
    #: Replicas whose map was deleted (a deletion marker, confirmed by a read).
    deletions: int = 0


#: Replicas kept after their last reader let go, so that re-opening one never
#: reads an older version than this node already showed.
RETIRED_REPLICAS = 64
#: Bytes of messages a replica buffers during a resync before it drops them
#: and resyncs again (a flood must not grow memory without bound).
MAX_BUFFERED_BYTES = 16 * 2**20

#: Called with no argument after a replica's content changed (see
#: :meth:`SharingService.watch`).
Watcher = Callable[[], None]


class _Replica:
    """One subscribed replica, its lineage and the state of its catch-up protocol."""

    __slots__ = ("buffer", "buffered", "count", "deleted", "deletion_hint", "error", "found",
                 "handle", "lineage", "map", "name", "owner", "watchers")

    def __init__(self, service: SharingService, name: str, shared: SharedMap) -> None:
        self.name = name
        self.owner = map_owner(name)
        self.map = shared
        self.count = 1
        # Messages that arrive while the replica loads or resyncs wait here,
        # so that nothing published after the full read is lost.
        self.buffer: list[tuple[int, bytes]] | None = []
        self.buffered = 0
        self.lineage = ReplicaLineage()
        #: The map was deleted: the replica is empty until it is created again.
        self.deleted = False
        #: A deletion marker arrived; the next resync checks the store.
        self.deletion_hint = False
        #: What the last read of the writer's maps said of this one: whether
        #: the store has it, and why it could not be read (see _load).
        self.found = False
        self.error: SharingError | None = None
        #: Replaced, never changed in place: each change walks it while a
        #: watcher may stop, with no copy per change.
        self.watchers: tuple[Watcher, ...] = ()
        self.handle: MessageHandler = functools.partial(service._on_message, self)


#: Seconds a reader waits for the rest of a commit's change sets (see
#: :data:`~caf_sharing.backends.wire.MORE`) before it resyncs instead: they
#: follow each other on one connection, so only a lost or forged one takes long.
GROUP_WAIT = 5.0


@dataclass(eq=False, slots=True)
class _Group:
    """Change sets of one commit held until all that this node reads came,
    so that they land together."""

    txid: object
    parts: list[tuple[_Replica, dict[str, Any]]]
    #: The replicas whose change set of the commit is still to come.
    waiting: set[_Replica]
    timer: asyncio.TimerHandle


@dataclass(slots=True)
class _Primary:
    map: SharedMap
    #: Txid of the commit that made the map's version (None: unknown).
    txid: str | None
    #: Stored version the map's version renumbers, until its next commit.
    rebase_from: int | None = None


@dataclass(eq=False, slots=True)
class _Aggregate:
    map: AggregateMap
    count: int = 1


class _Counted(Protocol):
    map: Any
    count: int


_K = TypeVar("_K")
_E = TypeVar("_E", bound=_Counted)


class SharingService:
    """Primaries, replicas and aggregates of one node, over one backend."""

    def __init__(self, backend: Backend, *, max_updates: int = 100,
                 logger: logging.Logger | None = None,
                 method_limits: MethodLimits | None = None,
                 observer: Observer | None = None) -> None:
        self.backend = backend
        self._observer = observer or Observer()
        # Told of each change set applied only when it overrides on_apply: a
        # call per message for nobody is a measurable part of a reader's work.
        self._observes_apply = getattr(getattr(self._observer, "on_apply", None), "__func__",
                                       None) is not Observer.on_apply
        # The budget of methods run on this node's maps (None: the defaults).
        self._method_limits = check_limits(method_limits)
        self.stats = ServiceStats()
        #: Per replicated map: from the writer's commit to its change set
        #: applied here (writer's clock against this one's).
        self.propagation_lag: dict[str, LatencySummary] = {}
        self._max_updates = max_updates
        self._log = logger or log
        self._primaries: dict[str, _Primary] = {}
        # Maps created by the last commit that created them: name -> its txid.
        self._created: dict[str, str] = {}
        # The actors this node hosts, as lineage sees them.
        self._stays = Stays()
        self._replicas: dict[tuple[str, bool], _Replica] = {}
        self._retired: OrderedDict[tuple[str, bool], _Replica] = OrderedDict()
        # Replicas subscribed and waiting for their first read (see _load).
        self._opening: set[_Replica] = set()
        self._resyncs: dict[str, asyncio.Task[None]] = {}
        self._resync_again: set[str] = set()
        # Messages buffered so far, numbering each as it arrives (see _drain).
        self._arrivals = 0
        # Owners with a replica that may have missed or mistaken a change set.
        self._troubled: set[str] = set()
        # Per owner: the change sets of a commit held until all came.
        self._groups: dict[str, _Group] = {}
        self._aggregates: dict[tuple[str, str, bool], _Aggregate] = {}
        self._closed = False
        backend.add_reconnect_listener(self._on_reconnect)

    # -- primaries ---------------------------------------------------------

    async def primary(self, name: str) -> SharedMap:
        """The local writable copy of ``name``, loaded from the backend once."""
        found = self._primaries.get(name)
        if found is not None:
            return found.map
        dump = await self.backend.read_map(name)
        if dump is None:
            raise MapNotFoundError(name)
        found = self._primaries.get(name)
        if found is not None:  # another actor task loaded it meanwhile
            return found.map
        return self._load_primary(name, dump).map

    def new_primary_map(self) -> SharedMap:
        """An empty map made as this service makes its primaries."""
        return SharedMap(max_updates=self._max_updates, logger=self._log,
                         method_limits=self._method_limits)

    async def install_created(self, name: str, shared: SharedMap) -> bool:
        """Take ``shared`` (made by :meth:`new_primary_map`, holding the
        initial value of a map the last commit created) as the primary of
        ``name`` instead of reading the map back, if the store holds exactly
        it: the version of ``shared`` made by that commit (one map version
        made by one commit has one content). Else (or with a backend that
        cannot tell) the primary is read from the store when first needed,
        as ever."""
        txid = self._created.pop(name, None)
        stamp_of = getattr(self.backend, "map_stamp", None)
        if txid is None or stamp_of is None or name in self._primaries:
            return False
        try:
            stamp = await stamp_of(name)
        except SharingError as exc:
            # Only a shortcut: the message committed, and the read still works.
            self._log.debug("map %s: stamp unavailable (%s); reading it when needed", name, exc)
            return False
        if stamp != (shared.version, txid) or name in self._primaries \
                or not self._stays.own(map_owner(name), txid):
            return False
        self._primaries[name] = _Primary(shared, txid)
        return True

    def _load_primary(self, name: str, dump: ChangeSet) -> _Primary:
        txid = dump.get("txid")
        shared = self.new_primary_map()
        if self._stays.own(map_owner(name), txid):
            shared.apply_changes(dump)
            primary = _Primary(shared, txid)
        else:
            # Not made by this node's own commits: the store may have lost
            # versions that readers saw, so continue above all of them.
            stored = dump_version(dump)
            shared.apply_changes(renumbered(dump, adopted_version(stored)))
            primary = _Primary(shared, txid, stored)
            self.stats.adoptions += 1
            self._log.debug("map %s adopted at version %d (txid %s), renumbered to %d",
                            name, stored, txid, shared.version)
        self._primaries[name] = primary
        return primary

    async def refresh_primary(self, name: str) -> SharedMap:
        """Bring the local primary in line with the backend after a commit
        whose outcome is unknown: keep it when the store holds the same
        version; take a newer one this node's own commits made; adopt the
        store's state otherwise (another node wrote the map). A map the
        backend lost keeps its local copy (the next commit re-creates it)."""
        dump = await self.backend.read_map(name)
        held = self._primaries.get(name)
        if dump is None:
            return held.map if held is not None else await self.primary(name)
        if held is None:
            return self._load_primary(name, dump).map
        version, txid = dump_version(dump), dump.get("txid")
        if txid == held.txid and version in (held.map.version, held.rebase_from):
            return held.map
        if version > held.map.version and self._stays.own(map_owner(name), txid):
            held.map.apply_changes(dump)
            held.txid, held.rebase_from = txid, None
            return held.map
        del self._primaries[name]
        return self._load_primary(name, dump).map

    def host_actor(self, actor: str, epoch: str, resumed_txid: str | None) -> None:
        """This node hosts ``actor``, committing as ``epoch`` (see
        :func:`~caf_sharing.lineage.txid_of`), from the stored commit
        ``resumed_txid`` (``None``: none). Maps it loads that this epoch did
        not write are adopted."""
        self._stays.host(actor, epoch, resumed_txid)

    def forget_actor(self, actor: str) -> None:
        """The actor left this node: its next start here adopts the store's state."""
        self._stays.forget(actor)

    def relation(self, actor: str, stored_txid: str | None, held_txid: str | None) -> Relation:
        """See :meth:`caf_sharing.lineage.Stays.relation`."""
        return self._stays.relation(actor, stored_txid, held_txid)

    def drop_primary(self, name: str) -> None:
        """Forget the local copy of ``name``: its actor left this node and may
        write elsewhere meanwhile."""
        self._primaries.pop(name, None)

    # -- replicas ----------------------------------------------------------

    async def replica_of(self, name: str, *, best_effort: bool = False,
                         no_exec: bool = False) -> SharedMap | None:
        """A shared read-only replica of ``name`` (one more reference to it).

        With ``best_effort`` a map that does not exist yet (or cannot be read)
        gives ``None`` instead of an error, so the caller can retry later.
        """
        key = (name, no_exec)
        replica = self._replicas.get(key)
        if replica is not None:
            if replica.deleted and not best_effort:
                raise MapNotFoundError(name)
            replica.count += 1
            return replica.map
        try:
            replica = await self._open_replica(key)
        except SharingError:
            if best_effort:
                self._log.debug("replica of %s not available yet", name)
                return None
            raise
        existing = self._replicas.get(key)
        if existing is not None:  # opened concurrently: keep one subscription
            await self.backend.unsubscribe(name, replica.handle)
            existing.count += 1
            return existing.map
        self._replicas[key] = replica
        return replica.map

    async def _open_replica(self, key: tuple[str, bool]) -> _Replica:
        name, no_exec = key
        retired = self._retired.pop(key, None)
        if retired is not None:
            replica = retired
            replica.count, replica.buffer, replica.buffered = 1, [], 0
        else:
            replica = _Replica(self, name, SharedMap(no_exec=no_exec,
                                                     max_updates=self._max_updates,
                                                     logger=self._log,
                                                     method_limits=self._method_limits,
                                                     name=name))
        try:
            await self.backend.subscribe(name, replica.handle)
        except BaseException:
            self._retire(key, retired)
            raise
        try:
            await self._load(replica)
            if not replica.found and (retired is None or retired.deleted):
                raise MapNotFoundError(name)
            # else found, or the store lost the map: stay readable at the
            # version already shown until its writer re-creates it.
        except BaseException:
            self._retire(key, retired)
            await self.backend.unsubscribe(name, replica.handle)
            raise
        return replica

    async def _load(self, replica: _Replica) -> None:
        """Read ``replica`` (subscribed, buffering) from the store, together
        with every other replica of its writer.

        Readers isolation and writer atomicity hold across maps only if a
        message finds all of one writer's maps at one commit. Read alone, a
        map could come out a commit ahead of a sibling whose change set is
        still on its way over pub/sub (another connection), and a message
        would see both. So the load is a resync of the writer's maps that the
        new replica joins: one consistent read, installed into all of them at
        once (:meth:`_resync`), never beside another read of them.
        """
        self._opening.add(replica)
        try:
            self._schedule_read(replica)
            while (task := self._resyncs.get(replica.owner)) is not None:
                try:
                    await asyncio.shield(task)
                except asyncio.CancelledError:
                    if not (task.cancelled() and self._closed):
                        raise
                    break
            if replica.buffer is not None:  # the service closed meanwhile
                raise SharingError(f"the service closed while map {replica.name!r} opened")
            if replica.error is not None:
                raise replica.error
        finally:
            self._opening.discard(replica)
            replica.error = None

    async def release_replica(self, name: str, shared: SharedMap) -> None:
        """Drop one reference; unsubscribe when it was the last one."""
        key = (name, shared.no_exec)
        replica = self._drop_reference(self._replicas, key, shared)
        if replica is None:
            return
        group = self._groups.get(replica.owner)
        if group is not None and replica in group.waiting:
            group.waiting.discard(replica)
            if not group.waiting:
                self._apply_group(replica.owner)
        self._retire(key, replica)
        await self.backend.unsubscribe(name, replica.handle)

    def is_deleted(self, name: str, shared: SharedMap) -> bool:
        """Whether the replica ``shared`` of ``name`` stands for a map that
        was deleted (and not created again since)."""
        if shared.version:  # a deleted replica is reset to version 0
            return False
        replica = self._replicas.get((name, shared.no_exec))
        return replica is not None and replica.map is shared and replica.deleted

    def watch(self, name: str, shared: SharedMap, watcher: Watcher) -> Callable[[], None]:
        """Call ``watcher()`` after each change of the replica ``shared`` of
        ``name`` (one the caller holds a reference to); return the function
        that stops it (it may be called after the replica was released).

        Watchers run inside the service, as the change lands, and must only
        schedule work: a resync installs every replica of one writer before
        the event loop runs anything else, so that what they schedule sees
        the writer's maps at one commit.
        """
        replica = self._replicas.get((name, shared.no_exec))
        if replica is None or replica.map is not shared:
            raise SharingError(f"no replica of map {name!r} is held on this node to watch")
        replica.watchers += (watcher,)

        def stop() -> None:
            watchers = replica.watchers
            if watcher in watchers:
                i = watchers.index(watcher)
                replica.watchers = watchers[:i] + watchers[i + 1:]

        return stop

    def _changed(self, replica: _Replica) -> None:
        for watcher in replica.watchers:
            try:
                watcher()
            except Exception:
                self._log.exception("watcher %r of map %s failed", watcher, replica.name)

    def _retire(self, key: tuple[str, bool], replica: _Replica | None) -> None:
        """Keep ``replica``, which no reader holds, for the next open of ``key``
        (a failed open keeps the one it took)."""
        if replica is None or self._closed:
            return
        replica.buffer = None
        self._retired[key] = replica
        if len(self._retired) > RETIRED_REPLICAS:
            self._retired.popitem(last=False)

    def _drop_reference(self, table: dict[_K, _E], key: _K, held: object) -> _E | None:
        """Count one reference to ``held`` less; the entry once none is left."""
        entry = table.get(key)
        if entry is None or entry.map is not held:
            self._log.debug("ignoring release of unknown map %s", key)
            return None
        entry.count -= 1
        if entry.count > 0:
            return None
        del table[key]
        return entry

    def _on_message(self, replica: _Replica, data: bytes) -> None:
        if replica.buffer is None:
            self._apply(replica, data)
            return
        # Numbered as they arrive: a drain replays a writer's maps in that order.
        self._arrivals += 1
        replica.buffer.append((self._arrivals, data))
        replica.buffered += len(data)
        if replica.buffered > MAX_BUFFERED_BYTES:
            # The resync under way will be stale anyway: read again after it.
            self.stats.overflows += 1
            self._log.warning("replica %s buffered over %d bytes during a resync: dropping "
                              "them and resyncing again", replica.name, MAX_BUFFERED_BYTES,
                              extra={"map": replica.name})
            replica.buffer, replica.buffered = [], 0
            self._schedule_resync(replica)

    def _apply(self, replica: _Replica, data: bytes) -> None:
        """Apply the message ``data`` to ``replica``, or hold it until its
        siblings' change sets of the same commit came (:class:`_Group`)."""
        try:
            changes = decode_changes(replica.name, data)
            sets: Sequence[Any]
            more = None
            if type(changes) is list:
                sets = changes
            elif isinstance(changes, dict) and changes.get(DELETED) is True:
                # Only a hint: a forged marker must not empty a replica, so
                # the resync it triggers reads the store to confirm it.
                replica.deletion_hint = True
                self._schedule_resync(replica)
                return
            else:
                sets = (changes,)
                if type(changes) is dict:
                    more = changes.pop(MORE, None)
            if (more is not None or replica.owner in self._groups) \
                    and self._grouped(replica, changes, more):
                return
        except (InvalidChangeSetError, TypeError, ValueError) as exc:
            self._malformed(replica, exc)
            return
        self._take(replica, changes, sets)

    def _take(self, replica: _Replica, changes: Any, sets: Sequence[Any]) -> None:
        shared = replica.map
        before = shared.version
        try:
            fork = replica.lineage.conflict(before, sets)
            if fork is not None:
                self._forked(replica, fork)
                return
            shared.apply_changes(changes)
        except MissedUpdateError as exc:
            self.stats.gaps += 1
            self._log.debug("replica %s missed updates (%s): resync", replica.name, exc)
            self._schedule_resync(replica)
        except (InvalidChangeSetError, TypeError, ValueError) as exc:
            self._malformed(replica, exc)
        else:
            self.stats.applied += 1
            version = shared.version
            if version > before:
                self._advanced(replica, version, sets[-1])

    def _malformed(self, replica: _Replica, exc: Exception) -> None:
        self.stats.malformed += 1
        self._log.warning("malformed message on map %s ignored (%s): resync",
                          replica.name, exc, extra={"map": replica.name})
        self._schedule_resync(replica)

    def _grouped(self, replica: _Replica, changes: Any, more: object) -> bool:
        """Whether the change set ``changes`` of ``replica`` went into its
        commit's group (applied with it, held, or dropped with it)."""
        owner = replica.owner
        group = self._groups.get(owner)
        txid = changes.get("txid") if type(changes) is dict else None
        if group is None:
            waiting = self._siblings(replica, more)
            if not waiting:
                return False
            # The same change set comes next for a twin replica (the other no_exec).
            twin = self._replicas.get((replica.name, not replica.map.no_exec))
            if twin is not None and twin.buffer is None:
                waiting.add(twin)
            self._groups[owner] = _Group(txid, [(replica, changes)], waiting,
                                         asyncio.get_running_loop().call_later(
                                             GROUP_WAIT, self._group_lost, owner))
            return True
        if replica not in group.waiting or type(changes) is not dict or txid != group.txid:
            # The change set awaited never came (forged, or lost): read them all.
            self._group_lost(owner)
            return True
        # The first change set that came named every later one: this one's
        # names are among them.
        group.waiting.discard(replica)
        group.parts.append((replica, changes))
        if not group.waiting:
            self._apply_group(owner)
        return True

    def _siblings(self, replica: _Replica, more: object) -> set[_Replica]:
        """The live replicas here of the maps ``more`` names (see :data:`MORE`)."""
        if more is None:
            return set()
        if type(more) is not list:
            raise InvalidChangeSetError(f"map {replica.name!r}: {MORE!r} must be a list")
        prefix, replicas, found = replica.owner + SEPARATOR, self._replicas, set()
        for local in more:
            if type(local) is not str:
                raise InvalidChangeSetError(
                    f"map {replica.name!r}: {MORE!r} must hold map names")
            for no_exec in (False, True):
                sibling = replicas.get((prefix + local, no_exec))
                # One loading or resyncing takes its change set from a read.
                if sibling is not None and sibling.buffer is None and sibling is not replica:
                    found.add(sibling)
        return found

    def _apply_group(self, owner: str) -> None:
        group = self._groups.pop(owner)
        group.timer.cancel()
        for replica, changes in group.parts:
            self._take(replica, changes, (changes,))

    def _group_lost(self, owner: str) -> None:
        group = self._groups.pop(owner, None)
        if group is None:
            return
        group.timer.cancel()
        self.stats.gaps += 1
        self._log.warning("change sets of commit %s on maps of %s did not all come: resync",
                          group.txid, owner, extra={"txid": group.txid})
        self._schedule_resync(group.parts[0][0])

    def _advanced(self, replica: _Replica, version: int, last: ChangeSet) -> None:
        """``replica`` reached ``version`` from a change set, ``last`` the
        last one applied: record its lineage and lag, tell who listens."""
        replica.deleted = False
        replica.lineage.record(version, last.get("txid"))
        stamp = last.get(TIMESTAMP)
        seconds = None
        if type(stamp) is int:
            lag = self.propagation_lag.get(replica.name)
            if lag is None:
                lag = self.propagation_lag[replica.name] = LatencySummary()
            seconds = time.time() - stamp / 1e6
            if seconds < 0.0:  # clock skew between machines: never negative
                seconds = 0.0
            lag.observe(seconds)
        if self._observes_apply:
            notify(self._observer, "on_apply", replica.name, version, seconds)
        if replica.watchers:
            self._changed(replica)

    def _forked(self, replica: _Replica, why: str) -> None:
        self.stats.forks += 1
        self._log.warning("replica of %s holds history the store does not have (%s): "
                          "reloading", replica.name, why,
                          extra={"map": replica.name, "version": replica.map.version})
        replica.lineage.forked = True
        self._schedule_resync(replica)

    def _install(self, replica: _Replica, dump: ChangeSet) -> None:
        """Take a full read of the store into ``replica`` without going back."""
        replica.deleted = False
        version, txid = dump_version(dump), dump.get("txid")
        shared, lineage = replica.map, replica.lineage
        if version > shared.version:
            shared.apply_changes(dump)
        elif version == shared.version and txid != lineage.txid and txid is not None \
                and (lineage.txid is not None or lineage.forked):
            # The replica's content of this version was never the store's
            # (a forged message, or history the store lost): take the store's.
            shared.reset()
            shared.apply_changes(dump)
        elif version < shared.version:
            if lineage.seen.get(version, txid) != txid:
                lineage.forked = True
            if lineage.forked:
                self._log.warning(
                    "store holds map %s at version %d (commit %s), behind the replica's "
                    "%d: keeping it until the writer moves past it", replica.name, version,
                    txid, shared.version,
                    extra={"map": replica.name, "version": version, "txid": txid})
            return
        else:
            if lineage.txid is None:
                lineage.record(version, txid)
            lineage.forked = lineage.forked and txid != lineage.txid
            return
        lineage.forked = False
        lineage.record(version, txid)
        self._changed(replica)

    def _deleted(self, replica: _Replica) -> None:
        """The map of ``replica`` was deleted: empty it (snapshots that actors
        hold stay as they were) and forget its history, so that a map created
        again under the same name replicates from its first version."""
        self.stats.deletions += 1
        self._log.info("map %s was deleted", replica.name, extra={"map": replica.name})
        replica.map.reset()
        replica.lineage = ReplicaLineage()
        replica.deleted = True
        self._changed(replica)

    def _drain(self, replicas: Sequence[_Replica]) -> None:
        """Make ``replicas`` (one writer's) live again and replay what they
        buffered, in the order it came. A commit's change sets may be only
        partly there (the read's reply can come between two of them): replayed
        like any message, a part waits for the rest (:class:`_Group`)."""
        arrived: list[tuple[int, _Replica, bytes]] = []
        for replica in replicas:
            arrived.extend((seq, replica, data) for seq, data in replica.buffer or ())
            replica.buffer, replica.buffered = None, 0
        arrived.sort(key=lambda item: item[0])
        for _, replica, data in arrived:
            self._on_message(replica, data)

    def _owned_by(self, owner: str) -> list[_Replica]:
        """The replicas of ``owner``'s maps, open and opening."""
        owned = [r for r in self._replicas.values() if r.owner == owner]
        owned.extend(r for r in self._opening if r.owner == owner)
        return owned

    def _schedule_resync(self, replica: _Replica) -> None:
        self._troubled.add(replica.owner)
        self._schedule_read(replica)

    def _schedule_read(self, replica: _Replica) -> None:
        """Read every replica of ``replica``'s writer again, at once."""
        if self._closed:
            return
        owner = replica.owner
        # Every replica of the owner waits for the read, so that they are all
        # installed at once, from one read. So none is live while a read runs,
        # and a commit's change sets held here are older than the read to come.
        for other in self._owned_by(owner):
            if other.buffer is None:
                other.buffer = []
        if replica.buffer is None:
            replica.buffer = []
        group = self._groups.pop(owner, None)
        if group is not None:  # the read brings what it held
            group.timer.cancel()
        task = self._resyncs.get(owner)
        if task is not None and not task.done():
            self._resync_again.add(owner)
            return
        self._resyncs[owner] = asyncio.get_running_loop().create_task(self._resync(owner))

    async def _resync(self, owner: str) -> None:
        while True:
            self._resync_again.discard(owner)
            troubled = owner in self._troubled
            self._troubled.discard(owner)
            # Subscribed and buffering before the read: it misses none of their messages.
            replicas = self._owned_by(owner)
            names = sorted({r.name for r in replicas})
            dumps: Mapping[str, ChangeSet | None] = {}
            error: SharingError | None = None
            try:
                if names:
                    dumps = await self.backend.read_maps(
                        names, None if troubled else self._held(replicas))
            except SharingError as exc:
                error = exc
            owned = set(self._owned_by(owner))  # less those released meanwhile
            replicas = [r for r in replicas if r in owned]
            # The first load of a replica beside its siblings is no resync of them.
            shown = [r for r in replicas if r not in self._opening] if troubled else []
            if shown:
                if error is not None:
                    self._log.warning("resync of %s failed (%s); keeping their versions",
                                      ", ".join(r.name for r in shown), error)
                self.stats.resyncs += 1
                for replica in shown:
                    notify(self._observer, "on_resync", replica.name)
            for replica in replicas:
                if error is None and replica.name not in dumps:
                    continue  # held as stored: nothing to install
                dump = dumps.get(replica.name)
                hinted, replica.deletion_hint = replica.deletion_hint, False
                opening = replica in self._opening
                replica.found, replica.error = dump is not None, error if opening else None
                if dump is None:
                    if hinted and error is None:
                        self._deleted(replica)
                    continue
                try:
                    self._install(replica, dump)
                except SharingError as exc:
                    self.stats.malformed += 1
                    self._log.warning("unusable dump of %s (%s)", replica.name, exc)
                    if opening:
                        replica.error = exc
            self._drain(replicas)
            if owner not in self._resync_again or self._closed:
                self._resyncs.pop(owner, None)
                return
            for replica in self._owned_by(owner):
                replica.buffer = []

    def _held(self, replicas: Sequence[_Replica]) -> dict[str, tuple[int, str | None]]:
        """Version and txid of each map that ``replicas`` show, where every
        replica of it is open, shows the same and knows its txid: a read that
        joins a new replica to them leaves those out when the store holds them
        so (a map read again for each sibling opened would cost its size each
        time)."""
        stamps: dict[str, set[tuple[int, str | None] | None]] = {}
        for replica in replicas:
            lineage = replica.lineage
            known = replica not in self._opening and lineage.txid is not None \
                and not replica.deleted and not lineage.forked
            stamps.setdefault(replica.name, set()).add(
                (replica.map.version, lineage.txid) if known else None)
        held: dict[str, tuple[int, str | None]] = {}
        for name, seen in stamps.items():
            stamp = seen.pop() if len(seen) == 1 else None
            if stamp is not None:
                held[name] = stamp
        return held

    def _on_reconnect(self, names: Sequence[str]) -> None:
        """The subscriptions of ``names`` were down: those replicas may have
        missed updates."""
        wanted = set(names)
        for replica in list(self._replicas.values()):
            if replica.name in wanted:
                self._schedule_resync(replica)

    async def resync_all(self) -> None:
        """Resync every replica now and wait until they are done."""
        self._on_reconnect([replica.name for replica in self._replicas.values()])
        await asyncio.gather(*self._resyncs.values(), return_exceptions=True)

    # -- aggregates --------------------------------------------------------

    async def aggregate_of(self, name: str, *, link_key: str | None = None,
                           no_exec: bool = False) -> AggregateMap:
        """A shared AggregateMap rooted at ``name``; its maps are best-effort
        replicas, opened with ``no_exec``."""
        key = (name, link_key or DEFAULT_LINK_KEY, no_exec)
        entry = self._aggregates.get(key)
        if entry is not None:
            entry.count += 1
            return entry.map

        async def find_map(map_name: str) -> SharedMap | None:
            return await self.replica_of(map_name, best_effort=True, no_exec=no_exec)

        agg = AggregateMap(name, find_map, key[1], no_exec=no_exec)
        self._aggregates[key] = _Aggregate(agg)
        return agg

    async def release_aggregate(self, name: str, agg: AggregateMap) -> None:
        """Drop one reference; release its replicas when it was the last one."""
        if self._drop_reference(self._aggregates, (name, agg.link_key, agg.no_exec),
                                agg) is None:
            return
        for map_name, shared in list(agg.maps.items()):
            await self.release_replica(map_name, shared)

    # -- leases, checkpoints, commits -----------------------------------------

    async def acquire_lease(self, actor: str, node_id: str, ttl: float) -> None:
        await self.backend.acquire_lease(actor, node_id, ttl)

    async def renew_leases(self, actors: Sequence[str], node_id: str, ttl: float) -> list[str]:
        return await self.backend.renew_leases(actors, node_id, ttl)

    async def release_lease(self, actor: str, node_id: str) -> None:
        await self.backend.release_lease(actor, node_id)

    async def load_checkpoint(self, actor: str) -> Checkpoint | None:
        return await self.backend.load_checkpoint(actor)

    async def load_txids(self, actors: Sequence[str]) -> list[str | None]:
        return await self.backend.load_txids(actors)

    async def commit(self, *, actor: str, node_id: str, txid: str, prev_txid: str | None,
                     checkpoint: Checkpoint, lease_ttl: float,
                     refs: Mapping[str, MapRef], creates: Sequence[MapCreate] = (),
                     deletes: Sequence[str] = ()) -> None:
        """Make one actor message durable, then advance the local primaries.

        ``deletes`` names the actor's maps the commit deletes, data included.

        ``refs`` maps each written map's full name to its prepared ref. If the
        backend lost some of those maps (it restarted empty), the commit is
        sent again with full dumps so the writer re-creates them from its own
        state; if the store went back on this node's own commits of the actor,
        it is sent again as a re-assert. Nothing local changes unless the
        backend accepted the commit.
        """
        primaries = self._primaries
        # The transaction is not kept while the backend commits it (made
        # again for a retry, from the same refs and primaries): a commit in
        # flight holding an object per map it writes made the cyclic
        # collector run more often with many maps a message.
        parts = (actor, node_id, txid, prev_txid, checkpoint, lease_ttl, refs, creates, deletes)
        try:
            await self.backend.commit(self._transaction(*parts))
        except MapMissingError as exc:
            missing = set(exc.names)
            self._log.warning("backend lost maps %s; re-creating them from %s",
                              sorted(missing), actor, extra={"actor": actor})
            tx = self._transaction(*parts)
            full = tuple(MapWrite(w.name, w.changes,
                                  self._full(refs[w.name], txid) if w.name in missing else None,
                                  w.rebase_from)
                         for w in tx.writes)
            await self.backend.commit(replace(tx, writes=full))
        except ChainError as exc:
            if self._stays.relation(actor, exc.stored_txid, prev_txid) != "behind":
                raise
            await self._reassert(self._transaction(*parts), exc.stored_txid, refs)
        for name, ref in refs.items():
            primary = primaries[name]
            primary.map.commit(ref)
            primary.txid, primary.rebase_from = txid, None
        for name in deletes:
            self._primaries.pop(name, None)
        for create in creates:
            if create.initial is not None:  # the creates install_created is told of
                self._created[create.name] = txid

    def _transaction(self, actor: str, node_id: str, txid: str, prev_txid: str | None,
                     checkpoint: Checkpoint, lease_ttl: float, refs: Mapping[str, MapRef],
                     creates: Sequence[MapCreate], deletes: Sequence[str]) -> Transaction:
        """The transaction of one actor message: each written map's change set
        with its lineage (the txid that made its base version)."""
        writes = []
        primaries = self._primaries
        for name, ref in refs.items():
            prepared = ref.changes
            if prepared is None:
                raise PrepareRequiredError(f"map {name!r} was written but not prepared")
            primary = primaries[name]
            changes = dict(prepared)
            changes["txid"], changes["base_txid"] = txid, primary.txid
            writes.append(MapWrite(name, changes, None, primary.rebase_from))
        # Built for every message that writes: positional arguments, in the
        # order of the fields, cost half of keywords (190 ns, not 440).
        return Transaction(actor, node_id, txid, prev_txid, checkpoint, lease_ttl, tuple(writes),
                           tuple(creates), (), tuple(deletes))

    @staticmethod
    def _full(ref: MapRef, txid: str | None) -> ChangeSet:
        dump = dict(ref.dump())
        dump["txid"] = txid
        return dump

    async def _reassert(self, tx: Transaction, stored_txid: str | None,
                        refs: Mapping[str, MapRef]) -> None:
        """Send ``tx`` again with everything the store lost of its actor."""
        actor = tx.actor
        writes = tuple(MapWrite(w.name, w.changes, self._full(refs[w.name], tx.txid))
                       for w in tx.writes)
        restores = tuple(
            MapRestore(name, self._full(p.map.ref(read_only=True), p.txid))
            for name, p in self._primaries.items()
            if map_owner(name) == actor and name not in refs and name not in tx.deletes)
        self._log.warning(
            "the store went back on actor %s (it holds commit %s, this node made %s since): "
            "putting back its checkpoint and %d maps", actor, stored_txid, tx.prev_txid,
            len(writes) + len(restores), extra={"actor": actor})
        await self.backend.commit(replace(tx, prev_txid=stored_txid, writes=writes,
                                          restores=restores, reassert=True))
        self.stats.reasserts += 1
        for name in (r.name for r in restores):
            self._primaries[name].rebase_from = None

    async def close(self) -> None:
        """Unsubscribe everything and forget every map."""
        self._closed = True
        replicas = list(self._replicas.values())
        self._replicas.clear()
        self._retired.clear()
        self._aggregates.clear()
        self._primaries.clear()
        self._created.clear()
        for task in self._resyncs.values():
            task.cancel()
        self._resyncs.clear()
        for group in self._groups.values():
            group.timer.cancel()
        self._groups.clear()
        for replica in replicas:
            try:
                await self.backend.unsubscribe(replica.name, replica.handle)
            except SharingError as exc:
                self._log.debug("unsubscribe %s at close failed: %s", replica.name, exc)
