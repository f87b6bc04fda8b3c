"""Serialized methods: code stored in a SharedMap, run in a sandbox.

A map can hold methods, as in Caf.js: ``ref.set_fun(name, args, body)``
stores ``{"type": FUNCTION_MARKER, "args": [...], "body": "<python source>"}``
and any reader runs it with ``ref.apply_method(name, args)``. The body is the
body of a function ``(self, *args)`` whose ``self`` is the MapRef the method
is applied to; it reads the map and returns a value::

    ref.set_fun("price", ["item", "qty"], "return self[item] * qty")
    ref.apply_method("price", ["apple", 3])

The core (``caf_sharing._fastmap``) calls exactly two functions of this
module: :func:`check_method` before ``set_fun`` stores a method, and
:func:`call_method` from ``apply_method``.

**What the sandbox promises.** A method's source comes from a map that
another actor, maybe on another machine, wrote. Whatever that source is, a
call of it ends, within its budget, in a return value or a
:class:`~caf_sharing.errors.MethodError`, with the process alive and nothing
changed outside the method except, through a writable ``self``, the caller's
own ref:

* **Compile-time refusals** (at ``set_fun``, and again when a replica first
  calls a method that arrived from a peer): a body longer than
  :attr:`MethodLimits.max_body` bytes (UTF-8; checked before compiling, on
  every call), imports, any name or attribute starting with ``_``,
  ``eval``/``exec``, assigning or deleting attributes, ``global``/
  ``nonlocal``, classes, ``yield``, async code, ``with``, ``match``, and any
  global name that is not one of :data:`BUILTIN_NAMES`.
* **Closed-world attribute reads.** ``obj.name`` works only when ``name`` is
  on the allow-list of ``type(obj)`` itself (no subclass inherits it): the
  read API of the map reference (:data:`REF_ATTRIBUTES`; the write API only
  on a writable ref) and the methods listed in :data:`VALUE_ATTRIBUTES` for
  ``str``, ``int``, ``bool``, ``float``, ``list``, ``tuple``, ``dict``,
  ``set`` and the frozen ``FrozenDict``/``FrozenList``. Every other attribute
  of every other object is refused: functions and bound methods (so neither
  a Cython function's ``func_globals`` nor anything else on what an allowed
  read returned), exceptions, types, modules, iterators, views, and whatever
  future Pythons add. The builtin classes a method may name (``dict``,
  ``list``, ``str``...) are stand-ins that construct, work with
  ``isinstance`` and expose only the harmless unbound methods of
  :data:`CLASS_ATTRIBUTES`.
* **Frozen data stays frozen.** Stored values are frozen, arguments are
  deep-frozen before the call, and no path reaches a mutator that would
  bypass the frozen containers' guards (``dict.update(frozen, ...)`` is not
  on any list).
* **No lazy chains, no deep hashing.** ``map``, ``filter``, ``zip``,
  ``enumerate`` and ``reversed`` return lists, and generator expressions are
  evaluated as list comprehensions, so no chain of lazy iterators can be
  built whose use or release recurses deep in C. A tuple is walked before it
  is hashed (as a dict key, set member or left side of ``in``): nested more
  than :data:`MAX_KEY_DEPTH` levels it is refused, and the walk is charged,
  because CPython hashes tuples recursively with no depth check. Likewise
  the operands of comparisons, sorting, ``min``/``max``, ``in``,
  ``count``/``index``, ``str()``/formatting, ``self.set`` and
  ``self.apply_method`` are walked first, charged as the tree the operation
  will walk, so a value shared many times inside itself (``a = [a, a]``,
  repeated: 2**60 paths in 120 lists) ends in the step limit, not a hang.
  Exception arguments are shortened before the message is built.
* **A budget per call** (:class:`MethodLimits`, per map or per node): a step
  count, where one step is a loop iteration, a comprehension item, a call of
  a function the method defines, or a share of the work of a builtin that
  walks a large value (``sorted``, ``sum``, ``in``, ``str`` methods...), and
  a memory count, charged *before* creation for every string, list, tuple,
  dict, set or big integer that concatenation, repetition, ``%`` and
  f-string formatting, ``**``, ``<<``, ``join``/``replace``/``ljust``...,
  ``extend``/``update``, unpacking and the builtins create. Integers made by
  ``*``, ``**``, ``<<`` and ``int()`` have at most :data:`MAX_INT_BITS` bits,
  and arithmetic on big integers is charged steps by its quadratic cost.
  Going over raises ``MethodError`` naming the limit; a method that calls
  other methods shares its budget with them, and it cannot catch the error
  (a bare ``except:`` catches ``Exception`` only; a ``finally: return`` that
  swallows it is caught at the end of the call). Functions and builtins a
  method returns refuse to run once its call is over.
* **Exceptions stay inside.** Any exception, ``BaseException`` included,
  reaches the caller as ``MethodError`` (chained), except a ``MethodError``
  raised by a nested ``self.apply_method``, which passes unchanged so that it
  names the method that failed.

**What it does not promise.** The step count is deterministic, not a clock:
the default (:data:`DEFAULT_MAX_STEPS`) is 75-140 ms of typical loop code on
the 2-core development machine (26 ms for an empty loop; see
``benchmarks/compare_methods.py``), but one step may do more work than
another: builtins that work in C are charged by the size of what they get
(about 16 items a step, a repetition 256 items a step), which only
approximates their time, and big-integer arithmetic is charged by its
quadratic cost. The memory count is cumulative and conservative: building a
long string by repeated ``+=`` is charged for every intermediate copy (use
``"".join``), and it counts what operators and builtins create, not the
small objects each step makes (bounded by the step count). Values a method
returns are the caller's to check: they may be nested as deep as the budget
allowed. The sandbox is pure Python on CPython: it relies on CPython having no bug
reachable from the allowed operations. Methods run on the caller's thread
(a method holds a process-wide lock while it runs, so calls from several
threads take turns) and block the event loop for as long as they run. A
method can read everything ``self`` can read and, on a writable ref, write
it. Open maps whose writers you do not trust at all with ``no_exec=True``:
then nothing stored in them ever runs.

Compiled methods are cached by ``(args, body)`` in a least-recently-used
cache of :data:`MAX_CACHE_SIZE` entries, so a hot method compiles once while
a stream of distinct bodies cannot grow memory without bound.
"""

from __future__ import annotations

import ast
import builtins
import dis
import functools
import keyword
import operator
import re
import reprlib
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import CodeType
from typing import Any, NamedTuple, NoReturn, cast

from RestrictedPython.compile import compile_restricted_function
from RestrictedPython.Guards import full_write_guard
from RestrictedPython.transformer import RestrictingNodeTransformer

from ._fastmap import FUNCTION_MARKER, FrozenDict, FrozenList, MapRef
from .errors import InvalidTypeError, InvalidValueError, MethodError, ReadOnlyError

__all__ = [
    "BUILTIN_NAMES",
    "CLASS_ATTRIBUTES",
    "DEFAULT_LIMITS",
    "DEFAULT_MAX_BODY",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_STEPS",
    "MAX_CACHE_SIZE",
    "MAX_INT_BITS",
    "MAX_KEY_DEPTH",
    "REF_ATTRIBUTES",
    "VALUE_ATTRIBUTES",
    "CacheInfo",
    "MethodLimits",
    "cache_clear",
    "cache_info",
    "call_method",
    "check_limits",
    "check_method",
]

#: Compiled methods kept, least recently used evicted first (Caf.js bounds
#: its cache at the same size).
MAX_CACHE_SIZE = 100

#: Steps per call by default: about 100 ms of loop code on the machine it
#: was measured on (benchmarks/compare_methods.py prints the figure).
DEFAULT_MAX_STEPS = 400_000
#: Bytes a call may create by default (16 MiB).
DEFAULT_MAX_BYTES = 16 * 2**20
#: Longest method body by default, in UTF-8 bytes (64 KiB).
DEFAULT_MAX_BODY = 64 * 2**10
#: The largest integer ``*``, ``**``, ``<<`` and ``int()`` may make.
MAX_INT_BITS = 2**16
#: How deeply a tuple used as a dict key or set member may nest.
MAX_KEY_DEPTH = 100


@dataclass(frozen=True, slots=True)
class MethodLimits:
    """The budget of one method call (and of the methods it calls).

    ``max_steps``: loop iterations, comprehension items, calls of functions
    the method defines, and shares of builtin work; ``max_bytes``: the total
    size of what the call creates; ``max_body``: the longest body accepted,
    in UTF-8 bytes (checked at ``set_fun`` and before each call).
    """

    max_steps: int = DEFAULT_MAX_STEPS
    max_bytes: int = DEFAULT_MAX_BYTES
    max_body: int = DEFAULT_MAX_BODY

    def __post_init__(self) -> None:
        for field in ("max_steps", "max_bytes", "max_body"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidTypeError(
                    f"MethodLimits.{field} must be an int, got {type(value).__name__}")
            if value < 1:
                raise InvalidValueError(f"MethodLimits.{field} must be >= 1, got {value}")


DEFAULT_LIMITS = MethodLimits()


def check_limits(limits: object) -> MethodLimits:
    """``limits`` if it is a :class:`MethodLimits`, the defaults for None."""
    if limits is None:
        return DEFAULT_LIMITS
    if type(limits) is not MethodLimits:
        raise InvalidTypeError(
            f"method_limits must be a MethodLimits or None, got {type(limits).__name__}")
    return limits


# -- the budget of the running call -------------------------------------------
#
# Module globals rather than an object: _step runs on every loop iteration,
# and a global decrement is the cheapest counter Python has. _LOCK makes the
# globals belong to one thread at a time; nested calls (a method applying
# another) re-enter it and share the budget.

_LOCK = threading.RLock()
_depth = 0
# Both below zero between calls: a function or stand-in that a method
# returned cannot run outside the call (see _over).
_steps_left = -1
_bytes_left = -1


class _OverBudget(BaseException):
    """Raised inside a method when a limit is passed: a BaseException, which
    a method cannot catch (it cannot name one, and its bare ``except:`` is
    compiled as ``except Exception:``)."""

    def __init__(self, limit: str) -> None:
        super().__init__(limit)
        self.limit = limit


def _over(limit: str) -> NoReturn:
    if _depth == 0:
        raise MethodError("a function or builtin that a serialized method returned can "
                          "only run inside a method call", method="")
    raise _OverBudget(limit)


def _step() -> bool:
    global _steps_left
    _steps_left -= 1
    if _steps_left < 0:
        _over("max_steps")
    return True


def _caught() -> None:
    # Run first in every except clause: handling an exception is a step, and
    # the handled exception forgets the one it was raised while handling, so
    # that retries in handlers cannot grow a chain that every raise walks.
    _step()
    exc = sys.exception()
    if exc is not None:
        exc.__context__ = None


def _charge(steps: int, nbytes: int) -> None:
    global _steps_left, _bytes_left
    _steps_left -= steps
    _bytes_left -= nbytes
    if _bytes_left < 0:
        _over("max_bytes")
    if _steps_left < 0:
        _over("max_steps")


# One step stands for about this many elements of a builtin's walk over a value.
_ITEMS_PER_STEP = 16
# Bytes charged per slot of a list/tuple, per entry of a dict/set.
_SLOT = 8
_ENTRY = 32


def _size(value: Any) -> int:
    """Bytes charged for a created value (its own storage, not its items')."""
    t = type(value)
    if t is str:
        return len(value) if value.isascii() else 4 * len(value)
    if t is list or t is tuple or t is FrozenList:
        return _SLOT * len(value)
    if t is bytes:
        return len(value)
    if t is dict or t is set or t is FrozenDict or t is frozenset:
        return _ENTRY * len(value)
    if t is int:
        return int(value.bit_length()) >> 3
    return 0


def _length(value: Any) -> int:
    try:
        return len(value)
    except TypeError:
        raise TypeError(f"{type(value).__name__!r} object is not a sized collection") from None


def _charged(result: Any) -> Any:
    _charge(0, _size(result))
    return result


def _check_int(value: int) -> int:
    if value.bit_length() > MAX_INT_BITS:
        _over("MAX_INT_BITS")
    return value


def _big_int_cost(a: int, b: int) -> None:
    # Schoolbook cost of multiplying/dividing two big integers, in steps.
    cost = (a.bit_length() * b.bit_length()) >> 16
    if cost:
        _charge(cost, 0)


# -- guarded operators ------------------------------------------------------------

_SEQUENCES = (str, bytes, list, tuple)


def _add(a: Any, b: Any) -> Any:
    if (type(a) is int and type(b) is int) or type(a) is float:
        return a + b
    if isinstance(a, _SEQUENCES) and isinstance(b, _SEQUENCES):
        _charge(0, _size(a) + _size(b))
    return a + b


def _charge_repeat(seq: Any, times: int) -> None:
    # A repetition is a memory copy: a step per few hundred items.
    times = max(times, 0)
    _charge((len(seq) * times) >> 8, _size(seq) * times)


def _repeat(seq: Any, times: Any) -> Any:
    _charge_repeat(seq, times)
    return seq * times


def _mul(a: Any, b: Any) -> Any:
    if isinstance(a, int):
        if isinstance(b, int):
            bits = a.bit_length() + b.bit_length()
            if bits > 128:
                if bits > MAX_INT_BITS:
                    _over("MAX_INT_BITS")
                _big_int_cost(a, b)
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
            _over("MAX_INT_BITS")
        bits = a.bit_length() * b
        _charge((bits * bits) >> 18, bits >> 3)
        return _check_int(a ** b)
    return a ** b


def _lshift(a: Any, b: Any) -> Any:
    if isinstance(a, int) and isinstance(b, int) and a and b > 0:
        if a.bit_length() + b > MAX_INT_BITS:
            _over("MAX_INT_BITS")
        _charge(0, (a.bit_length() + b) >> 3)
    return a << b


def _floordiv(a: Any, b: Any) -> Any:
    if isinstance(a, int) and isinstance(b, int):
        _big_int_cost(a, b)
    return a // b


# A %-format conversion: its width and precision (digits or '*').
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")
_DIGITS = re.compile(r"\d+")


def _mod(a: Any, b: Any) -> Any:
    if isinstance(a, str | bytes):
        text = a if isinstance(a, str) else a.decode("latin-1")
        _charge(len(text) // _ITEMS_PER_STEP, 0)
        for width, precision in _PERCENT_SPEC.findall(text):
            for number in (width, precision):
                if number == "*":
                    raise ValueError("'*' widths are not allowed in serialized methods")
                if number and int(number) > _bytes_left:
                    _over("max_bytes")
        return _charged(a % _tree(b))
    if isinstance(a, int) and isinstance(b, int):
        _big_int_cost(a, b)
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
        if len(number) > 9 or int(number) > _bytes_left:
            _over("max_bytes")
    return _charged(format(_tree(value), spec))  # type: ignore[no-any-return]


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
            _charge(n // _ITEMS_PER_STEP, 0)
    return container


def _getitem(obj: Any, key: Any) -> Any:
    if type(key) is tuple:
        _check_key(key)
    elif type(key) is slice and type(obj) is not range:
        # A slice copies: charged like the copy it makes.
        length = _length(obj)
        n = len(range(*key.indices(length)))
        _charge(n >> 8, _size(obj) * n // length if length else 0)
    return obj[key]


def _star(value: Any) -> Any:
    """What ``*value`` unpacks into a call or a display: charged first."""
    n = _length(value)
    _charge(n // _ITEMS_PER_STEP, _SLOT * n)
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
    budget = max(_steps_left, 0)
    pending = [(key, 1)]
    steps = 0
    while pending:
        items, depth = pending.pop()
        if depth > MAX_KEY_DEPTH:
            raise ValueError(f"serialized methods cannot hash a tuple nested more than "
                             f"{MAX_KEY_DEPTH} levels deep")
        steps += _CONTAINER_STEPS + len(items) // _ITEMS_PER_STEP
        if steps > budget:
            _over("max_steps")
        if not _TUPLE.isdisjoint(map(type, items)):
            pending.extend((item, depth + 1) for item in items if type(item) is tuple)
    _charge(steps, 0)


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
    budget = max(_steps_left, 0)
    pending = [value]
    steps = 0
    while pending:
        container = pending.pop()
        steps += _CONTAINER_STEPS + len(container) // _ITEMS_PER_STEP
        if steps > budget:
            _over("max_steps")
        items: Iterable[Any] = container
        if isinstance(container, dict):
            items = [*container, *container.values()]
        if not _NESTED.isdisjoint(map(type, items)):
            pending.extend(item for item in items if type(item) in _NESTED)
    _charge(steps, 0)


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
            _charge(0, _SLOT * _length(value))
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
            _charge(0, _ENTRY * _length(value))
    return _INPLACE_OPERATORS[op](target, value)


def _apply(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    # RestrictedPython routes ``f(*args, **kwargs)`` calls through here.
    return function(*args, **kwargs)


def _unpack_sequence(it: Any, spec: dict[str, Any], _getiter_: Any = iter) -> list[Any]:
    # RestrictedPython's guarded unpacking, with the copy charged first.
    n = _length(it)
    _charge(n // _ITEMS_PER_STEP, _SLOT * n)
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


# -- builtins ---------------------------------------------------------------------


def _eager(function: Callable[..., Iterable[Any]], length: int, *args: Any) -> list[Any]:
    _charge(length // _ITEMS_PER_STEP + 1, _SLOT * length)
    return list(function(*args))


def _map(function: Callable[..., Any], first: Any, *rest: Any) -> list[Any]:
    length = min(_length(it) for it in (first, *rest))
    return _eager(builtins.map, length, function, first, *rest)


def _filter(function: Callable[[Any], Any] | None, iterable: Any) -> list[Any]:
    return _eager(builtins.filter, _length(iterable), function, iterable)


def _zip(*iterables: Any, strict: bool = False) -> list[tuple[Any, ...]]:
    length = min((_length(it) for it in iterables), default=0)
    _charge(0, _SLOT * length * len(iterables))
    return _eager(functools.partial(builtins.zip, strict=strict), length, *iterables)


def _enumerate(iterable: Any, start: int = 0) -> list[tuple[int, Any]]:
    n = _length(iterable)
    _charge(0, 2 * _SLOT * n)
    return _eager(builtins.enumerate, n, iterable, start)


def _reversed(sequence: Any) -> list[Any]:
    return _eager(builtins.reversed, _length(sequence), sequence)


def _sorted(iterable: Any, /, *, key: Callable[[Any], Any] | None = None,
            reverse: bool = False) -> list[Any]:
    n = _length(iterable)
    _charge(n * max(n.bit_length(), 1) // _ITEMS_PER_STEP + 1, _SLOT * n)
    items = list(iterable)
    _check_tree(items)
    return builtins.sorted(items, key=_trees(key), reverse=reverse)


def _reduction(function: Callable[..., Any], compares: bool) -> Callable[..., Any]:
    def reduce(*args: Any, **kwargs: Any) -> Any:
        _charge(_length(args[0]) // _ITEMS_PER_STEP if len(args) == 1 else 0, 0)
        if compares:
            _check_tree(list(args[0]) if len(args) == 1 else args)
            if "key" in kwargs:
                kwargs["key"] = _trees(kwargs["key"])
        return function(*args, **kwargs)
    reduce.__name__ = function.__name__
    return reduce


def _sum(iterable: Any, /, start: Any = 0) -> Any:
    if isinstance(start, int | float):
        _charge(_length(iterable) // _ITEMS_PER_STEP, 0)
        return builtins.sum(iterable, start)
    if isinstance(start, str):
        raise TypeError("sum() can't sum strings [use ''.join(seq) instead]")
    # Adding up lists or tuples: each addition creates a new value.
    total = start
    for item in iterable:
        _step()
        total = _add(total, item)
    return total


def _round(number: Any, ndigits: Any = None) -> Any:
    if (isinstance(number, int) and isinstance(ndigits, int)
            and -ndigits > number.bit_length() // 3 + 2):
        return 0  # what round() gives, without computing 10 ** -ndigits
    return round(number, ndigits)


def _list(iterable: Any = (), /) -> list[Any]:
    n = _length(iterable)
    _charge(n // _ITEMS_PER_STEP, _SLOT * n)
    return list(iterable)


def _tuple(iterable: Any = (), /) -> tuple[Any, ...]:
    n = _length(iterable)
    _charge(n // _ITEMS_PER_STEP, _SLOT * n)
    return tuple(iterable)


def _dict(*args: Any, **kwargs: Any) -> dict[Any, Any]:
    n = len(kwargs) + (_length(args[0]) if args else 0)
    _charge(n // _ITEMS_PER_STEP, _ENTRY * n)
    if args:
        _check_pairs(args[0])
    return dict(*args, **kwargs)


def _str(*args: Any, **kwargs: Any) -> str:
    if args:
        _tree(args[0])
    return _charged(str(*args, **kwargs))  # type: ignore[no-any-return]


def _int(*args: Any, **kwargs: Any) -> int:
    if args and isinstance(args[0], str | bytes):
        # Non-decimal bases escape sys.set_int_max_str_digits.
        _charge(len(args[0]) // _ITEMS_PER_STEP, 0)
    return _check_int(int(*args, **kwargs))


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
            _charge(0, max(width, 0) * (1 if s.isascii() else 4))
        return method(width, *fill)  # type: ignore[no-any-return]
    return pad


def _expandtabs(s: str, name: str) -> Callable[..., str]:
    def expandtabs(tabsize: Any = 8) -> str:
        if isinstance(tabsize, int):
            _charge(0, len(s) + s.count("\t") * max(tabsize, 0))
        return s.expandtabs(tabsize)
    return expandtabs


def _replace(s: str, name: str) -> Callable[..., str]:
    def replace(old: Any, new: Any, count: Any = -1) -> str:
        if isinstance(old, str) and isinstance(new, str) and isinstance(count, int):
            found = s.count(old) if old else len(s) + 1
            if count >= 0:
                found = min(found, count)
            _charge(0, len(s) + found * len(new))
        return s.replace(old, new, count)
    return replace


def _join(s: str, name: str) -> Callable[[Any], str]:
    def join(iterable: Any) -> str:
        items = _list(iterable)
        if all(type(item) is str for item in items):
            _charge(0, sum(map(len, items)) + len(s) * max(len(items) - 1, 0))
        return s.join(items)
    return join


def _growing(obj: Any, name: str) -> Callable[..., Any]:
    # list.extend, dict.update, set.update/union...: charged by what they add.
    method = getattr(obj, name)
    per_item = _SLOT if isinstance(obj, list) else _ENTRY

    check = _check_pairs if isinstance(obj, dict) else _check_elements

    def grow(*args: Any, **kwargs: Any) -> Any:
        n = len(kwargs) + sum(_length(arg) for arg in args)
        _charge(n // _ITEMS_PER_STEP, per_item * n)
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
        _charge(len(obj) // _ITEMS_PER_STEP, 0)
        for other in others:
            _charge(_length(other) // _ITEMS_PER_STEP, 0)
            _check_elements(other)
        return method(*others)
    return call


def _copying(obj: Any, name: str) -> Callable[..., Any]:
    # A whole copy, a sort, a split: charged by the value's size first.
    method = getattr(obj, name)

    def copy(*args: Any, **kwargs: Any) -> Any:
        n = _length(obj)
        _charge(n * max(n.bit_length(), 1) // _ITEMS_PER_STEP if name == "sort"
                else n // _ITEMS_PER_STEP, _size(obj) * (_SLOT if name in _SPLITS else 1))
        return method(*args, **kwargs)
    return copy


def _walking(obj: Any, name: str) -> Any:
    # Methods that walk the value once: a share of a step per item.
    _charge(len(obj) // _ITEMS_PER_STEP, 0)
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
        _charge(n * max(n.bit_length(), 1) // _ITEMS_PER_STEP, 0)
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
    n = _length(iterable)
    _charge(n // _ITEMS_PER_STEP, _ENTRY * n)
    _check_elements(iterable)
    return dict.fromkeys(iterable, value)


def _unbound_get(mapping: Any, key: Any, default: Any = None) -> Any:
    return dict.get(mapping, _key(key), default)


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
                _charge(len(obj) // _ITEMS_PER_STEP, _ENTRY * len(obj))
            elif name == "apply_method":  # its arguments are frozen: a copy
                return _freezing(obj.apply_method, 1)
            return getattr(obj, name)
        if name in _REF_WRITES:
            if obj.is_read_only:
                raise ReadOnlyError(f"cannot use {name!r}: the map reference is read-only")
            return _freezing(obj.set, 1) if name == "set" else getattr(obj, name)
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
    "_step_": _step,
    "_caught_": _caught,
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

_GLOBAL_NAME_OPS = frozenset({
    "LOAD_GLOBAL", "LOAD_NAME", "STORE_GLOBAL", "STORE_NAME", "DELETE_GLOBAL", "DELETE_NAME",
})

# RestrictedPython turns ``print`` into a call of this (absent) helper.
_PRINT_HELPER = "_print_"

_GUARDED_OPERATORS: dict[type[ast.operator], str] = {
    ast.Add: "_add_", ast.Mult: "_mul_", ast.Pow: "_pow_", ast.LShift: "_lshift_",
    ast.Mod: "_mod_", ast.FloorDiv: "_floordiv_", ast.BitOr: "_or_", ast.BitAnd: "_and_",
    ast.BitXor: "_xor_", ast.Sub: "_sub_",
}


def _call(helper: str, node: ast.AST, *args: ast.expr) -> ast.Call:
    """``helper(*args)``, placed at ``node`` (compile() needs every node placed)."""
    name = ast.copy_location(ast.Name(helper, ast.Load()), node)
    return ast.copy_location(ast.Call(func=name, args=list(args), keywords=[]), node)


class _MethodPolicy(RestrictingNodeTransformer):
    """RestrictedPython's policy, minus what a method that reads a map and
    returns a value never needs, plus the rewrites that meter it: a step at
    each loop iteration, comprehension item and call of a function the
    method defines, and the operators that create big values routed through
    their guards."""

    def _refuse(self, node: ast.AST, what: str) -> ast.AST:
        self.error(node, f"{what} not allowed in serialized methods")
        return node

    def visit_Import(self, node: ast.Import) -> ast.AST:
        return self._refuse(node, "imports are")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> ast.AST:
        return self._refuse(node, "imports are")

    def visit_Global(self, node: ast.Global) -> ast.AST:
        # Globals are shared by every call of a cached method: no state there.
        return self._refuse(node, "global statements are")

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.AST:
        return self._refuse(node, "class definitions are")

    def visit_Yield(self, node: ast.Yield) -> ast.AST:
        # A generator would run the method's code later, outside call_method.
        return self._refuse(node, "yield is")

    def visit_YieldFrom(self, node: ast.YieldFrom) -> ast.AST:
        return self._refuse(node, "yield is")

    def visit_With(self, node: ast.With) -> ast.AST:
        # No value a method can reach is a context manager.
        return self._refuse(node, "with statements are")

    def visit_Attribute(self, node: ast.Attribute) -> Any:
        if not isinstance(node.ctx, ast.Load):
            self.error(node, f"assigning or deleting attribute {node.attr!r} is not allowed "
                             "in serialized methods")
        return super().visit_Attribute(node)

    # -- metering ---------------------------------------------------------------

    _in_method = False

    def _step_statement(self, node: ast.AST) -> ast.stmt:
        return ast.copy_location(ast.Expr(_call("_step_", node)), node)

    def visit_For(self, node: ast.For) -> Any:
        node = cast(ast.For, super().visit_For(node))
        node.body.insert(0, self._step_statement(node))
        return node

    def visit_While(self, node: ast.While) -> Any:
        node = cast(ast.While, super().visit_While(node))
        node.body.insert(0, self._step_statement(node))
        return node

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> Any:
        node = cast(ast.ExceptHandler, super().visit_ExceptHandler(node))
        if node.type is None:
            # A bare except catches Exception only: a method never catches
            # the BaseException that ends it when it goes over budget.
            node.type = ast.copy_location(ast.Name("Exception", ast.Load()), node)
        node.body.insert(0, ast.copy_location(ast.Expr(_call("_caught_", node)), node))
        return node

    def visit_comprehension(self, node: ast.comprehension) -> Any:
        node = cast(ast.comprehension, super().visit_comprehension(node))
        node.ifs.insert(0, _call("_step_", node.iter))
        return node

    def visit_FunctionDef(self, node: ast.FunctionDef) -> Any:
        # The first one is the method itself: call_method charges a step for
        # each nested call of it, so a top-level call pays none.
        outermost = not self._in_method
        self._in_method = True
        node = cast(ast.FunctionDef, super().visit_FunctionDef(node))
        if not outermost:
            node.body.insert(0, self._step_statement(node))
        return node

    def visit_Lambda(self, node: ast.Lambda) -> Any:
        node = cast(ast.Lambda, super().visit_Lambda(node))
        node.body = ast.copy_location(
            ast.BoolOp(op=ast.And(), values=[_call("_step_", node), node.body]), node.body)
        return node

    def visit_GeneratorExp(self, node: ast.GeneratorExp) -> Any:
        # Evaluated eagerly: a generator would be a lazy iterator to chain.
        node = cast(ast.GeneratorExp, super().visit_GeneratorExp(node))
        return ast.copy_location(ast.ListComp(elt=node.elt, generators=node.generators), node)

    def visit_BinOp(self, node: ast.BinOp) -> Any:
        node = cast(ast.BinOp, super().visit_BinOp(node))
        helper = _GUARDED_OPERATORS.get(type(node.op))
        if helper is None:
            return node
        return _call(helper, node, node.left, node.right)

    def visit_Compare(self, node: ast.Compare) -> Any:
        node = cast(ast.Compare, super().visit_Compare(node))
        operands = [node.left, *node.comparators]
        for i, op in enumerate(node.ops):
            if isinstance(op, ast.In | ast.NotIn):
                operands[i] = _call("_key_", operands[i], operands[i])
                operands[i + 1] = _call("_scanned_", operands[i + 1], operands[i + 1])
            elif not isinstance(op, ast.Is | ast.IsNot):
                operands[i] = _call("_tree_", operands[i], operands[i])
                operands[i + 1] = _call("_tree_", operands[i + 1], operands[i + 1])
        for i, op in enumerate(node.ops):
            if isinstance(op, ast.In | ast.NotIn):
                operands[i] = _call("_tree_", operands[i], operands[i])
        node.left, node.comparators = operands[0], operands[1:]
        return node

    def visit_Starred(self, node: ast.Starred) -> Any:
        node = cast(ast.Starred, super().visit_Starred(node))
        if isinstance(node.ctx, ast.Load):
            node.value = _call("_star_", node.value, node.value)
        return node

    def visit_Dict(self, node: ast.Dict) -> Any:
        node = cast(ast.Dict, super().visit_Dict(node))
        node.values = [_call("_star_", value, value) if key is None else value
                       for key, value in zip(node.keys, node.values, strict=True)]
        node.keys = [None if key is None else _call("_key_", key, key) for key in node.keys]
        return node

    def visit_Set(self, node: ast.Set) -> Any:
        node = cast(ast.Set, super().visit_Set(node))
        for i, elt in enumerate(node.elts):
            if isinstance(elt, ast.Starred):
                elt.value = _call("_elements_", elt.value, elt.value)
            else:
                node.elts[i] = _call("_key_", elt, elt)
        return node

    def visit_DictComp(self, node: ast.DictComp) -> Any:
        node = cast(ast.DictComp, super().visit_DictComp(node))
        node.key = _call("_key_", node.key, node.key)
        return node

    def visit_SetComp(self, node: ast.SetComp) -> Any:
        node = cast(ast.SetComp, super().visit_SetComp(node))
        node.elt = _call("_key_", node.elt, node.elt)
        return node

    def visit_Subscript(self, node: ast.Subscript) -> Any:
        ctx = node.ctx
        new = super().visit_Subscript(node)
        if not isinstance(ctx, ast.Load):
            subscript = cast(ast.Subscript, new)
            subscript.slice = _call("_key_", subscript.slice, subscript.slice)
        return new

    def visit_keyword(self, node: ast.keyword) -> Any:
        node = cast(ast.keyword, super().visit_keyword(node))
        if node.arg is None:
            node.value = _call("_star_", node.value, node.value)
        return node

    def visit_FormattedValue(self, node: ast.FormattedValue) -> Any:
        node = cast(ast.FormattedValue, super().visit_FormattedValue(node))
        spec = node.format_spec
        if spec is None:
            spec = ast.copy_location(ast.Constant(""), node)
        conversion = ast.copy_location(ast.Constant(node.conversion), node)
        value = _call("_format_", node, node.value, spec, conversion)
        return ast.copy_location(ast.FormattedValue(value=value, conversion=-1), node)


class _Compiled(NamedTuple):
    function: Callable[..., Any] | None
    errors: tuple[str, ...]


class CacheInfo(NamedTuple):
    """Statistics of the compiled-method cache."""

    hits: int
    misses: int
    size: int
    max_size: int


def _check_arg_names(args: object, owner: str) -> tuple[str, ...]:
    """``args`` as a tuple if it is a list or tuple of distinct plain
    identifiers; ``owner`` names the method in error messages."""
    if not isinstance(args, list | tuple):
        raise InvalidTypeError(
            f"arguments of {owner} must be a list or tuple of names, "
            f"got {type(args).__name__}")
    seen: set[str] = set()
    for position, arg in enumerate(args):
        if not isinstance(arg, str):
            raise InvalidTypeError(
                f"argument #{position} of {owner} must be a str, "
                f"got {type(arg).__name__}")
        problem = None
        if not arg.isidentifier() or keyword.iskeyword(arg):
            problem = "is not a valid Python identifier"
        elif arg == "self":
            problem = "is reserved: 'self' is the map reference, always passed first"
        elif arg.startswith("_"):
            problem = "starts with '_', which is reserved"
        elif arg in seen:
            problem = "is repeated"
        if problem is not None:
            raise InvalidValueError(
                f"argument #{position} of {owner}: {arg!r} {problem}")
        seen.add(arg)
    return tuple(args)


def _unavailable_globals(module: CodeType) -> list[str]:
    """Global names the method's code reads or writes that the sandbox does
    not provide, as error messages (checked on the bytecode, so nothing the
    source could disguise escapes it)."""
    found: dict[str, int | None] = {}
    pending = [c for c in module.co_consts if isinstance(c, CodeType)]
    while pending:
        code = pending.pop(0)
        for instruction in dis.get_instructions(code):
            name = instruction.argval
            if (instruction.opname in _GLOBAL_NAME_OPS and name not in _BUILTINS
                    and name not in found):
                found[name] = instruction.positions.lineno if instruction.positions else None
        pending.extend(c for c in code.co_consts if isinstance(c, CodeType))
    errors = []
    for name, line in sorted(found.items(), key=lambda item: (item[1] or 0, item[0])):
        if name == _PRINT_HELPER:
            errors.append(f"Line {line}: print is not available in serialized methods "
                          "(return a value instead)")
        else:
            errors.append(f"Line {line}: name {name!r} is not available in serialized methods")
    return errors


# The compiled function's name is never visible to the method: it is popped
# from the function's globals once defined.
_FUNCTION_NAME = "serialized_method"
_FILENAME = "<serialized method>"


@functools.lru_cache(maxsize=MAX_CACHE_SIZE)
def _compile(arg_names: tuple[str, ...], body: str) -> _Compiled:
    """Compile once per ``(arg_names, body)``; failures are cached too, so a
    broken method stored in a map costs one compilation, not one per call."""
    try:
        _check_arg_names(arg_names, "the method")
    except (InvalidTypeError, InvalidValueError) as exc:
        return _Compiled(None, (str(exc),))
    # The names are validated identifiers, so joining them cannot inject code.
    params = ", ".join(("self", *arg_names))
    try:
        result = compile_restricted_function(
            params, body, _FUNCTION_NAME, filename=_FILENAME, policy=_MethodPolicy)
    # compile() itself raises on what parsing accepts: duplicate names,
    # ``break`` outside a loop, null bytes, nesting too deep.
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        return _Compiled(None, (f"{type(exc).__name__}: {exc}",))
    if result.errors or result.code is None:
        return _Compiled(None, tuple(result.errors) or ("no code produced",))
    unavailable = _unavailable_globals(result.code)
    if unavailable:
        return _Compiled(None, tuple(unavailable))
    # Each method gets its own globals, holding nothing it can write to.
    namespace: dict[str, Any] = {"__builtins__": _BUILTINS}
    exec(result.code, namespace)  # defines the function; runs none of the body
    return _Compiled(namespace.pop(_FUNCTION_NAME), ())


def cache_info() -> CacheInfo:
    """Hits, misses and size of the compiled-method cache."""
    info = _compile.cache_info()
    return CacheInfo(info.hits, info.misses, info.currsize, info.maxsize or 0)


def cache_clear() -> None:
    """Drop every compiled method (they recompile on their next call)."""
    _compile.cache_clear()


def _body_too_long(name: str, body: str, limits: MethodLimits) -> MethodError | None:
    # Characters first: a body is never shorter in UTF-8 than in characters,
    # and only a long one pays for the encoding.
    if len(body) * 4 <= limits.max_body:
        return None
    size = len(body.encode("utf-8", "surrogatepass"))
    if size <= limits.max_body:
        return None
    return MethodError(f"method {name!r} is too long: its body has {size} bytes, more than "
                       f"the max_body limit of {limits.max_body}", method=name)


def check_method(name: str, args: Sequence[str], body: str,
                 limits: MethodLimits | None = None) -> None:
    """Validate a method before ``set_fun`` stores it.

    Raises :class:`InvalidTypeError`/:class:`InvalidValueError` for a name,
    argument list or body of the wrong type, or argument names that are not
    plain identifiers (keywords, ``self``, leading ``_``, repeated), and
    :class:`MethodError` when the body is longer than ``limits.max_body`` or
    does not compile under the sandbox's restrictions (the message lists
    every reason, with body line numbers).
    """
    if not isinstance(name, str):
        raise InvalidTypeError(f"method name must be a str, got {type(name).__name__}")
    arg_names = _check_arg_names(args, f"method {name!r}")
    if not isinstance(body, str):
        raise InvalidTypeError(f"body of method {name!r} must be a str, got {type(body).__name__}")
    too_long = _body_too_long(name, body, limits or DEFAULT_LIMITS)
    if too_long is not None:
        raise too_long
    compiled = _compile(arg_names, body)
    if compiled.function is None:
        raise MethodError(_compile_message(name, compiled), method=name)


def call_method(ref: Any, name: str, desc: Mapping[str, Any], args: Sequence[Any],
                limits: MethodLimits | None = None) -> Any:
    """Run method ``name`` described by ``desc`` with ``self=ref``, within
    ``limits`` (the defaults when None).

    ``desc`` is the stored ``{"type", "args", "body"}`` value; it may have come
    from the network, so its shape is checked. ``args`` must be a sequence of
    JSON data (as map values), one per declared argument; it is deep-frozen
    before the call. Anything wrong, any exception the method raises
    (``BaseException`` included) and going over a limit is a
    :class:`MethodError` naming the method (the original exception chained).
    A :class:`MethodError` from a method it called propagates unchanged, so
    the error names the method that failed. A method called by a method runs
    on its caller's budget.
    """
    # Exact-type checks first: the core always passes a FrozenDict, and this
    # runs on every apply_method.
    if ((type(desc) is not FrozenDict and not isinstance(desc, Mapping))
            or desc.get("type") != FUNCTION_MARKER):
        raise MethodError(f"{name!r} does not hold a serialized method", method=name)
    arg_names = desc.get("args")
    body = desc.get("body")
    if type(arg_names) is not FrozenList and not isinstance(arg_names, (list, tuple)):
        raise MethodError(
            f"method {name!r} is malformed: 'args' must be a list of names", method=name)
    if not isinstance(body, str):
        raise MethodError(f"method {name!r} is malformed: 'body' must be a str", method=name)
    if limits is None:
        limits = DEFAULT_LIMITS
    too_long = _body_too_long(name, body, limits)
    if too_long is not None:
        raise too_long
    try:
        # _compile checks the names; only unhashable ones fail before it.
        compiled = _compile(tuple(arg_names), body)
    except TypeError as exc:
        raise MethodError(
            f"method {name!r} is malformed: 'args' must be a list of names", method=name
        ) from exc
    function = compiled.function
    if function is None:
        raise MethodError(_compile_message(name, compiled), method=name)
    if type(args) is not list and type(args) is not tuple and (
            isinstance(args, (str, bytes, bytearray)) or not isinstance(args, Sequence)):
        raise MethodError(
            f"arguments of method {name!r} must be a list or tuple, got {type(args).__name__}",
            method=name)
    if len(args) != len(arg_names):
        raise MethodError(
            f"method {name!r} takes {len(arg_names)} argument(s) "
            f"({', '.join(arg_names) or 'none'}), got {len(args)}", method=name)
    try:
        frozen = FrozenList(args)
    except (TypeError, ValueError) as exc:
        raise MethodError(f"arguments of method {name!r} must be JSON data: {exc}",
                          method=name) from exc
    global _depth, _steps_left, _bytes_left
    with _LOCK:
        outermost = _depth == 0
        if outermost:
            _steps_left = limits.max_steps
            _bytes_left = limits.max_bytes
        else:
            _step()
        _depth += 1
        try:
            result = function(ref, *frozen)
            if outermost and (_steps_left < 0 or _bytes_left < 0):
                # A ``finally: return`` swallowed the limit error.
                raise _OverBudget("max_steps" if _steps_left < 0 else "max_bytes")
            return result
        except _OverBudget as exc:
            if not outermost:
                raise
            raise MethodError(_over_budget_message(name, exc.limit, limits),
                              method=name) from None
        except MethodError:
            raise
        except BaseException as exc:
            raise MethodError(f"method {name!r} raised {type(exc).__name__}: {_tame(exc)}",
                              method=name) from exc
        finally:
            _depth -= 1
            if outermost:
                _steps_left = _bytes_left = -1


_SHORT = reprlib.Repr()
_SHORT.maxlevel = 3
_SHORT.maxstring = _SHORT.maxother = 200
_MAX_MESSAGE = 1000


def _tame(exc: BaseException) -> str:
    """The exception's text, made short and cheap: its arguments may be
    anything the method built (a huge string, a value shared with itself),
    so they are replaced by a bounded description before anyone prints it."""
    args = exc.args
    if all(type(arg) is str for arg in args):
        text = ", ".join(args) if len(args) != 1 else args[0]
    else:
        text = ", ".join(_SHORT.repr(arg) for arg in args)
    if len(text) > _MAX_MESSAGE:
        text = text[:_MAX_MESSAGE] + "..."
    exc.args = (text,)
    return str(exc)


def _over_budget_message(name: str, limit: str, limits: MethodLimits) -> str:
    if limit == "max_steps":
        return (f"method {name!r} went over its max_steps limit of {limits.max_steps} "
                "steps (loop iterations, comprehension items, calls)")
    if limit == "max_bytes":
        return (f"method {name!r} went over its max_bytes limit: it would create more "
                f"than {limits.max_bytes} bytes of values")
    return (f"method {name!r} went over the MAX_INT_BITS limit: integers it makes have at "
            f"most {MAX_INT_BITS} bits")


def _compile_message(name: str, compiled: _Compiled) -> str:
    return f"method {name!r} does not compile: {'; '.join(compiled.errors)}"
