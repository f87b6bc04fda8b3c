"""The caf-sharing command on a real Redis Cluster: the demo spreads its
actors over the shards, ``inspect`` and ``watch`` find a map on any shard."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import uuid
from collections.abc import Iterator

import pytest

from caf_sharing import Actor, Node
from caf_sharing.backends import make_backend
from caf_sharing.cli import main
from caf_sharing.demo import ADMIN, OWNER, reader_names
from rediscluster import RedisCluster
from redisserver import RedisServer

pytestmark = pytest.mark.redis

#: The writer's line and the readers' rows of the demo's table, with their shard.
SHARD = re.compile(r"(?m)^(?:writer +)?(alice-\w+) .*127\.0\.0\.1:(\d+)$")


def owner_port(cluster: RedisCluster, actor: str) -> int:
    return cluster.node_for_slot(cluster.key_slot(actor)).port


def test_reader_names_take_turns_over_the_shards() -> None:
    assert reader_names(3) == ["alice-reader1", "alice-reader2", "alice-reader3"]
    assert reader_names(2, lambda actor: "one") == ["alice-reader1", "alice-reader2"]

    def shard_of(actor: str) -> str:  # the admin and readers 1-9 share a shard
        number = int(actor.removeprefix(f"{OWNER}-reader")) if "reader" in actor else 0
        return "a" if number < 10 else "b" if number < 20 else "c"

    # The shards without the admin first, then the admin's, then round again.
    assert reader_names(4, shard_of) == ["alice-reader1", "alice-reader10",
                                         "alice-reader11", "alice-reader20"]


@pytest.fixture
def crowded(redis_cluster: RedisCluster) -> Iterator[RedisCluster]:
    """The slots of the demo's plain reader names moved onto the admin's
    master (put back afterwards): plain names would all share one shard."""
    home = redis_cluster.node_for_slot(redis_cluster.key_slot(ADMIN))
    moved: list[tuple[int, RedisServer]] = []
    try:
        for name in reader_names(4):
            slot = redis_cluster.key_slot(name)
            source = redis_cluster.node_for_slot(slot)
            if source.port != home.port:
                redis_cluster.migrate_slot(slot, home)
                moved.append((slot, source))
        yield redis_cluster
    finally:
        for slot, source in moved:
            redis_cluster.migrate_slot(slot, source)


def test_demo_spreads_its_actors_over_every_master(crowded: RedisCluster, capsys) -> None:
    app = f"clidemo{uuid.uuid4().hex[:8]}"
    # The readers run in child processes, which get the cluster URL on stdin.
    assert main(["demo", "--backend", crowded.url, "--app", app, "--readers", "4",
                 "--commits", "30", "--processes", "2", "--keep"]) == 0
    out = capsys.readouterr().out
    assert "all guarantees held" in out
    assert out.count("yes        yes") == 4
    landed = {name: int(port) for name, port in SHARD.findall(out)}
    assert len(landed) == 5 and ADMIN in landed, out
    # Where the demo says each actor is, the cluster agrees it is.
    assert landed == {name: owner_port(crowded, name) for name in landed}
    assert set(landed.values()) == {m.port for m in crowded.masters()}
    assert "5 actors on 3 shards" in out

    assert main(["inspect", f"{ADMIN}-counter", "--backend", crowded.url, "--app", app]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == {"name": f"{ADMIN}-counter", "version": 31, "contents": {"counter": 30}}

    async def drop() -> None:  # --keep left it for an hour
        store = make_backend(crowded.url, app=app)
        await store.start()
        await store.purge()
        await store.close()

    asyncio.run(drop())


async def test_watch_and_inspect_a_map_on_another_shard(redis_cluster: RedisCluster,
                                                        capsys) -> None:
    class Owner(Actor):
        async def init(self) -> None:
            self.sharing.add_writable_map("m", "m", initial_value={"a": 1})

        async def put(self, key: str, value: int) -> None:
            self.sharing.maps.m.set(key, value)

    # Only the first master as the seed; the map lives on another one.
    seed = redis_cluster.masters()[0]
    url = f"redis+cluster://127.0.0.1:{seed.port}"
    owner = next(f"carol-owner{i}" for i in range(100)
                 if owner_port(redis_cluster, f"carol-owner{i}") != seed.port)
    name = f"{owner}-m"
    async with Node(redis_cluster.url, app="clicluster") as node:
        handle = await node.start(Owner, owner)
        watch = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "caf_sharing.cli", "watch", name, "--backend", url,
            "--app", "clicluster", "--count", "2", "--timeout", "30",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert watch.stdout is not None
        first = json.loads(await asyncio.wait_for(watch.stdout.readline(), 30))
        assert first == {"name": name, "version": 1}
        await handle.call("put", "b", 2)
        await handle.call("put", "c", 3)
        out, err = await asyncio.wait_for(watch.communicate(), 30)
        assert watch.returncode == 0, err
        lines = [json.loads(line) for line in out.decode().splitlines()]
        assert [c["version"] for c in lines] == [1, 2]
        assert lines[0]["add"] == ["b", 2, "__ca_version__", 2]
        assert lines[1]["add"] == ["c", 3, "__ca_version__", 3]
    assert await asyncio.to_thread(
        main, ["inspect", name, "--backend", url, "--app", "clicluster"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "name": name, "version": 3, "contents": {"a": 1, "b": 2, "c": 3}}
    assert await asyncio.to_thread(
        main, ["inspect", f"{owner}-nothing", "--backend", url, "--app", "clicluster"]) == 2
    assert capsys.readouterr().err.strip() == \
        f"caf-sharing inspect: error: map '{owner}-nothing' does not exist; no app holds a " \
        "map of that name"
