"""The ``caf-sharing demo`` scenario: the seed's hello world, measured.

An ``admin`` actor owns a map with a counter and increments it; reader actors
on another node replicate the map and keep reading it. Every reader records
what it saw, and the demo checks the guarantees on those histories:

* monotonic reads — a reader never sees an older version after a newer one;
* readers isolation — two reads inside one message, across an ``await``,
  see the same version;
* convergence — every reader ends on the last committed version;
* the counter at version ``v`` is what the writer committed at ``v``.

It runs on ``memory://`` (two nodes sharing one in-process store) with no
server, or on Redis, where ``--processes K`` moves the readers into K child
processes. The children read the backend URL from stdin: on their command
line, ``ps`` would show its password to every user of the machine.

On a Redis Cluster the readers' names are picked so that the actors spread
over the shards (an actor's keys live on the primary of its name's slot),
and the table says which shard each landed on.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO, runtime_checkable

from .backends import make_backend, redact_url
from .node import Actor, Node

__all__ = ["DemoResult", "reader_names", "run_demo", "run_reader_process"]

OWNER = "alice"
ADMIN = f"{OWNER}-admin"
MAP = "counter"
MAP_NAME = f"{ADMIN}-{MAP}"
#: How long ``--keep`` leaves the demo's data in the store.
KEEP_SECONDS = 3600
#: Reader names tried per reader when spreading the readers over shards.
CANDIDATES_PER_READER = 64


@runtime_checkable
class _Sharded(Protocol):
    """A backend that can say which server holds an actor's keys."""

    @property
    def cluster(self) -> bool: ...

    def shard_of(self, actor: str) -> str: ...


class Admin(Actor):
    """Owns ``alice-admin-counter`` and increments its counter."""

    async def init(self) -> None:
        self.sharing.add_writable_map("primary", MAP, initial_value={"counter": 0})

    async def increment(self) -> tuple[int, int]:
        primary = self.sharing.maps.primary
        counter = primary.get("counter", 0) + 1
        primary.set("counter", counter)
        return primary.version + 1, counter


class Reader(Actor):
    """Replicates the admin's map and reports what one message sees."""

    async def init(self) -> None:
        self.sharing.add_read_only_map("replica", MAP_NAME)

    async def observe(self) -> tuple[int, int, bool]:
        replica = self.sharing.maps.replica
        version, counter = replica.version, replica.get("counter")
        await asyncio.sleep(0)  # other actors and replica updates run here
        again = self.sharing.maps.replica
        isolated = again is replica and again.version == version and \
            again.get("counter") == counter
        return version, counter, isolated


@dataclass(slots=True)
class ReaderReport:
    """What one reader saw, as (version, counter, monotonic-time) samples."""

    name: str
    samples: list[tuple[int, int, float]] = field(default_factory=list)
    isolation_violations: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "samples": self.samples,
                "isolation_violations": self.isolation_violations}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ReaderReport:
        samples = [(int(v), int(c), float(t)) for v, c, t in data["samples"]]
        return cls(data["name"], samples, data["isolation_violations"])


@dataclass(slots=True)
class DemoResult:
    #: The backend URL, password redacted.
    backend: str
    commits: int
    seconds: float
    commit_times: dict[int, float]
    committed_values: dict[int, int]
    readers: list[ReaderReport]
    problems: list[str] = field(default_factory=list)
    #: On a cluster, the shard (host:port) of each actor, the admin included.
    shards: dict[str, str] = field(default_factory=dict)
    #: The app namespace it stored under, and whether it left its data there.
    app: str = ""
    kept: bool = False
    #: The Prometheus exposition of its nodes after the run (``metrics=True``).
    metrics: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def latencies(self) -> list[float]:
        """Commit -> first observation by each reader, in seconds."""
        out = []
        for report in self.readers:
            seen: set[int] = set()
            for version, _, at in report.samples:
                if version not in seen and version in self.commit_times:
                    seen.add(version)
                    out.append(max(0.0, at - self.commit_times[version]))
        return sorted(out)

    def check(self) -> None:
        last = max(self.committed_values, default=0)
        for report in self.readers:
            previous = -1
            for version, counter, _ in report.samples:
                if version < previous:
                    self.problems.append(
                        f"{report.name}: saw version {version} after {previous} "
                        "(monotonic reads violated)")
                    break
                previous = version
                expected = self.committed_values.get(version)
                if expected is not None and counter != expected:
                    self.problems.append(
                        f"{report.name}: version {version} has counter {counter}, "
                        f"committed {expected}")
                    break
            if report.isolation_violations:
                self.problems.append(
                    f"{report.name}: {report.isolation_violations} messages saw their "
                    "snapshot change (readers isolation violated)")
            if not report.samples or report.samples[-1][0] != last:
                final = report.samples[-1][0] if report.samples else None
                self.problems.append(f"{report.name}: ended on version {final}, not {last}")

    def table(self) -> str:
        lat = self.latencies()
        rows = [f"backend          {self.backend}"]
        if self.shards:
            rows += [f"writer           {ADMIN} on {self.shards.get(ADMIN, '?')}",
                     f"shards           {len(self.shards)} actors on "
                     f"{len(set(self.shards.values()))} shards"]
        rows += [
            f"commits          {self.commits} in {self.seconds:.2f}s "
            f"({self.commits / self.seconds if self.seconds else 0:.0f}/s)",
            "propagation      "
            + (f"p50 {_pct(lat, 50) * 1e3:.2f} ms, p99 {_pct(lat, 99) * 1e3:.2f} ms "
               f"over {len(lat)} first sightings" if lat else "no samples"),
            "",
        ]
        header = f"{'reader':<18}{'reads':>8}{'versions seen':>15}{'last':>7}  monotonic  isolated"
        rows.append(header + ("  shard" if self.shards else ""))
        for r in self.readers:
            versions = {v for v, _, _ in r.samples}
            last = r.samples[-1][0] if r.samples else "-"
            mono = all(a[0] <= b[0] for a, b in zip(r.samples, r.samples[1:], strict=False))
            row = (f"{r.name:<18}{len(r.samples):>8}{len(versions):>15}{last!s:>7}  "
                   f"{'yes' if mono else 'NO':<9}  "
                   f"{'yes' if not r.isolation_violations else 'NO'}")
            if self.shards:
                row = f"{row:<{len(header)}}  {self.shards.get(r.name, '?')}"
            rows.append(row)
        rows.append("")
        rows.append("all guarantees held" if self.ok else "VIOLATIONS:\n  " +
                    "\n  ".join(self.problems))
        if self.app and not self.backend.startswith("memory:"):
            inspect = f"caf-sharing inspect {MAP_NAME} --backend {self.backend} --app {self.app}"
            if "***" in self.backend:
                inspect += "  (with your password, or --backend from $CAF_SHARING_URL)"
            rows.append(f"\napp namespace {self.app}: " + (
                f"kept for {KEEP_SECONDS // 3600} h; try\n  {inspect}" if self.kept
                else "its keys are deleted; run with --keep to inspect them with\n  "
                     + inspect))
        return "\n".join(rows)


def _pct(values: list[float], pct: float) -> float:
    index = min(len(values) - 1, max(0, round(pct / 100 * (len(values) - 1))))
    return values[index]


def reader_names(count: int, shard_of: Callable[[str], str] | None = None) -> list[str]:
    """The readers' names, ``alice-reader1`` to ``alice-reader<count>``; given
    ``shard_of`` (a cluster), names among ``alice-reader<n>`` picked to put
    the readers on the shards in turn, those the admin is not on first."""
    if shard_of is None:
        return [f"{OWNER}-reader{i + 1}" for i in range(count)]
    # Shards no candidate name falls on are missed: with even slot ranges,
    # 64 names per reader reach every one of a few hundred shards.
    by_shard: dict[str, list[str]] = {shard_of(ADMIN): []}
    for i in range(count * CANDIDATES_PER_READER):
        name = f"{OWNER}-reader{i + 1}"
        by_shard.setdefault(shard_of(name), []).append(name)
    admin_shard, *others = by_shard.values()
    turns = [*others, admin_shard]
    chosen: list[str] = []
    while len(chosen) < count:
        for names in turns:
            if names and len(chosen) < count:
                chosen.append(names.pop(0))
    return sorted(chosen, key=lambda name: int(name.removeprefix(f"{OWNER}-reader")))


def _shard_lookup(backend: object) -> Callable[[str], str] | None:
    """``backend.shard_of`` when the backend is a cluster, else ``None``."""
    if isinstance(backend, _Sharded) and backend.cluster:
        return backend.shard_of
    return None


async def _read_until(node: Node, names: list[str], last_version: Callable[[], int | None],
                      deadline: float) -> list[ReaderReport]:
    handles = [await node.start(Reader, name) for name in names]
    reports = [ReaderReport(name) for name in names]

    async def poll(handle: Any, report: ReaderReport) -> None:
        while time.monotonic() < deadline:
            version, counter, isolated = await handle.call("observe")
            report.samples.append((version, counter, time.monotonic()))
            if not isolated:
                report.isolation_violations += 1
            final = last_version()
            if final is not None and version >= final:
                return
            await asyncio.sleep(0)

    await asyncio.gather(*(poll(h, r) for h, r in zip(handles, reports, strict=True)))
    return reports


async def run_demo(backend: str = "memory://", *, readers: int = 4, commits: int = 200,
                   processes: int = 0, app: str | None = None, timeout: float = 60.0,
                   interval: float = 0.001, keep: bool = False, metrics: bool = False,
                   progress: Callable[[int, int], None] | None = None) -> DemoResult:
    """Run the scenario and check its histories; see the module docstring.
    At the end the demo deletes what it stored, or with ``keep`` leaves it for
    :data:`KEEP_SECONDS` (a TTL). With ``metrics`` (needs the extra
    ``caf-sharing[prometheus]``) the result carries the Prometheus
    exposition of its two nodes, scraped once the run is over."""
    if readers < 1 or commits < 1:
        raise ValueError("readers and commits must be >= 1")
    if processes and backend.startswith("memory:"):
        raise ValueError("--processes needs a backend other processes can reach (redis://...)")
    if backend.rstrip("/") == "memory:":
        backend = f"memory://demo-{uuid.uuid4().hex[:8]}"
    app = app or f"demo-{uuid.uuid4().hex[:8]}"
    commit_times: dict[int, float] = {}
    values: dict[int, int] = {}
    done: dict[str, int] = {}
    deadline = time.monotonic() + timeout

    registry = _registry() if metrics else None
    async with Node(backend, app=app, node_id="demo-writer") as writer:
        shard_of = _shard_lookup(writer.backend)
        names = reader_names(readers, shard_of)
        admin = await writer.start(Admin, ADMIN)
        async with Node(backend, app=app, node_id="demo-readers") as reading:
            if registry is not None:
                from .prometheus import register

                register(writer, reading, registry=registry)
            children: list[subprocess.Popen[str]] = []
            if processes:
                children = _spawn_readers(backend, app, names, processes, commits + 1, timeout)
                local: list[str] = []
            else:
                local = names
            reader_task = asyncio.ensure_future(_read_until(
                reading, local, lambda: done.get("last"), deadline))
            await asyncio.sleep(0.05 if not processes else 0.5)
            start = time.monotonic()
            for i in range(commits):
                version, counter = await admin.call("increment")
                commit_times[version] = time.monotonic()
                values[version] = counter
                if progress:
                    progress(i + 1, commits)
                await asyncio.sleep(interval)
            seconds = time.monotonic() - start
            done["last"] = max(values)
            reports = await reader_task
            reports += await asyncio.to_thread(_collect_children, children, timeout)
        shards = {} if shard_of is None else {name: shard_of(name) for name in [ADMIN, *names]}
    store = make_backend(backend, app=app)
    await store.start()
    try:
        await store.purge(KEEP_SECONDS if keep else None)
    finally:
        await store.close()
    result = DemoResult(redact_url(backend), commits, seconds, commit_times, values, reports,
                        shards=shards, app=app, kept=keep)
    if registry is not None:
        from prometheus_client import generate_latest

        result.metrics = generate_latest(registry).decode()
    result.check()
    return result


def _registry() -> Any:
    try:
        from prometheus_client import CollectorRegistry
    except ImportError:
        raise ValueError("metrics need prometheus-client: pip install "
                         "'caf-sharing[prometheus]'") from None
    return CollectorRegistry()


def _spawn_readers(backend: str, app: str, names: list[str], processes: int,
                   last_version: int, timeout: float) -> list[subprocess.Popen[str]]:
    groups = [names[i::processes] for i in range(processes)]
    children = []
    for group in groups:
        if not group:
            continue
        child = subprocess.Popen(
            [sys.executable, "-m", "caf_sharing.cli", "_demo-reader", "--app", app,
             "--last-version", str(last_version), "--timeout", str(timeout), *group],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
        assert child.stdin is not None
        # Left open: communicate() closes it, and fails on a closed stdin.
        child.stdin.write(backend + "\n")
        child.stdin.flush()
        children.append(child)
    return children


def _collect_children(children: list[subprocess.Popen[str]], timeout: float) -> list[ReaderReport]:
    reports = []
    for child in children:
        out, _ = child.communicate(timeout=timeout + 30)
        if child.returncode != 0:
            raise RuntimeError(f"reader process {child.pid} exited with {child.returncode}")
        reports += [ReaderReport.from_json(r) for r in json.loads(out)]
    return reports


async def run_reader_process(backend: str, app: str, names: list[str], last_version: int,
                             timeout: float, out: TextIO) -> None:
    """Body of one ``--processes`` child: read until ``last_version``, print reports."""
    deadline = time.monotonic() + timeout
    async with Node(backend, app=app, node_id=f"demo-readers-{os.getpid()}") as node:
        reports = await _read_until(node, names, lambda: last_version, deadline)
    json.dump([r.to_json() for r in reports], out)
