"""SharingProxy: what actor code sees as ``self.sharing``.

A thin, checked facade over the actor's :class:`~caf_sharing.plug.ActorSharing`:
it validates arguments at the call (so a bad name or option fails where it was
written) and hands out the snapshots of the current message through
``maps.<alias>`` / ``maps[alias]``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from ._fastmap import FrozenDict, FrozenList, MapRef, SharedMap
from .errors import InvalidChangeSetError, InvalidTypeError, MissedUpdateError, SharingError
from .names import check_map_name, check_part
from .plug import ActorSharing, MapInfo

__all__ = ["MapsView", "SharingProxy"]

_VERSION_KEY = "__ca_version__"


class MapsView:
    """The current message's snapshots by alias: ``maps.admin`` or ``maps["admin"]``.

    A best-effort read-only map that is not available yet (or was deleted)
    reads as ``None``; any other deleted one raises ``MapNotFoundError``.
    A writable map's ref reads the message's own writes, but its ``version``
    stays the version the message started from until the commit makes
    ``version + 1``.
    """

    __slots__ = ("_plug",)

    def __init__(self, plug: ActorSharing) -> None:
        self._plug = plug

    # Typed Any, not the union: actor code knows which kind each alias is.
    def __getattr__(self, alias: str) -> Any:
        if alias.startswith("__"):
            raise AttributeError(alias)
        return self._plug.snapshot(alias)

    def __getitem__(self, alias: str) -> Any:
        return self._plug.snapshot(alias)

    def __contains__(self, alias: object) -> bool:
        return alias in self._plug.aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self._plug.aliases)

    def __len__(self) -> int:
        return len(self._plug.aliases)

    def __dir__(self) -> list[str]:
        return self._plug.aliases

    def __repr__(self) -> str:
        return f"<maps {', '.join(self._plug.aliases) or '(none)'}>"


class SharingProxy:
    """The sharing API of one actor (``self.sharing``)."""

    __slots__ = ("_plug", "maps")

    def __init__(self, plug: ActorSharing) -> None:
        self._plug = plug
        self.maps = MapsView(plug)

    def add_writable_map(self, alias: str, name: str, *,
                         initial_value: Mapping[str, Any] | None = None,
                         aggregate: bool = False) -> None:
        """Register a map this actor owns and writes; effective at commit.

        ``name`` is relative (``"x"`` -> ``"<actor>-x"``) or a full name under
        this actor. The map is created with ``initial_value`` if it does not
        exist yet.
        """
        if aggregate:
            raise SharingError(f"aggregate map alias {alias!r} cannot be writable")
        full = self._plug.full_name(name)
        self._plug.add_map(alias, MapInfo(full, writable=True), initial_value)

    def add_read_only_map(self, alias: str, full_name: str, *, aggregate: bool = False,
                          best_effort: bool = False, no_exec: bool = False,
                          link_key: str | None = None,
                          initial_value: Mapping[str, Any] | None = None,
                          on_change: str | None = None) -> None:
        """Register a replica of any map (or an aggregate rooted at it); effective
        at commit. Without ``best_effort`` a map that does not exist fails the
        message.

        ``on_change`` names a message of this actor, sent as
        ``method(alias, version)`` once the registration takes effect (and
        after every restart), then whenever a new version of the map (any map
        of an aggregate) lands; ``version`` is the one the message sees (an
        aggregate's: its first map's, -1 if missing). Coalesced: one queued
        notification per alias at most. An unknown method is refused here
        (:class:`~caf_sharing.errors.UnknownActorMethodError`).
        """
        if initial_value is not None:
            raise SharingError(f"read-only map alias {alias!r} cannot have an initial value")
        check_map_name(full_name)
        if link_key is not None and not aggregate:
            raise SharingError(f"link_key is only for aggregates (alias {alias!r})")
        if link_key is not None:
            check_part(link_key, "link key")
        if on_change is not None and not isinstance(on_change, str):
            raise InvalidTypeError(f"on_change of map alias {alias!r} must be a method name, "
                                   f"got {type(on_change).__name__}")
        info = MapInfo(full_name, writable=False, aggregate=aggregate,
                       best_effort=best_effort, no_exec=no_exec, link_key=link_key,
                       on_change=on_change)
        self._plug.add_map(alias, info, None)

    def delete_map(self, alias: str) -> None:
        """Unregister ``alias``; effective at commit."""
        self._plug.delete_map(alias)

    def full_name(self, name: str) -> str:
        """The full name of this actor's map ``name``."""
        return self._plug.full_name(name)

    def pull_update(self, alias: str,
                    version: int | None = None) -> list[FrozenDict] | FrozenDict:
        """What a remote client at ``version`` needs to catch up with ``alias``:
        the change sets since then, or a full dump when they are not kept
        (or ``version`` is None)."""
        ref = self._plug.read_only_ref(alias)
        if version is not None:
            if isinstance(version, bool) or not isinstance(version, int):
                raise InvalidChangeSetError(f"version must be an int, got {version!r}")
            updates = ref.updates_slice(version)
            if updates is not None:
                return updates
        return ref.dump()

    def apply_delta(self, alias: str, changes: Mapping[str, Any]) -> None:
        """Replay an external change set into the writable map ``alias``.

        It is checked first as ``SharedMap.apply_changes`` checks one (a bad
        one raises :class:`InvalidChangeSetError` and leaves the ref exactly
        as it was), then applied to the ref whole. An older change set is
        ignored (a dump too, unless the map is at version 0), a newer one
        raises :class:`MissedUpdateError`.
        """
        ref = self._plug.snapshot(alias)
        if not isinstance(ref, MapRef) or ref.is_read_only:
            raise SharingError(f"map alias {alias!r} is not writable")
        if not isinstance(changes, Mapping):
            raise InvalidChangeSetError(
                f"change set must be a dict, got {type(changes).__name__}")
        # Plain copies: what is checked below is exactly what gets applied.
        delta = dict(changes)
        for field in ("remove", "add"):
            if isinstance(delta.get(field), list | tuple):
                delta[field] = list(delta[field])
        # The core checks all of it on a scratch map at the ref's version.
        scratch = SharedMap(max_updates=0)
        if ref.version:
            scratch.apply_changes({"version": 0, "remove": [], "add": [_VERSION_KEY, ref.version]})
        try:
            scratch.apply_changes(delta)
        except MissedUpdateError as exc:
            raise MissedUpdateError(
                f"change set for version {exc.version} but map alias {alias!r} is at "
                f"{ref.version}: missed update", version=exc.version, current=ref.version) from None
        if delta["version"] < ref.version:
            return
        # Known good now; freezing makes every key an exact str (not a str
        # subclass that could compare unlike one) and every value stored as is.
        remove, add = FrozenList(delta["remove"]), FrozenList(delta["add"])
        for key in remove:
            ref.delete(key)
        for i in range(0, len(add), 2):
            if add[i] != _VERSION_KEY:
                ref.set(add[i], add[i + 1])
