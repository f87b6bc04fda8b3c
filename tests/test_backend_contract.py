"""The backend contract (backends/base.py), checked on every backend.

Each test runs on ``memory://`` and on a real redis-server started by the
suite. Two backends from one ``backend_factory`` share a store, like two
nodes of one application.

The commits of an actor form a chain: each names the txid of the one before
as ``prev_txid`` (``None`` only while the actor has no checkpoint), as the
sharing service does; a commit that breaks the chain is refused.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any

import orjson
import pytest

from caf_sharing import FrozenList
from caf_sharing.backends import Backend, MapCreate, MapWrite, Transaction, make_backend
from caf_sharing.backends.base import RECENT_TXIDS, MapRestore
from caf_sharing.errors import (
    BackendUnavailableError,
    ChainError,
    ConcurrentUpdateError,
    InvalidChangeSetError,
    InvalidNameError,
    LeaseHeldError,
    LeaseLostError,
    MapMissingError,
    NodeIdInUseError,
)

ACTOR = "alice-admin"
MAP = "alice-admin-x"
MAP2 = "alice-admin-y"
NODE = "node1"
OTHER = "node2"
V = "__ca_version__"


def changes(base: int, add: dict[str, Any] | None = None,
            remove: Sequence[str] = ()) -> dict[str, Any]:
    flat: list[Any] = []
    for key, value in (add or {}).items():
        flat += [key, value]
    return {"version": base, "remove": list(remove), "add": [*flat, V, base + 1]}


def dump(version: int, items: dict[str, Any]) -> dict[str, Any]:
    flat: list[Any] = []
    for key, value in items.items():
        flat += [key, value]
    return {"version": 0, "remove": [], "add": [*flat, V, version]}


def as_dict(d: dict[str, Any] | None) -> dict[str, Any]:
    """A dump's pairs as a dict (dumps list keys in no particular order)."""
    assert d is not None
    assert d["version"] == 0 and d["remove"] == []
    add = d["add"]
    assert add[-2] == V, "the version pair ends a dump"
    return dict(zip(add[::2], add[1::2], strict=True))


def tx(txid: str, *, writes: Sequence[MapWrite] = (), creates: Sequence[MapCreate] = (),
       restores: Sequence[MapRestore] = (), reassert: bool = False,
       prev: str | None = None, node: str = NODE, actor: str = ACTOR,
       state: Any = None, ttl: float = 10.0, deletes: Sequence[str] = ()) -> Transaction:
    return Transaction(actor=actor, node_id=node, txid=txid, prev_txid=prev,
                       checkpoint={"txid": txid, "state": state, "maps": [MAP]},
                       lease_ttl=ttl, writes=tuple(writes), creates=tuple(creates),
                       restores=tuple(restores), reassert=reassert, deletes=tuple(deletes))


def published(raw: bytes) -> dict[str, Any]:
    """A published change set without the commit time it carries (checked:
    microseconds since the epoch, within the last minute)."""
    message: dict[str, Any] = orjson.loads(raw)
    stamp = message.pop("ts")
    assert isinstance(stamp, int) and 0 <= time.time() - stamp / 1e6 < 60
    return message


OFF_CHAIN = "does not follow this node's commits of actor 'alice-admin'"


class Inbox:
    """A subscription handler that records what it gets, and where."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.tasks: list[asyncio.Task[Any] | None] = []
        self._arrived = asyncio.Event()

    def __call__(self, payload: bytes) -> None:
        self.messages.append(payload)
        self.tasks.append(asyncio.current_task())
        self._arrived.set()

    def versions(self) -> list[int]:
        out = []
        for raw in self.messages:
            add = orjson.loads(raw)["add"]
            out.append(add[add.index(V) + 1])
        return out

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[bytes]:
        async with asyncio.timeout(timeout):
            while len(self.messages) < count:
                self._arrived.clear()
                await self._arrived.wait()
        return self.messages


async def setup_map(backend: Backend, name: str = MAP, initial: dict[str, Any] | None = None,
                    node: str = NODE) -> None:
    await backend.acquire_lease(ACTOR, node, 10.0)
    await backend.create_map(name, initial)


async def advance(backend: Backend, base: int, to: int, *, prev: str | None = None,
                  name: str = MAP, prefix: str = "t") -> str | None:
    """Commit one change set per version, from ``base`` up to ``to``, as the
    chain of txids ``{prefix}{base}`` ... that follows ``prev``; return the
    last txid committed."""
    for v in range(base, to):
        txid = f"{prefix}{v}"
        assert await backend.commit(tx(txid, prev=prev, writes=[
            MapWrite(name, changes(v, {"n": v + 1}))]))
        prev = txid
    return prev


# -- maps ------------------------------------------------------------------------


async def test_create_read_delete(backend: Backend) -> None:
    assert await backend.read_map(MAP) is None
    created = await backend.create_map(MAP)
    assert created == {"version": 0, "remove": [], "add": [V, 0], "txid": None}
    assert await backend.read_map(MAP) == created
    assert await backend.delete_map(MAP) is True
    assert await backend.read_map(MAP) is None
    assert await backend.delete_map(MAP) is False


async def test_read_maps_reads_maps_of_one_owner_together(backend: Backend) -> None:
    await backend.acquire_lease(ACTOR, NODE, 10.0)
    await backend.create_map(MAP)
    assert await backend.commit(tx("t1", writes=[MapWrite(MAP, changes(0, {"a": 1}))]))
    both = await backend.read_maps([MAP, MAP2])
    assert both == {MAP: await backend.read_map(MAP), MAP2: None}
    assert both[MAP] is not None and both[MAP]["txid"] == "t1"
    assert await backend.read_maps([]) == {}
    with pytest.raises(ValueError, match="maps of one owner"):
        await backend.read_maps([MAP, "bob-admin-x"])


async def test_read_maps_leaves_out_maps_held_as_stored(backend: Backend) -> None:
    await backend.acquire_lease(ACTOR, NODE, 10.0)
    await backend.create_map(MAP)
    await backend.create_map(MAP2)
    assert await backend.commit(tx("t1", writes=[MapWrite(MAP, changes(0, {"a": 1})),
                                                 MapWrite(MAP2, changes(0, {"b": 1}))]))
    both = await backend.read_maps([MAP, MAP2])
    missing = f"{ACTOR}-gone"
    # Held at the stored version and txid: left out; at another, or a map
    # the store does not have: read as without it.
    assert await backend.read_maps([MAP, MAP2, missing], {MAP: (1, "t1"), missing: (3, "t0")}) \
        == {MAP2: both[MAP2], missing: None}
    for stale in ((0, "t1"), (1, "t0"), (1, None)):
        assert await backend.read_maps([MAP, MAP2], {MAP: stale}) == both
    assert await backend.read_maps([MAP, MAP2], {MAP: (1, "t1"), MAP2: (1, "t1")}) == {}


@pytest.mark.parametrize(("known", "error"), [
    ([(MAP, (1, "t1"))], "known must map map names"),
    ({MAP: 1}, r"known\['alice-admin-x'\] must be \(version, txid or None\), got 1"),
    ({MAP: (1, "t1", 2)}, "got"),
    ({MAP: ("1", "t1")}, "got"),
    ({MAP: (-1, "t1")}, "got"),
    ({MAP: (2**53, "t1")}, "got"),
    ({MAP: (True, "t1")}, "got"),
    ({MAP: (1, b"t1")}, "got"),
])
async def test_read_maps_refuses_a_bad_known(backend: Backend, known: Any, error: str) -> None:
    await backend.create_map(MAP)
    with pytest.raises((TypeError, ValueError), match=error):
        await backend.read_maps([MAP], known)
    assert await backend.read_maps([MAP], {}) == {MAP: await backend.read_map(MAP)}


async def test_create_with_initial_keeps_an_existing_map(backend: Backend) -> None:
    items = {"a": 1, "b": [1, 2, {"c": None}], "s": "é", "f": 1.5, "t": True}
    created = await backend.create_map(MAP, dump(0, items))
    assert as_dict(created) == {**items, V: 0}
    again = await backend.create_map(MAP, dump(0, {"other": 2}))
    assert as_dict(again) == {**items, V: 0}
    assert as_dict(await backend.read_map(MAP)) == {**items, V: 0}


async def test_create_with_an_initial_version(backend: Backend) -> None:
    created = await backend.create_map(MAP, dump(9, {"a": 1}))
    assert as_dict(created) == {"a": 1, V: 9}


async def test_values_are_copied_not_aliased(backend: Backend) -> None:
    initial = dump(0, {"l": [1, 2]})
    await backend.create_map(MAP, initial)
    initial["add"][1].append(3)
    first = await backend.read_map(MAP)
    assert as_dict(first)["l"] == [1, 2]
    # What a read gives is frozen (a replica keeps it as it is): nothing can
    # change it, the store's copy included.
    assert isinstance(as_dict(first)["l"], FrozenList)
    with pytest.raises(TypeError, match="immutable"):
        as_dict(first)["l"].append(4)
    assert as_dict(await backend.read_map(MAP))["l"] == [1, 2]


async def test_bad_arguments_are_refused_and_change_nothing(backend: Backend) -> None:
    with pytest.raises(InvalidNameError):
        await backend.create_map("no-dashes")
    with pytest.raises(InvalidChangeSetError, match="version 0"):
        await backend.create_map(MAP, {"version": 3, "remove": [], "add": []})
    with pytest.raises(InvalidChangeSetError, match="key"):
        await backend.create_map(MAP, {"version": 0, "remove": [], "add": [1, 2]})
    with pytest.raises(InvalidChangeSetError, match="not JSON data"):
        await backend.create_map(MAP, {"version": 0, "remove": [], "add": ["k", object()]})
    assert await backend.read_map(MAP) is None
    with pytest.raises(ValueError, match="ttl"):
        await backend.acquire_lease(ACTOR, NODE, 0)
    with pytest.raises(InvalidNameError):
        await backend.load_checkpoint("bad")


# -- commits -------------------------------------------------------------------


async def test_commit_applies_changes_and_stores_the_checkpoint(backend: Backend) -> None:
    await setup_map(backend, initial=dump(0, {"gone": 1, "kept": 2}))
    assert await backend.load_checkpoint(ACTOR) is None
    state = {"count": 3, "nested": {"l": [1, "x", None]}}
    assert await backend.commit(tx("t1", state=state, writes=[
        MapWrite(MAP, changes(0, {"new": {"deep": [1]}, "kept": 20}, remove=["gone"]))]))
    assert as_dict(await backend.read_map(MAP)) == {"kept": 20, "new": {"deep": [1]}, V: 1}
    assert await backend.load_checkpoint(ACTOR) == {"txid": "t1", "state": state,
                                                     "maps": [MAP]}
    # A commit without map writes stores the checkpoint only.
    assert await backend.commit(tx("t2", prev="t1", state={"count": 4}))
    cp = await backend.load_checkpoint(ACTOR)
    assert cp is not None and cp["txid"] == "t2" and cp["state"] == {"count": 4}
    assert as_dict(await backend.read_map(MAP))[V] == 1


async def test_version_without_version_pair_is_base_plus_one(backend: Backend) -> None:
    await setup_map(backend)
    assert await backend.commit(tx("t1", writes=[
        MapWrite(MAP, {"version": 0, "remove": [], "add": ["a", 1]})]))
    assert as_dict(await backend.read_map(MAP)) == {"a": 1, V: 1}


async def test_versions_compare_as_numbers(backend: Backend) -> None:
    # Caf.js compared versions as strings: "10" < "9". Cross 9/10 and 99/100.
    await setup_map(backend, initial=dump(8, {}))
    last = await advance(backend, 8, 12)
    assert as_dict(await backend.read_map(MAP))[V] == 12
    for stale in (9, 11, 100):
        with pytest.raises(ConcurrentUpdateError) as info:
            await backend.commit(tx(f"s{stale}", prev=last, writes=[
                MapWrite(MAP, changes(stale))]))
        assert (info.value.name, info.value.expected, info.value.current) == (MAP, stale, 12)
    # A change set makes exactly base + 1 (a jump is refused): walk to 102.
    with pytest.raises(InvalidChangeSetError, match=r"is not its base version 12 \+ 1"):
        await backend.commit(tx("jump", prev=last, writes=[MapWrite(MAP, {
            "version": 12, "remove": [], "add": ["n", 0, V, 98]})]))
    last = await advance(backend, 12, 102, prev=last, prefix="u")
    assert as_dict(await backend.read_map(MAP)) == {"n": 102, V: 102}
    with pytest.raises(ConcurrentUpdateError) as info:
        await backend.commit(tx("s99", prev=last, writes=[MapWrite(MAP, changes(99))]))
    assert (info.value.name, info.value.expected, info.value.current) == (MAP, 99, 102)


async def test_stale_change_set_stores_and_publishes_nothing(backend: Backend) -> None:
    await setup_map(backend)
    inbox = Inbox()
    await backend.subscribe(MAP, inbox)
    last = await advance(backend, 0, 2)
    await inbox.wait_for(2)
    with pytest.raises(ConcurrentUpdateError) as info:
        await backend.commit(tx("stale", prev=last, state="stale", writes=[
            MapWrite(MAP, changes(1, {"bad": 1}))]))
    assert info.value.name == MAP
    cp = await backend.load_checkpoint(ACTOR)
    assert cp is not None and cp["txid"] == "t1"
    assert "bad" not in as_dict(await backend.read_map(MAP))
    await advance(backend, 2, 3, prev=last)
    await inbox.wait_for(3)
    assert inbox.versions() == [1, 2, 3]


async def test_commit_off_the_chain_is_refused_and_changes_nothing(backend: Backend) -> None:
    await setup_map(backend)  # NODE holds the lease throughout
    await backend.create_map(MAP2)
    inbox = Inbox()
    await backend.subscribe(MAP, inbox)
    await backend.subscribe(MAP2, inbox)
    assert await backend.commit(tx("t1", state=1, writes=[MapWrite(MAP, changes(0, {"a": 1}))]))
    await inbox.wait_for(1)
    new_map = "alice-admin-z"
    # Every check but the chain would pass: versions, maps and lease are right.
    for prev in ("t0", "elsewhere", None):
        with pytest.raises(ChainError, match=OFF_CHAIN) as info:
            await backend.commit(tx("t2", prev=prev, state=2, creates=[MapCreate(new_map)],
                                    writes=[MapWrite(MAP, changes(1, {"a": 2})),
                                            MapWrite(MAP2, changes(0, {"b": 2}))]))
        assert info.value.name == ACTOR and isinstance(info.value, ChainError)
        assert info.value.stored_txid == "t1"  # the stored txid the commit had to follow
        assert "'t1'" in str(info.value)
    assert await backend.load_checkpoint(ACTOR) == {"txid": "t1", "state": 1, "maps": [MAP]}
    assert as_dict(await backend.read_map(MAP)) == {"a": 1, V: 1}
    assert as_dict(await backend.read_map(MAP2)) == {V: 0}
    assert await backend.read_map(new_map) is None
    with pytest.raises(LeaseHeldError):  # the refusals left the lease alone
        await backend.acquire_lease(ACTOR, OTHER, 1.0)
    # t2 was not recorded either: sent on the chain, it is a new commit.
    assert await backend.commit(tx("t2", prev="t1", state=2, writes=[
        MapWrite(MAP2, changes(0, {"b": 2}))]))
    await inbox.wait_for(2)
    await asyncio.sleep(0.02)  # time for a stray refused change set to show up
    assert [published(m) for m in inbox.messages] == [changes(0, {"a": 1}),
                                                      changes(0, {"b": 2})]


async def test_retried_txid_returns_false_and_applies_nothing_twice(backend: Backend) -> None:
    await setup_map(backend)
    inbox = Inbox()
    await backend.subscribe(MAP, inbox)
    first = tx("t1", writes=[MapWrite(MAP, changes(0, {"a": 1}))])
    assert await backend.commit(first) is True
    assert await backend.commit(first) is False
    second = tx("t2", prev="t1", writes=[MapWrite(MAP, changes(1, {"a": 2}))])
    assert await backend.commit(second) is True
    # The stored checkpoint is t2 now, so the retry's prev "t1" no longer
    # follows it: the duplicate check answers before the chain check.
    assert await backend.commit(second) is False
    # Even a retry that would now fail every other check reports the earlier
    # success: another node, a stale version, no prev at all.
    assert await backend.commit(tx("t2", node=OTHER, writes=[
        MapWrite(MAP, changes(5, {"a": 3}))])) is False
    # An earlier txid of the chain is recognised too (its reply was lost and
    # the node retried after later commits)...
    assert await backend.commit(first) is False
    assert as_dict(await backend.read_map(MAP)) == {"a": 2, V: 2}
    cp = await backend.load_checkpoint(ACTOR)
    assert cp is not None and cp["txid"] == "t2"
    await advance(backend, 2, 3, prev="t2", prefix="next")
    await inbox.wait_for(3)
    await asyncio.sleep(0.02)  # time for a stray extra delivery to show up
    assert inbox.versions() == [1, 2, 3]
    # ... as long as it is one of the last RECENT_TXIDS: older, it is a new
    # commit, off the chain.
    last = await advance(backend, 3, 3 + RECENT_TXIDS, prev="next2", prefix="more")
    with pytest.raises(ChainError) as info:
        await backend.commit(first)
    assert info.value.name == ACTOR and info.value.stored_txid == last
    # A retry of next2, as its node sent it: still in the window.
    assert await backend.commit(tx("next2", prev="t2")) is False


async def test_one_bad_write_makes_the_whole_transaction_fail(backend: Backend) -> None:
    await setup_map(backend)
    await backend.create_map(MAP2)
    assert await advance(backend, 0, 1) == "t0"
    inbox = Inbox()
    await backend.subscribe(MAP, inbox)
    await backend.subscribe(MAP2, inbox)
    new_map = "alice-admin-z"
    bad = tx("bad", prev="t0", state="bad", creates=[MapCreate(new_map)], writes=[
        MapWrite(MAP, changes(1, {"a": 1})),     # fine
        MapWrite(MAP2, changes(3, {"b": 1})),    # stale: MAP2 is at 0
    ])
    with pytest.raises(ConcurrentUpdateError) as info:
        await backend.commit(bad)
    assert info.value.name == MAP2
    missing = tx("missing", prev="t0", writes=[
        MapWrite(MAP, changes(1, {"a": 1})),
        MapWrite("alice-admin-gone", changes(0, {"c": 1})),
    ])
    with pytest.raises(MapMissingError) as missing_info:
        await backend.commit(missing)
    assert missing_info.value.names == ["alice-admin-gone"]
    assert as_dict(await backend.read_map(MAP)) == {"n": 1, V: 1}
    assert as_dict(await backend.read_map(MAP2)) == {V: 0}
    assert await backend.read_map(new_map) is None
    cp = await backend.load_checkpoint(ACTOR)
    assert cp is not None and cp["txid"] == "t0"
    assert await backend.commit(tx("good", prev="t0", writes=[
        MapWrite(MAP2, changes(0, {"ok": 1}))]))
    await inbox.wait_for(1)
    assert inbox.versions() == [1] and b'"ok"' in inbox.messages[0]


def lineage_changes(base: int, txid: str, base_txid: str | None,
                    add: dict[str, Any], remove: Sequence[str] = ()) -> dict[str, Any]:
    return {**changes(base, add, remove), "txid": txid, "base_txid": base_txid}


@pytest.mark.parametrize("refusal", ["version", "lineage"])
async def test_one_refused_map_of_sixteen_changes_no_map(backend: Backend,
                                                         refusal: str) -> None:
    names = [f"{ACTOR}-m{i}" for i in range(16)]
    await backend.acquire_lease(ACTOR, NODE, 10.0)
    assert await backend.commit(tx("t0", creates=[MapCreate(n, dump(0, {"old": 0}))
                                                  for n in names]))
    assert await backend.commit(tx("t1", prev="t0", writes=[
        MapWrite(n, lineage_changes(0, "t1", "t0", {"a": 1})) for n in names]))
    inbox = Inbox()
    for name in names:
        await backend.subscribe(name, inbox)
    writes = [MapWrite(n, lineage_changes(1, "t2", "t1", {"a": 2, f"k{i}": i}, ["old"]))
              for i, n in enumerate(names)]
    bad = lineage_changes(0 if refusal == "version" else 1, "t2",
                          "t1" if refusal == "version" else "elsewhere", {"bad": 1})
    writes[9] = MapWrite(names[9], bad)
    with pytest.raises(ConcurrentUpdateError) as info:
        await backend.commit(tx("t2", prev="t1", state="bad", writes=writes))
    assert info.value.name == names[9]
    for name in names:
        stored = await backend.read_map(name)
        assert as_dict(stored) == {"old": 0, "a": 1, V: 1} and stored["txid"] == "t1"
    cp = await backend.load_checkpoint(ACTOR)
    assert cp is not None and cp["txid"] == "t1"
    # Nothing was recorded: the same commit with the good change set goes through.
    writes[9] = MapWrite(names[9], lineage_changes(1, "t2", "t1", {"a": 2}, ["old"]))
    assert await backend.commit(tx("t2", prev="t1", writes=writes))
    messages = await inbox.wait_for(16)
    await asyncio.sleep(0.02)  # time for a stray refused change set to show up
    assert sorted(published(m)["add"][1] for m in messages) == [2] * 16
    for i, name in enumerate(names):
        stored = await backend.read_map(name)
        expected = {"a": 2, V: 2} if i == 9 else {"a": 2, f"k{i}": i, V: 2}
        assert as_dict(stored) == expected and stored["txid"] == "t2"


async def test_a_commit_of_thousands_of_maps(backend: Backend) -> None:
    # Past Lua's unpack() limit: the script must chunk its per-map batches
    # (the lineage of every written map is read and written in one call).
    names = [f"{ACTOR}-m{i}" for i in range(4100)]
    await backend.acquire_lease(ACTOR, NODE, 10.0)
    assert await backend.commit(tx("t1", creates=[MapCreate(n) for n in names], writes=[
        MapWrite(n, lineage_changes(0, "t1", None, {"i": i})) for i, n in enumerate(names)]))
    stale = "t0"  # the lineage the store holds for every map is t1: all refused
    with pytest.raises(ConcurrentUpdateError):
        await backend.commit(tx("t2", prev="t1", writes=[
            MapWrite(n, lineage_changes(1, "t2", stale if n == names[-1] else "t1", {}))
            for n in names]))
    assert await backend.commit(tx("t2", prev="t1", writes=[
        MapWrite(n, lineage_changes(1, "t2", "t1", {"j": i})) for i, n in enumerate(names)]))
    stored = await backend.read_maps([names[0], names[4099]])
    assert as_dict(stored[names[0]]) == {"i": 0, "j": 0, V: 2}
    assert as_dict(stored[names[4099]]) == {"i": 4099, "j": 4099, V: 2}
    assert stored[names[4099]]["txid"] == "t2"


async def test_invalid_transactions_are_refused_before_anything_is_stored(
        backend: Backend) -> None:
    await setup_map(backend)
    bad_cases: list[tuple[Transaction, type[Exception], str]] = [
        (tx("a", writes=[MapWrite("bob-admin-x", changes(0))]), InvalidChangeSetError,
         "owned by 'bob-admin'"),
        (tx("b", writes=[MapWrite(MAP, {"version": -1, "remove": [], "add": []})]),
         InvalidChangeSetError, "version"),
        (tx("c", writes=[MapWrite(MAP, {"version": 0, "remove": [V], "add": []})]),
         InvalidChangeSetError, "reserved"),
        (tx("d", writes=[MapWrite(MAP, {"version": 3, "remove": [], "add": [V, 3]})]),
         InvalidChangeSetError, "is not its base version 3 [+] 1"),
        (tx("e", writes=[MapWrite(MAP, changes(0)), MapWrite(MAP, changes(1))]), ValueError,
         "more than once"),
        (tx("f", writes=[MapWrite(MAP, changes(0), full=dump(7, {}))]), InvalidChangeSetError,
         "full dump"),
        (tx("g", ttl=-1), ValueError, "ttl"),
        (tx("h", actor="nodash"), InvalidNameError, "actor"),
    ]
    for bad, error, match in bad_cases:
        with pytest.raises(error, match=match):
            await backend.commit(bad)
    assert await backend.load_checkpoint(ACTOR) is None
    assert as_dict(await backend.read_map(MAP)) == {V: 0}


async def test_create_and_write_in_one_transaction(backend: Backend) -> None:
    await backend.acquire_lease(ACTOR, NODE, 10.0)
    assert await backend.commit(tx("t1", creates=[MapCreate(MAP, dump(0, {"a": 1}))], writes=[
        MapWrite(MAP, changes(0, {"b": 2}))]))
    assert as_dict(await backend.read_map(MAP)) == {"a": 1, "b": 2, V: 1}
    # A create of an existing map leaves it alone.
    assert await backend.commit(tx("t2", prev="t1", creates=[MapCreate(MAP)]))
    assert as_dict(await backend.read_map(MAP)) == {"a": 1, "b": 2, V: 1}


async def test_map_stamp_is_the_version_and_the_commit_that_made_it(backend: Backend) -> None:
    stamp = backend.map_stamp  # type: ignore[attr-defined]  # optional, both offer it
    assert await stamp(MAP) is None
    await backend.acquire_lease(ACTOR, NODE, 10.0)
    assert await backend.commit(tx("t1", creates=[MapCreate(MAP, dump(3, {"a": 1}))]))
    assert await stamp(MAP) == (3, "t1")
    # A create of an existing map leaves it, and its stamp, alone.
    assert await backend.commit(tx("t2", prev="t1", creates=[MapCreate(MAP, dump(1, {}))]))
    assert await stamp(MAP) == (3, "t1")
    assert await backend.commit(tx("t3", prev="t2", writes=[MapWrite(MAP, changes(3, {"b": 2}))]))
    assert await stamp(MAP) == (4, "t3")
    await backend.delete_map(MAP)
    assert await stamp(MAP) is None
    await backend.create_map(MAP2)
    assert await stamp(MAP2) == (0, None)


async def test_missing_map_then_retry_with_full_recreates_it(backend: Backend) -> None:
    await setup_map(backend, initial=dump(0, {"a": 1}))
    last = await advance(backend, 0, 3)
    await backend.delete_map(MAP)  # as if the backend lost its data
    inbox = Inbox()
    await backend.subscribe(MAP, inbox)
    write = MapWrite(MAP, changes(3, {"b": 2}))
    with pytest.raises(MapMissingError) as info:
        await backend.commit(tx("t3", prev=last, writes=[write]))
    assert info.value.names == [MAP]
    assert await backend.read_map(MAP) is None
    full = dump(4, {"a": 1, "n": 3, "b": 2})
    assert await backend.commit(tx("t3", prev=last, writes=[
        MapWrite(MAP, write.changes, full)]))
    assert as_dict(await backend.read_map(MAP)) == {"a": 1, "n": 3, "b": 2, V: 4}
    await inbox.wait_for(1)
    assert published(inbox.messages[0]) == write.changes
    # A full dump on a map that exists is not used: versions still rule.
    assert await backend.commit(tx("t4", prev="t3", writes=[
        MapWrite(MAP, changes(4, {"c": 3}), dump(5, {"only": 1}))]))
    assert as_dict(await backend.read_map(MAP)) == {"a": 1, "n": 3, "b": 2, "c": 3, V: 5}


async def test_large_change_sets(backend: Backend) -> None:
    # Past Lua's unpack() limit: the scripts must chunk their HSET/HDEL calls.
    await setup_map(backend)
    items = {f"k{i}": i for i in range(12_000)}
    assert await backend.commit(tx("t1", writes=[MapWrite(MAP, changes(0, items))]))
    assert await backend.commit(tx("t2", prev="t1", writes=[
        MapWrite(MAP, changes(1, remove=[f"k{i}" for i in range(10_000)]))]))
    assert as_dict(await backend.read_map(MAP)) == {
        **{f"k{i}": i for i in range(10_000, 12_000)}, V: 2}


async def test_a_transaction_deletes_maps_with_its_commit(backend_factory: Any,
                                                         backend_kind: str) -> None:
    a = await backend_factory(backend_kind)
    b = await backend_factory(backend_kind)
    await setup_map(a, initial=dump(0, {"a": 1}))
    await a.create_map(MAP2)
    last = await advance(a, 0, 2)
    inbox = Inbox()
    await b.subscribe(MAP, inbox)
    # One atomic step: a write to one map, the deletion of the other...
    assert await a.commit(tx("d1", prev=last, deletes=[MAP],
                             writes=[MapWrite(MAP2, changes(0, {"y": 1}))]))
    assert await b.read_map(MAP) is None
    assert as_dict(await b.read_map(MAP2)) == {"y": 1, V: 1}
    assert (await b.load_checkpoint(ACTOR) or {})["txid"] == "d1"
    # ...and the deleted map's subscribers get the marker, which is no change set.
    await inbox.wait_for(1)
    assert orjson.loads(inbox.messages[0]) == {"deleted": True, "txid": "d1"}
    # A retry of the commit changes nothing; deleting a missing map is fine.
    assert await a.commit(tx("d1", prev=last, deletes=[MAP])) is False
    assert await a.commit(tx("d2", prev="d1", deletes=[MAP]))
    await asyncio.sleep(0.05)
    assert len(inbox.messages) == 1
    # Created again, the map starts afresh (its lineage went with it).
    assert await a.commit(tx("d3", prev="d2", creates=[MapCreate(MAP)],
                             writes=[MapWrite(MAP, {**changes(0, {"z": 1}),
                                                    "base_txid": "d3"})]))
    assert as_dict(await b.read_map(MAP)) == {"z": 1, V: 1}


async def test_a_refused_transaction_deletes_nothing(backend: Backend) -> None:
    await setup_map(backend)
    await backend.create_map(MAP2)
    last = await advance(backend, 0, 1)
    with pytest.raises(ConcurrentUpdateError):
        await backend.commit(tx("d1", prev=last, deletes=[MAP2],
                                writes=[MapWrite(MAP, changes(5))]))
    with pytest.raises(ChainError):
        await backend.commit(tx("d1", prev="nope", deletes=[MAP2]))
    assert await backend.read_map(MAP2) is not None
    # A map is written or deleted by one transaction, not both; only its own maps.
    with pytest.raises(ValueError, match="more than once"):
        await backend.commit(tx("d1", prev=last, deletes=[MAP],
                                writes=[MapWrite(MAP, changes(1))]))
    with pytest.raises(InvalidChangeSetError, match="owned by 'bob-admin'"):
        await backend.commit(tx("d1", prev=last, deletes=["bob-admin-x"]))
    assert await backend.read_map(MAP) is not None


async def test_delete_map_publishes_the_deletion_marker(backend: Backend) -> None:
    await backend.create_map(MAP)
    inbox = Inbox()
    await backend.subscribe(MAP, inbox)
    assert await backend.delete_map(MAP)
    await inbox.wait_for(1)
    assert orjson.loads(inbox.messages[0]) == {"deleted": True, "txid": None}


async def test_destroy_actor_deletes_everything_of_an_unheld_actor(
        backend_factory: Any, backend_kind: str) -> None:
    a = await backend_factory(backend_kind)
    b = await backend_factory(backend_kind)
    await setup_map(a, initial=dump(0, {"a": 1}))
    last = await advance(a, 0, 2)
    assert await a.commit(tx("c1", prev=last, creates=[MapCreate(MAP2)]))
    await a.acquire_lease("alice-other", NODE, 10.0)
    await a.create_map("alice-other-x")
    inbox = Inbox()
    await b.subscribe(MAP2, inbox)
    with pytest.raises(LeaseHeldError) as held:
        await b.destroy_actor(ACTOR)
    assert held.value.holder == NODE
    assert held.value.expires_in is not None and 0 < held.value.expires_in <= 10.0
    assert "expires in" in str(held.value)
    assert await a.read_map(MAP) is not None  # nothing deleted
    await a.release_lease(ACTOR, NODE)
    assert await b.destroy_actor(ACTOR) is True
    assert await a.read_map(MAP) is None and await a.read_map(MAP2) is None
    assert await a.load_checkpoint(ACTOR) is None
    assert await a.load_txids([ACTOR]) == [None]
    await inbox.wait_for(1)
    assert orjson.loads(inbox.messages[0])["deleted"] is True
    # Another actor of the same owner prefix keeps its maps; the actor starts afresh.
    assert await a.read_map("alice-other-x") is not None
    assert await b.destroy_actor(ACTOR) is False
    await b.acquire_lease(ACTOR, OTHER, 10.0)
    assert await b.commit(tx("n1", node=OTHER, creates=[MapCreate(MAP)]))
    assert as_dict(await a.read_map(MAP)) == {V: 0}


async def test_a_node_id_is_claimed_by_one_live_instance(backend_factory: Any,
                                                         backend_kind: str) -> None:
    a = await backend_factory(backend_kind)
    b = await backend_factory(backend_kind)
    await a.claim_node(NODE, "nonce-a", 0.5)
    await a.claim_node(NODE, "nonce-a", 0.5)  # renewing my claim is fine
    await b.claim_node(OTHER, "nonce-b", 0.5)  # another id is another claim
    with pytest.raises(NodeIdInUseError) as used:
        await b.claim_node(NODE, "nonce-b", 10.0)
    assert used.value.node_id == NODE
    assert "node_id 'node1'" in str(used.value)
    assert used.value.expires_in is not None and 0 < used.value.expires_in <= 0.5
    await b.release_node(NODE, "nonce-b")  # not its claim: no effect
    with pytest.raises(NodeIdInUseError):
        await b.claim_node(NODE, "nonce-b", 10.0)
    await a.release_node(NODE, "nonce-a")
    await b.claim_node(NODE, "nonce-b", 0.3)
    await asyncio.sleep(0.4)  # a claim nobody renews expires
    await a.claim_node(NODE, "nonce-a", 10.0)


# -- leases --------------------------------------------------------------------------


async def test_lease_excludes_other_nodes_until_it_expires(backend_factory: Any,
                                                           backend_kind: str) -> None:
    a = await backend_factory(backend_kind)
    b = await backend_factory(backend_kind)
    await a.acquire_lease(ACTOR, NODE, 0.5)
    await a.acquire_lease(ACTOR, NODE, 0.5)  # extending my own lease is fine
    await a.create_map(MAP)
    with pytest.raises(LeaseHeldError) as held:
        await b.acquire_lease(ACTOR, OTHER, 10.0)
    assert (held.value.actor, held.value.holder) == (ACTOR, NODE)
    # The error says when the lease expires, unless its holder renews it.
    assert held.value.expires_in is not None and 0 < held.value.expires_in <= 0.5
    assert "the lease expires in 0." in str(held.value)
    with pytest.raises(LeaseLostError) as lost:
        await b.commit(tx("b1", node=OTHER, writes=[MapWrite(MAP, changes(0))]))
    assert (lost.value.node_id, lost.value.holder) == (OTHER, NODE)
    assert await a.commit(tx("a1", writes=[MapWrite(MAP, changes(0))]))
    await asyncio.sleep(0.6)
    await b.acquire_lease(ACTOR, OTHER, 10.0)
    with pytest.raises(LeaseLostError) as fenced:
        await a.commit(tx("a2", prev="a1", writes=[MapWrite(MAP, changes(1))]))
    assert fenced.value.holder == OTHER
    assert await b.commit(tx("b2", prev="a1", node=OTHER, writes=[MapWrite(MAP, changes(1))]))
    assert as_dict(await a.read_map(MAP))[V] == 2


async def test_renew_returns_only_the_leases_another_node_holds(backend: Backend) -> None:
    await backend.acquire_lease("alice-a", NODE, 0.5)
    await backend.acquire_lease("alice-b", NODE, 0.5)
    await backend.acquire_lease("bob-c", OTHER, 10.0)
    await backend.acquire_lease("carol-e", OTHER, 0.3)
    await asyncio.sleep(0.35)  # carol-e's lease expires: it vanished
    lost = await backend.renew_leases(
        ["alice-a", "alice-b", "bob-c", "nobody-d", "carol-e"], NODE, 5.0)
    assert lost == ["bob-c"]
    await asyncio.sleep(0.3)  # past alice's first TTL: only the renewal keeps them
    assert await backend.renew_leases(["alice-a", "alice-b"], NODE, 5.0) == []
    # The missing leases (never taken, or expired) were taken back, for the
    # renewal's TTL; the lease another node holds was left alone.
    for actor in ("alice-a", "alice-b", "nobody-d", "carol-e"):
        with pytest.raises(LeaseHeldError) as held:
            await backend.acquire_lease(actor, OTHER, 1.0)
        assert held.value.holder == NODE
    with pytest.raises(LeaseHeldError) as held:
        await backend.acquire_lease("bob-c", NODE, 1.0)
    assert held.value.holder == OTHER
    assert await backend.renew_leases([], NODE, 1.0) == []


async def test_release_drops_only_my_lease(backend: Backend) -> None:
    await backend.acquire_lease(ACTOR, NODE, 10.0)
    await backend.release_lease(ACTOR, OTHER)
    with pytest.raises(LeaseHeldError):
        await backend.acquire_lease(ACTOR, OTHER, 10.0)
    await backend.release_lease(ACTOR, NODE)
    await backend.acquire_lease(ACTOR, OTHER, 10.0)
    assert await backend.renew_leases([ACTOR], NODE, 10.0) == [ACTOR]


async def test_vanished_lease_is_taken_back_by_a_commit_on_the_chain(
        backend: Backend) -> None:
    # No lease and no checkpoint: the first commit takes the lease.
    await backend.create_map(MAP)
    assert await backend.commit(tx("t1", ttl=10.0, writes=[MapWrite(MAP, changes(0))]))
    with pytest.raises(LeaseHeldError) as held:
        await backend.acquire_lease(ACTOR, OTHER, 1.0)
    assert held.value.holder == NODE
    # The lease vanishes; the checkpoint carries t1, our previous txid.
    await backend.release_lease(ACTOR, NODE)
    assert await backend.commit(tx("t2", prev="t1", writes=[MapWrite(MAP, changes(1))]))
    with pytest.raises(LeaseHeldError) as held:
        await backend.acquire_lease(ACTOR, OTHER, 1.0)
    assert held.value.holder == NODE
    # Vanished again, but someone committed t2 since the t1 we think is last:
    # refused, and the lease is not taken.
    await backend.release_lease(ACTOR, NODE)
    for prev in ("t1", None):
        with pytest.raises(ConcurrentUpdateError) as info:
            await backend.commit(tx("t3", prev=prev, writes=[MapWrite(MAP, changes(2))]))
        assert info.value.name == ACTOR
    assert as_dict(await backend.read_map(MAP))[V] == 2
    cp = await backend.load_checkpoint(ACTOR)
    assert cp is not None and cp["txid"] == "t2"
    await backend.acquire_lease(ACTOR, OTHER, 1.0)  # still free


async def test_a_node_that_missed_a_commit_is_fenced_off_after_renewing(
        backend_factory: Any, backend_kind: str) -> None:
    a = await backend_factory(backend_kind)
    b = await backend_factory(backend_kind)
    await a.acquire_lease(ACTOR, NODE, 0.3)
    await a.create_map(MAP)
    await a.create_map(MAP2)
    assert await a.commit(tx("a1", state="a", writes=[MapWrite(MAP, changes(0, {"by": "a"}))]))
    await asyncio.sleep(0.35)  # A's lease expires (say A was paused)
    await b.acquire_lease(ACTOR, OTHER, 10.0)
    assert await b.commit(tx("b1", prev="a1", node=OTHER, state="b", writes=[
        MapWrite(MAP, changes(1, {"by": "b"}))]))
    await b.release_lease(ACTOR, OTHER)
    # A wakes up: its renewal finds the lease missing and takes it back...
    assert await a.renew_leases([ACTOR], NODE, 10.0) == []
    with pytest.raises(LeaseHeldError) as held:
        await b.acquire_lease(ACTOR, OTHER, 1.0)
    assert held.value.holder == NODE
    # ... but its commits still follow a1, so none of them may land: not one
    # that also conflicts on a version, nor one on a map B did not touch,
    # nor one that stores a checkpoint only.
    for stale in (tx("a2", prev="a1", state="a", writes=[MapWrite(MAP, changes(1))]),
                  tx("a2", prev="a1", state="a", writes=[MapWrite(MAP2, changes(0))]),
                  tx("a2", prev="a1", state="a")):
        with pytest.raises(ChainError, match=OFF_CHAIN) as info:
            await a.commit(stale)
        assert info.value.name == ACTOR
    assert await b.load_checkpoint(ACTOR) == {"txid": "b1", "state": "b", "maps": [MAP]}
    assert as_dict(await b.read_map(MAP)) == {"by": "b", V: 2}
    assert as_dict(await b.read_map(MAP2)) == {V: 0}
    # Once A has taken B's checkpoint back, it follows the chain again.
    cp = await a.load_checkpoint(ACTOR)
    assert cp is not None
    assert await a.commit(tx("a2", prev=cp["txid"], state="a", writes=[
        MapWrite(MAP, changes(2, {"by": "a"}))]))
    assert as_dict(await b.read_map(MAP)) == {"by": "a", V: 3}


# -- subscriptions ---------------------------------------------------------------------


async def test_change_sets_reach_another_node_in_order(backend_factory: Any,
                                                       backend_kind: str) -> None:
    writer = await backend_factory(backend_kind)
    reader = await backend_factory(backend_kind)
    await setup_map(writer)
    inbox = Inbox()
    await reader.subscribe(MAP, inbox)
    sent = [changes(v, {"n": v, "l": [v] * 3}) for v in range(30)]
    for v, c in enumerate(sent):
        assert await writer.commit(tx(f"t{v}", prev=f"t{v - 1}" if v else None,
                                      writes=[MapWrite(MAP, c)]))
    await inbox.wait_for(30)
    assert [published(m) for m in inbox.messages] == sent


async def test_concurrent_commits_from_many_actors(backend: Backend) -> None:
    actors = [f"w{i}-a" for i in range(40)]
    for actor in actors:
        await backend.acquire_lease(actor, NODE, 10.0)
        await backend.create_map(f"{actor}-m")
    inbox = Inbox()
    await backend.subscribe(f"{actors[0]}-m", inbox)

    async def writer(actor: str) -> None:
        for v in range(5):
            assert await backend.commit(tx(f"{actor}{v}", actor=actor,
                                           prev=f"{actor}{v - 1}" if v else None, writes=[
                                               MapWrite(f"{actor}-m", changes(v, {"v": v}))]))

    await asyncio.gather(*(writer(a) for a in actors))
    for actor in actors:
        assert as_dict(await backend.read_map(f"{actor}-m")) == {"v": 4, V: 5}
    await inbox.wait_for(5)
    assert inbox.versions() == [1, 2, 3, 4, 5]


async def test_subscribe_then_read_leaves_no_window(backend_factory: Any,
                                                    backend_kind: str) -> None:
    writer = await backend_factory(backend_kind)
    reader = await backend_factory(backend_kind)
    await setup_map(writer)
    last = 150
    started = asyncio.Event()

    async def write_all() -> None:
        for v in range(last):
            assert await writer.commit(tx(f"t{v}", prev=f"t{v - 1}" if v else None, writes=[
                MapWrite(MAP, changes(v, {"n": v}))]))
            if v == 20:
                started.set()
            await asyncio.sleep(0)

    writing = asyncio.create_task(write_all())
    await started.wait()
    inbox = Inbox()
    await reader.subscribe(MAP, inbox)
    snapshot = as_dict(await reader.read_map(MAP))[V]
    await writing
    assert 20 < snapshot < last, "the subscription should race the writer"
    async with asyncio.timeout(5):
        while not inbox.messages or inbox.versions()[-1] < last:
            await asyncio.sleep(0.01)
    received = inbox.versions()
    assert set(range(snapshot + 1, last + 1)) <= set(received)
    assert received == sorted(received)


async def test_unsubscribe_stops_delivery(backend: Backend) -> None:
    await setup_map(backend)
    first, second = Inbox(), Inbox()
    await backend.subscribe(MAP, first)
    await backend.subscribe(MAP, second)
    last = await advance(backend, 0, 1)
    await first.wait_for(1)
    await backend.unsubscribe(MAP, first)
    await backend.unsubscribe(MAP, first)  # not subscribed any more: nothing happens
    last = await advance(backend, 1, 2, prev=last, prefix="u")
    await second.wait_for(2)
    await asyncio.sleep(0.05)
    assert first.versions() == [1]
    await backend.unsubscribe(MAP, second)
    again = Inbox()
    await backend.subscribe(MAP, again)
    await advance(backend, 2, 3, prev=last, prefix="v")
    await again.wait_for(1)
    assert again.versions() == [3] and second.versions() == [1, 2]


async def test_unsubscribed_handler_gets_nothing_more(backend: Backend,
                                                     backend_kind: str) -> None:
    await setup_map(backend)
    inbox, witness = Inbox(), Inbox()
    await backend.subscribe(MAP, inbox)
    await backend.subscribe(MAP, witness)
    assert await backend.commit(tx("t0", writes=[MapWrite(MAP, changes(0))]))
    await backend.unsubscribe(MAP, inbox)
    assert await backend.commit(tx("t1", prev="t0", writes=[MapWrite(MAP, changes(1))]))
    await witness.wait_for(2)
    await asyncio.sleep(0.02)
    assert 2 not in inbox.versions()
    if backend_kind == "memory":
        # The delivery of t0 was still queued when the handler left: dropped.
        assert inbox.messages == []


async def test_handlers_are_never_called_inside_commit(backend: Backend) -> None:
    await setup_map(backend)
    inbox = Inbox()
    await backend.subscribe(MAP, inbox)
    committing = asyncio.current_task()
    await backend.commit(tx("t0", writes=[MapWrite(MAP, changes(0))]))
    assert inbox.messages == [] or inbox.tasks[0] is not committing
    await inbox.wait_for(1)
    assert inbox.tasks[0] is not committing


async def test_several_handlers_per_map(backend_factory: Any, backend_kind: str) -> None:
    writer = await backend_factory(backend_kind)
    reader = await backend_factory(backend_kind)
    await setup_map(writer)
    inboxes = [Inbox() for _ in range(3)]
    for inbox in inboxes:
        await reader.subscribe(MAP, inbox)
    await reader.subscribe(MAP2, inboxes[0])
    last = await advance(writer, 0, 2)
    for inbox in inboxes:
        assert (await inbox.wait_for(2)) == inboxes[0].messages[:2]
    await reader.unsubscribe(MAP, inboxes[1])
    await advance(writer, 2, 3, prev=last, prefix="u")
    await inboxes[2].wait_for(3)
    await inboxes[0].wait_for(3)
    assert inboxes[1].versions() == [1, 2]


async def test_a_failing_handler_does_not_stop_others(backend: Backend) -> None:
    await setup_map(backend)

    def broken(payload: bytes) -> None:
        raise RuntimeError("handler bug")

    inbox = Inbox()
    await backend.subscribe(MAP, broken)
    await backend.subscribe(MAP, inbox)
    await advance(backend, 0, 2)
    await inbox.wait_for(2)


async def test_a_closed_backend_refuses_work(backend_factory: Any, backend_kind: str) -> None:
    backend = await backend_factory(backend_kind)
    await backend.close()
    await backend.close()
    for call in (backend.read_map(MAP), backend.create_map(MAP),
                 backend.acquire_lease(ACTOR, NODE, 1.0), backend.load_checkpoint(ACTOR),
                 backend.commit(tx("t"))):
        with pytest.raises(BackendUnavailableError, match="closed"):
            await call
    with pytest.raises(BackendUnavailableError):
        await backend.start()


async def test_memory_delivers_to_a_subscriber_on_another_thread(backend_factory: Any) -> None:
    writer = await backend_factory("memory")
    url = backend_factory.url("memory")
    ready, done = threading.Event(), threading.Event()
    received: list[bytes] = []

    def other_thread() -> None:
        async def run() -> None:
            reader = make_backend(url, app=backend_factory.app)
            await reader.start()

            def handler(payload: bytes) -> None:
                received.append(payload)
                if len(received) == 3:
                    done.set()

            await reader.subscribe(MAP, handler)
            ready.set()
            while not done.is_set():
                await asyncio.sleep(0.01)
            await reader.close()

        asyncio.run(run())

    thread = threading.Thread(target=other_thread)
    thread.start()
    try:
        assert await asyncio.to_thread(ready.wait, 5)
        await setup_map(writer)
        await advance(writer, 0, 3)
        assert await asyncio.to_thread(done.wait, 5)
    finally:
        done.set()
        await asyncio.to_thread(thread.join, 5)
    assert [orjson.loads(m)["version"] for m in received] == [0, 1, 2]


async def test_change_sets_of_the_core_replicate_into_the_core(backend_factory: Any,
                                                               backend_kind: str) -> None:
    # The wire format end to end: a primary SharedMap's prepared change sets
    # and dumps go through the backend into a replica SharedMap.
    from caf_sharing import SharedMap

    writer = await backend_factory(backend_kind)
    reader = await backend_factory(backend_kind)
    await writer.acquire_lease(ACTOR, NODE, 10.0)
    primary = SharedMap()
    ref = primary.ref()
    ref.set("cfg", {"limits": [1, 2.5, None], "on": True}).set("name", "é")
    ref.prepare()
    primary.commit(ref)
    await writer.create_map(MAP, primary.ref().dump())
    replica = SharedMap()
    inbox = Inbox()
    await reader.subscribe(MAP, inbox)
    replica.apply_changes(await reader.read_map(MAP))
    for i in range(12):
        ref = primary.ref()
        ref.set(f"k{i}", i)
        if i % 3 == 0:
            ref.delete("name")
        changes = ref.prepare()
        assert await writer.commit(tx(f"t{i}", prev=f"t{i - 1}" if i else None, writes=[
            MapWrite(MAP, changes)]))
        primary.commit(ref)
    for payload in await inbox.wait_for(12):
        replica.apply_changes(orjson.loads(payload))
    assert replica.version == primary.version == 13
    assert replica.ref().to_dict() == primary.ref().to_dict()
    stored = SharedMap()
    stored.apply_changes(await reader.read_map(MAP))
    assert stored.ref().to_dict() == primary.ref().to_dict() and stored.version == 13


async def test_purge_deletes_everything_of_its_app_only(backend_factory: Any,
                                                        backend_kind: str) -> None:
    backend = await backend_factory(backend_kind)
    await setup_map(backend, initial=dump(0, {"a": 1}))
    await advance(backend, 0, 2)
    other = make_backend(backend_factory.url(backend_kind), app=f"o{backend.app}")
    await other.start()
    try:
        await other.acquire_lease(ACTOR, NODE, 10.0)
        await other.create_map(MAP)
        assert await backend.purge(expire_after=60.0) >= 3  # map, checkpoint, lease...
        assert await backend.read_map(MAP) is not None  # still there, until it expires
        assert await backend.purge() >= 3
        assert await backend.read_map(MAP) is None
        assert await backend.load_checkpoint(ACTOR) is None
        assert await backend.survey() == ([], [])
        assert await other.read_map(MAP) is not None  # another app keeps its own
        assert await backend.purge() == 0
    finally:
        await other.purge()
        await other.close()
