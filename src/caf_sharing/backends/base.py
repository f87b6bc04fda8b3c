"""The storage backend contract every implementation honours.

A backend persists maps, actor checkpoints and actor leases, and propagates
change sets to subscribers. The sharing service is its only caller. All data
crossing this boundary is plain JSON data: change sets and dumps use the wire
format of :mod:`caf_sharing._fastmap` (``{"version", "remove", "add"}``) plus
the lineage fields below.

**Lineage.** Every stored map version is tied to the txid of the commit that
made it. A published change set carries ``"txid"`` (its commit) and
``"base_txid"`` (the commit that made its base version) beside
``version``/``remove``/``add`` (Caf.js ignores extra fields); a dump carries
``"txid"`` of the version it holds (``None`` when the store does not know it).

Semantics every backend must keep (the contract tests check them on each one):

* ``commit`` is atomic: either the checkpoint, every map write, creation,
  restore and deletion of the transaction are stored and each change set
  (and each deletion's :data:`DELETED` marker) is published on its map's
  channel, or nothing is stored or published.
* A map a transaction deletes (``tx.deletes``) is gone from the store once
  the commit is: ``read_map`` gives ``None``, and a later create starts it
  afresh. Its channel gets ``{"deleted": true, "txid": <txid>}`` (see
  :data:`DELETED`), which no change set looks like, so subscribers learn of
  it (change sets themselves keep the Caf.js format).
* ``destroy_actor`` removes everything stored for an actor nobody holds the
  lease of: checkpoint, earlier txids, lease, lineage, and every map it
  stored (publishing the deletion marker on each), atomically.
* ``claim_node`` keeps one live node per ``node_id``: a claim is a nonce
  with a TTL, renewed by the node that made it; another nonce for the same
  id is refused with :class:`NodeIdInUseError` while the claim lives.
* ``commit`` is fenced twice. It fails with :class:`LeaseLostError` when
  another node holds the lease of ``tx.actor``. And the commits of an actor
  form a chain of transaction ids: the stored checkpoint must carry
  ``tx.prev_txid`` (or be absent when ``tx.prev_txid`` is ``None``), else the
  commit fails with :class:`ChainError` naming the stored txid, so a node
  that missed another node's commit for the actor can never overwrite it, and
  a node whose store went back learns it. A lease that vanished (expired, or
  the backend lost its data) is taken back by a commit that passes both checks.
* ``commit`` is idempotent by ``tx.txid``: when the stored checkpoint carries
  ``tx.txid``, or when the commit would be refused by the lease or the chain
  and ``tx.txid`` is one of the :data:`RECENT_TXIDS` txids committed before
  the stored one, the call stores nothing and returns ``False`` (a retried
  commit whose reply was lost is reported as committed, even after another
  node moved on).
* Versions are integers compared as numbers. A write whose change set version
  differs from the stored map version fails with
  :class:`ConcurrentUpdateError` (also when the versions match but the stored
  txid differs from the change set's ``base_txid``), unless the write's
  ``rebase_from`` equals the stored version and its ``base_txid`` the stored
  txid: the map is then renumbered to the change set's base first. A written
  map absent from the store fails with :class:`MapMissingError` unless the
  write carries ``full`` (a dump of the map after the write), which then
  re-creates it.
* A *re-assert* (``tx.reassert``) is a node putting back what the store lost
  of its own actor: writes with ``full`` and every restore are stored whatever
  the store holds, after the lease and chain checks.
* A backend may also offer ``async map_stamp(name) -> (version, txid) |
  None``: the stored version of a map and the txid of the commit that made
  it (``None`` when unknown), without its content. Not part of
  :class:`Backend` (a backend without it still works): the sharing service
  uses it when present to take a map a commit just created from its own copy
  instead of reading it back, once the stamp proves the store holds it.
* Handlers passed to ``subscribe`` receive the raw bytes published on the
  map's channel (orjson-encoded change sets), are called from the event loop
  and never from inside the ``commit`` call that published them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "DELETED",
    "RECENT_TXIDS",
    "Backend",
    "ChangeSet",
    "Checkpoint",
    "Known",
    "MapCreate",
    "MapRestore",
    "MapWrite",
    "MessageHandler",
    "ReconnectListener",
    "StoredActor",
    "StoredMap",
    "Transaction",
]

ChangeSet = dict[str, Any]
"""``{"version": int, "remove": [key, ...], "add": [k1, v1, ...]}`` plus the
lineage fields ``txid`` and ``base_txid`` (change sets) or ``txid`` (dumps)."""

#: Txids a store keeps per actor to recognise a retried commit.
RECENT_TXIDS = 32

#: The key of the marker a map's channel carries when the map is deleted:
#: ``{"deleted": true, "txid": <the deleting commit's txid or null>}``.
DELETED = "deleted"

Checkpoint = dict[str, Any]
"""What an actor stores at each commit: ``{"txid", "state", "maps"}``."""

Known = Mapping[str, tuple[int, str | None]]
"""Per map name, the version a reader holds and the txid that made it."""

MessageHandler = Callable[[bytes], None]
ReconnectListener = Callable[[Sequence[str]], None]
"""Told the names of the subscribed maps that may have missed messages."""


@dataclass(frozen=True, slots=True)
class StoredMap:
    """A map as the store holds it (see :meth:`Backend.survey`)."""

    app: str
    name: str
    version: int
    #: User keys (the version pair not counted).
    keys: int
    #: What the store spends on it, as it reports it (Redis: MEMORY USAGE).
    bytes: int


@dataclass(frozen=True, slots=True)
class StoredActor:
    """An actor as the store holds it: its checkpoint and lease."""

    app: str
    name: str
    #: The txid of its stored checkpoint (``None``: none stored).
    txid: str | None
    #: The node holding its lease, and the seconds the lease has left.
    holder: str | None
    ttl: float | None


# MapWrite and Transaction are built for every commit, and a frozen dataclass
# costs three times as much to build: treat them as read-only all the same.


@dataclass(slots=True)
class MapWrite:
    """One map changed by a transaction."""

    name: str
    changes: ChangeSet
    #: Dump of the map after ``changes``; lets the write re-create a map the
    #: backend lost. ``None`` on the first attempt.
    full: ChangeSet | None = None
    #: The stored version this write renumbers (the writer adopted the map at
    #: that version and continues above every version a reader may have seen).
    rebase_from: int | None = None


@dataclass(frozen=True, slots=True)
class MapRestore:
    """A map a re-assert puts back as the writer holds it (nothing published)."""

    name: str
    #: Its dump, ``txid`` included.
    dump: ChangeSet


@dataclass(frozen=True, slots=True)
class MapCreate:
    """A map a transaction creates when absent (``add_writable_map``)."""

    name: str
    #: Dump to create it from (its initial value), or ``None`` for empty.
    initial: ChangeSet | None = None


@dataclass(slots=True)
class Transaction:
    """Everything one actor message makes durable, in one atomic step."""

    actor: str
    node_id: str
    txid: str
    prev_txid: str | None
    checkpoint: Checkpoint
    #: Seconds a lease taken back by this commit lasts (see ``commit``).
    lease_ttl: float
    writes: Sequence[MapWrite] = field(default_factory=tuple)
    creates: Sequence[MapCreate] = field(default_factory=tuple)
    restores: Sequence[MapRestore] = field(default_factory=tuple)
    #: Full names of maps of the actor this transaction deletes (data included).
    deletes: Sequence[str] = field(default_factory=tuple)
    #: Put back what the store lost of this actor (see the module docs).
    reassert: bool = False


@runtime_checkable
class Backend(Protocol):
    """Async storage and propagation for maps, checkpoints and leases."""

    #: The backend URL with any password removed, safe to log.
    url: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def create_map(self, name: str, initial: ChangeSet | None = None) -> ChangeSet:
        """Create ``name`` from ``initial`` unless it exists; return its dump."""
        ...

    async def read_map(self, name: str) -> ChangeSet | None:
        """The dump of ``name``, or ``None`` when it does not exist. Its
        values are deep-frozen as the core stores them (``FrozenDict``,
        ``FrozenList``: a dict and a list that refuse changes), so that a
        replica loading the dump keeps them instead of copying each."""
        ...

    async def read_maps(self, names: Sequence[str], known: Known | None = None
                        ) -> dict[str, ChangeSet | None]:
        """Dumps of several maps of one owner, all from one instant (no commit
        of the owner falls between them). A map of ``known`` that the store
        holds at the version and txid given there is left out: its reader
        holds it already."""
        ...

    async def delete_map(self, name: str) -> bool:
        """Delete ``name`` outside any transaction, publishing the deletion
        marker; ``True`` if it existed."""
        ...

    async def subscribe(self, name: str, handler: MessageHandler) -> None:
        """Deliver every change set later published on ``name`` to ``handler``."""
        ...

    async def unsubscribe(self, name: str, handler: MessageHandler) -> None: ...

    def add_reconnect_listener(self, listener: ReconnectListener) -> None:
        """Call ``listener`` with the names of the subscribed maps that may
        have missed messages, once they are subscribed again (after a lost
        connection, or a channel that moved to another shard)."""
        ...

    async def acquire_lease(self, actor: str, node_id: str, ttl: float) -> None:
        """Take or extend the lease; :class:`LeaseHeldError` if another node has it.

        A store that may have lost data recently (a server up for less than
        ``ttl``) waits until ``ttl`` has passed before it grants a lease that
        is absent: the previous holder may still run and must get the chance
        to put back what the store lost."""
        ...

    async def renew_leases(self, actors: Sequence[str], node_id: str, ttl: float) -> list[str]:
        """Extend the leases ``node_id`` holds and take back vanished ones;
        return the actors whose lease another node holds."""
        ...

    async def release_lease(self, actor: str, node_id: str) -> None: ...

    async def destroy_actor(self, actor: str) -> bool:
        """Delete everything stored for ``actor`` (checkpoint, earlier txids,
        lease, lineage and its maps, publishing a deletion marker on each
        map's channel), atomically; :class:`LeaseHeldError` (nothing deleted)
        if any node holds its lease. ``True`` if anything was stored."""
        ...

    async def claim_node(self, node_id: str, nonce: str, ttl: float) -> None:
        """Claim ``node_id`` for the node instance ``nonce`` for ``ttl``
        seconds, or extend its claim; :class:`NodeIdInUseError` if another
        instance's claim on ``node_id`` is alive."""
        ...

    async def release_node(self, node_id: str, nonce: str) -> None:
        """Drop the claim ``nonce`` holds on ``node_id`` (no-op otherwise)."""
        ...

    async def load_checkpoint(self, actor: str) -> Checkpoint | None: ...

    async def load_txids(self, actors: Sequence[str]) -> list[str | None]:
        """The txid of each actor's stored checkpoint (``None``: none stored)."""
        ...

    async def commit(self, tx: Transaction) -> bool:
        """Apply ``tx`` atomically; ``False`` if ``tx.txid`` was already committed."""
        ...

    async def purge(self, expire_after: float | None = None) -> int:
        """Delete everything this backend's app holds, or with
        ``expire_after``, let it expire that many seconds from now (an
        in-process store keeps it: it ends with its process). Returns how
        many keys (Redis) or items (maps, checkpoints, leases) it touched.
        For demos and tests: actors still running lose their data."""
        ...

    async def survey(self, every_app: bool = False) -> tuple[list[StoredMap], list[StoredActor]]:
        """The maps and actors the store holds for this backend's app (for
        every app with ``every_app``), sorted by app and name. Read in small
        steps (Redis: SCAN, never KEYS), so it never stalls the store; not a
        snapshot: what commits meanwhile may or may not show."""
        ...
