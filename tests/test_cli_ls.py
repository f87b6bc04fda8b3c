"""``caf-sharing ls``, ``inspect``'s hint for a map in another app, and
``watch`` waiting for a map that does not exist yet, on one Redis server and
on a Redis Cluster."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from typing import Any

import pytest

from caf_sharing import Actor, Node
from caf_sharing.cli import main

pytestmark = pytest.mark.redis

KINDS = ["redis", "cluster"]


class Owner(Actor):
    async def init(self) -> None:
        self.sharing.add_writable_map("m", "m", initial_value={"a": 1})

    async def put(self, key: str, value: int) -> None:
        self.sharing.maps.m.set(key, value)


def ls(url: str, *args: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in _run(["ls", "--backend", url, "--json", *args])]


def _run(argv: list[str]) -> list[str]:
    from contextlib import redirect_stdout
    from io import StringIO

    out = StringIO()
    with redirect_stdout(out):
        assert main(argv) == 0
    return out.getvalue().splitlines()


@pytest.mark.parametrize("kind", KINDS)
async def test_ls_lists_maps_and_actors_of_one_app_or_all(kind: str, backend_factory: Any,
                                                           capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    url = backend_factory.url(kind)
    one, two = f"ls{uuid.uuid4().hex[:8]}", f"ls{uuid.uuid4().hex[:8]}"
    async with Node(url, app=one) as node, Node(url, app=two) as other:
        owner = await node.start(Owner, "carol-owner")
        await owner.call("put", "b", 2)
        await other.start(Owner, "carol-owner")
        listed = await asyncio.to_thread(ls, url, "--app", one)
        assert {"map": "carol-owner-m", "app": one, "version": 2, "keys": 2,
                "bytes": listed[0]["bytes"]} == listed[0] and listed[0]["bytes"] > 0
        actor = listed[1]
        assert (actor["actor"], actor["app"], actor["holder"]) == ("carol-owner", one,
                                                                   node.node_id)
        assert actor["txid"] is not None and 0 < actor["ttl"] <= node.lease_ttl
        assert len(listed) == 2
        every = await asyncio.to_thread(ls, url)
        assert {(item.get("map") or item["actor"], item["app"]) for item in every} >= {
            ("carol-owner-m", one), ("carol-owner", one),
            ("carol-owner-m", two), ("carol-owner", two)}
        table = await asyncio.to_thread(_run, ["ls", "--backend", url, "--app", one])
        assert table[0] == f"app {one}" and "carol-owner-m" in table[2]
    # Released at close: no holder any more, the checkpoint stays.
    after = await asyncio.to_thread(ls, url, "--app", one)
    assert after[1]["holder"] is None and after[1]["txid"] == actor["txid"]


@pytest.mark.parametrize("kind", KINDS)
async def test_inspect_names_the_apps_holding_a_missing_map(
        kind: str, backend_factory: Any, capsys: pytest.CaptureFixture[str]) -> None:
    url = backend_factory.url(kind)
    app = f"in{uuid.uuid4().hex[:8]}"
    async with Node(url, app=app) as node:
        await node.start(Owner, "dave-owner")
    capsys.readouterr()
    assert await asyncio.to_thread(
        main, ["inspect", "dave-owner-m", "--backend", url, "--app", "elsewhere"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"does not exist; it exists in app(s) {app}: add --app {app}" in err
    assert await asyncio.to_thread(
        main, ["inspect", "nobody-owner-m", "--backend", url]) == 2
    assert "no app holds a map of that name" in capsys.readouterr().err


@pytest.mark.parametrize("kind", KINDS)
async def test_watch_waits_for_a_map_that_does_not_exist_yet(kind: str,
                                                             backend_factory: Any) -> None:
    url = backend_factory.url(kind)
    app = f"wa{uuid.uuid4().hex[:8]}"
    watch = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "caf_sharing.cli", "watch", "erin-owner-m", "--backend", url,
        "--app", app, "--count", "1", "--timeout", "60",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert watch.stderr is not None and watch.stdout is not None
    waiting = await asyncio.wait_for(watch.stderr.readline(), 30)
    assert b"does not exist yet" in waiting and b"waiting for it" in waiting
    async with Node(url, app=app) as node:
        owner = await node.start(Owner, "erin-owner")
        first = json.loads(await asyncio.wait_for(watch.stdout.readline(), 30))
        assert first == {"name": "erin-owner-m", "version": 1}
        await owner.call("put", "b", 2)
        out, err = await asyncio.wait_for(watch.communicate(), 30)
    assert watch.returncode == 0, err
    assert json.loads(out)["add"] == ["b", 2, "__ca_version__", 2]


@pytest.mark.parametrize("kind", KINDS)
async def test_demo_deletes_its_data_unless_kept_and_says_where_it_was(
        kind: str, backend_factory: Any) -> None:
    from caf_sharing.demo import KEEP_SECONDS, MAP_NAME, run_demo

    url = backend_factory.url(kind)
    gone = await run_demo(url, readers=2, commits=5)
    assert gone.ok and f"app namespace {gone.app}: its keys are deleted" in gone.table()
    assert await asyncio.to_thread(ls, url, "--app", gone.app) == []
    kept = await run_demo(url, readers=2, commits=5, keep=True)
    table = kept.table()
    assert f"kept for 1 h; try\n  caf-sharing inspect {MAP_NAME} --backend {url} " \
           f"--app {kept.app}" in table
    listed = await asyncio.to_thread(ls, url, "--app", kept.app)
    assert {"map": MAP_NAME, "app": kept.app, "version": 6, "keys": 1,
            "bytes": listed[0]["bytes"]} == listed[0]
    store = await backend_factory(kind)
    ttl_left = await store._router.call_one(  # type: ignore[attr-defined]
        ("PTTL", f"caf:{kept.app}:{{alice-admin}}:map:{MAP_NAME}"), "alice-admin", "test")
    assert 0 < ttl_left <= KEEP_SECONDS * 1000
    make = type(store)
    cleanup = make(url, app=kept.app)
    await cleanup.start()
    await cleanup.purge()
    await cleanup.close()
