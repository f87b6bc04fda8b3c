"""SharingProxy.apply_delta is whole or nothing (issue 7, section 2).

An actor that catches the error of a bad delta and goes on must commit only
its own edits: no part of the bad delta may stay in its ref.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from caf_sharing import Actor, Node
from caf_sharing.errors import SharingError

V = "__ca_version__"


class Replayer(Actor):
    async def init(self) -> None:
        self.sharing.add_writable_map("mine", "x", initial_value={"a": 1, "b": 2, "c": 3})

    async def version(self) -> int:
        ref = self.sharing.maps.mine
        return int(ref.version)

    async def content(self) -> dict[str, Any]:
        return dict(self.sharing.maps.mine.to_dict())

    async def try_delta(self, changes: Any) -> tuple[str, dict[str, Any], bool]:
        """Edits the ref, then replays `changes` and swallows its error: the
        message commits whatever the ref holds."""
        ref = self.sharing.maps.mine
        ref.set("own", "edit")
        before = ref.to_dict()
        try:
            self.sharing.apply_delta("mine", changes)
        except SharingError as exc:
            assert ref.to_dict() == before, "a bad delta left part of itself"
            return type(exc).__name__, ref.to_dict(), ref.has_changed
        return "applied", ref.to_dict(), ref.has_changed


class Weird(str):
    """A key that compares equal to everything."""

    def __eq__(self, other: object) -> bool:
        return True

    def __ne__(self, other: object) -> bool:
        return False

    __hash__ = str.__hash__


def bad_deltas(v: int) -> list[tuple[dict[str, Any], str]]:
    return [
        # A good remove before a bad one used to stay.
        ({"version": v, "remove": ["a", "\ud800"], "add": [V, v + 1]}, "InvalidChangeSetError"),
        ({"version": v, "remove": ["a", 7], "add": [V, v + 1]}, "InvalidChangeSetError"),
        ({"version": v, "remove": ["a", V], "add": [V, v + 1]}, "InvalidChangeSetError"),
        ({"version": v, "remove": ["a"], "add": ["b", 9, "c", float("nan"), V, v + 1]},
         "InvalidChangeSetError"),
        ({"version": v, "remove": ["a"], "add": ["b", 9, "\udfff", 1, V, v + 1]},
         "InvalidChangeSetError"),
        ({"version": v, "remove": ["a"], "add": ["b", 9, V, v + 7]}, "InvalidChangeSetError"),
        ({"version": v, "remove": ["a"], "add": ["b", 9, V, 2 ** 63 - 1]},
         "InvalidChangeSetError"),
        ({"version": v, "remove": ["a"], "add": ["b", 9, V]}, "InvalidChangeSetError"),
        ({"version": v, "remove": ["a"], "add": ["b", 9], "txid": {1}}, "InvalidChangeSetError"),
        ({"version": v + 5, "remove": ["a"], "add": ["b", 9]}, "MissedUpdateError"),
        ({"version": -1, "remove": ["a"], "add": []}, "InvalidChangeSetError"),
        ({"remove": ["a"], "add": []}, "InvalidChangeSetError"),
    ]


@pytest.fixture
def url() -> str:
    return f"memory://delta-{uuid.uuid4().hex}"


async def test_a_bad_delta_leaves_the_ref_as_it_was(url: str) -> None:
    async with Node(url) as node:
        actor = await node.start(Replayer, "bob-replayer")
        v = await actor.call("version")
        for i in range(len(bad_deltas(v))):
            changes, error = bad_deltas(v)[i]
            outcome, content, changed = await actor.call("try_delta", changes)
            assert outcome == error, changes
            assert content == {"a": 1, "b": 2, "c": 3, "own": "edit"} and changed
            # The message committed its own edit, and only that.
            assert await actor.call("content") == {"a": 1, "b": 2, "c": 3, "own": "edit"}
            v += 1
            assert await actor.call("version") == v
        for not_a_dict in (None, [1], "x"):
            outcome, content, _ = await actor.call("try_delta", not_a_dict)
            assert outcome == "InvalidChangeSetError" and "a" in content


async def test_a_good_delta_applies_whole(url: str) -> None:
    async with Node(url) as node:
        actor = await node.start(Replayer, "bob-replayer")
        v = await actor.call("version")
        changes = {"version": v, "remove": [Weird("a"), "b"],
                   "add": ["b", [1, (2, 3)], Weird("d"), {"x": 1}, V, v + 1],
                   "txid": "elsewhere"}
        outcome, content, _ = await actor.call("try_delta", changes)
        assert outcome == "applied"
        assert content == {"b": [1, [2, 3]], "c": 3, "d": {"x": 1}, "own": "edit"}
        assert await actor.call("content") == content
        # Replayed again, it is old now: ignored; so is a dump.
        outcome, content, _ = await actor.call("try_delta", changes)
        assert outcome == "applied" and "a" not in content
        dump = {"version": 0, "remove": [], "add": ["z", 1, V, 99]}
        outcome, content, _ = await actor.call("try_delta", dump)
        assert outcome == "applied" and "z" not in content


async def test_a_writable_map_is_needed(url: str) -> None:
    class Reader(Replayer):
        async def init(self) -> None:
            self.sharing.add_read_only_map("other", "bob-replayer-x")

        async def replay(self) -> None:
            self.sharing.apply_delta("other", {"version": 1, "remove": [], "add": []})

    async with Node(url) as node:
        await node.start(Replayer, "bob-replayer")
        reader = await node.start(Reader, "bob-reader")
        with pytest.raises(SharingError, match="not writable"):
            await reader.call("replay")
