"""Fuzzing of SharedMap.apply_changes and of the wire decoders (issue 7).

Random, structured and mutated change sets, dumps and lists of them go to a
map with some history. Each must either apply, with the result a small model
predicts, or raise a documented error (InvalidChangeSetError,
MissedUpdateError) with the map exactly as it was; whatever breaks the
version rules must be refused; nothing may crash. The decoders get random
and mutated bytes: each returns what orjson returns, within 64-bit integers,
or raises its documented error.

The suite runs a small number of examples; ``scripts/fuzz_wire.py`` runs the
same properties for as many as asked.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from caf_sharing import FrozenDict, FrozenList, SharedMap
from caf_sharing._fastmap import VERSION_KEY, _map_with_hash_bits, _trie_invariants
from caf_sharing.backends.wire import (
    decode_changes,
    decode_fields,
    decode_value,
    decode_version,
    make_dump,
)
from caf_sharing.errors import BackendError, InvalidChangeSetError, MissedUpdateError

LIMIT = 2 ** 53
INT64 = range(-(2 ** 63), 2 ** 63)
#: Examples per property: few in the suite; scripts/fuzz_wire.py sets more.
SUITE_EXAMPLES = int(os.environ.get("CAF_FUZZ_EXAMPLES", "60"))
#: What the properties saw: examples per property and apply outcomes, for
#: scripts/fuzz_wire.py's report.
SEEN: Counter[str] = Counter()


class Name(str):
    """A str subclass: accepted as a key, stored as a plain str."""


# -- strategies ------------------------------------------------------------------

ANY_CHAR = st.characters(codec=None, categories=None)  # lone surrogates included
TEXT = st.text(ANY_CHAR, max_size=4)
GOOD_KEY = st.sampled_from(["a", "b", "c", "k1", "é", ""])
KEY = (GOOD_KEY | GOOD_KEY.map(Name) | TEXT | st.just(VERSION_KEY)
       | st.integers(-2, 2) | st.none() | st.binary(max_size=2))
EDGE_INTS = st.sampled_from([2 ** 63 - 1, 2 ** 63, -(2 ** 63), -(2 ** 63) - 1, 2 ** 64,
                             LIMIT - 1, LIMIT, 10 ** 30])
SCALAR = (st.none() | st.booleans() | st.integers(-1000, 1000) | EDGE_INTS | st.floats()
          | TEXT)
VALUE = st.recursive(
    SCALAR,
    lambda inner: (st.lists(inner, max_size=3) | st.tuples(inner, inner)
                   | st.dictionaries(KEY, inner, max_size=3) | st.frozensets(st.integers(),
                                                                             max_size=2)),
    max_leaves=8,
) | st.integers(60, 70).map(lambda depth: nested(depth))


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def versions(cur: int) -> st.SearchStrategy[Any]:
    near = [cur - 1, cur, cur + 1, cur + 2, 0, 1, 2, LIMIT - 2, LIMIT - 1, LIMIT,
            2 ** 63 - 1, 2 ** 63, 2 ** 64, -1]
    return (st.sampled_from(near) | st.integers(-3, 12)
            | st.sampled_from([True, False, 1.0, "1", None, [1]]))


@st.composite
def structured(draw: st.DrawFn, cur: int) -> Any:
    """A change set shaped like the wire format, with random parts."""
    version = draw(versions(cur))
    remove: Any = draw(st.lists(KEY, max_size=3))
    pairs = draw(st.lists(st.tuples(KEY, VALUE), max_size=3))
    add: list[Any] = [x for pair in pairs for x in pair]
    for _ in range(draw(st.integers(0, 2))):  # the version pair: absent, once or twice
        made = draw(versions(cur + 1) | st.sampled_from(
            [version + 1 if type(version) is int else 1]))
        add[2 * draw(st.integers(0, len(add) // 2)):0] = [VERSION_KEY, made]
    if draw(st.booleans()) and add:
        add.append(draw(KEY))  # odd length
    changes: dict[Any, Any] = {"version": version,
                               "remove": draw(st.sampled_from([list, tuple]))(remove),
                               "add": add}
    for field in draw(st.lists(st.sampled_from(["version", "remove", "add"]), max_size=1)):
        del changes[field]
    changes.update(draw(st.dictionaries(st.sampled_from(["txid", "base", 1, "x"]), VALUE,
                                        max_size=2)))
    if draw(st.integers(0, 9)) == 0:
        changes = {"version": version, "remove": draw(VALUE), "add": draw(VALUE)}
    return changes


def real_changes(m: SharedMap, draw: st.DrawFn, count: int) -> list[Any]:
    """Up to `count` valid change sets that follow `m`, made on a copy of
    it (none past the last version)."""
    copy = SharedMap()
    if m.version:
        copy.apply_changes(m.ref(read_only=True).dump())
    made = []
    for _ in range(count):
        if copy.version == LIMIT - 1:
            break
        ref = copy.ref()
        for key, value in draw(st.lists(st.tuples(GOOD_KEY, st.none() | st.integers(0, 9)),
                                        min_size=1, max_size=3)):
            if value is None:
                ref.delete(key)
            else:
                ref.set(key, value)
        made.append(ref.prepare())
        copy.commit(ref)
    return made


MUTATIONS: list[Callable[[dict[str, Any], Any], None]] = [
    lambda c, x: c.__setitem__("version", x),
    lambda c, x: c["add"].__setitem__(slice(-1, None), [x]),  # the pair's value
    lambda c, x: c["add"].extend([VERSION_KEY, x]),
    lambda c, x: c["add"].insert(0, x),
    lambda c, x: c["add"].extend(["k", x]),
    lambda c, x: c["remove"].append(x),
    lambda c, x: c.__setitem__("remove", x),
    lambda c, x: c.__setitem__("add", x),
    lambda c, x: c.pop("version"),
    lambda c, x: c.__setitem__("txid", x),
    lambda c, x: c.__setitem__(x if isinstance(x, str | int) else "y", x),
]


@st.composite
def mutated(draw: st.DrawFn, m: SharedMap) -> Any:
    """A real change set, dump or recorded one, with one part replaced."""
    sources: list[Any] = [*real_changes(m, draw, 1), m.ref(read_only=True).dump()]
    old = m.ref(read_only=True).updates_slice(max(1, m.version - 2))
    sources += old or []
    changes = orjson.loads(orjson.dumps(draw(st.sampled_from(sources))))  # plain, mutable
    draw(st.sampled_from(MUTATIONS))(changes, draw(versions(m.version) | VALUE | KEY))
    return changes


@st.composite
def inputs(draw: st.DrawFn, m: SharedMap) -> Any:
    """Anything apply_changes may be handed: one change set or a list."""
    real = real_changes(m, draw, 1) or [{}]
    one = structured(m.version) | mutated(m) | st.sampled_from(real) | VALUE
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(one)
    chain: list[Any] = real_changes(m, draw, draw(st.integers(1, 4)))
    recorded = m.ref(read_only=True).updates_slice(max(1, m.version - 1))
    if recorded:  # replays of recorded change sets
        chain[:0] = draw(st.lists(st.sampled_from(recorded), max_size=2))
    if kind == 1:
        return chain
    position = draw(st.integers(0, len(chain)))
    chain[position:position] = [draw(one)]
    if kind == 2:
        return chain
    return tuple(draw(st.permutations(chain)))


@st.composite
def maps(draw: st.DrawFn) -> SharedMap:
    m = _map_with_hash_bits(draw(st.sampled_from([64, 64, 3])),
                            max_updates=draw(st.sampled_from([0, 2, 100])))
    start = draw(st.sampled_from([0, 0, 5, LIMIT - 4, LIMIT - 2, LIMIT - 1]))
    if start:
        m.apply_changes({"version": 0, "remove": [], "add": ["a", 1, VERSION_KEY, start]})
    for _ in range(draw(st.integers(0, 2))):
        if m.version < LIMIT - 1:
            m.apply_changes(real_changes(m, draw, 1)[0])
    return m


# -- the model ----------------------------------------------------------------------


def norm(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [norm(v) for v in value]
    if isinstance(value, dict):
        return {str(k): norm(v) for k, v in value.items()}
    if isinstance(value, str):
        return str(value)
    return value


def model_apply(version: int, content: dict[str, Any], changes: Any
                ) -> tuple[int, dict[str, Any]]:
    """What an accepted input does (the rules of DESIGN section 3)."""
    for c in changes if isinstance(changes, list | tuple) else [changes]:
        add = list(c["add"])
        pairs = [(str(k), v) for k, v in zip(add[::2], add[1::2], strict=True)]
        made = [v for k, v in pairs if k == VERSION_KEY]
        new = made[0] if made else c["version"] + 1
        user = {k: norm(v) for k, v in pairs if k != VERSION_KEY}
        if c["version"] == 0:
            if new > version:
                version, content = new, user
        elif c["version"] == version:
            for k in c["remove"]:
                content.pop(str(k), None)
            content.update(user)
            version = new
    return version, content


def breaks_version_rules(c: Any) -> bool:
    """Whether a dict with a well-typed version and add list breaks the
    version rules (such a change set must be refused)."""
    if not isinstance(c, dict) or type(c.get("version")) is not int:
        return False
    base, add = c["version"], c.get("add")
    if not isinstance(add, list | tuple) or len(add) % 2:
        return False
    made = [add[i + 1] for i in range(0, len(add), 2) if add[i] == VERSION_KEY]
    if not 0 <= base < LIMIT - 1 or len(made) > 1:
        return True
    if not made:
        return base == 0
    value = made[0]
    if type(value) is not int:
        return True
    if base == 0:
        return not 0 <= value < LIMIT
    return value != base + 1


def state(m: SharedMap) -> Any:
    ref = m.ref(read_only=True)
    return (m.version, ref.to_dict(),
            [ref.updates_slice(v) for v in (1, m.version - 2, m.version - 1, m.version)])


def check_apply(m: SharedMap, changes: Any) -> str:
    """The property; returns what happened (for statistics)."""
    before = state(m)
    try:
        m.apply_changes(changes)
    except (InvalidChangeSetError, MissedUpdateError) as exc:
        assert state(m) == before, f"{type(exc).__name__} left the map changed"
        outcome = type(exc).__name__
    else:
        elements = changes if isinstance(changes, list | tuple) else [changes]
        assert not any(breaks_version_rules(c) for c in elements), "applied a bad version"
        version, content = model_apply(before[0], dict(before[1]), changes)
        assert (m.version, m.ref().to_dict()) == (version, content)
        assert before[0] <= m.version < LIMIT
        outcome = "applied"
    ref = m.ref()
    assert _trie_invariants(ref) == len(ref) == len(ref.to_dict())
    if m.version < LIMIT - 1:  # still writable
        nxt = ref.set("after", 1).prepare()
        assert nxt["add"][-1] == m.version + 1
    return outcome


# -- decoders ------------------------------------------------------------------------


def long_int_literal(raw: bytes) -> bool:
    """An independent oracle: does the JSON text hold an integer literal
    outside 64 bits? (stdlib json hands every integer literal to parse_int.)"""
    found = False

    def parse_int(text: str) -> int:
        nonlocal found
        if len(text.lstrip("-")) > 20 or int(text) not in INT64:
            found = True
        return 0

    with contextlib.suppress(ValueError, RecursionError):
        json.loads(raw, parse_int=parse_int)
    return found


def ints_fit(value: Any) -> bool:
    if type(value) is int:
        return value in INT64
    if isinstance(value, list):
        return all(ints_fit(v) for v in value)
    if isinstance(value, dict):
        return all(ints_fit(v) for v in value.values())
    return True


def json_text(value: Any) -> bytes:
    """JSON with any integers (orjson refuses those past 64 bits)."""
    try:
        return json.dumps(norm(value), ensure_ascii=False).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError):
        return b"[]"


RAW_JSON = (st.binary(max_size=24) | VALUE.map(json_text)
            | st.tuples(VALUE.map(json_text), st.integers(0, 30), st.binary(max_size=2)).map(
                lambda t: t[0][:t[1]] + t[2] + t[0][t[1]:]))
RAW_VERSION = (st.binary(max_size=20) | st.text(ANY_CHAR, max_size=20) | st.integers()
               | st.integers(0, 2 ** 60).map(lambda i: str(i).encode())
               | st.tuples(st.integers(0, 999), st.sampled_from(
                   [" {}", "{} ", "+{}", "0{}", "{}_0", "{}\n", "-{}", "{}.0", "\uff11{}"])).map(
                   lambda t: t[1].format(t[0]).encode("utf-8", "surrogatepass"))
               | st.booleans() | st.floats() | st.none())


def canonical_version(raw: Any) -> int | None:
    """The version `raw` spells as a plain decimal below 2**53, or None."""
    if type(raw) is int:
        return raw if 0 <= raw < LIMIT else None
    if isinstance(raw, bytes):
        raw = raw.decode("latin-1")
    if not isinstance(raw, str) or not (raw.isascii() and raw.isdigit()):
        return None
    if (raw[0] == "0" and raw != "0") or len(raw) > 16 or int(raw) >= LIMIT:
        return None
    return int(raw)


def check_version(raw: Any) -> None:
    expected = canonical_version(raw)
    try:
        version = decode_version("alice-admin-x", raw)
    except BackendError:
        assert expected is None, f"refused {raw!r}"
        return
    assert version == expected, f"{raw!r} read as {version}"


def check_value(raw: bytes) -> None:
    try:
        expected = orjson.loads(raw)
    except orjson.JSONDecodeError:
        expected = BackendError
    try:
        got = decode_value("alice-admin-x", "k", raw)
    except BackendError:
        assert expected is BackendError or long_int_literal(raw) or not ints_fit(expected)
        return
    assert got == expected and ints_fit(got) and not long_int_literal(raw)


def check_changes(raw: bytes) -> None:
    try:
        got = decode_changes("alice-admin-x", raw)
    except InvalidChangeSetError:
        return
    assert got == orjson.loads(raw) and not long_int_literal(raw)


def check_fields(raws: list[bytes], version: bytes) -> None:
    pairs = [(f"k{i}".encode(), raw) for i, raw in enumerate(raws)]
    pairs.insert(len(pairs) // 2, (VERSION_KEY.encode(), version))
    try:
        dump = decode_fields("alice-admin-x", pairs)
    except BackendError:
        one_bad = False
        for i, raw in enumerate(raws):
            try:
                decode_value("alice-admin-x", f"k{i}", raw)
            except BackendError:
                one_bad = True
        try:
            decode_version("alice-admin-x", version)
        except BackendError:
            one_bad = True
        assert one_bad, "decode_fields refused good fields"
        return
    items = [x for i, raw in enumerate(raws) for x in (f"k{i}", decode_value("m", "k", raw))]
    assert dump == make_dump(decode_version("m", version), items)


def check_message_pipeline(m: SharedMap, raw: bytes) -> str:
    """A published message as a replica handles it: decode, then apply."""
    try:
        changes = decode_changes("alice-admin-x", raw)
    except InvalidChangeSetError:
        return "undecodable"
    return check_apply(m, changes)


# -- the suite's short runs ---------------------------------------------------------------


# No explain phase: it traces every line, and a long run cannot afford it.
SUITE = settings(max_examples=SUITE_EXAMPLES, deadline=None, database=None,
                 suppress_health_check=list(HealthCheck),
                 phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target,
                         Phase.shrink])


@SUITE
@given(data=st.data())
def test_apply_changes_applies_or_refuses_cleanly(data: st.DataObject) -> None:
    m = data.draw(maps())
    SEEN["apply_changes"] += 1
    for _ in range(3):
        SEEN["apply: " + check_apply(m, data.draw(inputs(m)))] += 1


@SUITE
@given(data=st.data())
def test_decoded_messages_apply_or_are_refused_cleanly(data: st.DataObject) -> None:
    m = data.draw(maps())
    raw = data.draw(inputs(m).map(json_text) | RAW_JSON)
    SEEN["decode_changes + apply_changes"] += 1
    SEEN["message: " + check_message_pipeline(m, raw)] += 1


@SUITE
@given(raw=RAW_VERSION)
def test_decode_version_fuzz(raw: Any) -> None:
    SEEN["decode_version"] += 1
    check_version(raw)


@SUITE
@given(raw=RAW_JSON)
def test_decode_value_and_changes_fuzz(raw: bytes) -> None:
    SEEN["decode_value + decode_changes"] += 1
    check_value(raw)
    check_changes(raw)


@SUITE
@given(raws=st.lists(RAW_JSON, max_size=5), version=RAW_VERSION.filter(
    lambda v: isinstance(v, bytes)))
def test_decode_fields_fuzz(raws: list[bytes], version: bytes) -> None:
    SEEN["decode_fields"] += 1
    check_fields(raws, version)


@pytest.mark.parametrize("raw", [b"[1,18446744073709551616]", b"9223372036854775808",
                                 b'{"a":"99999999999999999999","b":-9223372036854775809}'])
def test_the_oracle_sees_long_literals(raw: bytes) -> None:
    # The fuzz oracle must not be blind to what it checks.
    assert long_int_literal(raw)
    with pytest.raises(BackendError):
        decode_value("m", "k", raw)


def test_the_model_matches_the_core_on_known_cases() -> None:
    m = SharedMap()
    changes = {"version": 0, "remove": [], "add": ["a", (1, 2), VERSION_KEY, 4]}
    assert model_apply(0, {}, changes) == (4, {"a": [1, 2]})
    m.apply_changes(changes)
    assert (m.version, m.ref().to_dict()) == (4, {"a": [1, 2]})
    assert breaks_version_rules({"version": 4, "remove": [], "add": [VERSION_KEY, 6]})
    assert not breaks_version_rules({"version": 4, "remove": [], "add": []})
    assert isinstance(FrozenDict(), dict) and isinstance(FrozenList(), list)
