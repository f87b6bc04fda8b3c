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

import dis
import functools
import keyword
import reprlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import CodeType
from typing import Any, NamedTuple

from RestrictedPython.compile import compile_restricted_function

from . import _sandbox_budget as budget
from ._fastmap import FUNCTION_MARKER, FrozenDict, FrozenList
from ._sandbox_budget import MAX_INT_BITS, OverBudget
from ._sandbox_builtins import (
    _BUILTINS,
    BUILTIN_NAMES,
    CLASS_ATTRIBUTES,
    REF_ATTRIBUTES,
    VALUE_ATTRIBUTES,
)
from ._sandbox_operators import MAX_KEY_DEPTH
from ._sandbox_policy import _GLOBAL_NAME_OPS, _PRINT_HELPER, _MethodPolicy
from .errors import InvalidTypeError, InvalidValueError, MethodError

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

#: Steps per call by default: 75-140 ms of typical loop code (26-46 ms of an
#: empty loop) on the 2-core machine it was measured on, by
#: benchmarks/compare_methods.py, which prints the figures.
DEFAULT_MAX_STEPS = 400_000
#: Bytes a call may create by default (16 MiB).
DEFAULT_MAX_BYTES = 16 * 2**20
#: Longest method body by default, in UTF-8 bytes (64 KiB).
DEFAULT_MAX_BODY = 64 * 2**10


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
    # Only a nested call pays for compiling (inside its caller's budget).
    misses = _compile.cache_info().misses if budget.depth else 0
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
    with budget.LOCK:
        outermost = budget.depth == 0
        if outermost:
            budget.steps_left = limits.max_steps
            budget.bytes_left = limits.max_bytes
        else:
            # A nested call: a step, and its compilation if it was not cached.
            compiled_now = _compile.cache_info().misses != misses
            budget.charge(1 + (budget.COMPILE_STEPS_PER_CHAR * len(body) if compiled_now else 0),
                          0)
        budget.depth += 1
        try:
            result = function(ref, *frozen)
            if outermost and (budget.steps_left < 0 or budget.bytes_left < 0):
                # A ``finally: return`` swallowed the limit error.
                raise OverBudget("max_steps" if budget.steps_left < 0 else "max_bytes")
            return result
        except OverBudget as exc:
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
            budget.depth -= 1
            if outermost:
                budget.steps_left = budget.bytes_left = -1


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
