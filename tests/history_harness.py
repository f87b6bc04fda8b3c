"""Runs a multi-process history on a real Redis under faults, then judges it.

One writer process and ``readers`` reader processes (``history_worker.py``;
the first hosts two reader actors, for fairness, the others one, so that a
reader is sometimes the only one of its map on its node) run against a Redis
server (or cluster) of the run's own, while the harness injects one fault every
``fault_every`` seconds, in turn from ``faults``:

* ``kill_writer`` — SIGKILL the writer process; a new one takes the actor
  over once the lease expires;
* ``pause_writer`` — SIGSTOP the writer for 2.5 lease TTLs while a new one
  takes over, then SIGCONT it: it must be fenced off;
* ``restart_reader`` — SIGUSR1 to a reader process (each in turn): it stops
  and restarts its first reader actor, which reopens the maps;
* ``kill_pubsub`` — ``CLIENT KILL TYPE pubsub``: every subscriber resyncs;
* ``redis_empty`` — restart Redis empty (no persistence);
* ``redis_empty_second_node`` — the same, and a second writer process starts
  at once, racing the running one for the actor on the empty store;
* ``redis_older`` — restart Redis from a snapshot ``SAVE``\\ d two faults
  earlier (RDB without AOF).

With ``cluster=True`` the store is a Redis Cluster of 3 masters with one
replica each (``rediscluster.RedisCluster``) instead of one server, and the
faults are the actor faults above, ``kill_pubsub`` (on every node) and the
cluster's own, on the shard of the writer actor (its keys, its maps' and
their channels share the hash tag ``{w-writer}``, so one slot):

* ``migrate_writer_slot`` — move that slot to another master the way
  redis-cli reshards, with commits running: ``MIGRATING``/``IMPORTING``,
  then the slot's keys one at a time with a pause between (commits meet
  ``TRYAGAIN``, reads ``ASK``), then ``SETSLOT NODE`` everywhere;
* ``failover_writer_shard`` — ``CLUSTER FAILOVER`` on the replica of the
  slot's master: a planned failover, which loses no write.

The data-loss faults of one server (``DATA_LOSS_FAULTS``) are not run on a
cluster: a cluster node restarted empty or from an old snapshot is a
different fault (a master without replicas losing its shard), out of scope
here. The actors are placed so that the readers and the writer start on at
least two shards (``placement.json`` in the workdir says where), and
``redis_errors.json`` counts the error replies the nodes sent (``TRYAGAIN``,
``ASK``, ``MOVED``...).

A writer process is always running: when the last one exits (it lost the
actor) or was killed, a new incarnation starts. After ``seconds`` the harness
lets the processes settle, stops them with SIGTERM, reads the store's final
state and checks every record with :func:`history.check_history`.

Before lineage (issue 8), ``RESYNC_FAULTS`` made readers now and then install
``m`` and ``m2`` from different messages, and ``DATA_LOSS_FAULTS`` broke most
guarantees; with it, every fault here must leave no violation.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

import caf_sharing
from caf_sharing import Node
from caf_sharing.errors import MapNotFoundError, SharingError
from history import HistoryReport, check_history, load_history
from history_worker import NODE_OPTIONS, WRITER, FinalReader, reader_name
from rediscluster import RedisCluster
from redisserver import RedisServer

__all__ = ["ACTOR_FAULTS", "ALL_FAULTS", "CLUSTER_ALL_FAULTS", "CLUSTER_FAULTS",
           "CLUSTER_FAULT_GROUPS", "DATA_LOSS_FAULTS", "FAULT_GROUPS", "RESYNC_FAULTS",
           "HistoryRun", "HistoryRunError", "run_history"]

ACTOR_FAULTS = ("kill_writer", "pause_writer", "restart_reader")
RESYNC_FAULTS = ("kill_pubsub",)
DATA_LOSS_FAULTS = ("redis_empty", "redis_older", "redis_empty_second_node")
ALL_FAULTS = ACTOR_FAULTS + RESYNC_FAULTS + DATA_LOSS_FAULTS
FAULT_GROUPS = {"actor": ACTOR_FAULTS, "resync": RESYNC_FAULTS,
                "data-loss": DATA_LOSS_FAULTS, "all": ALL_FAULTS}
CLUSTER_FAULTS = ("migrate_writer_slot", "failover_writer_shard")
CLUSTER_ALL_FAULTS = ACTOR_FAULTS + RESYNC_FAULTS + CLUSTER_FAULTS
CLUSTER_FAULT_GROUPS = {"actor": ACTOR_FAULTS, "resync": RESYNC_FAULTS,
                        "cluster": CLUSTER_FAULTS, "all": CLUSTER_ALL_FAULTS}

#: Pause between two keys of a migrating slot: commits meet the slot half moved.
MIGRATE_KEY_PAUSE = 0.05

WORKER = Path(__file__).with_name("history_worker.py")
#: Where the caf_sharing under test lives, so that workers import the same one.
SOURCE_ROOT = Path(caf_sharing.__file__).resolve().parent.parent


class HistoryRunError(RuntimeError):
    """The run itself went wrong (a worker crashed, the final state is unreadable)."""


@dataclass
class HistoryRun:
    """One run's settings; ``workdir`` receives every log and the final state."""

    workdir: Path
    seconds: float = 15.0
    faults: Sequence[str] = ACTOR_FAULTS
    readers: int = 2
    lease_ttl: float = 1.0
    fault_every: float = 2.0
    writer_pause: float = 0.005
    reader_pause: float = 0.01
    #: Quiet time after the last fault before the processes are stopped.
    settle: float = 3.0
    #: A Redis Cluster (3 masters, a replica each) rather than one server.
    cluster: bool = False
    app: str = field(default_factory=lambda: f"h{uuid.uuid4().hex[:8]}")

    @property
    def known_faults(self) -> tuple[str, ...]:
        return CLUSTER_ALL_FAULTS if self.cluster else ALL_FAULTS

    def __post_init__(self) -> None:
        unknown = [name for name in self.faults if name not in self.known_faults]
        if unknown:
            where = "a cluster" if self.cluster else "one server"
            raise ValueError(f"unknown faults {unknown} on {where}; known: "
                             f"{', '.join(self.known_faults)}")
        if self.readers < 1:
            raise ValueError(f"readers must be >= 1, got {self.readers}")
        for name in ("seconds", "lease_ttl", "fault_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")


class _Harness:
    def __init__(self, run: HistoryRun, store: RedisServer | RedisCluster) -> None:
        self.run = run
        self.store = store
        self.migrations = 0
        self.writers: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.readers: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.incarnations = 0
        self.reader_restarts = 0
        self.snapshots: list[Path] = []
        self.thaws: set[asyncio.Task[None]] = set()
        self.frozen: set[int] = set()
        self.faults_log = run.workdir / "faults.jsonl"
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(SOURCE_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}

    # -- processes -------------------------------------------------------------

    def spawn(self, role: str, proc: str, pause: float,
              actors: int = 1) -> subprocess.Popen[bytes]:
        run = self.run
        with (run.workdir / f"{proc}.err").open("wb") as stderr:
            return subprocess.Popen(
                [sys.executable, str(WORKER), role, self.store.url, run.app,
                 str(run.workdir / f"{proc}.jsonl"), "--proc", proc,
                 "--lease-ttl", str(run.lease_ttl), "--pause", str(pause),
                 "--actors", str(actors)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                env=self.env)

    def spawn_writer(self) -> None:
        self.incarnations += 1
        proc = f"w{self.incarnations}"
        self.writers.append((proc, self.spawn("writer", proc, self.run.writer_pause)))

    def live_writers(self) -> list[tuple[str, subprocess.Popen[bytes]]]:
        return [(proc, popen) for proc, popen in self.writers if popen.poll() is None]

    def check_exits(self) -> None:
        """Fail on a worker that died of anything but a fault or a lost actor."""
        for proc, popen in (*self.writers, *self.readers):
            code = popen.poll()
            if code not in (None, 0, 3, -signal.SIGKILL):
                tail = (self.run.workdir / f"{proc}.err").read_text(errors="replace")[-3000:]
                raise HistoryRunError(f"worker {proc} exited with {code}: {tail}")

    async def supervise(self) -> None:
        while True:
            self.check_exits()
            if not self.live_writers():
                self.spawn_writer()
            await asyncio.sleep(0.2)

    # -- faults ------------------------------------------------------------------

    def record_fault(self, name: str, **detail: Any) -> None:
        with self.faults_log.open("ab") as out:
            out.write(orjson.dumps({"kind": "fault", "fault": name, "t": time.time(),
                                    **detail}) + b"\n")

    async def thaw_later(self, popen: subprocess.Popen[bytes], delay: float) -> None:
        await asyncio.sleep(delay)
        self.frozen.discard(popen.pid)
        if popen.poll() is None:
            os.kill(popen.pid, signal.SIGCONT)

    def active_writer(self) -> tuple[str, subprocess.Popen[bytes] | None]:
        """The live writer that logged last (the one committing), else the newest."""
        def logged(item: tuple[str, subprocess.Popen[bytes]]) -> float:
            log = self.run.workdir / f"{item[0]}.jsonl"
            return log.stat().st_mtime if log.exists() else 0.0
        live = [item for item in self.live_writers() if item[1].pid not in self.frozen]
        if not live:
            return "", None
        return max(reversed(live), key=logged)

    def reader_ready(self) -> bool:
        """Whether every reader logged a record, so it handles SIGUSR1 by now."""
        return all((self.run.workdir / f"{proc}.jsonl").exists() for proc, _ in self.readers)

    def reader_procs(self) -> list[tuple[str, int]]:
        """(process, how many reader actors it hosts) of every reader process."""
        return [(f"r{i}", 2 if i == 0 else 1) for i in range(self.run.readers)]

    def place(self) -> None:
        """Write where each actor's keys are; on a cluster, refuse a run whose
        actors would all share one shard (nothing would cross shards)."""
        actors = [WRITER, *(reader_name(proc, i) for proc, count in self.reader_procs()
                            for i in range(count))]
        if isinstance(self.store, RedisCluster):
            cluster = self.store
            placement = {actor: cluster.node_for_slot(cluster.key_slot(actor)).port
                         for actor in actors}
            if len(set(placement.values())) < 2:
                raise HistoryRunError(f"every actor is on one shard: {placement}; "
                                      "run more readers")
        else:
            placement = dict.fromkeys(actors, self.store.port)
        (self.run.workdir / "placement.json").write_bytes(orjson.dumps(placement))

    def nodes(self) -> list[RedisServer]:
        store = self.store
        return store.masters() + store.replicas() if isinstance(store, RedisCluster) \
            else [store]

    def kill_pubsub(self) -> int:
        return sum(node.kill_pubsub_clients() for node in self.nodes())

    def save_error_replies(self) -> None:
        """Write the error replies the nodes sent, by kind (``INFO errorstats``:
        TRYAGAIN, ASK, MOVED...), so a run shows what its faults made the
        clients meet."""
        counts: Counter[str] = Counter()
        for node in self.nodes():
            with node.client() as client:
                for stat, value in client.info("errorstats").items():
                    counts[stat.removeprefix("errorstat_")] += value["count"]
        (self.run.workdir / "redis_errors.json").write_bytes(orjson.dumps(dict(counts)))

    def migrate_writer_slot(self, cluster: RedisCluster) -> dict[str, Any]:
        """Move the writer's slot to another master (each in turn), a key at a time."""
        slot = cluster.key_slot(WRITER)
        source = cluster.node_for_slot(slot)
        targets = [node for node in cluster.masters() if node is not source]
        target = targets[self.migrations % len(targets)]
        self.migrations += 1
        migration = cluster.begin_migration(slot, target)
        with cluster.client(source) as client:
            keys = client.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
        for key in sorted(keys):
            time.sleep(MIGRATE_KEY_PAUSE)
            cluster.move_keys(migration, [key])
        time.sleep(MIGRATE_KEY_PAUSE)
        cluster.finish_migration(migration)  # with the keys created meanwhile
        return {"slot": slot, "source": source.port, "target": target.port,
                "keys": len(keys)}

    def failover_writer_shard(self, cluster: RedisCluster) -> dict[str, Any]:
        slot = cluster.key_slot(WRITER)
        before = cluster.node_for_slot(slot)
        return {"slot": slot, "source": before.port,
                "target": cluster.failover_slot(slot).port}

    async def inject(self, name: str) -> None:
        proc, popen = self.active_writer()
        detail: dict[str, Any] = {"began": time.time()}  # "t" is when it was done
        store = self.store
        if name == "kill_writer" and popen is not None:
            popen.kill()
            popen.wait()
        elif name == "pause_writer" and popen is not None:
            os.kill(popen.pid, signal.SIGSTOP)
            self.frozen.add(popen.pid)
            self.spawn_writer()
            task = asyncio.get_running_loop().create_task(
                self.thaw_later(popen, 2.5 * self.run.lease_ttl))
            self.thaws.add(task)
            task.add_done_callback(self.thaws.discard)
        elif name == "restart_reader" and self.reader_ready():
            proc, popen = self.readers[self.reader_restarts % len(self.readers)]
            self.reader_restarts += 1
            popen.send_signal(signal.SIGUSR1)
        elif name == "kill_pubsub":
            detail["killed"] = await asyncio.to_thread(self.kill_pubsub)
        elif name == "migrate_writer_slot" and isinstance(store, RedisCluster):
            # In a thread: the supervisor goes on replacing writers meanwhile.
            detail.update(await asyncio.to_thread(self.migrate_writer_slot, store))
        elif name == "failover_writer_shard" and isinstance(store, RedisCluster):
            detail.update(await asyncio.to_thread(self.failover_writer_shard, store))
        elif name == "redis_empty" and isinstance(store, RedisServer):
            store.restart()
        elif name == "redis_empty_second_node" and isinstance(store, RedisServer):
            store.restart()
            self.spawn_writer()
        elif name == "redis_older" and self.snapshots and isinstance(store, RedisServer):
            store.restart_from(self.snapshots[-2] if len(self.snapshots) > 1
                               else self.snapshots[-1])
        else:
            return  # no writer to kill or pause, no reader ready, or no snapshot yet
        self.record_fault(name, proc=proc, **detail)

    # -- the run -------------------------------------------------------------------

    async def drive(self) -> None:
        run = self.run
        self.place()
        self.readers = [(proc, self.spawn("reader", proc, run.reader_pause, actors=count))
                        for proc, count in self.reader_procs()]
        supervisor = asyncio.get_running_loop().create_task(self.supervise())
        try:
            start = time.monotonic()
            tick = 0
            while True:
                due = start + run.fault_every * (tick + 1)
                if due > start + run.seconds:
                    break
                await asyncio.sleep(due - time.monotonic())
                await self.inject(run.faults[tick % len(run.faults)])
                if "redis_older" in run.faults and isinstance(self.store, RedisServer):
                    self.snapshots.append(self.store.snapshot())
                tick += 1
            await asyncio.sleep(max(0.0, start + run.seconds - time.monotonic()))
            for task in list(self.thaws):
                task.cancel()
            for _proc, popen in self.writers:
                if popen.poll() is None:
                    os.kill(popen.pid, signal.SIGCONT)
            self.frozen.clear()
            await asyncio.sleep(run.settle)
            self.check_exits()
        finally:
            supervisor.cancel()
            self.terminate()

    def terminate(self) -> None:
        procs = [popen for _proc, popen in (*self.writers, *self.readers)
                 if popen.poll() is None]
        for popen in procs:
            os.kill(popen.pid, signal.SIGCONT)
            popen.terminate()
        for popen in procs:
            try:
                popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()

    async def read_final(self) -> dict[str, Any]:
        """The store's state once every worker is gone."""
        async with Node(self.store.url, app=self.run.app, node_id="history-final",
                        lease_ttl=self.run.lease_ttl, **NODE_OPTIONS) as node:
            deadline = time.monotonic() + 5 * self.run.lease_ttl + 5
            while True:
                try:
                    handle = await node.start(FinalReader, "f-final")
                    final: dict[str, Any] = await handle.call("read")
                    break
                except MapNotFoundError:
                    if time.monotonic() > deadline:  # the store holds no map at all
                        final = {"maps": {"m": None, "m2": None}, "log": {}}
                        break
                    await asyncio.sleep(0.2)
                except SharingError as exc:
                    if time.monotonic() > deadline:
                        raise HistoryRunError(f"the final state is unreadable: {exc!r}") from exc
                    await asyncio.sleep(0.2)
            checkpoint = await node.service.load_checkpoint(WRITER)
        state = checkpoint.get("state") if checkpoint else None
        final["state_n"] = state.get("n") if isinstance(state, dict) else None
        return final


async def run_history(run: HistoryRun) -> HistoryReport:
    """Run the processes and faults of ``run``; judge the history they leave."""
    run.workdir.mkdir(parents=True, exist_ok=True)
    store = RedisCluster(masters=3, replicas_per_master=1) if run.cluster else RedisServer()
    store.start()
    try:
        harness = _Harness(run, store)
        await harness.drive()
        final = await harness.read_final()
        harness.save_error_replies()
        (run.workdir / "final.jsonl").write_bytes(orjson.dumps({"kind": "final", **final})
                                                  + b"\n")
    finally:
        store.cleanup()
    return check_history(load_history(sorted(run.workdir.glob("*.jsonl"))))
