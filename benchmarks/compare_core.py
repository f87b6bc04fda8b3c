"""Performance targets P1-P5 of the compiled core (DESIGN.md section 8).

    python benchmarks/compare_core.py [--quick]

Each figure is a ratio or time measured side by side in this one process:
competing operations run interleaved, round after round, and the minimum of
the rounds is kept (these machines are noisy). Timed loops subtract the cost
of an empty loop over the same keys, so ratios compare the calls themselves.
Comparisons with ``immutables.Map`` and ``pyrsistent.pmap`` are printed too.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import immutables
import pyrsistent

from caf_sharing import SharedMap
from caf_sharing._fastmap import VERSION_KEY

SEED = 20240501


@contextmanager
def no_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def make_keys(n: int) -> list[str]:
    return [f"key:{i:08d}" for i in range(n)]


def build_map(keys: list[str], values: list[Any]) -> SharedMap:
    m = SharedMap()
    add: list[Any] = []
    for k, v in zip(keys, values, strict=True):
        add += (k, v)
    add += (VERSION_KEY, 1)
    m.apply_changes({"version": 0, "remove": [], "add": add})
    return m


def probe_keys(keys: list[str], count: int) -> list[str]:
    """Present keys in random order, as new str objects (equal, not
    identical, to the stored ones, like keys that come off the wire),
    with their hash already cached."""
    rnd = random.Random(SEED)
    probes = ["".join(k) for k in (list(rnd.choice(keys)) for _ in range(count))]
    for k in probes:
        hash(k)
    return probes


def loop_time(fn: Callable[[Any], Any], probes: list[str]) -> float:
    start = time.perf_counter()
    for k in probes:
        fn(k)
    return time.perf_counter() - start


def empty_loop(probes: list[str]) -> float:
    start = time.perf_counter()
    for _k in probes:
        pass
    return time.perf_counter() - start


def interleaved(contenders: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Runs each contender once per round, in turn; keeps each one's minimum."""
    best = dict.fromkeys(contenders, float("inf"))
    for _ in range(rounds):
        for name, fn in contenders.items():
            best[name] = min(best[name], fn())
    return best


class Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str, str]] = []
        self.notes: list[str] = []

    def target(self, pid: str, what: str, value: str, target: str, ok: bool) -> None:
        self.rows.append((pid, what, value, target, "PASS" if ok else "FAIL"))

    def note(self, text: str) -> None:
        self.notes.append(text)
        print("   ", text, flush=True)

    def print(self) -> bool:
        widths = [max(len(r[i]) for r in [*self.rows, ("id", "what", "measured", "target",
                                                         "result")]) for i in range(5)]
        header = ("id", "what", "measured", "target", "result")
        print()
        for row in [header, tuple("-" * w for w in widths), *self.rows]:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
        return all(r[4] == "PASS" for r in self.rows)


def p1_get(report: Report, sizes: list[int], rounds: int) -> None:
    for n in sizes:
        keys = make_keys(n)
        values = list(range(n))
        m = build_map(keys, values)
        plain = dict(zip(keys, values, strict=True))
        imap = immutables.Map(plain)
        pmap = pyrsistent.pmap(plain)
        # A ref of an older version reads the trie; refs of the newest
        # version read the dict index, edited ones after their own edits.
        stale = m.ref(read_only=True)
        bump = m.ref()
        bump.set("other", 0)
        bump.prepare()
        m.commit(bump)
        ref = m.ref(read_only=True)
        edit = m.ref()
        edit.set("other", 1)
        probes = probe_keys(keys, 20_000)
        with no_gc():
            best = interleaved({
                "loop": partial(empty_loop, probes),
                "dict.get": partial(loop_time, plain.get, probes),
                "ref.get": partial(loop_time, ref.get, probes),
                "edited ref.get": partial(loop_time, edit.get, probes),
                "old-version ref.get (trie)": partial(loop_time, stale.get, probes),
                "immutables.get": partial(loop_time, imap.get, probes),
                "pyrsistent.get": partial(loop_time, pmap.get, probes),
            }, rounds)
        base = best.pop("loop")
        per_call = {name: (t - base) / len(probes) * 1e9 for name, t in best.items()}
        ratio = per_call["ref.get"] / per_call["dict.get"]
        report.target("P1", f"ref.get hit / dict.get, {n:,} keys", f"{ratio:.2f}x",
                      "<= 1.5x", ratio <= 1.5)
        report.note(f"get at {n:,} keys (ns/call, loop overhead removed): " + ", ".join(
            f"{name} {ns:.1f}" for name, ns in per_call.items()))


def p2_ref(report: Report, big: int, rounds: int) -> None:
    small = build_map(make_keys(10), list(range(10)))
    large = build_map(make_keys(big), list(range(big)))
    count = 20_000
    seq = range(count)

    def refs(m: SharedMap) -> float:
        mref = m.ref
        start = time.perf_counter()
        for _ in seq:
            mref()
        return time.perf_counter() - start

    with no_gc():
        best = interleaved({"small": partial(refs, small), "large": partial(refs, large)}, rounds)
    ratio = best["large"] / best["small"]
    report.target("P2", f"m.ref() {big:,} keys / 10 keys", f"{ratio:.2f}x", "<= 1.2x",
                  ratio <= 1.2)
    report.note(f"m.ref(): {best['small'] / count * 1e9:.0f} ns at 10 keys, "
                f"{best['large'] / count * 1e9:.0f} ns at {big:,} keys")


def p3_p4_writes(report: Report, big: int, rounds: int, hot: bool) -> None:
    """Random keys: each commit writes 10 keys drawn from the whole map, so
    every trie path and index slot is cache-cold. Hot keys: every commit
    writes the same 10 keys (a writer updating a few entries). Only the
    committing ref sees the base version, the usual single-writer case, so
    the commit may edit it in place; the note also times commits while a
    reader holds the base version, which must copy what they edit."""
    keys = make_keys(big)
    values = list(range(big))
    m = build_map(keys, values)
    imap = immutables.Map(zip(keys, values, strict=True))
    pmap = pyrsistent.pmap(dict(zip(keys, values, strict=True)))
    rnd = random.Random(SEED)

    def draw() -> list[list[str]]:
        # Each contender gets its own keys from the same distribution, so
        # none runs on keys another one just brought into the cache.
        if hot:
            return [[rnd.choice(keys) for _ in range(10)]] * 200
        return [[rnd.choice(keys) for _ in range(10)] for _ in range(200)]

    commit_batches, apply_batches, imm_batches, pyr_batches = draw(), draw(), draw(), draw()
    observed_batches = draw()
    state: dict[str, Any] = {"imap": imap, "pmap": pmap}
    # Every write stores a value never stored before: writing the object a
    # key already holds is (rightly) a no-op and would flatter the figures.
    fresh = iter(range(10 ** 7, 10 ** 9))
    label = "hot keys" if hot else "random keys"

    def shared_commit() -> float:
        start = time.perf_counter()
        for batch in commit_batches:
            ref = m.ref()
            for k in batch:
                ref.set(k, next(fresh))
            ref.prepare()
            m.commit(ref)
        return (time.perf_counter() - start) / len(commit_batches)

    def shared_commit_observed() -> float:
        # A reader holds the base version through the commit, so the commit
        # must copy the paths it edits instead of editing them in place.
        start = time.perf_counter()
        for batch in observed_batches:
            reader = m.ref(read_only=True)
            ref = m.ref()
            for k in batch:
                ref.set(k, next(fresh))
            ref.prepare()
            m.commit(ref)
            del reader
        return (time.perf_counter() - start) / len(observed_batches)

    def shared_apply() -> float:
        total = 0.0
        for batch in apply_batches:
            add: list[Any] = []
            for k in batch:
                add += (k, next(fresh))
            add += (VERSION_KEY, m.version + 1)
            changes = {"version": m.version, "remove": [], "add": add}
            start = time.perf_counter()
            m.apply_changes(changes)
            total += time.perf_counter() - start
        return total / len(apply_batches)

    def immutables_mutate() -> float:
        cur = state["imap"]
        start = time.perf_counter()
        for batch in imm_batches:
            with cur.mutate() as mm:
                for k in batch:
                    mm[k] = next(fresh)
                cur = mm.finish()
        state["imap"] = cur
        return (time.perf_counter() - start) / len(imm_batches)

    def pyrsistent_evolve() -> float:
        cur = state["pmap"]
        start = time.perf_counter()
        for batch in pyr_batches:
            ev = cur.evolver()
            for k in batch:
                ev[k] = next(fresh)
            cur = ev.persistent()
        state["pmap"] = cur
        return (time.perf_counter() - start) / len(pyr_batches)

    with no_gc():
        best = interleaved({
            "commit": shared_commit,
            "observed commit": shared_commit_observed,
            "apply": shared_apply,
            "immutables": immutables_mutate,
            "pyrsistent": pyrsistent_evolve,
        }, rounds)
    us = {name: t * 1e6 for name, t in best.items()}
    report.target("P3", f"10 sets + prepare + commit, {big:,} keys, {label}",
                  f"{us['commit']:.1f} us", "<= 20 us", us["commit"] <= 20)
    report.target("P4", f"apply_changes of 10 keys, {big:,} keys, {label}",
                  f"{us['apply']:.1f} us", "<= 20 us", us["apply"] <= 20)
    report.note(f"10 writes at {big:,} keys, {label} (us): SharedMap set+prepare+commit "
                f"{us['commit']:.1f} (with a reader holding the base version "
                f"{us['observed commit']:.1f}), apply_changes {us['apply']:.1f}, immutables "
                f"mutate+finish {us['immutables']:.1f}, pyrsistent evolver {us['pyrsistent']:.1f}")


def traced(build: Callable[[], Any]) -> tuple[int, Any]:
    """Bytes still allocated by `build` (which returns what it keeps alive)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = build()
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return after - before, kept


def p5_memory(report: Report, n: int, versions: int) -> None:
    # Keys and values exist before tracing: only the structures are measured,
    # which is the strict reading (they are shared by every version anyway).
    keys = make_keys(n)
    values = list(range(1000, 1000 + n))
    rnd = random.Random(SEED)
    changed = [(rnd.choice(keys), 10 ** 6 + i) for i in range(versions)]

    def one_shared() -> Any:
        return build_map(keys, values)

    def many_shared() -> Any:
        m = build_map(keys, values)
        live = [m.ref(read_only=True)]
        for k, v in changed:
            ref = m.ref()
            ref.set(k, v)
            ref.prepare()
            m.commit(ref)
            live.append(m.ref(read_only=True))
        return m, live

    def one_immutables() -> Any:
        return immutables.Map(zip(keys, values, strict=True))

    def many_immutables() -> Any:
        cur = immutables.Map(zip(keys, values, strict=True))
        live = [cur]
        for k, v in changed:
            cur = cur.set(k, v)
            live.append(cur)
        return live

    def one_pyrsistent() -> Any:
        return pyrsistent.pmap(dict(zip(keys, values, strict=True)))

    def many_pyrsistent() -> Any:
        cur = pyrsistent.pmap(dict(zip(keys, values, strict=True)))
        live = [cur]
        for k, v in changed:
            cur = cur.set(k, v)
            live.append(cur)
        return live

    results = {}
    for name, one, many in (("SharedMap", one_shared, many_shared),
                            ("immutables", one_immutables, many_immutables),
                            ("pyrsistent", one_pyrsistent, many_pyrsistent)):
        single, kept = traced(one)
        del kept
        multi, kept = traced(many)
        del kept
        results[name] = (single, multi)
    single, multi = results["SharedMap"]
    ratio = multi / single
    report.target("P5", f"{versions:,} live versions / 1, {n:,} keys", f"{ratio:.2f}x",
                  "<= 1.5x", ratio <= 1.5)
    dict_copy, kept = traced(lambda: dict(zip(keys, values, strict=True)))
    del kept
    report.note(f"memory at {n:,} keys, 1 version -> {versions:,} versions (MB): " + ", ".join(
        f"{name} {s / 1e6:.1f} -> {mm / 1e6:.1f} ({mm / s:.2f}x)"
        for name, (s, mm) in results.items())
        + f"; a dict copy per version would be {dict_copy * (versions + 1) / 1e6:,.0f} MB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer rounds (same sizes), for a fast smoke run")
    args = parser.parse_args(argv)
    rounds = 5 if args.quick else 15
    big = 1_000_000
    report = Report()
    print(f"caf-sharing core benchmarks (python {sys.version.split()[0]}, "
          f"{'quick' if args.quick else 'full'} run, min of {rounds} interleaved rounds)",
          flush=True)
    p1_get(report, [10_000, big], rounds)
    p2_ref(report, big, rounds)
    p3_p4_writes(report, big, max(3, rounds // 3), hot=False)
    p3_p4_writes(report, big, max(3, rounds // 3), hot=True)
    p5_memory(report, 100_000, 1000)
    ok = report.print()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
