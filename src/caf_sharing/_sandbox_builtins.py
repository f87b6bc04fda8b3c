"""The closed world of the method sandbox: the builtins a method can name
(eager, charged stand-ins) and the attributes it can read, by exact type
(see :mod:`caf_sharing.methods`)."""

from __future__ import annotations

import builtins
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from RestrictedPython.Guards import full_write_guard

from ._fastmap import FrozenDict, FrozenList, MapRef
from ._sandbox_budget import (
    COMPILE_STEPS_PER_CHAR,
    ENTRY,
    ITEMS_PER_STEP,
    SLOT,
    caught,
    charge,
    charged,
    check_int,
    length_of,
    size_of,
    step,
)
from ._sandbox_operators import (
    _add,
    _and,
    _apply,
    _check_elements,
    _check_pairs,
    _check_tree,
    _elements,
    _floordiv,
    _format,
    _getitem,
    _inplacevar,
    _iter_unpack_sequence,
    _key,
    _lshift,
    _mod,
    _mul,
    _or,
    _pow,
    _scanned,
    _star,
    _sub,
    _tree,
    _trees,
    _unpack_sequence,
    _xor,
)
from .errors import ReadOnlyError

# -- builtins ---------------------------------------------------------------------


def _eager(function: Callable[..., Iterable[Any]], length: int, *args: Any) -> list[Any]:
    charge(length // ITEMS_PER_STEP + 1, SLOT * length)
    return list(function(*args))


def _map(function: Callable[..., Any], first: Any, *rest: Any) -> list[Any]:
    length = min(length_of(it) for it in (first, *rest))
    return _eager(builtins.map, length, function, first, *rest)


def _filter(function: Callable[[Any], Any] | None, iterable: Any) -> list[Any]:
    return _eager(builtins.filter, length_of(iterable), function, iterable)


def _zip(*iterables: Any, strict: bool = False) -> list[tuple[Any, ...]]:
    length = min((length_of(it) for it in iterables), default=0)
    charge(0, SLOT * length * len(iterables))
    return _eager(functools.partial(builtins.zip, strict=strict), length, *iterables)


def _enumerate(iterable: Any, start: int = 0) -> list[tuple[int, Any]]:
    n = length_of(iterable)
    charge(0, 2 * SLOT * n)
    return _eager(builtins.enumerate, n, iterable, start)


def _reversed(sequence: Any) -> list[Any]:
    return _eager(builtins.reversed, length_of(sequence), sequence)


def _sorted(iterable: Any, /, *, key: Callable[[Any], Any] | None = None,
            reverse: bool = False) -> list[Any]:
    n = length_of(iterable)
    charge(n * max(n.bit_length(), 1) // ITEMS_PER_STEP + 1, SLOT * n)
    items = list(iterable)
    _check_tree(items)
    return builtins.sorted(items, key=_trees(key), reverse=reverse)


def _reduction(function: Callable[..., Any], compares: bool) -> Callable[..., Any]:
    def reduce(*args: Any, **kwargs: Any) -> Any:
        charge(length_of(args[0]) // ITEMS_PER_STEP if len(args) == 1 else 0, 0)
        if compares:
            _check_tree(list(args[0]) if len(args) == 1 else args)
            if "key" in kwargs:
                kwargs["key"] = _trees(kwargs["key"])
        return function(*args, **kwargs)
    reduce.__name__ = function.__name__
    return reduce


def _sum(iterable: Any, /, start: Any = 0) -> Any:
    if isinstance(start, int | float):
        charge(length_of(iterable) // ITEMS_PER_STEP, 0)
        return builtins.sum(iterable, start)
    if isinstance(start, str):
        raise TypeError("sum() can't sum strings [use ''.join(seq) instead]")
    # Adding up lists or tuples: each addition creates a new value.
    total = start
    for item in iterable:
        step()
        total = _add(total, item)
    return total


def _round(number: Any, ndigits: Any = None) -> Any:
    if (isinstance(number, int) and isinstance(ndigits, int)
            and -ndigits > number.bit_length() // 3 + 2):
        return 0  # what round() gives, without computing 10 ** -ndigits
    return round(number, ndigits)


def _list(iterable: Any = (), /) -> list[Any]:
    n = length_of(iterable)
    charge(n // ITEMS_PER_STEP, SLOT * n)
    return list(iterable)


def _tuple(iterable: Any = (), /) -> tuple[Any, ...]:
    n = length_of(iterable)
    charge(n // ITEMS_PER_STEP, SLOT * n)
    return tuple(iterable)


def _dict(*args: Any, **kwargs: Any) -> dict[Any, Any]:
    n = len(kwargs) + (length_of(args[0]) if args else 0)
    charge(n // ITEMS_PER_STEP, ENTRY * n)
    if args:
        _check_pairs(args[0])
    return dict(*args, **kwargs)


def _str(*args: Any, **kwargs: Any) -> str:
    if args:
        _tree(args[0])
    return charged(str(*args, **kwargs))  # type: ignore[no-any-return]


def _int(*args: Any, **kwargs: Any) -> int:
    if args and isinstance(args[0], str | bytes):
        # Non-decimal bases escape sys.set_int_max_str_digits.
        charge(len(args[0]) // ITEMS_PER_STEP, 0)
    return check_int(int(*args, **kwargs))


class _BuiltinType:
    """What a method sees for ``dict``, ``list``, ``str``...: calling it
    constructs (charged), ``isinstance`` works, and only the unbound methods
    in :data:`CLASS_ATTRIBUTES` can be read from it."""

    __slots__ = ("_make", "_type")

    def __init__(self, type_: type, make: Callable[..., Any]) -> None:
        self._type = type_
        self._make = make

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._make(*args, **kwargs)

    def __instancecheck__(self, instance: Any) -> bool:
        return isinstance(instance, self._type)

    def __repr__(self) -> str:
        return repr(self._type)


_SAFE_FUNCTIONS: dict[str, Any] = {
    # range is the real class: a range is small whatever its length, every
    # builtin that walks one is charged by its length, and a method cannot
    # read an attribute of a class it was not given a stand-in for.
    "abs": abs, "isinstance": isinstance, "len": len, "range": range, "round": _round,
    "all": _reduction(all, False), "any": _reduction(any, False),
    "max": _reduction(max, True), "min": _reduction(min, True), "sum": _sum, "sorted": _sorted,
    "enumerate": _enumerate, "filter": _filter, "map": _map, "reversed": _reversed,
    "zip": _zip,
}
_TYPES: dict[str, _BuiltinType] = {
    "bool": _BuiltinType(bool, bool), "dict": _BuiltinType(dict, _dict),
    "float": _BuiltinType(float, float), "int": _BuiltinType(int, _int),
    "list": _BuiltinType(list, _list), "str": _BuiltinType(str, _str),
    "tuple": _BuiltinType(tuple, _tuple),
}
# So that methods can raise and catch the usual errors; their instances
# expose no attribute (the closed world below).
_SAFE_EXCEPTIONS = (
    "ArithmeticError", "Exception", "IndexError", "KeyError", "LookupError",
    "TypeError", "ValueError", "ZeroDivisionError",
)

#: Global names a method may use (``None``, ``True`` and ``False`` are
#: keywords and always work).
BUILTIN_NAMES = frozenset((*_SAFE_FUNCTIONS, *_TYPES, *_SAFE_EXCEPTIONS))


# -- closed-world attribute reads ---------------------------------------------------

#: What a method may use on ``self``, the MapRef it is applied to. Reading
#: with ``self[key]``, ``key in self``, ``len(self)`` and ``for key in self``
#: needs no attribute and works too. The writes (``set``, ``delete``,
#: ``set_fun``) need a writable ref.
REF_ATTRIBUTES = frozenset({
    "get", "keys", "values", "items", "to_dict", "version", "is_read_only",
    "has_changed", "apply_method", "set", "delete", "set_fun",
})
_REF_WRITES = frozenset({"set", "delete", "set_fun"})
_REF_READS = REF_ATTRIBUTES - _REF_WRITES

_STR_METHODS = frozenset({
    "capitalize", "casefold", "center", "count", "endswith", "expandtabs", "find",
    "index", "isalnum", "isalpha", "isascii", "isdecimal", "isdigit", "isidentifier",
    "islower", "isnumeric", "isprintable", "isspace", "istitle", "isupper", "join",
    "ljust", "lower", "lstrip", "partition", "removeprefix", "removesuffix", "replace",
    "rfind", "rindex", "rjust", "rpartition", "rsplit", "rstrip", "split", "splitlines",
    "startswith", "strip", "swapcase", "title", "upper", "zfill",
})
_INT_ATTRIBUTES = frozenset({
    "as_integer_ratio", "bit_count", "bit_length", "conjugate", "denominator", "imag",
    "numerator", "real",
})
_FLOAT_ATTRIBUTES = frozenset({
    "as_integer_ratio", "conjugate", "hex", "imag", "is_integer", "real",
})
_LIST_METHODS = frozenset({
    "append", "clear", "copy", "count", "extend", "index", "insert", "pop", "remove",
    "reverse", "sort",
})
_DICT_METHODS = frozenset({
    "clear", "copy", "get", "items", "keys", "pop", "popitem", "setdefault", "update",
    "values",
})
_SET_METHODS = frozenset({
    "add", "clear", "copy", "difference", "discard", "intersection", "isdisjoint",
    "issubset", "issuperset", "pop", "remove", "symmetric_difference", "union", "update",
})

#: The unbound methods a method may read on the builtin classes it can name;
#: never a mutator, which would run on a frozen value past its guards.
CLASS_ATTRIBUTES: Mapping[str, frozenset[str]] = {
    "dict": frozenset({"copy", "fromkeys", "get", "items", "keys", "values"}),
    "list": frozenset({"copy", "count", "index"}),
    "tuple": frozenset({"count", "index"}),
    "str": _STR_METHODS - {"center", "expandtabs", "join", "ljust", "replace", "rjust",
                           "zfill"},
}
_CLASS_ATTRIBUTES = {_TYPES[name]: (name, attrs) for name, attrs in CLASS_ATTRIBUTES.items()}

# Methods whose result size depends on their arguments: checked before
# they run.


def _pad(s: str, name: str) -> Callable[..., str]:
    method = getattr(s, name)

    def pad(width: Any, *fill: Any) -> str:
        if isinstance(width, int):
            charge(0, max(width, 0) * (1 if s.isascii() else 4))
        return method(width, *fill)  # type: ignore[no-any-return]
    return pad


def _expandtabs(s: str, name: str) -> Callable[..., str]:
    def expandtabs(tabsize: Any = 8) -> str:
        if isinstance(tabsize, int):
            charge(0, len(s) + s.count("\t") * max(tabsize, 0))
        return s.expandtabs(tabsize)
    return expandtabs


def _replace(s: str, name: str) -> Callable[..., str]:
    def replace(old: Any, new: Any, count: Any = -1) -> str:
        if isinstance(old, str) and isinstance(new, str) and isinstance(count, int):
            found = s.count(old) if old else len(s) + 1
            if count >= 0:
                found = min(found, count)
            charge(0, len(s) + found * len(new))
        return s.replace(old, new, count)
    return replace


def _join(s: str, name: str) -> Callable[[Any], str]:
    def join(iterable: Any) -> str:
        items = _list(iterable)
        if all(type(item) is str for item in items):
            charge(0, sum(map(len, items)) + len(s) * max(len(items) - 1, 0))
        return s.join(items)
    return join


def _growing(obj: Any, name: str) -> Callable[..., Any]:
    # list.extend, dict.update, set.update/union...: charged by what they add.
    method = getattr(obj, name)
    per_item = SLOT if isinstance(obj, list) else ENTRY

    check = _check_pairs if isinstance(obj, dict) else _check_elements

    def grow(*args: Any, **kwargs: Any) -> Any:
        n = len(kwargs) + sum(length_of(arg) for arg in args)
        charge(n // ITEMS_PER_STEP, per_item * n)
        for arg in args:
            check(arg)
        return method(*args, **kwargs)
    return grow


def _hashing(obj: Any, name: str) -> Callable[..., Any]:
    # dict.get/pop/setdefault, set.add/discard/remove: the first argument is hashed.
    method = getattr(obj, name)

    def call(key: Any = None, *rest: Any) -> Any:
        return method(_key(key), *rest)
    return call


def _hashing_all(obj: Any, name: str) -> Callable[..., Any]:
    # set.intersection/difference/issubset...: every element of every argument.
    method = getattr(obj, name)

    def call(*others: Any) -> Any:
        charge(len(obj) // ITEMS_PER_STEP, 0)
        for other in others:
            charge(length_of(other) // ITEMS_PER_STEP, 0)
            _check_elements(other)
        return method(*others)
    return call


def _copying(obj: Any, name: str) -> Callable[..., Any]:
    # A whole copy, a sort, a split: charged by the value's size first.
    method = getattr(obj, name)

    def copy(*args: Any, **kwargs: Any) -> Any:
        n = length_of(obj)
        charge(n * max(n.bit_length(), 1) // ITEMS_PER_STEP if name == "sort"
                else n // ITEMS_PER_STEP, size_of(obj) * (SLOT if name in _SPLITS else 1))
        return method(*args, **kwargs)
    return copy


def _walking(obj: Any, name: str) -> Any:
    # Methods that walk the value once: a share of a step per item.
    charge(len(obj) // ITEMS_PER_STEP, 0)
    return getattr(obj, name)


def _comparing(obj: Any, name: str) -> Callable[..., Any]:
    # list.count/index/remove, tuple.count/index: compare with every item.
    method = getattr(obj, name)

    def compare(value: Any, *rest: Any) -> Any:
        _check_tree(obj)
        return method(_tree(value), *rest)
    return compare


def _sorting(obj: list[Any], name: str) -> Callable[..., None]:
    def sort(*, key: Callable[[Any], Any] | None = None, reverse: bool = False) -> None:
        n = len(obj)
        charge(n * max(n.bit_length(), 1) // ITEMS_PER_STEP, 0)
        _check_tree(obj)
        obj.sort(key=_trees(key), reverse=reverse)
    return sort


_SPLITS = frozenset({"split", "rsplit", "splitlines"})
_Guard = Callable[[Any, str], Any]
_STR_GUARDS: dict[str, _Guard] = {name: _walking for name in _STR_METHODS}
_STR_GUARDS.update({"center": _pad, "ljust": _pad, "rjust": _pad, "zfill": _pad,
                    "expandtabs": _expandtabs, "replace": _replace, "join": _join,
                    "split": _copying, "rsplit": _copying, "splitlines": _copying})
_LIST_GUARDS: dict[str, _Guard | None] = dict.fromkeys(_LIST_METHODS)
_LIST_GUARDS.update({"extend": _growing, "copy": _copying, "sort": _sorting,
                     "count": _comparing, "index": _comparing, "remove": _comparing,
                     "insert": _walking})
_DICT_GUARDS: dict[str, _Guard | None] = dict.fromkeys(_DICT_METHODS)
_DICT_GUARDS.update({"update": _growing, "copy": _copying, "get": _hashing,
                     "pop": _hashing, "setdefault": _hashing})
_SET_GUARDS: dict[str, _Guard | None] = dict.fromkeys(_SET_METHODS)
_SET_GUARDS.update({"update": _growing, "union": _growing, "copy": _copying,
                    "add": _hashing, "discard": _hashing, "remove": _hashing,
                    "difference": _hashing_all, "intersection": _hashing_all,
                    "symmetric_difference": _growing, "issubset": _hashing_all,
                    "issuperset": _hashing_all, "isdisjoint": _hashing_all})
_RULES: dict[type, Mapping[str, _Guard | None]] = {
    str: _STR_GUARDS, list: _LIST_GUARDS, FrozenList: _LIST_GUARDS,
    dict: _DICT_GUARDS, FrozenDict: _DICT_GUARDS, set: _SET_GUARDS,
    tuple: {"count": _comparing, "index": _comparing},
    int: dict.fromkeys(_INT_ATTRIBUTES), bool: dict.fromkeys(_INT_ATTRIBUTES),
    float: dict.fromkeys(_FLOAT_ATTRIBUTES),
}
#: The attributes a method may read on a value, by its exact type (the
#: frozen containers have the names of the plain ones; their mutators raise).
VALUE_ATTRIBUTES: Mapping[type, frozenset[str]] = {
    t: frozenset(rules) for t, rules in _RULES.items()}


def _fromkeys(iterable: Any, value: Any = None) -> dict[Any, Any]:
    n = length_of(iterable)
    charge(n // ITEMS_PER_STEP, ENTRY * n)
    _check_elements(iterable)
    return dict.fromkeys(iterable, value)


def _unbound_get(mapping: Any, key: Any, default: Any = None) -> Any:
    return dict.get(mapping, _key(key), default)


def _compiling(set_fun: Callable[..., Any]) -> Callable[..., Any]:
    def compile_and_set(name: Any, args: Any, body: Any) -> Any:
        if isinstance(body, str):
            charge(COMPILE_STEPS_PER_CHAR * len(body), 0)
        return set_fun(name, args, body)
    return compile_and_set


def _freezing(method: Callable[..., Any], position: int) -> Callable[..., Any]:
    # self.set(key, value), self.apply_method(name, args): the value is
    # deep-frozen, a copy that walks it as a tree.
    def freeze(*args: Any) -> Any:
        if len(args) > position:
            _tree(args[position])
        return method(*args)
    return freeze


_CLASS_GUARDS: dict[tuple[str, str], Callable[..., Any]] = {
    ("dict", "fromkeys"): _fromkeys, ("dict", "get"): _unbound_get}


def _guarded_getattr(obj: Any, name: str) -> Any:
    t = type(obj)
    if t is MapRef:
        if name in _REF_READS:
            if name == "to_dict":  # a deep copy of the whole map
                charge(len(obj) // ITEMS_PER_STEP, ENTRY * len(obj))
            elif name == "apply_method":  # its arguments are frozen: a copy
                return _freezing(obj.apply_method, 1)
            return getattr(obj, name)
        if name in _REF_WRITES:
            if obj.is_read_only:
                raise ReadOnlyError(f"cannot use {name!r}: the map reference is read-only")
            if name == "set":
                return _freezing(obj.set, 1)
            return _compiling(obj.set_fun) if name == "set_fun" else getattr(obj, name)
        raise AttributeError(
            f"serialized methods cannot use {name!r} of the map reference; "
            f"allowed: {', '.join(sorted(REF_ATTRIBUTES))}")
    rules = _RULES.get(t)
    if rules is not None:
        if name in rules:
            guard = rules[name]
            return getattr(obj, name) if guard is None else guard(obj, name)
    elif t is _BuiltinType and obj in _CLASS_ATTRIBUTES:
        class_name, allowed = _CLASS_ATTRIBUTES[obj]
        if name in allowed:
            return _CLASS_GUARDS.get((class_name, name)) or getattr(obj._type, name)
        raise AttributeError(
            f"serialized methods cannot use {class_name}.{name}: only "
            f"{', '.join(sorted(allowed))} (a mutator could change a value the method "
            f"does not own; call it on a copy, e.g. {class_name}(value))")
    raise AttributeError(
        f"serialized methods cannot read attribute {name!r} of a {t.__name__!r} value")


_BUILTINS: dict[str, Any] = {name: getattr(builtins, name) for name in _SAFE_EXCEPTIONS}
_BUILTINS.update(_SAFE_FUNCTIONS)
_BUILTINS.update(_TYPES)
# The helpers the policy's rewritten code calls; their names start with "_",
# so the method's own code cannot name them.
_BUILTINS.update({
    "_getattr_": _guarded_getattr,
    "_getitem_": _getitem,
    "_getiter_": iter,
    "_iter_unpack_sequence_": _iter_unpack_sequence,
    "_unpack_sequence_": _unpack_sequence,
    "_write_": full_write_guard,
    "_inplacevar_": _inplacevar,
    "_apply_": _apply,
    "_step_": step,
    "_caught_": caught,
    "_add_": _add,
    "_mul_": _mul,
    "_pow_": _pow,
    "_lshift_": _lshift,
    "_mod_": _mod,
    "_floordiv_": _floordiv,
    "_format_": _format,
    "_scanned_": _scanned,
    "_star_": _star,
    "_key_": _key,
    "_tree_": _tree,
    "_elements_": _elements,
    "_or_": _or,
    "_and_": _and,
    "_xor_": _xor,
    "_sub_": _sub,
})
