"""Redis Cluster backend against one Redis server and against raw redis-py.

Starts its own servers on free ports (tests/rediscluster.py,
tests/redisserver.py): a 3-master Redis Cluster without replicas, one plain
redis-server, a one-node cluster, and for a moment a 3-master cluster with a
replica each; runs interleaved rounds of each measurement, keeps the best
round, and removes everything at the end:

* C1  commit throughput: K client processes (K = 1, 2, 4), each a backend
      with 100 writer actors (1-key commits, actors spread over every shard),
      against the 3-shard cluster, against the one server, and against a
      one-node cluster holding every slot (cluster mode without sharding),
      the same K processes taking turns. Reports commits/s, the CPU
      time of the redis-server processes and of the client processes per
      commit (/proc/<pid>/stat and process_time), and the cluster-bus
      PUBLISH/PUBLISHSHARD messages per commit (CLUSTER INFO of every node;
      100 classic PUBLISHes first show that the counters see traffic).
      Targets: cluster >= 1x one server at the same K; bus publish messages
      per commit ~0 (sharded pub/sub with no replicas crosses no bus). Then
      the bus messages once more on 3 masters with a replica each, with
      wait_replicas 0 and 1: ~0 PUBLISH and <= 1 PUBLISHSHARD (to the
      shard's replica) per commit, so that none grows with the cluster.
* C2  propagation on the cluster: commit on backend A -> handler on backend B
      (subscribed to maps of 12 actors, 4 per shard), against raw redis-py
      SPUBLISH -> SSUBSCRIBE of the same payload through the same shards,
      alternating sample by sample: p50 <= 1.5x (p99 reported).
* S1  one Redis 7 server, sharded pub/sub or classic: raw PUBLISH->SUBSCRIBE
      against SPUBLISH->SSUBSCRIBE latency, raw pipelined publish rate, and
      our commit -> handler latency with each verb (``_pubsub.use_sharded``
      on writer and reader); the raw latency once more with bare
      sockets, and the server's time per call, to tell the server from the
      client library. No target: it says which is faster.

    PYTHONPATH=src /work/venv/bin/python benchmarks/compare_cluster.py \
        [--quick] [--rounds 3] [--check]

A full run takes about 80 s, ``--quick`` about 25 s. ``--check`` exits
1 when a target is missed. Client processes, redis-servers and this process
share the machine's cores; the output says how many there are.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import multiprocessing
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.crc import key_slot

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from caf_sharing.backends import Backend, MapWrite, Transaction, make_backend
from caf_sharing.backends.redis import RedisBackend
from rediscluster import CLUSTER_ARGS, RedisCluster
from redisserver import RedisServer, free_port

V = "__ca_version__"
WRITERS_PER_PROCESS = 100
PROCESS_COUNTS = (1, 2, 4)
BUS_FIELDS = ("cluster_stats_messages_publish_sent", "cluster_stats_messages_publishshard_sent")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def transaction(actor: str, version: int, key: str = "k", value: Any = None) -> Transaction:
    txid = f"{actor}:{version}"
    prev = f"{actor}:{version - 1}" if version else None  # commits of an actor chain
    return Transaction(actor=actor, node_id="bench", txid=txid, prev_txid=prev,
                       checkpoint={"txid": txid, "state": None, "maps": []}, lease_ttl=600.0,
                       writes=(MapWrite(f"{actor}-m", {
                           "version": version, "remove": [],
                           "add": [key, value or version, V, version + 1]}),))


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of processes, from /proc/<pid>/stat."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)
    return total / CLK_TCK


async def setup_actors(backend: Backend, actors: Sequence[str]) -> None:
    async def one(actor: str) -> None:
        await backend.acquire_lease(actor, "bench", 600.0)
        await backend.create_map(f"{actor}-m")

    await asyncio.gather(*(one(a) for a in actors))


# -- C1 client processes --------------------------------------------------------

def worker_main(index: int, urls: dict[str, str], conn: Connection) -> None:
    """A client process: one backend per target, its own writer actors; runs
    a timed burst of commits on the target each command names."""
    asyncio.run(_worker(index, urls, conn))


async def _worker(index: int, urls: dict[str, str], conn: Connection) -> None:
    actors = [f"p{index}w{i}-a" for i in range(WRITERS_PER_PROCESS)]
    backends = {name: RedisBackend(url, app="c1", restart_grace=False)
                for name, url in urls.items()}
    versions = {name: dict.fromkeys(actors, 0) for name in urls}
    for backend in backends.values():
        await backend.start()
        await setup_actors(backend, actors)
    conn.send("ready")
    while True:
        command = await asyncio.to_thread(conn.recv)
        if command is None:
            break
        target, start_at, duration = command
        backend, done = backends[target], versions[target]
        before, trips = sum(done.values()), backend.stats.round_trips
        await asyncio.sleep(max(0.0, start_at - time.time()))
        cpu, started = time.process_time(), time.time()
        refused = await asyncio.gather(*(writer(backend, done, a, start_at + duration)
                                         for a in actors))
        elapsed, cpu = time.time() - started, time.process_time() - cpu
        conn.send((sum(done.values()) - before, elapsed, cpu, sum(refused),
                   backend.stats.round_trips - trips))
    for backend in backends.values():
        await backend.close()


async def writer(backend: Backend, versions: dict[str, int], actor: str, end: float) -> int:
    """Commit as ``actor`` until ``end`` (wall clock); returns the commits refused."""
    refused = 0
    while time.time() < end:
        v = versions[actor]
        if not await backend.commit(transaction(actor, v)):
            refused += 1
        versions[actor] = v + 1
    return refused


@dataclass
class Burst:
    commits: int
    rate: float  # commits/s, summed over the processes
    server_cpu: float  # seconds
    client_cpu: float  # seconds
    bus: dict[str, int]  # CLUSTER INFO field -> messages sent during the burst
    refused: int
    round_trips: int  # commit round trips (pipelines), all processes


def cluster_info(node: RedisServer) -> dict[str, str]:
    """``CLUSTER INFO`` of one node as a dict of strings."""
    with node.client() as client:
        reply = client.execute_command("CLUSTER INFO")
    if isinstance(reply, dict):
        return {str(k): str(v) for k, v in reply.items()}
    text = reply.decode() if isinstance(reply, bytes) else str(reply)
    return dict(line.strip().split(":", 1) for line in text.splitlines() if ":" in line)


@dataclass(frozen=True)
class Target:
    """What the client processes write to: its URL, the pids of its
    redis-servers, and the nodes whose cluster bus is counted."""

    url: str
    pids: list[int]
    bus_nodes: list[RedisServer]


def one_shard_cluster() -> RedisServer:
    """A cluster of one master holding every slot: cluster mode without the
    sharding, to tell its cost apart from the cost of three shards."""
    node = RedisServer([*CLUSTER_ARGS, "--cluster-port", str(free_port())])
    try:
        node.start()
        with node.client() as client:
            client.execute_command("CLUSTER ADDSLOTSRANGE", 0, 16383)
        deadline = time.monotonic() + 10
        while cluster_info(node).get("cluster_state") != "ok":
            if time.monotonic() > deadline:
                raise RuntimeError("the one-shard cluster did not come up within 10 s")
            time.sleep(0.02)
    except BaseException:
        node.cleanup()
        raise
    return node


class Throughput:
    """The client processes and the servers they write to."""

    def __init__(self, targets: dict[str, Target], duration: float) -> None:
        self.targets = targets
        self.duration = duration
        urls = {name: t.url for name, t in targets.items()}
        ctx = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs = []
        for i in range(max(PROCESS_COUNTS)):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(i, urls, theirs), daemon=True)
            proc.start()
            self.conns.append(ours)
            self.procs.append(proc)
        for conn in self.conns:
            if not conn.poll(120):
                raise RuntimeError("a client process did not get ready within 120 s")
            conn.recv()

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):  # that process may be gone already
                conn.send(None)
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()

    @staticmethod
    def bus_counts(nodes: list[RedisServer]) -> dict[str, int]:
        totals = dict.fromkeys(BUS_FIELDS, 0)
        for node in nodes:
            info = cluster_info(node)
            for field in BUS_FIELDS:
                totals[field] += int(info.get(field, 0))
        return totals

    def burst(self, name: str, k: int) -> Burst:
        target = self.targets[name]
        start_at = time.time() + 0.2
        bus = self.bus_counts(target.bus_nodes)
        for conn in self.conns[:k]:
            conn.send((name, start_at, self.duration))
        time.sleep(max(0.0, start_at - time.time()))
        cpu = cpu_seconds(target.pids)
        results = []
        for i, conn in enumerate(self.conns[:k]):
            # A hung commit would otherwise hang the benchmark.
            if not conn.poll(self.duration + 60):
                raise RuntimeError(f"client process {i} did not report within "
                                   f"{self.duration + 60:g} s of its {name} burst")
            results.append(conn.recv())
        cpu = cpu_seconds(target.pids) - cpu
        after = self.bus_counts(target.bus_nodes)
        return Burst(commits=sum(r[0] for r in results),
                     rate=sum(r[0] / r[1] for r in results), server_cpu=cpu,
                     client_cpu=sum(r[2] for r in results),
                     bus={f: after[f] - bus[f] for f in BUS_FIELDS},
                     refused=sum(r[3] for r in results),
                     round_trips=sum(r[4] for r in results))

    def run(self, rounds: int) -> dict[tuple[str, int], Burst]:
        best: dict[tuple[str, int], Burst] = {}
        names = list(self.targets)
        for k in PROCESS_COUNTS:
            for round_ in range(rounds):
                for name in names[::1 if round_ % 2 == 0 else -1]:
                    result = self.burst(name, k)
                    kept = best.get((name, k))
                    if kept is None or result.rate > kept.rate:
                        best[name, k] = result
        return best


async def replica_bus(commits_per_actor: int) -> dict[int, tuple[int, dict[str, int]]]:
    """Cluster-bus publish messages of 100 writers on 3 masters with one
    replica each, with wait_replicas 0 and 1: {wait_replicas: (commits,
    messages sent by every node, by CLUSTER INFO field)}."""
    out = {}
    with RedisCluster(masters=3, replicas_per_master=1) as cluster:
        for wait in (0, 1):
            backend = make_backend(cluster.url, app=f"bus{wait}", restart_grace=False,
                                   wait_replicas=wait)
            await backend.start()
            actors = [f"r{i}-a" for i in range(WRITERS_PER_PROCESS)]
            await setup_actors(backend, actors)
            before = Throughput.bus_counts(cluster.nodes)
            for v in range(commits_per_actor):
                await asyncio.gather(*(backend.commit(transaction(a, v)) for a in actors))
            after = Throughput.bus_counts(cluster.nodes)
            await backend.close()
            out[wait] = (commits_per_actor * len(actors),
                         {f: after[f] - before[f] for f in BUS_FIELDS})
    return out


# -- C2 and S1: propagation latency ------------------------------------------------

class Arrival:
    """Times the next message a handler or raw subscriber sees."""

    def __init__(self) -> None:
        self.future: asyncio.Future[float] | None = None
        self.payload = b""

    def expect(self) -> asyncio.Future[float]:
        self.future = asyncio.get_running_loop().create_future()
        return self.future

    def __call__(self, payload: bytes) -> None:
        self.payload = payload
        if self.future is not None and not self.future.done():
            self.future.set_result(time.perf_counter())


async def listen(pubsub: aioredis.client.PubSub, arrival: Arrival) -> None:
    async for message in pubsub.listen():
        if message["type"] in ("message", "smessage"):
            arrival(message["data"])


class Writer:
    """Our side of a latency pair: commits of a set of actors on ``a``,
    seen by a handler on ``b``."""

    def __init__(self, a: Backend, b: Backend, actors: list[str]) -> None:
        self.a, self.b, self.actors = a, b, actors
        self.versions = dict.fromkeys(actors, 0)
        self.arrival = Arrival()
        self.i = 0

    async def setup(self) -> None:
        await setup_actors(self.a, self.actors)
        for actor in self.actors:
            await self.b.subscribe(f"{actor}-m", self.arrival)

    async def sample(self) -> float:
        actor = self.actors[self.i % len(self.actors)]
        self.i += 1
        v = self.versions[actor]
        arrived = self.arrival.expect()
        started = time.perf_counter()
        await self.a.commit(transaction(actor, v))
        elapsed = await arrived - started
        self.versions[actor] = v + 1
        return elapsed


class Raw:
    """The raw side of a latency pair: ``publish`` on one of several
    (publisher client, channel) pairs, timed to any of the subscribers."""

    def __init__(self, verb: str, routes: list[tuple[aioredis.Redis, str]],
                 payload: Callable[[], bytes]) -> None:
        self.verb, self.routes, self.payload = verb, routes, payload
        self.arrival = Arrival()
        self.i = 0

    async def sample(self) -> float:
        client, channel = self.routes[self.i % len(self.routes)]
        self.i += 1
        arrived = self.arrival.expect()
        started = time.perf_counter()
        await client.execute_command(self.verb, channel, self.payload())
        return await arrived - started


async def alternate(sides: dict[str, Callable[[], Any]], rounds: int, samples: int
                    ) -> dict[str, tuple[float, float]]:
    """Rounds of samples, the sides taking turns in a rotating order; returns
    the best round's (p50, p99) of each side, in µs."""
    names = list(sides)
    per_round: dict[str, list[list[float]]] = {n: [] for n in names}
    for _ in range(rounds):
        gc.collect()
        got: dict[str, list[float]] = {n: [] for n in names}
        for i in range(samples):
            shift = i % len(names)
            for name in names[shift:] + names[:shift]:
                got[name].append(await sides[name]())
        for name in names:
            per_round[name].append(got[name])
    return {n: (min(statistics.median(r) for r in per_round[n]) * 1e6,
                min(percentile(r, 0.99) for r in per_round[n]) * 1e6) for n in names}


def spread_actors(cluster: RedisCluster, prefix: str, per_shard: int) -> list[str]:
    """Actor names, ``per_shard`` on each master, interleaved by shard."""
    by_port: dict[int, list[str]] = {m.port: [] for m in cluster.masters()}
    i = 0
    while any(len(v) < per_shard for v in by_port.values()):
        actor = f"{prefix}{i}-a"
        i += 1
        port = cluster.node_for_slot(key_slot(actor.encode())).port
        if len(by_port[port]) < per_shard:
            by_port[port].append(actor)
    return [a for group in zip(*by_port.values(), strict=True) for a in group]


async def cluster_latency(cluster: RedisCluster, rounds: int, samples: int
                          ) -> dict[str, tuple[float, float]]:
    a = make_backend(cluster.url, app="c2", restart_grace=False)
    b = make_backend(cluster.url, app="c2", restart_grace=False)
    for backend in (a, b):
        await backend.start()
    ours = Writer(a, b, spread_actors(cluster, "lat", 4))
    await ours.setup()
    clients: list[aioredis.Redis] = []
    pubsubs: list[aioredis.client.PubSub] = []
    routes: list[tuple[aioredis.Redis, str]] = []
    raw = Raw("SPUBLISH", routes, lambda: ours.arrival.payload)
    for actor in ours.actors:  # the same slots as ours, so the same shards
        node = cluster.node_for_slot(key_slot(actor.encode()))
        pub = aioredis.Redis(host="127.0.0.1", port=node.port)
        sub = aioredis.Redis(host="127.0.0.1", port=node.port)
        pubsub = sub.pubsub()
        channel = f"raw:{{{actor}}}:chan"
        await pubsub.ssubscribe(channel)
        clients += [pub, sub]
        pubsubs.append(pubsub)
        routes.append((pub, channel))
    readers = [asyncio.create_task(listen(p, raw.arrival)) for p in pubsubs]
    try:
        for _ in range(3 * len(ours.actors)):  # warm up; ours first: raw sends its payload
            await ours.sample()
            await raw.sample()
        return await alternate({"ours": ours.sample, "raw": raw.sample}, rounds, samples)
    finally:
        for task in readers:
            task.cancel()
        for pubsub in pubsubs:
            await pubsub.aclose()
        for client in clients:
            await client.aclose()
        await a.close()
        await b.close()


async def single_pubsub(server: RedisServer, rounds: int, samples: int, writes: int
                        ) -> tuple[dict[str, tuple[float, float]], dict[str, float]]:
    backends = [make_backend(server.url, app="s1", restart_grace=False) for _ in range(4)]
    for backend in backends:
        await backend.start()
    ws, rs, wc, rc = backends
    assert ws._pubsub.publish == "SPUBLISH", "Redis 7 should get SPUBLISH"  # type: ignore[attr-defined]
    wc._pubsub.use_sharded(False)  # type: ignore[attr-defined]
    rc._pubsub.use_sharded(False)  # type: ignore[attr-defined]
    sharded = Writer(ws, rs, ["ss-a"])
    classic = Writer(wc, rc, ["sc-a"])
    for writer in (sharded, classic):
        await writer.setup()
    pub = aioredis.Redis(host="127.0.0.1", port=server.port)
    sub = aioredis.Redis(host="127.0.0.1", port=server.port)
    ssub = aioredis.Redis(host="127.0.0.1", port=server.port)
    ps_c, ps_s = sub.pubsub(), ssub.pubsub()
    await ps_c.subscribe("raw-c", *(f"rate-c{i}" for i in range(100)))
    await ps_s.ssubscribe("raw-s", *(f"rate-s{i}" for i in range(100)))
    raw_c = Raw("PUBLISH", [(pub, "raw-c")], lambda: sharded.arrival.payload)
    raw_s = Raw("SPUBLISH", [(pub, "raw-s")], lambda: sharded.arrival.payload)
    readers = [asyncio.create_task(listen(ps_c, raw_c.arrival)),
               asyncio.create_task(listen(ps_s, raw_s.arrival))]

    async def rate(verb: str, prefix: str) -> float:
        started = time.perf_counter()
        for _ in range(writes):
            pipe = pub.pipeline(transaction=False)
            for i in range(100):
                pipe.execute_command(verb, f"{prefix}{i}", sharded.arrival.payload)
            await pipe.execute()
        return 100 * writes / (time.perf_counter() - started)

    try:
        for _ in range(20):
            await sharded.sample()
            await classic.sample()
            await raw_c.sample()
            await raw_s.sample()
        lat = await alternate({"ours SPUBLISH": sharded.sample, "ours PUBLISH": classic.sample,
                               "raw SPUBLISH": raw_s.sample, "raw PUBLISH": raw_c.sample},
                              rounds, samples)
        rates: dict[str, float] = {"SPUBLISH": 0.0, "PUBLISH": 0.0}
        for round_ in range(rounds):
            for verb, prefix in [("SPUBLISH", "rate-s"), ("PUBLISH", "rate-c")][
                    ::1 if round_ % 2 == 0 else -1]:
                gc.collect()
                rates[verb] = max(rates[verb], await rate(verb, prefix))
        return lat | socket_pubsub(server, rounds, samples, sharded.arrival.payload), rates
    finally:
        for task in readers:
            task.cancel()
        for pubsub in (ps_c, ps_s):
            await pubsub.aclose()
        for client in (pub, sub, ssub):
            await client.aclose()
        for backend in backends:
            await backend.close()


def resp(*args: str | bytes) -> bytes:
    """A command in RESP, for the bare-socket measurement."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def socket_pubsub(server: RedisServer, rounds: int, samples: int, payload: bytes
                  ) -> dict[str, tuple[float, float]]:
    """S1 without any client library: blocking sockets, one publisher, one
    SUBSCRIBE and one SSUBSCRIBE connection; returns (p50, p99) in µs, and
    the server's own time per call (INFO commandstats) under "server"."""
    def connect() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    pub, sub, ssub = connect(), connect(), connect()
    try:
        sub.sendall(resp("SUBSCRIBE", "sock-c"))
        ssub.sendall(resp("SSUBSCRIBE", "sock-s"))
        sub.recv(4096), ssub.recv(4096)
        with server.client() as client:
            client.config_resetstat()
        sides = {"PUBLISH": ("sock-c", sub), "SPUBLISH": ("sock-s", ssub)}
        per_round: dict[str, list[list[float]]] = {v: [] for v in sides}
        for _ in range(rounds):
            got: dict[str, list[float]] = {v: [] for v in sides}
            for i in range(samples):
                for verb in list(sides)[::1 if i % 2 else -1]:
                    channel, reader = sides[verb]
                    started = time.perf_counter()
                    pub.sendall(resp(verb, channel, payload))
                    reader.recv(65536)  # one small message: one read
                    got[verb].append(time.perf_counter() - started)
                    pub.recv(64)
            for verb in sides:
                per_round[verb].append(got[verb])
        with server.client() as client:
            stats = client.info("commandstats")
    finally:
        for sock in (pub, sub, ssub):
            sock.close()
    out = {f"socket {v}": (min(statistics.median(r) for r in per_round[v]) * 1e6,
                           min(percentile(r, 0.99) for r in per_round[v]) * 1e6)
           for v in sides}
    for verb in sides:
        out[f"server {verb}"] = (float(stats[f"cmdstat_{verb.lower()}"]["usec_per_call"]), 0.0)
    return out


# -- report ---------------------------------------------------------------------------

def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def report_c1(best: dict[tuple[str, int], Burst], duration: float) -> bool:
    met = True
    print(f"C1  commit throughput, {WRITERS_PER_PROCESS} writer actors per client process, "
          f"{duration:g} s bursts; CPU per commit in µs (server: all redis-server "
          "processes of the target); cluster1 = one node holding all 16384 slots")
    for k in PROCESS_COUNTS:
        for name in ("1 server", "cluster1", "cluster3"):
            b = best[name, k]
            per = 1e6 / max(b.commits, 1)
            refused = f"  REFUSED {b.refused}" if b.refused else ""
            print(f"    K={k} {name:<8} {b.rate:7.0f} commits/s  server CPU "
                  f"{b.server_cpu * per:5.1f} µs ({b.server_cpu / duration:4.0%} of a core)  "
                  f"client CPU {b.client_cpu * per:5.1f} µs  "
                  f"{b.commits / max(b.round_trips, 1):4.1f} commits/round trip{refused}")
            met = met and not b.refused
        single, cluster = best["1 server", k], best["cluster3", k]
        bus = sum(cluster.bus.values()) / max(cluster.commits, 1)
        print(f"        cluster3 bus: {cluster.bus[BUS_FIELDS[0]]} publish + "
              f"{cluster.bus[BUS_FIELDS[1]]} publishshard messages sent, {bus:.3f} per commit")
        ratio = cluster.rate / single.rate
        ok, bus_ok = ratio >= 1.0, bus <= 0.01
        met = met and ok and bus_ok
        print(f"    K={k} cluster3 / 1 server {ratio:5.2f}x  target >= 1x {verdict(ok)}; "
              f"cluster1 / 1 server {best['cluster1', k].rate / single.rate:5.2f}x; "
              f"bus publish messages ~0 per commit {verdict(bus_ok)}")
    return met


def report_replica_bus(counts: dict[int, tuple[int, dict[str, int]]]) -> bool:
    """Sharded messages go to the shard's own replica (1 per commit here);
    anything sent to every node grows with the cluster."""
    print("C1  cluster bus with replicas: 3 masters + 1 replica each, 100 writers, "
          "messages sent by all 6 nodes")
    met = True
    for wait, (commits, bus) in counts.items():
        publish, shard = bus[BUS_FIELDS[0]] / commits, bus[BUS_FIELDS[1]] / commits
        ok = publish <= 0.01 and shard <= 1.01
        met = met and ok
        print(f"    wait_replicas={wait}: {commits} commits, {publish:.3f} publish + "
              f"{shard:.3f} publishshard messages per commit  target ~0 + <= 1 "
              f"(one per replica of the shard) {verdict(ok)}")
    return met


def report_latency(title: str, lat: dict[str, tuple[float, float]],
                   pairs: list[tuple[str, str, float | None]]) -> bool:
    print(title)
    for name, (p50, p99) in lat.items():
        print(f"    {name:<16} p50 {p50:7.1f} µs   p99 {p99:7.1f} µs")
    met = True
    for ours, ref, target in pairs:
        r50, r99 = lat[ours][0] / lat[ref][0], lat[ours][1] / lat[ref][1]
        line = f"    {ours} / {ref}: p50 {r50:5.2f}x  p99 {r99:5.2f}x"
        if target is not None:
            ok = r50 <= target
            met = met and ok
            line += f"  target p50 <= {target:g}x {verdict(ok)}"
        print(line)
    return met


async def main(rounds: int, samples: int, writes: int, duration: float) -> bool:
    print(f"{os.cpu_count()} CPU cores shared by the redis-servers, the client processes "
          "and this one: the figures measure contention as much as capacity.")
    with RedisCluster(masters=3) as cluster, RedisServer() as server:
        print(f"cluster: 3 masters, no replicas, ports "
              f"{[n.port for n in cluster.masters()]}; single server: port {server.port}; "
              f"{rounds} interleaved rounds, best kept")
        lat_c2 = await cluster_latency(cluster, rounds, samples)
        bus_replicas = await replica_bus(10 if rounds < 3 else 20)
        lat_s1, rates_s1 = await single_pubsub(server, rounds, samples, writes)
        # The bus counters can see traffic: a classic PUBLISH goes to every node.
        before = Throughput.bus_counts(cluster.masters())
        with cluster.client(cluster.masters()[0]) as client:
            for _ in range(100):
                client.publish("bus-calibration", b"x")
        calibration = Throughput.bus_counts(cluster.masters())[BUS_FIELDS[0]] \
            - before[BUS_FIELDS[0]]
        shard = one_shard_cluster()
        try:
            bench = Throughput({
                "1 server": Target(server.url, [server.pid], []),
                "cluster1": Target(f"redis+cluster://127.0.0.1:{shard.port}", [shard.pid],
                                   [shard]),
                "cluster3": Target(cluster.url, [n.pid for n in cluster.nodes],
                                   cluster.masters())}, duration)
            try:
                best = bench.run(rounds)
            finally:
                bench.close()
        finally:
            shard.cleanup()
    print(f"calibration: 100 classic PUBLISH on one cluster3 node -> {calibration} "
          "publish messages sent on the cluster bus")
    met = report_c1(best, duration)
    met = report_replica_bus(bus_replicas) and met
    met = report_latency("C2  cluster: commit on A -> handler on B (12 actors, 4 per shard) "
                         "vs raw SPUBLISH -> SSUBSCRIBE", lat_c2,
                         [("ours", "raw", 1.5)]) and met
    server_s1 = {k: lat_s1.pop(k)[0] for k in list(lat_s1) if k.startswith("server ")}
    report_latency("S1  one Redis 7 server: sharded vs classic pub/sub (raw: redis-py; "
                   "socket: bare blocking sockets)", lat_s1,
                   [("socket SPUBLISH", "socket PUBLISH", None),
                    ("raw SPUBLISH", "raw PUBLISH", None),
                    ("ours SPUBLISH", "ours PUBLISH", None),
                    ("ours SPUBLISH", "raw SPUBLISH", None),
                    ("ours PUBLISH", "raw PUBLISH", None)])
    print(f"    raw pipelined rate (100 per pipeline, 1 subscriber): SPUBLISH "
          f"{rates_s1['SPUBLISH']:.0f}/s, PUBLISH {rates_s1['PUBLISH']:.0f}/s, "
          f"ratio {rates_s1['SPUBLISH'] / rates_s1['PUBLISH']:.2f}x")
    print(f"    server time per call (INFO commandstats, socket runs): SPUBLISH "
          f"{server_s1['server SPUBLISH']:.2f} µs, PUBLISH {server_s1['server PUBLISH']:.2f} µs")
    return met


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds (~30 s)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3, quick 2)")
    parser.add_argument("--samples", type=int, help="latency samples per side and round")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args()
    quick = args.quick
    met = asyncio.run(main(rounds=args.rounds or (2 if quick else 3),
                           samples=args.samples or (200 if quick else 1000),
                           writes=10 if quick else 50, duration=0.6 if quick else 2.0))
    sys.exit(1 if args.check and not met else 0)
