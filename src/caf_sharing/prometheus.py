"""Prometheus metrics of a node, from :meth:`Node.stats`, read at each scrape.

Needs the extra ``caf-sharing[prometheus]`` (``prometheus-client``)::

    from prometheus_client import start_http_server
    from caf_sharing.prometheus import register

    register(node)              # the default registry; register(a, b) for two nodes
    start_http_server(9100)

Counters carry the ``_total`` suffix; commit latency and propagation lag
(per map) are histograms over :data:`caf_sharing.metrics.BUCKETS`, in seconds;
mailbox depth is a gauge per actor.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client.core import (
    REGISTRY,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from .metrics import NodeStats

if TYPE_CHECKING:
    from .node import Node

__all__ = ["NodeCollector", "register"]

_COUNTERS = (
    ("commits", "Messages committed"),
    ("aborts", "Messages rolled back (the method raised or the commit failed)"),
    ("commit_failures", "Commits the backend refused or could not confirm"),
    ("retries", "Backend round trips sent again"),
    ("resyncs", "Full reads that brought replicas back in line"),
    ("forks_healed", "Replicas found holding history the store lost, then healed"),
    ("reasserts", "Actors whose lost data this node put back"),
    ("lease_renewals", "Lease renewal rounds"),
    ("leases_lost", "Leases found held by another node"),
)


class NodeCollector(Collector):
    """Collects ``caf_sharing_*`` metrics from nodes at each scrape, each
    metric family once with a sample per node (labelled ``node_id``)."""

    def __init__(self, nodes: Sequence[Node]) -> None:
        self._nodes = list(nodes)

    def describe(self) -> Iterator[Metric]:
        # The names, so that a registry refuses a second collector of them.
        return self._families([])

    def collect(self) -> Iterator[Metric]:
        return self._families([node.stats() for node in self._nodes])

    def _families(self, all_stats: list[NodeStats]) -> Iterator[Metric]:
        for name, help_text in _COUNTERS:
            counter = CounterMetricFamily(f"caf_sharing_{name}", help_text, labels=["node_id"])
            for stats in all_stats:
                counter.add_metric([stats.node_id], getattr(stats, name))
            yield counter
        commit = HistogramMetricFamily(
            "caf_sharing_commit_latency_seconds",
            "Backend commit call, from the message's end to its acknowledgement",
            labels=["node_id"])
        for stats in all_stats:
            summary = stats.commit_latency
            commit.add_metric([stats.node_id], summary["buckets"], summary["sum"])
        yield commit
        lag = HistogramMetricFamily(
            "caf_sharing_propagation_lag_seconds",
            "From the writer's commit to its change set applied here, per map",
            labels=["node_id", "map"])
        for stats in all_stats:
            for map_name, summary in sorted(stats.propagation_lag.items()):
                lag.add_metric([stats.node_id, map_name], summary["buckets"], summary["sum"])
        yield lag
        depth = GaugeMetricFamily("caf_sharing_mailbox_depth",
                                  "Messages waiting in an actor's mailbox",
                                  labels=["node_id", "actor"])
        for stats in all_stats:
            for actor, waiting in sorted(stats.mailbox_depth.items()):
                depth.add_metric([stats.node_id, actor], waiting)
        yield depth


def register(*nodes: Node, registry: CollectorRegistry = REGISTRY) -> NodeCollector:
    """Export the metrics of ``nodes`` (all of them at once: a registry takes
    one collector of these names) through ``registry``; returns the
    collector (``registry.unregister(collector)`` stops it)."""
    collector = NodeCollector(nodes)
    registry.register(collector)
    return collector
