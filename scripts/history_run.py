"""A long multi-process history run under faults, judged by the history checker.

    PYTHONPATH=src python scripts/history_run.py --seconds 60 --faults all
    PYTHONPATH=src python scripts/history_run.py --cluster --seconds 120 --faults all

``--faults`` takes a group — ``actor`` (writer SIGKILL, writer SIGSTOP past
the lease, reader actor restart), ``resync`` (``CLIENT KILL TYPE pubsub``), ``data-loss`` (Redis
restarted empty, from an older RDB snapshot, or empty with a second writer
racing) or ``all`` — or a comma-separated list of fault names. ``--cluster``
runs on a Redis Cluster of 3 masters with a replica each; there the groups
are ``actor``, ``resync``, ``cluster`` (the writer's slot migrated, its
shard failed over) and ``all`` (the three; no data-loss faults). It prints
the counts (commits, observations, faults, failed messages, violations per
kind with examples) and exits 1 when any guarantee was violated. The logs stay
in ``--workdir`` (a new temporary directory by default; an existing one must
be empty).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from history_harness import (  # found through the path above
    ALL_FAULTS,
    CLUSTER_ALL_FAULTS,
    CLUSTER_FAULT_GROUPS,
    FAULT_GROUPS,
    HistoryRun,
    run_history,
)


def parse_faults(text: str, *, cluster: bool) -> tuple[str, ...]:
    groups, known = (CLUSTER_FAULT_GROUPS, CLUSTER_ALL_FAULTS) if cluster \
        else (FAULT_GROUPS, ALL_FAULTS)
    if text in groups:
        return groups[text]
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        where = "a cluster" if cluster else "one server"
        raise ValueError(f"unknown faults {unknown or text!r} on {where}; use "
                         f"{', '.join(groups)} or names from {', '.join(known)}")
    return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--faults", default="actor", help="a group or fault names, comma-separated")
    parser.add_argument("--cluster", action="store_true",
                        help="a Redis Cluster of 3 masters with a replica each")
    parser.add_argument("--readers", type=int, default=2, help="reader processes")
    parser.add_argument("--lease-ttl", type=float, default=1.0)
    parser.add_argument("--fault-every", type=float, default=2.0, help="seconds")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args()
    try:
        faults = parse_faults(args.faults, cluster=args.cluster)
    except ValueError as exc:
        parser.error(str(exc))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="caf-history-"))
    if workdir.exists() and any(workdir.iterdir()):
        # The checker reads every log there: an earlier run's would be judged too.
        parser.error(f"--workdir {workdir} is not empty")
    run = HistoryRun(workdir=workdir, seconds=args.seconds, faults=faults,
                     readers=args.readers, lease_ttl=args.lease_ttl,
                     fault_every=args.fault_every, cluster=args.cluster)
    report = asyncio.run(run_history(run))
    if args.json:
        print(json.dumps(report.to_json(), indent=2, default=str))
    else:
        print(f"faults: {', '.join(run.faults)}; logs in {workdir}")
        if run.cluster:
            placement = json.loads((workdir / "placement.json").read_text())
            print("actors by shard at start: " + ", ".join(
                f"{actor} :{port}" for actor, port in placement.items()))
            replies = json.loads((workdir / "redis_errors.json").read_text())
            print("error replies of the nodes: " + ", ".join(
                f"{kind} {count}" for kind, count in sorted(replies.items())))
        print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
