"""Propagation through actors, end to end (issue 10's M2), beside the
backend-level P6 of compare_redis.py.

A writer actor on node A sets a key (``handle.call``); a reader actor on
node B, registered with ``on_change``, gets its next message, and that
message sees the new value. The time from the writer's call to that message
is compared with a raw redis-py ``PUBLISH`` -> subscriber round trip of a
change set's size, redis-py ``PubSub`` reading it (P6's reference): p50 <=
1.5x, p99 <= 2x. Also printed: the same raw round trip read from a bare
connection (no ``PubSub`` object, a stricter reference), and when node B's
replica applied the change (a service watcher), which splits the latency into
replication (A's message and commit, Redis, B's apply) and B's message.

Both nodes, the reader and the raw clients run in this one process on their
own redis-server; ours and raw alternate sample by sample within a round, the
best round of each is kept.

    PYTHONPATH=src /work/venv/bin/python benchmarks/compare_propagation.py [--rounds 5] [--check]

``--check`` exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import orjson
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from caf_sharing import Actor, Node
from redisserver import RedisServer


class Writer(Actor):
    async def init(self) -> None:
        self.sharing.add_writable_map("m", "m", initial_value={"k": 0})

    async def put(self, value: int) -> None:
        self.sharing.maps.m.set("k", value)


class Reader(Actor):
    #: (value awaited, future set when a message of this actor sees it)
    waiting: tuple[int, asyncio.Future[float]] | None = None

    async def init(self) -> None:
        self.sharing.add_read_only_map("w", "prop-writer-m", on_change="changed")

    async def changed(self, alias: str, version: int) -> None:
        waiting = Reader.waiting
        if waiting is not None and self.sharing.maps.w.get("k") == waiting[0] \
                and not waiting[1].done():
            waiting[1].set_result(time.perf_counter())


def change_set(i: int) -> bytes:
    return orjson.dumps({"version": i, "remove": [], "add": ["k", i, "__ca_version__", i + 1],
                         "txid": "0123456789abcdef-1", "base_txid": "0123456789abcdef-0",
                         "ts": 1_700_000_000_000_000})


class Propagation:
    def __init__(self, server: RedisServer, samples: int) -> None:
        self.server = server
        self.samples = samples
        self.value = 0
        self.arrived: asyncio.Future[float] | None = None
        self.applied_at = 0.0

    async def setup(self) -> None:
        url = self.server.url
        self.a = Node(url, app="bench", restart_grace=False)
        self.b = Node(url, app="bench", restart_grace=False)
        await self.a.open()
        await self.b.open()
        self.writer = await self.a.start(Writer, "prop-writer")
        await self.b.start(Reader, "prop-reader")
        replica = await self.b.service.replica_of("prop-writer-m")
        assert replica is not None
        self.b.service.watch("prop-writer-m", replica, self._applied)
        self.raw = aioredis.Redis(host="127.0.0.1", port=self.server.port)
        self.pubsub = self.raw.pubsub()
        await self.pubsub.subscribe("raw-pubsub")
        self.listener = asyncio.create_task(self._pubsub_listen())
        self.bare = Connection(host="127.0.0.1", port=self.server.port, protocol=2)
        await self.bare.connect()
        await self.bare.send_command("SUBSCRIBE", "raw-bare", check_health=False)
        await self.bare.read_response(timeout=5)
        self.reader = asyncio.create_task(self._bare_listen())
        for i in range(50):  # warm every path up
            await self.raw_sample(i, "raw-pubsub")
            await self.raw_sample(i, "raw-bare")
            await self.actor_sample()

    async def close(self) -> None:
        for task in (self.listener, self.reader):
            task.cancel()
        await self.pubsub.aclose()
        await self.bare.disconnect()
        await self.raw.aclose()
        await self.b.close()
        await self.a.close()

    def _applied(self) -> None:
        self.applied_at = time.perf_counter()

    def _arrive(self) -> None:
        if self.arrived is not None and not self.arrived.done():
            self.arrived.set_result(time.perf_counter())

    async def _pubsub_listen(self) -> None:
        async for message in self.pubsub.listen():
            if message["type"] == "message":
                self._arrive()

    async def _bare_listen(self) -> None:
        while True:
            message = await self.bare.read_response(timeout=None)
            if isinstance(message, list) and message[0] == b"message":
                self._arrive()

    async def raw_sample(self, i: int, channel: str) -> float:
        self.arrived = asyncio.get_running_loop().create_future()
        started = time.perf_counter()
        await self.raw.publish(channel, change_set(i))
        return await self.arrived - started

    async def actor_sample(self) -> tuple[float, float]:
        self.value += 1
        seen: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        Reader.waiting = (self.value, seen)
        started = time.perf_counter()
        await self.writer.call(Writer.put, self.value)
        arrived = await seen
        return arrived - started, self.applied_at - started

    async def round(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {"actors": [], "replica applied": [], "raw PUBLISH": [],
                                       "raw bare": []}
        for i in range(self.samples):
            samples = [("raw PUBLISH", partial(self.raw_sample, i, "raw-pubsub")),
                       ("raw bare", partial(self.raw_sample, i, "raw-bare")),
                       ("actors", None)]
            shift = i % len(samples)
            for name, sample in samples[shift:] + samples[:shift]:
                if sample is None:
                    total, applied = await self.actor_sample()
                    out["actors"].append(total)
                    out["replica applied"].append(applied)
                else:
                    out[name].append(await sample())
        return out


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    p50: dict[str, float] = {}
    p99: dict[str, float] = {}
    with RedisServer() as server:
        bench = Propagation(server, args.samples)
        await bench.setup()
        try:
            for _ in range(args.rounds):
                gc.collect()
                for name, values in (await bench.round()).items():
                    p50[name] = min(p50.get(name, float("inf")), statistics.median(values))
                    p99[name] = min(p99.get(name, float("inf")), quantile(values, 0.99))
        finally:
            await bench.close()
    print(f"{args.rounds} rounds of {args.samples} interleaved samples, best round kept")
    print("p50 us: " + ", ".join(f"{k} {v * 1e6:.1f}" for k, v in p50.items()))
    print("p99 us: " + ", ".join(f"{k} {v * 1e6:.1f}" for k, v in p99.items()))
    met = []
    for label, ours, base, target in (
            ("M2 writer call -> reader message, p50", p50["actors"], p50["raw PUBLISH"], 1.5),
            ("M2 writer call -> reader message, p99", p99["actors"], p99["raw PUBLISH"], 2.0)):
        ratio = ours / base
        met.append(ratio <= target)
        print(f"{label:<40} ours {ours * 1e6:8.1f} us  base {base * 1e6:8.1f} us  "
              f"ratio {ratio:5.2f}  target <= {target}x  {'ok' if met[-1] else 'MISSED'}")
    print(f"(against the bare-connection round trip: p50 {p50['actors'] / p50['raw bare']:.2f}x, "
          f"p99 {p99['actors'] / p99['raw bare']:.2f}x)")
    return 1 if args.check and not all(met) else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
