"""Creating a big map through a Node while another client uses Redis (M5).

Starts its own redis-server, then, in a child process per run, starts a Node
whose actor creates a map of ``--keys`` keys (``add_writable_map`` with an
initial value), while a probe thread of this process (not the child's: its
GIL would time the client, not Redis) GETs a key in a loop on its own
connection. Reports, per run:

* the probe's longest wait for one GET: how long one call blocked Redis
  (target <= 50 ms);
* the create's wall time, and until the actor's first use of the map;
* the child's peak RSS growth while creating the map and using it once,
  over its RSS once the initial value exists in memory, against the map's
  own size (what a fresh process grows by to hold it) (target <= 2x); its
  RSS growth once the actor holds the map; and the map's size in Redis
  (MEMORY USAGE).

``--inline`` runs the same with staging off (every field inside the commit
script, as before staging), to compare.

    PYTHONPATH=src /work/venv/bin/python benchmarks/big_maps.py [--keys 1000000] [--inline]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from redisserver import RedisServer


def child(url: str, keys: int, inline: bool) -> None:
    from caf_sharing import Actor, Node
    from caf_sharing.backends.redis import backend as redis_backend

    if inline:
        redis_backend.STAGE_FIELDS = redis_backend.STAGE_BYTES = 1 << 62
    value = _value(keys)
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    class Big(Actor):
        async def init(self) -> None:
            self.sharing.add_writable_map("m", "m", initial_value=value)

        async def size(self) -> int:
            return len(self.sharing.maps.m)

    async def create() -> tuple[float, float]:
        nonlocal held_kb
        async with Node(url, app="big", restart_grace=False) as node:
            started = time.perf_counter()
            handle = await node.start(Big, "big-admin")
            seconds = time.perf_counter() - started
            # The actor's first use of its map: it holds it now, whether the
            # create kept it or it is read back here.
            assert await handle.call("size") == keys
            first_use = time.perf_counter() - started
            gc.collect()
            held_kb = _current_rss_kb()
            return seconds, first_use

    held_kb = 0
    seconds, first_use = asyncio.run(create())
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "first_use": first_use,
                      "rss_growth_mb": (peak_kb - base_kb) / 1024,
                      "held_mb": (held_kb - base_kb) / 1024}))


def _value(keys: int) -> dict[str, Any]:
    return {f"key:{i:07d}": {"n": i, "tag": "x" * 8} for i in range(keys)}


def map_size(keys: int) -> None:
    """The map's own size: what a fresh process grows by to hold it (a
    SharedMap loaded from its dump, as a replica holds it), which the create's
    peak is judged against. The creating process's RSS once created is no
    measure of it: memory freed meanwhile mostly stays with the process."""
    from caf_sharing import SharedMap

    value = _value(keys)
    add: list[Any] = []
    for key, item in value.items():
        add += (key, item)
    add += ("__ca_version__", 1)
    gc.collect()
    base_kb = _current_rss_kb()
    shared = SharedMap()
    shared.apply_changes({"version": 0, "remove": [], "add": add})
    del add, value
    gc.collect()
    print(json.dumps({"map_mb": (_current_rss_kb() - base_kb) / 1024, "keys": len(shared.ref())}))


def _current_rss_kb() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def probe_while(server: RedisServer, run: Callable[[], str]) -> tuple[str, float]:
    """``run()``'s result, and the longest GET another client waited meanwhile."""
    probe = redis.Redis(port=server.port)
    probe.set("probe", "1")
    worst = 0.0
    done = threading.Event()

    def loop() -> None:
        nonlocal worst
        while not done.is_set():
            started = time.perf_counter()
            probe.get("probe")
            worst = max(worst, time.perf_counter() - started)
            time.sleep(0.001)

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        return run(), worst
    finally:
        done.set()
        thread.join()
        probe.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--inline", action="store_true", help="also run with staging off")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child[2] == "map":
            map_size(int(args.child[1]))
        else:
            child(args.child[0], int(args.child[1]), args.child[2] == "inline")
        return
    map_mb = json.loads(subprocess.run(
        [sys.executable, __file__, "--child", "", str(args.keys), "map"],
        capture_output=True, text=True, check=True).stdout.splitlines()[-1])["map_mb"]
    modes = ["staged", "inline"] if args.inline else ["staged"]
    for mode in modes:
        with RedisServer() as server:
            out, worst = probe_while(server, lambda url=server.url, mode=mode: subprocess.run(
                [sys.executable, __file__, "--child", url, str(args.keys), mode],
                capture_output=True, text=True, check=True).stdout)
            with redis.Redis(port=server.port) as client:
                stored = client.memory_usage("caf:big:{big-admin}:map:big-admin-m",
                                             samples=0) or 0
        result = json.loads(out.splitlines()[-1])
        stored_mb = stored / 2**20
        verdict = "met" if worst <= 0.05 else "MISSED"
        print(f"{mode:>7}: {args.keys} keys in {result['seconds']:.2f}s (first use after "
              f"{result['first_use']:.2f}s); longest GET of "
              f"another client {worst * 1000:.1f} ms (target <= 50: {verdict}); "
              f"client peak RSS +{result['rss_growth_mb']:.0f} MB over the initial value, "
              f"the map alone {map_mb:.0f} MB: {result['rss_growth_mb'] / map_mb:.2f}x "
              f"(target <= 2x); +{result['held_mb']:.0f} MB once the actor holds it; "
              f"map in Redis {stored_mb:.0f} MB")


if __name__ == "__main__":
    main()
