"""Every error caf-sharing raises on purpose.

All derive from :class:`SharingError`. Errors about bad input also derive from
the matching builtin (``TypeError``/``ValueError``/``KeyError``) so that code
written against plain Python containers keeps working.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ActorError",
    "ActorStoppedError",
    "BackendError",
    "BackendUnavailableError",
    "ChainError",
    "ChannelError",
    "ConcurrentUpdateError",
    "ConfigError",
    "DurabilityError",
    "InvalidChangeSetError",
    "InvalidNameError",
    "InvalidTypeError",
    "InvalidValueError",
    "LeaseHeldError",
    "LeaseLostError",
    "MailboxFullError",
    "MapMissingError",
    "MapNotFoundError",
    "MethodError",
    "MissedUpdateError",
    "NoExecError",
    "NodeIdInUseError",
    "PrepareRequiredError",
    "ReadOnlyError",
    "ShardUnavailableError",
    "SharingError",
    "UnknownActorMethodError",
    "UnknownMethodError",
    "ViewClosedError",
]


class SharingError(Exception):
    """Base class of every error raised on purpose by caf-sharing."""


class ReadOnlyError(SharingError):
    """A write through a read-only (or already prepared) map reference.

    ``map_name`` is the full name of the map when the reference belongs to a
    named map (a replica): the message then names it and its owner, the only
    actor that can write it."""

    def __init__(self, message: str, *, map_name: str | None = None) -> None:
        if map_name is not None:
            # A map is "owner-local-name": its owner is the first two parts.
            owner = "-".join(map_name.split("-")[:2])
            message = (f"{message}: map {map_name!r} is read-only here; only its owner, "
                       f"actor {owner!r}, writes it")
        super().__init__(message)
        self.map_name = map_name


class PrepareRequiredError(SharingError):
    """``commit`` of a reference that was not prepared or has no changes."""


class ConcurrentUpdateError(SharingError):
    """The map moved past the version a reference (or change set) was based on,
    or (``name`` is then an actor) another node committed for the actor since
    this node's last commit."""

    def __init__(self, message: str, *, name: str | None = None,
                 expected: int | None = None, current: int | None = None) -> None:
        super().__init__(message)
        self.name = name
        self.expected = expected
        self.current = current


class ChainError(ConcurrentUpdateError):
    """A commit that does not follow the actor's stored one: another node
    committed for the actor since, or the store went back (it restarted with
    older or no data). ``stored_txid`` is the txid the store holds (``None``:
    no checkpoint at all); the node decides which case it is from its own
    history of txids."""

    def __init__(self, message: str, *, actor: str, stored_txid: str | None) -> None:
        super().__init__(message, name=actor)
        self.stored_txid = stored_txid


class MissedUpdateError(SharingError):
    """A change set is newer than the map: at least one update was missed."""

    def __init__(self, message: str, *, version: int, current: int) -> None:
        super().__init__(message)
        self.version = version
        self.current = current


class InvalidChangeSetError(SharingError, ValueError):
    """A change set (or wire message) that does not have the documented shape."""


class InvalidTypeError(SharingError, TypeError):
    """A key or value of a type a SharedMap cannot hold (the message names the
    key and the path inside the value)."""


class InvalidValueError(SharingError, ValueError):
    """A key or value of an accepted type but not an accepted value: NaN or
    infinity, an int outside 64 bits, nesting too deep, the reserved key."""


class ChannelError(SharingError, ValueError):
    """A reliable channel whose messages or acks are inconsistent."""


class NoExecError(SharingError):
    """``apply_method`` on a map whose serialized methods are disabled."""


class UnknownMethodError(SharingError, KeyError):
    """``apply_method`` with a name that holds no serialized method."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class MethodError(SharingError):
    """A serialized method failed to compile or raised while running."""

    def __init__(self, message: str, *, method: str) -> None:
        super().__init__(message)
        self.method = method


class InvalidNameError(SharingError, ValueError):
    """An actor, map or alias name that breaks the naming rules."""


class BackendError(SharingError):
    """Base class of errors reported by a storage backend."""


class BackendUnavailableError(BackendError):
    """The backend could not be reached after the configured retries."""


class ShardUnavailableError(BackendUnavailableError):
    """Some shards of a Redis Cluster failed a call that spans several: the
    actors in ``failed`` live on them. ``partial`` holds the call's result for
    the other actors, whose part went through (for ``renew_leases``: those
    of them whose lease another node holds; for ``load_txids``: the txids,
    ``None`` for the failed ones)."""

    def __init__(self, message: str, *, failed: list[str], partial: Any) -> None:
        super().__init__(message)
        self.failed = failed
        self.partial = partial


class DurabilityError(BackendError):
    """A commit reached fewer replicas than ``wait_replicas`` asked for within
    ``wait_timeout_ms``. Its outcome is ambiguous: the primary holds it (readers
    may already see it), but a failover may still lose it."""

    def __init__(self, message: str, *, required: int, confirmed: int) -> None:
        super().__init__(message)
        self.required = required
        self.confirmed = confirmed


class MapNotFoundError(BackendError, KeyError):
    """A map that does not exist in the backend (``hint`` says what to do about it)."""

    def __init__(self, name: str, hint: str = "") -> None:
        super().__init__(f"map {name!r} does not exist{'; ' + hint if hint else ''}")
        self.name = name

    def __str__(self) -> str:
        return str(self.args[0])


class MapMissingError(BackendError):
    """A commit found written maps absent from the backend (it lost its data)."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(f"maps missing from the backend: {', '.join(names)}")
        self.names = names


class LeaseHeldError(BackendError):
    """Another node holds the lease of an actor; ``expires_in`` (seconds, when
    known) is the time left before the lease expires unless its holder renews it."""

    def __init__(self, actor: str, holder: str | None, expires_in: float | None = None) -> None:
        when = "" if expires_in is None else \
            f"; the lease expires in {expires_in:.1f}s unless that node renews it"
        super().__init__(f"actor {actor!r} is leased by node {holder!r}{when}")
        self.actor = actor
        self.holder = holder
        self.expires_in = expires_in


class NodeIdInUseError(BackendError):
    """Another live node uses the same ``node_id`` on the same backend and app:
    two nodes sharing an id would share every lease, and so break the single
    writer guarantee."""

    def __init__(self, node_id: str, where: str, expires_in: float | None = None) -> None:
        when = "" if expires_in is None else \
            f" (its claim expires in {expires_in:.1f}s if that node is gone)"
        super().__init__(
            f"node_id {node_id!r} is already used by a live node on {where}{when}: give each "
            "node its own node_id (or leave node_id=None for a unique one)")
        self.node_id = node_id
        self.expires_in = expires_in


class LeaseLostError(BackendError):
    """This node no longer holds the lease of an actor: its writes are fenced off."""

    def __init__(self, actor: str, node_id: str, holder: Any = None) -> None:
        super().__init__(
            f"node {node_id!r} lost the lease of actor {actor!r} (held by {holder!r})")
        self.actor = actor
        self.node_id = node_id
        self.holder = holder


class ActorError(SharingError):
    """Base class of errors about hosting or calling actors."""


class UnknownActorMethodError(ActorError, AttributeError):
    """A call to a method the actor does not expose."""


class MailboxFullError(ActorError):
    """The actor's mailbox is at its bound; the message was not queued."""


class ActorStoppedError(ActorError):
    """The actor was stopped (or lost its lease) before the message ran."""


class ViewClosedError(SharingError):
    """A replica view (``Node.replica``) was used after it, or its node, closed."""


class ConfigError(SharingError, ValueError):
    """A configuration file or option that is missing, unknown or mistyped."""
