"""Redis backend versus raw redis-py, side by side (DESIGN.md section 8).

Starts its own redis-server (tests/redisserver.py), then runs interleaved
rounds of each pair of measurements and keeps the best round of each (P6
alternates ours and raw sample by sample within each round, so that both see
the machine in the same state):

* P6  commit on backend A -> handler on backend B (separate connections),
      against a raw redis-py PUBLISH -> subscriber round trip of the same
      payload: p50 <= 1.5x, p99 <= 2x.
* P7  100 writers (100 actors, 1-key commits) on one backend, against raw
      pipelined EVALSHA (100 per pipeline) of a trivial HSET + PUBLISH script:
      rate >= 0.5x.
* READ  read_map of a 100k-key map, against raw HGETALL + orjson decoding of
      every value: <= 2x.

    /work/venv/bin/python benchmarks/compare_redis.py [--rounds 5] [--check]

``--check`` exits 1 when a target is missed. These are ratios measured in
one process run, so they hold on a noisy machine better than absolute times.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from caf_sharing.backends import MapWrite, Transaction, make_backend
from caf_sharing.backends.redis import RedisBackend
from redisserver import RedisServer

V = "__ca_version__"
RAW_SCRIPT = """
redis.call("HSET", KEYS[1], ARGV[1], ARGV[2], "__ca_version__", ARGV[3])
return redis.call("PUBLISH", ARGV[4], ARGV[5])
"""


def change_set(version: int, key: str, value: Any) -> dict[str, Any]:
    return {"version": version, "remove": [], "add": [key, value, V, version + 1]}


def transaction(actor: str, version: int, key: str = "k", value: Any = None) -> Transaction:
    txid = f"{actor}:{version}"
    prev = f"{actor}:{version - 1}" if version else None  # commits of an actor chain
    return Transaction(actor=actor, node_id="bench", txid=txid, prev_txid=prev,
                       checkpoint={"txid": txid, "state": None, "maps": []}, lease_ttl=600.0,
                       writes=(MapWrite(f"{actor}-m", change_set(version, key,
                                                                 value or version)),))


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Bench:
    def __init__(self, server: RedisServer, samples: int, writes: int) -> None:
        self.server = server
        self.samples = samples
        self.writes = writes
        self.url = server.url
        self.versions: dict[str, int] = {}

    async def setup(self) -> None:
        # restart_grace off: the server is new, and no lease is lost here.
        self.a = make_backend(self.url, app="bench", restart_grace=False)
        self.b = make_backend(self.url, app="bench", restart_grace=False)
        self.w = make_backend(self.url, app="bench", restart_grace=False)
        for backend in (self.a, self.b, self.w):
            await backend.start()
        self.raw_pub = aioredis.Redis(host="127.0.0.1", port=self.server.port)
        self.raw_sub = aioredis.Redis(host="127.0.0.1", port=self.server.port)
        self.raw = aioredis.Redis(host="127.0.0.1", port=self.server.port)
        self.raw_sha = await self.raw.script_load(RAW_SCRIPT)
        # P6: one actor writing one map, B subscribed.
        await self.a.acquire_lease("lat-a", "bench", 600.0)
        await self.a.create_map("lat-a-m")
        self.versions["lat-a"] = 0
        self.arrived: asyncio.Future[float] | None = None
        await self.b.subscribe("lat-a-m", self._on_message)
        self.pubsub = self.raw_sub.pubsub()
        await self.pubsub.subscribe("raw-latency")
        self.raw_reader = asyncio.create_task(self._raw_listen())
        # P7: 100 actors with one map each.
        self.writers = [f"w{i}-a" for i in range(100)]
        for actor in self.writers:
            await self.w.acquire_lease(actor, "bench", 600.0)
            await self.w.create_map(f"{actor}-m")
            self.versions[actor] = 0
        # READ: a 100k-key map.
        big = []
        for i in range(100_000):
            big += [f"key{i}", {"i": i, "s": f"value {i}", "l": [i, i + 1]}]
        await self.a.create_map("big-a-m", {"version": 0, "remove": [], "add": [*big, V, 1]})
        self.big_key = "caf:bench:{big-a}:map:big-a-m"  # the documented key layout
        for i in range(20):  # warm both paths up
            await self.raw_sample(i)
            await self.our_sample()

    async def close(self) -> None:
        self.raw_reader.cancel()
        await self.pubsub.aclose()
        for client in (self.raw_pub, self.raw_sub, self.raw):
            await client.aclose()
        for backend in (self.a, self.b, self.w):
            await backend.close()

    def _on_message(self, payload: bytes) -> None:
        if self.arrived is not None and not self.arrived.done():
            self.arrived.set_result(time.perf_counter())

    async def _raw_listen(self) -> None:
        async for message in self.pubsub.listen():
            if message["type"] == "message" and self.arrived is not None \
                    and not self.arrived.done():
                self.arrived.set_result(time.perf_counter())

    # -- P6 ---------------------------------------------------------------------

    async def our_sample(self) -> float:
        v = self.versions["lat-a"]
        tx = transaction("lat-a", v, "k", v)
        self.arrived = asyncio.get_running_loop().create_future()
        started = time.perf_counter()
        await self.a.commit(tx)
        elapsed = await self.arrived - started
        self.versions["lat-a"] = v + 1
        return elapsed

    async def raw_sample(self, i: int) -> float:
        payload = orjson.dumps(change_set(i, "k", i))
        self.arrived = asyncio.get_running_loop().create_future()
        started = time.perf_counter()
        await self.raw_pub.publish("raw-latency", payload)
        return await self.arrived - started

    async def latencies(self) -> dict[str, list[float]]:
        """One round of P6: ours and raw alternate sample by sample, so both
        see the same machine at the same moment."""
        out: dict[str, list[float]] = {"ours": [], "raw": []}
        for i in range(self.samples):
            if i % 2:
                out["raw"].append(await self.raw_sample(i))
                out["ours"].append(await self.our_sample())
            else:
                out["ours"].append(await self.our_sample())
                out["raw"].append(await self.raw_sample(i))
        return out

    # -- P7 -------------------------------------------------------------------------

    async def our_rate(self) -> float:
        async def writer(actor: str) -> None:
            for _ in range(self.writes):
                v = self.versions[actor]
                await self.w.commit(transaction(actor, v))
                self.versions[actor] = v + 1

        started = time.perf_counter()
        await asyncio.gather(*(writer(a) for a in self.writers))
        return len(self.writers) * self.writes / (time.perf_counter() - started)

    async def raw_rate(self) -> float:
        started = time.perf_counter()
        for round_ in range(self.writes):
            pipe = self.raw.pipeline(transaction=False)
            for i in range(len(self.writers)):
                payload = orjson.dumps(change_set(round_, "k", round_))
                pipe.evalsha(self.raw_sha, 1, f"raw:{{w{i}}}:m", "k", orjson.dumps(round_),
                             round_ + 1, f"raw:{{w{i}}}:chan", payload)
            await pipe.execute()
        return len(self.writers) * self.writes / (time.perf_counter() - started)

    # -- READ ---------------------------------------------------------------------------

    async def our_read(self) -> float:
        started = time.perf_counter()
        dump = await self.a.read_map("big-a-m")
        elapsed = time.perf_counter() - started
        assert dump is not None and len(dump["add"]) == 200_002
        return elapsed

    async def raw_read(self) -> float:
        started = time.perf_counter()
        raw = await self.raw.hgetall(self.big_key)
        decoded = {k: orjson.loads(v) for k, v in raw.items()}
        elapsed = time.perf_counter() - started
        assert len(decoded) == 100_001
        return elapsed


async def interleave(rounds: int, pairs: list[tuple[str, Callable[[], Awaitable[Any]]]]
                     ) -> dict[str, list[Any]]:
    results: dict[str, list[Any]] = {name: [] for name, _ in pairs}
    for round_ in range(rounds):
        order = pairs if round_ % 2 == 0 else pairs[::-1]
        for name, run in order:
            gc.collect()
            results[name].append(await run())
    return results


def ratio_line(what: str, ours: float, raw: float, unit: str, target: str, ok: bool) -> str:
    verdict = "ok" if ok else "MISSED"
    return (f"{what:<34} ours {ours:10.1f} {unit:<9} raw {raw:10.1f} {unit:<9} "
            f"ratio {ours / raw:5.2f}  target {target:<7} {verdict}")


async def main(rounds: int, samples: int, writes: int) -> bool:
    with RedisServer() as server:
        bench = Bench(server, samples, writes)
        await bench.setup()
        try:
            lat: dict[str, list[list[float]]] = {"ours": [], "raw": []}
            for _ in range(rounds):
                gc.collect()
                for name, samples_ in (await bench.latencies()).items():
                    lat[name].append(samples_)
            rate = await interleave(rounds, [("ours", bench.our_rate),
                                             ("raw", bench.raw_rate)])
            read = await interleave(rounds, [("ours", bench.our_read),
                                             ("raw", bench.raw_read)])
            stats = bench.w.stats if isinstance(bench.w, RedisBackend) else None
        finally:
            await bench.close()
    us = 1e6
    p50 = {k: min(statistics.median(r) for r in v) * us for k, v in lat.items()}
    p99 = {k: min(percentile(r, 0.99) for r in v) * us for k, v in lat.items()}
    best_rate = {k: max(v) for k, v in rate.items()}
    best_read = {k: min(v) * 1e3 for k, v in read.items()}
    checks = [
        ("P6 commit->handler p50", p50["ours"], p50["raw"], "us", "<= 1.5x",
         p50["ours"] <= 1.5 * p50["raw"]),
        ("P6 commit->handler p99", p99["ours"], p99["raw"], "us", "<= 2x",
         p99["ours"] <= 2 * p99["raw"]),
        ("P7 100 writers, commits/s", best_rate["ours"], best_rate["raw"], "/s", ">= 0.5x",
         best_rate["ours"] >= 0.5 * best_rate["raw"]),
        ("READ 100k-key map", best_read["ours"], best_read["raw"], "ms", "<= 2x",
         best_read["ours"] <= 2 * best_read["raw"]),
    ]
    print(f"redis-server on 127.0.0.1:{server.port}; {rounds} interleaved rounds, best round "
          f"kept; P6 {samples} samples/round, P7 {writes} commits per writer/round")
    for line in checks:
        print(ratio_line(*line))
    if stats is not None:
        print(f"P7 group commit: {stats.commits} commits in {stats.round_trips} round trips, "
              f"largest batch {stats.largest_batch}")
    return all(ok for *_, ok in checks)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=500, help="P6 samples per round")
    parser.add_argument("--writes", type=int, default=50, help="P7 commits per writer per round")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args()
    met = asyncio.run(main(args.rounds, args.samples, args.writes))
    sys.exit(1 if args.check and not met else 0)
