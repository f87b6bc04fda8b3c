"""The cost of a serialized method call before and after the budgeted sandbox.

    PYTHONPATH=src python benchmarks/compare_methods.py [--rounds 15] [--base main]

Loads the ``methods.py`` of ``--base`` (``git show main:src/caf_sharing/
methods.py``) as a module next to the current one, and times
``call_method`` (what ``MapRef.apply_method`` runs after its lookup, which
is the same code in both) on the same ref and stored descriptor with each,
interleaved round by round; each figure is the minimum over the rounds. The
target is a ratio within 2x for a small method. It also prints how long one
step of the default budget takes for a few loop bodies, which is how
``DEFAULT_MAX_STEPS`` was chosen (about 100 ms of typical loop code).
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

from caf_sharing import SharedMap, methods
from caf_sharing.errors import MethodError

CASES = {
    "get * n": (["k", "n"], "return self.get(k) * n", ["price", 3]),
    "short loop": (["n"], "t = 0\nfor i in range(n):\n    t += i\nreturn t", [10]),
    "compare, in": (["k"], "v = self.get(k)\nreturn v > 3 and k in self", ["price"]),
}

STEP_BODIES = {
    "empty while": "while True:\n    pass",
    "for, t += i": "t = 0\nfor i in range(10**9):\n    t += i",
    "comprehension": "return [i * 2 for i in range(10**9)]",
    "self.get in a loop": "t = 0\nwhile True:\n    t = t + self.get('price', 0)",
    "list.append": "out = []\nfor i in range(10**9):\n    out.append(i)",
}


def load_base(rev: str) -> types.ModuleType:
    """``methods.py`` as of ``rev``, as a module of the caf_sharing package."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(
        ["git", "show", f"{rev}:src/caf_sharing/methods.py"], cwd=root, check=True,
        capture_output=True, text=True).stdout
    module = types.ModuleType("caf_sharing._methods_base")
    module.__package__ = "caf_sharing"
    sys.modules[module.__name__] = module
    exec(compile(source, f"<{rev}:methods.py>", "exec"), module.__dict__)
    return module


def per_call(call_method: Any, args: tuple[Any, ...], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        call_method(*args)
    return (time.perf_counter() - start) / number


def compare(base: types.ModuleType, rounds: int, number: int) -> None:
    shared = SharedMap()
    ref = shared.ref()
    ref.set("price", 7)
    for name, (args, body, _) in CASES.items():
        ref.set_fun(name, args, body)
    ref.prepare()
    shared.commit(ref)
    reader = shared.ref(read_only=True)
    print(f"{'method':12s} {'before us':>10s} {'after us':>10s} {'ratio':>6s}")
    for name, (_, _, values) in CASES.items():
        args = (reader, name, reader.get(name), values)
        if base.call_method(*args) != methods.call_method(*args):
            raise SystemExit(f"{name}: the two versions disagree")
        before = after = float("inf")
        for _ in range(rounds):
            before = min(before, per_call(base.call_method, args, number))
            after = min(after, per_call(methods.call_method, args, number))
        print(f"{name:12s} {before * 1e6:10.2f} {after * 1e6:10.2f} {after / before:6.2f}")


def step_costs(rounds: int) -> None:
    steps = 200_000
    limits = methods.MethodLimits(max_steps=steps, max_bytes=2**30)
    print(f"\none step (default budget {methods.DEFAULT_MAX_STEPS} steps):")
    for label, body in STEP_BODIES.items():
        shared = SharedMap(method_limits=limits)
        ref = shared.ref()
        ref.set("price", 1)
        ref.set_fun("m", [], body)
        best = float("inf")
        for _ in range(max(rounds // 3, 1)):
            start = time.perf_counter()
            with contextlib.suppress(MethodError):
                ref.apply_method("m", [])
            best = min(best, time.perf_counter() - start)
        per_step = best / steps
        print(f"  {label:20s} {per_step * 1e9:5.0f} ns/step, default budget "
              f"{per_step * methods.DEFAULT_MAX_STEPS * 1e3:5.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--number", type=int, default=5_000)
    parser.add_argument("--base", default="main")
    options = parser.parse_args()
    compare(load_base(options.base), options.rounds, options.number)
    step_costs(options.rounds)


if __name__ == "__main__":
    main()
