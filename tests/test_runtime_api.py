"""Node, actor and proxy API: calls, aborts, registrations, refusals, mailbox."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from caf_sharing import Actor, MapRef, Node
from caf_sharing.errors import (
    ActorError,
    ActorStoppedError,
    InvalidChangeSetError,
    InvalidNameError,
    InvalidTypeError,
    MailboxFullError,
    MapNotFoundError,
    MissedUpdateError,
    SharingError,
    UnknownActorMethodError,
)
from caf_sharing.plug import UnknownAliasError


@pytest.fixture
def url() -> str:
    return f"memory://api-{uuid.uuid4().hex}"


class Owner(Actor):
    async def init(self) -> None:
        self.sharing.add_writable_map("mine", "x", initial_value={"k": 1})
        self.state["n"] = 0

    async def add(self, alias: str, name: str, **options) -> None:
        self.sharing.add_writable_map(alias, name, **options)

    async def add_ro(self, alias: str, name: str, **options) -> None:
        self.sharing.add_read_only_map(alias, name, **options)

    async def delete(self, alias: str) -> None:
        self.sharing.delete_map(alias)

    async def use_same_message(self) -> None:
        self.sharing.add_writable_map("fresh", "fresh")
        self.sharing.maps.fresh  # noqa: B018 - the access itself must fail

    async def get(self, alias: str, key: str):
        ref = self.sharing.maps[alias]
        return None if ref is None else ref.get(key)

    async def set(self, alias: str, key: str, value) -> int:
        getattr(self.sharing.maps, alias).set(key, value)
        return self.sharing.maps[alias].version

    async def aliases(self) -> list[str]:
        return sorted(self.sharing.maps)

    async def full(self, name: str) -> str:
        return self.sharing.full_name(name)

    async def bad_state(self) -> None:
        self.state["s"] = {1, 2}

    async def pull(self, alias: str, version=None):
        return self.sharing.pull_update(alias, version)

    async def delta(self, alias: str, changes) -> None:
        self.sharing.apply_delta(alias, changes)

    async def slow(self, gate: asyncio.Event) -> str:
        await gate.wait()
        return "done"

    async def _private(self) -> None: ...

    def sync_method(self) -> None: ...


async def test_call_and_state(url) -> None:
    async with Node(url) as node:
        owner = await node.start(Owner, "bob-owner")
        assert await owner.call("get", "mine", "k") == 1
        assert await owner.call("full", "y") == "bob-owner-y"
        assert await owner.call("full", "bob-owner-y") == "bob-owner-y"
        with pytest.raises(InvalidNameError, match="belongs to actor 'eve-admin'"):
            await owner.call("full", "eve-admin-x")


async def test_unknown_and_private_methods(url) -> None:
    async with Node(url) as node:
        owner = await node.start(Owner, "bob-owner")
        for name in ("nope", "_private", "init", "resume", "sync_method"):
            with pytest.raises(UnknownActorMethodError):
                await owner.call(name)


async def test_registrations_take_effect_at_commit(url) -> None:
    async with Node(url) as node:
        owner = await node.start(Owner, "bob-owner")
        with pytest.raises(UnknownAliasError, match="next message"):
            await owner.call("use_same_message")
        assert await owner.call("aliases") == ["mine"]  # the failed add was aborted
        await owner.call("add", "y", "y", initial_value={"v": [1, 2]})
        assert await owner.call("get", "y", "v") == [1, 2]
        await owner.call("delete", "y")
        with pytest.raises(UnknownAliasError, match="aliases: mine"):
            await owner.call("get", "y", "v")


async def test_refusals_at_the_call(url) -> None:
    async with Node(url) as node:
        dave = await node.start(Owner, "dave-admin")
        with pytest.raises(InvalidNameError, match="eve-admin"):
            await dave.call("add", "x", "eve-admin-x")
        with pytest.raises(SharingError, match="cannot be writable"):
            await dave.call("add", "x", "x", aggregate=True)
        with pytest.raises(SharingError, match="initial value"):
            await dave.call("add_ro", "x", "eve-admin-x", initial_value={"a": 1})
        with pytest.raises(InvalidNameError):
            await dave.call("add_ro", "x", "not a name")
        with pytest.raises(InvalidNameError, match="already refers"):
            await dave.call("add", "mine", "other")
        with pytest.raises(InvalidTypeError):
            await dave.call("add", "bad", "bad", initial_value={"k": object()})
        with pytest.raises(MapNotFoundError, match="eve-admin-x"):
            await dave.call("add_ro", "x", "eve-admin-x")
        # best effort: the alias exists and reads as None until the map appears
        await dave.call("add_ro", "later", "eve-admin-x", best_effort=True)
        assert await dave.call("get", "later", "k") is None
        assert await dave.call("aliases") == ["later", "mine"]


async def test_state_must_be_json(url) -> None:
    async with Node(url) as node:
        owner = await node.start(Owner, "bob-owner")
        with pytest.raises(InvalidTypeError, match="not JSON"):
            await owner.call("bad_state")
        assert owner.actor.state == {"n": 0}


async def test_mailbox_bound_and_one_at_a_time(url) -> None:
    async with Node(url, mailbox_size=2) as node:
        owner = await node.start(Owner, "bob-owner")
        gate = asyncio.Event()
        first = asyncio.ensure_future(owner.call("slow", gate))
        await asyncio.sleep(0.01)
        queued = [asyncio.ensure_future(owner.call("get", "mine", "k")) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(MailboxFullError, match="bob-owner"):
            await owner.call("get", "mine", "k")
        assert not any(q.done() for q in queued)  # one message at a time
        gate.set()
        assert await first == "done"
        assert await asyncio.gather(*queued) == [1, 1]


async def test_stop_and_calls_after(url) -> None:
    async with Node(url) as node:
        owner = await node.start(Owner, "bob-owner")
        with pytest.raises(ActorError, match="already runs"):
            await node.start(Owner, "bob-owner")
        await node.stop("bob-owner")
        with pytest.raises(ActorStoppedError):
            await owner.call("get", "mine", "k")
        with pytest.raises(ActorError):
            await node.stop("bob-owner")
        with pytest.raises(InvalidNameError):
            await node.start(Owner, "no_dash")


async def test_pull_update_and_apply_delta(url) -> None:
    async with Node(url) as node:
        owner = await node.start(Owner, "bob-owner")
        v = await owner.call("set", "mine", "a", 1)
        await owner.call("set", "mine", "b", 2)
        dump = await owner.call("pull", "mine")
        assert dump["version"] == 0 and "__ca_version__" in dump["add"]
        updates = await owner.call("pull", "mine", v)
        assert [u["version"] for u in updates] == [v, v + 1]
        assert await owner.call("pull", "mine", v + 2) == []
        # replay a change set made elsewhere
        delta = {"version": v + 2, "remove": ["a"], "add": ["z", {"q": 1}, "__ca_version__", v + 3]}
        await owner.call("delta", "mine", delta)
        assert await owner.call("get", "mine", "z") == {"q": 1}
        assert await owner.call("get", "mine", "a") is None
        await owner.call("delta", "mine", delta)  # old now: ignored
        with pytest.raises(MissedUpdateError):
            await owner.call("delta", "mine", {"version": 99, "remove": [], "add": []})
        # Checked as apply_changes checks a change set: InvalidChangeSetError.
        with pytest.raises(InvalidChangeSetError, match="'bad': type set is not JSON"):
            await owner.call("delta", "mine", {"version": v + 3, "remove": ["z"],
                                                "add": ["ok", 1, "bad", {1, 2}]})
        assert await owner.call("get", "mine", "z") == {"q": 1}  # nothing applied


async def test_maps_view_hands_out_refs(url) -> None:
    class Peek(Owner):
        async def peek(self) -> bool:
            return isinstance(self.sharing.maps.mine, MapRef) and "mine" in self.sharing.maps

    async with Node(url) as node:
        peek = await node.start(Peek, "bob-peek")
        assert await peek.call("peek")


async def test_cancellation_inside_a_message_does_not_kill_the_actor(url) -> None:
    class Canceller(Owner):
        async def cancel_inner(self) -> None:
            self.state["n"] = 99
            task = asyncio.ensure_future(asyncio.sleep(10))
            task.cancel()
            await task

    async with Node(url) as node:
        actor = await node.start(Canceller, "bob-cancel")
        with pytest.raises(asyncio.CancelledError):
            await actor.call("cancel_inner")
        assert actor.actor.state == {"n": 0}  # aborted
        assert await actor.call("get", "mine", "k") == 1  # and still serving


async def test_caller_cancelling_does_not_half_commit(url) -> None:
    async with Node(url) as node:
        owner = await node.start(Owner, "bob-owner")
        gate = asyncio.Event()
        slow = asyncio.ensure_future(owner.call("slow", gate))
        queued = asyncio.ensure_future(owner.call("set", "mine", "k", 2))
        await asyncio.sleep(0.01)
        queued.cancel()  # the caller gives up before the message runs
        gate.set()
        assert await slow == "done"
        assert await owner.call("get", "mine", "k") == 1


def test_a_registration_round_trips_through_its_checkpoint_entry_whole() -> None:
    import dataclasses

    from caf_sharing.plug import MapInfo

    info = MapInfo("ann-admin-m", writable=False, aggregate=True, best_effort=True,
                   no_exec=True, link_key="links", on_change="changed")
    # Every field is written (a field added later must be too) and read back.
    assert info.to_json() == dataclasses.asdict(info)
    assert MapInfo.from_json("m", info.to_json()) == info
    plain = MapInfo("ann-admin-m", writable=True)
    assert "on_change" not in plain.to_json()
    assert MapInfo.from_json("m", plain.to_json()) == plain
