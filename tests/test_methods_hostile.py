"""Serialized methods written by an attacker: escapes out of the closed
world, crashes, runaway work and memory, exceptions that try to get out,
oversized bodies, and no_exec wherever a map is opened. Each hostile body
is tried as defined locally (``set_fun``) and as arriving from a peer (a
change set applied with ``apply_changes``); crashing cases run in a child
process, which must stay alive."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

import caf_sharing
from caf_sharing import FUNCTION_MARKER, Actor, Node, SharedMap, channel, methods
from caf_sharing.aggregate import DEFAULT_RETRY_DELAYS, AggregateMap
from caf_sharing.errors import (
    InvalidTypeError,
    InvalidValueError,
    MethodError,
    NoExecError,
    ReadOnlyError,
)
from caf_sharing.methods import MethodLimits

#: Where the caf_sharing under test lives (the source tree or an installed
#: copy), so that child processes import the same one.
SRC = str(Path(caf_sharing.__file__).resolve().parent.parent)
STORED = {"cfg": {"a": 1, "z": [0]}, "lst": [1, 0]}
ARGS = [{"a": 1, "nested": [1]}, [1, 2]]


def change_set(**values: Any) -> dict[str, Any]:
    add: list[Any] = []
    for key, value in values.items():
        add += [key, value]
    return {"version": 0, "remove": [], "add": [*add, "__ca_version__", 1]}


def defined(body: str, args: list[str], limits: MethodLimits | None = None) -> SharedMap:
    """The method stored by its own writer; None-safe: a body set_fun refuses
    is reported by set_fun itself."""
    shared = SharedMap(method_limits=limits)
    shared.apply_changes(change_set(**STORED))
    ref = shared.ref()
    ref.set_fun("m", args, body)
    ref.prepare()
    shared.commit(ref)
    return shared


def from_peer(body: str, args: list[str], limits: MethodLimits | None = None) -> SharedMap:
    """A replica that received the method in a change set: never checked."""
    shared = SharedMap(method_limits=limits)
    desc = {"type": FUNCTION_MARKER, "args": args, "body": body}
    shared.apply_changes(change_set(**STORED, m=desc))
    return shared


def call(path: str, body: str, args: list[str] | None = None, values: list[Any] | None = None,
         limits: MethodLimits | None = None, read_only: bool = False) -> Any:
    """Run ``body`` by ``path`` ("set_fun" or "peer"); a MethodError from
    set_fun counts as the method failing."""
    make = defined if path == "set_fun" else from_peer
    shared = make(body, args or [], limits)
    return shared.ref(read_only=read_only).apply_method("m", values or [])


PATHS = ["set_fun", "peer"]


def assert_refused(path: str, body: str) -> MethodError:
    """``body`` (taking a frozen dict ``x`` and a frozen list ``y``) fails
    with MethodError by ``path``, leaving the map, the caller's arguments and
    the process as they were."""
    args = [{"a": 1, "nested": [1]}, [1, 2]]
    shared: SharedMap | None = None
    with pytest.raises(MethodError) as info:
        shared = (defined if path == "set_fun" else from_peer)(body, ["x", "y"])
        before = shared.ref().dump()
        ref = shared.ref()
        try:
            ref.apply_method("m", args)
        finally:
            assert shared.ref().dump() == before
            assert not ref.has_changed
    assert info.value.method == "m"
    assert args == ARGS
    if shared is not None:
        stored = shared.ref().to_dict()
        del stored["m"]
        assert stored == STORED
    cause = info.value.__cause__
    assert ("does not compile" in str(info.value)
            or isinstance(cause, AttributeError | TypeError | ReadOnlyError | ValueError)), cause
    assert call(path, "return 6 * 7") == 42  # the sandbox still works
    return info.value


# -- escapes out of the closed world ---------------------------------------------

REF_METHODS = ["get", "keys", "values", "items", "to_dict", "apply_method", "set", "delete",
               "set_fun"]
FUNC_ATTRIBUTES = ["func_globals", "func_code", "func_dict"]
DICT_METHODS = sorted(methods.VALUE_ATTRIBUTES[dict])
LIST_METHODS = sorted(methods.VALUE_ATTRIBUTES[list])

ESCAPES = [
    # Cython function attributes reached from every method of the ref...
    *(f"return self.{m}.{a}" for m in REF_METHODS for a in FUNC_ATTRIBUTES),
    # ... from every method of a stored frozen value and of a frozen argument
    *(f"return self['cfg'].{m}.func_globals" for m in DICT_METHODS),
    *(f"return self['lst'].{m}.func_globals" for m in LIST_METHODS),
    *(f"return x.{m}.func_globals" for m in DICT_METHODS),
    *(f"return y.{m}.func_globals" for m in LIST_METHODS),
    # the escape as it was found, and the gc walk it led to
    "return self.apply_method.func_globals['__builtins__']['open']('/etc/passwd').read()",
    "g = self.get.func_globals['__builtins__']['__import__']('gc')\nreturn g.get_objects()",
    "return self.to_dict().get.func_globals",
    "return self.keys().mapping",
    "return self.to_dict().keys().mapping",
    "return self.items().isdisjoint",
    # everything else that is not data
    "return Exception.mro()",
    "raise Exception.mro()[1]('x')",
    "return int.mro()[-1].mro",
    "return KeyError('k').args",
    "try:\n    1 / 0\nexcept Exception as e:\n    return e.with_traceback(None)",
    "return len.func_globals",
    "return sorted.func_globals",
    "return map.func_code",
    "return list.func_globals",
    "return dict.mro",
    "return str.maketrans",
    "return (lambda: 0).func_globals",
    "def f():\n    pass\nreturn f.func_code",
    "return range(3).start",
    "return isinstance.func_globals",
    "return (1).to_bytes(10**9, 'big')",
    "return 'x'.encode",
    "return 'x'.format",
    "return '{0}'.format_map",
    "return 'x'.upper.func_globals",
    "return (1.5).fromhex",
    "return {1, 2}.add.func_globals",
    "return (1, 2).index.func_code",
    "return b'x'.decode",
    "with x:\n    pass",
    "match x:\n    case {}:\n        return 1",
    # changing frozen values in place
    "dict.update(self['cfg'], {'a': 2})",
    "dict.setdefault(self['cfg'], 'b', 2)",
    "list.append(self['lst'], 3)",
    "list.sort(y)",
    "self['cfg'].update({'a': 2})",
    "self['cfg']['z'].append(1)",
    "x['a'] = 2",
    "x['nested'].append(2)",
    "y.extend([3])",
    "z = y\nz += [3]",
    "z = y\nz *= 2",
    "z = x\nz |= {'b': 2}",
    "del y[0]",
    "self.set.func_globals",
]


def test_there_are_enough_escape_bodies() -> None:
    assert len(ESCAPES) >= 40
    assert len(set(ESCAPES)) == len(ESCAPES)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("body", ESCAPES)
def test_escape_is_refused(path: str, body: str) -> None:
    assert_refused(path, body)


@pytest.mark.parametrize("path", PATHS)
def test_write_api_only_on_a_writable_ref(path: str) -> None:
    for name in ("set", "delete", "set_fun"):
        with pytest.raises(MethodError, match="read-only") as info:
            call(path, f"return self.{name}", read_only=True)
        assert isinstance(info.value.__cause__, ReadOnlyError)
        assert call(path, f"return self.{name} is not None") is True


def test_allowed_attributes_return_nothing_that_opens_further() -> None:
    """Whatever an allowed read returns, its own attributes are closed."""
    body = "v = {kind}\nf = v.{attr}\nreturn f.func_globals"
    samples = {str: "'s'", int: "1", bool: "True", float: "1.5", list: "[1]", tuple: "(1,)",
               dict: "{'a': 1}", set: "{1}"}
    tried = 0
    for kind, attrs in methods.VALUE_ATTRIBUTES.items():
        sample = samples.get(kind)
        if sample is None:
            continue
        for attr in sorted(attrs):
            with pytest.raises(MethodError, match="cannot read attribute 'func_globals'"):
                call("peer", body.format(kind=sample, attr=attr))
            tried += 1
    assert tried > 80


# -- lazy chains that used to crash the process ------------------------------------

CHILD = textwrap.dedent("""
    import sys
    from caf_sharing import SharedMap
    from caf_sharing.errors import MethodError
    from caf_sharing.methods import MethodLimits
    limits = None if sys.argv[2] == "default" else MethodLimits(
        max_steps=int(sys.argv[2]), max_bytes=2**31)
    shared = SharedMap(method_limits=limits)
    ref = shared.ref()
    ref.set_fun("m", [], sys.argv[1])
    try:
        result = ref.apply_method("m", [])
    except MethodError as exc:
        print("MethodError:", exc)
    else:
        print("returned", type(result).__name__)
        del result  # freeing whatever the chain built
    print("alive")
""")

CHAINS = {
    "map": "m = [1]\nfor i in range(200000):\n    m = map(abs, m)\nreturn list(m)",
    "filter": "m = [1]\nfor i in range(200000):\n    m = filter(None, m)\nreturn list(m)",
    "zip": "m = [1]\nfor i in range(200000):\n    m = zip(m)\nreturn m",
    "enumerate": "m = [1]\nfor i in range(10**6):\n    m = enumerate(m)\nreturn m",
    "reversed": "m = [1]\nfor i in range(200000):\n    m = reversed(m)\nreturn m",
    "generator": "m = [1]\nfor i in range(200000):\n    m = (j for j in m)\nreturn list(m)",
    "nested list": "m = [1]\nfor i in range(10**6):\n    m = [m]\nreturn m",
}


def run_child(body: str, steps: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-c", CHILD, body, steps], env=env,
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_chains_build_and_free_without_crashing(name: str) -> None:
    done = run_child(CHAINS[name], str(10**8))
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.startswith("returned list"), done.stdout
    assert done.stdout.endswith("alive\n")


DEEP_TUPLE = "t = 1\nfor i in range(300000):\n    t = (t,)\n"
DAG_TUPLE = "t = 1\nfor i in range(200):\n    t = (t, t)\n"
HASHED = {
    "dict display": "return {t: 1}",
    "set display": "return {t}",
    "starred set": "return {*[t]}",
    "dict comprehension": "return {k: 1 for k in [t]}",
    "set comprehension": "return {k for k in [t]}",
    "subscript": "return {}[t]",
    "store": "d = {}\nd[t] = 1",
    "delete": "d = {}\ndel d[t]",
    "in dict": "return t in {}",
    "in set": "return t in {1}",
    "in ref": "return t in self",
    "ref get": "return self.get(t)",
    "dict.get": "return {}.get(t)",
    "dict.setdefault": "return {}.setdefault(t)",
    "dict.pop": "return {}.pop(t, 0)",
    "dict.update": "d = {}\nd.update([(t, 1)])",
    "dict(pairs)": "return dict([(t, 1)])",
    "dict.fromkeys": "return dict.fromkeys([t])",
    "unbound dict.get": "return dict.get({}, t)",
    "set.add": "s = {1}\ns.add(t)",
    "set.update": "s = {1}\ns.update([t])",
    "set.issubset": "return {1}.issubset([t])",
    "keys view |": "return {}.keys() | [t]",
    "keys view -": "return {}.keys() - [t]",
    "keys view &=": "k = {}.keys()\nk &= [t]",
}


@pytest.mark.parametrize("site", sorted(HASHED))
def test_hashing_a_deep_tuple_is_refused_not_a_crash(site: str) -> None:
    """Hashing a tuple recurses in C with no depth check: 10**5 levels
    overflow the stack. In a child, in case it does."""
    done = run_child(DEEP_TUPLE + HASHED[site], str(10**7))
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    if site == "ref get":  # the map never hashes a key that is not a str
        assert done.stdout.startswith("returned NoneType"), done.stdout
    else:
        assert done.stdout.startswith("MethodError: method 'm' raised ValueError: serialized "
                                      "methods cannot hash a tuple nested more than 100"), \
            done.stdout
    assert done.stdout.endswith("alive\n")


@pytest.mark.parametrize("site", ["dict display", "in set", "subscript", "set.add"])
def test_hashing_a_tuple_dag_is_charged(site: str) -> None:
    with pytest.raises(MethodError, match="max_steps"):
        call("peer", DAG_TUPLE.replace("200", "40") + HASHED[site])


DAG_LIST = "a = [1]\nb = [1]\nfor i in range(60):\n    a = [a, a]\n    b = [b, b]\n"
DAG_USES = {
    "==": "return a == b",
    "<": "return a < b",
    "in": "return a in [b]",
    "str": "return len(str(a))",
    "f-string": "return len(f'{a}')",
    "f-string !r": "return len(f'{a!r}')",
    "%": "return len('%s' % (a,))",
    "sorted": "return sorted([a, b])",
    "max": "return max(a, b)",
    "sort key": "return sorted([1, 2], key=lambda v: a)",
    "count": "return [a].count(b)",
    "values view": "return b in {'k': a}.values()",
    "set": "self.set('k', a)",
    "apply_method": "return self.apply_method('m', [a])",
}


@pytest.mark.parametrize("use", sorted(DAG_USES))
def test_a_value_shared_with_itself_is_charged_as_the_tree_it_is(use: str) -> None:
    """2**60 paths in 120 lists: comparing or printing it would never end."""
    with pytest.raises(MethodError, match="max_steps"):
        call("peer", DAG_LIST + DAG_USES[use], ["x"], [1])


def test_exception_arguments_are_tamed_before_anyone_prints_them() -> None:
    with pytest.raises(MethodError) as info:
        call("peer", DAG_LIST + "raise ValueError(a, 'x' * 10**6)")
    assert len(str(info.value)) < 1200
    assert len(str(info.value.__cause__)) < 1100
    with pytest.raises(MethodError, match="raised KeyError: 'missing'"):
        call("peer", "return {}['missing']")


def test_tuple_keys_still_work() -> None:
    body = ("d = {(1, 2): 'a', ((1,), 2): 'b'}\nd[(3, 4)] = 'c'\n"
            "return [d[(1, 2)], d.get(((1,), 2)), (3, 4) in d, {(1, 2)} | {(5, 6)} == "
            "{(1, 2), (5, 6)}, sorted(dict([((0, 1), 1)]).items()), {1, 2} - {2}, 7 - 2, "
            "5 | 2, 6 & 3, 6 ^ 3]")
    assert call("peer", body) == ["a", "b", True, True, [((0, 1), 1)], {1}, 5, 7, 2, 5]


def test_chain_under_the_default_budget_ends_in_a_method_error() -> None:
    done = run_child(CHAINS["enumerate"], "default")
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.startswith("MethodError: method 'm' went over its max_steps limit")
    assert done.stdout.endswith("alive\n")


# -- the CPU budget -------------------------------------------------------------------

RUNAWAY = [
    "while True:\n    pass",
    "while True:\n    continue",
    "for i in range(10**12):\n    pass",
    "return [i for i in range(10**12)]",
    "return sum(i for i in range(10**12))",
    "return sum(range(10**12))",
    "return max(range(10**12))",
    "return 'a' in range(10**12)",
    "def f(n):\n    return f(n + 1) + f(n + 1) if n < 500 else 0\nreturn f(0)",
    "def f():\n    try:\n        return f()\n    except:\n        return f()\nreturn f()",
    "try:\n    while True:\n        pass\nexcept:\n    return 'swallowed'",
    "try:\n    while True:\n        pass\nfinally:\n    return 'swallowed'",
    "f = lambda g: g(g)\nwhile True:\n    try:\n        f(f)\n    except Exception:\n        pass",
    "x = [1] * 200000\nwhile True:\n    x.count(2)",
    "x = 'ab' * 100000\nwhile True:\n    x.find('c')",
    "while True:\n    sorted([1] * 1000)",
    "x = 1 << 30000\nwhile True:\n    x * x",
    "x = 1 << 60000\ny = (1 << 30000) + 7\nwhile True:\n    x // y",
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("body", RUNAWAY)
def test_runaway_work_ends_with_the_step_limit(path: str, body: str) -> None:
    with pytest.raises(MethodError, match="max_steps limit of 400000") as info:
        call(path, body)
    assert info.value.method == "m"


def test_the_step_limit_is_per_map() -> None:
    small = MethodLimits(max_steps=100)
    body = "t = 0\nfor i in range(n):\n    t += i\nreturn t"
    for path in PATHS:
        assert call(path, body, ["n"], [50], small) == sum(range(50))
        with pytest.raises(MethodError, match="max_steps limit of 100 steps"):
            call(path, body, ["n"], [150], small)


def test_nested_methods_share_one_budget_and_cannot_catch_it() -> None:
    shared = SharedMap(method_limits=MethodLimits(max_steps=1000))
    ref = shared.ref()
    ref.set_fun("loop", [], "while True:\n    pass")
    ref.set_fun("outer", [], "try:\n    self.apply_method('loop', [])\nexcept:\n    pass\n"
                             "for i in range(10):\n    pass\nreturn 'escaped'")
    ref.set_fun("half", ["n"], "for i in range(n):\n    pass\nreturn n")
    ref.set_fun("twice", [], "return self.apply_method('half', [600]) + "
                             "self.apply_method('half', [600])")
    with pytest.raises(MethodError, match="max_steps") as info:
        ref.apply_method("outer", [])
    assert info.value.method == "outer"
    with pytest.raises(MethodError, match="max_steps"):
        ref.apply_method("twice", [])
    assert ref.apply_method("half", [600]) == 600  # each top-level call starts afresh


def test_threads_take_turns_each_with_its_own_budget() -> None:
    shared = defined("for i in range(n):\n    pass\nreturn n", ["n"])
    results: list[Any] = []

    def work() -> None:
        try:
            results.append(shared.ref().apply_method("m", [300_000]))
        except MethodError as exc:
            results.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [300_000] * 3


def test_compiling_is_charged() -> None:
    """Compiling costs time no loop step sees: set_fun in a loop, or applying
    more distinct stored methods than the cache keeps."""
    body = "x = 1\n" * 500 + "return x"
    limits = MethodLimits(max_steps=50_000)
    with pytest.raises(MethodError, match="max_steps"):
        call("set_fun", f"for i in range(1000):\n    self.set_fun('f' + str(i), [], {body!r})",
             limits=limits)
    shared = SharedMap(method_limits=limits)
    ref = shared.ref()
    for i in range(methods.MAX_CACHE_SIZE + 1):
        ref.set_fun(f"f{i}", [], body + f" + {i}")  # distinct bodies
    ref.set_fun("all", [], f"for n in range(50):\n    for i in range({methods.MAX_CACHE_SIZE + 1}):"
                           "\n        self.apply_method('f' + str(i), [])")
    with pytest.raises(MethodError, match="max_steps"):
        ref.apply_method("all", [])


def test_reader_stays_usable_and_map_untouched_after_going_over() -> None:
    shared = defined("self.set('n', 1)\nwhile True:\n    pass", [])
    before = shared.ref().dump()
    reader = shared.ref(read_only=True)
    with pytest.raises(MethodError, match="ReadOnlyError"):
        reader.apply_method("m", [])
    ref = shared.ref()
    with pytest.raises(MethodError, match="max_steps"):
        ref.apply_method("m", [])
    assert shared.ref().dump() == before
    # like any failing code, it leaves what it wrote in the caller's ref only
    assert ref.get("n") == 1
    ref.set_fun("ok", [], "return len(self)")
    assert ref.apply_method("ok", []) == 5


# -- the memory budget ---------------------------------------------------------------

HUGE = [
    ("return 'x' * 10**10", "max_bytes"),
    ("return 10**10 * 'x'", "max_bytes"),
    ("return [0] * 10**9", "max_bytes"),
    ("return (0,) * 10**9", "max_bytes"),
    ("return b'x' * 10**10", "max_bytes"),
    ("s = 'x'\ns *= 10**10", "max_bytes"),
    ("return 10**10**8", "MAX_INT_BITS"),
    ("return 2**10**6", "MAX_INT_BITS"),
    ("return 1 << 10**9", "MAX_INT_BITS"),
    ("x = 1 << 60000\nreturn x * x", "MAX_INT_BITS"),
    ("return int('1' * 100000, 2)", "MAX_INT_BITS"),
    ("return 'x'.ljust(10**10)", "max_bytes"),
    ("return 'x'.rjust(10**9, '-')", "max_bytes"),
    ("return 'x'.center(10**9)", "max_bytes"),
    ("return '1'.zfill(10**9)", "max_bytes"),
    ("return ('\\t' * 1000).expandtabs(10**6)", "max_bytes"),
    ("return ('x' * 1000).replace('', 'y' * 100000)", "max_bytes"),
    ("return ('y' * 10**6).join(['a'] * 100)", "max_bytes"),
    ("return ''.join(['x' * 10**6] * 100)", "max_bytes"),
    ("return list(range(10**9))", "max_bytes"),
    ("return sorted(range(10**12))", "max_bytes"),
    ("return tuple(range(10**9))", "max_bytes"),
    ("return [*range(10**9)]", "max_bytes"),
    ("return max(*range(10**9))", "max_bytes"),
    ("return dict.fromkeys(range(10**9))", "max_bytes"),
    ("return list(zip(range(10**9), range(10**9)))", "max_bytes"),
    ("return f'{1:>1000000000}'", "max_bytes"),
    ("return f'{1.5:.1000000000f}'", "max_bytes"),
    ("return '%1000000000d' % 1", "max_bytes"),
    ("s = 'x'\nfor i in range(64):\n    s = s + s", "max_bytes"),
    ("s = 'x'\nfor i in range(64):\n    s += s", "max_bytes"),
    ("x = [1]\nfor i in range(64):\n    x.extend(x)", "max_bytes"),
    ("x = [1]\nfor i in range(64):\n    x += x", "max_bytes"),
    ("x = ['x' * 10**6]\nreturn [s + 'y' for s in x * 100]", "max_bytes"),
    ("return sum([[1] * 1000] * 100000, [])", "max_bytes"),
    ("return ('a ' * 1500000).split()", "max_bytes"),
    ("s = 'x' * 10**6\nkept = []\nfor i in range(100):\n    kept.append(s[1:])", "max_bytes"),
    ("x = [0] * 10**5\nkept = []\nfor i in range(100):\n    kept.append(x[::-1])", "max_bytes"),
    ("d = dict.fromkeys(range(10**5))\nkept = []\nfor i in range(100):\n"
     "    kept.append({**d})", "max_bytes"),
    ("d = dict.fromkeys(map(str, range(10**5)))\nkept = []\nfor i in range(100):\n"
     "    kept.append(dict(**d))", "max_bytes"),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("body", "limit"), HUGE)
def test_huge_values_end_with_the_memory_limit(path: str, body: str, limit: str) -> None:
    with pytest.raises(MethodError, match=f"went over (its|the) {limit} limit") as info:
        call(path, body)
    assert info.value.__cause__ is None  # the limit, not an error of the body


def test_the_memory_limit_is_per_map() -> None:
    small = MethodLimits(max_bytes=1000)
    for path in PATHS:
        assert call(path, "return len('x' * n)", ["n"], [500], small) == 500
        with pytest.raises(MethodError, match="max_bytes limit: it would create more than 1000"):
            call(path, "return len('x' * n)", ["n"], [5000], small)


def test_to_dict_is_charged_by_the_size_of_the_map() -> None:
    shared = SharedMap(method_limits=MethodLimits(max_bytes=10_000))
    shared.apply_changes(change_set(**{f"k{i}": i for i in range(1000)}))
    ref = shared.ref()
    ref.set_fun("copy", [], "return len(self.to_dict())")
    with pytest.raises(MethodError, match="max_bytes"):
        ref.apply_method("copy", [])
    assert SharedMap().ref().set_fun("copy", [], "return len(self.to_dict())").apply_method(
        "copy", []) == 1


@pytest.mark.parametrize("body", [
    "def f(v):\n    return v\nreturn f",
    "return lambda v: v",
    "return list",
    "return [].extend",
    "return 'x'.join",
])
def test_what_a_method_returns_cannot_run_outside_it(body: str) -> None:
    returned = call("peer", body)
    with pytest.raises(MethodError, match="can only run inside a method call"):
        returned(["a", "b"])
    assert call("peer", "return 1") == 1


def test_star_widths_in_percent_formats_are_refused() -> None:
    with pytest.raises(MethodError, match="'\\*' widths"):
        call("peer", "return '%*d' % (10**9, 1)")


def test_ordinary_methods_fit_the_default_budget() -> None:
    body = """
words = ('lorem ipsum dolor sit amet ' * 2000).split()
counts = {}
for w in words:
    counts[w] = counts.get(w, 0) + 1
table = [f'{w:>8}: {n:05d}' for w, n in sorted(counts.items())]
return ['|'.join(table), sum(range(10000)), 2 ** 100, max(map(len, words)),
        list(enumerate('ab')), list(zip('ab', 'cd')), list(reversed([1, 2])),
        '%s-%d' % ('a', 1), 'x'.center(9, '*'), ' a '.strip(), 'a\\tb'.expandtabs(4),
        'abcdef'[1:4], [1, 2, 3][::-1], {**{'a': 1}, 'b': 2}, sum([[1], [2]], []),
        dict(**{'k': 1})]
"""
    result = call("peer", body)
    assert result[0].startswith("    amet: 02000|   dolor: 02000|")
    assert result[1:] == [49995000, 2 ** 100, 5, [(0, "a"), (1, "b")], [("a", "c"), ("b", "d")],
                          [2, 1], "a-1", "****x****", "a", "a   b", "bcd", [3, 2, 1],
                          {"a": 1, "b": 2}, [1, 2], {"k": 1}]


# -- exceptions that try to get past the caller ---------------------------------------------


class Custom(BaseException):
    pass


@pytest.mark.parametrize("kind", [KeyboardInterrupt, SystemExit, GeneratorExit, Custom])
def test_base_exceptions_reach_the_caller_as_method_errors(kind: type[BaseException]) -> None:
    """A BaseException raised while a method runs (here by a signal handler,
    as Ctrl-C would) is a MethodError for the caller."""
    def interrupt(signum: int, frame: object) -> None:
        raise kind("stop")

    shared = defined("while True:\n    pass", [], MethodLimits(max_steps=10**12))
    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(MethodError, match=f"raised {kind.__name__}: stop") as info:
            shared.ref().apply_method("m", [])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert isinstance(info.value.__cause__, kind)
    assert call("peer", "return 1") == 1


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("body", [
    "raise Exception.mro()[1]('x')",
    "raise SystemExit(1)",
    "raise KeyboardInterrupt()",
    "raise BaseException('x')",
    "raise GeneratorExit()",
])
def test_base_exception_names_are_out_of_reach(path: str, body: str) -> None:
    with pytest.raises(MethodError) as info:
        call(path, body)
    assert isinstance(info.value.__cause__, AttributeError | type(None))


def test_recursion_error_is_a_method_error() -> None:
    with pytest.raises(MethodError, match="RecursionError"):
        call("peer", "def f():\n    return f()\nreturn f()")


# -- the body cap ---------------------------------------------------------------------------

LONG_BODY = "return 1\n" + "# padding\n" * 7000


@pytest.mark.parametrize("body", [LONG_BODY, "return '" + "\u20ac" * 22000 + "'"])
def test_long_body_refused_at_set_fun(body: str) -> None:
    assert len(body.encode()) > 64 * 1024
    ref = SharedMap().ref()
    with pytest.raises(MethodError, match="max_body limit of 65536"):
        ref.set_fun("m", [], body)
    assert "m" not in ref


def test_long_body_refused_when_a_replica_first_calls_it() -> None:
    methods.cache_clear()
    shared = from_peer(LONG_BODY, [])
    for _ in range(2):
        with pytest.raises(MethodError, match="max_body limit of 65536") as info:
            shared.ref().apply_method("m", [])
        assert info.value.method == "m"
    assert methods.cache_info().misses == 0  # never compiled


def test_body_cap_is_per_map() -> None:
    limits = MethodLimits(max_body=100)
    body = "return 1" + " " * 100
    with pytest.raises(MethodError, match="max_body limit of 100"):
        defined(body, [], limits)
    with pytest.raises(MethodError, match="max_body limit of 100"):
        from_peer(body, [], limits).ref().apply_method("m", [])
    assert from_peer(body, []).ref().apply_method("m", []) == 1


@pytest.mark.parametrize(("value", "error"), [
    (5, InvalidTypeError), ({"max_steps": 1}, InvalidTypeError), ("x", InvalidTypeError)])
def test_method_limits_must_be_method_limits(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="method_limits must be a MethodLimits"):
        SharedMap(method_limits=value)


@pytest.mark.parametrize("field", ["max_steps", "max_bytes", "max_body"])
def test_method_limits_are_checked(field: str) -> None:
    with pytest.raises(InvalidValueError, match=f"{field} must be >= 1"):
        MethodLimits(**{field: 0})
    with pytest.raises(InvalidTypeError, match=f"{field} must be an int"):
        MethodLimits(**{field: 1.5})
    assert SharedMap().method_limits is None
    limits = MethodLimits(**{field: 7})
    assert SharedMap(method_limits=limits).method_limits is limits


# -- no_exec on every way a map is opened ----------------------------------------------------

METHOD = {"type": FUNCTION_MARKER, "args": [], "body": "return 'ran'"}


class Owner(Actor):
    async def init(self) -> None:
        self.sharing.add_writable_map("m", "m")

    async def store(self, links: list[str]) -> None:
        ref = self.sharing.maps.m
        ref.set("__link_key__", links)
        ref.set_fun("f", [], "return 'ran'")
        ref.set_fun("loop", ["n"], "for i in range(n):\n    pass\nreturn n")
        channel.send(ref, "c", [METHOD])

    async def loop(self, n: int) -> Any:
        try:
            return self.sharing.maps.m.apply_method("loop", [n])
        except MethodError as exc:
            return str(exc)

    async def pull(self, alias: str) -> Any:
        return self.sharing.pull_update(alias)


class Peer(Actor):
    async def init(self) -> None:
        self.sharing.add_writable_map("own", "own")

    async def follow(self, target: str, no_exec: bool, aggregate: bool) -> None:
        self.sharing.add_read_only_map("peer", target, no_exec=no_exec, aggregate=aggregate)

    async def run_everywhere(self) -> dict[str, str]:
        snap = self.sharing.maps.peer
        refs = snap.refs if hasattr(snap, "refs") else {"peer": snap}
        outcome = {}
        for name, ref in refs.items():
            try:
                outcome[name] = ref.apply_method("f", [])
            except NoExecError:
                outcome[name] = "no_exec"
        return outcome

    async def receive(self) -> list[Any]:
        got = channel.receive(self.sharing.maps.own, self.sharing.maps.peer, "c")
        return [dict(message) for message in got.messages]

    async def pull(self) -> Any:
        return self.sharing.pull_update("peer")

    async def loop(self, n: int) -> Any:
        try:
            return self.sharing.maps.peer.apply_method("loop", [n])
        except MethodError as exc:
            return str(exc)


@pytest.fixture
def app(backend_factory: Any) -> str:
    return str(backend_factory.app)


@pytest.mark.asyncio
async def test_no_exec_aggregate_follows_links_with_no_exec(backend_url: str, app: str) -> None:
    async with Node(backend_url, app=app) as node:
        a = await node.start(Owner, "alice-a")
        b = await node.start(Owner, "bob-b")
        await a.call("store", ["bob-b-m"])
        await b.call("store", [])
        trusting = await node.start(Peer, "carol-t")
        await trusting.call("follow", "alice-a-m", False, True)
        careful = await node.start(Peer, "carol-c")
        await careful.call("follow", "alice-a-m", True, True)
        async with asyncio.timeout(10):
            while len(await trusting.call("run_everywhere")) < 2:
                await asyncio.sleep(0.01)
            while len(await careful.call("run_everywhere")) < 2:
                await asyncio.sleep(0.01)
        assert await trusting.call("run_everywhere") == {"alice-a-m": "ran", "bob-b-m": "ran"}
        assert await careful.call("run_everywhere") == {"alice-a-m": "no_exec",
                                                         "bob-b-m": "no_exec"}


@pytest.mark.asyncio
async def test_no_exec_holds_for_channels_and_pull_update(backend_url: str, app: str) -> None:
    async with Node(backend_url, app=app) as node:
        a = await node.start(Owner, "alice-a")
        await a.call("store", [])
        peer = await node.start(Peer, "carol-p")
        await peer.call("follow", "alice-a-m", True, False)
        assert await peer.call("run_everywhere") == {"peer": "no_exec"}
        # a method sent as a message is data to the receiver, never run
        assert await peer.call("receive") == [METHOD]
        # pull_update hands out the method as data, from a no_exec replica too
        for pulled in (await peer.call("pull"), await a.call("pull", "m")):
            replica = SharedMap(no_exec=True)
            replica.apply_changes(pulled)
            assert replica.ref().get("f") == {"type": FUNCTION_MARKER, "args": [],
                                              "body": "return 'ran'"}
            with pytest.raises(NoExecError):
                replica.ref().apply_method("f", [])


async def test_no_exec_aggregate_refuses_a_map_that_runs_methods() -> None:
    async def find_map(name: str) -> SharedMap:
        return SharedMap()

    with pytest.raises(InvalidValueError, match="no_exec"):
        await AggregateMap("a", find_map, no_exec=True).assemble()

    async def find_no_exec(name: str) -> SharedMap:
        return SharedMap(no_exec=True)

    assert (await AggregateMap("a", find_no_exec, no_exec=True).assemble()).names == ("a",)


@pytest.mark.asyncio
async def test_node_limits_reach_every_map(backend_url: str, app: str) -> None:
    limits = MethodLimits(max_steps=50)
    async with Node(backend_url, app=app, method_limits=limits) as node:
        a = await node.start(Owner, "alice-a")
        await a.call("store", [])
        peer = await node.start(Peer, "carol-p")
        await peer.call("follow", "alice-a-m", False, False)
        assert await peer.call("run_everywhere") == {"peer": "ran"}
        for handle in (a, peer):  # the writer's primary and the reader's replica
            assert await handle.call("loop", 40) == 40
            assert "max_steps limit of 50 steps" in await handle.call("loop", 60)


# -- aggregate lookups of missing maps back off ----------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_missing_links_are_not_looked_up_on_every_assembly() -> None:
    links = [f"ghost{i}" for i in range(20_000)]
    first = SharedMap()
    first.apply_changes(change_set(__link_key__=links))
    calls: dict[str, int] = {}

    async def find_map(name: str) -> SharedMap | None:
        calls[name] = calls.get(name, 0) + 1
        return first if name == "first" else None

    clock = Clock()
    agg = AggregateMap("first", find_map, clock=clock)
    await agg.assemble()
    assert sum(calls.values()) == 20_001
    for _ in range(10):  # reader messages within the delay: no lookup at all
        assert (await agg.assemble()).names == ("first",)
    assert sum(calls.values()) == 20_001
    clock.now += DEFAULT_RETRY_DELAYS[0]
    await agg.assemble()
    assert sum(calls.values()) == 40_001


async def test_missing_link_retries_back_off_until_found() -> None:
    first = SharedMap()
    first.apply_changes(change_set(__link_key__=["ghost", "other"]))
    ghost = SharedMap()
    ghost.apply_changes(change_set(k=1))
    present = {"first": first}
    calls: dict[str, int] = {}

    async def find_map(name: str) -> SharedMap | None:
        calls[name] = calls.get(name, 0) + 1
        return present.get(name)

    clock = Clock()
    agg = AggregateMap("first", find_map, retry_delays=(1.0, 8.0), clock=clock)
    await agg.assemble()
    expected = 1
    for delay in (1.0, 2.0, 4.0, 8.0, 8.0):  # the delay doubles, up to the longest
        clock.now += delay - 0.001
        await agg.assemble()
        assert calls["ghost"] == expected
        clock.now += 0.001
        await agg.assemble()
        expected += 1
        assert calls["ghost"] == expected
    # a map that appears is found at its next retry, and then kept
    present["ghost"] = ghost
    clock.now += 8.0
    assert (await agg.assemble()).get_all("k") == [1]
    clock.now += 100.0
    await agg.assemble()
    assert calls["ghost"] == expected + 1
    assert calls["other"] == expected + 2  # still missing, still backing off


@pytest.mark.parametrize("delays", [(-1.0, 2.0), (3.0, 2.0)])
def test_retry_delays_are_checked(delays: tuple[float, float]) -> None:
    async def find_map(name: str) -> SharedMap | None:
        return None

    with pytest.raises(InvalidValueError, match="retry_delays"):
        AggregateMap("a", find_map, retry_delays=delays)
