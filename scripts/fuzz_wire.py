"""Long runs of the wire fuzzer (tests/test_fuzz_wire.py).

    python scripts/fuzz_wire.py --examples 100000 [--chunk 2000] [--seed 1]

Runs the suite's properties (apply_changes on random, mutated and listed
change sets; the decoders on random and mutated bytes; a reader service
taking forged messages among a writer's commits) for about
``--examples`` examples each, in child processes of ``--chunk`` examples
with successive seeds, so that a crash (a child killed by a signal) is
counted and reported with its seed instead of ending the run. Prints the
examples run, the outcomes seen, failures and crashes; exits 1 if any.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: (test module, property) pairs.
PROPERTIES = [
    ("test_fuzz_wire", "test_apply_changes_applies_or_refuses_cleanly"),
    ("test_fuzz_wire", "test_decoded_messages_apply_or_are_refused_cleanly"),
    ("test_fuzz_wire", "test_decode_version_fuzz"),
    ("test_fuzz_wire", "test_decode_value_and_changes_fuzz"),
    ("test_fuzz_wire", "test_decode_fields_fuzz"),
    ("test_service_hostile", "test_forged_messages_among_real_commits_never_stick_a_reader"),
]


def child(examples: int, seed: int) -> int:
    """Runs every property for `examples` examples; prints what it saw."""
    sys.path.insert(0, str(ROOT / "tests"))
    import importlib
    import logging

    import hypothesis

    import test_fuzz_wire as fuzz

    assert examples == fuzz.SUITE_EXAMPLES, "CAF_FUZZ_EXAMPLES was not passed on"
    # The service logs every forged message it refuses; the report counts them.
    logging.getLogger("caf_sharing").propagate = False
    failures = 0
    for module, name in PROPERTIES:
        try:
            hypothesis.seed(seed)(getattr(importlib.import_module(module), name))()
        except Exception as exc:  # a property failed: report and go on
            failures += 1
            print(f"FAILED {name} (seed {seed}): {type(exc).__name__}: {exc}",
                  file=sys.stderr, flush=True)
    print(json.dumps({"seen": dict(fuzz.SEEN), "failures": failures}), flush=True)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=20_000,
                        help="examples per property (default 20000)")
    parser.add_argument("--chunk", type=int, default=2_000,
                        help="examples per property in one child process")
    parser.add_argument("--seed", type=int, default=1, help="seed of the first child")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.examples, args.seed)
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    # The children import the caf_sharing this process finds (source or installed).
    import caf_sharing
    where = str(Path(caf_sharing.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [where, env.get("PYTHONPATH")]))
    seen: Counter[str] = Counter()
    failures = crashes = 0
    started = time.monotonic()
    seed = args.seed
    remaining = args.examples
    while remaining > 0:
        chunk = min(args.chunk, remaining)
        env["CAF_FUZZ_EXAMPLES"] = str(chunk)
        done = subprocess.run(
            [sys.executable, __file__, "--child", "--examples", str(chunk), "--seed", str(seed)],
            env=env, capture_output=True, text=True, check=False)
        if done.returncode < 0:
            crashes += 1
            print(f"CRASH: child with seed {seed} killed by signal {-done.returncode}\n"
                  f"{done.stderr[-3000:]}", file=sys.stderr, flush=True)
        elif not done.stdout.strip():
            failures += 1
            print(f"child with seed {seed} exited with {done.returncode} without a report\n"
                  f"{done.stderr[-3000:]}", file=sys.stderr, flush=True)
        else:
            report = json.loads(done.stdout.strip().splitlines()[-1])
            seen.update(report["seen"])
            failures += report["failures"]
            if report["failures"]:
                print(done.stderr[-5000:], file=sys.stderr, flush=True)
        remaining -= chunk
        seed += 1
        print(f"  {args.examples - remaining:,} / {args.examples:,} per property, "
              f"{time.monotonic() - started:.0f} s, failures {failures}, crashes {crashes}",
              flush=True)
    print(f"\nexamples run ({time.monotonic() - started:.0f} s):")
    for what, count in sorted(seen.items()):
        print(f"  {what:45} {count:>10,}")
    print(f"failures: {failures}\ncrashes: {crashes}")
    return 1 if failures or crashes else 0


if __name__ == "__main__":
    sys.exit(main())
