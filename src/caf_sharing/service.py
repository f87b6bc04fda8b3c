"""SharingService: the per-node registry of SharedMaps.

One service per node sits between the actors' sharing plugs and the backend:

* **primaries** — one writable SharedMap per map owned by a local actor. It
  advances only after the backend confirmed a commit, so it always holds a
  version that is durable.
* **replicas** — read-only copies of maps, shared by every local actor that
  reads them and reference counted: the backend subscription is dropped when
  the last reader lets go. A replica subscribes first, then reads the map,
  then applies what arrived in between, so no update falls in a window.
  Gaps and malformed messages trigger a resync from a full read; a resync
  never rolls a replica back (the core ignores dumps older than the replica).
* **aggregates** — AggregateMaps whose linked maps are found best-effort
  through replicas.

Updates land as new versions of the SharedMap, so snapshots that actors hold
stay valid while replicas move on (readers isolation, fairness).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import orjson

from ._fastmap import MapRef, SharedMap
from .aggregate import DEFAULT_LINK_KEY, AggregateMap
from .backends.base import Backend, Checkpoint, MapCreate, MapWrite, MessageHandler, Transaction
from .errors import (
    InvalidChangeSetError,
    MapMissingError,
    MapNotFoundError,
    MissedUpdateError,
    PrepareRequiredError,
    SharingError,
)
from .methods import MethodLimits, check_limits

__all__ = ["ServiceStats", "SharingService"]

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


class _Replica:
    """One subscribed replica and the state of its catch-up protocol."""

    __slots__ = ("buffer", "count", "handle", "map", "name", "resync_again", "resync_task")

    def __init__(self, service: SharingService, name: str, shared: SharedMap) -> None:
        self.name = name
        self.map = shared
        self.count = 1
        # Messages that arrive while the replica loads or resyncs wait here,
        # so that nothing published after the full read is lost.
        self.buffer: list[bytes] | None = []
        self.resync_task: asyncio.Task[None] | None = None
        self.resync_again = False
        self.handle: MessageHandler = lambda data: service._on_message(self, data)


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
                 method_limits: MethodLimits | None = None) -> None:
        self.backend = backend
        # The budget of methods run on this node's maps (None: the defaults).
        self._method_limits = check_limits(method_limits)
        self.stats = ServiceStats()
        self._max_updates = max_updates
        self._log = logger or log
        self._primaries: dict[str, SharedMap] = {}
        self._replicas: dict[tuple[str, bool], _Replica] = {}
        self._aggregates: dict[tuple[str, str, bool], _Aggregate] = {}
        self._closed = False
        backend.add_reconnect_listener(self._on_reconnect)

    # -- primaries ---------------------------------------------------------

    async def primary(self, name: str) -> SharedMap:
        """The local writable copy of ``name``, loaded from the backend once."""
        found = self._primaries.get(name)
        if found is not None:
            return found
        dump = await self.backend.read_map(name)
        if dump is None:
            raise MapNotFoundError(name)
        found = self._primaries.get(name)
        if found is not None:  # another actor task loaded it meanwhile
            return found
        shared = SharedMap(max_updates=self._max_updates, logger=self._log,
                           method_limits=self._method_limits)
        shared.apply_changes(dump)
        self._primaries[name] = shared
        return shared

    async def refresh_primary(self, name: str) -> SharedMap:
        """Bring the local primary up to what the backend holds.

        Used after a commit whose outcome is unknown (the backend may have
        stored it): a newer stored version replaces the local one, an older
        one is ignored, and a map the backend lost keeps its local copy (the
        next commit re-creates it from there).
        """
        shared = await self.primary(name)
        dump = await self.backend.read_map(name)
        if dump is not None:
            shared.apply_changes(dump)
        return shared

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
            replica.count += 1
            return replica.map
        try:
            replica = await self._open_replica(name, no_exec)
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

    async def _open_replica(self, name: str, no_exec: bool) -> _Replica:
        shared = SharedMap(no_exec=no_exec, max_updates=self._max_updates, logger=self._log,
                           method_limits=self._method_limits)
        replica = _Replica(self, name, shared)
        await self.backend.subscribe(name, replica.handle)
        try:
            dump = await self.backend.read_map(name)
            if dump is None:
                raise MapNotFoundError(name)
            shared.apply_changes(dump)
        except BaseException:
            await self.backend.unsubscribe(name, replica.handle)
            raise
        self._drain(replica)
        return replica

    async def release_replica(self, name: str, shared: SharedMap) -> None:
        """Drop one reference; unsubscribe when it was the last one."""
        replica = self._drop_reference(self._replicas, (name, shared.no_exec), shared)
        if replica is None:
            return
        if replica.resync_task is not None:
            replica.resync_task.cancel()
        await self.backend.unsubscribe(name, replica.handle)

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
        if replica.buffer is not None:
            replica.buffer.append(data)
            return
        self._apply(replica, data)

    def _apply(self, replica: _Replica, data: bytes) -> None:
        try:
            changes = orjson.loads(data)
            replica.map.apply_changes(changes)
        except MissedUpdateError as exc:
            self.stats.gaps += 1
            self._log.debug("replica %s missed updates (%s): resync", replica.name, exc)
            self._schedule_resync(replica)
        except (orjson.JSONDecodeError, InvalidChangeSetError, TypeError, ValueError) as exc:
            self.stats.malformed += 1
            self._log.warning("malformed message on map %s ignored (%s): resync",
                              replica.name, exc)
            self._schedule_resync(replica)
        else:
            self.stats.applied += 1

    def _drain(self, replica: _Replica) -> None:
        pending, replica.buffer = replica.buffer or [], None
        for data in pending:
            self._apply(replica, data)

    def _schedule_resync(self, replica: _Replica) -> None:
        if self._closed:
            return
        if replica.resync_task is not None and not replica.resync_task.done():
            replica.resync_again = True
            return
        if replica.buffer is None:
            replica.buffer = []
        replica.resync_task = asyncio.get_running_loop().create_task(self._resync(replica))

    async def _resync(self, replica: _Replica) -> None:
        while True:
            replica.resync_again = False
            try:
                dump = await self.backend.read_map(replica.name)
            except SharingError as exc:
                self._log.warning("resync of %s failed (%s); keeping version %d",
                                  replica.name, exc, replica.map.version)
                dump = None
            self.stats.resyncs += 1
            if dump is not None:
                try:
                    replica.map.apply_changes(dump)
                except SharingError as exc:
                    self.stats.malformed += 1
                    self._log.warning("unusable dump of %s (%s)", replica.name, exc)
            self._drain(replica)
            if not replica.resync_again:
                return
            replica.buffer = []

    def _on_reconnect(self) -> None:
        """The subscription channel was down: any replica may have missed updates."""
        for replica in list(self._replicas.values()):
            self._schedule_resync(replica)

    async def resync_all(self) -> None:
        """Resync every replica now and wait until they are done."""
        self._on_reconnect()
        tasks = [r.resync_task for r in self._replicas.values() if r.resync_task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

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

    async def commit(self, *, actor: str, node_id: str, txid: str, prev_txid: str | None,
                     checkpoint: Checkpoint, lease_ttl: float,
                     refs: Mapping[str, MapRef], creates: Sequence[MapCreate] = ()) -> None:
        """Make one actor message durable, then advance the local primaries.

        ``refs`` maps each written map's full name to its prepared ref. If the
        backend lost some of those maps (it restarted empty), the commit is
        sent again with full dumps so the writer re-creates them from its own
        state. Nothing local changes unless the backend accepted the commit.
        """
        writes = []
        for name, ref in refs.items():
            if ref.changes is None:
                raise PrepareRequiredError(f"map {name!r} was written but not prepared")
            writes.append(MapWrite(name, ref.changes))
        tx = Transaction(actor=actor, node_id=node_id, txid=txid, prev_txid=prev_txid,
                         checkpoint=checkpoint, lease_ttl=lease_ttl, writes=tuple(writes),
                         creates=tuple(creates))
        try:
            await self.backend.commit(tx)
        except MapMissingError as exc:
            missing = set(exc.names)
            self._log.warning("backend lost maps %s; re-creating them from %s",
                              sorted(missing), actor)
            full = tuple(MapWrite(w.name, w.changes,
                                  refs[w.name].dump() if w.name in missing else None)
                         for w in writes)
            await self.backend.commit(Transaction(
                actor=actor, node_id=node_id, txid=txid, prev_txid=prev_txid,
                checkpoint=checkpoint, lease_ttl=lease_ttl, writes=full, creates=tx.creates))
        for name, ref in refs.items():
            self._primaries[name].commit(ref)

    async def close(self) -> None:
        """Unsubscribe everything and forget every map."""
        self._closed = True
        replicas = list(self._replicas.values())
        self._replicas.clear()
        self._aggregates.clear()
        self._primaries.clear()
        for replica in replicas:
            if replica.resync_task is not None:
                replica.resync_task.cancel()
            try:
                await self.backend.unsubscribe(replica.name, replica.handle)
            except SharingError as exc:
                self._log.debug("unsubscribe %s at close failed: %s", replica.name, exc)
