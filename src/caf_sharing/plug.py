"""ActorSharing: the transactional sharing plug of one actor.

It keeps the actor's map registrations (alias -> map name and options) and,
for each message, the snapshots the actor reads and writes:

* ``begin`` takes a fresh ref of every map (fairness: the newest local
  version) and assembles aggregates; those snapshots do not change until the
  message ends (readers isolation), whatever replicas do meanwhile.
* ``add_map`` / ``delete_map`` only record intent; ``prepare`` resolves it
  (read-only maps are opened before anything is committed, so a missing map
  fails the message cleanly) and computes the change set of every written map.
  Deleting the alias of a writable map deletes the map, data included, in
  the same commit (unless another alias still registers it writable).
* A read-only map deleted by its owner reads as ``None`` with
  ``best_effort``, else raises :class:`MapNotFoundError` where it is used.
* ``committed`` makes the registrations take effect; ``abort`` drops them
  and any replica opened for them. Nothing reaches the backend from here: the
  node hands what ``prepare`` returns to the sharing service's commit.

The registrations are part of the actor's checkpoint (``maps``), so ``restore``
plus the next ``begin`` reopens every map after a restart.

**Notifications.** A read-only registration with ``on_change`` watches the
replicas it holds (every map of an aggregate) and tells the plug's
:class:`Notifier` — the node's mailbox — which alias changed. A watch starts
when the registration takes effect or its map is (re)opened, after a restart
too, and notifies at once: changes made while nobody watched are not lost.
A best-effort map that does not exist yet is looked up again by a
notification message every ``RETRY_DELAYS[0]`` seconds at first, then less
often, up to ``RETRY_DELAYS[1]``, until it appears.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol, TypeAlias

from ._fastmap import MapRef, SharedMap
from .aggregate import AggregateMap, AggregateSnapshot
from .backends.base import MapCreate
from .errors import InvalidNameError, InvalidTypeError, MapNotFoundError, SharingError
from .names import SEPARATOR, check_map_name, check_part, map_owner
from .service import SharingService

__all__ = ["RETRY_DELAYS", "ActorSharing", "MapInfo", "Notifier", "PreparedSharing",
           "UnknownAliasError"]

#: First and longest delay (seconds) before an ``on_change`` registration
#: whose map is missing looks for it again.
RETRY_DELAYS = (0.02, 1.0)

MapObject: TypeAlias = SharedMap | AggregateMap
Snapshot: TypeAlias = MapRef | AggregateSnapshot


class Notifier(Protocol):
    """Where an actor's ``on_change`` notifications go (its node's mailbox)."""

    def check(self, method: str) -> None:
        """Raise :class:`~caf_sharing.errors.UnknownActorMethodError` unless
        the actor accepts messages ``method``."""

    def notify(self, alias: str) -> None:
        """The map(s) of ``alias`` changed: deliver its ``on_change`` soon.
        Called from inside the sharing service: must not block or raise."""

    def notify_later(self, alias: str, delay: float) -> None:
        """Notify ``alias`` in ``delay`` seconds (unless one is already due):
        its map is not available yet, and the notification's message looks
        for it again."""

    def close(self) -> None:
        """The actor leaves: drop what is still to deliver."""


class UnknownAliasError(SharingError, KeyError, AttributeError):
    """``maps.<alias>`` for an alias the actor has not (yet) registered."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True, slots=True)
class MapInfo:
    """One registration: what ``alias`` refers to and how it was added."""

    name: str
    writable: bool
    aggregate: bool = False
    best_effort: bool = False
    no_exec: bool = False
    link_key: str | None = None
    #: Method the actor receives as ``method(alias, version)`` on a change.
    on_change: str | None = None

    def to_json(self) -> dict[str, Any]:
        # Spelled out: dataclasses.asdict (a recursive deep copy) took about
        # a quarter of a commit's time in the actor message path.
        data: dict[str, Any] = {
            "name": self.name, "writable": self.writable, "aggregate": self.aggregate,
            "best_effort": self.best_effort, "no_exec": self.no_exec,
            "link_key": self.link_key}
        # Registrations without it stay as checkpoints always wrote them.
        if self.on_change is not None:
            data["on_change"] = self.on_change
        return data

    @classmethod
    def from_json(cls, alias: str, data: object) -> MapInfo:
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            raise SharingError(f"checkpoint entry for map alias {alias!r} is malformed: {data!r}")
        try:
            info = cls(**data)
        except TypeError as exc:
            raise SharingError(
                f"checkpoint entry for map alias {alias!r} is malformed: {exc}") from None
        check_map_name(info.name)
        if info.on_change is not None and not isinstance(info.on_change, str):
            raise SharingError(f"checkpoint entry for map alias {alias!r} is malformed: "
                               f"on_change {info.on_change!r}")
        return info


@dataclass(slots=True)
class PreparedSharing:
    """What one message changed, ready for the service's commit."""

    #: The registrations after this message, for the checkpoint.
    maps: dict[str, dict[str, Any]]
    #: Full map name -> prepared ref, for every map the message wrote.
    refs: dict[str, MapRef] = field(default_factory=dict)
    #: Writable maps this message registers, created in the backend if absent.
    creates: list[MapCreate] = field(default_factory=list)
    #: Whether the registrations differ from the committed ones.
    registrations_changed: bool = False
    #: Maps of the actor this message deletes, data included.
    deletes: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.refs and not self.creates and not self.registrations_changed \
            and not self.deletes


@dataclass(slots=True)
class _PendingAdd:
    info: MapInfo
    initial: dict[str, Any] | None
    #: The map holding the initial value (whose dump ``initial`` is), which
    #: becomes the primary once the commit created the map.
    map: SharedMap | None = None


class ActorSharing:
    """Map registrations and per-message snapshots of one actor."""

    def __init__(self, service: SharingService, actor: str, *,
                 logger: logging.Logger | None = None) -> None:
        self.actor = actor
        self._service = service
        self._log = logger or logging.getLogger("caf_sharing.plug")
        self._info: dict[str, MapInfo] = {}
        self._objects: dict[str, MapObject | None] = {}
        self._refs: dict[str, Snapshot | None] = {}
        self._pending: dict[str, _PendingAdd | None] = {}  # None marks a delete
        self._staged: dict[str, MapObject | None] = {}
        #: Receives the ``on_change`` notifications (set by the node).
        self.notifier: Notifier | None = None
        # (alias, map name) -> the watched replica and what stops the watch.
        self._watches: dict[tuple[str, str], tuple[SharedMap, Callable[[], None]]] = {}
        # Alias -> the map object whose replicas are watched for it.
        self._watched: dict[str, MapObject] = {}
        # Alias -> delay of its next lookup, while its map is missing.
        self._missing: dict[str, float] = {}
        # How the next begin takes its snapshots without awaiting anything:
        # (alias, map, read-only, name) each, while every map is open and none
        # is an aggregate; None: begin() must open or assemble something.
        # Valid until the registrations or the open maps change (_changed).
        self._plan: list[tuple[str, SharedMap, bool, str]] | None = None
        self._plan_valid = False
        # The checkpoint's ``maps`` for the registrations in effect, made once.
        self._maps_json: dict[str, dict[str, Any]] | None = None

    # -- what the proxy calls during a message -------------------------------

    def full_name(self, name: str) -> str:
        """``name`` under this actor: ``"x"`` -> ``"<actor>-x"``; a full name
        must already start with the actor's name."""
        if isinstance(name, str) and SEPARATOR in name:
            check_map_name(name)
            if map_owner(name) != self.actor:
                raise InvalidNameError(
                    f"map {name!r} belongs to actor {map_owner(name)!r}, not {self.actor!r}: "
                    "an actor can only write its own maps")
            return name
        check_part(name, "map name")
        return self.actor + SEPARATOR + name

    def add_map(self, alias: str, info: MapInfo, initial: Mapping[str, Any] | None) -> None:
        check_part(alias, "map alias")
        if alias.startswith("_"):
            raise InvalidNameError(f"map alias {alias!r} must not start with '_'")
        if info.on_change is not None:
            if self.notifier is None:
                raise SharingError(f"on_change of map alias {alias!r} needs an actor hosted "
                                   "by a node")
            self.notifier.check(info.on_change)
        current = self._pending[alias] if alias in self._pending else self._committed_add(alias)
        if current is not None and current.info == info:
            self._log.debug("alias %r already refers to %s: ignored", alias, info.name)
            return
        if current is not None:
            raise InvalidNameError(
                f"map alias {alias!r} already refers to {current.info.name!r}; "
                "delete it first")
        self._pending[alias] = self._initial(info, initial)

    def _initial(self, info: MapInfo, initial: Mapping[str, Any] | None) -> _PendingAdd:
        """Validate an initial value now (so a bad one fails at the call) into
        the map that holds it, which is the dump the backend creates the map
        from and, once created, the primary: no other copy of a big initial
        value is made, and none is read back."""
        if initial is None or not info.writable:
            return _PendingAdd(info, None)
        if not isinstance(initial, Mapping):
            raise InvalidTypeError(f"initial value of map {info.name!r} must be a dict, "
                                   f"got {type(initial).__name__}")
        if not initial:
            return _PendingAdd(info, None)
        shared = self._service.new_primary_map()
        kept, shared.max_updates = shared.max_updates, 0
        ref = shared.ref()
        for key, value in initial.items():
            ref.set(key, value)
        ref.prepare()
        shared.commit(ref)
        # Not recorded (max_updates 0): no reader asks for the change set of
        # a map's creation (version 0 needs a dump), and it is as big as the map.
        shared.max_updates = kept
        del ref
        return _PendingAdd(info, dict(shared.ref(read_only=True).dump()), shared)

    def _committed_add(self, alias: str) -> _PendingAdd | None:
        info = self._info.get(alias)
        return None if info is None else _PendingAdd(info, None)

    def delete_map(self, alias: str) -> None:
        known = alias in self._info or self._pending.get(alias) is not None
        if not known:
            raise UnknownAliasError(f"no map with alias {alias!r} to delete")
        self._pending[alias] = None

    def snapshot(self, alias: str) -> Snapshot | None:
        """The snapshot ``alias`` refers to in the current message."""
        try:
            snap = self._refs[alias]
        except KeyError:
            pass
        else:
            info = self._info.get(alias)
            if snap is None and info is not None and not info.best_effort \
                    and not info.aggregate:
                raise MapNotFoundError(info.name, _BEST_EFFORT_HINT)
            return snap
        if self._pending.get(alias) is not None:
            raise UnknownAliasError(
                f"map alias {alias!r} is added when this message commits; "
                "use it from the next message on")
        known = ", ".join(sorted(self._refs)) or "none"
        raise UnknownAliasError(f"no map with alias {alias!r} (aliases: {known})") from None

    def read_only_ref(self, alias: str) -> MapRef:
        """A read-only ref of the version ``alias`` had when the message began."""
        snap = self.snapshot(alias)
        if not isinstance(snap, MapRef):
            raise SharingError(f"map alias {alias!r} is not a plain map")
        info = self._info[alias]
        if not info.writable:
            return snap
        shared = self._objects[alias]
        assert isinstance(shared, SharedMap)
        ref = shared.ref(read_only=True)
        if ref.version != snap.version:  # pragma: no cover - single writer
            raise SharingError(f"map {info.name!r} moved during the message")
        return ref

    @property
    def aliases(self) -> list[str]:
        return list(self._refs)

    # -- transaction steps called by the node -------------------------------
    #
    # Each step has a synchronous form for the common message (its maps all
    # open, none added or deleted), which the node tries first: an actor
    # message is a few microseconds, and awaiting coroutines that never
    # suspend would be a good part of that.

    def begin_now(self) -> bool:
        """``begin`` without awaiting; False when ``begin`` must run instead."""
        plan = self._plan if self._plan_valid else self._make_plan()
        if plan is None:
            return False
        self._pending.clear()
        refs = self._refs
        refs.clear()
        is_deleted = self._service.is_deleted
        for alias, shared, read_only, name in plan:
            refs[alias] = None if read_only and is_deleted(name, shared) \
                else shared.ref(read_only=read_only)
        return True

    async def begin(self) -> None:
        self._pending.clear()
        refs, objects = self._refs, self._objects
        refs.clear()
        for alias, info in self._info.items():
            if objects.get(alias) is None:
                objects[alias] = await self._open(info)
                self._changed()
        # Every map's snapshot with no await between two: a change set landing
        # in between would show the message one writer's maps at two commits.
        aggregates: list[tuple[str, AggregateMap]] = []
        is_deleted = self._service.is_deleted
        for alias, info in self._info.items():
            obj = objects[alias]
            if isinstance(obj, AggregateMap):
                aggregates.append((alias, obj))
                refs[alias] = None  # keeps the aliases' order
            elif obj is None or (not info.writable and is_deleted(info.name, obj)):
                refs[alias] = None
            else:
                refs[alias] = obj.ref(read_only=not info.writable)
        for alias, aggregate in aggregates:
            refs[alias] = await aggregate.assemble()
        self._sync_watches()

    def _make_plan(self) -> list[tuple[str, SharedMap, bool, str]] | None:
        plan: list[tuple[str, SharedMap, bool, str]] | None = []
        for alias, info in self._info.items():
            obj = self._objects.get(alias)
            if not isinstance(obj, SharedMap):  # not open yet, or an aggregate
                plan = None
                break
            assert plan is not None
            plan.append((alias, obj, not info.writable, info.name))
        self._plan, self._plan_valid = plan, True
        return plan

    def _changed(self) -> None:
        """The registrations or the open maps changed."""
        self._plan_valid = False
        self._maps_json = None

    def unchanged(self) -> bool:
        """Whether the message changed no map and no registration (it has
        nothing to prepare or commit, but for its state)."""
        if self._pending:
            return False
        refs = self._refs
        for alias, info in self._info.items():
            if info.writable:
                ref = refs.get(alias)
                if isinstance(ref, MapRef) and ref.has_changed:
                    return False
        return True

    def prepare_now(self) -> PreparedSharing | None:
        """``prepare`` without awaiting, for a message that added or deleted
        no map; None when ``prepare`` must run instead."""
        if self._pending:
            return None
        maps = self._maps_json
        if maps is None:
            maps = self._maps_json = {alias: info.to_json() for alias, info in self._info.items()}
        return PreparedSharing(maps=maps, refs=self._prepare_written())

    def _prepare_written(self, deletes: Collection[str] = ()) -> dict[str, MapRef]:
        """Prepare the change set of every writable map the message changed
        (but ``deletes``): full name -> its ref."""
        refs: dict[str, MapRef] = {}
        for alias, info in self._info.items():
            if info.writable and info.name not in deletes:
                ref = self._refs.get(alias)
                if isinstance(ref, MapRef) and ref.has_changed:
                    ref.prepare()
                    refs[info.name] = ref
        return refs

    def committed_now(self) -> bool:
        """``committed`` without awaiting; False when ``committed`` must run."""
        return not self._pending and not self._staged

    async def prepare(self) -> PreparedSharing:
        """Resolve registrations and prepare the change sets of written maps."""
        after = dict(self._info)
        creates = [MapCreate(p.info.name, p.initial) for p in self._pending.values()
                   if p is not None and p.info.writable]
        created = {c.name for c in creates}
        try:
            for alias, pending in self._pending.items():
                if pending is None:
                    after.pop(alias, None)
                    continue
                after[alias] = pending.info
                # A replica of a map this very commit creates opens at the next begin.
                if not pending.info.writable and pending.info.name not in created:
                    self._staged[alias] = await self._open(pending.info)
        except BaseException:
            await self.abort()
            raise
        kept = {info.name for info in after.values() if info.writable}
        deletes = sorted({info.name for alias, info in self._info.items()
                          if info.writable and alias not in after} - kept)
        return PreparedSharing(
            maps={alias: info.to_json() for alias, info in after.items()},
            refs=self._prepare_written(deletes), creates=creates,
            registrations_changed=after != self._info, deletes=deletes)

    async def committed(self) -> None:
        """The message committed: registrations take effect."""
        if self._pending:
            self._changed()
        for alias, pending in self._pending.items():
            old = self._objects.pop(alias, None)
            old_info = self._info.pop(alias, None)
            if old is not None and old_info is not None:
                await self._release(old_info, old)
            if pending is not None:
                self._info[alias] = pending.info
                staged = self._staged.pop(alias, None)
                if staged is not None:
                    self._objects[alias] = staged
                if pending.map is not None:
                    await self._service.install_created(pending.info.name, pending.map)
        self._pending.clear()
        self._staged.clear()
        self._sync_watches()

    async def abort(self) -> None:
        """The message failed: forget its registrations and what they opened."""
        pending, self._pending = self._pending, {}
        staged, self._staged = self._staged, {}
        for alias, obj in staged.items():
            add = pending.get(alias)
            if obj is not None and add is not None:
                await self._release(add.info, obj)

    def restore(self, maps: Mapping[str, Any]) -> None:
        """Take registrations from a checkpoint; maps open at the next ``begin``."""
        if not isinstance(maps, Mapping):
            raise SharingError(f"checkpoint 'maps' is malformed: {maps!r}")
        self._info = {alias: MapInfo.from_json(alias, data) for alias, data in maps.items()}
        self._objects = {}
        self._changed()

    async def refresh(self, maps: Mapping[str, Any] | None) -> None:
        """After a commit whose outcome is unknown: take the registrations of
        the stored checkpoint (``maps``; ``None`` when the backend lost it) and
        bring primaries up to the backend, without rolling back and without
        losing what the backend lost."""
        await self._release_all(keep_primaries=True)
        if maps is not None:
            self.restore(maps)
        for info in self._info.values():
            if info.writable:
                await self._service.refresh_primary(info.name)

    async def close(self) -> None:
        """Release every map this actor holds: it leaves the node."""
        await self._release_all(keep_primaries=False)
        self._refs.clear()
        if self.notifier is not None:
            self.notifier.close()

    async def _release_all(self, *, keep_primaries: bool) -> None:
        await self.abort()
        objects, self._objects = self._objects, {}
        self._changed()
        for alias, obj in objects.items():
            info = self._info.get(alias)
            if obj is not None and info is not None and not (keep_primaries and info.writable):
                await self._release(info, obj)
        self._sync_watches()

    # -- notifications -----------------------------------------------------------

    def on_change_of(self, alias: str) -> str | None:
        """The ``on_change`` method of ``alias`` (None: none, or no such alias)."""
        info = self._info.get(alias)
        return None if info is None else info.on_change

    def notice_version(self, alias: str) -> int | None:
        """The version a notification of ``alias`` reports in this message:
        the map's, or an aggregate's first map's (-1 when it is missing), -1
        for a map its owner deleted; None when there is nothing to tell (the
        alias is gone, or its map was never available)."""
        snap, info = self._refs.get(alias), self._info.get(alias)
        if info is None:
            return None
        if isinstance(snap, AggregateSnapshot):
            first = snap.refs.get(info.name)
            return -1 if first is None else first.version
        if snap is None:
            obj = self._objects.get(alias)
            deleted = isinstance(obj, SharedMap) and self._service.is_deleted(info.name, obj)
            return -1 if deleted else None
        return snap.version

    def is_stale(self, alias: str) -> bool:
        """Whether a map of ``alias`` moved on since this message began."""
        snap, obj = self._refs.get(alias), self._objects.get(alias)
        if isinstance(snap, AggregateSnapshot) and isinstance(obj, AggregateMap):
            return any(name in obj.maps and obj.maps[name].version != ref.version
                       for name, ref in snap.refs.items())
        return isinstance(snap, MapRef) and isinstance(obj, SharedMap) \
            and obj.version != snap.version

    def _sync_watches(self) -> None:
        """Watch exactly the replicas of the ``on_change`` registrations in
        effect; a new watch, or a registration whose map (aggregate) was
        opened again, notifies at once."""
        wanted: dict[tuple[str, str], SharedMap] = {}
        watched: dict[str, MapObject] = {}
        fresh: set[str] = set()
        missing: dict[str, float] = {}
        for alias, info in self._info.items():
            obj = self._objects.get(alias)
            if info.on_change is None or info.writable:
                continue
            if obj is None:
                missing[alias] = self._missing.get(alias, RETRY_DELAYS[0])
                continue
            watched[alias] = obj
            if self._watched.get(alias) is not obj:
                fresh.add(alias)
            maps = obj.maps if isinstance(obj, AggregateMap) else {info.name: obj}
            for name, shared in maps.items():
                wanted[alias, name] = shared
        self._watched = watched
        for key, (shared, stop) in list(self._watches.items()):
            if wanted.get(key) is not shared:
                stop()
                del self._watches[key]
        notifier = self.notifier
        for key, shared in wanted.items():
            if key in self._watches or notifier is None:
                continue
            alias, name = key
            self._watches[key] = (shared, self._service.watch(
                name, shared, partial(notifier.notify, alias)))
            fresh.add(alias)
        self._missing = {alias: min(delay * 2, RETRY_DELAYS[1])
                         for alias, delay in missing.items()}
        if notifier is not None:
            for alias in sorted(fresh):
                notifier.notify(alias)
            for alias, delay in missing.items():
                notifier.notify_later(alias, delay)

    # -- helpers ---------------------------------------------------------------

    async def _open(self, info: MapInfo) -> MapObject | None:
        if info.writable:
            return await self._service.primary(info.name)
        if info.aggregate:
            return await self._service.aggregate_of(info.name, link_key=info.link_key,
                                                    no_exec=info.no_exec)
        try:
            return await self._service.replica_of(
                info.name, best_effort=info.best_effort, no_exec=info.no_exec)
        except MapNotFoundError:
            raise MapNotFoundError(info.name, _BEST_EFFORT_HINT) from None

    async def _release(self, info: MapInfo, obj: MapObject) -> None:
        # Releasing only drops a subscription; a failure must not turn a
        # committed message (or a clean shutdown) into an error.
        try:
            if isinstance(obj, AggregateMap):
                await self._service.release_aggregate(info.name, obj)
            elif info.writable:
                self._service.drop_primary(info.name)
            else:
                await self._service.release_replica(info.name, obj)
        except SharingError as exc:
            self._log.warning("could not release map %s: %s", info.name, exc)


_BEST_EFFORT_HINT = ("add it with add_read_only_map(..., best_effort=True) to read None "
                     "until its owner creates it")
