"""Big maps written whole (a create, a full dump, a re-assert's restore) are
staged in chunks before their commit, so that no call stalls Redis; the
commit renames them into place atomically, readers never see a partial map,
and nothing staged outlives a refused or completed commit. On one server and
on a cluster."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from caf_sharing.backends import MapCreate, MapWrite
from caf_sharing.backends.redis import RedisBackend
from caf_sharing.backends.redis.backend import STAGE_FIELDS
from caf_sharing.errors import ConcurrentUpdateError
from test_backend_contract import ACTOR, MAP, NODE, V, as_dict, changes, dump, tx

pytestmark = pytest.mark.redis

BIG = STAGE_FIELDS * 2 + 7  # three chunks


def big(n: int = BIG, tag: str = "v") -> dict[str, Any]:
    return {f"k{i}": f"{tag}{i}" for i in range(n)}


@pytest.fixture(params=["redis", "cluster"])
async def pair(request: pytest.FixtureRequest, backend_factory: Any) -> tuple[RedisBackend, ...]:
    # Not about restarts: no wait for a young server before the first lease.
    writer = await backend_factory(request.param, restart_grace=False)
    reader = await backend_factory(request.param)
    return writer, reader


def stage_keys(backend: RedisBackend, factory: Any, kind: str) -> list[bytes]:
    """Every staged hash left in the store for this test's app."""
    pattern = f"caf:{backend.app}:*:stage:*"
    if kind == "cluster":
        cluster = factory._request.getfixturevalue("redis_cluster")
        found: list[bytes] = []
        for node in cluster.masters():
            with cluster.client(node) as client:
                found += list(client.scan_iter(match=pattern))
        return found
    server = factory._request.getfixturevalue("redis_server")
    with redis.Redis(port=server.port) as client:
        return list(client.scan_iter(match=pattern))


def kind_of(backend: RedisBackend) -> str:
    return "cluster" if backend.cluster else "redis"


def watch_staging(backend: RedisBackend, during: Any) -> list[Any]:
    """Run ``during(staged)`` after the backend stages and before it commits."""
    original = backend._stage
    seen: list[Any] = []

    async def stage(enc: Any, big: Any) -> dict[str, str]:
        staged = await original(enc, big)
        seen.append(await during(staged))
        return staged

    backend._stage = stage  # type: ignore[method-assign]
    return seen


async def test_a_big_create_is_staged_and_invisible_until_its_commit(
        pair: tuple[RedisBackend, RedisBackend], backend_factory: Any) -> None:
    writer, reader = pair
    await writer.acquire_lease(ACTOR, NODE, 30.0)

    async def peek(staged: dict[str, str]) -> Any:
        return list(staged), await reader.read_map(MAP)

    seen = watch_staging(writer, peek)
    assert await writer.commit(tx("t0", creates=[MapCreate(MAP, dump(1, big()))],
                                  writes=[MapWrite(MAP, changes(1, {"x": 1}))]))
    assert seen == [(["c0"], None)]  # staged, and no reader saw any of it
    stored = as_dict(await reader.read_map(MAP))
    assert len(stored) == BIG + 2 and stored["x"] == 1 and stored[V] == 2
    assert stored["k0"] == "v0" and stored[f"k{BIG - 1}"] == f"v{BIG - 1}"
    assert stage_keys(writer, backend_factory, kind_of(writer)) == []


async def test_a_big_full_dump_replaces_the_map_whole(
        pair: tuple[RedisBackend, RedisBackend], backend_factory: Any) -> None:
    writer, reader = pair
    await writer.acquire_lease(ACTOR, NODE, 30.0)
    await writer.create_map(MAP, dump(0, {"old": 1}))
    assert await writer.commit(tx("t0", writes=[MapWrite(MAP, changes(0, {"a": 1}))]))
    await writer.delete_map(MAP)  # the store lost it: the writer sends its dump

    async def peek(staged: dict[str, str]) -> Any:
        return await reader.read_map(MAP)

    seen = watch_staging(writer, peek)
    full = dump(2, big(tag="w"))
    assert await writer.commit(tx("t1", prev="t0", writes=[
        MapWrite(MAP, changes(1, {"b": 2}), full)]))
    assert seen == [None]
    stored = as_dict(await reader.read_map(MAP))
    assert len(stored) == BIG + 1 and stored[V] == 2 and stored["k5"] == "w5"
    assert stage_keys(writer, backend_factory, kind_of(writer)) == []


async def test_a_refused_commit_leaves_nothing_staged(
        pair: tuple[RedisBackend, RedisBackend], backend_factory: Any) -> None:
    writer, reader = pair
    await writer.acquire_lease(ACTOR, NODE, 30.0)
    await writer.create_map(MAP, dump(0, {"a": 1}))
    assert await writer.commit(tx("t0", writes=[MapWrite(MAP, changes(0, {"b": 1}))]))
    with pytest.raises(ConcurrentUpdateError):
        await writer.commit(tx("t1", prev="t0", writes=[
            MapWrite(MAP, changes(0, {"c": 1}), dump(1, big()))]))
    # A full dump on a map that exists is not used, and not left behind either.
    assert await writer.commit(tx("t1", prev="t0", writes=[
        MapWrite(MAP, changes(1, {"c": 1}), dump(2, big()))]))
    assert as_dict(await reader.read_map(MAP)) == {"a": 1, "b": 1, "c": 1, V: 2}
    assert stage_keys(writer, backend_factory, kind_of(writer)) == []


async def test_a_lost_stage_is_staged_again(
        pair: tuple[RedisBackend, RedisBackend], backend_factory: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    writer, reader = pair
    await writer.acquire_lease(ACTOR, NODE, 30.0)
    lost = []

    async def lose(staged: dict[str, str]) -> None:
        if not lost:  # the first attempt's stage vanishes (a failover, say)
            for key in staged.values():
                await writer._router.call_one(("DEL", key), ACTOR, "test")
            lost.append(True)

    watch_staging(writer, lose)
    assert await writer.commit(tx("t0", creates=[MapCreate(MAP, dump(1, big()))]))
    assert "lost its staged maps; staging them again" in caplog.text
    assert len(as_dict(await reader.read_map(MAP))) == BIG + 1
    assert stage_keys(writer, backend_factory, kind_of(writer)) == []
