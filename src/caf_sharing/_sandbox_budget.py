"""The budget of the running serialized method: the step and byte counters
that the sandbox's guards charge (see :mod:`caf_sharing.methods`)."""

from __future__ import annotations

import sys
import threading
from typing import Any, NoReturn

from ._fastmap import FrozenDict, FrozenList
from .errors import MethodError

#: The largest integer ``*``, ``**``, ``<<`` and ``int()`` may make.
MAX_INT_BITS = 2**16
#: Steps charged per character of a body a method compiles, by
#: ``self.set_fun`` or by applying a method that was not cached.
COMPILE_STEPS_PER_CHAR = 2


# -- the budget of the running call -------------------------------------------
#
# Module globals rather than an object: step runs on every loop iteration,
# and a global decrement is the cheapest counter Python has. LOCK makes the
# globals belong to one thread at a time; nested calls (a method applying
# another) re-enter it and share the budget.

LOCK = threading.RLock()
depth = 0
# Both below zero between calls: a function or stand-in that a method
# returned cannot run outside the call (see over).
steps_left = -1
bytes_left = -1


class OverBudget(BaseException):
    """Raised inside a method when a limit is passed: a BaseException, which
    a method cannot catch (it cannot name one, and its bare ``except:`` is
    compiled as ``except Exception:``)."""

    def __init__(self, limit: str) -> None:
        super().__init__(limit)
        self.limit = limit


def over(limit: str) -> NoReturn:
    if depth == 0:
        raise MethodError("a function or builtin that a serialized method returned can "
                          "only run inside a method call", method="")
    raise OverBudget(limit)


def step() -> bool:
    global steps_left
    steps_left -= 1
    if steps_left < 0:
        over("max_steps")
    return True


def caught() -> None:
    # Run first in every except clause: handling an exception is a step, and
    # the handled exception forgets the one it was raised while handling, so
    # that retries in handlers cannot grow a chain that every raise walks.
    step()
    exc = sys.exception()
    if exc is not None:
        exc.__context__ = None


def charge(steps: int, nbytes: int) -> None:
    global steps_left, bytes_left
    steps_left -= steps
    bytes_left -= nbytes
    if bytes_left < 0:
        over("max_bytes")
    if steps_left < 0:
        over("max_steps")


# One step stands for about this many elements of a builtin's walk over a value.
ITEMS_PER_STEP = 16
# Bytes charged per slot of a list/tuple, per entry of a dict/set.
SLOT = 8
ENTRY = 32


def size_of(value: Any) -> int:
    """Bytes charged for a created value (its own storage, not its items')."""
    t = type(value)
    if t is str:
        return len(value) if value.isascii() else 4 * len(value)
    if t is list or t is tuple or t is FrozenList:
        return SLOT * len(value)
    if t is bytes:
        return len(value)
    if t is dict or t is set or t is FrozenDict or t is frozenset:
        return ENTRY * len(value)
    if t is int:
        return int(value.bit_length()) >> 3
    return 0


def length_of(value: Any) -> int:
    try:
        return len(value)
    except TypeError:
        raise TypeError(f"{type(value).__name__!r} object is not a sized collection") from None


def charged(result: Any) -> Any:
    charge(0, size_of(result))
    return result


def check_int(value: int) -> int:
    if value.bit_length() > MAX_INT_BITS:
        over("MAX_INT_BITS")
    return value


def big_int_cost(a: int, b: int) -> None:
    # Schoolbook cost of multiplying/dividing two big integers, in steps.
    cost = (a.bit_length() * b.bit_length()) >> 16
    if cost:
        charge(cost, 0)
