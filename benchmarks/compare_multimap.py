"""What a message costs as the number of maps it writes grows (issue 10's M4).

Through a ``Node`` on its own redis-server, one actor per size N (1, 4, 16)
owns N writable maps; each message sets one key in every one of them. Rounds
alternate the sizes and each size keeps its best round:

* M4  16 maps <= 4x 1 map (Redis), judged on two costs: the time per message
      of one actor calling in a loop (``handle.call``), and the CPU time per
      message (this process's plus the server's, INFO cpu) while ``--actors``
      actors per size call at once, which other work on a shared machine
      disturbs less than the wall time printed beside it.
* The Redis server's own time per commit, from INFO commandstats (EVALSHA
  usec_per_call after CONFIG RESETSTAT), best round per size: what the commit
  script costs per map.
* The same messages on ``memory://``, for information (no target).

``--profile`` also prints the top of a cProfile of 16-map messages on Redis,
to see what scales per map on the Python side.

    PYTHONPATH=src /work/venv/bin/python benchmarks/compare_multimap.py [--rounds 5] [--check]

``--check`` exits 1 when the target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from caf_sharing import Actor, ActorHandle, Node
from redisserver import RedisServer

SIZES = (1, 4, 16)
TARGET = 4.0


ALIASES = [f"m{i}" for i in range(max(SIZES))]


def size_of(actor: str) -> int:
    return int(actor.split("-")[0][1:])  # "w16-app": 16 maps


class MultiWriter(Actor):
    async def init(self) -> None:
        for alias in ALIASES[:size_of(self.name)]:
            self.sharing.add_writable_map(alias, alias)

    async def put(self, n: int) -> int:
        maps = self.sharing.maps
        for alias in ALIASES[:size_of(self.name)]:
            maps[alias].set("k", n)
        return n


async def per_call(handle: ActorHandle[MultiWriter], count: int) -> float:
    started = time.perf_counter()
    for i in range(count):
        await handle.call("put", i)
    return (time.perf_counter() - started) / count


def evalsha_usec(client: redis.Redis) -> float:
    stats = client.info("commandstats").get("cmdstat_evalsha")
    return float(stats["usec_per_call"]) if stats else float("nan")


def server_cpu(client: redis.Redis | None) -> float:
    if client is None:
        return 0.0
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def rate(handles: list[ActorHandle[MultiWriter]], seconds: float,
               client: redis.Redis | None) -> tuple[float, float]:
    """Seconds per message with every actor of ``handles`` sending at once,
    in wall time and in CPU time (this process's plus the server's, which
    other work on the machine disturbs less)."""
    until = time.perf_counter() + seconds
    cpu = time.process_time() + server_cpu(client)

    async def loop(handle: ActorHandle[MultiWriter]) -> int:
        done = 0
        while time.perf_counter() < until:
            await handle.call("put", done)
            done += 1
        return done

    count = sum(await asyncio.gather(*(loop(h) for h in handles)))
    return seconds / count, (time.process_time() + server_cpu(client) - cpu) / count


async def start_all(node: Node, actors: int
                    ) -> tuple[dict[int, ActorHandle[MultiWriter]],
                               dict[int, list[ActorHandle[MultiWriter]]]]:
    """One actor per size, and ``actors`` more per size for throughput."""
    one = {n: await node.start(MultiWriter, f"w{n}-app") for n in SIZES}
    many = {n: [await node.start(MultiWriter, f"w{n}-many{i}") for i in range(actors)]
            for n in SIZES}
    return one, many


class Results:
    """Best of rounds per size: latency (s per message, one actor), cost
    under load (s per message, many actors at once; wall and CPU), server
    time (µs)."""

    def __init__(self) -> None:
        self.latency = dict.fromkeys(SIZES, float("inf"))
        self.loaded = dict.fromkeys(SIZES, float("inf"))
        self.cpu = dict.fromkeys(SIZES, float("inf"))
        self.server_us = dict.fromkeys(SIZES, float("inf"))
        self.profile = ""


async def measure(url: str, args: argparse.Namespace, client: redis.Redis | None) -> Results:
    out = Results()
    options = {} if client is None else {"restart_grace": False}
    async with Node(url, app="bench", **options) as node:
        one, many = await start_all(node, args.actors)
        for handle in one.values():
            await per_call(handle, 50)  # warm up: scripts loaded, maps subscribed
        for _ in range(args.rounds):
            for n in SIZES:
                if client is not None:
                    client.config_resetstat()
                out.latency[n] = min(out.latency[n], await per_call(one[n], args.calls))
                if client is not None:
                    out.server_us[n] = min(out.server_us[n], evalsha_usec(client))
                wall, cpu = await rate(many[n], args.seconds, client)
                out.loaded[n], out.cpu[n] = min(out.loaded[n], wall), min(out.cpu[n], cpu)
        if args.profile and client is not None:
            profiler = cProfile.Profile()
            profiler.enable()
            await per_call(one[max(SIZES)], args.calls)
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
            out.profile = text.getvalue()
    return out


def table(label: str, times: dict[int, float]) -> float:
    cells = "  ".join(f"{n:>2} maps {times[n] * 1e6:8.1f} us" for n in SIZES)
    ratio = times[16] / times[1]
    print(f"{label:<34} {cells}  16/1 {ratio:5.2f}x")
    return ratio


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--actors", type=int, default=20, help="per size, under load")
    parser.add_argument("--seconds", type=float, default=1.0, help="per round under load")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    with RedisServer() as server:
        client = redis.Redis(port=server.port)
        on_redis = await measure(server.url, args, client)
        client.close()
    in_memory = await measure("memory://m4", args, None)
    print(f"{args.rounds} interleaved rounds, best kept; under load: {args.actors} actors "
          f"per size for {args.seconds}s")
    ratio = table("per message, one actor (Redis)", on_redis.latency)
    table("per message, under load (Redis)", on_redis.loaded)
    loaded = table("  CPU, client + server (Redis)", on_redis.cpu)
    table("per message, one actor (memory)", in_memory.latency)
    table("per message, under load (memory)", in_memory.loaded)
    table("  CPU (memory)", in_memory.cpu)
    cells = "  ".join(f"{n:>2} maps {on_redis.server_us[n]:8.1f} us" for n in SIZES)
    print(f"{'server EVALSHA time per commit':<34} {cells}")
    met = ratio <= TARGET and loaded <= TARGET
    print(f"M4 16 maps / 1 map (Redis): {ratio:.2f}x one actor, {loaded:.2f}x CPU under load  "
          f"target <= {TARGET}x  {'ok' if met else 'MISSED'}")
    if on_redis.profile:
        print(on_redis.profile)
    return 1 if args.check and not met else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
