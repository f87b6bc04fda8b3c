"""Prometheus metrics of a node, from :meth:`Node.stats`, read at each scrape.

Needs the extra ``caf-sharing[prometheus]`` (``prometheus-client``)::

    from prometheus_client import start_http_server
    from caf_sharing.prometheus import register

    register(node)              # the default registry, labelled by node_id
    start_http_server(9100)

Counters carry the ``_total`` suffix; commit latency and propagation lag
(per map) are histograms over :data:`caf_sharing.metrics.BUCKETS`, in seconds;
mailbox depth is a gauge per actor.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import (
    REGISTRY,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

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
    """Collects ``caf_sharing_*`` metrics from one node at each scrape."""

    def __init__(self, node: Node) -> None:
        self._node = node

    def collect(self) -> Iterator[Metric]:
        stats = self._node.stats()
        labels = ["node_id"]
        for name, help_text in _COUNTERS:
            counter = CounterMetricFamily(f"caf_sharing_{name}", help_text, labels=labels)
            counter.add_metric([stats.node_id], getattr(stats, name))
            yield counter
        commit = HistogramMetricFamily(
            "caf_sharing_commit_latency_seconds",
            "Backend commit call, from the message's end to its acknowledgement",
            labels=labels)
        summary = stats.commit_latency
        commit.add_metric([stats.node_id], summary["buckets"], summary["sum"])
        yield commit
        lag = HistogramMetricFamily(
            "caf_sharing_propagation_lag_seconds",
            "From the writer's commit to its change set applied here, per map",
            labels=["node_id", "map"])
        for map_name, summary in sorted(stats.propagation_lag.items()):
            lag.add_metric([stats.node_id, map_name], summary["buckets"], summary["sum"])
        yield lag
        depth = GaugeMetricFamily("caf_sharing_mailbox_depth",
                                  "Messages waiting in an actor's mailbox",
                                  labels=["node_id", "actor"])
        for actor, waiting in sorted(stats.mailbox_depth.items()):
            depth.add_metric([stats.node_id, actor], waiting)
        yield depth


def register(node: Node, registry: CollectorRegistry = REGISTRY) -> NodeCollector:
    """Export ``node``'s metrics through ``registry``; returns the collector
    (``registry.unregister(collector)`` stops it)."""
    collector = NodeCollector(node)
    registry.register(collector)
    return collector
