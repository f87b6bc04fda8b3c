"""A throwaway Redis Cluster for tests: real ``redis-server`` nodes on loopback.

:class:`RedisCluster` starts ``masters * (1 + replicas_per_master)`` nodes,
each a :class:`tests.redisserver.RedisServer` (free port, own temporary
directory, no persistence) with cluster mode on and a 2 s node timeout, joins
them with ``redis-cli --cluster create`` and waits until every node agrees on
the cluster. Nodes are never on port 6379, and their cluster bus is on a port
of its own (``--cluster-port``), since ``port + 10000`` may not exist.

    with RedisCluster(masters=3, replicas_per_master=1) as cluster:
        cluster.url                 # redis+cluster://127.0.0.1:p1,...:p3
        cluster.seed_url            # redis://127.0.0.1:p1/0
        slot = cluster.key_slot("{user}:1")
        owner = cluster.node_for_slot(slot)
        cluster.client(owner).set("{user}:1", b"x")   # no MOVED: owner holds it
        cluster.migrate_slot(slot, other_master)      # keys go along
        new_owner = cluster.failover_slot(slot)       # a replica takes over

Migration in steps, to act while a slot is MIGRATING/IMPORTING:

    migration = cluster.begin_migration(slot, target)
    cluster.move_keys(migration, ["{user}:1"])  # some keys now on the target
    ...                                         # source answers ASK for them
    cluster.finish_migration(migration)         # rest of the keys, then NODE

Every wait polls with short sleeps and gives up after a bounded time with a
:class:`RedisServerError` that carries the nodes' log tails. Roles and slot
owners are always asked of the running nodes, never remembered: they change
after a failover. A frozen (``freeze``) or killed node is left out of those
questions until ``thaw``/``restart``.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from redisserver import RedisServer, RedisServerError, free_port

__all__ = ["Migration", "RedisCluster", "find_redis_cli"]

#: Cluster mode for every node; persistence is already off in RedisServer.
#: A replica's full sync would wait 5 s for more replicas to share the
#: diskless transfer (``repl-diskless-sync-delay``); each master has few.
CLUSTER_ARGS = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "2000", "--repl-diskless-sync-delay", "0")

_POLL = 0.02


def find_redis_cli() -> str | None:
    """The path of the redis-cli binary on PATH, if any."""
    return shutil.which("redis-cli")


@dataclass(frozen=True)
class Migration:
    """A slot in the middle of a migration (from ``begin_migration``)."""

    slot: int
    source: RedisServer
    target: RedisServer
    source_id: str
    target_id: str


@dataclass(frozen=True)
class _NodeLine:
    """One line of ``CLUSTER NODES``."""

    id: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    slots: tuple[tuple[int, int], ...]  # owned ranges; open-slot markers left out


@dataclass(frozen=True)
class _Survey:
    """What the running nodes agree on once the cluster is settled."""

    owners: tuple[tuple[int, int, int], ...]  # (first slot, last slot, master port)
    roles: dict[int, str]  # port -> "master" | "slave", as each node says of itself

    def owner_port(self, slot: int) -> int | None:
        for first, last, port in self.owners:
            if first <= slot <= last:
                return port
        return None


class _NotReady(Exception):
    """The cluster is not settled yet; the message says what is missing."""


class RedisCluster:
    def __init__(self, masters: int = 3, replicas_per_master: int = 0,
                 extra_args: Sequence[str] = (), *, ready_timeout: float = 20.0) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        cli = find_redis_cli()
        if cli is None:
            raise RedisServerError("redis-cli is not on PATH")
        self.cli = cli
        self.masters_count = masters
        self.replicas_per_master = replicas_per_master
        self.ready_timeout = ready_timeout
        self.nodes: list[RedisServer] = [
            RedisServer([*CLUSTER_ARGS, "--cluster-port", str(free_port()), *extra_args])
            for _ in range(masters * (1 + replicas_per_master))]
        self._frozen: set[int] = set()  # ports of SIGSTOPped nodes
        self._ids: dict[int, str] = {}  # port -> node id; nodes.conf keeps it across restarts
        self._raw: dict[int, redis.Redis] = {}

    # -- addresses ---------------------------------------------------------

    @property
    def url(self) -> str:
        """The cluster URL listing the masters as created (a seed list: after
        a failover it may name a replica, which still knows the topology)."""
        seeds = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes[:self.masters_count])
        return f"redis+cluster://{seeds}"

    @property
    def seed_url(self) -> str:
        """A plain URL of the first node."""
        return self.nodes[0].url

    # -- life cycle --------------------------------------------------------

    def start(self) -> None:
        """Start every node, create the cluster, wait until it has settled."""
        try:
            for node in self.nodes:
                node.start()
            self._create()
            self.wait_ready()
            as_created = self.nodes[:self.masters_count]
            if self.masters() != as_created:
                raise RedisServerError(
                    "redis-cli did not make the first nodes the masters: "
                    f"{[n.port for n in self.masters()]}")
        except BaseException:
            self.cleanup()
            raise

    def _create(self) -> None:
        args = [self.cli, "--cluster", "create",
                *(f"127.0.0.1:{node.port}" for node in self.nodes),
                "--cluster-replicas", str(self.replicas_per_master), "--cluster-yes"]
        try:
            done = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=self.ready_timeout)
        except subprocess.TimeoutExpired as exc:
            raise RedisServerError(f"redis-cli --cluster create did not finish within "
                                   f"{self.ready_timeout}s{self.log_tails()}") from exc
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace")[-2000:]
            raise RedisServerError(f"redis-cli --cluster create exited with "
                                   f"{done.returncode}: {output}{self.log_tails()}")

    def stop(self) -> None:
        """Stop every node (data and cluster state stay in their directories)."""
        for client in self._raw.values():
            client.close()
        self._raw.clear()
        self._frozen.clear()
        for node in self.nodes:
            node.stop()

    def cleanup(self) -> None:
        """Stop every node and remove their directories."""
        self.stop()
        for node in self.nodes:
            node.cleanup()

    def __enter__(self) -> RedisCluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()

    # -- faults ------------------------------------------------------------

    def kill(self, node: RedisServer) -> None:
        """SIGKILL one node; the others notice after the node timeout (2 s)."""
        self._forget_client(node)
        self._frozen.discard(node.port)
        node.crash()

    def restart(self, node: RedisServer, *, wait: bool = True) -> None:
        """Start a stopped or killed node again on its port, with its
        ``nodes.conf`` (same id, same bus port) and no data; it rejoins.
        A master without replicas comes back owning its slots, empty."""
        self._forget_client(node)
        self._frozen.discard(node.port)
        node.stop()
        node.start()
        if wait:
            self.wait_ready()

    def freeze(self, node: RedisServer) -> None:
        """SIGSTOP one node: its connections stay open, it answers nothing."""
        node.freeze()
        self._frozen.add(node.port)

    def thaw(self, node: RedisServer) -> None:
        node.thaw()
        self._frozen.discard(node.port)

    def script_flush(self, node: RedisServer | None = None) -> None:
        """``SCRIPT FLUSH`` on one node, or on every running node."""
        for each in [node] if node is not None else self._live():
            self._command(each, "SCRIPT", "FLUSH")

    # -- topology ----------------------------------------------------------

    @staticmethod
    def key_slot(key: str | bytes) -> int:
        """The hash slot of ``key`` (hash tags count)."""
        return key_slot(key.encode() if isinstance(key, str) else key)

    def client(self, node: RedisServer) -> redis.Redis:
        """A plain synchronous redis-py client of one node (no redirections)."""
        return node.client()

    def node_id(self, node: RedisServer) -> str:
        known = self._ids.get(node.port)
        if known is None:
            known = self._text(self._command(node, "CLUSTER", "MYID"))
            self._ids[node.port] = known
        return known

    def node_by_port(self, port: int) -> RedisServer:
        for node in self.nodes:
            if node.port == port:
                return node
        raise RedisServerError(f"no node of this cluster on port {port}")

    def masters(self) -> list[RedisServer]:
        """The running nodes that say they are masters now."""
        return [node for node in self._live() if self._role(node)["role"] == "master"]

    def replicas(self) -> list[RedisServer]:
        """The running nodes that say they are replicas now."""
        return [node for node in self._live() if self._role(node)["role"] == "slave"]

    def replicas_of(self, master: RedisServer) -> list[RedisServer]:
        """The running replicas that say ``master`` is their master."""
        return [node for node in self.replicas()
                if int(self._role(node)["master_port"]) == master.port]

    def node_for_slot(self, slot: int) -> RedisServer:
        """The running node that owns ``slot`` by its own account (a source
        keeps owning a MIGRATING slot until ``finish_migration``)."""
        claimants = [node for node in self._live()
                     if any(first <= slot <= last for first, last in self._myself(node).slots)]
        if len(claimants) != 1:
            raise RedisServerError(f"slot {slot} is claimed by {len(claimants)} running "
                                   f"nodes: {[n.port for n in claimants]}")
        return claimants[0]

    # -- slot migration ----------------------------------------------------

    def begin_migration(self, slot: int, target: RedisServer) -> Migration:
        """``SETSLOT IMPORTING`` on the target, then ``MIGRATING`` on the owner
        (in that order, so the owner never sends ASK to a target that would
        refuse it). No key moves yet."""
        source = self.node_for_slot(slot)
        if source is target:
            raise RedisServerError(f"slot {slot} is already on port {target.port}")
        migration = Migration(slot, source, target, self.node_id(source), self.node_id(target))
        self._ok(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", migration.source_id)
        self._ok(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", migration.target_id)
        return migration

    def move_keys(self, migration: Migration, keys: Iterable[str | bytes] | None = None,
                  *, batch: int = 100) -> int:
        """``MIGRATE`` the given keys of the slot, or all the source still
        holds, to the target; returns how many were asked to move."""
        source, target = migration.source, migration.target
        if keys is not None:
            chosen = list(keys)
            if chosen:
                self._migrate(source, target, chosen)
            return len(chosen)
        moved = 0
        while True:
            found = self._command(source, "CLUSTER", "GETKEYSINSLOT", migration.slot, batch)
            if not found:
                return moved
            self._migrate(source, target, found)
            moved += len(found)

    def _migrate(self, source: RedisServer, target: RedisServer,
                 keys: Sequence[str | bytes]) -> None:
        reply = self._command(source, "MIGRATE", "127.0.0.1", target.port, "", 0, 5000,
                              "KEYS", *keys)
        if reply not in (b"OK", b"NOKEY"):
            raise RedisServerError(f"MIGRATE to port {target.port} answered {reply!r}")

    def finish_migration(self, migration: Migration, *, wait: bool = True) -> None:
        """Move the keys left, give the slot to the target on the target, the
        source and every other master, and wait until every node agrees."""
        self.move_keys(migration)
        slot, target = migration.slot, migration.target
        others = [m for m in self.masters() if m is not target and m is not migration.source]
        for node in [target, migration.source, *others]:
            self._ok(node, "CLUSTER", "SETSLOT", slot, "NODE", migration.target_id)
        if wait:
            self.wait_ready(until=lambda survey: survey.owner_port(slot) == target.port)

    def migrate_slot(self, slot: int, target: RedisServer) -> Migration:
        """Migrate ``slot`` with its keys to ``target``, the way redis-cli
        reshards; returns what was done (the source is in it)."""
        migration = self.begin_migration(slot, target)
        self.finish_migration(migration)
        return migration

    # -- failover ----------------------------------------------------------

    def failover(self, replica: RedisServer, *, force: bool = False,
                 timeout: float | None = None) -> None:
        """``CLUSTER FAILOVER`` on ``replica`` (``FORCE``: without its master's
        agreement, for a master that is gone) and wait until every node sees
        it as the master of its old master's slots."""
        myself = self._myself(replica)
        if "slave" not in myself.flags:
            raise RedisServerError(f"port {replica.port} is not a replica")
        slots = next(line.slots for line in self._nodes_view(replica)
                     if line.id == myself.master_id)
        self._ok(replica, "CLUSTER", "FAILOVER", *(["FORCE"] if force else []))

        def took_over(survey: _Survey) -> bool:
            return survey.roles.get(replica.port) == "master" and all(
                survey.owner_port(slot) == replica.port
                for first, last in slots for slot in range(first, last + 1))

        self.wait_ready(timeout, until=took_over)

    def failover_slot(self, slot: int, *, timeout: float | None = None) -> RedisServer:
        """Fail the owner of ``slot`` over to one of its replicas; returns
        the new owner."""
        owner = self.node_for_slot(slot)
        replicas = self.replicas_of(owner)
        if not replicas:
            raise RedisServerError(f"the owner of slot {slot} (port {owner.port}) "
                                   "has no running replica")
        self.failover(replicas[0], timeout=timeout)
        return replicas[0]

    # -- waiting -----------------------------------------------------------

    def wait_ready(self, timeout: float | None = None,
                   until: Callable[[_Survey], bool] | None = None) -> None:
        """Poll until every running node says ``cluster_state:ok``, they all
        know each other with no failure flags, agree on each slot's master
        (a running one, all 16384 slots covered) and on who is a master, and
        every replica's link to its master is up; and ``until``, if given,
        holds. Raise RedisServerError when ``timeout`` passes."""
        limit = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            try:
                survey = self._survey()
                if until is None or until(survey):
                    return
                problem = "settled, but not yet as awaited"
            except _NotReady as exc:
                problem = str(exc)
            if time.monotonic() > deadline:
                raise RedisServerError(f"the cluster did not settle within {limit}s: "
                                       f"{problem}{self.log_tails()}")
            time.sleep(_POLL)

    def _survey(self) -> _Survey:
        live = self._live()
        if not live:
            raise _NotReady("no node is running")
        try:
            return self._survey_of(live)
        except redis.RedisError as exc:
            raise _NotReady(f"a node did not answer: {exc!r}") from exc

    def _survey_of(self, live: list[RedisServer]) -> _Survey:
        live_ports = {node.port for node in live}
        roles: dict[int, str] = {}
        for node in live:
            state = self._info(node, "CLUSTER", "INFO").get("cluster_state")
            if state != "ok":
                raise _NotReady(f"port {node.port}: cluster_state:{state}")
            role = self._role(node)
            roles[node.port] = role["role"]
            if role["role"] == "slave" and role.get("master_link_status") != "up":
                raise _NotReady(f"replica on port {node.port}: master_link_status:"
                                f"{role.get('master_link_status')}")
        owners: tuple[tuple[int, int, int], ...] | None = None
        for node in live:
            lines = {line.port: line for line in self._nodes_view(node)}
            for port in live_ports:
                line = lines.get(port)
                if line is None:
                    raise _NotReady(f"port {node.port} does not know port {port} yet")
                bad = line.flags & {"fail", "fail?", "handshake", "noaddr"}
                if bad:
                    raise _NotReady(f"port {node.port} flags port {port} {sorted(bad)}")
                seen_as = "master" if "master" in line.flags else "slave"
                if seen_as != roles[port]:
                    raise _NotReady(f"port {node.port} sees port {port} as {seen_as}, "
                                    f"it says {roles[port]}")
            view = self._slots_view(node)
            if owners is None:
                owners = view
            elif view != owners:
                raise _NotReady(f"port {node.port} disagrees on slot owners: {view} "
                                f"vs {owners}")
        assert owners is not None
        covered = sum(last - first + 1 for first, last, _ in owners)
        if covered != REDIS_CLUSTER_HASH_SLOTS:
            raise _NotReady(f"{covered} of {REDIS_CLUSTER_HASH_SLOTS} slots covered")
        absent = {port for _, _, port in owners} - live_ports
        if absent:
            raise _NotReady(f"slots owned by nodes down or frozen: {sorted(absent)}")
        return _Survey(owners, roles)

    def log_tails(self, chars: int = 1500) -> str:
        """The end of every node's log, for error messages."""
        parts = []
        for node in self.nodes:
            try:
                text = node.log_path.read_text(errors="replace")[-chars:]
            except OSError:
                continue
            parts.append(f"\n--- port {node.port} log ---\n{text}")
        return "".join(parts)

    # -- asking the nodes ----------------------------------------------------

    def _live(self) -> list[RedisServer]:
        return [node for node in self.nodes
                if node.running and node.port not in self._frozen]

    def _raw_client(self, node: RedisServer) -> redis.Redis:
        """A client of ``node`` that returns replies unparsed (bytes), with
        timeouts so that a dead node cannot hang a wait."""
        client = self._raw.get(node.port)
        if client is None:
            client = redis.Redis(host="127.0.0.1", port=node.port, password=node.password,
                                 socket_timeout=2.0, socket_connect_timeout=2.0)
            client.response_callbacks.clear()
            self._raw[node.port] = client
        return client

    def _forget_client(self, node: RedisServer) -> None:
        client = self._raw.pop(node.port, None)
        if client is not None:
            client.close()

    def _command(self, node: RedisServer, *args: Any) -> Any:
        return self._raw_client(node).execute_command(*args)

    def _ok(self, node: RedisServer, *args: Any) -> None:
        try:
            self._command(node, *args)
        except redis.ResponseError as exc:
            raise RedisServerError(f"{' '.join(map(str, args))} on port {node.port}: "
                                   f"{exc}") from exc

    @staticmethod
    def _text(reply: Any) -> str:
        return reply.decode() if isinstance(reply, bytes) else str(reply)

    def _info(self, node: RedisServer, *args: Any) -> dict[str, str]:
        """A ``key:value`` reply (INFO, CLUSTER INFO) as a dict."""
        fields = {}
        for line in self._text(self._command(node, *args)).splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key] = value.strip()
        return fields

    def _role(self, node: RedisServer) -> dict[str, str]:
        """``INFO replication``: role, master_port, master_link_status..."""
        return self._info(node, "INFO", "replication")

    def _nodes_view(self, node: RedisServer) -> list[_NodeLine]:
        lines = []
        for text in self._text(self._command(node, "CLUSTER", "NODES")).splitlines():
            fields = text.split()
            address = fields[1].split("@")[0]
            slots = []
            for item in fields[8:]:
                if item.startswith("["):  # [slot->-id] / [slot-<-id]: open slots
                    continue
                first, _, last = item.partition("-")
                slots.append((int(first), int(last or first)))
            lines.append(_NodeLine(
                id=fields[0], port=int(address.rsplit(":", 1)[1]),
                flags=frozenset(fields[2].split(",")),
                master_id=None if fields[3] == "-" else fields[3], slots=tuple(slots)))
        return lines

    def _myself(self, node: RedisServer) -> _NodeLine:
        for line in self._nodes_view(node):
            if "myself" in line.flags:
                return line
        raise RedisServerError(f"port {node.port}: no 'myself' line in CLUSTER NODES")

    def _slots_view(self, node: RedisServer) -> tuple[tuple[int, int, int], ...]:
        """``CLUSTER SLOTS`` of one node as sorted (first, last, master port)."""
        reply = self._command(node, "CLUSTER", "SLOTS")
        return tuple(sorted((int(entry[0]), int(entry[1]), int(entry[2][1]))
                            for entry in reply))
