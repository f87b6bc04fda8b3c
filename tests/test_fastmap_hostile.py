"""The compiled core against hostile input (issue 7, sections 2 and 4).

Forged versions, half-applicable lists of change sets, and objects of the
core that were never initialised or were altered behind its back. Every case
must end in the documented exception with the map unchanged; the cases that
used to crash the interpreter run in a child process, which must exit
normally.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import caf_sharing
from caf_sharing import FrozenDict, FrozenList, MapRef, SharedMap
from caf_sharing._fastmap import VERSION_KEY, _trie_invariants
from caf_sharing.errors import (
    InvalidChangeSetError,
    InvalidTypeError,
    MissedUpdateError,
    PrepareRequiredError,
)
from test_fastmap import commit

TOP = 2 ** 53 - 1  # the last version


def state(m: SharedMap) -> tuple[int, dict[str, Any], Any]:
    ref = m.ref(read_only=True)
    return m.version, ref.to_dict(), ref.updates_slice(1)


def change(version: int, *add: Any, remove: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"version": version, "remove": list(remove), "add": list(add)}


def run_child(code: str) -> subprocess.CompletedProcess[str]:
    """Runs `code` in a fresh interpreter importing this checkout's package."""
    env = dict(os.environ, PYTHONPATH=str(Path(caf_sharing.__file__).parent.parent),
               PYTHONFAULTHANDLER="1")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=120, check=False)


# -- forged versions -----------------------------------------------------------


@pytest.mark.parametrize("forged", [2 ** 63 - 1, 2 ** 53, TOP, 3, 1, 0, -5])
def test_a_forged_version_is_refused_and_the_replica_goes_on(forged: int) -> None:
    primary, replica = SharedMap(), SharedMap()
    replica.apply_changes(commit(primary, a=1))
    before = state(replica)
    with pytest.raises(InvalidChangeSetError, match=r"must be its 'version' \+ 1 = 2"):
        replica.apply_changes(change(1, "a", 666, VERSION_KEY, forged))
    assert state(replica) == before
    # Not pinned: the real next change sets still apply, and a resync too.
    replica.apply_changes(commit(primary, a=2))
    replica.apply_changes(commit(primary, b=3))
    assert replica.version == 3 and replica.ref().to_dict() == {"a": 2, "b": 3}
    replica.apply_changes(primary.ref().dump())
    assert replica.version == 3


@pytest.mark.parametrize("forged", [2 ** 63 - 1, 2 ** 53, 2 ** 64, -1])
def test_a_dump_out_of_range_is_refused(forged: int) -> None:
    m = SharedMap()
    commit(m, a=1)
    before = state(m)
    with pytest.raises(InvalidChangeSetError, match=r"must be in \[0, 2\*\*53\)"):
        m.apply_changes(change(0, "a", 666, VERSION_KEY, forged))
    assert state(m) == before


def test_the_last_version_cannot_be_passed() -> None:
    m = SharedMap()
    m.apply_changes(change(0, "a", 1, VERSION_KEY, TOP))
    assert m.version == TOP
    ref = m.ref().set("a", 2)
    with pytest.raises(InvalidChangeSetError, match=f"map is at version {TOP}, the last one"):
        ref.prepare()
    # Nothing moved: the ref keeps its edit and is still writable ...
    assert not ref.is_read_only and ref.changes is None and ref.get("a") == 2
    # ... and cannot be committed unprepared.
    with pytest.raises(PrepareRequiredError):
        m.commit(ref)
    with pytest.raises(InvalidChangeSetError, match=r"'version' must be in \[0, 2\*\*53 - 1\)"):
        m.apply_changes(change(TOP, "a", 3, VERSION_KEY, TOP + 1))
    with pytest.raises(InvalidChangeSetError):
        m.apply_changes(change(TOP, "a", 3))
    assert m.version == TOP and m.ref().to_dict() == {"a": 1}
    # The version below the last one still commits, into the last one.
    m.apply_changes(change(0, "a", 1, VERSION_KEY, TOP - 1))  # not newer: ignored
    n = SharedMap()
    n.apply_changes(change(0, "a", 1, VERSION_KEY, TOP - 1))
    assert commit(n, a=5)["add"][-1] == TOP and n.version == TOP


def test_wrapping_at_the_64_bit_limit_is_impossible() -> None:
    # prepare() used to add 1 to 2**63 - 1 and send -2**63.
    m = SharedMap()
    with pytest.raises(InvalidChangeSetError):
        m.apply_changes(change(0, VERSION_KEY, 2 ** 63 - 1))
    assert m.version == 0


def test_a_dump_with_removes_is_refused_unless_it_is_a_first_change_set() -> None:
    m = SharedMap()
    commit(m, a=1)
    with pytest.raises(InvalidChangeSetError, match="must not remove keys, got 2"):
        m.apply_changes(change(0, "b", 1, VERSION_KEY, 7, remove=("a", "x")))
    assert m.version == 1 and m.ref().to_dict() == {"a": 1}
    # A fresh map's first change set deletes and sets: version 0 making 1.
    fresh = SharedMap()
    ref = fresh.ref().set("b", 1).delete("a")
    first = ref.prepare()
    assert first["version"] == 0 and first["remove"] == ["a"]
    replica = SharedMap()
    replica.apply_changes(first)
    assert replica.version == 1 and replica.ref().to_dict() == {"b": 1}


def test_an_empty_map_dump_is_accepted_and_holds_nothing() -> None:
    # What a peer sends for a map created without content.
    m = SharedMap()
    m.apply_changes(SharedMap().ref().dump())
    assert m.version == 0
    with pytest.raises(InvalidChangeSetError, match="the empty map, but adds 1 keys"):
        m.apply_changes(change(0, "a", 1, VERSION_KEY, 0))


# -- lists: whole or nothing ---------------------------------------------------


def test_a_list_with_a_bad_third_element_changes_nothing() -> None:
    primary, replica = SharedMap(), SharedMap()
    sets = [commit(primary, a=i) for i in range(3)]
    bad = dict(change(3, "a", 99, VERSION_KEY, 2 ** 63 - 1))
    before = state(replica)
    with pytest.raises(InvalidChangeSetError, match=r"change set \[3\]"):
        replica.apply_changes([*sets, bad])
    assert state(replica) == before
    replica.apply_changes(sets)
    assert replica.version == 3 and replica.ref().get("a") == 2


def test_a_list_with_a_gap_changes_nothing() -> None:
    primary, replica = SharedMap(), SharedMap()
    sets = [commit(primary, a=i) for i in range(4)]
    with pytest.raises(MissedUpdateError, match=r"change set \[2\] has version 3 but the "
                       r"ones before it end at version 2: .* \(nothing applied") as info:
        replica.apply_changes([sets[0], sets[1], sets[3]])
    assert info.value.version == 3 and info.value.current == 0
    assert replica.version == 0 and replica.ref().to_dict() == {}


def test_old_and_duplicate_change_sets_in_a_list_are_still_ignored(
        caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test_fastmap_hostile")
    primary, replica = SharedMap(), SharedMap(logger=logger)
    sets = [commit(primary, a=i) for i in range(4)]
    dump = primary.ref().dump()
    replica.apply_changes(sets[:2])
    with caplog.at_level(logging.DEBUG, logger=logger.name):
        replica.apply_changes([sets[0], sets[1], sets[1], sets[2], sets[2], sets[3], dump])
    assert replica.version == 4 and replica.ref().get("a") == 3
    # sets[0] has version 0: a dump as well.
    assert caplog.text.count("ignoring an old change set") == 3
    assert "ignoring a dump of version 1 (map at version 2)" in caplog.text
    assert "ignoring a dump of version 4 (map at version 4)" in caplog.text
    # A dump in the list moves the chain on: what follows builds on it.
    fresh = SharedMap()
    fresh.apply_changes([primary.ref().dump(), commit(primary, b=1)])
    assert fresh.version == 5 and fresh.ref().to_dict() == {"a": 3, "b": 1}


def test_a_logger_that_fails_cannot_leave_a_list_half_applied() -> None:
    class Failing:
        def debug(self, msg: str, *args: Any) -> None:
            raise RuntimeError("logger down")

    primary, replica = SharedMap(), SharedMap(logger=Failing())
    sets = [commit(primary, a=i) for i in range(3)]
    replica.apply_changes(sets[0])
    with pytest.raises(RuntimeError, match="logger down"):
        replica.apply_changes(sets)  # the replay of sets[0] is logged last
    assert replica.version == 3


# -- lineage fields ------------------------------------------------------------


def test_extra_fields_are_accepted_and_kept_in_the_history() -> None:
    m = SharedMap()
    commit(m, a=1)
    m.apply_changes({"version": 1, "remove": [], "add": ["b", 2, VERSION_KEY, 2],
                     "txid": "t2", "base_txid": "t1"})
    assert m.version == 2 and m.ref().get("b") == 2
    (entry,) = m.ref(read_only=True).updates_slice(1) or []
    assert entry == {"version": 1, "remove": [], "add": ["b", 2, VERSION_KEY, 2],
                     "txid": "t2", "base_txid": "t1"}
    assert type(entry) is FrozenDict
    replica = SharedMap()
    replica.apply_changes(m.ref().dump())
    replica.apply_changes(FrozenDict(entry, version=2, add=["c", 3], txid="t3"))
    assert replica.version == 3


# -- never initialised, or altered behind the core's back ---------------------


UNINITIALISED = """
    import sys
    from caf_sharing import SharedMap, MapRef, FrozenDict, FrozenList
    from caf_sharing._fastmap import _trie_invariants

    def expect_type_error(what, fn):
        try:
            fn()
        except TypeError as exc:
            assert any(word in str(exc) for word in ("never initialised", "immutable",
                                                     "already initialised")), (what, exc)
        else:
            sys.exit(f"{what}: no TypeError")

    m = SharedMap.__new__(SharedMap)
    good = SharedMap()
    for what, fn in [
        ("ref", lambda: m.ref()), ("ref(True)", lambda: m.ref(True)),
        ("version", lambda: m.version), ("no_exec", lambda: m.no_exec),
        ("max_updates", lambda: m.max_updates),
        ("set max_updates", lambda: setattr(m, "max_updates", 3)),
        ("commit", lambda: m.commit(good.ref())), ("reset", lambda: m.reset()),
        ("apply_changes", lambda: m.apply_changes(
            {"version": 0, "remove": [], "add": ["__ca_version__", 1]})),
    ]:
        expect_type_error("SharedMap." + what, fn)
    assert "never initialised" in repr(m)

    r = MapRef.__new__(MapRef)
    for what, fn in [
        ("get", lambda: r.get("a")), ("get non-str", lambda: r.get(1)),
        ("getitem", lambda: r["a"]), ("contains", lambda: "a" in r), ("len", lambda: len(r)),
        ("iter", lambda: iter(r)), ("keys", lambda: r.keys()), ("values", lambda: r.values()),
        ("items", lambda: r.items()), ("to_dict", lambda: r.to_dict()),
        ("version", lambda: r.version), ("is_read_only", lambda: r.is_read_only),
        ("has_changed", lambda: r.has_changed), ("changes", lambda: r.changes),
        ("set", lambda: r.set("a", 1)), ("delete", lambda: r.delete("a")),
        ("set_fun", lambda: r.set_fun("f", [], "return 1")),
        ("apply_method", lambda: r.apply_method("f", [])), ("prepare", lambda: r.prepare()),
        ("dump", lambda: r.dump()), ("updates_slice", lambda: r.updates_slice(1)),
        ("commit", lambda: good.commit(r)), ("_trie_invariants", lambda: _trie_invariants(r)),
    ]:
        expect_type_error("MapRef." + what, fn)
    assert "never initialised" in repr(r)
    try:
        _trie_invariants(None)
    except TypeError:
        pass
    else:
        sys.exit("_trie_invariants(None): no TypeError")

    ref = good.ref().set("a", 1)
    for it in (iter(ref), iter(ref.keys()), iter(ref.values()), iter(ref.items())):
        blank = type(it).__new__(type(it))
        expect_type_error(type(it).__name__, lambda: next(blank))
        assert list(it)  # the real one is untouched
    for view in (ref.keys(), ref.values(), ref.items()):
        blank = type(view).__new__(type(view))  # empty, and harmless
        assert len(blank) == 0 and list(blank) == [] and "a" not in blank

    expect_type_error("SharedMap.__init__ again", lambda: good.__init__(no_exec=True))
    assert not good.no_exec and good.ref().get("a") is None

    for cls in (FrozenDict, FrozenList):
        blank = cls.__new__(cls)
        expect_type_error(cls.__name__ + " set", lambda: good.ref().set("x", blank))
        expect_type_error(cls.__name__ + " nested", lambda: good.ref().set("x", {"y": [blank]}))
        expect_type_error(cls.__name__ + " in FrozenDict", lambda: FrozenDict(x=blank))
        expect_type_error(cls.__name__ + " in FrozenList", lambda: FrozenList([blank]))
    print("ok")
"""


def test_objects_never_initialised_raise_type_error() -> None:
    done = run_child(UNINITIALISED)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


FORGED_HEIGHT = """
    from caf_sharing import SharedMap, FrozenDict, FrozenList
    from caf_sharing.errors import InvalidChangeSetError, InvalidTypeError, InvalidValueError

    # Built by hand, 100,000 levels deep, each level reporting height 0.
    deep = FrozenDict.__new__(FrozenDict)
    for _ in range(100_000):
        up = FrozenDict.__new__(FrozenDict)
        dict.__setitem__(up, "d", deep)
        deep = up
    m = SharedMap()
    ref = m.ref()
    for put in (lambda: ref.set("k", deep), lambda: ref.set("k", [1, {"x": deep}]),
                lambda: FrozenDict(k=deep)):
        try:
            put()
        except InvalidTypeError as exc:
            assert "never initialised" in str(exc)
        else:
            raise SystemExit("accepted a forged FrozenDict")
    try:
        m.apply_changes({"version": 0, "remove": [], "add": ["k", deep, "__ca_version__", 1]})
    except InvalidChangeSetError as exc:
        assert "never initialised" in str(exc)
    else:
        raise SystemExit("applied a forged FrozenDict")
    assert m.version == 0 and not ref.has_changed

    # Sealed ones altered through list methods: a chain and a cycle.
    chain = FrozenList([0])
    for _ in range(100_000):
        up = FrozenList([0])
        list.append(up, chain)
        chain = up
    cycle = FrozenList([1])
    list.append(cycle, cycle)
    for value in (chain, cycle):
        r = SharedMap().ref().set("k", value)
        try:
            r.to_dict()
        except InvalidValueError as exc:
            assert "deeper than MAX_DEPTH" in str(exc)
        else:
            raise SystemExit("to_dict of an altered value returned")
        r.dump()
        len(r)

    # A stored empty container cannot be filled through __init__.
    r = SharedMap().ref().set("e", []).set("f", {})
    for key in ("e", "f"):
        try:
            r.get(key).__init__([("a", 1)])
        except TypeError:
            pass
        else:
            raise SystemExit("refilled a stored value")
    assert r.get("e") == [] and r.get("f") == {}
    print("ok")
"""


def test_forged_and_altered_frozen_values_never_crash() -> None:
    done = run_child(FORGED_HEIGHT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_every_type_of_the_core_survives_being_made_by_new() -> None:
    # Beyond the cases above: every method of every class of the module, on
    # an instance made by __new__, with a few argument shapes. Each call may
    # work or raise, but the process must live.
    done = run_child("""
        from caf_sharing import _fastmap, SharedMap
        m = SharedMap()
        ref = m.ref().set("a", [1])
        types = {t for t in vars(_fastmap).values()
                 if isinstance(t, type) and t.__module__ == "caf_sharing._fastmap"}
        types |= {type(iter(ref)), type(ref.keys()), type(ref.values()), type(ref.items())}
        argsets = [(), ("a",), ("a", 1), ("f", [], "return 1"), (0,), (m,), (ref,), ([],),
                   ({"version": 0, "remove": [], "add": ["__ca_version__", 1]},)]
        calls = 0
        for t in sorted(types, key=lambda t: t.__name__):
            obj = t.__new__(t)
            for name in dir(obj):
                if name in ("__init__", "__class__", "__new__", "__init_subclass__"):
                    continue  # __init__ would initialise it: tested above
                try:
                    attr = getattr(obj, name)
                except Exception:
                    continue
                if not callable(attr):
                    continue
                for args in argsets:
                    calls += 1
                    try:
                        attr(*args)
                    except Exception:
                        pass
            for use in (lambda: m.commit(obj), lambda: ref.set("x", obj),
                        lambda: m.apply_changes(obj), lambda: _fastmap._trie_invariants(obj)):
                try:
                    use()
                except Exception:
                    pass
        print(calls)
    """)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 1000


def test_in_process_checks_match_the_child_ones() -> None:
    # The cheap cases also run here, so a failure shows its traceback.
    with pytest.raises(TypeError, match="never initialised"):
        SharedMap.__new__(SharedMap).ref()
    with pytest.raises(TypeError, match="never initialised"):
        MapRef.__new__(MapRef).get("a")
    with pytest.raises(TypeError, match="never initialised"):
        _trie_invariants(MapRef.__new__(MapRef))
    with pytest.raises(InvalidTypeError, match="FrozenList was never initialised"):
        SharedMap().ref().set("k", FrozenList.__new__(FrozenList))
    late = FrozenDict.__new__(FrozenDict)
    late.__init__({"a": [1]})  # initialised late: a real FrozenDict
    assert SharedMap().ref().set("k", late).get("k") == {"a": [1]}
