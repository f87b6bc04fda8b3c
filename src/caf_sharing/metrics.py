"""What a node measures about itself: latency summaries, the snapshot
:meth:`Node.stats() <caf_sharing.node.Node.stats>` returns, and the
:class:`Observer` hook that hands the same events to other code
(OpenTelemetry, a log shipper...) as they happen.

A :class:`LatencySummary` keeps a count, a sum, a maximum, cumulative
histogram buckets (the bounds Prometheus exporters use, :data:`BUCKETS`) and
the last :data:`RECENT` values for percentiles; it costs a few hundred
nanoseconds per observation and a fixed amount of memory.
"""

from __future__ import annotations

import bisect
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BUCKETS", "RECENT", "LatencySummary", "NodeStats", "Observer", "notify"]

_log = logging.getLogger("caf_sharing.metrics")

#: Histogram bucket bounds, in seconds (an implicit +Inf bucket follows).
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
           0.5, 1.0, 2.5, 5.0, 10.0)
#: Observations kept for the percentiles.
RECENT = 2048


@dataclass(slots=True)
class LatencySummary:
    """Latencies in seconds: totals since start, percentiles of the recent ones."""

    count: int = 0
    total: float = 0.0
    max: float = 0.0
    #: Observations in each bucket of :data:`BUCKETS` (not cumulative), +Inf last.
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))

    def observe(self, seconds: float) -> None:
        if seconds < 0.0:  # clock skew between machines: never negative
            seconds = 0.0
        self.count += 1
        self.total += seconds
        if seconds > self.max:
            self.max = seconds
        self.buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.recent.append(seconds)

    def quantile(self, q: float) -> float:
        """The ``q`` quantile (0..1) of the recent observations (0 without any)."""
        if not self.recent:
            return 0.0
        ordered = sorted(self.recent)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def snapshot(self) -> dict[str, Any]:
        """``count``, ``sum``, ``mean``, ``p50``, ``p99`` and ``max`` in seconds,
        and ``buckets``: cumulative ``(upper bound, count)`` pairs, ``"+Inf"`` last."""
        cumulative = 0
        buckets: list[tuple[str, int]] = []
        for bound, count in zip((*map(str, BUCKETS), "+Inf"), self.buckets, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        return {"count": self.count, "sum": self.total,
                "mean": self.total / self.count if self.count else 0.0,
                "p50": self.quantile(0.5), "p99": self.quantile(0.99), "max": self.max,
                "buckets": buckets}


@dataclass(frozen=True, slots=True)
class NodeStats:
    """A node's counters and latencies at one moment (:meth:`Node.stats`).

    Latencies are :meth:`LatencySummary.snapshot` dicts, in seconds."""

    node_id: str
    #: Messages committed (a message that changed nothing commits nothing).
    commits: int
    #: Messages rolled back: the method raised, or the commit failed.
    aborts: int
    #: Commits the backend refused or could not confirm.
    commit_failures: int
    #: The backend commit call, from the message's end to its acknowledgement.
    commit_latency: dict[str, Any]
    #: Per replicated map: from the writer's commit to this node applying it
    #: (the writer's clock against this node's: skew adds to it).
    propagation_lag: dict[str, dict[str, Any]]
    #: Per hosted actor: messages waiting in its mailbox.
    mailbox_depth: dict[str, int]
    #: Round trips the backend tried again (lost connections, redirections).
    retries: int
    #: Full reads that brought replicas back in line.
    resyncs: int
    #: Replicas found holding history the store lost, then healed.
    forks_healed: int
    #: This node's actors whose lost data it put back (re-asserts).
    reasserts: int
    #: Lease renewal rounds that went through, and leases found held by another node.
    lease_renewals: int
    leases_lost: int
    #: Counters of the backend itself (Redis: round trips, batches, chunked reads).
    backend: dict[str, int]


class Observer:
    """Receives a node's events as they happen: ``Node(url, observer=...)``.

    Subclass it and override what you need; every method does nothing here.
    They run on the node's event loop, inside its bookkeeping: keep them
    short and let them not raise (an exception is logged and dropped)."""

    def on_commit(self, actor: str, txid: str, seconds: float) -> None:
        """``actor`` committed ``txid``; the backend call took ``seconds``."""

    def on_abort(self, actor: str, error: BaseException) -> None:
        """A message of ``actor`` was rolled back by ``error``."""

    def on_apply(self, map_name: str, version: int, lag: float | None) -> None:
        """A replica of ``map_name`` reached ``version`` from a change set,
        ``lag`` seconds after its commit (``None``: the writer sent no time)."""

    def on_resync(self, map_name: str) -> None:
        """A replica of ``map_name`` was read again from the store."""

    def on_lease_lost(self, actor: str) -> None:
        """Another node holds ``actor``'s lease: it stops here."""


def notify(observer: Observer, event: str, *args: Any) -> None:
    """Call ``observer.<event>(*args)``; what it raises is logged, not passed on."""
    try:
        getattr(observer, event)(*args)
    except Exception:
        _log.exception("observer %r failed on %s", observer, event)
