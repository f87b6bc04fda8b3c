"""AggregateMap: one consistent view over a set of linked SharedMaps.

A set of maps is defined by a first map and a well-known key, the *link key*
(``"__link_key__"`` by default), whose value in any map of the set is a list
of the full names of other maps in the set. :meth:`AggregateMap.assemble`
computes the transitive closure from the first map and returns an
:class:`AggregateSnapshot` holding one read-only ref per map, so queries such
as ``snapshot.get_all("alice")`` see every binding of a key across the set.
The main use is linked local name spaces (SDSI-style ACLs): an ACL map links
to the ACL maps of the groups it trusts, and a check looks the caller up in
all of them.

Behaviour, as in Caf.js:

* maps are found with ``find_map(name)`` (an async callable). It may return
  ``None``: the map is skipped (best effort; that is safe for ACLs, whose
  rules are monotonic) and looked up again by a later ``assemble``. An
  exception from it propagates out of ``assemble``.
* every map found is kept in :attr:`AggregateMap.maps` and reused by later
  assemblies without calling ``find_map`` again, even if it is no longer
  linked (its owner, e.g. the sharing service, releases them all at once).
* cycles and self links are allowed; each map appears once in a snapshot.

Beyond Caf.js: a missing map is not looked up again by every assembly but
after a delay that doubles from ``retry_delays[0]`` to ``retry_delays[1]``
seconds (1 s to 30 s by default) while it stays missing, so links to maps
that do not exist cost a lookup per delay, not per message; with
``no_exec=True`` every map found must be a ``no_exec`` SharedMap (the
sharing service opens them so), so methods stored in linked maps never
run; the snapshot's order is deterministic (breadth first from the
first map, each map's links in list order); names found on the same level are
looked up concurrently; and concurrent assemblies of one AggregateMap share
their lookups, so ``find_map`` runs once per name even then (which keeps the
reference counts of a replica registry right). When every linked map is
already known, ``assemble`` does not suspend at all, so the refs it takes all
belong to the same moment of the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

from ._fastmap import MapRef, SharedMap
from .errors import InvalidTypeError, InvalidValueError

__all__ = [
    "DEFAULT_LINK_KEY", "DEFAULT_RETRY_DELAYS", "AggregateMap", "AggregateSnapshot", "FindMap",
]

DEFAULT_LINK_KEY = "__link_key__"
#: First and longest delay (seconds) before a missing map is looked up again.
DEFAULT_RETRY_DELAYS = (1.0, 30.0)

FindMap = Callable[[str], Awaitable[SharedMap | None]]
"""``async def find_map(name) -> SharedMap | None``."""

_MISSING: Any = object()


class AggregateSnapshot:
    """Read-only refs of the maps an assembly reached, in breadth-first order.

    It never changes: the refs are snapshots, so maps moving on later (even
    dropping or adding links) do not affect it.
    """

    __slots__ = ("_names", "_refs")

    def __init__(self, refs: Mapping[str, MapRef]) -> None:
        self._refs: Mapping[str, MapRef] = MappingProxyType(dict(refs))
        self._names = tuple(self._refs)

    def get_all(self, key: str) -> list[Any]:
        """The value of ``key`` in every map that has it (in :attr:`names`
        order; duplicates kept); ``[]`` when no map has it."""
        values = []
        for ref in self._refs.values():
            value = ref.get(key, _MISSING)
            if value is not _MISSING:
                values.append(value)
        return values

    @property
    def refs(self) -> Mapping[str, MapRef]:
        """Map name -> read-only ref (a read-only mapping)."""
        return self._refs

    @property
    def names(self) -> tuple[str, ...]:
        """The names of the maps reached, breadth first from the first map."""
        return self._names

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._refs

    def __repr__(self) -> str:
        return f"AggregateSnapshot({list(self._names)!r})"


class _Missing:
    """When a map that was not found may be looked up again."""

    __slots__ = ("delay", "retry_at")

    def __init__(self, delay: float, retry_at: float) -> None:
        self.delay = delay
        self.retry_at = retry_at


class AggregateMap:
    """Links the maps reachable from ``first_name`` through ``link_key``.

    ``clock`` (seconds, monotonic) times the retries of missing maps.
    """

    __slots__ = ("_clock", "_find_map", "_first_name", "_link_key", "_lookups", "_missing",
                 "_no_exec", "_retry_delays", "maps")

    def __init__(self, first_name: str, find_map: FindMap,
                 link_key: str = DEFAULT_LINK_KEY, *, no_exec: bool = False,
                 retry_delays: tuple[float, float] = DEFAULT_RETRY_DELAYS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not isinstance(first_name, str):
            raise InvalidTypeError(
                f"first map name must be a str, got {type(first_name).__name__}")
        if not callable(find_map):
            raise InvalidTypeError(
                f"find_map must be an async callable, got {type(find_map).__name__}")
        if not isinstance(link_key, str):
            raise InvalidTypeError(f"link_key must be a str, got {type(link_key).__name__}")
        first, longest = retry_delays
        if not 0 <= first <= longest:
            raise InvalidValueError(
                f"retry_delays must be (first, longest) with 0 <= first <= longest, "
                f"got {retry_delays!r}")
        self._no_exec = bool(no_exec)
        self._retry_delays = (float(first), float(longest))
        self._clock = clock
        # Maps not found, with when to look them up again.
        self._missing: dict[str, _Missing] = {}
        self._first_name = first_name
        self._find_map = find_map
        self._link_key = link_key
        #: Every map found so far, by name (reused by later assemblies).
        self.maps: dict[str, SharedMap] = {}
        # Lookups in flight, shared by concurrent assemblies.
        self._lookups: dict[str, asyncio.Future[SharedMap | None]] = {}

    @property
    def first_name(self) -> str:
        return self._first_name

    @property
    def link_key(self) -> str:
        return self._link_key

    @property
    def no_exec(self) -> bool:
        return self._no_exec

    async def assemble(self) -> AggregateSnapshot:
        """Follow the links from the first map and snapshot every map reached."""
        refs: dict[str, MapRef] = {}
        seen = {self._first_name}
        level = [self._first_name]
        now = self._clock()
        while level:
            unknown = [name for name in level
                       if name not in self.maps and self._may_look_up(name, now)]
            if unknown:
                await asyncio.gather(*(self._lookup(name) for name in unknown))
            next_level: list[str] = []
            for name in level:
                shared = self.maps.get(name)
                if shared is None:  # not found this time: skipped
                    continue
                ref = shared.ref(read_only=True)
                refs[name] = ref
                for link in self._links(ref):
                    if link not in seen:
                        seen.add(link)
                        next_level.append(link)
            level = next_level
        return AggregateSnapshot(refs)

    def _links(self, ref: MapRef) -> list[str]:
        links = ref.get(self._link_key)
        if not isinstance(links, list):
            return []
        return [link for link in links if isinstance(link, str)]

    async def _lookup(self, name: str) -> None:
        future = self._lookups.get(name)
        if future is None:
            future = asyncio.ensure_future(self._find(name))
            self._lookups[name] = future
            future.add_done_callback(lambda done: self._lookup_done(name, done))
        # Shielded: one assembly being cancelled must not cancel a lookup
        # that another assembly (or the next one, via self.maps) relies on.
        await asyncio.shield(future)

    def _lookup_done(self, name: str, future: asyncio.Future[SharedMap | None]) -> None:
        if self._lookups.get(name) is future:
            del self._lookups[name]
        if not future.cancelled():
            # Marks the exception retrieved when every waiter was cancelled.
            future.exception()

    def _may_look_up(self, name: str, now: float) -> bool:
        missing = self._missing.get(name)
        return missing is None or now >= missing.retry_at

    async def _find(self, name: str) -> SharedMap | None:
        found = await self._find_map(name)
        if found is None:
            missing = self._missing.get(name)
            first, longest = self._retry_delays
            delay = first if missing is None else min(max(missing.delay * 2, first), longest)
            self._missing[name] = _Missing(delay, self._clock() + delay)
            return None
        if not isinstance(found, SharedMap):
            raise InvalidTypeError(
                f"find_map({name!r}) returned {type(found).__name__}, "
                "expected a SharedMap or None")
        if self._no_exec and not found.no_exec:
            raise InvalidValueError(
                f"find_map({name!r}) returned a SharedMap that runs methods, "
                "but this aggregate is no_exec")
        self._missing.pop(name, None)
        return self.maps.setdefault(name, found)

    def __repr__(self) -> str:
        return (f"AggregateMap({self._first_name!r}, link_key={self._link_key!r}, "
                f"no_exec={self._no_exec}, maps={list(self.maps)!r})")
