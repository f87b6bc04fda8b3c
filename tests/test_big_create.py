"""add_writable_map with a big initial value (M5): the actor's map is the
copy it validated, the store holds the same map on every backend (staged in
chunks on Redis), a bad value anywhere fails the call and leaves nothing
behind, and a map the store already held keeps its content."""

from __future__ import annotations

from typing import Any

import pytest

from caf_sharing import Actor, Node
from caf_sharing.backends.redis.backend import STAGE_FIELDS
from caf_sharing.errors import InvalidValueError
from test_backend_contract import as_dict

BIG = STAGE_FIELDS * 2 + 7  # staged in three chunks on Redis
NAME = "big-admin-m"


def big_value(n: int = BIG) -> dict[str, Any]:
    return {f"key:{i:06d}": {"n": i, "tags": ["x", i % 3 == 0], "f": i / 4} for i in range(n)}


class Big(Actor):
    async def create(self, value: dict[str, Any]) -> None:
        self.sharing.add_writable_map("m", "m", initial_value=value)

    async def content(self) -> dict[str, Any]:
        return self.sharing.maps.m.to_dict()

    async def version(self) -> int:
        return self.sharing.maps.m.version

    async def set(self, key: str, value: Any) -> None:
        self.sharing.maps.m.set(key, value)

    async def aliases(self) -> list[str]:
        return sorted(self.sharing.maps)


def node_on(url: str, app: str) -> Node:
    # A young test server would delay the first lease (memory:// has no grace).
    options = {} if url.startswith("memory") else {"restart_grace": False}
    return Node(url, app=app, **options)


def count_reads(node: Node, name: str) -> list[str]:
    """The reads of ``name``'s content through ``node``'s backend, from now on."""
    backend = node.service.backend
    read_maps = backend.read_maps
    reads: list[str] = []

    async def counted(names: Any) -> Any:
        reads.extend(n for n in names if n == name)
        return await read_maps(names)

    backend.read_maps = counted  # type: ignore[method-assign]
    return reads


async def test_a_big_create_is_the_same_map_everywhere_and_not_read_back(
        backend_url: str, backend_factory: Any) -> None:
    value = big_value()
    async with node_on(backend_url, backend_factory.app) as node:
        handle = await node.start(Big, "big-admin")
        reads = count_reads(node, NAME)
        await handle.call("create", value)
        assert await handle.call("content") == value
        await handle.call("set", "key:000001", "changed")
        assert await handle.call("version") == 2
        # The actor's map is the copy it validated: the commit created the
        # map from it, so it was not read back.
        assert reads == []
        async with Node(backend_url, app=backend_factory.app) as other:
            view = await other.replica(NAME)
            ref = await view.wait_for(2, timeout=15)
            assert ref.to_dict() == {**value, "key:000001": "changed"}
            await view.close()
        assert as_dict(await node.service.backend.read_map(NAME)) == {
            **value, "key:000001": "changed", "__ca_version__": 2}


async def test_a_bad_value_deep_in_a_big_initial_value_fails_at_the_call(
        backend_url: str, backend_factory: Any) -> None:
    value = big_value()
    value["key:009000"] = {"ok": [1, {"deep": float("nan")}]}
    async with node_on(backend_url, backend_factory.app) as node:
        handle = await node.start(Big, "big-admin")
        with pytest.raises(InvalidValueError, match=r"key:009000.*deep"):
            await handle.call("create", value)
        assert await handle.call("aliases") == []
        assert await node.service.backend.read_map(NAME) is None
        maps, _ = await node.service.backend.survey()
        assert [m.name for m in maps] == []
        # Nothing half-made: the same call with a good value works.
        del value["key:009000"]
        await handle.call("create", value)
        assert await handle.call("content") == value


async def test_a_map_the_store_already_holds_keeps_its_content(
        backend_url: str, backend_factory: Any) -> None:
    async with node_on(backend_url, backend_factory.app) as node:
        stored = {"old": 1}
        await node.service.backend.create_map(
            NAME, {"version": 0, "remove": [], "add": ["old", 1, "__ca_version__", 7]})
        handle = await node.start(Big, "big-admin")
        await handle.call("create", big_value())
        # Created when absent: the store's map stays, and is the actor's.
        assert await handle.call("content") == stored
        version = await handle.call("version")
        assert version >= 7
        await handle.call("set", "new", True)
        assert await handle.call("version") == version + 1
        dump = await node.service.backend.read_map(NAME)
        assert dump is not None and dump["add"][-1] == version + 1
