"""AggregateMap over real SharedMaps, with async find_map functions."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from caf_sharing import SharedMap
from caf_sharing.aggregate import DEFAULT_LINK_KEY, AggregateMap, AggregateSnapshot
from caf_sharing.errors import InvalidTypeError

LINK = DEFAULT_LINK_KEY


def write(shared: SharedMap, **values: Any) -> SharedMap:
    ref = shared.ref()
    for key, value in values.items():
        ref.set(key, value)
    ref.prepare()
    shared.commit(ref)
    return shared


def unset(shared: SharedMap, *keys: str) -> None:
    ref = shared.ref()
    for key in keys:
        ref.delete(key)
    ref.prepare()
    shared.commit(ref)


def linked(*links: Any, **values: Any) -> SharedMap:
    return write(SharedMap(), **{LINK: list(links)}, **values)


class Registry:
    """Maps by name, found through an async find_map that counts its calls."""

    def __init__(self, **maps: SharedMap) -> None:
        self.maps: dict[str, SharedMap] = dict(maps)
        self.calls: Counter[str] = Counter()
        self.delay = 0.0

    async def find_map(self, name: str) -> SharedMap | None:
        self.calls[name] += 1
        await asyncio.sleep(self.delay)
        return self.maps.get(name)


async def test_caf_js_scenario() -> None:
    # links p1->p2, p1->p3, p2->p4, p4->p3, p4->p1
    # bindings p4: a, b; p2: c; p1: d; p3: d
    reg = Registry(
        p1=linked("p2", "p3", d=True),
        p2=linked("p4", c=True),
        p3=write(SharedMap(), d=True),
        p4=linked("p3", "p1", a=True, b=True),
    )
    agg = AggregateMap("p1", reg.find_map, "__link_key__")
    snap = await agg.assemble()
    assert snap.get_all("a") == [True]
    assert snap.get_all("b") == [True]
    assert snap.get_all("c") == [True]
    assert snap.get_all("d") == [True, True]
    assert snap.get_all("e") == []
    assert snap.names == ("p1", "p2", "p3", "p4")
    assert set(agg.maps) == {"p1", "p2", "p3", "p4"}

    write(reg.maps["p2"], **{LINK: []})  # unlink p2->p4 to isolate p4
    snap2 = await agg.assemble()
    assert snap2.get_all("a") == []
    assert snap2.get_all("b") == []
    assert snap2.get_all("d") == [True, True]
    assert snap2.names == ("p1", "p2", "p3")
    # every map was looked up once; later assemblies reuse agg.maps
    assert reg.calls == Counter({"p1": 1, "p2": 1, "p3": 1, "p4": 1})
    assert "p4" in agg.maps


async def test_chain_in_order() -> None:
    reg = Registry(m0=linked("m1", n=0), m1=linked("m2", n=1), m2=linked("m3", n=2),
                   m3=write(SharedMap(), n=3))
    snap = await AggregateMap("m0", reg.find_map).assemble()
    assert snap.names == ("m0", "m1", "m2", "m3")
    assert snap.get_all("n") == [0, 1, 2, 3]
    assert len(snap) == 4


async def test_diamond_visits_each_map_once_and_looks_up_a_level_together() -> None:
    reg = Registry(a=linked("b", "c", v="a"), b=linked("d", v="b"), c=linked("d", v="c"),
                   d=write(SharedMap(), v="d"))
    both_started = asyncio.Event()
    started: set[str] = set()

    async def find_map(name: str) -> SharedMap | None:
        started.add(name)
        if {"b", "c"} <= started:
            both_started.set()
        if name in ("b", "c"):
            # b's lookup only returns once c's started too: they run concurrently
            await asyncio.wait_for(both_started.wait(), timeout=5)
        return await reg.find_map(name)

    snap = await AggregateMap("a", find_map).assemble()
    assert snap.names == ("a", "b", "c", "d")
    assert snap.get_all("v") == ["a", "b", "c", "d"]
    assert reg.calls == Counter({"a": 1, "b": 1, "c": 1, "d": 1})


async def test_order_is_breadth_first_in_link_order_whatever_lookups_take() -> None:
    reg = Registry(root=linked("slow", "fast", v=0), slow=linked("x", v=1),
                   fast=linked("y", v=2), x=write(SharedMap(), v=3), y=write(SharedMap(), v=4))

    async def find_map(name: str) -> SharedMap | None:
        await asyncio.sleep(0.05 if name in ("slow", "x") else 0)
        return await reg.find_map(name)

    snap = await AggregateMap("root", find_map).assemble()
    assert snap.names == ("root", "slow", "fast", "x", "y")
    assert snap.get_all("v") == [0, 1, 2, 3, 4]


async def test_cycle_and_self_link() -> None:
    reg = Registry(a=linked("a", "b", k="a"), b=linked("a", "b", k="b"))
    snap = await AggregateMap("a", reg.find_map).assemble()
    assert snap.names == ("a", "b")
    assert snap.get_all("k") == ["a", "b"]
    assert reg.calls == Counter({"a": 1, "b": 1})

    alone = Registry(s=linked("s", k=1))
    snap = await AggregateMap("s", alone.find_map).assemble()
    assert snap.names == ("s",)
    assert snap.get_all("k") == [1]


async def test_missing_map_is_skipped_and_retried_until_it_appears() -> None:
    reg = Registry(a=linked("ghost", "b", k="a"), b=linked("ghost", k="b"))
    agg = AggregateMap("a", reg.find_map, retry_delays=(0.0, 0.0))  # no backoff
    snap = await agg.assemble()
    assert snap.names == ("a", "b")
    assert reg.calls["ghost"] == 1  # linked twice, looked up once per assembly
    await agg.assemble()
    assert reg.calls["ghost"] == 2
    assert "ghost" not in agg.maps

    reg.maps["ghost"] = linked(k="ghost")
    snap = await agg.assemble()
    assert snap.names == ("a", "ghost", "b")
    assert snap.get_all("k") == ["a", "ghost", "b"]
    await agg.assemble()
    assert reg.calls == Counter({"a": 1, "b": 1, "ghost": 3})


async def test_missing_first_map_gives_an_empty_snapshot() -> None:
    reg = Registry()
    snap = await AggregateMap("nobody", reg.find_map).assemble()
    assert len(snap) == 0
    assert snap.names == ()
    assert snap.get_all("x") == []


async def test_snapshot_is_isolated_from_later_changes() -> None:
    reg = Registry(a=linked("b", k=1), b=write(SharedMap(), k=2), c=write(SharedMap(), k=3))
    agg = AggregateMap("a", reg.find_map)
    snap = await agg.assemble()
    write(reg.maps["a"], k=10, **{LINK: ["c"]})
    unset(reg.maps["b"], "k")
    assert snap.get_all("k") == [1, 2]
    assert snap.names == ("a", "b")
    assert snap.refs["a"].get(LINK) == ["b"]
    fresh = await agg.assemble()
    assert fresh.names == ("a", "c")
    assert fresh.get_all("k") == [10, 3]
    assert snap.get_all("k") == [1, 2]


async def test_find_map_error_propagates_and_found_maps_stay() -> None:
    reg = Registry(a=linked("b", "bad"), b=write(SharedMap(), k=1))
    failing = True

    async def find_map(name: str) -> SharedMap | None:
        if name == "bad" and failing:
            raise ConnectionError("backend down")
        return await reg.find_map(name)

    agg = AggregateMap("a", find_map)
    with pytest.raises(ConnectionError, match="backend down"):
        await agg.assemble()
    assert set(agg.maps) == {"a", "b"}
    failing = False
    snap = await agg.assemble()
    assert snap.names == ("a", "b")  # "bad" is simply not there
    assert reg.calls == Counter({"a": 1, "b": 1, "bad": 1})


async def test_find_map_must_return_a_shared_map() -> None:
    async def find_map(name: str) -> Any:
        return {"not": "a map"}

    with pytest.raises(InvalidTypeError, match=r"find_map\('a'\) returned dict"):
        await AggregateMap("a", find_map).assemble()


@pytest.mark.parametrize("links", [
    "b", {"b": 1}, 7, None, True, [1, None, ["b"], {"b": 1}, 2.5, "b"],
])
async def test_link_values_that_are_not_lists_of_names_are_ignored(links: Any) -> None:
    reg = Registry(a=write(SharedMap(), **{LINK: links}), b=write(SharedMap(), k="b"))
    snap = await AggregateMap("a", reg.find_map).assemble()
    expected = ("a", "b") if isinstance(links, list) else ("a",)
    assert snap.names == expected
    assert sum(reg.calls.values()) == len(expected)


async def test_custom_link_key() -> None:
    reg = Registry(a=write(SharedMap(), trusts=["b"], **{LINK: ["c"]}),
                   b=write(SharedMap(), k="b"), c=write(SharedMap(), k="c"))
    agg = AggregateMap("a", reg.find_map, link_key="trusts")
    assert agg.link_key == "trusts"
    assert agg.first_name == "a"
    assert (await agg.assemble()).names == ("a", "b")


async def test_acl_example() -> None:
    """Alice's ACL trusts her 'friends' group map, which trusts Carol's list."""
    reg = Registry(**{
        "alice-admin-acl": linked("alice-admin-friends", **{"bob-phone": ["read"]}),
        "alice-admin-friends": linked("carol-admin-acl", **{"dave-laptop": ["read", "write"]}),
        "carol-admin-acl": write(SharedMap(), **{"erin-tv": ["read"], "bob-phone": ["write"]}),
    })
    agg = AggregateMap("alice-admin-acl", reg.find_map)

    def allowed(snap: AggregateSnapshot, caller: str, action: str) -> bool:
        return any(action in rights for rights in snap.get_all(caller))

    snap = await agg.assemble()
    assert allowed(snap, "bob-phone", "read")
    assert allowed(snap, "bob-phone", "write")  # granted by Carol's list
    assert allowed(snap, "dave-laptop", "write")
    assert allowed(snap, "erin-tv", "read")
    assert not allowed(snap, "erin-tv", "write")
    assert not allowed(snap, "mallory-x", "read")

    # Alice stops trusting her friends group: the next message sees it
    write(reg.maps["alice-admin-acl"], **{LINK: []})
    snap = await agg.assemble()
    assert not allowed(snap, "erin-tv", "read")
    assert not allowed(snap, "bob-phone", "write")
    assert allowed(snap, "bob-phone", "read")


async def test_concurrent_assemblies_share_lookups() -> None:
    reg = Registry(a=linked("b", "c"), b=linked("c"), c=write(SharedMap(), k=1))
    reg.delay = 0.02
    agg = AggregateMap("a", reg.find_map)
    first, second = await asyncio.gather(agg.assemble(), agg.assemble())
    assert first.names == second.names == ("a", "b", "c")
    assert reg.calls == Counter({"a": 1, "b": 1, "c": 1})


async def test_cancelled_assembly_does_not_cancel_a_shared_lookup() -> None:
    reg = Registry(a=linked("b"), b=write(SharedMap(), k=1))
    reg.delay = 0.05
    agg = AggregateMap("a", reg.find_map)
    doomed = asyncio.ensure_future(agg.assemble())
    survivor = asyncio.ensure_future(agg.assemble())
    await asyncio.sleep(0.01)
    doomed.cancel()
    snap = await survivor
    assert snap.names == ("a", "b")
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert reg.calls == Counter({"a": 1, "b": 1})


async def test_cancelled_lookup_still_lands_in_maps() -> None:
    reg = Registry(a=write(SharedMap(), k=1))
    reg.delay = 0.02
    agg = AggregateMap("a", reg.find_map)
    task = asyncio.ensure_future(agg.assemble())
    await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    assert set(agg.maps) == {"a"}
    assert (await agg.assemble()).names == ("a",)
    assert reg.calls == Counter({"a": 1})


async def test_known_maps_assemble_without_suspending() -> None:
    reg = Registry(a=linked("b", k=1), b=write(SharedMap(), k=2))
    agg = AggregateMap("a", reg.find_map)
    await agg.assemble()
    coroutine = agg.assemble()
    # One step of the coroutine runs it to the end: no await point was hit,
    # so every ref was taken at the same moment of the event loop.
    with pytest.raises(StopIteration) as stop:
        coroutine.send(None)
    snap = stop.value.value
    assert isinstance(snap, AggregateSnapshot)
    assert snap.get_all("k") == [1, 2]


async def test_snapshot_api() -> None:
    reg = Registry(a=linked("b", k=1), b=write(SharedMap(), k=2))
    snap = await AggregateMap("a", reg.find_map).assemble()
    assert list(snap) == ["a", "b"]
    assert "a" in snap and "zzz" not in snap
    assert all(ref.is_read_only for ref in snap.refs.values())
    assert snap.refs["b"].get("k") == 2
    with pytest.raises(TypeError):
        snap.refs["c"] = reg.maps["a"].ref()  # type: ignore[index]
    assert repr(snap) == "AggregateSnapshot(['a', 'b'])"
    assert snap.get_all(7) == []  # type: ignore[arg-type]


def test_constructor_checks_its_arguments() -> None:
    async def find_map(name: str) -> SharedMap | None:
        return None

    with pytest.raises(InvalidTypeError, match="first map name must be a str"):
        AggregateMap(7, find_map)  # type: ignore[arg-type]
    with pytest.raises(InvalidTypeError, match="find_map must be an async callable"):
        AggregateMap("a", "find")  # type: ignore[arg-type]
    with pytest.raises(InvalidTypeError, match="link_key must be a str"):
        AggregateMap("a", find_map, None)  # type: ignore[arg-type]
    assert AggregateMap("a", find_map).link_key == "__link_key__"
