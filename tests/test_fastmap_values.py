"""Values of the compiled core: what a map accepts, how it freezes it, the
frozen containers, and every kind of bad key, value or change set (right
error class, message naming key and path, nothing changed)."""

from __future__ import annotations

import copy
import enum
import json
import pickle
from collections import OrderedDict, defaultdict
from decimal import Decimal
from typing import Any

import orjson
import pytest

from caf_sharing import FrozenDict, FrozenList, SharedMap
from caf_sharing._fastmap import MAX_DEPTH, VERSION_KEY
from caf_sharing.errors import (
    InvalidChangeSetError,
    InvalidTypeError,
    InvalidValueError,
    SharingError,
)


def nested_lists(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def populated() -> SharedMap:
    m = SharedMap()
    ref = m.ref()
    ref.set("a", 1).set("cfg", {"x": [1, 2]})
    ref.prepare()
    m.commit(ref)
    return m


def snapshot(m: SharedMap) -> tuple[int, dict[str, Any], Any]:
    return m.version, m.ref().to_dict(), m.ref(read_only=True).updates_slice(1)


# -- accepted values -----------------------------------------------------------


GOOD_VALUES: list[Any] = [
    None, True, False, 0, -1, 2 ** 63 - 1, -(2 ** 63), 1.5, -0.0, 1e308, "", "é", "😀",
    "a\x00b", [], {}, [1, "a", None, [2.5]], {"a": {"b": [True, {"c": None}]}},
    nested_lists(MAX_DEPTH),
]


@pytest.mark.parametrize("value", GOOD_VALUES)
def test_good_values_round_trip(value: Any) -> None:
    m = SharedMap()
    ref = m.ref()
    ref.set("k", value)
    assert ref.get("k") == value
    ref.prepare()
    m.commit(ref)
    stored = m.ref().get("k")
    assert stored == value
    assert m.ref().to_dict() == {"k": value}
    assert orjson.loads(orjson.dumps(stored)) == value


def test_tuples_become_frozen_lists() -> None:
    ref = SharedMap().ref()
    ref.set("t", (1, (2, 3), {"a": (4,)}))
    value = ref.get("t")
    assert type(value) is FrozenList
    assert type(value[1]) is FrozenList
    assert type(value[2]["a"]) is FrozenList
    assert value == [1, [2, 3], {"a": [4]}]


def test_subclasses_are_stored_as_the_plain_type() -> None:
    class Color(enum.IntEnum):
        RED = 1

    class Name(str):
        pass

    class Ratio(float):
        pass

    class Items(list):  # type: ignore[type-arg]
        pass

    ref = SharedMap().ref()
    ref.set("e", Color.RED).set("s", Name("x")).set("f", Ratio(0.5))
    ref.set("od", OrderedDict([("b", 1), ("a", 2)]))
    ref.set("dd", defaultdict(list, {"k": [1]}))
    ref.set("l", Items([1]))
    ref.set("keys", {Name("n"): 1})
    assert type(ref["e"]) is int and ref["e"] == 1
    assert type(ref["s"]) is str
    assert type(ref["f"]) is float
    assert type(ref["od"]) is FrozenDict and list(ref["od"]) == ["b", "a"]
    assert type(ref["dd"]) is FrozenDict and ref["dd"] == {"k": [1]}
    assert type(ref["l"]) is FrozenList
    assert type(next(iter(ref["keys"]))) is str


def test_the_caller_keeps_a_mutable_original() -> None:
    original: dict[str, Any] = {"a": [1, 2]}
    ref = SharedMap().ref()
    ref.set("k", original)
    original["a"].append(3)
    original["b"] = 1
    assert ref.get("k") == {"a": [1, 2]}


def test_frozen_values_are_stored_without_copy() -> None:
    frozen = FrozenDict({"a": [1, {"b": 2}]})
    ref = SharedMap().ref()
    ref.set("k", frozen)
    assert ref.get("k") is frozen
    ref.set("inner", {"wrap": frozen})
    assert ref.get("inner")["wrap"] is frozen
    stored = ref.get("k")["a"]
    ref.set("l", stored)
    assert ref.get("l") is stored


# -- frozen containers ---------------------------------------------------------


def test_frozen_dict_behaves_like_a_dict_for_reading() -> None:
    fd = FrozenDict({"a": 1}, b=[2])
    assert isinstance(fd, dict)
    assert fd == {"a": 1, "b": [2]}
    assert {"a": 1, "b": [2]} == fd  # noqa: SIM300 - the reflected comparison is the point
    assert fd["b"] == [2] and type(fd["b"]) is FrozenList
    assert fd.get("zz", 3) == 3
    assert list(fd.items()) == [("a", 1), ("b", [2])]
    assert repr(fd) == "{'a': 1, 'b': [2]}"
    assert fd.copy() == fd and type(fd.copy()) is dict
    assert (fd | {"c": 1}) == {"a": 1, "b": [2], "c": 1}
    assert FrozenDict([("x", 1)]) == {"x": 1}
    assert FrozenDict() == {}
    with pytest.raises(TypeError):
        hash(fd)


def test_frozen_list_behaves_like_a_list_for_reading() -> None:
    fl = FrozenList([1, [2], {"a": 3}])
    assert isinstance(fl, list)
    assert fl == [1, [2], {"a": 3}]
    assert type(fl[1]) is FrozenList and type(fl[2]) is FrozenDict
    assert fl[1:] == [[2], {"a": 3}]
    joined = fl + [4]  # noqa: RUF005 - list concatenation is what is tested
    assert joined == [1, [2], {"a": 3}, 4] and type(joined) is list
    assert fl.index([2]) == 1 and fl.count(1) == 1
    assert repr(fl) == "[1, [2], {'a': 3}]"
    assert FrozenList() == [] and FrozenList(iter(range(3))) == [0, 1, 2]


DICT_MUTATIONS = {
    "__setitem__": lambda d: d.__setitem__("a", 2),
    "__delitem__": lambda d: d.__delitem__("a"),
    "clear": lambda d: d.clear(),
    "pop": lambda d: d.pop("a"),
    "popitem": lambda d: d.popitem(),
    "setdefault": lambda d: d.setdefault("z", 1),
    "update": lambda d: d.update(z=1),
    "__ior__": lambda d: d.__ior__({"z": 1}),
    "__init__": lambda d: d.__init__({"z": 1}),
}

LIST_MUTATIONS = {
    "__setitem__": lambda x: x.__setitem__(0, 2),
    "__setitem__ slice": lambda x: x.__setitem__(slice(0, 1), [2]),
    "__delitem__": lambda x: x.__delitem__(0),
    "append": lambda x: x.append(1),
    "extend": lambda x: x.extend([1]),
    "insert": lambda x: x.insert(0, 1),
    "pop": lambda x: x.pop(),
    "remove": lambda x: x.remove(1),
    "clear": lambda x: x.clear(),
    "sort": lambda x: x.sort(),
    "reverse": lambda x: x.reverse(),
    "__iadd__": lambda x: x.__iadd__([1]),
    "__imul__": lambda x: x.__imul__(2),
    "__init__": lambda x: x.__init__([5]),
}


@pytest.mark.parametrize("name", DICT_MUTATIONS)
def test_frozen_dict_mutators_raise(name: str) -> None:
    fd = FrozenDict({"a": 1, "b": 2})
    with pytest.raises(TypeError, match="immutable"):
        DICT_MUTATIONS[name](fd)
    assert fd == {"a": 1, "b": 2}


@pytest.mark.parametrize("name", LIST_MUTATIONS)
def test_frozen_list_mutators_raise(name: str) -> None:
    fl = FrozenList([1, 2])
    with pytest.raises(TypeError, match="immutable"):
        LIST_MUTATIONS[name](fl)
    assert fl == [1, 2]


def test_augmented_assignment_on_frozen_containers() -> None:
    fl = FrozenList([1])
    fd = FrozenDict({"a": 1})
    with pytest.raises(TypeError):
        fl += [2]
    with pytest.raises(TypeError):
        fl *= 2
    with pytest.raises(TypeError):
        fd |= {"b": 2}
    assert fl == [1] and fd == {"a": 1}


def test_stored_values_cannot_be_mutated() -> None:
    ref = SharedMap().ref()
    ref.set("k", {"a": [1]})
    with pytest.raises(TypeError):
        ref.get("k")["a"] = 2
    with pytest.raises(TypeError):
        ref.get("k")["a"].append(2)
    assert ref.get("k") == {"a": [1]}


@pytest.mark.parametrize("value", [
    FrozenDict({"a": [1, {"b": (2, 3)}], "c": None}),
    FrozenList([1, [2, [3]], {"x": "y"}]),
])
def test_frozen_containers_pickle_and_copy(value: Any) -> None:
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        back = pickle.loads(pickle.dumps(value, protocol=protocol))
        assert back == value and type(back) is type(value)
    assert copy.copy(value) is value
    assert copy.deepcopy(value) is value
    deep = copy.deepcopy({"wrap": value})
    assert deep["wrap"] is value


def test_frozen_containers_serialize() -> None:
    value = FrozenDict({"a": [1, 2.5, None, True, "é", {"b": []}]})
    assert orjson.loads(orjson.dumps(value)) == value
    assert json.loads(json.dumps(value)) == value


def test_frozen_constructors_validate() -> None:
    with pytest.raises(InvalidValueError, match=r"FrozenDict value at \['a'\]\[1\]: float nan"):
        FrozenDict({"a": [1, float("nan")]})
    with pytest.raises(InvalidTypeError, match=r"dict key 1 \(int\) is not a str"):
        FrozenDict({1: 2})
    with pytest.raises(InvalidTypeError, match=r"FrozenList item at \[0\]\['x'\]: type set"):
        FrozenList([{"x": {1}}])
    with pytest.raises(InvalidValueError, match="MAX_DEPTH"):
        FrozenList([nested_lists(MAX_DEPTH)])
    assert FrozenList(nested_lists(MAX_DEPTH)) == nested_lists(MAX_DEPTH)
    with pytest.raises(TypeError):
        FrozenList(5)  # type: ignore[arg-type]


# -- bad values ----------------------------------------------------------------


def _cycle() -> list[Any]:
    cycle: list[Any] = []
    cycle.append(cycle)
    return cycle


# (value, error class, expected message after "value for key 'cfg'")
BAD_VALUES: list[tuple[Any, type[Exception], str]] = [
    (float("nan"), InvalidValueError, ": float nan is not allowed (JSON has no NaN)"),
    (float("inf"), InvalidValueError, ": float inf is not allowed (JSON has no Infinity)"),
    (float("-inf"), InvalidValueError, ": float -inf is not allowed"),
    (2 ** 63, InvalidValueError, ": int 9223372036854775808 is outside the 64-bit range"),
    (-(2 ** 63) - 1, InvalidValueError, ": int -9223372036854775809 is outside"),
    ("\ud800", InvalidValueError, ": str with a lone surrogate at index 0"),
    ("ab\udfff", InvalidValueError, ": str with a lone surrogate at index 2"),
    ({1, 2}, InvalidTypeError, ": type set is not JSON data"),
    (frozenset(), InvalidTypeError, ": type frozenset is not JSON data"),
    (b"x", InvalidTypeError, ": type bytes is not JSON data"),
    (bytearray(b"x"), InvalidTypeError, ": type bytearray is not JSON data"),
    (object(), InvalidTypeError, ": type object is not JSON data"),
    (1j, InvalidTypeError, ": type complex is not JSON data"),
    (Decimal("1.5"), InvalidTypeError, ": type Decimal is not JSON data"),
    (range(3), InvalidTypeError, ": type range is not JSON data"),
    (len, InvalidTypeError, ": type builtin_function_or_method is not JSON data"),
    ({"a": [0, 1, 2, float("nan")]}, InvalidValueError,
     " at ['a'][3]: float nan is not allowed (JSON has no NaN)"),
    ({"a": {"b": {"c": b"x"}}}, InvalidTypeError, " at ['a']['b']['c']: type bytes"),
    ([0, [1, (2, {"x": {3}})]], InvalidTypeError, " at [1][1][1]['x']: type set"),
    ({1: "a"}, InvalidTypeError, ": dict key 1 (int) is not a str"),
    ({"a": {None: 1}}, InvalidTypeError, " at ['a']: dict key None (NoneType) is not a str"),
    ({("a",): 1}, InvalidTypeError, ": dict key ('a',) (tuple) is not a str"),
    ({"ok": {"\udc00": 1}}, InvalidValueError,
     " at ['ok']: dict key '\\udc00': str with a lone surrogate"),
    (nested_lists(MAX_DEPTH + 1), InvalidValueError, "nesting deeper than MAX_DEPTH=64"),
    ({"a": FrozenList(nested_lists(MAX_DEPTH))}, InvalidValueError,
     " at ['a']: nesting deeper than MAX_DEPTH=64"),
    (_cycle(), InvalidValueError, "nesting deeper than MAX_DEPTH=64"),
]


@pytest.mark.parametrize(("value", "cls", "message"), BAD_VALUES,
                         ids=[repr(v[2])[:50] for v in BAD_VALUES])
def test_bad_values_are_rejected_and_change_nothing(value: Any, cls: type[Exception],
                                                    message: str) -> None:
    m = populated()
    before = snapshot(m)
    ref = m.ref()
    ref.set("other", 1)
    with pytest.raises(cls) as info:
        ref.set("cfg", value)
    text = str(info.value)
    assert text.startswith("value for key 'cfg'")
    assert message in text
    assert isinstance(info.value, SharingError)
    assert isinstance(info.value, TypeError if cls is InvalidTypeError else ValueError)
    assert ref.to_dict() == {"a": 1, "cfg": {"x": [1, 2]}, "other": 1}
    assert ref.prepare()["add"] == ["other", 1, VERSION_KEY, 2]
    assert snapshot(m) == before


def test_bad_value_inside_set_fun_args() -> None:
    ref = SharedMap().ref()
    with pytest.raises((TypeError, ValueError)):
        ref.set_fun("f", [1], "return 1")  # type: ignore[list-item]
    assert not ref.has_changed


# -- bad keys ------------------------------------------------------------------


BAD_KEYS: list[tuple[Any, type[Exception], str]] = [
    (1, InvalidTypeError, "key 1: keys must be str, not int"),
    (None, InvalidTypeError, "key None: keys must be str, not NoneType"),
    (b"a", InvalidTypeError, "key b'a': keys must be str, not bytes"),
    (("a",), InvalidTypeError, "key ('a',): keys must be str, not tuple"),
    (["a"], InvalidTypeError, "key ['a']: keys must be str, not list"),
    (VERSION_KEY, InvalidValueError, "key '__ca_version__': it is reserved"),
    ("\ud800x", InvalidValueError, "key '\\ud800x': str with a lone surrogate at index 0"),
]


@pytest.mark.parametrize(("key", "cls", "message"), BAD_KEYS,
                         ids=[repr(k[0]) for k in BAD_KEYS])
@pytest.mark.parametrize("action", ["set", "delete", "set_fun"])
def test_bad_keys_are_rejected_and_change_nothing(key: Any, cls: type[Exception], message: str,
                                                  action: str) -> None:
    m = populated()
    before = snapshot(m)
    ref = m.ref()
    with pytest.raises(cls) as info:
        if action == "set":
            ref.set(key, 1)
        elif action == "delete":
            ref.delete(key)
        else:
            ref.set_fun(key, [], "return 1")
    verb = "delete" if action == "delete" else "set"
    assert str(info.value) == f"cannot {verb} {message}" or message in str(info.value)
    assert str(info.value).startswith(f"cannot {verb} key ")
    assert not ref.has_changed
    assert ref.to_dict() == before[1]
    assert snapshot(m) == before


# -- bad change sets -----------------------------------------------------------


def add_of(*pairs: Any) -> dict[str, Any]:
    return {"version": 1, "remove": [], "add": list(pairs)}


BAD_CHANGE_SETS: list[tuple[Any, str]] = [
    (None, "change set must be a dict, got NoneType"),
    ("x", "change set must be a dict, got str"),
    (1, "change set must be a dict, got int"),
    ({"remove": [], "add": []}, "change set has no 'version' field"),
    ({"version": 1, "add": []}, "change set has no 'remove' field"),
    ({"version": 1, "remove": []}, "change set has no 'add' field"),
    ({"version": 1, "remove": [], "add": [], 2: 1}, "has a field 2 whose name is not a str"),
    ({"version": 1, "remove": [], "add": [], "note": {1, 2}},
     "change set field 'note': type set is not JSON data"),
    ({"version": 1, "remove": [], "add": [], "txid": 5},
     "change set 'txid' must be None or a str of 1-64 characters"),
    ({"version": 1, "remove": [], "add": [], "base_txid": "x" * 65},
     "change set 'base_txid' must be None or a str of 1-64 characters"),
    ({"version": "1", "remove": [], "add": []}, "'version' must be an int, got '1' (str)"),
    ({"version": 1.0, "remove": [], "add": []}, "'version' must be an int, got 1.0 (float)"),
    ({"version": True, "remove": [], "add": []}, "'version' must be an int, got True (bool)"),
    ({"version": None, "remove": [], "add": []}, "'version' must be an int"),
    ({"version": -1, "remove": [], "add": []}, "'version' must be in [0, 2**53 - 1)"),
    ({"version": 2 ** 63, "remove": [], "add": []}, "'version' must be in [0, 2**53 - 1)"),
    ({"version": 2 ** 53 - 1, "remove": [], "add": []},
     "'version' must be in [0, 2**53 - 1) (versions stay below 2**53), got 9007199254740991"),
    ({"version": 1, "remove": "a", "add": []}, "'remove' must be a list, got str"),
    ({"version": 1, "remove": {"a": 1}, "add": []}, "'remove' must be a list, got dict"),
    ({"version": 1, "remove": [], "add": {"a": 1}}, "'add' must be a list, got dict"),
    ({"version": 1, "remove": [], "add": None}, "'add' must be a list, got NoneType"),
    ({"version": 1, "remove": ["a", 2], "add": []},
     "'remove'[1] must be a str key, got 2 (int)"),
    ({"version": 1, "remove": [VERSION_KEY], "add": []},
     "'remove'[0] removes the reserved key '__ca_version__'"),
    ({"version": 1, "remove": ["\ud800"], "add": []},
     "'remove'[0] key '\\ud800': str with a lone surrogate"),
    (add_of("a"), "'add' must alternate keys and values (even length), got 1 items"),
    (add_of("a", 1, "b"), "(even length), got 3 items"),
    (add_of(1, 1), "'add'[0] must be a str key, got 1 (int)"),
    (add_of("a", 1, None, 2), "'add'[2] must be a str key, got None (NoneType)"),
    (add_of("a", 1, "cfg", {"a": [0, 1, 2, float("nan")]}),
     "change set 'add'[3] value for key 'cfg' at ['a'][3]: float nan is not allowed"),
    (add_of("cfg", {"a": {1: 2}}), "'add'[1] value for key 'cfg' at ['a']: dict key 1 (int)"),
    (add_of("cfg", {1, 2}), "'add'[1] value for key 'cfg': type set is not JSON data"),
    (add_of("cfg", nested_lists(MAX_DEPTH + 1)), "nesting deeper than MAX_DEPTH=64"),
    (add_of("\udfff", 1), "'add'[0] key '\\udfff': str with a lone surrogate"),
    (add_of(VERSION_KEY, "2"), "'__ca_version__' must be an int, got '2' (str)"),
    (add_of(VERSION_KEY, True), "'__ca_version__' must be an int, got True (bool)"),
    (add_of(VERSION_KEY, 2.0), "'__ca_version__' must be an int, got 2.0 (float)"),
    (add_of(VERSION_KEY, 1), "'__ca_version__' must be its 'version' + 1 = 2, got 1"),
    (add_of(VERSION_KEY, 0), "'__ca_version__' must be its 'version' + 1 = 2, got 0"),
    (add_of(VERSION_KEY, 3), "'__ca_version__' must be its 'version' + 1 = 2, got 3"),
    (add_of(VERSION_KEY, 2 ** 63 - 1), "'version' + 1 = 2, got 9223372036854775807"),
    (add_of(VERSION_KEY, 2 ** 63), "'version' + 1 = 2, got 9223372036854775808"),
    (add_of(VERSION_KEY, 2, VERSION_KEY, 2), "'add'[2] holds '__ca_version__' a second time"),
    ({"version": 0, "remove": [], "add": [VERSION_KEY, -1]},
     "change set is a dump (version 0): its '__ca_version__' must be in [0, 2**53), got -1"),
    ({"version": 0, "remove": [], "add": [VERSION_KEY, 2 ** 53]},
     "must be in [0, 2**53), got 9007199254740992"),
    ({"version": 0, "remove": [], "add": [VERSION_KEY, 2 ** 63 - 1]},
     "must be in [0, 2**53), got 9223372036854775807"),
    ({"version": 0, "remove": [], "add": ["a", 1]},
     "change set is a dump (version 0) without a '__ca_version__' pair"),
    ({"version": 0, "remove": [], "add": ["a", 1, VERSION_KEY, 0]},
     "change set is a dump of version 0, the empty map, but adds 1 keys"),
    ({"version": 0, "remove": ["a"], "add": [VERSION_KEY, 5]},
     "change set is a dump (version 0) of version 5: it must not remove keys, got 1"),
    # The first set of a list is an ignored replay, and nothing changes at all.
    ([{"version": 0, "remove": [], "add": [VERSION_KEY, 0]}, "oops"],
     "change set [1] must be a dict, got str"),
    # The first set would apply, but a list is applied whole or not at all.
    ([add_of("b", 2), {"version": 2, "remove": [], "add": [VERSION_KEY, 4]}],
     "change set [1] '__ca_version__' must be its 'version' + 1 = 3, got 4"),
    ([{"version": 1, "remove": [], "add": [1]}], "change set [0] 'add' must alternate"),
]


@pytest.mark.parametrize(("changes", "message"), BAD_CHANGE_SETS,
                         ids=[m[:50] for _, m in BAD_CHANGE_SETS])
def test_bad_change_sets_are_rejected_and_change_nothing(changes: Any, message: str) -> None:
    m = SharedMap()
    ref = m.ref()
    ref.set("a", 1)
    ref.prepare()
    m.commit(ref)  # version 1, so add_of(...) sets are current
    before = snapshot(m)
    with pytest.raises(InvalidChangeSetError) as info:
        m.apply_changes(changes)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)
    assert snapshot(m) == before


def test_change_set_of_frozen_containers_is_accepted() -> None:
    m = SharedMap()
    m.apply_changes(FrozenDict({"version": 0, "remove": (), "add": ("a", 1, VERSION_KEY, 1)}))
    assert m.version == 1 and m.ref().to_dict() == {"a": 1}


def test_change_set_keys_and_values_are_normalised() -> None:
    class Name(str):
        pass

    m = SharedMap()
    m.apply_changes({"version": 0, "remove": [], "add": [Name("a"), (1, 2), VERSION_KEY, 1]})
    m.apply_changes({"version": 1, "remove": [Name("a")], "add": [Name("b"), {"x": (1,)}]})
    assert m.ref().to_dict() == {"b": {"x": [1]}}
    assert all(type(k) is str for k in m.ref())
    result = m.ref(read_only=True).updates_slice(1)
    assert result is not None
    (entry,) = result
    assert entry == {"version": 1, "remove": ["a"], "add": ["b", {"x": [1]}, VERSION_KEY, 2]}
    assert type(entry["remove"][0]) is str


def test_frozen_containers_stay_out_of_the_cyclic_collector() -> None:
    """Sealed frozen containers are trees of JSON data: the collector never
    needs to visit them (a busy node spent most of a commit in full
    collections over map histories and values before)."""
    import gc

    m = SharedMap()
    ref = m.ref()
    ref.set("d", {"a": [1, {"b": 2}]}).set("l", [[1], {"c": []}])
    ref.prepare()
    m.commit(ref)
    changes = ref.changes
    assert changes is not None
    read = m.ref(read_only=True)
    frozen = [read.get("d"), read.get("d")["a"], read.get("d")["a"][1], read.get("l"),
              read.get("l")[0], read.get("l")[1], changes, changes["add"], changes["remove"],
              FrozenDict(x={"y": [1]}), FrozenList([{"z": 1}])]
    assert [type(v).__name__ for v in frozen[:3]] == ["FrozenDict", "FrozenList", "FrozenDict"]
    assert not any(gc.is_tracked(v) for v in frozen)
    replica = SharedMap()
    replica.apply_changes(changes)
    assert not gc.is_tracked(replica.ref(read_only=True).get("d"))
    # The plain copies it hands out to be changed are ordinary, tracked values.
    plain = read.to_dict()
    assert gc.is_tracked(plain["d"]) and gc.is_tracked(plain["d"]["a"])
