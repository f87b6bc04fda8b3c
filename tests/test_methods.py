"""Serialized methods: what they can do, and every way out of the sandbox
that must stay shut. Everything goes through real SharedMaps/MapRefs."""

from __future__ import annotations

import re
from typing import Any

import pytest

from caf_sharing import FUNCTION_MARKER, SharedMap, methods
from caf_sharing.errors import (
    InvalidTypeError,
    InvalidValueError,
    MethodError,
    NoExecError,
    ReadOnlyError,
    UnknownMethodError,
)


def committed(shared: SharedMap, **values: Any) -> SharedMap:
    if not values:
        return shared
    ref = shared.ref()
    for key, value in values.items():
        ref.set(key, value)
    ref.prepare()
    shared.commit(ref)
    return shared


def with_method(name: str, args: list[str], body: str, **values: Any) -> SharedMap:
    shared = committed(SharedMap(), **values)
    ref = shared.ref()
    ref.set_fun(name, args, body)
    ref.prepare()
    shared.commit(ref)
    return shared


def from_peer(desc: Any, name: str = "m", *, no_exec: bool = False, **values: Any) -> SharedMap:
    """A replica whose method arrived in a change set written by someone else,
    so it never went through check_method."""
    add: list[Any] = [name, desc]
    for key, value in values.items():
        add += [key, value]
    shared = SharedMap(no_exec=no_exec)
    shared.apply_changes({"version": 0, "remove": [], "add": [*add, "__ca_version__", 1]})
    return shared


def run(body: str, args: list[str] | None = None, values: list[Any] | None = None,
        **stored: Any) -> Any:
    shared = with_method("m", args or [], body, **stored)
    return shared.ref(read_only=True).apply_method("m", values or [])


# -- what methods can do -------------------------------------------------------


def test_stored_descriptor_shape() -> None:
    shared = with_method("f", ["a", "b"], "return a + b")
    assert shared.ref().get("f") == {"type": FUNCTION_MARKER, "args": ["a", "b"],
                                     "body": "return a + b"}


def test_reads_every_way() -> None:
    body = """
keys = sorted(self.keys())
total = 0
for key, value in self.items():
    if isinstance(value, int):
        total += value
return {
    "keys": keys,
    "total": total,
    "item": self["a"],
    "get": self.get("nope", "dflt"),
    "has": ["a" in self, "nope" in self],
    "len": len(self),
    "iter": sorted(k for k in self),
    "values": sorted(v for v in self.values() if isinstance(v, int)),
    "copy": self.to_dict()["cfg"],
    "version": self.version,
}
"""
    result = run(body, a=1, b=2, cfg={"x": [1, 2]})
    assert result == {
        "keys": ["a", "b", "cfg", "m"], "total": 3, "item": 1, "get": "dflt",
        "has": [True, False], "len": 4, "iter": ["a", "b", "cfg", "m"], "values": [1, 2],
        "copy": {"x": [1, 2]}, "version": 2,
    }


def test_local_computation() -> None:
    body = """
out = []
out += [1, 2]
out[0] = 10
d = {}
d["k"] = n
d |= {"j": 2}
a, (b, c) = 1, (2, 3)
s = "x"
s += "y"
n2 = n
n2 **= 2
def square(v):
    return v * v
pairs = sorted(zip(names, range(len(names))), key=lambda p: p[0], reverse=True)
try:
    {}["missing"]
except KeyError:
    caught = True
return [out, d, a + b + c, s, n2, square(3), pairs, caught, max(*out),
        list(map(str, reversed(out))), dict(**d), [i for i in enumerate("ab")],
        sum(x for x in range(4) if x % 2), abs(-2), round(2.5), float("1.5"),
        int("7"), bool(0), tuple(out), list(filter(None, [0, 1])), all([]), any([]),
        min(3, 4), "abc"[1:], names[::-1]]
"""
    result = run(body, ["n", "names"], [5, ["b", "a"]])
    assert result == [[10, 2], {"k": 5, "j": 2}, 6, "xy", 25, 9, [("b", 0), ("a", 1)], True, 10,
                      ["2", "10"], {"k": 5, "j": 2}, [(0, "a"), (1, "b")], 4, 2, 2, 1.5, 7,
                      False, (10, 2), [1], True, False, 3, "bc", ["a", "b"]]


def test_recursion_through_apply_method() -> None:
    body = "return 1 if n <= 1 else n * self.apply_method('fact', [n - 1])"
    shared = with_method("fact", ["n"], body)
    assert shared.ref().apply_method("fact", [10]) == 3628800


def test_runaway_recursion_is_a_method_error() -> None:
    shared = with_method("loop", ["n"], "return self.apply_method('loop', [n + 1])")
    with pytest.raises(MethodError, match="RecursionError") as info:
        shared.ref().apply_method("loop", [0])
    assert info.value.method == "loop"
    assert isinstance(info.value.__cause__, RecursionError)
    # the interpreter is fine afterwards
    assert run("return 1") == 1


def test_exception_is_wrapped_and_chained() -> None:
    shared = with_method("div", ["a"], "return 1 / a")
    with pytest.raises(MethodError, match=r"method 'div' raised ZeroDivisionError") as info:
        shared.ref().apply_method("div", [0])
    assert info.value.method == "div"
    assert isinstance(info.value.__cause__, ZeroDivisionError)

    shared = with_method("boom", [], "raise ValueError('bad input')")
    with pytest.raises(MethodError, match="ValueError: bad input") as info:
        shared.ref().apply_method("boom", [])
    assert isinstance(info.value.__cause__, ValueError)


def test_nested_method_error_names_the_failing_method() -> None:
    shared = with_method("inner", [], "return 1 / 0")
    ref = shared.ref()
    ref.set_fun("outer", [], "return self.apply_method('inner', [])")
    ref.set_fun("lost", [], "return self.apply_method('nothing_here', [])")
    with pytest.raises(MethodError) as info:
        ref.apply_method("outer", [])
    assert info.value.method == "inner"
    with pytest.raises(MethodError, match="UnknownMethodError") as info:
        ref.apply_method("lost", [])
    assert info.value.method == "lost"
    assert isinstance(info.value.__cause__, UnknownMethodError)


def test_method_writes_only_through_a_writable_ref() -> None:
    shared = with_method("bump", [], "self.set('n', self.get('n', 0) + 1)\nreturn self.get('n')",
                         n=1)
    ref = shared.ref()
    assert ref.apply_method("bump", []) == 2
    assert ref.has_changed and ref.get("n") == 2
    assert shared.ref().get("n") == 1  # nothing reaches the map before commit
    with pytest.raises(MethodError, match="ReadOnlyError") as info:
        shared.ref(read_only=True).apply_method("bump", [])
    assert isinstance(info.value.__cause__, ReadOnlyError)


def test_arguments_are_frozen_and_caller_data_untouched() -> None:
    caller_list = [1, 2]
    caller_dict = {"a": [1]}
    for body in ("x.append(3)", "x[0] = 9", "x += [3]", "del x[0]", "x.sort()",
                 "d['b'] = 1", "d['a'].append(2)", "d.update({'b': 1})", "d.clear()"):
        with pytest.raises(MethodError, match="TypeError"):
            run(body, ["x", "d"], [caller_list, caller_dict])
    assert caller_list == [1, 2]
    assert caller_dict == {"a": [1]}
    # a copy is the method's own to change
    assert run("y = list(x)\ny.append(3)\nreturn y", ["x"], [caller_list]) == [1, 2, 3]


def test_stored_values_cannot_be_changed() -> None:
    for body in ("self.get('cfg')['a'] = 2", "self['cfg'].update({})",
                 "self['lst'].append(1)", "self['lst'][0] = 5", "del self['cfg']['a']"):
        shared = with_method("m", [], body, cfg={"a": 1}, lst=[1])
        with pytest.raises(MethodError, match="TypeError"):
            shared.ref().apply_method("m", [])
        assert shared.ref().to_dict()["cfg"] == {"a": 1}
        assert shared.ref().to_dict()["lst"] == [1]


def test_arguments_must_be_json_data() -> None:
    with pytest.raises(MethodError, match="JSON data") as info:
        run("return x", ["x"], [{1, 2}])
    assert isinstance(info.value.__cause__, TypeError)
    with pytest.raises(MethodError, match="JSON data"):
        run("return x", ["x"], [float("nan")])


@pytest.mark.parametrize("values", [[], [1, 2]])
def test_wrong_number_of_arguments(values: list[Any]) -> None:
    with pytest.raises(MethodError, match=r"takes 1 argument\(s\) \(x\), got"):
        run("return x", ["x"], values)


@pytest.mark.parametrize("values", ["x", b"x", None, 3, {"x": 1}])
def test_arguments_must_be_a_sequence(values: Any) -> None:
    shared = with_method("m", ["x"], "return x")
    with pytest.raises(MethodError, match="must be a list or tuple"):
        shared.ref().apply_method("m", values)


def test_no_exec_and_unknown_methods() -> None:
    desc = {"type": FUNCTION_MARKER, "args": [], "body": "return 1"}
    with pytest.raises(NoExecError, match="'m'"):
        from_peer(desc, no_exec=True).ref().apply_method("m", [])
    shared = from_peer(desc, plain=7, lookalike={"type": "function", "args": [], "body": "1"})
    assert shared.ref().apply_method("m", []) == 1
    for name in ("missing", "plain", "lookalike"):
        with pytest.raises(UnknownMethodError, match=repr(name)):
            shared.ref().apply_method(name, [])


# -- defining methods: check_method ------------------------------------------


@pytest.mark.parametrize(("name", "args", "body", "error", "fragment"), [
    (7, [], "return 1", InvalidTypeError, "method name must be a str"),
    ("m", "ab", "return 1", InvalidTypeError, "must be a list or tuple"),
    ("m", None, "return 1", InvalidTypeError, "must be a list or tuple"),
    ("m", {"a": 1}, "return 1", InvalidTypeError, "must be a list or tuple"),
    ("m", ["a", 3], "return 1", InvalidTypeError, "argument #1 of method 'm' must be a str"),
    ("m", [], b"return 1", InvalidTypeError, "body of method 'm' must be a str"),
    ("m", ["1a"], "return 1", InvalidValueError, "not a valid Python identifier"),
    ("m", ["a-b"], "return 1", InvalidValueError, "not a valid Python identifier"),
    ("m", [""], "return 1", InvalidValueError, "not a valid Python identifier"),
    ("m", ["for"], "return 1", InvalidValueError, "not a valid Python identifier"),
    ("m", ["a)", "b"], "return 1", InvalidValueError, "not a valid Python identifier"),
    ("m", ["self"], "return 1", InvalidValueError, "'self' is reserved"),
    ("m", ["_x"], "return 1", InvalidValueError, "starts with '_'"),
    ("m", ["__class__"], "return 1", InvalidValueError, "starts with '_'"),
    ("m", ["a", "b", "a"], "return 1", InvalidValueError, "argument #2 of method 'm': 'a' is "
                                                          "repeated"),
    ("m", [], "return (", MethodError, "SyntaxError"),
    ("m", [], "  return 1", MethodError, "IndentationError"),
    ("m", [], "return 1\x00", MethodError, "method 'm' does not compile"),
    ("m", [], "(" * 300 + ")" * 300, MethodError, "method 'm' does not compile"),
    ("m", [], "return " + "-" * 60_000 + "1", MethodError, "method 'm' does not compile"),
    ("m", [], "break", MethodError, "'break' outside loop"),
    ("m", ["print"], "return 1", MethodError, '"print" is a reserved name'),
])
def test_check_method_refuses(name: Any, args: Any, body: Any, error: type[Exception],
                              fragment: str) -> None:
    with pytest.raises(error, match=re.escape(fragment)) as info:
        methods.check_method(name, args, body)
    if isinstance(info.value, MethodError):
        assert info.value.method == name


def test_set_fun_refuses_and_leaves_ref_unchanged() -> None:
    shared = committed(SharedMap(), a=1)
    ref = shared.ref()
    with pytest.raises(MethodError, match="imports are not allowed"):
        ref.set_fun("m", [], "import os")
    with pytest.raises(InvalidValueError):
        ref.set_fun("m", ["self"], "return 1")
    assert "m" not in ref
    assert not ref.has_changed
    assert ref.to_dict() == {"a": 1}


def test_errors_name_the_line_of_the_body() -> None:
    with pytest.raises(MethodError, match="Line 2") as info:
        methods.check_method("m", [], "x = 1\nreturn x +\n")
    assert info.value.method == "m"
    with pytest.raises(MethodError, match="Line 3: name 'open' is not available"):
        methods.check_method("m", [], "x = 1\n\nreturn open(x)")
    with pytest.raises(MethodError, match='Line 2: "__class__" is an invalid attribute'):
        methods.check_method("m", [], "x = 1\nreturn x.__class__")


def test_every_problem_is_reported() -> None:
    with pytest.raises(MethodError) as info:
        methods.check_method("m", [], "import os\nreturn open(x.__class__)")
    message = str(info.value)
    assert "imports are not allowed" in message
    assert "__class__" in message


# -- escape attempts -------------------------------------------------------------

# Refused when the method is defined (and again if it arrives from a peer).
REFUSED_AT_DEFINITION = [
    ("import os", "imports are not allowed"),
    ("from os import path", "imports are not allowed"),
    ("__import__('os')", '"__import__" is an invalid variable name'),
    ("return ().__class__.__bases__[0].__subclasses__()", '"__class__" is an invalid attribute'),
    ("return self.__class__", '"__class__" is an invalid attribute'),
    ("return getattr(self, '__class__')", "name 'getattr' is not available"),
    ("return open('/etc/passwd').read()", "name 'open' is not available"),
    ("return eval('1')", "Eval calls are not allowed"),
    ("exec('x=1')", "Exec calls are not allowed"),
    ("return compile('1', 'f', 'eval')", "name 'compile' is not available"),
    ("return type(1).__subclasses__", '"__subclasses__" is an invalid attribute'),
    ("return type(1)", "name 'type' is not available"),
    ("return globals()", "name 'globals' is not available"),
    ("return locals()", "name 'locals' is not available"),
    ("return vars()", "name 'vars' is not available"),
    ("return dir(self)", "name 'dir' is not available"),
    ("return [].__class__.__mro__", '"__mro__" is an invalid attribute'),
    ("return int.mro()[-1].__subclasses__()", '"__subclasses__" is an invalid attribute'),
    ("x.foo = 1", "assigning or deleting attribute 'foo' is not allowed"),
    ("del x.foo", "assigning or deleting attribute 'foo' is not allowed"),
    ("setattr(x, 'foo', 1)", "name 'setattr' is not available"),
    ("g = (i for i in [1])\nreturn g.gi_frame.f_back", '"gi_frame" is a restricted name'),
    ("g = (i for i in [1])\nreturn g.gi_code", '"gi_code" is a restricted name'),
    ("return (lambda: 0).__globals__", '"__globals__" is an invalid attribute'),
    ("return (lambda: 0).__code__", '"__code__" is an invalid attribute'),
    ("return self.get.__self__", '"__self__" is an invalid attribute'),
    ("f = lambda __x: 0", '"__x" is an invalid variable name'),
    ("return __builtins__", '"__builtins__" is an invalid variable name'),
    ("return _getattr_(self, '__class__')", '"_getattr_" is an invalid variable name'),
    ("try:\n    1 / 0\nexcept Exception as e:\n    return e.__traceback__.tb_frame",
     '"__traceback__" is an invalid attribute'),
    ("print('hi')", "print is not available"),
    ("global len\nlen = None", "global statements are not allowed"),
    ("class A:\n    pass", "class definitions are not allowed"),
    ("yield 1", "yield is not allowed"),
    ("async def f():\n    pass", "AsyncFunctionDef statements are not allowed"),
    ("def f():\n    nonlocal x", "Nonlocal statements are not allowed"),
    ("try:\n    pass\nexcept* ValueError:\n    pass", "TryStar statements are not allowed"),
    ("return serialized_method", "name 'serialized_method' is not available"),
]


@pytest.mark.parametrize(("body", "fragment"), REFUSED_AT_DEFINITION)
def test_escape_refused_by_set_fun(body: str, fragment: str) -> None:
    ref = SharedMap().ref()
    with pytest.raises(MethodError, match="does not compile") as info:
        ref.set_fun("m", ["x"], body)
    assert fragment in str(info.value)
    assert "m" not in ref


@pytest.mark.parametrize(("body", "fragment"), REFUSED_AT_DEFINITION)
def test_escape_refused_when_it_comes_from_a_peer(body: str, fragment: str) -> None:
    shared = from_peer({"type": FUNCTION_MARKER, "args": ["x"], "body": body})
    with pytest.raises(MethodError, match="does not compile") as info:
        shared.ref().apply_method("m", [1])
    assert fragment in str(info.value)
    assert info.value.method == "m"


# Compile, but fail when they run.
REFUSED_AT_RUN = [
    ("return '{0.__class__}'.format(1)", "format"),
    ("return '{x.__class__}'.format_map({'x': 1})", "format"),
    ("return str.format('{0.__class__}', 1)", "format"),
    ("f = '{0.__class__}'.format\nreturn f(1)", "format"),
    ("return x.format('{0.__class__}', 1)", "format"),
    ("return self.prepare()", "cannot use 'prepare' of the map reference"),
    ("return self.dump()", "cannot use 'dump' of the map reference"),
    ("return self.updates_slice(0)", "cannot use 'updates_slice'"),
    ("return self.changes", "cannot use 'changes'"),
    ("return self.keys().mapping", "mapping"),
]


@pytest.mark.parametrize(("body", "fragment"), REFUSED_AT_RUN)
def test_escape_refused_at_run_time(body: str, fragment: str) -> None:
    shared = with_method("m", ["x"], body)
    with pytest.raises(MethodError, match="method 'm' raised") as info:
        shared.ref(read_only=True).apply_method("m", ["{0}"])
    assert fragment in str(info.value)


@pytest.mark.parametrize("body", [
    "dict.update(self.get('cfg'), {'a': 666})",
    "dict.clear(self['cfg'])",
    "dict.setdefault(self['cfg'], 'b', 2)",
    "dict.pop(self['cfg'], 'a')",
    "dict.popitem(self['cfg'])",
    "list.append(self['lst'], 2)",
    "list.extend(self['lst'], [2])",
    "list.insert(self['lst'], 0, 2)",
    "list.sort(self['lst'], reverse=True)",
    "list.reverse(self['lst'])",
    "list.remove(self['lst'], 1)",
    "list.pop(self['lst'])",
    "list.clear(self['lst'])",
    "f = list.append\nf(self['lst'], 2)",
    "list(map(list.append, [self['lst']], [2]))",
    "dict.update(x, {'a': 666})",
])
def test_unbound_container_mutators_are_refused(body: str) -> None:
    """``dict.update(frozen, ...)`` runs dict's own code, past FrozenDict's
    guards: it would change a stored value under every snapshot."""
    shared = with_method("m", ["x"], body, cfg={"a": 1, "z": 0}, lst=[1, 0])
    before = shared.ref().to_dict()
    with pytest.raises(MethodError, match=r"serialized methods cannot use (dict|list)\.") as info:
        shared.ref(read_only=True).apply_method("m", [{"a": 1}])
    assert isinstance(info.value.__cause__, AttributeError)
    assert shared.ref().to_dict() == before


def test_harmless_class_attributes_stay_available() -> None:
    body = """
return [dict.fromkeys(names, 0), list.count(names, "b"), list.index(names, "a"),
        sorted(names, key=str.lower), dict.get(self["cfg"], "a"), list.copy(names),
        sorted(dict.keys(self["cfg"]))]
"""
    assert run(body, ["names"], [["b", "A", "a"]], cfg={"a": 1}) == [
        {"b": 0, "A": 0, "a": 0}, 1, 2, ["A", "a", "b"], 1, ["b", "A", "a"], ["a"]]


def test_the_documented_ref_attributes_are_reachable() -> None:
    for attr in sorted(methods.REF_ATTRIBUTES):
        check = with_method("m", [], f"return self.{attr} is not None", v=1)
        assert check.ref().apply_method("m", []) is True, attr


# -- peers sending malformed descriptors ----------------------------------------


@pytest.mark.parametrize(("desc", "fragment"), [
    ({"type": FUNCTION_MARKER, "args": "x", "body": "return 1"}, "'args' must be a list"),
    ({"type": FUNCTION_MARKER, "args": [1], "body": "return 1"},
     "argument #0 of the method must be a str, got int"),
    ({"type": FUNCTION_MARKER, "args": [["x"]], "body": "return 1"}, "'args' must be a list"),
    ({"type": FUNCTION_MARKER, "args": [{"x": 1}], "body": "return 1"}, "'args' must be a list"),
    ({"type": FUNCTION_MARKER, "body": "return 1"}, "'args' must be a list"),
    ({"type": FUNCTION_MARKER, "args": [], "body": 3}, "'body' must be a str"),
    ({"type": FUNCTION_MARKER, "args": []}, "'body' must be a str"),
    ({"type": FUNCTION_MARKER, "args": ["x=__import__('os')"], "body": "return 1"},
     "not a valid Python identifier"),
    ({"type": FUNCTION_MARKER, "args": ["x): pass\ndef y("], "body": "return 1"},
     "not a valid Python identifier"),
    ({"type": FUNCTION_MARKER, "args": ["self"], "body": "return 1"}, "'self' is reserved"),
    ({"type": FUNCTION_MARKER, "args": ["a", "a"], "body": "return 1"}, "repeated"),
    ({"type": FUNCTION_MARKER, "args": [], "body": "var x = this.get('x'); return x + 1;"},
     "SyntaxError"),
])
def test_malformed_descriptor_from_a_peer(desc: dict[str, Any], fragment: str) -> None:
    shared = from_peer(desc)
    with pytest.raises(MethodError, match="'m'") as info:
        shared.ref().apply_method("m", [])
    assert fragment in str(info.value)
    assert info.value.method == "m"


def test_call_method_checks_the_descriptor_itself() -> None:
    ref = SharedMap().ref()
    with pytest.raises(MethodError, match="does not hold a serialized method"):
        methods.call_method(ref, "m", {"type": "other", "args": [], "body": "return 1"}, [])
    with pytest.raises(MethodError, match="does not hold a serialized method"):
        methods.call_method(ref, "m", ["not", "a", "mapping"], [])
    desc = {"type": FUNCTION_MARKER, "args": ["a"], "body": "return a * 2"}
    assert methods.call_method(ref, "m", desc, [21]) == 42


# -- the compiled-method cache ---------------------------------------------------


def test_cache_hits_and_shares_entries() -> None:
    methods.cache_clear()
    shared = with_method("a", ["x"], "return x + 1")
    after_define = methods.cache_info()
    assert (after_define.misses, after_define.size) == (1, 1)
    ref = shared.ref()
    for _ in range(5):
        assert ref.apply_method("a", [1]) == 2
    info = methods.cache_info()
    assert info.misses == 1
    assert info.hits == after_define.hits + 5
    # same arguments and body under another name: the same compiled function
    ref.set_fun("b", ["x"], "return x + 1")
    assert ref.apply_method("b", [2]) == 3
    assert methods.cache_info().misses == 1
    # same body, other argument names: compiled on its own (and refused)
    with pytest.raises(MethodError, match="name 'x' is not available"):
        ref.set_fun("c", ["y"], "return x + 1")
    assert methods.cache_info().misses == 2


def test_broken_method_compiles_once() -> None:
    methods.cache_clear()
    shared = from_peer({"type": FUNCTION_MARKER, "args": [], "body": "import os"})
    for _ in range(3):
        with pytest.raises(MethodError, match="imports are not allowed"):
            shared.ref().apply_method("m", [])
    info = methods.cache_info()
    assert (info.misses, info.hits) == (1, 2)


def test_cache_is_bounded_and_evicted_methods_recompile() -> None:
    methods.cache_clear()
    ref = with_method("first", ["x"], "return x * 2").ref()
    extra = 50
    for i in range(methods.MAX_CACHE_SIZE + extra):
        ref.set_fun(f"m{i}", ["x"], f"return x + {i}")
    info = methods.cache_info()
    assert info.size == info.max_size == methods.MAX_CACHE_SIZE
    assert ref.apply_method("first", [4]) == 8  # evicted long ago: compiled again
    assert methods.cache_info().misses == info.misses + 1
    last = methods.MAX_CACHE_SIZE + extra - 1
    assert ref.apply_method(f"m{last}", [1]) == last + 1  # recent: still cached
    assert methods.cache_info().misses == info.misses + 1
    assert methods.cache_info().size == methods.MAX_CACHE_SIZE
