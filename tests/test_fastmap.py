"""SharedMap / MapRef semantics of the compiled core: snapshots, edits,
prepare/commit, change sets, dumps, history, serialized-method hooks, and the
Caf.js SharedMap test cases restated."""

from __future__ import annotations

import gc
import logging
import pickle
import random
import tracemalloc
from typing import Any

import orjson
import pytest

from caf_sharing import FIRST_VERSION, FUNCTION_MARKER, FrozenDict, FrozenList, MapRef, SharedMap
from caf_sharing._fastmap import (
    MAX_DEPTH,
    VERSION_KEY,
    _map_with_hash_bits,
    _trie_invariants,
    _trie_shape,
)
from caf_sharing.errors import (
    ConcurrentUpdateError,
    InvalidChangeSetError,
    InvalidTypeError,
    MethodError,
    MissedUpdateError,
    NoExecError,
    PrepareRequiredError,
    ReadOnlyError,
    SharingError,
    UnknownMethodError,
)


def commit(m: SharedMap, **kv: Any) -> dict[str, Any]:
    """Sets `kv` on a fresh ref of `m`, commits, returns the change set."""
    ref = m.ref()
    for k, v in kv.items():
        ref.set(k, v)
    changes = ref.prepare()
    m.commit(ref)
    return changes


def change(version: int, remove: list[str] | None = None, add: list[Any] | None = None,
           ) -> dict[str, Any]:
    return {"version": version, "remove": remove or [], "add": add or []}


def history(ref: MapRef, first_version: int) -> list[FrozenDict]:
    """updates_slice() where the test expects change sets, not None."""
    result = ref.updates_slice(first_version)
    assert result is not None
    return result


def state(m: SharedMap) -> tuple[int, dict[str, Any], Any]:
    """Everything observable about a map, to check that nothing changed."""
    return m.version, m.ref().to_dict(), m.ref(read_only=True).updates_slice(1)


# -- constants and construction ------------------------------------------------


def test_constants() -> None:
    assert FIRST_VERSION == 0
    assert FUNCTION_MARKER == "function_PlkW02z*Z10"
    assert MAX_DEPTH == 64
    assert VERSION_KEY == "__ca_version__"


def test_new_map_defaults() -> None:
    m = SharedMap()
    assert m.version == FIRST_VERSION
    assert m.no_exec is False
    assert m.max_updates == 100
    ref = m.ref()
    assert len(ref) == 0
    assert list(ref) == []
    assert ref.version == 0
    assert ref.dump() == {"version": 0, "remove": [], "add": [VERSION_KEY, 0]}
    assert repr(m) == "SharedMap(version=0, keys=0, no_exec=False, max_updates=100)"


def test_constructor_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        SharedMap(True)  # type: ignore[call-arg]


@pytest.mark.parametrize("bad", [-1, 1.5, "3", None, True])
def test_max_updates_must_be_a_non_negative_int(bad: Any) -> None:
    with pytest.raises(ValueError, match="max_updates"):
        SharedMap(max_updates=bad)
    m = SharedMap(max_updates=5)
    with pytest.raises(ValueError, match="max_updates"):
        m.max_updates = bad
    assert m.max_updates == 5


def test_no_exec_is_read_only() -> None:
    m = SharedMap(no_exec=True)
    assert m.no_exec is True
    with pytest.raises(AttributeError):
        m.no_exec = False  # type: ignore[misc]


def test_mapref_is_not_constructible() -> None:
    with pytest.raises(TypeError, match=r"SharedMap\.ref"):
        MapRef()
    ref = SharedMap().ref()
    for view in (ref.keys(), ref.values(), ref.items()):
        with pytest.raises(TypeError):
            type(view)()


def test_maps_and_refs_do_not_pickle() -> None:
    m = SharedMap()
    with pytest.raises(TypeError):
        pickle.dumps(m)
    with pytest.raises(TypeError):
        pickle.dumps(m.ref())


def test_repr_of_ref() -> None:
    m = SharedMap()
    commit(m, a=1)
    ref = m.ref()
    assert repr(ref) == "<MapRef version=1 keys=1 read_only=False changed=False>"
    ref.set("b", 2)
    assert repr(ref) == "<MapRef version=1 keys=2 read_only=False changed=True>"


# -- reads ---------------------------------------------------------------------


def test_reads_of_present_and_absent_keys() -> None:
    m = SharedMap()
    commit(m, a=1, n=None)
    ref = m.ref()
    assert ref.get("a") == 1
    assert ref["a"] == 1
    assert "a" in ref
    assert ref.get("n", 5) is None  # a stored None is a hit
    assert "n" in ref
    assert ref.get("zz") is None
    assert ref.get("zz", 7) == 7
    with pytest.raises(KeyError) as info:
        ref["zz"]
    assert info.value.args == ("zz",)
    assert "zz" not in ref


@pytest.mark.parametrize("edited", [False, True])
def test_non_str_keys_are_never_present(edited: bool) -> None:
    m = SharedMap()
    commit(m, a=1)
    ref = m.ref()
    if edited:
        ref.set("b", 2)
    for key in (1, None, 1.5, b"a", ("a",)):
        assert ref.get(key) is None
        assert ref.get(key, "d") == "d"
        assert key not in ref
        with pytest.raises(KeyError):
            ref[key]  # type: ignore[index]
    unhashables: list[Any] = [[], {}, {"a"}]
    for unhashable in unhashables:
        with pytest.raises(TypeError):
            ref.get(unhashable)
        with pytest.raises(TypeError):
            unhashable in ref  # noqa: B015
        with pytest.raises(TypeError):
            ref[unhashable]


def test_get_is_positional_like_dict_get() -> None:
    ref = SharedMap().ref()
    with pytest.raises(TypeError):
        ref.get(key="a")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        ref.get()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        ref.get("a", 1, 2)  # type: ignore[call-arg]


def test_str_subclass_keys_work_like_str() -> None:
    class Key(str):
        def __hash__(self) -> int:
            return 1

    m = SharedMap()
    ref = m.ref()
    ref.set(Key("a"), 1)
    assert ref.get("a") == 1
    assert ref.get(Key("a")) == 1
    assert Key("a") in ref
    assert type(next(iter(ref))) is str
    ref.prepare()
    m.commit(ref)
    assert m.ref().get(Key("a")) == 1


def test_version_key_is_not_a_user_key() -> None:
    m = SharedMap()
    commit(m, a=1)
    ref = m.ref()
    assert ref.get(VERSION_KEY) is None
    assert VERSION_KEY not in ref
    assert list(ref) == ["a"]
    assert len(ref) == 1
    assert ref.to_dict() == {"a": 1}
    assert ref.version == 1


def test_reads_return_the_stored_object() -> None:
    m = SharedMap()
    commit(m, cfg={"a": [1, 2]})
    ref = m.ref()
    assert ref.get("cfg") is ref["cfg"]
    assert ref.get("cfg") is m.ref(read_only=True).get("cfg")
    assert type(ref["cfg"]) is FrozenDict
    assert type(ref["cfg"]["a"]) is FrozenList


def test_to_dict_is_a_plain_mutable_deep_copy() -> None:
    m = SharedMap()
    commit(m, cfg={"a": [1, {"b": (2,)}]}, x=3)
    plain = m.ref().to_dict()
    assert plain == {"cfg": {"a": [1, {"b": [2]}]}, "x": 3}
    assert type(plain["cfg"]) is dict
    assert type(plain["cfg"]["a"]) is list
    assert type(plain["cfg"]["a"][1]["b"]) is list
    plain["cfg"]["a"].append(9)
    plain["y"] = 1
    assert m.ref().to_dict() == {"cfg": {"a": [1, {"b": [2]}]}, "x": 3}


def test_views_are_sized_iterable_and_support_in() -> None:
    m = SharedMap()
    commit(m, a=1, b=[2], c=None)
    ref = m.ref()
    keys, values, items = ref.keys(), ref.values(), ref.items()
    assert len(keys) == len(values) == len(items) == 3
    assert sorted(keys) == ["a", "b", "c"]
    assert list(keys) == list(ref)
    assert list(items) == list(zip(keys, values, strict=True))
    assert "a" in keys and "z" not in keys and 1 not in keys
    assert [2] in values and None in values and 5 not in values
    assert ("a", 1) in items and ("a", 2) not in items and ("z", 1) not in items
    assert "a" not in items and ("a", 1, 2) not in items and (1, 1) not in items
    assert dict(items) == ref.to_dict()
    assert repr(keys).startswith("KeysView([")
    it = iter(keys)
    assert iter(it) is it
    assert it.__length_hint__() == 3
    next(it)
    assert it.__length_hint__() == 2


def test_iteration_order_is_trie_order_not_insertion_order() -> None:
    keys = [f"key{i}" for i in range(500)]
    shuffled = random.Random(7).sample(keys, len(keys))
    orders = []
    for order in (keys, shuffled, list(reversed(keys))):
        m = SharedMap()
        commit(m, **{k: 1 for k in order})
        orders.append(list(m.ref()))
    assert orders[0] == orders[1] == orders[2]
    assert sorted(orders[0]) == sorted(keys)
    assert orders[0] != keys  # by hash, not by insertion


def test_views_and_iterators_keep_their_snapshot_while_the_ref_is_edited() -> None:
    m = SharedMap()
    commit(m, **{f"k{i}": i for i in range(200)})
    ref = m.ref()
    ref.set("new0", 0)  # the ref now owns copied nodes it may edit in place
    it = iter(ref)
    keys = ref.keys()
    items = ref.items()
    before = dict(ref.items())
    for i in range(200):
        ref.set(f"k{i}", -i)
        ref.set(f"extra{i}", i)
        ref.delete(f"k{(i * 7) % 200}")
    assert set(it) == set(before)
    assert len(keys) == 201 and set(keys) == set(before)
    assert dict(items) == before
    assert "extra1" not in keys
    assert _trie_invariants(ref) == len(ref)


# -- writes, isolation ---------------------------------------------------------


def test_set_and_delete_chain_and_read_your_writes() -> None:
    m = SharedMap()
    commit(m, a=1, b=2)
    ref = m.ref()
    other = m.ref()
    assert ref.set("c", 3).delete("a").set("b", 20) is ref
    assert ref.to_dict() == {"b": 20, "c": 3}
    assert len(ref) == 2
    assert ref.get("a") is None and "a" not in ref
    assert ref["b"] == 20
    assert other.to_dict() == {"a": 1, "b": 2}
    assert m.ref().to_dict() == {"a": 1, "b": 2}
    assert ref.has_changed and not other.has_changed


@pytest.mark.parametrize("hash_bits", [64, 4])
def test_pending_edits_read_like_applied_ones(hash_bits: int) -> None:
    """A ref's edits reach its trie in batches, when something needs the trie
    (len, iteration, views, dump, prepare); reads must not depend on when.
    More edits than one batch (16), repeats, deletes, and a base version the
    map has since left (its index moved on) are all covered; 4 hash bits
    force collision nodes onto the batched paths."""
    m = _map_with_hash_bits(hash_bits)
    base = {f"k{i}": i for i in range(300)}
    commit(m, **base)
    ref = m.ref()
    rnd = random.Random(7)
    model = dict(base)
    for step in range(120):
        key = f"k{rnd.randrange(400)}"
        if rnd.random() < 0.3:
            ref.delete(key)
            model.pop(key, None)
        else:
            ref.set(key, step)
            model[key] = step
        if step == 40:
            # The map moves on: the ref's base loses the index.
            commit(m, k0=-1, k399=-1)
        probe = f"k{rnd.randrange(400)}"
        assert ref.get(probe) == model.get(probe)
        assert (probe in ref) == (probe in model)
        if step % 25 == 0:
            assert len(ref) == len(model)
            assert _trie_invariants(ref) == len(model)
        if step % 37 == 0:
            assert dict(ref.items()) == model
    assert ref.to_dict() == model
    assert sorted(ref) == sorted(model)
    changes = ref.prepare()
    assert _trie_invariants(ref) == len(model) == len(ref)
    assert changes["version"] == ref.version
    copy = SharedMap()
    copy.apply_changes(ref.dump())
    assert copy.ref().to_dict() == model


def test_delete_of_an_absent_key_is_a_change() -> None:
    m = SharedMap()
    ref = m.ref()
    ref.delete("ghost")
    assert ref.has_changed
    assert len(ref) == 0
    changes = ref.prepare()
    assert changes == {"version": 0, "remove": ["ghost"], "add": [VERSION_KEY, 1]}
    m.commit(ref)
    assert m.version == 1
    assert len(m.ref()) == 0


def test_setting_the_same_value_is_a_change() -> None:
    m = SharedMap()
    commit(m, a=1)
    ref = m.ref()
    ref.set("a", 1)
    assert ref.has_changed
    assert ref.prepare()["add"] == ["a", 1, VERSION_KEY, 2]


def test_caf_isolation_case() -> None:
    """Caf.js test-sharing.js `sharedMap`, first part."""
    m1 = SharedMap()
    ref1 = m1.ref()
    ref2 = m1.ref(read_only=True)
    ref1.set("x", 1)
    ref1.set("z", 5)
    value = {"doo": "sss", "p": 3}
    ref1.set("y", value)
    value["p"] = 2  # the map holds a frozen copy
    with pytest.raises(TypeError):
        ref1["y"]["p"] = 2
    ref1.set("x", 2)
    ref1.delete("z")
    ref1.prepare()
    assert "x" in ref1
    assert "x" not in ref2
    m1.commit(ref1)
    assert "x" not in ref2

    ref1 = m1.ref()
    assert ref1.get("x") == 2
    assert ref1.get("y") == {"doo": "sss", "p": 3}
    assert len(ref1.to_dict()) == 2
    assert ref1.version == 1
    with pytest.raises(ReadOnlyError):
        ref2.set("x", 4)
    ref2 = m1.ref()
    ref1.set("x", 3)
    ref2.set("x", 4)
    ref1.prepare()
    m1.commit(ref1)
    ref2.prepare()
    with pytest.raises(ConcurrentUpdateError):
        m1.commit(ref2)
    assert ref1.get("x") == 3
    assert m1.ref().get("x") == 3

    # abort: a ref that is never prepared/committed leaves no trace
    ref1 = m1.ref()
    ref1.set("yy", 11)
    with pytest.raises(PrepareRequiredError):
        m1.commit(ref1)
    with pytest.raises(PrepareRequiredError):
        m1.commit(ref1)
    assert "yy" not in m1.ref()


def test_caf_dump_with_reset_case() -> None:
    sm1, sm2 = SharedMap(), SharedMap()
    commit(sm1, x=3)
    commit(sm2, x=5)
    commit(sm2, x=6)
    sm1_dump = sm1.ref().dump()
    sm2.apply_changes(sm1_dump)  # version 1 < 2: monotonic, ignored
    assert sm2.ref().get("x") == 6
    sm3 = SharedMap()
    commit(sm3, x=5)
    commit(sm1, x=4)
    sm3.apply_changes(sm1.ref().dump())
    assert sm3.ref().get("x") == 4
    assert sm3.version == 2


def test_caf_deltas_case() -> None:
    """Caf.js `sharedMap`, deltas part: dump to a fresh map, then deltas."""
    m1 = SharedMap()
    commit(m1, x=2, y={"doo": "sss"}, z=1)
    m2 = SharedMap()
    m2.apply_changes(m1.ref().dump())
    assert m2.ref().to_dict() == m1.ref().to_dict()
    assert m2.version == m1.version
    ref2 = m2.ref()
    ref2.set("x", 5).delete("x").set("x", 6).delete("z")
    assert ref2.changes is None
    d2 = ref2.prepare()
    assert ref2.changes is d2
    assert d2 == {"version": 1, "remove": ["z"], "add": ["x", 6, VERSION_KEY, 2]}
    m2.commit(ref2)
    m1.apply_changes(d2)
    assert m1.ref().to_dict() == m2.ref().to_dict() == {"x": 6, "y": {"doo": "sss"}}
    assert "z" not in m1.ref()
    # applying again is ignored, and the history does not change
    up1 = m1.ref(read_only=True).updates_slice(1)
    m1.apply_changes(d2)
    up2 = m1.ref(read_only=True).updates_slice(1)
    assert up1 == up2 == [d2]
    assert m1.ref(read_only=True).version == m1.ref().version == 2


def test_read_only_ref_rejects_every_write() -> None:
    m = SharedMap()
    commit(m, a=1)
    ref = m.ref(read_only=True)
    assert ref.is_read_only
    with pytest.raises(ReadOnlyError, match=r"'a'.*read-only"):
        ref.set("a", 2)
    with pytest.raises(ReadOnlyError, match="'b'"):
        ref.delete("b")
    with pytest.raises(ReadOnlyError, match="'f'"):
        ref.set_fun("f", [], "return 1")
    with pytest.raises(ReadOnlyError):
        ref.prepare()
    assert not ref.has_changed
    assert ref.changes is None


# -- prepare -------------------------------------------------------------------


def test_prepare_normalises_edits() -> None:
    m = SharedMap()
    commit(m, keep=0, gone=0, back=0)
    ref = m.ref()
    ref.set("a", 1).set("a", 2)            # last write wins
    ref.delete("back").set("back", 3)     # delete then set = set
    ref.set("b", 1).delete("b")           # set then delete = delete
    ref.delete("gone")
    changes = ref.prepare()
    assert changes == {
        "version": 1,
        "remove": ["b", "gone"],
        "add": ["a", 2, "back", 3, VERSION_KEY, 2],
    }
    assert list(changes) == ["version", "remove", "add"]
    assert type(changes) is FrozenDict
    assert type(changes["add"]) is FrozenList and type(changes["remove"]) is FrozenList
    m.commit(ref)
    assert m.ref().to_dict() == {"keep": 0, "a": 2, "back": 3}


def test_prepare_makes_the_ref_read_only_and_keeps_its_content() -> None:
    m = SharedMap()
    ref = m.ref()
    ref.set("a", 1)
    ref.prepare()
    assert ref.is_read_only
    assert ref.version == 0
    assert ref.get("a") == 1
    assert ref.dump() == {"version": 0, "remove": [], "add": ["a", 1, VERSION_KEY, 1]}
    with pytest.raises(ReadOnlyError, match=r"'a'.*prepared"):
        ref.set("a", 2)
    with pytest.raises(ReadOnlyError, match="prepared"):
        ref.prepare()
    assert ref.get("a") == 1


def test_prepare_without_edits() -> None:
    m = SharedMap()
    commit(m, a=1)
    ref = m.ref()
    assert ref.prepare() == {"version": 1, "remove": [], "add": [VERSION_KEY, 2]}
    assert not ref.has_changed
    with pytest.raises(PrepareRequiredError):
        m.commit(ref)
    assert m.version == 1


def test_prepared_change_set_is_deep_frozen() -> None:
    m = SharedMap()
    ref = m.ref()
    ref.set("a", [1, {"b": 2}])
    changes = ref.prepare()
    with pytest.raises(TypeError):
        changes["version"] = 3
    with pytest.raises(TypeError):
        changes["add"].append(1)
    with pytest.raises(TypeError):
        changes["add"][1][1]["b"] = 3


def test_dump_before_prepare_shows_edits_at_the_base_version() -> None:
    m = SharedMap()
    commit(m, a=1)
    ref = m.ref()
    ref.set("b", 2)
    dump = ref.dump()
    assert dump["version"] == 0 and dump["remove"] == []
    add = dump["add"]
    assert dict(zip(add[::2], add[1::2], strict=True)) == {"a": 1, "b": 2, VERSION_KEY: 1}
    assert add[-2:] == [VERSION_KEY, 1]


# -- commit --------------------------------------------------------------------


def test_commit_requires_prepare_and_changes() -> None:
    m = SharedMap()
    ref = m.ref()
    with pytest.raises(PrepareRequiredError):
        m.commit(ref)
    ref.set("a", 1)
    with pytest.raises(PrepareRequiredError):
        m.commit(ref)
    assert m.version == 0
    ref.prepare()
    m.commit(ref)
    assert m.version == 1


def test_commit_of_a_read_only_ref_is_refused() -> None:
    m = SharedMap()
    with pytest.raises(PrepareRequiredError):
        m.commit(m.ref(read_only=True))


def test_commit_of_another_maps_ref() -> None:
    m1, m2 = SharedMap(), SharedMap()
    ref = m1.ref()
    ref.set("a", 1)
    ref.prepare()
    with pytest.raises(ValueError, match="another SharedMap"):
        m2.commit(ref)
    with pytest.raises(TypeError):
        m2.commit(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        m2.commit({"version": 0})  # type: ignore[arg-type]
    assert m2.version == 0 and m1.version == 0


def test_concurrent_update_error_carries_versions() -> None:
    m = SharedMap()
    stale = m.ref()
    commit(m, a=1)
    commit(m, a=2)
    stale.set("a", 0)
    stale.prepare()
    with pytest.raises(ConcurrentUpdateError) as info:
        m.commit(stale)
    assert info.value.expected == 0
    assert info.value.current == 2
    assert "0" in str(info.value) and "2" in str(info.value)
    assert m.ref().get("a") == 2


def test_a_ref_commits_once() -> None:
    m = SharedMap()
    ref = m.ref()
    ref.set("a", 1)
    ref.prepare()
    m.commit(ref)
    with pytest.raises(ConcurrentUpdateError):
        m.commit(ref)
    assert m.version == 1


def test_ref_taken_before_reset_cannot_commit() -> None:
    m = SharedMap()
    commit(m, a=1)
    stale = m.ref()
    m.reset()
    commit(m, b=1)  # back at version 1, other content
    stale.set("c", 1)
    stale.prepare()
    with pytest.raises(ConcurrentUpdateError, match="reset") as info:
        m.commit(stale)
    assert info.value.expected == info.value.current == 1
    assert m.ref().to_dict() == {"b": 1}


def test_commit_keeps_old_snapshots_and_refs_isolated() -> None:
    m = SharedMap()
    refs = []
    for i in range(50):
        refs.append(m.ref(read_only=True))
        commit(m, **{f"k{i}": i, "last": i})
    for i, ref in enumerate(refs):
        assert ref.version == i
        assert len(ref) == (i + 1 if i else 0)
        assert ref.get("last") == (i - 1 if i else None)
        assert f"k{i}" not in ref
        assert ref.get(f"k{i - 1}") == (i - 1 if i else None)


def test_the_committing_ref_still_reads_its_content() -> None:
    m = SharedMap()
    ref = m.ref()
    ref.set("a", 1)
    ref.prepare()
    m.commit(ref)
    commit(m, a=2)
    assert ref.get("a") == 1
    assert m.ref().get("a") == 2


# A commit (or an applied change set) that nothing else can observe edits the
# base version's trie in place; everything that can still see that version
# must make it copy instead. These tests hold each kind of observer across
# in-place commits of keys spread over the whole trie.

BIG = {f"k{i}": i for i in range(3000)}


def bytes_allocated_by(fn: Any) -> int:
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def content_of(ref: MapRef) -> dict[str, Any]:
    """What every read path of `ref` shows; they must all agree."""
    content = dict(ref.items())
    assert {k: ref.get(k) for k in BIG} == {k: content.get(k) for k in BIG}
    assert len(ref) == len(content) == _trie_invariants(ref)
    assert dict(zip(ref.dump()["add"][:-2:2], ref.dump()["add"][1:-2:2], strict=True)) == content
    return content


def test_an_unobserved_commit_edits_in_place_and_an_observed_one_copies() -> None:
    m = SharedMap()
    commit(m, **BIG)
    values = iter(range(10**6, 10**7))

    def commit_cost(hold: bool) -> int:
        ref = m.ref()
        held = m.ref() if hold else None
        ref.set("k17", next(values)).set("k2900", next(values))
        ref.prepare()
        cost = bytes_allocated_by(lambda: m.commit(ref))
        del held
        return cost

    def apply_cost(hold: bool) -> int:
        held = m.ref() if hold else None
        c = change(m.version, add=["k17", next(values), "k2900", next(values)])
        cost = bytes_allocated_by(lambda: m.apply_changes(c))
        del held
        return cost

    # Replacing values in place allocates no trie node; copying two paths
    # allocates several.
    assert commit_cost(False) + 500 < commit_cost(True)
    assert apply_cost(False) + 500 < apply_cost(True)


@pytest.mark.parametrize("observer", ["ref", "read_only_ref", "synced_ref", "iterator",
                                      "half_iterator", "view", "old_version"])
@pytest.mark.parametrize("how", ["commit", "apply"])
def test_in_place_edits_never_reach_what_can_still_see_the_version(observer: str,
                                                                    how: str) -> None:
    m = SharedMap()
    commit(m, **BIG)
    commit(m, k0=-1)  # observers of the newest and of an older version both
    rnd = random.Random(7)
    seen = m.ref()
    if observer == "old_version":
        seen = m.ref(read_only=True)
        commit(m, k1=-1)
    expected = content_of(seen)
    holder: Any = seen
    if observer == "synced_ref":
        seen.set("own", 1)
        expected["own"] = 1
        assert len(seen) == len(expected)  # brings its edit into its own trie
    elif observer in ("iterator", "half_iterator", "view"):
        holder = iter(seen.items()) if observer != "view" else seen.items()
        if observer == "half_iterator":
            first = dict(next(holder) for _ in range(1000))
        del seen  # only the iterator or view keeps the version's trie
    for round_ in range(30):
        keys = rnd.sample(sorted(BIG), 20)
        if how == "commit":
            ref = m.ref()
            for k in keys[:15]:
                ref.set(k, [round_])
            for k in keys[15:]:
                ref.delete(k)
            ref.prepare()
            m.commit(ref)
            del ref
        else:
            m.apply_changes(change(m.version, remove=keys[15:],
                                   add=[x for k in keys[:15] for x in (k, [round_])]))
    if observer in ("iterator", "view"):
        assert dict(holder) == expected
    elif observer == "half_iterator":
        assert {**first, **dict(holder)} == expected
    else:
        assert content_of(holder) == expected


def test_a_ref_committed_in_place_reads_the_new_content() -> None:
    m = SharedMap()
    commit(m, **BIG)
    ref = m.ref()
    for i in range(0, 3000, 97):
        ref.set(f"k{i}", -i)
    for i in range(1, 3000, 89):
        ref.delete(f"k{i}")
    ref.set("new", 0)
    ref.prepare()
    m.commit(ref)
    assert content_of(ref) == content_of(m.ref())
    assert ref.version == m.version - 1
    assert ref.dump()["add"][-2:] == [VERSION_KEY, m.version]
    # It stays that version's content while the map moves on in place.
    kept = content_of(ref)
    commit(m, k0=1, new=None)
    assert content_of(ref) == kept


@pytest.mark.parametrize("how", ["commit", "apply"])
def test_in_place_edits_can_empty_the_map(how: str) -> None:
    m = SharedMap()
    commit(m, a=1, b=2, c=3)
    if how == "commit":
        ref = m.ref()
        ref.delete("a").delete("b").delete("c")
        ref.prepare()
        m.commit(ref)
        assert content_of(ref) == {}
    else:
        m.apply_changes(change(m.version, remove=["a", "b", "c"]))
    assert content_of(m.ref()) == {}
    commit(m, d=4)
    assert content_of(m.ref()) == {"d": 4}


class _RefTaker:
    """Cyclic garbage whose finalizer takes a ref of `m`: the cycle GC runs
    it at whatever allocation it next happens on, like any finalizer."""

    def __init__(self, m: SharedMap, taken: list[MapRef]) -> None:
        self.m = m
        self.taken = taken
        self.cycle = self

    def __del__(self) -> None:
        self.taken.append(self.m.ref(read_only=True))


@pytest.mark.parametrize("how", ["commit", "apply"])
def test_a_ref_taken_by_a_finalizer_during_a_write_sees_one_whole_version(how: str) -> None:
    m = SharedMap()
    commit(m, **BIG)
    versions = {m.version: content_of(m.ref())}
    taken: list[MapRef] = []
    threshold = gc.get_threshold()
    try:
        for round_ in range(40):
            keys = [f"k{(round_ * 151 + i * 977) % 3000}" for i in range(10)]
            expected = {**versions[m.version], **{key: [round_] for key in keys}}
            ref = m.ref()
            for k in keys:
                ref.set(k, [round_])
            changes = dict(ref.prepare())
            if how == "apply":
                del ref  # so that the version can be edited in place
            # Collections at each of the write's first allocations in turn.
            gc.collect()
            _RefTaker(m, taken)
            gc.set_threshold(1 + round_ % 12)
            if how == "commit":
                m.commit(ref)
                del ref
            else:
                m.apply_changes(changes)
            gc.set_threshold(*threshold)
            versions[m.version] = expected
    finally:
        gc.set_threshold(*threshold)
    assert taken
    for seen in taken:
        assert content_of(seen) == versions[seen.version]


@pytest.mark.parametrize("bits", [0, 4])
def test_in_place_edits_with_colliding_hashes(bits: int) -> None:
    m = _map_with_hash_bits(bits)
    commit(m, **{k: v for k, v in BIG.items() if v < 300})
    old = m.ref(read_only=True)
    expected_old = content_of(old)
    model = dict(expected_old)
    rnd = random.Random(bits)
    for round_ in range(40):
        ref = m.ref()
        for k in rnd.sample(sorted(BIG)[:400], 12):
            if rnd.random() < 0.3:
                ref.delete(k)
                model.pop(k, None)
            else:
                ref.set(k, round_)
                model[k] = round_
        ref.prepare()
        m.commit(ref)
        del ref
        assert content_of(m.ref()) == model
    assert content_of(old) == expected_old


def test_versions_compare_as_numbers_past_9_10_and_100() -> None:
    m = SharedMap()
    replica = SharedMap()
    sets = []
    for i in range(105):
        sets.append(commit(m, n=i))
    assert m.version == 105
    for c in sets[:9]:
        replica.apply_changes(c)
    assert replica.version == 9
    with pytest.raises(MissedUpdateError) as info:
        replica.apply_changes(sets[10])  # version 10 > 9
    assert (info.value.version, info.value.current) == (10, 9)
    replica.apply_changes(sets[9])       # version 9 -> 10
    replica.apply_changes(sets[2])       # 2 < 10: ignored, not "2" > "10"
    assert replica.version == 10
    replica.apply_changes(sets[10:])
    assert replica.version == 105
    assert replica.ref().get("n") == 104
    slice_ = history(m.ref(read_only=True), 99)
    assert [c["version"] for c in slice_] == [99, 100, 101, 102, 103, 104]
    assert history(m.ref(read_only=True), 100)[0]["version"] == 100


# -- apply_changes -------------------------------------------------------------


def test_apply_removes_then_adds() -> None:
    m = SharedMap()
    commit(m, a=1, b=2)
    m.apply_changes(change(1, ["a", "b", "never"], ["b", 3, "c", [4]]))
    assert m.version == 2
    assert m.ref().to_dict() == {"b": 3, "c": [4]}


def test_a_change_set_makes_exactly_its_version_plus_one() -> None:
    m = SharedMap()
    m.apply_changes(change(0, [], ["a", 1, VERSION_KEY, 7]))  # a dump: any version
    assert m.version == 7
    m.apply_changes(change(7, [], ["a", 2, VERSION_KEY, 8]))
    assert m.version == 8
    m.apply_changes(change(8, [], ["a", 3]))  # no pair: base + 1 all the same
    assert m.version == 9
    assert m.ref().get("a") == 3
    # A jump would let one message move a replica anywhere, for good.
    with pytest.raises(InvalidChangeSetError, match=r"must be its 'version' \+ 1 = 10, got 12"):
        m.apply_changes(change(9, [], ["a", 4, VERSION_KEY, 12]))
    assert m.version == 9 and m.ref().get("a") == 3


def test_apply_takes_the_last_of_repeated_keys() -> None:
    m = SharedMap()
    m.apply_changes(change(0, [], ["a", 1, "a", 2, VERSION_KEY, 1]))
    assert m.ref().to_dict() == {"a": 2}
    assert len(m.ref()) == 1


def test_old_change_sets_are_ignored_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test_fastmap.replay")
    m = SharedMap(logger=logger)
    commit(m, a=1)
    second = commit(m, a=2)
    commit(m, a=3)
    before = state(m)
    with caplog.at_level(logging.DEBUG, logger=logger.name):
        m.apply_changes(second)
        m.apply_changes(change(1, [], ["a", 99]))
    assert state(m) == before
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert all("ignoring an old change set of version 1 (map at version 3)" in s
               for s in messages)


def test_ignored_replays_need_no_logger() -> None:
    m = SharedMap()
    first = commit(m, a=1)
    commit(m, a=2)
    m.apply_changes(first)
    assert m.ref().get("a") == 2


def test_gap_raises_missed_update_and_changes_nothing() -> None:
    m = SharedMap()
    commit(m, a=1)
    before = state(m)
    with pytest.raises(MissedUpdateError, match=r"version 3.*version 1") as info:
        m.apply_changes(change(3, [], ["a", 5]))
    assert info.value.version == 3 and info.value.current == 1
    assert state(m) == before


def test_dump_replaces_content_version_and_history() -> None:
    m = SharedMap()
    commit(m, a=1, b=2)
    commit(m, b=3)
    assert m.ref(read_only=True).updates_slice(1) is not None
    m.apply_changes(change(0, [], ["c", 1, VERSION_KEY, 10]))
    assert m.version == 10
    assert m.ref().to_dict() == {"c": 1}
    assert m.ref(read_only=True).updates_slice(2) is None
    assert m.ref(read_only=True).updates_slice(10) == []
    nxt = commit(m, d=1)
    assert m.ref(read_only=True).updates_slice(10) == [nxt]
    assert m.ref(read_only=True).updates_slice(9) is None


@pytest.mark.parametrize("dump_version", [0, 1, 2])
def test_older_or_equal_dumps_are_ignored(dump_version: int,
                                          caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test_fastmap.dumps")
    m = SharedMap(logger=logger)
    commit(m, a=1)
    commit(m, a=2)
    before = state(m)
    with caplog.at_level(logging.DEBUG, logger=logger.name):
        # (A dump of version 0 is the empty map: it holds nothing.)
        m.apply_changes(change(0, [], ["z", 1] * (dump_version > 0) + [VERSION_KEY, dump_version]))
    assert state(m) == before
    assert f"ignoring a dump of version {dump_version} (map at version 2)" in caplog.text


def test_a_dump_must_say_its_version() -> None:
    # It used to count as version 0 and be ignored; a dump without its
    # version is malformed, and a sender must learn that.
    m = SharedMap()
    commit(m, a=1)
    with pytest.raises(InvalidChangeSetError, match="without a '__ca_version__' pair"):
        m.apply_changes(change(0, [], ["z", 1]))
    assert m.ref().to_dict() == {"a": 1} and m.version == 1


def test_dump_of_an_empty_map_applies_to_a_fresh_one() -> None:
    fresh = SharedMap()
    fresh.apply_changes(SharedMap().ref().dump())
    assert fresh.version == 0
    assert fresh.ref().to_dict() == {}


def test_dump_round_trip_keeps_content_and_version() -> None:
    m = SharedMap()
    for i in range(30):
        commit(m, **{f"k{i}": {"i": i, "l": [i] * 3}})
    ref = m.ref()
    ref.delete("k3")
    ref.prepare()
    m.commit(ref)
    copy = SharedMap()
    copy.apply_changes(m.ref().dump())
    assert copy.version == m.version == 31
    assert copy.ref().to_dict() == m.ref().to_dict()
    assert len(copy.ref()) == 29


def test_a_list_of_change_sets_applies_in_order() -> None:
    m = SharedMap()
    replica = SharedMap()
    sets = [commit(m, a=i) for i in range(5)]
    replica.apply_changes(sets)
    assert replica.version == 5
    assert replica.ref().get("a") == 4
    replica.apply_changes(tuple(sets))  # all old: ignored
    assert replica.version == 5


def test_a_bad_change_set_in_a_list_changes_nothing() -> None:
    # A list used to apply element by element, so the good change sets before
    # a bad one stayed; it is one message, applied whole or not at all.
    m = SharedMap()
    good = [change(0, [], ["a", 1, VERSION_KEY, 1]), change(1, [], ["a", 2])]
    bad = change(2, [], ["a", float("nan")])
    later = change(3, [], ["a", 4])
    with pytest.raises(InvalidChangeSetError, match=r"change set \[2\]"):
        m.apply_changes([*good, bad, later])
    assert m.version == 0
    assert m.ref().to_dict() == {}
    m.apply_changes([*good, change(2, [], ["a", 3])])
    assert m.version == 3 and m.ref().get("a") == 3


def test_apply_records_frozen_history() -> None:
    m = SharedMap()
    m.apply_changes(change(0, [], ["a", {"x": [1]}, VERSION_KEY, 1]))
    m.apply_changes({"version": 1, "remove": ("a",), "add": ("b", (1, 2))})
    (entry,) = history(m.ref(read_only=True), 1)
    # Recorded as prepare() makes it: with the version pair.
    assert entry == {"version": 1, "remove": ["a"], "add": ["b", [1, 2], VERSION_KEY, 2]}
    assert type(entry) is FrozenDict
    assert type(entry["remove"]) is FrozenList
    assert type(entry["add"][1]) is FrozenList


def test_apply_records_a_prepared_change_set_as_is() -> None:
    primary, replica = SharedMap(), SharedMap()
    c = commit(primary, a=1)
    replica.apply_changes(c)  # version 0: loaded as a dump, which is not recorded
    c2 = commit(primary, a=2)
    replica.apply_changes(c2)
    (entry,) = history(replica.ref(read_only=True), 1)
    assert entry is c2


def test_change_sets_round_trip_through_orjson() -> None:
    m = SharedMap()
    replica = SharedMap()
    sets = [
        commit(m, a=1, b={"x": [1, 2.5, None, True, "é"]}, c=[]),
        commit(m, a=2 ** 63 - 1, d=-(2 ** 63), e=-0.0),
    ]
    ref = m.ref()
    ref.delete("a").set_fun("f", ["x"], "return x + 1")
    sets.append(ref.prepare())
    m.commit(ref)
    for c in sets:
        wire = orjson.loads(orjson.dumps(c))
        assert wire == c
        replica.apply_changes(wire)
    assert replica.ref().to_dict() == m.ref().to_dict()
    dump = orjson.loads(orjson.dumps(m.ref().dump()))
    assert dump == m.ref().dump()
    again = SharedMap()
    again.apply_changes(dump)
    assert again.ref().to_dict() == m.ref().to_dict() and again.version == m.version


# -- history / updates_slice ---------------------------------------------------


def test_a_change_set_as_big_as_its_map_is_not_kept_in_history() -> None:
    """Past 4096 keys, a change set no smaller than the map it makes is not
    recorded: the history restarts (a dump serves as well), on commit and on
    apply alike. Smaller ones are recorded as before."""
    for build in ("commit", "apply"):
        m = SharedMap()
        commit(m, a=1)
        big = {"a": 0} | {f"k{i}": i for i in range(5000)}
        if build == "commit":
            big_changes = commit(m, **big)
        else:
            big_changes = {"version": 1, "remove": [], "add": [
                *(x for kv in big.items() for x in kv), VERSION_KEY, 2]}
            m.apply_changes(big_changes)
        assert m.ref(read_only=True).updates_slice(1) is None
        assert m.ref(read_only=True).updates_slice(2) == []
        small = commit(m, a=2)
        assert m.ref(read_only=True).updates_slice(2) == [small]
        assert m.ref(read_only=True).updates_slice(1) is None
        replica = SharedMap()
        replica.apply_changes(m.ref().dump())
        assert replica.ref().to_dict() == {**big, "a": 2}
    # Big, but smaller than the map it makes: kept.
    kept = commit(m, **{f"k{i}": -i for i in range(4500)})
    assert m.ref(read_only=True).updates_slice(3) == [kept]


def test_the_first_commit_hands_its_edits_over_as_the_index() -> None:
    m = SharedMap()
    ref = m.ref()
    for i in range(100):
        ref.set(f"k{i}", i)
    ref.delete("k5").set("k5", 5).set("k7", 70)
    ref.prepare()
    m.commit(ref)
    expected = {f"k{i}": i for i in range(100)} | {"k7": 70}
    following = m.ref()
    following.set("k1", -1).delete("k2").set("new", 1)
    following.prepare()
    m.commit(following)
    # The committed ref keeps its own view; the map's index moved on.
    assert ref.to_dict() == expected and len(ref) == 100
    assert ref.get("k1") == 1 and ref["k2"] == 2 and "new" not in ref
    assert ref.version == 0 and ref.has_changed and ref.is_read_only
    assert ref.dump()["add"][-1] == 1
    assert _trie_invariants(ref) == 100
    now = m.ref()
    assert now.get("k1") == -1 and "k2" not in now and now["new"] == 1 and len(now) == 100
    with pytest.raises(ConcurrentUpdateError, match="from version 0 to 2"):
        m.commit(ref)
    # A first commit that also deletes keys goes the usual way.
    other = SharedMap()
    edit = other.ref().set("a", 1).delete("ghost")
    edit.prepare()
    other.commit(edit)
    assert other.ref().to_dict() == {"a": 1} and edit.get("a") == 1


def test_first_edits_synced_part_way_read_like_applied_ones() -> None:
    """Until the first sync a ref keeps no list of its pending keys; one
    that syncs (len) part way, then edits on, must still get every edit."""
    for bits in (64, 4, 0):
        m = _map_with_hash_bits(bits)
        ref = m.ref()
        model: dict[str, int] = {}
        for i in range(60):
            ref.set(f"k{i}", i)
            model[f"k{i}"] = i
            if i % 3 == 0:
                ref.delete(f"k{i // 2}")
                model.pop(f"k{i // 2}", None)
            if i in (10, 40):
                assert len(ref) == len(model) == _trie_invariants(ref)
        assert ref.to_dict() == model
        ref.prepare()
        m.commit(ref)
        assert m.ref().to_dict() == model == ref.to_dict()
        assert _trie_invariants(m.ref()) == len(model)


def test_updates_slice_rules() -> None:
    m = SharedMap()
    sets = [commit(m, a=i) for i in range(6)]  # versions 0..5 -> 6
    ref = m.ref(read_only=True)
    assert ref.updates_slice(0) is None
    assert ref.updates_slice(6) == []
    assert ref.updates_slice(7) is None
    assert ref.updates_slice(-1) is None
    assert ref.updates_slice(1) == sets[1:]
    assert ref.updates_slice(4) == sets[4:]
    assert all(type(c) is FrozenDict for c in history(ref, 1))


def test_updates_slice_on_an_empty_history() -> None:
    ref = SharedMap().ref(read_only=True)
    assert ref.updates_slice(0) is None
    assert ref.updates_slice(1) is None
    m = SharedMap(max_updates=0)
    commit(m, a=1)
    commit(m, a=2)
    ref = m.ref(read_only=True)
    assert ref.updates_slice(1) is None
    assert ref.updates_slice(2) == []


def test_updates_slice_only_on_read_only_refs() -> None:
    m = SharedMap()
    commit(m, a=1)
    with pytest.raises(SharingError, match="read_only=True"):
        m.ref().updates_slice(1)
    ref = m.ref()
    ref.set("a", 2)
    ref.prepare()  # read-only now, but not a replica's ref
    with pytest.raises(SharingError, match="read_only=True"):
        ref.updates_slice(1)


@pytest.mark.parametrize("bad", ["1", 1.0, True, None])
def test_updates_slice_needs_an_int(bad: Any) -> None:
    with pytest.raises(InvalidTypeError):
        SharedMap().ref(read_only=True).updates_slice(bad)


def test_history_is_bounded_by_max_updates() -> None:
    m = SharedMap(max_updates=3)
    sets = [commit(m, a=i) for i in range(500)]
    ref = m.ref(read_only=True)
    assert ref.updates_slice(497) == sets[497:]
    assert ref.updates_slice(496) is None
    assert ref.updates_slice(500) == []


def test_history_is_captured_with_the_snapshot() -> None:
    m = SharedMap(max_updates=4)
    sets = [commit(m, a=i) for i in range(3)]
    old = m.ref(read_only=True)
    more = [commit(m, a=i) for i in range(300)]
    assert old.updates_slice(1) == sets[1:]
    assert old.updates_slice(3) == []
    assert m.ref(read_only=True).updates_slice(299) == more[-4:]
    m.reset()
    assert old.updates_slice(2) == sets[2:]


def test_lowering_max_updates_applies_from_the_next_record() -> None:
    m = SharedMap(max_updates=10)
    sets = [commit(m, a=i) for i in range(8)]
    m.max_updates = 2
    assert m.ref(read_only=True).updates_slice(1) == sets[1:]
    sets.append(commit(m, a=8))
    assert m.max_updates == 2
    assert m.ref(read_only=True).updates_slice(7) == sets[7:]
    assert m.ref(read_only=True).updates_slice(6) is None


def test_commit_and_apply_both_record() -> None:
    m = SharedMap()
    c1 = commit(m, a=1)
    m.apply_changes(change(1, [], ["b", 2]))
    c3 = commit(m, c=3)
    slice_ = m.ref(read_only=True).updates_slice(1)
    assert slice_ == [change(1, [], ["b", 2, VERSION_KEY, 2]), c3]
    assert m.ref(read_only=True).updates_slice(0) is None
    assert c1["version"] == 0


def test_replica_catches_up_from_updates_slice() -> None:
    primary = SharedMap()
    replica = SharedMap()
    for i in range(20):
        commit(primary, **{f"k{i % 7}": i})
        if i % 3 == 0:
            slice_ = primary.ref(read_only=True).updates_slice(replica.version)
            if slice_ is None:
                replica.apply_changes(primary.ref(read_only=True).dump())
            else:
                replica.apply_changes(slice_)
    replica.apply_changes(primary.ref(read_only=True).updates_slice(replica.version) or [])
    assert replica.version == primary.version
    assert replica.ref().to_dict() == primary.ref().to_dict()


# -- reset ---------------------------------------------------------------------


def test_reset() -> None:
    m = SharedMap()
    commit(m, a=1)
    commit(m, b=2)
    old = m.ref(read_only=True)
    m.reset()
    assert m.version == 0
    assert m.ref().to_dict() == {}
    assert m.ref(read_only=True).updates_slice(1) is None
    assert old.to_dict() == {"a": 1, "b": 2}
    assert old.get("a") == 1
    commit(m, c=3)
    assert m.ref().to_dict() == {"c": 3} and m.version == 1


# -- serialized methods --------------------------------------------------------


def test_set_fun_stores_the_method_description() -> None:
    m = SharedMap()
    ref = m.ref()
    assert ref.set_fun("inc", ("y",), "return self.get(y) + 1") is ref
    desc = ref.get("inc")
    assert desc == {"type": FUNCTION_MARKER, "args": ["y"], "body": "return self.get(y) + 1"}
    assert type(desc) is FrozenDict and type(desc["args"]) is FrozenList


def test_set_fun_checks_the_method_first() -> None:
    ref = SharedMap().ref()
    with pytest.raises(MethodError):
        ref.set_fun("bad", [], "import os")
    with pytest.raises(ValueError):
        ref.set_fun("bad", ["self"], "return 1")
    with pytest.raises(InvalidTypeError):
        ref.set_fun(1, [], "return 1")  # type: ignore[arg-type]
    assert not ref.has_changed and len(ref) == 0


def test_caf_method_case() -> None:
    """Caf.js `sharedMapFun`, with Python bodies."""
    m1, m2 = SharedMap(), SharedMap()
    ref1 = m1.ref()
    ref1.set("y", 7).set("z", 9).set_fun("x", ["y"], "return self.get(y) + 1")
    d1 = ref1.prepare()
    m1.commit(ref1)
    m2.apply_changes(d1)
    ref1, ref2 = m1.ref(), m2.ref()
    assert ref1.apply_method("x", ["y"]) == 8
    assert ref2.apply_method("x", ["y"]) == 8
    assert ref1.apply_method("x", ["z"]) == 10 == ref2.apply_method("x", ("z",))
    ref1.set_fun("k", ["y"], "return self.apply_method('x', [y]) + 1")
    ref1.prepare()
    assert ref1.apply_method("k", ["y"]) == 9
    m1.commit(ref1)
    assert ref1.apply_method("k", ["y"]) == 9
    assert m1.ref().apply_method("k", ["y"]) == 9


def test_apply_method_with_no_exec() -> None:
    m = SharedMap(no_exec=True)
    ref = m.ref()
    ref.set_fun("f", [], "return 1")
    with pytest.raises(NoExecError, match="'f'"):
        ref.apply_method("f", [])
    with pytest.raises(NoExecError, match="'ghost'"):
        ref.apply_method("ghost", [])


@pytest.mark.parametrize("value", [None, 1, "x", [FUNCTION_MARKER],
                                   {"type": "other", "args": [], "body": "return 1"},
                                   {"args": [], "body": "return 1"}])
def test_apply_method_of_a_non_method(value: Any) -> None:
    ref = SharedMap().ref()
    ref.set("m", value)
    with pytest.raises(UnknownMethodError, match="'m'"):
        ref.apply_method("m", [])
    with pytest.raises(UnknownMethodError, match="'absent'"):
        ref.apply_method("absent", [])


# -- trie structure ------------------------------------------------------------


@pytest.mark.parametrize("bits", [0, 1, 4, 9, 64])
def test_a_loaded_dump_has_the_trie_single_inserts_make(bits: int) -> None:
    """A dump's trie is built whole (see _build_trie): its shape must be the
    one inserting its keys one by one gives, keys listed twice keep their
    last value, and later edits, in place or copying, must work on it."""
    rnd = random.Random(bits)
    pairs = [(f"k{rnd.randrange(300)}", i) for i in range(400)]
    model = dict(pairs)
    m = _map_with_hash_bits(bits)
    m.apply_changes({"version": 0, "remove": [], "add": [*(x for p in pairs for x in p),
                                                         VERSION_KEY, 5]})
    ref = m.ref(read_only=True)
    assert _trie_invariants(ref) == len(ref) == len(model)
    assert ref.to_dict() == model and sorted(ref) == sorted(model)
    assert all(ref.get(k) == v for k, v in model.items())
    one_by_one = _map_with_hash_bits(bits)
    commit(one_by_one, **model)
    assert _trie_shape(ref) == _trie_shape(one_by_one.ref())
    for step in range(30):
        if step == 15:
            del ref  # from here on, commits edit the loaded trie in place
        edit = m.ref()
        for key in rnd.sample(sorted(model), 10):
            if rnd.random() < 0.4:
                edit.delete(key)
                model.pop(key)
            else:
                edit.set(key, -step)
                model[key] = -step
        edit.set(f"new{step}", step)
        model[f"new{step}"] = step
        edit.prepare()
        m.commit(edit)
        after = m.ref()
        assert _trie_invariants(after) == len(model) and after.to_dict() == model


@pytest.mark.parametrize("bits", [0, 1, 4, 9, 64])
def test_trie_with_forced_hash_collisions(bits: int) -> None:
    rnd = random.Random(bits)
    m = _map_with_hash_bits(bits)
    model: dict[str, int] = {}
    snapshots = []
    for step in range(120):
        ref = m.ref()
        for _ in range(rnd.randint(1, 12)):
            key = f"k{rnd.randrange(150)}"
            if rnd.random() < 0.4:
                ref.delete(key)
                model.pop(key, None)
            else:
                ref.set(key, step)
                model[key] = step
        assert _trie_invariants(ref) == len(ref) == len(model)
        ref.prepare()
        m.commit(ref)
        snapshots.append((m.ref(read_only=True), dict(model)))
    for snap, expected in snapshots:
        assert _trie_invariants(snap) == len(expected)
        assert snap.to_dict() == expected
        assert all(snap[k] == v for k, v in expected.items())
        for k in ("k0", "k1", "nope"):
            assert (k in snap) == (k in expected)
    replica = _map_with_hash_bits(bits)
    replica.apply_changes(m.ref().dump())
    assert replica.ref().to_dict() == model


def test_hash_bits_are_checked() -> None:
    with pytest.raises(ValueError):
        _map_with_hash_bits(65)
    assert _map_with_hash_bits(8, max_updates=3).max_updates == 3


def test_large_map_with_deletes_keeps_its_shape() -> None:
    m = SharedMap()
    m.apply_changes(change(0, [], [x for i in range(20_000) for x in (f"k{i}", i)]
                           + [VERSION_KEY, 1]))
    ref = m.ref()
    for i in range(0, 20_000, 3):
        ref.delete(f"k{i}")
    assert _trie_invariants(ref) == len(ref) == 20_000 - 6_667
    ref.prepare()
    m.commit(ref)
    after = m.ref()
    assert len(after) == 13_333
    assert all(after.get(f"k{i}") == (None if i % 3 == 0 else i) for i in range(20_000))


# -- reference counting of the compiled trie -----------------------------------


def _workload(bits: int) -> None:
    """Every trie operation: in-place and copying edits, splits, collisions,
    inlining on delete, dumps, iteration, replicas, reset."""
    m = _map_with_hash_bits(bits)
    for round_ in range(40):
        ref = m.ref()
        for i in range(60):
            ref.set(f"k{(i * 7 + round_) % 90}", {"v": [round_, i]})
            if i % 3 == 0:
                ref.delete(f"k{(i * 11 + round_) % 90}")
        list(ref.items())
        ref.set("after-iter", round_)
        ref.prepare()
        m.commit(ref)
    replica = _map_with_hash_bits(bits)
    replica.apply_changes(m.ref().dump())
    replica.apply_changes({"version": replica.version, "remove": ["k1", "k2"],
                           "add": ["k3", None]})
    m.reset()


@pytest.mark.parametrize("bits", [0, 3, 64])
def test_trie_operations_do_not_leak(bits: int) -> None:
    import gc
    import tracemalloc

    _workload(bits)  # warm caches and free lists
    gc.collect()
    tracemalloc.start()
    try:
        _workload(bits)
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(5):
            _workload(bits)
        gc.collect()
        growth = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert growth < 20_000, f"{growth} bytes kept after 5 workloads"


def test_keys_and_values_are_released() -> None:
    import gc
    import sys

    key = "".join(["refcounted", "-key"])
    value = "".join(["refcounted", "-value"])
    key_refs, value_refs = sys.getrefcount(key), sys.getrefcount(value)
    m = _map_with_hash_bits(2)
    replica = _map_with_hash_bits(2)
    refs = []
    for i in range(30):
        ref = m.ref()
        ref.set(key, value).set(f"other{i}", value)
        if i % 4 == 0:
            ref.delete(key)
        ref.prepare()
        m.commit(ref)
        assert ref.changes is not None
        replica.apply_changes(ref.changes)
        refs.append(m.ref(read_only=True))
    assert sys.getrefcount(value) > value_refs
    del ref, refs
    m.reset()
    replica.reset()
    gc.collect()
    assert sys.getrefcount(key) == key_refs
    assert sys.getrefcount(value) == value_refs
