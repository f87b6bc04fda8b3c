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

**The sandbox.** A method's source comes from a map that another actor, maybe
on another machine, wrote; it is compiled with RestrictedPython under a
stricter policy than RestrictedPython's default:

* refused when the method is defined (``set_fun``) or first called: imports,
  any name or attribute starting with ``_`` (so no ``__class__``,
  ``__import__``, ``__globals__`` walks), frame and code attributes
  (``gi_frame``, ``f_back``...), ``eval``/``exec``, assigning or deleting
  attributes, ``global``/``nonlocal``, class definitions, ``yield``, async
  code, and any global name that is not one of :data:`BUILTIN_NAMES` (so
  ``open``, ``getattr``, ``type``, ``vars``, ``globals``, ``print``... fail
  early with a message naming them);
* checked while running: every attribute read goes through RestrictedPython's
  ``safer_getattr`` (which also refuses ``str.format``/``format_map``, the
  classic way to reach dunders from a format string); on the map reference
  only :data:`REF_ATTRIBUTES` are reachable; item writes only work on plain
  ``dict``/``list`` objects the method built itself (``full_write_guard``):
  stored values are frozen and the arguments are deep-frozen before the
  call, so a method cannot change its caller's data; and the unbound
  mutators of the ``dict``/``list`` classes (``dict.update(value, ...)``),
  which would bypass the frozen containers' guards, are refused;
* ``self`` is the caller's MapRef, exactly as ``this`` in Caf.js: a method can
  call ``self.set``/``self.delete``/``self.set_fun`` only when the caller
  handed it a writable ref, and then it writes the caller's own map, nothing
  else.

**Limits.** There is no CPU-time or memory limit: ``while True: pass`` blocks
the actor (and its event loop) and ``"x" * 10**10`` allocates as much as the
process can. Open maps whose writers you do not trust with ``no_exec=True``.

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
from collections.abc import Callable, Mapping, Sequence
from types import CodeType
from typing import Any, NamedTuple

from RestrictedPython.compile import compile_restricted_function
from RestrictedPython.Guards import (
    full_write_guard,
    guarded_iter_unpack_sequence,
    guarded_unpack_sequence,
    safer_getattr_raise,
)
from RestrictedPython.transformer import RestrictingNodeTransformer

from ._fastmap import FUNCTION_MARKER, FrozenDict, FrozenList, MapRef
from .errors import InvalidTypeError, InvalidValueError, MethodError

__all__ = [
    "BUILTIN_NAMES",
    "MAX_CACHE_SIZE",
    "REF_ATTRIBUTES",
    "CacheInfo",
    "cache_clear",
    "cache_info",
    "call_method",
    "check_method",
]

#: Compiled methods kept, least recently used evicted first (Caf.js bounds
#: its cache at the same size).
MAX_CACHE_SIZE = 100

#: What a method may use on ``self``, the MapRef it is applied to. Reading
#: with ``self[key]``, ``key in self``, ``len(self)`` and ``for key in self``
#: needs no attribute and works too.
REF_ATTRIBUTES = frozenset({
    "get", "keys", "values", "items", "to_dict", "version", "is_read_only",
    "has_changed", "apply_method", "set", "delete", "set_fun",
})

_SAFE_FUNCTIONS = (
    "abs", "all", "any", "bool", "dict", "enumerate", "filter", "float", "int",
    "isinstance", "len", "list", "map", "max", "min", "range", "reversed",
    "round", "sorted", "str", "sum", "tuple", "zip",
)
# So that methods can raise and catch the usual errors; an exception object
# only leads to its traceback through ``__traceback__``, which is refused.
_SAFE_EXCEPTIONS = (
    "ArithmeticError", "Exception", "IndexError", "KeyError", "LookupError",
    "TypeError", "ValueError", "ZeroDivisionError",
)

#: Global names a method may use (``None``, ``True`` and ``False`` are
#: keywords and always work).
BUILTIN_NAMES = frozenset(_SAFE_FUNCTIONS + _SAFE_EXCEPTIONS)

# The compiled function's name is never visible to the method: it is popped
# from the function's globals once defined.
_FUNCTION_NAME = "serialized_method"
_FILENAME = "<serialized method>"

_INPLACE_OPERATORS: dict[str, Callable[[Any, Any], Any]] = {
    "+=": operator.iadd, "-=": operator.isub, "*=": operator.imul,
    "/=": operator.itruediv, "//=": operator.ifloordiv, "%=": operator.imod,
    "**=": operator.ipow, "<<=": operator.ilshift, ">>=": operator.irshift,
    "&=": operator.iand, "|=": operator.ior, "^=": operator.ixor,
    "@=": operator.imatmul,
}


# Refuses names starting with "_", frame/code attributes and str.format*.
_safer_getattr: Callable[[Any, str], Any] = safer_getattr_raise


# What a method may take from the ``dict`` and ``list`` classes themselves.
# Their other attributes are the unbound mutators, and ``dict.update(frozen,
# ...)`` would run dict's own code on a stored FrozenDict, past its guards.
_CONTAINER_CLASS_ATTRIBUTES = frozenset({
    "copy", "count", "fromkeys", "get", "index", "items", "keys", "values",
})


def _guarded_getattr(obj: Any, name: str) -> Any:
    if isinstance(obj, MapRef) and name not in REF_ATTRIBUTES:
        raise AttributeError(
            f"serialized methods cannot use {name!r} of the map reference; "
            f"allowed: {', '.join(sorted(REF_ATTRIBUTES))}")
    if (isinstance(obj, type) and issubclass(obj, dict | list)
            and name not in _CONTAINER_CLASS_ATTRIBUTES):
        raise AttributeError(
            f"serialized methods cannot use {obj.__name__}.{name}: it could change a "
            f"value the method does not own; call it on a copy, e.g. {obj.__name__}(value)")
    return _safer_getattr(obj, name)


def _inplacevar(op: str, target: Any, value: Any) -> Any:
    # Plain ``x += y`` on a local name; frozen containers refuse it themselves.
    return _INPLACE_OPERATORS[op](target, value)


def _apply(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    # RestrictedPython routes ``f(*args, **kwargs)`` calls through here.
    return function(*args, **kwargs)


_BUILTINS: dict[str, Any] = {name: getattr(builtins, name) for name in BUILTIN_NAMES}
_BUILTINS.update({
    "_getattr_": _guarded_getattr,
    "_getitem_": operator.getitem,
    "_getiter_": iter,
    "_iter_unpack_sequence_": guarded_iter_unpack_sequence,
    "_unpack_sequence_": guarded_unpack_sequence,
    "_write_": full_write_guard,
    "_inplacevar_": _inplacevar,
    "_apply_": _apply,
})

_GLOBAL_NAME_OPS = frozenset({
    "LOAD_GLOBAL", "LOAD_NAME", "STORE_GLOBAL", "STORE_NAME", "DELETE_GLOBAL", "DELETE_NAME",
})

# RestrictedPython turns ``print`` into a call of this (absent) helper.
_PRINT_HELPER = "_print_"


class _MethodPolicy(RestrictingNodeTransformer):
    """RestrictedPython's policy, minus what a method that reads a map and
    returns a value never needs."""

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

    def visit_Attribute(self, node: ast.Attribute) -> Any:
        if not isinstance(node.ctx, ast.Load):
            self.error(node, f"assigning or deleting attribute {node.attr!r} is not allowed "
                             "in serialized methods")
        return super().visit_Attribute(node)


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


def check_method(name: str, args: Sequence[str], body: str) -> None:
    """Validate a method before ``set_fun`` stores it.

    Raises :class:`InvalidTypeError`/:class:`InvalidValueError` for a name,
    argument list or body of the wrong type, or argument names that are not
    plain identifiers (keywords, ``self``, leading ``_``, repeated), and
    :class:`MethodError` when the body does not compile under the sandbox's
    restrictions (the message lists every reason, with body line numbers).
    """
    if not isinstance(name, str):
        raise InvalidTypeError(f"method name must be a str, got {type(name).__name__}")
    arg_names = _check_arg_names(args, f"method {name!r}")
    if not isinstance(body, str):
        raise InvalidTypeError(f"body of method {name!r} must be a str, got {type(body).__name__}")
    compiled = _compile(arg_names, body)
    if compiled.function is None:
        raise MethodError(_compile_message(name, compiled), method=name)


def call_method(ref: Any, name: str, desc: Mapping[str, Any], args: Sequence[Any]) -> Any:
    """Run method ``name`` described by ``desc`` with ``self=ref``.

    ``desc`` is the stored ``{"type", "args", "body"}`` value; it may have come
    from the network, so its shape is checked. ``args`` must be a sequence of
    JSON data (as map values), one per declared argument; it is deep-frozen
    before the call. Anything wrong, and any exception the method raises, is a
    :class:`MethodError` naming the method (the original exception chained).
    A :class:`MethodError` from a method it called propagates unchanged, so
    the error names the method that failed.
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
    try:
        return function(ref, *frozen)
    except MethodError:
        raise
    except Exception as exc:
        raise MethodError(f"method {name!r} raised {type(exc).__name__}: {exc}",
                          method=name) from exc


def _compile_message(name: str, compiled: _Compiled) -> str:
    return f"method {name!r} does not compile: {'; '.join(compiled.errors)}"
