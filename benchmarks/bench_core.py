"""pytest-benchmark suite of the compiled core at 10, 10k and 1M keys.

    pytest benchmarks/bench_core.py --benchmark-enable

Covers get (with ``dict.get`` on the same data as the baseline), ref(),
10 sets + prepare + commit, apply_changes of a 10-key change set, and dump.
Without --benchmark-enable each benchmark runs once, as a smoke test. The
pass/fail targets (P1-P5) are checked by benchmarks/compare_core.py.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from caf_sharing import SharedMap
from caf_sharing._fastmap import VERSION_KEY

SIZES = [10, 10_000, 1_000_000]


class Data:
    """A map of `n` keys plus what the benchmarks feed it."""

    def __init__(self, n: int) -> None:
        self.keys = [f"key:{i:08d}" for i in range(n)]
        add: list[Any] = []
        for i, k in enumerate(self.keys):
            add += (k, i)
        self.map = SharedMap()
        self.map.apply_changes({"version": 0, "remove": [], "add": [*add, VERSION_KEY, 1]})
        self.plain = dict(zip(self.keys, range(n), strict=True))
        rnd = random.Random(n)
        # Equal but not identical str objects, as keys read off the wire are.
        self.probes = ["".join(list(rnd.choice(self.keys))) for _ in range(1000)]
        self.batches = [[rnd.choice(self.keys) for _ in range(10)] for _ in range(64)]
        self.turn = 0

    def next_batch(self) -> list[str]:
        self.turn += 1
        return self.batches[self.turn % len(self.batches)]


@pytest.fixture(scope="module", params=SIZES, ids=[f"{n}keys" for n in SIZES])
def data(request: pytest.FixtureRequest) -> Data:
    return Data(request.param)


def read_all(get: Any, probes: list[str]) -> None:
    for k in probes:
        get(k)


def test_dict_get_baseline(benchmark: Any, data: Data) -> None:
    """1000 dict.get calls on the same data (the baseline of P1)."""
    benchmark(read_all, data.plain.get, data.probes)


def test_ref_get(benchmark: Any, data: Data) -> None:
    """1000 ref.get hits on a read-only ref of the newest version."""
    ref = data.map.ref(read_only=True)
    benchmark(read_all, ref.get, data.probes)
    assert ref.get(data.probes[0]) == data.plain[data.probes[0]]


def test_edited_ref_get(benchmark: Any, data: Data) -> None:
    """1000 get hits on a ref with edits of its own (served by the trie)."""
    ref = data.map.ref()
    ref.set("extra", 0)
    benchmark(read_all, ref.get, data.probes)
    assert ref.get(data.probes[0]) == data.plain[data.probes[0]]


def test_ref(benchmark: Any, data: Data) -> None:
    """m.ref(): O(1) whatever the size."""
    benchmark(data.map.ref)


def test_set_prepare_commit(benchmark: Any, data: Data) -> None:
    """10 sets + prepare + commit."""
    m = data.map

    def write() -> None:
        ref = m.ref()
        value = data.turn
        for k in data.next_batch():
            ref.set(k, value)
        ref.prepare()
        m.commit(ref)

    benchmark(write)
    assert m.ref().version > 1


def test_apply_changes(benchmark: Any, data: Data) -> None:
    """apply_changes of a 10-key change set at the map's version."""
    m = data.map

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        add: list[Any] = []
        for k in data.next_batch():
            add += (k, -data.turn)
        return ({"version": m.version, "remove": [], "add": add},), {}

    before = m.version
    benchmark.pedantic(m.apply_changes, setup=setup, rounds=200 if len(data.keys) > 10 else 500)
    assert m.version > before


def test_dump(benchmark: Any, data: Data) -> None:
    """A full dump of the map."""
    ref = data.map.ref(read_only=True)
    result = benchmark.pedantic(ref.dump, rounds=3 if len(data.keys) >= 1_000_000 else 50)
    assert len(result["add"]) == 2 * len(data.keys) + 2
