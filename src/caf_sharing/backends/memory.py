"""The embedded backend: ``memory://`` and ``memory://NAME``.

A real backend that keeps maps, checkpoints and leases in this process, with
the same semantics as Redis: atomic, fenced, idempotent commits, numeric
version checks, leases that expire, and asynchronous delivery of published
change sets.

Stores
    ``memory://NAME`` backends with the same NAME share one :class:`MemoryStore`
    from a process-wide registry, so several nodes in one process replicate to
    each other. A bare ``memory://`` gets a private store of its own (nothing
    is shared, nothing outlives the backend's last reference). Named stores
    live as long as the process; tests free them with :meth:`MemoryStore.drop`
    and :meth:`MemoryStore.drop_all`. A backend keeps using the store it
    started with even after that store was dropped from the registry.

Data is copied at the boundary: map fields and checkpoints are stored as
orjson bytes, so no caller object is ever aliased by the store.

Delivery
    A commit schedules each change set on every subscriber's event loop
    (``call_soon``, or ``call_soon_threadsafe`` for another loop) while it
    holds the store lock, so subscribers see the messages of one channel in
    commit order and never from inside the ``commit`` call. A handler that was
    unsubscribed before its turn comes is not called.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

from ..errors import (
    BackendUnavailableError,
    ConcurrentUpdateError,
    LeaseHeldError,
    LeaseLostError,
    MapMissingError,
    NodeIdInUseError,
)
from ..names import check_actor_name, check_map_name, map_owner
from .base import (
    RECENT_TXIDS,
    ChangeSet,
    Checkpoint,
    Known,
    MessageHandler,
    ReconnectListener,
    StoredActor,
    StoredMap,
    Transaction,
)
from .wire import (
    EncodedTransaction,
    chain_broken,
    check_app,
    check_known,
    check_one_owner,
    check_open,
    decode_checkpoint,
    deleted_marker,
    encode_dump,
    encode_transaction,
    finish_dump,
    load_chunk,
    ttl_to_ms,
)

__all__ = ["MemoryBackend", "MemoryStore"]

_log = logging.getLogger("caf_sharing.backends.memory")


@dataclass(slots=True)
class _Map:
    version: int
    fields: dict[str, bytes]
    #: The commit that made ``version`` (``None`` when created outside one).
    txid: str | None = None


@dataclass(slots=True)
class _Checkpoint:
    txid: str
    blob: bytes
    #: The txids committed before ``txid``, newest last.
    recent: deque[str] = field(default_factory=lambda: deque(maxlen=RECENT_TXIDS))


@dataclass(slots=True)
class _Lease:
    node_id: str
    expires: float  # time.monotonic()


@dataclass(eq=False, slots=True)
class _Subscription:
    handler: MessageHandler
    loop: asyncio.AbstractEventLoop
    active: bool = True

    def deliver(self, payload: bytes) -> None:
        if not self.active:
            return
        try:
            self.handler(payload)
        except Exception:
            _log.exception("subscription handler %r failed", self.handler)


@dataclass(slots=True)
class _Space:
    """Everything one application namespace (``app``) holds in a store."""

    maps: dict[str, _Map] = field(default_factory=dict)
    checkpoints: dict[str, _Checkpoint] = field(default_factory=dict)
    leases: dict[str, _Lease] = field(default_factory=dict)
    #: node id -> the claim of the live node instance using it (node_id is the nonce).
    nodes: dict[str, _Lease] = field(default_factory=dict)
    channels: dict[str, list[_Subscription]] = field(default_factory=dict)

    def lease_holder(self, actor: str, now: float) -> str | None:
        lease = self.leases.get(actor)
        if lease is None:
            return None
        if lease.expires <= now:
            del self.leases[actor]
            return None
        return lease.node_id


class MemoryStore:
    """One in-process store, shared by the backends opened on the same name."""

    _registry: dict[str, MemoryStore] = {}
    _registry_lock = threading.Lock()

    def __init__(self, name: str | None = None) -> None:
        self.name = name
        #: Held for every read and write, so a commit is atomic even when
        #: backends on several threads' event loops share this store.
        self.lock = threading.Lock()
        self._spaces: dict[str, _Space] = {}

    def __repr__(self) -> str:
        return f"MemoryStore({self.name!r})"

    def spaces(self) -> dict[str, _Space]:
        """Every app namespace with its contents (hold :attr:`lock`)."""
        return self._spaces

    def space(self, app: str) -> _Space:
        space = self._spaces.get(app)
        if space is None:
            space = self._spaces[app] = _Space()
        return space

    @classmethod
    def named(cls, name: str) -> MemoryStore:
        """The registry's store called ``name``, created on first use."""
        with cls._registry_lock:
            store = cls._registry.get(name)
            if store is None:
                store = cls._registry[name] = cls(name)
            return store

    @classmethod
    def drop(cls, name: str) -> bool:
        """Forget the store called ``name``; the next ``memory://NAME`` starts
        empty. ``True`` if it existed. Backends already open keep theirs."""
        with cls._registry_lock:
            return cls._registry.pop(name, None) is not None

    @classmethod
    def drop_all(cls) -> None:
        """Forget every named store (see :meth:`drop`)."""
        with cls._registry_lock:
            cls._registry.clear()


class MemoryBackend:
    """The in-process implementation of :class:`~caf_sharing.backends.base.Backend`."""

    def __init__(self, name: str = "", *, app: str = "default") -> None:
        self.store = MemoryStore.named(name) if name else MemoryStore()
        self.app = check_app(app)
        self.url = f"memory://{name}"
        self._space = self.store.space(app)
        self._started = False
        self._closed = False
        self._subscriptions: dict[tuple[str, MessageHandler], list[_Subscription]] = {}

    def __repr__(self) -> str:
        return f"MemoryBackend({self.url!r}, app={self.app!r})"

    def _check_open(self) -> None:
        check_open(self.url, self.app, self._started, self._closed)

    async def start(self) -> None:
        if self._closed:
            raise BackendUnavailableError(f"backend {self.url} was closed; make a new one")
        self._started = True

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self.store.lock:
            for (name, _), subs in self._subscriptions.items():
                for sub in subs:
                    self._detach(name, sub)
        self._subscriptions.clear()

    # -- maps -------------------------------------------------------------

    async def create_map(self, name: str, initial: ChangeSet | None = None) -> ChangeSet:
        check_map_name(name)
        version, fields = (0, []) if initial is None else encode_dump(name, initial,
                                                                      "initial value")
        self._check_open()
        with self.store.lock:
            stored = self._space.maps.get(name)
            if stored is None:
                stored = self._space.maps[name] = _Map(version, dict(fields))
            return self._dump(name, stored)

    @staticmethod
    def _dump(name: str, stored: _Map) -> ChangeSet:
        items: list[Any] = []
        load_chunk(name, list(chain.from_iterable(stored.fields.items())), items)
        return finish_dump(name, items, stored.version, stored.txid)

    async def read_map(self, name: str) -> ChangeSet | None:
        return (await self.read_maps([name]))[name]

    async def read_maps(self, names: Sequence[str], known: Known | None = None
                        ) -> dict[str, ChangeSet | None]:
        check_one_owner(names)
        held = check_known(known)
        self._check_open()
        # Decoding outside the lock would need a copy of the fields anyway.
        with self.store.lock:
            found = {name: self._space.maps.get(name) for name in names}
            return {name: None if m is None else self._dump(name, m)
                    for name, m in found.items()
                    if m is None or held.get(name) != (m.version, m.txid)}

    async def map_stamp(self, name: str) -> tuple[int, str | None] | None:
        """The version of ``name`` and the txid that made it (``None``: no
        such map), without reading its content (see :mod:`.base`)."""
        check_map_name(name)
        self._check_open()
        with self.store.lock:
            stored = self._space.maps.get(name)
            return None if stored is None else (stored.version, stored.txid)

    async def delete_map(self, name: str) -> bool:
        check_map_name(name)
        self._check_open()
        with self.store.lock:
            existed = self._space.maps.pop(name, None) is not None
            if existed:
                self._publish(name, deleted_marker(None))
            return existed

    # -- subscriptions ----------------------------------------------------

    async def subscribe(self, name: str, handler: MessageHandler) -> None:
        check_map_name(name)
        if not callable(handler):
            raise TypeError(f"handler must be callable, got {type(handler).__name__}")
        self._check_open()
        sub = _Subscription(handler, asyncio.get_running_loop())
        with self.store.lock:
            self._space.channels.setdefault(name, []).append(sub)
        self._subscriptions.setdefault((name, handler), []).append(sub)

    async def unsubscribe(self, name: str, handler: MessageHandler) -> None:
        check_map_name(name)
        self._check_open()
        subs = self._subscriptions.get((name, handler))
        if not subs:
            return
        sub = subs.pop()
        if not subs:
            del self._subscriptions[(name, handler)]
        with self.store.lock:
            self._detach(name, sub)

    def _detach(self, name: str, sub: _Subscription) -> None:
        """Stop ``sub`` and take it off its channel; lock held."""
        sub.active = False
        channel = self._space.channels.get(name)
        if channel is not None:
            if sub in channel:
                channel.remove(sub)
            if not channel:
                del self._space.channels[name]

    def add_reconnect_listener(self, listener: ReconnectListener) -> None:
        """Accepted for the protocol and never called: an in-process store
        never loses its subscribers."""

    def _publish(self, name: str, payload: bytes) -> None:
        """Schedule ``payload`` for every subscriber of ``name``; lock held."""
        subs = self._space.channels.get(name)
        if not subs:
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for sub in tuple(subs):
            if sub.loop is running:
                sub.loop.call_soon(sub.deliver, payload)
            elif sub.loop.is_closed():
                # Its backend was never closed and its loop is gone.
                _log.warning("dropping a subscriber of %s whose event loop is closed", name)
                sub.active = False
                subs.remove(sub)
            else:
                sub.loop.call_soon_threadsafe(sub.deliver, payload)

    # -- leases -----------------------------------------------------------

    async def acquire_lease(self, actor: str, node_id: str, ttl: float) -> None:
        check_actor_name(actor)
        ms = ttl_to_ms(ttl)
        self._check_open()
        with self.store.lock:
            now = time.monotonic()
            holder = self._space.lease_holder(actor, now)
            if holder is not None and holder != node_id:
                raise LeaseHeldError(actor, holder, self._space.leases[actor].expires - now)
            self._space.leases[actor] = _Lease(node_id, now + ms / 1000)

    async def renew_leases(self, actors: Sequence[str], node_id: str, ttl: float) -> list[str]:
        for actor in actors:
            check_actor_name(actor)
        ms = ttl_to_ms(ttl)
        self._check_open()
        lost: list[str] = []
        with self.store.lock:
            now = time.monotonic()
            for actor in actors:
                # A vanished lease is taken back; commits stay fenced by the txid chain.
                if self._space.lease_holder(actor, now) in (node_id, None):
                    self._space.leases[actor] = _Lease(node_id, now + ms / 1000)
                else:
                    lost.append(actor)
        return lost

    async def release_lease(self, actor: str, node_id: str) -> None:
        check_actor_name(actor)
        self._check_open()
        with self.store.lock:
            if self._space.lease_holder(actor, time.monotonic()) == node_id:
                del self._space.leases[actor]

    async def destroy_actor(self, actor: str) -> bool:
        check_actor_name(actor)
        self._check_open()
        with self.store.lock:
            space = self._space
            now = time.monotonic()
            holder = space.lease_holder(actor, now)
            if holder is not None:
                raise LeaseHeldError(actor, holder, space.leases[actor].expires - now)
            maps = [name for name in space.maps if map_owner(name) == actor]
            for name in maps:
                del space.maps[name]
                self._publish(name, deleted_marker(None))
            return space.checkpoints.pop(actor, None) is not None or bool(maps)

    async def claim_node(self, node_id: str, nonce: str, ttl: float) -> None:
        ms = ttl_to_ms(ttl)
        self._check_open()
        with self.store.lock:
            now = time.monotonic()
            claim = self._space.nodes.get(node_id)
            if claim is not None and claim.node_id != nonce and claim.expires > now:
                raise NodeIdInUseError(node_id, f"{self.url} (app {self.app!r})",
                                       claim.expires - now)
            self._space.nodes[node_id] = _Lease(nonce, now + ms / 1000)

    async def release_node(self, node_id: str, nonce: str) -> None:
        self._check_open()
        with self.store.lock:
            claim = self._space.nodes.get(node_id)
            if claim is not None and claim.node_id == nonce:
                del self._space.nodes[node_id]

    # -- checkpoints and commits -------------------------------------------

    async def load_checkpoint(self, actor: str) -> Checkpoint | None:
        check_actor_name(actor)
        self._check_open()
        with self.store.lock:
            stored = self._space.checkpoints.get(actor)
        return None if stored is None else decode_checkpoint(actor, stored.blob)

    async def load_txids(self, actors: Sequence[str]) -> list[str | None]:
        for actor in actors:
            check_actor_name(actor)
        self._check_open()
        with self.store.lock:
            found = [self._space.checkpoints.get(actor) for actor in actors]
        return [None if cp is None else cp.txid for cp in found]

    async def commit(self, tx: Transaction) -> bool:
        enc = encode_transaction(tx)
        if not self._started or self._closed:
            self._check_open()  # raises
        # No yield here: a node's actor yields between queued messages itself
        # (Node's mailbox loop), and an idle loop would only pay for it.
        with self.store.lock:
            return self._commit_locked(enc)

    def _commit_locked(self, tx: EncodedTransaction) -> bool:
        # Run for every message that writes: fields and dicts are read into
        # locals once, and what a plain one-map commit does not have (creates,
        # restores, deletes, subscribers) costs a test, not a loop.
        space = self._space
        actor, txid = tx.actor, tx.txid
        stored_cp = space.checkpoints.get(actor)
        stored_txid = None if stored_cp is None else stored_cp.txid
        if stored_txid == txid:
            return False
        now = time.monotonic()
        holder = space.lease_holder(actor, now)
        fenced = holder is not None and holder != tx.node_id
        if fenced or stored_txid != tx.prev_txid:
            # As the commit script: the window of earlier txids is read only
            # for a commit that would be refused.
            if stored_cp is not None and txid in stored_cp.recent:
                return False
            if fenced:
                raise LeaseLostError(actor, tx.node_id, holder)
            raise chain_broken(tx, stored_txid)
        maps = space.maps
        creates, writes, restores = tx.creates, tx.writes, tx.restores
        created = {c.name: c.version for c in creates if c.name not in maps} if creates else {}
        recreate: set[str] = set()
        missing: list[str] = []
        reassert = tx.reassert
        for write in writes:
            name = write.name
            if reassert and write.full is not None:
                recreate.add(name)
                continue
            stored = maps.get(name)
            if stored is not None:
                current: int | None = stored.version
                current_txid = stored.txid
            else:
                current, current_txid = created.get(name), txid
            if current == write.base:
                if write.base_txid is not None and current_txid is not None \
                        and current_txid != write.base_txid:
                    raise ConcurrentUpdateError(
                        f"map {name!r} holds version {current} of commit "
                        f"{current_txid!r}, the change set's base is of {write.base_txid!r}",
                        name=name, expected=write.base, current=current)
                continue
            if stored is not None and write.rebase_from == stored.version \
                    and write.base_txid == stored.txid:
                continue
            if stored is None and write.full is not None:
                recreate.add(name)
            elif current is None:
                missing.append(name)
            else:
                raise ConcurrentUpdateError(
                    f"map {name!r} is at version {current}, the change set expects "
                    f"{write.base}", name=name, expected=write.base, current=current)
        if missing:
            raise MapMissingError(missing)
        deleted = [name for name in tx.deletes if name in maps] if tx.deletes else []
        # Every check passed: from here on nothing can fail.
        if holder is None:  # taken back (see the contract)
            space.leases[actor] = _Lease(tx.node_id, now + tx.lease_ttl_ms / 1000)
        if creates:
            for create in creates:
                if create.name not in maps:
                    maps[create.name] = _Map(create.version, dict(create.fields), txid)
        if restores:
            for restore in restores:
                maps[restore.name] = _Map(restore.version, dict(restore.fields), restore.txid)
        for write in writes:
            name = write.name
            if recreate and name in recreate:
                assert write.full is not None
                maps[name] = _Map(write.new_version, dict(write.full), txid)
                continue
            target = maps[name]
            fields = target.fields
            for key in write.remove:
                fields.pop(key, None)
            fields.update(write.add)
            target.version = write.new_version
            target.txid = txid
        for name in deleted:
            del maps[name]
        if stored_cp is None:
            space.checkpoints[actor] = _Checkpoint(txid, tx.checkpoint)
        else:
            stored_cp.recent.append(stored_cp.txid)
            stored_cp.txid, stored_cp.blob = txid, tx.checkpoint
        if space.channels:  # else no map of this app has a subscriber
            for write in writes:
                self._publish(write.name, write.payload)
            for name in deleted:
                self._publish(name, tx.deleted_payload)
        return True

    async def purge(self, expire_after: float | None = None) -> int:
        self._check_open()
        with self.store.lock:
            space = self._space
            count = len(space.maps) + len(space.checkpoints) + len(space.leases)
            if expire_after is None:
                space.maps.clear()
                space.checkpoints.clear()
                space.leases.clear()
        return count

    async def survey(self, every_app: bool = False) -> tuple[list[StoredMap], list[StoredActor]]:
        self._check_open()
        maps: list[StoredMap] = []
        actors: list[StoredActor] = []
        with self.store.lock:
            now = time.monotonic()
            for app, space in sorted(self.store.spaces().items()):
                if not every_app and app != self.app:
                    continue
                for name, held in sorted(space.maps.items()):
                    size = sum(len(k) + len(v) for k, v in held.fields.items())
                    maps.append(StoredMap(app, name, held.version, len(held.fields), size))
                for actor in sorted(set(space.checkpoints) | set(space.leases)):
                    checkpoint = space.checkpoints.get(actor)
                    holder = space.lease_holder(actor, now)
                    lease = space.leases.get(actor)
                    actors.append(StoredActor(
                        app, actor, checkpoint.txid if checkpoint else None, holder,
                        None if holder is None or lease is None else lease.expires - now))
        return maps, actors
