"""A Redis failover under a live writer, for tests and benchmarks.

:func:`fail_over_while_writing` runs a primary, a replica that replicates
through a :class:`relay.Relay` (so the test can make it lag for real: a frozen
replica would not lag, its kernel keeps receiving the stream) and a relay the
writer's node connects through. While an actor commits as fast as it can, the
primary dies (SIGKILL), the replica is promoted (``REPLICAOF NO ONE``) and the
writer's relay switches to it. The result says which acknowledged commits the
promoted server lacks.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis

from caf_sharing import Actor, Node
from caf_sharing.errors import DurabilityError, SharingError
from redisserver import RedisServer
from relay import Relay

__all__ = ["PRIMARY_ARGS", "Failover", "fail_over_while_writing", "start_replica"]

#: A primary that starts a replica's full sync at once, not after 5 s.
PRIMARY_ARGS = ("--repl-diskless-sync-delay", "0")


def start_replica(primary_port: int, timeout: float = 10.0) -> RedisServer:
    """A started replica of the server on ``primary_port``, in sync: the
    primary counts it in ``WAIT`` (that can take a second after the sync,
    until the replica's first acknowledgement)."""
    replica = RedisServer(["--replicaof", "127.0.0.1", str(primary_port)])
    replica.start()
    deadline = time.monotonic() + timeout
    with redis.Redis(port=primary_port) as primary:
        while not (primary.set("test:replica-sync", 1)
                   and primary.execute_command("WAIT", 1, 100) == 1):
            if time.monotonic() > deadline:
                replica.cleanup()
                raise RuntimeError("the replica never synced")
    return replica


class Logger(Actor):
    """Each message sets one new key ``k<i>`` of its map."""

    async def init(self) -> None:
        self.sharing.add_writable_map("m", "m")

    async def put(self, i: int) -> None:
        self.sharing.maps.m.set(f"k{i}", i)


@dataclass
class Failover:
    #: Messages whose commit was acknowledged.
    acked: set[int]
    #: Messages whose key the promoted server holds.
    stored: set[int]
    #: Messages that raised DurabilityError.
    ambiguous: int
    #: Messages that failed otherwise (server gone, fenced...).
    failed: int
    #: Times the writer's node put back what the promoted server lacked.
    reasserts: int

    @property
    def lost(self) -> set[int]:
        """Acknowledged, yet missing after the failover."""
        return self.acked - self.stored


async def fail_over_while_writing(*, lag: float, before: float = 0.3, after: float = 0.5,
                                  **options: Any) -> Failover:
    """Write for ``before`` s; cut the replication link for ``lag`` s (0: the
    primary dies with the link up); kill the primary; promote the replica;
    write ``after`` s more. ``options`` go to the writer's Node."""
    app = f"fo{uuid.uuid4().hex[:8]}"
    acked: set[int] = set()
    counts = {"ambiguous": 0, "failed": 0}
    stop = asyncio.Event()
    with RedisServer(PRIMARY_ARGS) as primary, Relay(primary.port) as link, \
            Relay(primary.port) as relay:
        replica = start_replica(link.port)
        try:
            # restart_grace off: the servers are new, and no lease is lost here.
            async with Node(relay.url, app=app, lease_ttl=30.0, restart_grace=False,
                            **options) as node:
                logger = await node.start(Logger, "ann-log")

                async def writer() -> None:
                    i = 0
                    while not stop.is_set():
                        i += 1
                        try:
                            await logger.call("put", i)
                            acked.add(i)
                        except DurabilityError:
                            counts["ambiguous"] += 1
                        except SharingError:
                            counts["failed"] += 1
                            await asyncio.sleep(0.01)

                writing = asyncio.create_task(writer())
                await asyncio.sleep(before)
                if lag:
                    link.blackhole()
                    await asyncio.sleep(lag)
                os.kill(primary.pid, signal.SIGKILL)
                with replica.client() as client:
                    client.execute_command("REPLICAOF", "NO", "ONE")
                relay.switch(replica.port)
                await asyncio.sleep(after)
                stop.set()
                await writing
                reasserts = node.service.stats.reasserts
            with replica.client() as client:
                keys = client.hkeys(f"caf:{app}:{{ann-log}}:map:ann-log-m")
        finally:
            replica.cleanup()
    stored = {int(k[1:]) for k in keys if k.startswith(b"k")}
    return Failover(acked, stored, counts["ambiguous"], counts["failed"], reasserts)
