"""Node: hosts Sharing Actors on one backend, one message at a time each.

Every message an actor processes is a transaction (DESIGN.md section 6):

1. *begin* — fresh snapshots of every map the actor uses (fairness);
2. the actor's method runs, reading and writing ``self.sharing.maps`` and
   ``self.state``; snapshots stay fixed across its ``await``\\ s (isolation);
3. *prepare* — the change set of each written map;
4. *commit* — one backend call, fenced by the actor's lease and idempotent
   by transaction id, stores the checkpoint and the change sets and
   publishes them; then the local primaries advance and the caller gets the
   reply.

An exception before the commit aborts: ``self.state`` and the maps stay as
they were and the caller gets the exception. A commit whose outcome is
unknown (the backend went away mid-call) makes the actor compare the stored
checkpoint with its own commits before its next message: it takes its own
commit that did land, adopts another node's, and keeps what it holds when the
store went back (the next commit puts it back, see
:mod:`caf_sharing.lineage`). The lease renewal also checks each actor's
stored checkpoint, so a store that lost data is healed within a third of the
lease, before any other node may take the actor.

A caller that gives up on a message (``asyncio.timeout``, a cancelled task)
withdraws it only while it waits in the mailbox: once it has started, it
runs to its end and commits, and only its reply is lost. A message to an
idle actor starts at once in its caller's task, as if in the actor's worker
(its context, its current task), and the worker takes over at its first
suspension (:mod:`caf_sharing._eager`): one that never suspends costs no
task switch. Inside a writing
message, ``ref.version`` of a writable map is the version the message started
from; the commit makes ``ref.version + 1``.

Lifecycle: ``Node()`` without a URL reads ``$CAF_SHARING_URL`` (default
``memory://``); ``await node.serve()`` runs until SIGTERM or SIGINT and then
closes gracefully (queued messages finish, new ones are refused, leases are
released, so another node can start the actors at once); ``await
node.destroy(name)`` deletes what the backend holds of an actor nobody runs.
A node claims its ``node_id`` in the backend while it is open, so that a
second live node with the same id is refused at ``open``.

``on_change`` notifications (``add_read_only_map(..., on_change=...)``) are
messages like any other, queued by :class:`_Notifications`; a node's
:meth:`Node.replica` views (:mod:`caf_sharing.view`) read the same replicas
as its actors, with no message.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import inspect
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from functools import partial
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, overload

import orjson

from . import _eager
from ._fastmap import MapRef, SharedMap
from .backends import default_url, make_backend
from .backends.base import Backend, MapCreate
from .errors import (
    ActorError,
    ActorStoppedError,
    BackendError,
    ConcurrentUpdateError,
    InvalidTypeError,
    InvalidValueError,
    LeaseLostError,
    MailboxFullError,
    ShardUnavailableError,
    SharingError,
    UnknownActorMethodError,
)
from .mailbox import Mailbox
from .methods import MethodLimits
from .metrics import LatencySummary, NodeStats, Observer, notify
from .names import check_actor_name, check_map_name
from .plug import ActorSharing
from .proxy import SharingProxy
from .service import SharingService, txid_of
from .view import ReplicaView

__all__ = ["Actor", "ActorHandle", "Node"]

A = TypeVar("A", bound="Actor")
#: The actor class of a handle (covariant: a handle of a subclass is a handle
#: of its base class).
A_co = TypeVar("A_co", bound="Actor", covariant=True)
P = ParamSpec("P")
R = TypeVar("R")

_LIFECYCLE = frozenset({"init", "resume"})
#: An actor with a backlog yields to the other tasks every this many messages.
_FAIR_SHARE = 8


class Actor:
    """Base class of a Sharing Actor.

    Public ``async def`` methods are the messages it accepts; ``init`` runs
    once, at its first start, and ``resume`` after every restart from a
    checkpoint. The node sets these attributes before either runs:

    * ``name`` — ``owner-local``;
    * ``state`` — a dict of JSON data, checkpointed with every commit;
    * ``sharing`` — the :class:`~caf_sharing.proxy.SharingProxy`;
    * ``log`` — a logger named after the actor.

    Subclasses that define ``__init__`` must accept no arguments.
    """

    name: str
    state: dict[str, Any]
    sharing: SharingProxy
    log: logging.Logger

    async def init(self) -> None:
        """First start only: register maps, set up ``state``."""

    async def resume(self) -> None:
        """After a restart: ``state`` and the maps are back from the checkpoint."""


class ActorHandle(Generic[A_co]):
    """What ``Node.start`` returns: a way to send messages to one actor,
    typed by the actor's class (``ActorHandle[Hello]``)."""

    __slots__ = ("_host",)

    def __init__(self, host: _Host) -> None:
        self._host = host

    @property
    def name(self) -> str:
        return self._host.name

    @property
    def actor(self) -> A_co:
        """The actor instance (for inspection; send it messages with ``call``)."""
        return self._host.actor  # type: ignore[return-value]

    @property
    def running(self) -> bool:
        return not self._host.stopping

    @overload
    async def call(self, method: Callable[Concatenate[A_co, P], Awaitable[R]],
                   *args: P.args, **kwargs: P.kwargs) -> R: ...

    @overload
    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any: ...

    async def call(self, method: str | Callable[..., Awaitable[Any]], *args: Any,
                   **kwargs: Any) -> Any:
        """Run one message; return what the method returned or raise what it raised.

        ``method`` is the method's name, or the method itself taken from the
        actor's class (``await handle.call(Hello.increment, 3)``), which a
        type checker checks against the handle's actor class, the arguments
        included, and whose return type it infers.

        A caller that stops waiting (``asyncio.timeout``, cancellation)
        withdraws the message only while it is still queued: once the
        message has started, it runs to its end and commits all the same.
        Calling an actor's own handle from inside one of its messages raises
        :class:`~caf_sharing.errors.ActorError` (it would deadlock: the actor
        runs one message at a time).
        """
        host = self._host
        return await host.submit(method if type(method) is str else host.method_name(method),
                                 args, kwargs)

    def __repr__(self) -> str:
        return f"<ActorHandle {self.name}{'' if self.running else ' stopped'}>"


#: A message: the method, its arguments, the caller's future, and whether it
#: commits even when it changes nothing (a sync that makes the store catch up).
_Message = tuple[Callable[..., Coroutine[Any, Any, Any]], tuple[Any, ...], dict[str, Any],
                 "asyncio.Future[Any]", bool]
#: What a mailbox holds: messages, the rest of a message that began in its
#: caller's task (:mod:`caf_sharing._eager`), and ``None``, which stops the worker.
_Item = _Message | _eager.Resumption | None

#: The message running in this task and the tasks it started: a marker per
#: message, so that an actor calling itself is refused instead of deadlocking.
_running: contextvars.ContextVar[object | None] = contextvars.ContextVar(
    "caf_sharing_running", default=None)


class _Host:
    """One hosted actor: its mailbox, its worker task and its transaction state."""

    def __init__(self, node: Node, name: str, actor: Actor) -> None:
        self.node = node
        self.name = name
        self.actor = actor
        self.plug = ActorSharing(node.service, name, logger=actor.log)
        self.plug.notifier = _Notifications(self)
        self.mailbox: Mailbox[_Item] = Mailbox(node.mailbox_size)
        self.txid: str | None = None
        #: This stay of the actor on the node: its commits are epoch-1.<tail>, epoch-2.<tail>...
        self.epoch = uuid.uuid4().hex[:16]
        self.seq = 0
        self.state_bytes = b"{}"
        self.needs_reload = False
        self.sync_queued = False
        self.stopping = False
        self.worker: asyncio.Task[None] | None = None
        #: The worker's context (set as it starts): messages that begin in
        #: their caller's task run in it too.
        self.context = contextvars.Context()
        #: A message began in its caller's task and has not suspended yet.
        self.eager = False
        #: Methods whose last eager start suspended (see :class:`_eager.Budget`).
        self.suspending: set[str] = set()
        #: The marker of the message running now (see ``_running``).
        self.current: object | None = None
        #: Name -> bound method, for the messages checked once already.
        self.methods: dict[str, Callable[..., Coroutine[Any, Any, Any]]] = {}

    # -- messages ------------------------------------------------------------

    def method_name(self, method: object) -> str:
        """The name of ``method``: a name, or a function of the actor's class."""
        if isinstance(method, str):
            return method
        name = getattr(method, "__name__", None)
        if not isinstance(name, str) or getattr(type(self.actor), name, None) is not method:
            raise UnknownActorMethodError(
                f"{method!r} is not a method of actor {self.name!r} "
                f"({type(self.actor).__name__}): pass Cls.method of its class, or its name")
        return name

    def bound(self, method: str) -> Callable[..., Coroutine[Any, Any, Any]]:
        """The actor's message ``method``, checked the first time it is asked for."""
        func = self.methods.get(method)
        if func is None:
            func = self.methods[method] = self._method(method)
        return func

    def _method(self, method: str) -> Callable[..., Coroutine[Any, Any, Any]]:
        if not isinstance(method, str) or method.startswith("_") or method in _LIFECYCLE:
            raise UnknownActorMethodError(
                f"{method!r} is not a message of actor {self.name!r} "
                "(names starting with '_' and init/resume cannot be called)")
        func = getattr(self.actor, method, None)
        if func is None or not inspect.iscoroutinefunction(func):
            raise UnknownActorMethodError(
                f"actor {self.name!r} ({type(self.actor).__name__}) has no async method "
                f"{method!r}")
        return func  # type: ignore[no-any-return]

    def submit(self, method: str, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> asyncio.Future[Any]:
        """Queue one message; the future settles with its outcome."""
        if self.stopping:
            raise ActorStoppedError(f"actor {self.name!r} is stopped")
        func = self.bound(method)
        if self.current is not None and _running.get() is self.current:
            raise ActorError(
                f"actor {self.name!r} called itself ({method!r}) from inside one of its "
                "messages: that would deadlock, as it runs one message at a time (call "
                "the method directly, e.g. await self.method(...))")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self.mailbox.parked and not self.eager \
                and self.node.eager_budget.take(loop, method in self.suspending):
            caller = asyncio.current_task(loop)
            if caller is not None:
                self.begin_now(loop, caller, method, func, args, kwargs, future)
                return future
        try:
            self.mailbox.put_nowait((func, args, kwargs, future, False))
        except asyncio.QueueFull:
            raise MailboxFullError(
                f"mailbox of actor {self.name!r} is full ({self.node.mailbox_size} messages)"
            ) from None
        return future

    def begin_now(self, loop: asyncio.AbstractEventLoop, caller: asyncio.Task[Any],
                  method: str, func: Callable[..., Coroutine[Any, Any, Any]],
                  args: tuple[Any, ...], kwargs: dict[str, Any],
                  future: asyncio.Future[Any]) -> None:
        """Run a message to an idle actor in the caller's task up to its first
        suspension; the worker takes over from there (:mod:`caf_sharing._eager`)."""
        assert self.worker is not None  # the mailbox is parked: the worker waits on it
        coro = self.deliver(func, args, kwargs, future, False)
        self.eager = True
        try:
            pending = _eager.first_step(loop, caller, self.worker, self.context, coro)
        finally:
            self.eager = False
        if pending is _eager.FINISHED:
            self.suspending.discard(method)
            return
        self.suspending.add(method)
        # The worker takes it over once what it waits on is done.
        mailbox = self.mailbox
        mailbox.put_front(_eager.Resumption(coro, pending, mailbox.wake), wake=False)

    async def run(self) -> None:
        mailbox = self.mailbox
        streak = 0
        while True:
            if mailbox.empty():
                streak = 0
            else:
                # get() will not suspend: let the other tasks of the loop run
                # now and then, even if no message of a backlog ever suspends
                # (memory:// commits do not).
                streak += 1
                if streak % _FAIR_SHARE == 0:
                    await asyncio.sleep(0)
            try:
                item = await mailbox.get()
            except asyncio.CancelledError as exc:
                # Cancelled after a message that began in its caller's task
                # was handed over, before taking it: it is that message
                # that the cancellation reaches, as it would have here.
                item = mailbox.front()
                if not isinstance(item, _eager.Resumption):
                    raise
                mailbox.get_nowait()
                item.interrupt(exc)
            if item is None:
                return
            if isinstance(item, _eager.Resumption):
                await item
                continue
            func, args, kwargs, future, force = item
            if force:
                self.sync_queued = False
            if not future.cancelled():
                await self.deliver(func, args, kwargs, future, force)

    async def deliver(self, func: Callable[..., Coroutine[Any, Any, Any]],
                      args: tuple[Any, ...], kwargs: dict[str, Any],
                      future: asyncio.Future[Any], force: bool) -> None:
        """Run one message and settle its caller's future with the outcome."""
        try:
            result = await self.transaction(func, args, kwargs, force=force)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # the worker itself is cancelled
                future.cancel()
                raise
            if not future.done():  # the actor's own code was cancelled
                future.set_exception(exc)
        except BaseException as exc:  # handed to the caller, whatever it is
            if not future.done():
                future.set_exception(exc)
        else:
            if not future.done():
                future.set_result(result)

    # -- the transaction -------------------------------------------------------

    async def transaction(self, func: Callable[..., Coroutine[Any, Any, Any]],
                          args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None, *,
                          force: bool = False) -> Any:
        if self.needs_reload:
            await self.reload()
        plug = self.plug
        if not plug.begin_now():
            await plug.begin()
        marker = self.current = object()
        token = _running.set(marker)
        try:
            try:
                result = await (func(*args, **kwargs) if kwargs else func(*args))
            finally:
                _running.reset(token)
                self.current = None
            state = self.actor.state
            if not isinstance(state, dict):
                raise InvalidTypeError(
                    f"state of actor {self.name!r} must be a dict, got {type(state).__name__}")
            try:
                state_bytes = orjson.dumps(state)
            except TypeError as exc:
                _check_state(self.name, state)
                raise InvalidTypeError(
                    f"state of actor {self.name!r} is not JSON data: {exc}") from None
            if state_bytes != self.state_bytes:
                # orjson writes datetimes, UUIDs, enums... and NaN (as null):
                # the state must hold what a map value may hold, nothing that
                # would come back changed after a restart.
                _check_state(self.name, state)
            # A message that changed nothing (the most common kind: reads)
            # stops here, with no change set to prepare.
            if not force and state_bytes == self.state_bytes and plug.unchanged():
                return result
            prepared = plug.prepare_now()
            if prepared is None:
                prepared = await plug.prepare()
            if not force and prepared.is_empty and state_bytes == self.state_bytes:
                if not plug.committed_now():
                    await plug.committed()
                return result
            self.seq += 1
            txid = txid_of(self.epoch, self.seq)
            # The state goes in as the JSON just checked, not encoded again.
            checkpoint = {"txid": txid, "state": orjson.Fragment(state_bytes),
                          "maps": prepared.maps}
            await self.commit(txid, checkpoint, prepared.refs, prepared.creates,
                              prepared.deletes)
        except BaseException as exc:
            self.node._aborts += 1
            notify(self.node.observer, "on_abort", self.name, exc)
            self.actor.state = orjson.loads(self.state_bytes)
            await plug.abort()
            raise
        self.state_bytes = state_bytes
        self.txid = txid
        if not plug.committed_now():
            await plug.committed()
        return result

    async def commit(self, txid: str, checkpoint: dict[str, Any],
                     refs: Mapping[str, MapRef], creates: Sequence[MapCreate],
                     deletes: Sequence[str] = ()) -> None:
        node = self.node
        started = time.perf_counter()
        try:
            await node.service.commit(
                actor=self.name, node_id=node.node_id, txid=txid, prev_txid=self.txid,
                checkpoint=checkpoint, lease_ttl=node.lease_ttl, refs=refs, creates=creates,
                deletes=deletes)
        except LeaseLostError:
            node._commit_failures += 1
            node._lost(self.name)
            raise
        except (BackendError, ConcurrentUpdateError):
            node._commit_failures += 1
            # The backend may hold this commit (or a newer state) after all.
            self.needs_reload = True
            raise
        seconds = time.perf_counter() - started
        node._commit_latency.observe(seconds)
        node._commits += 1
        if node.observed:
            notify(node.observer, "on_commit", self.name, txid, seconds)

    async def reload(self) -> None:
        """After a commit whose outcome is unknown: take state, registrations
        and maps from the backend if it moved on (this node's commit landed,
        or another node committed); keep them if it holds what this node
        holds, or went back (the next commit re-asserts them)."""
        service = self.node.service
        checkpoint = await service.load_checkpoint(self.name)
        stored = None if checkpoint is None else checkpoint.get("txid")
        relation = service.relation(self.name, stored if isinstance(stored, str) else None,
                                    self.txid)
        if relation == "foreign":
            self.actor.log.warning("actor %s: another node committed (%s) since this node's "
                                   "last commit (%s): taking its state", self.name, stored,
                                   self.txid)
            # A new stay: this node's earlier commits are no longer the chain's head.
            self.epoch, self.seq = uuid.uuid4().hex[:16], 0
            service.host_actor(self.name, self.epoch, stored if isinstance(stored, str) else None)
        maps = None
        if checkpoint is not None and relation in ("ahead", "foreign"):
            maps = self.restore_state(checkpoint)
        if relation != "behind":
            await self.plug.refresh(maps)
        self.needs_reload = False

    def request_sync(self) -> None:
        """Commit once soon even if nothing changed: the store lost this
        actor's last commits and the commit puts them back."""
        if self.sync_queued:
            return
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            self.mailbox.put_nowait((_nothing, (), {}, future, True))
        except asyncio.QueueFull:
            future.cancel()  # a busy actor commits soon anyway
            return
        self.sync_queued = True

    def restore_state(self, checkpoint: dict[str, Any]) -> Mapping[str, Any]:
        """Adopt a checkpoint's state and txid; return its map registrations."""
        state, maps = checkpoint.get("state"), checkpoint.get("maps") or {}
        if not isinstance(state, dict) or not isinstance(maps, Mapping):
            raise SharingError(f"checkpoint of actor {self.name!r} is malformed")
        self.state_bytes = orjson.dumps(state)
        self.actor.state = state
        txid = checkpoint.get("txid")
        self.txid = txid if isinstance(txid, str) else None
        return maps

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        service = self.node.service
        checkpoint = await service.load_checkpoint(self.name)
        if checkpoint is None:
            service.host_actor(self.name, self.epoch, None)
            self.actor.state = {}
            await self.transaction(self.actor.init, force=True)
        else:
            self.plug.restore(self.restore_state(checkpoint))
            service.host_actor(self.name, self.epoch, self.txid)
            await self.transaction(self.actor.resume)
        # The worker's context is the caller's as init/resume left it.
        self.context = contextvars.copy_context()
        self.worker = asyncio.get_running_loop().create_task(
            self.run(), name=f"caf-sharing actor {self.name}", context=self.context)

    async def stop(self) -> None:
        """Finish the queued messages, then let go of the maps."""
        self.stopping = True
        if self.worker is not None and not self.worker.done():
            await self.mailbox.put(None)
        await self.finish()

    async def finish(self) -> None:
        if self.worker is not None:
            await self.worker
        await self.plug.close()
        self.node.service.forget_actor(self.name)

    def kill(self) -> None:
        """Stop at once (the lease is gone): queued messages fail."""
        self.stopping = True
        begun = None
        while not self.mailbox.empty():
            item = self.mailbox.get_nowait()
            if isinstance(item, _eager.Resumption):  # begun: it ends as any begun message
                begun = item
            elif item is not None and not item[3].done():
                item[3].set_exception(ActorStoppedError(
                    f"actor {self.name!r} stopped: node {self.node.node_id!r} lost its lease"))
        self.mailbox.put_nowait(None)
        if begun is not None:
            self.mailbox.put_front(begun)


class _Notifications:
    """Delivers an actor's ``on_change`` notifications through its mailbox.

    Coalesced per alias: while one is queued and its message has not begun,
    further changes of that alias queue nothing (the message begins with the
    newest snapshots anyway). Its message reports the version it sees, and
    queues another at once if the map moved on while it began; one for a map
    that is missing calls nothing (the plug asks again later). A full
    mailbox never fails or blocks the replica that notifies: the notification
    waits for room in a task of its own (one per alias at most), and so goes
    in as soon as the actor takes its next message.
    """

    def __init__(self, host: _Host) -> None:
        self._host = host
        # Alias -> the future of its queued notification that has not begun.
        self._queued: dict[str, asyncio.Future[Any]] = {}
        self._waiting: dict[str, asyncio.Task[None]] = {}
        self._later: dict[str, asyncio.TimerHandle] = {}

    def check(self, method: str) -> None:
        try:
            self._host._method(method)
        except UnknownActorMethodError as exc:
            raise UnknownActorMethodError(f"on_change refused: {exc}") from None

    def notify(self, alias: str) -> None:
        host = self._host
        if host.stopping or alias in self._queued:
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        future.add_done_callback(partial(self._done, alias))
        item: _Message = (self._deliver, (alias,), {}, future, False)
        self._queued[alias] = future
        try:
            host.mailbox.put_nowait(item)
        except asyncio.QueueFull:
            task = loop.create_task(host.mailbox.put(item),
                                    name=f"caf-sharing notify {host.name} {alias}")
            self._waiting[alias] = task
            task.add_done_callback(lambda _: self._waiting.pop(alias, None))

    def notify_later(self, alias: str, delay: float) -> None:
        if alias in self._later or self._host.stopping:
            return
        self._later[alias] = asyncio.get_running_loop().call_later(
            delay, self._due, alias)

    def _due(self, alias: str) -> None:
        del self._later[alias]
        self.notify(alias)

    async def _deliver(self, alias: str) -> None:
        plug = self._host.plug
        self._queued.pop(alias, None)
        method, version = plug.on_change_of(alias), plug.notice_version(alias)
        if method is None or version is None:  # deleted, or missing for now
            return
        if plug.is_stale(alias):  # moved on after this message began
            self.notify(alias)
        await self._host.bound(method)(alias, version)

    def _done(self, alias: str, future: asyncio.Future[Any]) -> None:
        if self._queued.get(alias) is future:  # failed before it began
            del self._queued[alias]
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None and not isinstance(exc, ActorStoppedError):
            self._host.actor.log.error(
                "on_change notification of map alias %r to actor %s failed: %s: %s", alias,
                self._host.name, type(exc).__name__, exc)

    def close(self) -> None:
        for task in list(self._waiting.values()):
            task.cancel()
        for timer in self._later.values():
            timer.cancel()
        self._later.clear()
        self._queued.clear()


async def _nothing() -> None:
    """The body of a sync message."""


def _check_state(actor: str, state: dict[str, Any]) -> None:
    """Raise, naming the path (``state['when']``), unless ``state`` holds only
    what a map value may hold."""
    try:
        SharedMap().ref().set("state", state)
    except (InvalidTypeError, InvalidValueError) as exc:
        # The core names the value "value for key 'state'": say "state" instead.
        why = str(exc).replace("value for key 'state' at ", "state", 1) \
            .replace("value for key 'state'", "state", 1)
        raise type(exc)(f"state of actor {actor!r} is not JSON data: {why}") from None


def _default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Node:
    """Hosts actors on one backend: ``url``, else ``$CAF_SHARING_URL``, else
    ``memory://``.

    ::

        async with Node("memory://") as node:
            admin = await node.start(Hello, "alice-admin")
            await admin.call(Hello.increment)     # or admin.call("increment")

    ``node_id`` (default: unique per process and node) names the node in
    leases: two live nodes with the same ``node_id`` on one backend and app
    would share leases, so ``open`` refuses the second one
    (:class:`~caf_sharing.errors.NodeIdInUseError`); a node that crashed
    keeps its claim on the id for up to ``lease_ttl``.

    ``lease_ttl`` (seconds) bounds how long a crashed node keeps its actors
    from starting elsewhere; leases renew every third of it. Backend options
    (``coalescing_interval``, ``max_pending_updates``, ``max_retries``,
    ``retry_delay``, ``password``...) pass through to :func:`make_backend`.
    """

    def __init__(self, url: str | None = None, *, node_id: str | None = None,
                 app: str = "default", lease_ttl: float = 10.0, mailbox_size: int = 1024,
                 max_updates: int = 100, backend: Backend | None = None,
                 logger: logging.Logger | None = None, method_limits: MethodLimits | None = None,
                 observer: Observer | None = None, **backend_options: Any) -> None:
        if lease_ttl <= 0:
            raise ValueError(f"lease_ttl must be > 0, got {lease_ttl!r}")
        if mailbox_size < 1:
            raise ValueError(f"mailbox_size must be >= 1, got {mailbox_size!r}")
        self.node_id = node_id or _default_node_id()
        self.app = app
        self.lease_ttl = float(lease_ttl)
        self.mailbox_size = mailbox_size
        self.log = logger or logging.getLogger("caf_sharing.node")
        #: Told of commits, aborts, applied change sets, resyncs and lost leases.
        self.observer = observer or Observer()
        #: Whether anything listens (the base class's methods do nothing).
        self.observed = type(self.observer) is not Observer
        self.backend = backend or make_backend(url or default_url(), app=app,
                                               **backend_options)
        #: This node instance, beside its ``node_id``: a second live node
        #: with the same id has another nonce and is refused.
        self.nonce = uuid.uuid4().hex
        self.service = SharingService(self.backend, max_updates=max_updates, logger=self.log,
                                      method_limits=method_limits, observer=self.observer)
        self._hosts: dict[str, _Host] = {}
        #: Messages to idle actors begin in their caller's task, this many a turn.
        self.eager_budget = _eager.Budget()
        self._starting: set[str] = set()
        self._renewer: asyncio.Task[None] | None = None
        self._finishing: set[asyncio.Task[None]] = set()
        self._views: set[ReplicaView] = set()
        self._open = False
        # What stats() reports besides the service's and the backend's counters.
        self._commits = self._aborts = self._commit_failures = 0
        self._lease_renewals = self._leases_lost = 0
        self._commit_latency = LatencySummary()

    async def __aenter__(self) -> Node:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Connect to the backend and start renewing leases."""
        if self._open:
            return
        await self.backend.start()
        try:
            await self.backend.claim_node(self.node_id, self.nonce, self.lease_ttl)
        except BaseException:
            await self.backend.close()
            raise
        self._open = True
        self._renewer = asyncio.get_running_loop().create_task(
            self._renew_leases(), name=f"caf-sharing leases {self.node_id}")
        self.log.debug("node %s open on %s (app %s)", self.node_id, self.backend.url, self.app,
                       extra=self._fields())

    async def close(self) -> None:
        """Stop every actor (finishing queued messages), release leases, disconnect."""
        if not self._open:
            return
        await asyncio.gather(*(view.close() for view in list(self._views)))
        # Together: against an unreachable backend each release takes up to
        # its call timeout, and close() must fit in one lease.
        await asyncio.gather(*(self.stop(name) for name in list(self._hosts)))
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        await asyncio.gather(*self._finishing, return_exceptions=True)
        await self.service.close()
        try:
            await self.backend.release_node(self.node_id, self.nonce)
        except SharingError as exc:
            self.log.warning("could not release node_id %s: %s", self.node_id, exc)
        await self.backend.close()
        self._open = False
        self.log.debug("node %s closed", self.node_id, extra=self._fields())

    async def serve(self) -> signal.Signals:
        """Open the node if needed, run until SIGTERM or SIGINT, then close it
        gracefully: queued messages finish, new ones are refused, the leases
        are released (another node can start the actors at once, not a lease
        TTL later) and the connections closed. The previous signal handlers
        are back afterwards. Returns the signal received. Main thread only
        (asyncio's signal handlers are)."""
        await self.open()
        loop = asyncio.get_running_loop()
        received: asyncio.Future[signal.Signals] = loop.create_future()
        wanted = (signal.SIGTERM, signal.SIGINT)
        previous = {sig: signal.getsignal(sig) for sig in wanted}

        def on_signal(sig: signal.Signals) -> None:
            if not received.done():
                received.set_result(sig)

        installed: list[signal.Signals] = []
        try:
            for sig in wanted:
                loop.add_signal_handler(sig, on_signal, sig)
                installed.append(sig)
            sig = await received
            self.log.info("node %s got %s: closing", self.node_id, sig.name)
            return sig
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
                handler = previous[sig]
                if handler is not None:  # None: set from C, nothing to put back
                    signal.signal(sig, handler)
            await self.close()

    async def destroy(self, name: str) -> bool:
        """Delete everything the backend holds of actor ``name``: its
        checkpoint, its maps (their replicas see them deleted) and its lease.
        Refused with :class:`~caf_sharing.errors.ActorError` when the actor
        runs on this node (``await node.stop(name)`` first: destroying
        under a running actor would be undone by its next commit) and with
        :class:`~caf_sharing.errors.LeaseHeldError` when another node holds
        its lease. ``True`` if anything was stored."""
        if not self._open:
            raise ActorError("node is not open: use 'async with Node(...)' or await node.open()")
        check_actor_name(name)
        if name in self._hosts or name in self._starting:
            raise ActorError(f"actor {name!r} runs on node {self.node_id!r}: stop it first "
                             "(await node.stop(name)), then destroy it")
        return await self.backend.destroy_actor(name)

    async def start(self, actor_class: type[A], name: str) -> ActorHandle[A]:
        """Create ``name`` (running ``init``) or resume it from its checkpoint
        (running ``resume``); the node takes the actor's lease first."""
        if not self._open:
            raise ActorError("node is not open: use 'async with Node(...)' or await node.open()")
        check_actor_name(name)
        if not (isinstance(actor_class, type) and issubclass(actor_class, Actor)):
            raise ActorError(f"{actor_class!r} is not a subclass of caf_sharing.Actor")
        if name in self._hosts or name in self._starting:
            raise ActorError(f"actor {name!r} already runs on node {self.node_id!r}")
        self._starting.add(name)
        try:
            await self.service.acquire_lease(name, self.node_id, self.lease_ttl)
            actor = actor_class()
            actor.name = name
            actor.log = logging.getLogger(f"caf_sharing.actor.{name}")
            host = _Host(self, name, actor)
            actor.sharing = SharingProxy(host.plug)
            try:
                await host.start()
            except BaseException:
                await host.plug.close()
                with contextlib.suppress(SharingError):
                    await self.service.release_lease(name, self.node_id)
                raise
            self._hosts[name] = host
        finally:
            self._starting.discard(name)
        self.log.debug("actor %s started on node %s at commit %s", name, self.node_id,
                       host.txid, extra={**self._fields(name), "txid": host.txid})
        return ActorHandle(host)

    async def replica(self, full_name: str, *, no_exec: bool = False) -> ReplicaView:
        """A read-only view of map ``full_name`` for code outside actors.

        It shares the node's replica of the map with the node's actors and
        reads it with no message (see :class:`~caf_sharing.view.ReplicaView`).
        A map that does not exist yet is looked up again until it does.
        Close the view (``await view.close()`` or ``async with``) to let go of
        the replica; closing the node closes its views.
        """
        if not self._open:
            raise ActorError("node is not open: use 'async with Node(...)' or await node.open()")
        check_map_name(full_name)
        view = ReplicaView(self.service, full_name, no_exec=no_exec,
                           on_close=self._views.discard)
        self._views.add(view)
        try:
            await view._start()
        except BaseException:
            await view.close()
            raise
        return view

    def actor(self, name: str) -> ActorHandle[Actor]:
        """The handle of a running actor."""
        try:
            return ActorHandle(self._hosts[name])
        except KeyError:
            raise ActorError(f"actor {name!r} does not run on node {self.node_id!r}") from None

    @property
    def actors(self) -> list[str]:
        return list(self._hosts)

    async def stop(self, name: str) -> None:
        """Finish the actor's queued messages, release its maps and its lease."""
        host = self._hosts.pop(name, None)
        if host is None:
            raise ActorError(f"actor {name!r} does not run on node {self.node_id!r}")
        await host.stop()
        try:
            await self.service.release_lease(name, self.node_id)
        except SharingError as exc:
            self.log.warning("could not release the lease of %s: %s", name, exc,
                             extra=self._fields(name))
        self.log.debug("actor %s stopped on node %s", name, self.node_id,
                       extra=self._fields(name))

    def _fields(self, actor: str | None = None) -> dict[str, str]:
        """The structured fields of this node's log records (``extra``)."""
        fields = {"node_id": self.node_id, "app": self.app}
        if actor is not None:
            fields["actor"] = actor
        return fields

    def stats(self) -> NodeStats:
        """A snapshot of this node's counters and latencies (see
        :class:`~caf_sharing.metrics.NodeStats`); cheap enough to scrape."""
        service = self.service.stats
        counters = getattr(self.backend, "stats", None)
        backend = {f.name: getattr(counters, f.name) for f in dataclasses.fields(counters)} \
            if dataclasses.is_dataclass(counters) and not isinstance(counters, type) else {}
        return NodeStats(
            node_id=self.node_id, commits=self._commits, aborts=self._aborts,
            commit_failures=self._commit_failures,
            commit_latency=self._commit_latency.snapshot(),
            propagation_lag={name: lag.snapshot()
                             for name, lag in self.service.propagation_lag.items()},
            mailbox_depth={name: host.mailbox.qsize() for name, host in self._hosts.items()},
            retries=backend.get("retries", 0), resyncs=service.resyncs,
            forks_healed=service.forks, reasserts=service.reasserts,
            lease_renewals=self._lease_renewals, leases_lost=self._leases_lost,
            backend=backend)

    def _lost(self, name: str) -> None:
        host = self._hosts.pop(name, None)
        if host is None:
            return
        self.log.error("node %s lost the lease of actor %s: stopping it", self.node_id, name,
                       extra=self._fields(name))
        notify(self.observer, "on_lease_lost", name)
        host.kill()
        self._finishing.add(asyncio.get_running_loop().create_task(host.finish()))

    async def _renew_leases(self) -> None:
        interval = self.lease_ttl / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self.backend.claim_node(self.node_id, self.nonce, self.lease_ttl)
            except SharingError as exc:
                self.log.error("renewing the claim on node_id %s failed: %s", self.node_id, exc)
            names = list(self._hosts)
            if not names:
                continue
            try:
                lost = await self.service.renew_leases(names, self.node_id, self.lease_ttl)
            except ShardUnavailableError as exc:
                # One shard down: the actors of the others renewed, and those
                # of them that lost their lease must stop all the same.
                self.log.warning("lease renewal failed (%s); retrying in %.1fs", exc, interval,
                                 extra=self._fields())
                lost = exc.partial
                names = [name for name in names if name not in exc.failed]
            except SharingError as exc:
                self.log.warning("lease renewal failed (%s); retrying in %.1fs", exc, interval,
                                 extra=self._fields())
                continue
            self._lease_renewals += 1
            self._leases_lost += len(lost)
            for name in lost:
                self._lost(name)
            # A commit that lands while the read is on its way makes the store
            # look one commit behind: compare only actors that made none.
            before = {name: host.txid for name, host in self._hosts.items()}
            try:
                stored = await self.service.load_txids(names)
            except SharingError as exc:
                self.log.warning("reading the stored txids failed (%s); retrying in %.1fs",
                                 exc, interval)
                continue
            for name, txid in zip(names, stored, strict=True):
                host = self._hosts.get(name)
                if host is not None and not host.needs_reload and \
                        host.txid == before.get(name) and \
                        self.service.relation(name, txid, host.txid) == "behind":
                    self.log.warning("the store went back on actor %s (it holds commit %s, "
                                     "this node made %s since): syncing it", name, txid,
                                     host.txid, extra={**self._fields(name), "txid": txid})
                    host.request_sync()
