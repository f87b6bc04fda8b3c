"""One writer process against 1, 4 and 16 reader processes (issue 10's M7).

The writer is a Node with ``--maps`` writer actors (20), each message setting
one key of its own map; every reader process is a Node holding a
:class:`~caf_sharing.view.ReplicaView` of each of those maps, so each commit
is one ``SPUBLISH`` that Redis copies to every reader. All of them share one
redis-server of their own. For each reader count R the writer runs for
``--seconds``, two ways:

* (a) unthrottled: every writer actor sends its next message as soon as the
  last one returned;
* (b) paced: the writer offers a fixed rate, ``--pace`` (0.6) of the best
  R=1 rate of (a), which one reader sustains comfortably, to check that the
  readers keep up (their lag: commit to applied, and how far behind they are
  when the writer stops) and whether the writer still gets its rate.

Printed per R: the writer's commits/s; the CPU each side used over the
window, in cores (process CPU seconds / wall: the writer, the readers summed,
redis-server from /proc/<pid>/stat, and the whole machine from /proc/stat,
other processes included); each reader's CPU per received change set;
Redis's own figures (the SPUBLISH and EVALSHA commandstats, its
instantaneous ops/s and the largest subscriber output buffer, sampled mid
window). The verdict names the limit: the machine's CPU (all its cores busy:
contention, readers and writer taking turns) or Redis's fan-out
(redis-server near one core).

With readers that keep up, the verdict also prints what one commit costs at
R=16 on each side, and the cores that holding 70% of the R=1 rate would take.
``--reader-nice N`` runs the readers at a lower priority: the writer then
keeps its rate and the readers fall behind, which shows CPU contention apart
from any limit of Redis.

M7: the writer's commits/s fall by at most 30% from R=1 to R=16, paced (b);
(a) is printed against the same bound. Rounds alternate R=1, 4, 16; each R
keeps its best round.

    PYTHONPATH=src /work/venv/bin/python benchmarks/reader_fanout.py [--rounds 2] [--check]

``--check`` exits 1 when the target is missed. ``--baseline SRC`` runs every
other reader on the caf_sharing of another checkout (``SRC``, its extension
built), so that reader CPU per change set compares side by side under the
same load; ``--profile RATE`` only cProfiles one reader, the writer paced at
RATE, and prints the calls it makes per change set.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import math
import multiprocessing as mp
import os
import pstats
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import caf_sharing
from caf_sharing import Actor, Node
from caf_sharing.view import ReplicaView
from redisserver import RedisServer

READER_COUNTS = (1, 4, 16)
TARGET_FALL = 0.30
_TICK = os.sysconf("SC_CLK_TCK")


class Writer(Actor):
    async def init(self) -> None:
        self.sharing.add_writable_map("m", "m", initial_value={"n": 0})

    async def put(self, n: int) -> None:
        self.sharing.maps.m.set("n", n)


def map_names(count: int) -> list[str]:
    return [f"fan{i}-w-m" for i in range(count)]


# -- child processes -----------------------------------------------------------


async def _recv(conn: Connection) -> Any:
    return await asyncio.to_thread(conn.recv)


async def _writer_main(conn: Connection, url: str, maps: int) -> None:
    async with Node(url, app="fanout", restart_grace=False) as node:
        handles = [await node.start(Writer, name.rsplit("-", 1)[0]) for name in map_names(maps)]
        for handle in handles:
            await handle.call("put", 1)
        conn.send("ready")
        # Each message sets "n" one higher, so that readers know from the
        # final values which versions to wait for.
        values = [1] * len(handles)
        while (command := await _recv(conn))[0] == "run":
            _, seconds, rate = command

            async def loop(index: int, until: float, period: float | None) -> None:
                handle, due = handles[index], time.perf_counter()
                while (now := time.perf_counter()) < until:
                    if period is not None:
                        if due > now:
                            await asyncio.sleep(due - now)
                        due += period
                    await handle.call("put", values[index] + 1)
                    values[index] += 1

            period = None if rate is None else len(handles) / rate
            first = sum(values)
            cpu, started = time.process_time(), time.perf_counter()
            await asyncio.gather(*(loop(i, started + seconds, period)
                                   for i in range(len(handles))))
            wall = time.perf_counter() - started
            conn.send({"commits": sum(values) - first, "wall": wall,
                       "cpu": time.process_time() - cpu,
                       "values": {h.name + "-m": v for h, v in zip(handles, values,
                                                                  strict=True)}})


async def _reader_main(conn: Connection, url: str, names: list[str]) -> None:
    async with Node(url, app="fanout", restart_grace=False) as node:
        conn.send(str(Path(caf_sharing.__file__).parent))
        views: list[ReplicaView] = []
        while (command := await _recv(conn))[0] != "exit":
            if command[0] == "open":
                views = [await node.replica(name) for name in names]
                await asyncio.gather(*(view.wait_for() for view in views))
                conn.send("opened")
            elif command[0] == "close":
                for view in views:
                    await view.close()
                views = []
                conn.send("closed")
            elif command[0] == "start":
                profiler = cProfile.Profile() if command[1] else None
                node.service.propagation_lag.clear()
                stats = node.service.stats
                applied, resyncs = stats.applied, stats.resyncs
                cpu, system, started = (time.process_time(), os.times().system,
                                        time.perf_counter())
                if profiler is not None:
                    profiler.enable()
                conn.send("started")
            elif command[0] == "finish":
                wall, cpu = time.perf_counter() - started, time.process_time() - cpu
                system = os.times().system - system
                profile = ""
                if profiler is not None:
                    profiler.disable()
                    out = io.StringIO()
                    table = pstats.Stats(profiler, stream=out)
                    received = stats.applied - applied
                    calls = table.total_calls  # type: ignore[attr-defined]
                    out.write(f"{calls / max(received, 1):.1f} calls per change set "
                              f"({received} received)\n")
                    table.sort_stats("tottime").print_stats(25)
                    profile = out.getvalue()
                final: dict[str, int] = command[1]
                behind = sum(max(final[v.name] - v.ref().get("n"), 0) for v in views)
                caught = time.perf_counter()
                # Each message adds one to the version and to "n".
                await asyncio.gather(*(
                    v.wait_for(final[v.name] - v.ref().get("n") + v.version, timeout=30)
                    for v in views))
                lags = sorted(x for summary in node.service.propagation_lag.values()
                              for x in summary.recent)
                conn.send({"wall": wall, "cpu": cpu, "system": system, "behind": behind,
                           "catchup": time.perf_counter() - caught,
                           "applied": stats.applied - applied,
                           "resyncs": stats.resyncs - resyncs,
                           "lag50": lags[len(lags) // 2] if lags else 0.0,
                           "lag99": lags[int(len(lags) * 0.99)] if lags else 0.0,
                           "lagmax": lags[-1] if lags else 0.0, "profile": profile})


def _child(role: str, conn: Connection, url: str, arg: Any, nice: int) -> None:
    os.nice(nice)
    main = _writer_main(conn, url, arg) if role == "writer" else _reader_main(conn, url, arg)
    asyncio.run(main)


# -- the parent ----------------------------------------------------------------


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _machine_busy() -> tuple[float, float]:
    """CPU seconds the whole machine spent busy so far (all processes), and
    those of them spent in interrupts (the loopback's packets) or stolen by
    the hypervisor, which no process is charged with."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return (sum(values[:8]) - idle) / _TICK, sum(values[5:8]) / _TICK


def _per_message(read: list[dict[str, Any]]) -> float:
    """Microseconds of CPU per change set applied, over some readers."""
    applied = sum(r["applied"] for r in read)
    return sum(r["cpu"] for r in read) / applied * 1e6 if applied else float("nan")


@dataclass
class Sample:
    readers: int
    rate: float
    writer_cpu: float
    readers_cpu: float
    redis_cpu: float
    #: The whole machine, and of it: interrupts and steal (no process's),
    #: and the processes not in this benchmark.
    machine: float
    unowned: float
    others: float
    us_per_message: float
    #: The share of the readers' CPU spent in the kernel.
    system: float
    #: The same for the readers that run the baseline (every other one).
    base_us_per_message: float
    publish_us: float
    eval_us: float
    ops: int
    omem: int
    lag50: float
    lag99: float
    behind: int
    catchup: float
    resyncs: int
    #: cProfile's figures of the first reader, when asked for.
    profile: str = ""


class Bench:
    def __init__(self, server: RedisServer, maps: int, seconds: float) -> None:
        self.server = server
        self.seconds = seconds
        self.names = map_names(maps)
        self.ctx = mp.get_context("spawn")
        self.processes: list[Any] = []
        self.baseline: str | None = None
        self.writer = self._spawn("writer", maps)
        self.readers: list[Connection] = []
        self.redis = aioredis.Redis(port=server.port)

    def _spawn(self, role: str, arg: Any, src: str | None = None, nice: int = 0) -> Connection:
        ours, theirs = self.ctx.Pipe()
        process = self.ctx.Process(target=_child,
                                   args=(role, theirs, self.server.url, arg, nice), daemon=True)
        saved = sys.path[:]
        if src is not None:  # the child starts with the parent's sys.path
            sys.path.insert(0, src)
        try:
            process.start()
        finally:
            sys.path[:] = saved
        self.processes.append(process)
        return ours

    async def start(self, readers: int, baseline: str | None, nice: int = 0) -> None:
        assert await _recv(self.writer) == "ready"
        self.baseline = baseline
        self.readers = [self._spawn("reader", self.names, baseline if i % 2 else None, nice)
                        for i in range(readers)]
        sources = [await _recv(reader) for reader in self.readers]
        if baseline is not None:
            print(f"readers 0, 2, 4...: {sources[0]}; readers 1, 3, 5...: {sources[1]}")

    async def _ask(self, conns: list[Connection],
                   command: tuple[Any, ...] | list[tuple[Any, ...]]) -> list[Any]:
        """Send ``command`` (or each its own) to ``conns``; their answers."""
        commands = command if isinstance(command, list) else [command] * len(conns)
        for conn, one in zip(conns, commands, strict=True):
            conn.send(one)
        return [await _recv(conn) for conn in conns]

    async def _redis_sample(self) -> tuple[int, int]:
        """Redis's instantaneous ops/s and its largest client output buffer."""
        await asyncio.sleep(self.seconds / 2)
        info = await self.redis.info("stats")
        clients = await self.redis.client_list()
        return int(info["instantaneous_ops_per_sec"]), max(int(c["omem"]) for c in clients)

    async def run(self, count: int, rate: float | None, profile: bool = False) -> Sample:
        active = self.readers[:count]
        await self._ask(active, ("open",))
        await self.redis.config_resetstat()
        await self._ask(active, [("start", profile and i == 0) for i in range(count)])
        redis_cpu, (machine, unowned), ours, started = (
            _proc_cpu(self.server.pid), _machine_busy(), time.process_time(),
            time.perf_counter())
        self.writer.send(("run", self.seconds, rate))
        sampled = asyncio.ensure_future(self._redis_sample())
        wrote = await _recv(self.writer)
        wall = time.perf_counter() - started
        redis_cpu, ours = _proc_cpu(self.server.pid) - redis_cpu, time.process_time() - ours
        machine, unowned = (now - then for now, then in zip(_machine_busy(), (machine, unowned),
                                                             strict=True))
        read = await self._ask(active, ("finish", wrote["values"]))
        ops, omem = await sampled
        stats = await self.redis.info("commandstats")
        await self._ask(active, ("close",))
        publish = stats.get("cmdstat_spublish") or stats.get("cmdstat_publish") or {}
        writer_cpu = wrote["cpu"] / wrote["wall"]
        readers_cpu = sum(r["cpu"] / r["wall"] for r in read)
        return Sample(
            readers=count, rate=wrote["commits"] / wrote["wall"],
            writer_cpu=writer_cpu, readers_cpu=readers_cpu,
            redis_cpu=redis_cpu / wall, machine=machine / wall,
            others=(machine - unowned - ours - redis_cpu) / wall - writer_cpu - readers_cpu,
            unowned=unowned / wall,
            us_per_message=_per_message(read[::2] if self.baseline else read),
            system=sum(r["system"] for r in read) / max(sum(r["cpu"] for r in read), 1e-9),
            base_us_per_message=_per_message(read[1::2] if self.baseline else []),
            publish_us=float(publish.get("usec_per_call", 0.0)),
            eval_us=float(stats.get("cmdstat_evalsha", {}).get("usec_per_call", 0.0)),
            ops=ops, omem=omem,
            lag50=max(r["lag50"] for r in read), lag99=max(r["lag99"] for r in read),
            behind=max(r["behind"] for r in read), catchup=max(r["catchup"] for r in read),
            resyncs=sum(r["resyncs"] for r in read), profile=read[0]["profile"])

    async def close(self) -> None:
        self.writer.send(("exit",))
        for reader in self.readers:
            reader.send(("exit",))
        for process in self.processes:
            await asyncio.to_thread(process.join, 10)
        await self.redis.aclose()


HEADER = (f"{'R':>3} {'commits/s':>10} {'writer':>7} {'readers':>8} {'redis':>6} "
          f"{'machine':>8} {'us/msg':>7} {'sys':>4} {'pub us':>7} {'eval us':>8} {'ops/s':>7} "
          f"{'omem':>7} {'lag p50':>8} {'lag p99':>8} {'behind':>7} {'catchup':>8}")


def show(sample: Sample) -> None:
    print(f"{sample.readers:>3} {sample.rate:>10.0f} {sample.writer_cpu:>7.2f} "
          f"{sample.readers_cpu:>8.2f} {sample.redis_cpu:>6.2f} {sample.machine:>8.2f} "
          f"{sample.us_per_message:>7.1f} {sample.system:>4.0%} {sample.publish_us:>7.2f} "
          f"{sample.eval_us:>8.1f} "
          f"{sample.ops:>7} {sample.omem:>7} {sample.lag50 * 1e3:>6.1f}ms "
          f"{sample.lag99 * 1e3:>6.1f}ms {sample.behind:>7} {sample.catchup * 1e3:>6.0f}ms"
          + (f"  resyncs {sample.resyncs}" if sample.resyncs else "")
          + ("" if math.isnan(sample.base_us_per_message)
             else f"  baseline {sample.base_us_per_message:.1f} us/msg"))


async def measure(bench: Bench, rounds: int, rate: float | None) -> dict[int, Sample]:
    best: dict[int, Sample] = {}
    for _ in range(rounds):
        for count in READER_COUNTS:
            sample = await bench.run(count, rate)
            show(sample)
            if count not in best or sample.rate > best[count].rate:
                best[count] = sample
    return best


def verdict(label: str, best: dict[int, Sample], cores: int) -> bool:
    one, many = best[READER_COUNTS[0]], best[READER_COUNTS[-1]]
    fall = 1 - many.rate / one.rate
    met = fall <= TARGET_FALL
    print(f"{label}: {one.rate:.0f} -> {many.rate:.0f} commits/s, fall {fall:.0%} "
          f"(target <= {TARGET_FALL:.0%}) {'ok' if met else 'MISSED'}")
    limits = []
    if many.machine >= 0.9 * cores:
        limits.append(f"the machine's CPU: {many.machine:.2f} of {cores} cores busy at R=16 "
                      f"(writer {many.writer_cpu:.2f}, readers {many.readers_cpu:.2f}, "
                      f"redis {many.redis_cpu:.2f}, interrupts and steal {many.unowned:.2f}, "
                      f"other processes {many.others:.2f})")
    if many.redis_cpu >= 0.85:
        limits.append(f"Redis's fan-out: redis-server at {many.redis_cpu:.2f} core at R=16")
    if limits:
        print("  limit: " + "; ".join(limits))
    else:
        print(f"  no CPU limit at R=16: machine {many.machine:.2f} of {cores} cores, "
              f"redis-server {many.redis_cpu:.2f} core")
    if many.catchup > 0.5:
        print(f"  the readers fell behind (caught up {many.catchup:.1f} s after the writer "
              "stopped): what they used is not what keeping up costs")
        return met
    # What one commit costs with 16 readers that keep up, all sides
    # together: the cores that holding the target needs.
    per_commit = {side: cpu / many.rate * 1e6 for side, cpu in (
        ("writer", many.writer_cpu), ("readers", many.readers_cpu),
        ("redis", many.redis_cpu), ("interrupts", many.unowned))}
    needed = (1 - TARGET_FALL) * one.rate * sum(per_commit.values()) / 1e6
    print("  CPU per commit at R=16: "
          + ", ".join(f"{side} {us:.0f} us" for side, us in per_commit.items())
          + f"; {1 - TARGET_FALL:.0%} of the R=1 rate needs {needed:.1f} cores, "
          f"this machine has {cores}")
    return met


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--maps", type=int, default=20, help="writer actors, one map each")
    parser.add_argument("--pace", type=float, default=0.6,
                        help="paced rate, as a fraction of the best unthrottled R=1 rate")
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--baseline", metavar="SRC",
                        help="every other reader imports caf_sharing from SRC (another "
                             "checkout's src, extension built): us/msg base is theirs")
    parser.add_argument("--reader-nice", type=int, default=0, metavar="N",
                        help="run the readers at this nice value (the writer at 0)")
    parser.add_argument("--profile", type=float, metavar="RATE",
                        help="only profile one reader (cProfile), the writer paced at RATE")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    with RedisServer() as server:
        bench = Bench(server, args.maps, args.seconds)
        await bench.start(1 if args.profile else max(READER_COUNTS), args.baseline,
                          args.reader_nice)
        try:
            if args.profile:
                sample = await bench.run(1, args.profile, profile=True)
                print(HEADER)
                show(sample)
                print(sample.profile)
                return 0
            print(f"{cores} cores; CPU in cores over each {args.seconds:.0f} s window; us/msg: "
                  "reader CPU per change set applied; pub/eval us: Redis usec_per_call")
            print("(a) writer unthrottled")
            print(HEADER)
            free = await measure(bench, args.rounds, None)
            rate = args.pace * free[READER_COUNTS[0]].rate
            print(f"(b) writer paced at {rate:.0f} commits/s offered "
                  f"({args.pace:.0%} of the unthrottled R=1 rate)")
            print(HEADER)
            paced = await measure(bench, args.rounds, rate)
        finally:
            await bench.close()
    print(f"best of {args.rounds} rounds per R")
    verdict("(a) unthrottled", free, cores)
    met = verdict("M7 (b) paced", paced, cores)
    return 0 if met or not args.check else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
