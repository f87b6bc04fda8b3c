"""Durability figures: dead-server time-outs, failover losses, the cost of WAIT.

Starts its own redis-server processes (tests/redisserver.py) behind test
relays (tests/relay.py) and reports:

* BLACKHOLE  a Node with default settings whose Redis stops answering (the
             relay accepts and forwards nothing): time until one message that
             commits fails, then time ``node.close()`` takes. ``--old`` also
             runs the settings before issue 8 (socket_timeout 10 s, no
             call_timeout, connect_timeout 5 s: minutes).
* FAILOVER   an actor commits as fast as it can while the primary is killed
             (SIGKILL) and its replica promoted, behind a relay; ``lagging``
             cuts the replication link 0.6 s before the kill, ``prompt`` kills
             with the link up. Acknowledged commits the promoted server lacks
             are lost. With and without ``wait_replicas=1``.
* WAIT COST  commits/s of 100 writers (1-key commits, one backend, group
             commit) and the latency of one writer's sequential commits,
             without and with ``wait_replicas=1``, against a primary with one
             replica; interleaved rounds, best round kept.

    /work/venv/bin/python benchmarks/durability.py [--failovers 3] [--rounds 3] [--old]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from caf_sharing import Node
from caf_sharing.backends import MapCreate, MapWrite, Transaction, make_backend
from caf_sharing.errors import BackendUnavailableError
from failover import PRIMARY_ARGS, fail_over_while_writing, start_replica
from redisserver import RedisServer
from relay import Relay
from test_redis_durability import Counter

V = "__ca_version__"
#: The time-outs before issue 8, for --old.
OLD_DEFAULTS = {"socket_timeout": 10.0, "connect_timeout": 5.0, "call_timeout": None,
                "health_check_interval": 30.0}


async def blackhole(**options: Any) -> tuple[float, float]:
    with RedisServer() as server, Relay(server.port) as relay:
        node = Node(relay.url, app="bh", lease_ttl=10.0, restart_grace=False, **options)
        await node.open()
        counter = await node.start(Counter, "ann-count")
        await counter.call("bump")
        relay.blackhole()
        started = time.monotonic()
        try:
            await counter.call("bump")
            raise RuntimeError("a message succeeded against a blackholed server")
        except BackendUnavailableError:
            failed = time.monotonic() - started
        started = time.monotonic()
        await node.close()
        return failed, time.monotonic() - started


def transaction(actor: str, n: int) -> Transaction:
    txid = f"{actor}:{n}"
    return Transaction(
        actor=actor, node_id="bench", txid=txid, prev_txid=f"{actor}:{n - 1}" if n else None,
        checkpoint={"txid": txid, "state": None, "maps": []}, lease_ttl=600.0,
        writes=(MapWrite(f"{actor}-m", {"version": n, "remove": [], "add": ["k", n, V, n + 1]}),),
        creates=(MapCreate(f"{actor}-m"),) if n == 0 else ())


class WaitCost:
    """The same commits through a backend without and with wait_replicas=1."""

    def __init__(self, url: str, writes: int) -> None:
        self.url = url
        self.writes = writes
        self.next: dict[str, int] = {}

    async def rate(self, writers: int, **options: Any) -> float:
        backend = make_backend(self.url, app=f"w{uuid.uuid4().hex[:8]}", **options)
        await backend.start()
        actors = [f"ann-w{i}" for i in range(writers)]

        async def writer(actor: str) -> None:
            for n in range(self.writes):
                assert await backend.commit(transaction(actor, n))

        started = time.perf_counter()
        await asyncio.gather(*(writer(a) for a in actors))
        elapsed = time.perf_counter() - started
        await backend.close()
        return writers * self.writes / elapsed

    async def latency(self, **options: Any) -> float:
        backend = make_backend(self.url, app=f"l{uuid.uuid4().hex[:8]}", **options)
        await backend.start()
        samples = []
        for n in range(self.writes * 4):
            started = time.perf_counter()
            assert await backend.commit(transaction("ann-one", n))
            samples.append(time.perf_counter() - started)
        await backend.close()
        return statistics.median(samples)


async def wait_cost(rounds: int, writes: int) -> dict[str, float]:
    wait = {"wait_replicas": 1, "wait_timeout_ms": 1000}
    best: dict[str, float] = {}
    with RedisServer(PRIMARY_ARGS) as primary:
        replica = start_replica(primary.port)
        try:
            cost = WaitCost(primary.url, writes)
            for _ in range(rounds):
                for name, run in (("rate", cost.rate(100)), ("rate+wait", cost.rate(100, **wait)),
                                  ("p50", cost.latency()), ("p50+wait", cost.latency(**wait))):
                    gc.collect()
                    value = await run
                    keep = max if name.startswith("rate") else min
                    best[name] = keep(best.get(name, value), value)
        finally:
            replica.cleanup()
    return best


async def main(failovers: int, rounds: int, writes: int, old: bool) -> None:
    failed, closed = await blackhole()
    print(f"BLACKHOLE default settings: one message failed after {failed:.2f} s, "
          f"close() took {closed:.2f} s (lease TTL 10 s)")
    if old:
        failed, closed = await blackhole(**OLD_DEFAULTS)
        print(f"BLACKHOLE settings before issue 8: one message failed after {failed:.1f} s, "
              f"close() took {closed:.1f} s")
    for lag, kind in ((0.6, "lagging"), (0.0, "prompt")):
        for options in ({}, {"wait_replicas": 1, "wait_timeout_ms": 200}):
            label = "wait_replicas=1" if options else "no wait      "
            for _ in range(failovers):
                run = await fail_over_while_writing(lag=lag, **options)
                print(f"FAILOVER {kind:<7} {label}: {len(run.acked):5d} acknowledged, "
                      f"{len(run.lost):4d} lost, {run.ambiguous:3d} DurabilityError, "
                      f"{run.failed:3d} other failures, {run.reasserts} re-asserts")
    best = await wait_cost(rounds, writes)
    print(f"WAIT COST 100 writers: {best['rate']:8.0f} commits/s without, "
          f"{best['rate+wait']:8.0f} with wait_replicas=1 "
          f"({best['rate+wait'] / best['rate']:.2f}x)")
    print(f"WAIT COST one writer, p50 commit: {best['p50'] * 1e6:6.0f} us without, "
          f"{best['p50+wait'] * 1e6:6.0f} us with ({best['p50+wait'] / best['p50']:.2f}x)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--failovers", type=int, default=3, help="runs of each failover kind")
    parser.add_argument("--rounds", type=int, default=3, help="WAIT COST rounds")
    parser.add_argument("--writes", type=int, default=50, help="commits per writer per round")
    parser.add_argument("--old", action="store_true",
                        help="also time the settings before issue 8 (takes minutes)")
    args = parser.parse_args()
    asyncio.run(main(args.failovers, args.rounds, args.writes, args.old))
