"""The guarded operators of the method sandbox: what ``+``, ``*``, ``**``,
``%``, subscripts, unpacking, ``in`` and f-strings run, charged to the
budget before they create anything, and the walks that make hashing and
comparing a value safe (see :mod:`caf_sharing.methods`)."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable
from typing import Any

from . import _sandbox_budget as budget
from ._fastmap import FrozenDict, FrozenList, MapRef
from ._sandbox_budget import (
    ENTRY,
    ITEMS_PER_STEP,
    MAX_INT_BITS,
    SLOT,
    big_int_cost,
    charge,
    charged,
    check_int,
    length_of,
    over,
    size_of,
)

#: How deeply a tuple used as a dict key or set member may nest.
MAX_KEY_DEPTH = 100


# -- guarded operators ------------------------------------------------------------

_SEQUENCES = (str, bytes, list, tuple)


def _add(a: Any, b: Any) -> Any:
    if (type(a) is int and type(b) is int) or type(a) is float:
        return a + b
    if isinstance(a, _SEQUENCES) and isinstance(b, _SEQUENCES):
        charge(0, size_of(a) + size_of(b))
    return a + b


def _charge_repeat(seq: Any, times: int) -> None:
    # A repetition is a memory copy: a step per few hundred items.
    times = max(times, 0)
    charge((len(seq) * times) >> 8, size_of(seq) * times)


def _repeat(seq: Any, times: Any) -> Any:
    _charge_repeat(seq, times)
    return seq * times


def _mul(a: Any, b: Any) -> Any:
    if isinstance(a, int):
        if isinstance(b, int):
            bits = a.bit_length() + b.bit_length()
            if bits > 128:
                if bits > MAX_INT_BITS:
                    over("MAX_INT_BITS")
                big_int_cost(a, b)
            return a * b
        if isinstance(b, _SEQUENCES):
            return _repeat(b, a)
    elif isinstance(b, int) and isinstance(a, _SEQUENCES):
        return _repeat(a, b)
    return a * b


def _pow(a: Any, b: Any) -> Any:
    if isinstance(a, int) and isinstance(b, int) and b > 1 and a.bit_length() > 1:
        # a ** b has between (n - 1) * b + 1 and n * b bits, for a of n bits.
        if (a.bit_length() - 1) * b + 1 > MAX_INT_BITS:
            over("MAX_INT_BITS")
        bits = a.bit_length() * b
        charge((bits * bits) >> 18, bits >> 3)
        return check_int(a ** b)
    return a ** b


def _lshift(a: Any, b: Any) -> Any:
    if isinstance(a, int) and isinstance(b, int) and a and b > 0:
        if a.bit_length() + b > MAX_INT_BITS:
            over("MAX_INT_BITS")
        charge(0, (a.bit_length() + b) >> 3)
    return a << b


def _floordiv(a: Any, b: Any) -> Any:
    if isinstance(a, int) and isinstance(b, int):
        big_int_cost(a, b)
    return a // b


# A %-format conversion: its width and precision (digits or '*').
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")
_DIGITS = re.compile(r"\d+")


def _mod(a: Any, b: Any) -> Any:
    if isinstance(a, str | bytes):
        text = a if isinstance(a, str) else a.decode("latin-1")
        charge(len(text) // ITEMS_PER_STEP, 0)
        for width, precision in _PERCENT_SPEC.findall(text):
            for number in (width, precision):
                if number == "*":
                    raise ValueError("'*' widths are not allowed in serialized methods")
                if number and int(number) > budget.bytes_left:
                    over("max_bytes")
        return charged(a % _tree(b))
    if isinstance(a, int) and isinstance(b, int):
        big_int_cost(a, b)
    return a % b


def _format(value: Any, spec: str, conversion: int) -> str:
    """One ``{value!conversion:spec}`` of an f-string, charged before the
    parts are joined."""
    if conversion != -1:
        _tree(value)
    if conversion == ord("r"):
        value = repr(value)
    elif conversion == ord("a"):
        value = ascii(value)
    elif conversion == ord("s"):
        value = str(value)
    for number in _DIGITS.findall(spec):
        if len(number) > 9 or int(number) > budget.bytes_left:
            over("max_bytes")
    return charged(format(_tree(value), spec))  # type: ignore[no-any-return]


# Containers whose ``in`` is a hash lookup, not a walk.
_HASHED = frozenset({dict, set, frozenset, FrozenDict, MapRef, type({}.keys()),
                     type({}.items())})


def _scanned(container: Any) -> Any:
    """The right side of ``in``: walked unless hashed (a walk compares)."""
    t = type(container)
    if t in _NESTED:
        if t is not dict and t is not set and t is not FrozenDict:
            _check_tree(container)
    elif t not in _HASHED:
        try:
            n = len(container)
        except TypeError:
            return container
        if n and t is not str and t is not bytes and t is not range:
            _check_tree(list(container))  # a values view
        else:
            charge(n // ITEMS_PER_STEP, 0)
    return container


def _getitem(obj: Any, key: Any) -> Any:
    if type(key) is tuple:
        _check_key(key)
    elif type(key) is slice and type(obj) is not range:
        # A slice copies: charged like the copy it makes.
        length = length_of(obj)
        n = len(range(*key.indices(length)))
        charge(n >> 8, size_of(obj) * n // length if length else 0)
    return obj[key]


def _star(value: Any) -> Any:
    """What ``*value`` unpacks into a call or a display: charged first."""
    n = length_of(value)
    charge(n // ITEMS_PER_STEP, SLOT * n)
    return value


# -- hashing --------------------------------------------------------------------------
#
# CPython hashes a tuple by hashing its items, recursively in C and with no
# depth check: a tuple key nested some 10**5 deep overflows the C stack, and
# one nested as a DAG ((t, t), each level) costs exponential time. So a tuple
# is walked, as the hash will walk it, before it is used as a dict key, a set
# member or the left side of ``in``.


# Steps charged per container a walk visits (its Python overhead), on top of
# a share per item.
_CONTAINER_STEPS = 4
_TUPLE = frozenset({tuple})


def _check_key(key: tuple[Any, ...]) -> None:
    allowed = max(budget.steps_left, 0)
    pending = [(key, 1)]
    steps = 0
    while pending:
        items, depth = pending.pop()
        if depth > MAX_KEY_DEPTH:
            raise ValueError(f"serialized methods cannot hash a tuple nested more than "
                             f"{MAX_KEY_DEPTH} levels deep")
        steps += _CONTAINER_STEPS + len(items) // ITEMS_PER_STEP
        if steps > allowed:
            over("max_steps")
        if not _TUPLE.isdisjoint(map(type, items)):
            pending.extend((item, depth + 1) for item in items if type(item) is tuple)
    charge(steps, 0)


def _key(key: Any) -> Any:
    if type(key) is tuple:
        _check_key(key)
    return key


def _check_elements(iterable: Any) -> None:
    # Elements about to be hashed; those of sets and dicts were already.
    t = type(iterable)
    if t is list or t is tuple or t is FrozenList:
        for item in iterable:
            if type(item) is tuple:
                _check_key(item)


# -- comparing and printing ------------------------------------------------------------
#
# ==, <, sorting, ``in``, str() and freezing walk a value as a tree: one
# shared many times inside itself (``a = [a, a]``, repeated) is a tree
# exponentially larger than its memory. So such operations first walk their
# operands as the operation will, charged, and stop at the budget.

_NESTED = frozenset({list, tuple, dict, set, FrozenList, FrozenDict})


def _check_tree(value: Any) -> None:
    allowed = max(budget.steps_left, 0)
    pending = [value]
    steps = 0
    while pending:
        container = pending.pop()
        steps += _CONTAINER_STEPS + len(container) // ITEMS_PER_STEP
        if steps > allowed:
            over("max_steps")
        items: Iterable[Any] = container
        if isinstance(container, dict):
            items = [*container, *container.values()]
        if not _NESTED.isdisjoint(map(type, items)):
            pending.extend(item for item in items if type(item) in _NESTED)
    charge(steps, 0)


def _tree(value: Any) -> Any:
    if type(value) in _NESTED:
        _check_tree(value)
    return value


def _trees(function: Callable[[Any], Any] | None) -> Callable[[Any], Any] | None:
    """A sort key whose results are checked like the values they stand for."""
    if function is None:
        return None
    key = function
    return lambda item: _tree(key(item))


def _elements(iterable: Any) -> Any:
    """What ``*iterable`` puts in a set display: checked first."""
    _check_elements(iterable)
    return iterable


def _check_pairs(iterable: Any) -> None:
    # (key, value) pairs about to become dict entries.
    t = type(iterable)
    if t is list or t is tuple or t is FrozenList:
        for pair in iterable:
            if type(pair) in (tuple, list) and len(pair) == 2 and type(pair[0]) is tuple:
                _check_key(pair[0])


def _set_operator(operation: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    # |, &, ^ and - of dict views hash the elements of a list or tuple operand.
    def apply(a: Any, b: Any) -> Any:
        if type(a) is not int and type(a) is not bool:
            _check_elements(a)
            _check_elements(b)
        return operation(a, b)
    return apply


_or = _set_operator(operator.or_)
_and = _set_operator(operator.and_)
_xor = _set_operator(operator.xor)
_sub = _set_operator(operator.sub)


_INPLACE_OPERATORS: dict[str, Callable[[Any, Any], Any]] = {
    "+=": operator.iadd, "-=": operator.isub, "*=": operator.imul,
    "/=": operator.itruediv, "//=": operator.ifloordiv, "%=": operator.imod,
    "**=": operator.ipow, "<<=": operator.ilshift, ">>=": operator.irshift,
    "&=": operator.iand, "|=": operator.ior, "^=": operator.ixor,
    "@=": operator.imatmul,
}


def _inplacevar(op: str, target: Any, value: Any) -> Any:
    # Plain ``x += y`` on a local name; frozen containers refuse it themselves.
    if op == "+=":
        if type(target) is int and type(value) is int:  # the usual counter
            return target + value
        if isinstance(target, list):  # extends in place: only the new items are created
            charge(0, SLOT * length_of(value))
            return _INPLACE_OPERATORS["+="](target, value)
        return _add(target, value)
    if op == "*=":
        if isinstance(target, list) and isinstance(value, int):  # repeats in place
            _charge_repeat(target, value - 1)
            return _INPLACE_OPERATORS[op](target, value)
        return _mul(target, value)
    if op == "**=":
        return _pow(target, value)
    if op == "<<=":
        return _lshift(target, value)
    if op == "%=":
        return _mod(target, value)
    if op == "//=":
        return _floordiv(target, value)
    if op in ("|=", "&=", "^=", "-=") and type(target) is not int:
        _check_elements(value)
        if op == "|=" and type(target) in (dict, set):
            charge(0, ENTRY * length_of(value))
    return _INPLACE_OPERATORS[op](target, value)


def _apply(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    # RestrictedPython routes ``f(*args, **kwargs)`` calls through here.
    return function(*args, **kwargs)


def _unpack_sequence(it: Any, spec: dict[str, Any], _getiter_: Any = iter) -> list[Any]:
    # RestrictedPython's guarded unpacking, with the copy charged first.
    n = length_of(it)
    charge(n // ITEMS_PER_STEP, SLOT * n)
    ret = list(it)
    if len(ret) < spec["min_len"]:
        return ret
    for index, child_spec in spec["childs"]:
        ret[index] = _unpack_sequence(ret[index], child_spec)
    return ret


def _iter_unpack_sequence(it: Any, spec: dict[str, Any], _getiter_: Any = iter) -> Any:
    # Used only as the iterable of a ``for a, b in ...`` loop, never reachable
    # by the method, so this generator cannot be chained.
    for ob in it:
        yield _unpack_sequence(ob, spec)
