"""Stateful property tests of the compiled core.

`MapMachine` runs random set/delete/set_fun/prepare/commit/abort/apply/dump/
reset sequences against a plain-dict model (and checks the trie's shape,
snapshot isolation and the history after every step). `ReplicationMachine`
feeds a primary's change sets and dumps to two replicas in random order, with
duplicates and gaps; replicas must never roll back and must converge.
Maps run with full and with truncated hashes so collision nodes get exercised.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from caf_sharing import FUNCTION_MARKER, MapRef, SharedMap
from caf_sharing._fastmap import VERSION_KEY, _map_with_hash_bits, _trie_invariants
from caf_sharing.errors import (
    ConcurrentUpdateError,
    InvalidChangeSetError,
    MissedUpdateError,
    PrepareRequiredError,
    ReadOnlyError,
)

TEXT = st.text(st.characters(codec="utf-8"), max_size=4)  # no lone surrogates
SCALARS = (st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 63 - 1)
           | st.floats(allow_nan=False, allow_infinity=False) | TEXT)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (st.lists(inner, max_size=3) | st.tuples(inner, inner)
                   | st.dictionaries(TEXT, inner, max_size=3)),
    max_leaves=6,
)
KEYS = st.sampled_from([f"k{i}" for i in range(10)]) | TEXT.filter(lambda k: k != VERSION_KEY)
HASH_BITS = st.sampled_from([64, 64, 5, 1])
METHOD = {"type": FUNCTION_MARKER, "args": ["x"], "body": "return x"}

SETTINGS = settings(max_examples=300, stateful_step_count=50, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def norm(value: Any) -> Any:
    """What a value reads back as: tuples are lists."""
    if isinstance(value, list | tuple):
        return [norm(v) for v in value]
    if isinstance(value, dict):
        return {k: norm(v) for k, v in value.items()}
    return value


def expected_slice(history: list[Any], version: int, first: int) -> list[Any] | None:
    if first == 0 or first > version:
        return None
    if first == version:
        return []
    if not history or first < history[0]["version"]:
        return None
    return [c for c in history if c["version"] >= first]


class MapMachine(RuleBasedStateMachine):
    """One SharedMap against a dict model."""

    @initialize(bits=HASH_BITS, max_updates=st.sampled_from([0, 3, 100]))
    def start(self, bits: int, max_updates: int) -> None:
        self.bits = bits
        self.m = _map_with_hash_bits(bits, max_updates=max_updates)
        self.max_updates = max_updates
        self.model: dict[str, Any] = {}
        self.version = 0
        self.epoch = 0  # bumped by reset: refs from an older epoch cannot commit
        self.history: list[Any] = []
        self.ref: MapRef | None = None
        self.snapshots: list[tuple[MapRef, dict[str, Any], int]] = []

    # -- helpers -----------------------------------------------------------

    def record(self, changes: Any) -> None:
        self.history.append(changes)
        if self.max_updates == 0:
            self.history = []
        else:
            self.history = self.history[-self.max_updates:]

    def writable(self) -> bool:
        return self.ref is not None and not self.ref_prepared

    # -- the writer's ref --------------------------------------------------

    @rule()
    def take_ref(self) -> None:
        """Takes a new ref; any open one is dropped (abort)."""
        self.ref = self.m.ref()
        self.ref_model = dict(self.model)
        self.ref_base_model = dict(self.model)
        self.ref_base = self.version
        self.ref_epoch = self.epoch
        self.ref_changed = False
        self.ref_prepared = False

    @rule()
    def abort(self) -> None:
        self.ref = None

    @rule(key=KEYS, value=VALUES)
    def set(self, key: str, value: Any) -> None:
        if self.ref is None:
            return
        if self.ref_prepared:
            with pytest.raises(ReadOnlyError):
                self.ref.set(key, value)
            return
        assert self.ref.set(key, value) is self.ref
        self.ref_model[key] = norm(value)
        self.ref_changed = True

    @rule(key=KEYS)
    def delete(self, key: str) -> None:
        if self.ref is None:
            return
        if self.ref_prepared:
            with pytest.raises(ReadOnlyError):
                self.ref.delete(key)
            return
        self.ref.delete(key)
        self.ref_model.pop(key, None)
        self.ref_changed = True

    @precondition(lambda self: self.writable())
    @rule(key=KEYS)
    def set_fun(self, key: str) -> None:
        assert self.ref is not None
        self.ref.set_fun(key, ["x"], "return x")
        self.ref_model[key] = METHOD
        self.ref_changed = True
        assert self.ref.apply_method(key, [[1, 2]]) == [1, 2]

    @precondition(lambda self: self.writable())
    @rule()
    def iterate_while_editing(self) -> None:
        """A view taken mid-edit keeps its content while the ref moves on."""
        assert self.ref is not None
        items = self.ref.items()
        before = dict(self.ref_model)
        self.ref.set("k0", "moved").delete("k1")
        self.ref_model["k0"] = "moved"
        self.ref_model.pop("k1", None)
        self.ref_changed = True
        assert dict(items) == before

    @precondition(lambda self: self.ref is not None)
    @rule()
    def prepare(self) -> None:
        assert self.ref is not None
        if self.ref_prepared:
            with pytest.raises(ReadOnlyError):
                self.ref.prepare()
            return
        changes = self.ref.prepare()
        self.ref_prepared = True
        assert changes["version"] == self.ref_base
        add = list(changes["add"])
        assert add[-2:] == [VERSION_KEY, self.ref_base + 1]
        keys = add[:-2:2] + list(changes["remove"])
        assert len(keys) == len(set(keys))  # normalised: one edit per key
        # The change set turns the base content into the ref's content.
        base = dict(self.ref_base_model)
        for k in changes["remove"]:
            base.pop(k, None)
        base.update(zip(add[:-2:2], add[1:-2:2], strict=True))
        assert base == self.ref_model
        assert self.ref.changes is changes
        assert self.ref.has_changed == self.ref_changed

    @rule()
    def commit(self) -> None:
        if self.ref is None:
            return
        ref = self.ref
        if not (self.ref_prepared and self.ref_changed):
            with pytest.raises(PrepareRequiredError):
                self.m.commit(ref)
            return
        if self.ref_epoch != self.epoch or self.ref_base != self.version:
            with pytest.raises(ConcurrentUpdateError):
                self.m.commit(ref)
            return
        self.m.commit(ref)
        self.model = dict(self.ref_model)
        self.version += 1
        self.record(ref.changes)
        self.ref = None

    # -- replication-side operations on the same map -----------------------

    @rule(removes=st.lists(KEYS, max_size=3), adds=st.dictionaries(KEYS, VALUES, max_size=3),
          jump=st.sampled_from([0, 0, 1, 9]), pair=st.booleans(), wire=st.booleans())
    def apply_current(self, removes: list[str], adds: dict[str, Any], jump: int, pair: bool,
                      wire: bool) -> None:
        add: list[Any] = [x for kv in adds.items() for x in kv]
        new_version = self.version + 1 + jump
        if jump or pair or self.version == 0:
            add += [VERSION_KEY, new_version]
        changes = {"version": self.version, "remove": removes, "add": add}
        if wire:
            changes = orjson.loads(orjson.dumps(changes))
        if jump and (self.version or removes):
            # A change set makes exactly its version + 1, and a dump (version
            # 0) of a later version than 1 has nothing to remove: refused.
            with pytest.raises(InvalidChangeSetError):
                self.m.apply_changes(changes)
            return
        self.m.apply_changes(changes)
        if self.version == 0:
            # A version-0 change set is a dump: it replaces (the empty content).
            self.model = {k: norm(v) for k, v in adds.items()}
            self.history = []
        else:
            for k in removes:
                self.model.pop(k, None)
            self.model.update((k, norm(v)) for k, v in adds.items())
            # What is recorded always carries the version pair.
            recorded = norm(changes)
            if not pair:
                recorded["add"] += [VERSION_KEY, new_version]
            self.record(recorded)
        self.version = new_version

    @precondition(lambda self: self.history)
    @rule(data=st.data())
    def apply_old(self, data: st.DataObject) -> None:
        old = data.draw(st.sampled_from(self.history))
        self.m.apply_changes(old)  # replay: ignored

    @rule(gap=st.integers(1, 20))
    def apply_gap(self, gap: int) -> None:
        with pytest.raises(MissedUpdateError):
            self.m.apply_changes({"version": self.version + gap, "remove": [], "add": []})

    @rule()
    def dump_round_trip(self) -> None:
        dump = orjson.loads(orjson.dumps(self.m.ref(read_only=True).dump()))
        other = _map_with_hash_bits(self.bits)
        other.apply_changes(dump)
        assert other.version == self.version
        assert other.ref().to_dict() == self.model
        self.m.apply_changes(dump)  # not newer: ignored

    @rule(content=st.dictionaries(KEYS, VALUES, max_size=4), ahead=st.integers(1, 3))
    def load_newer_dump(self, content: dict[str, Any], ahead: int) -> None:
        new_version = self.version + ahead
        add = [x for kv in content.items() for x in kv] + [VERSION_KEY, new_version]
        self.m.apply_changes({"version": 0, "remove": [], "add": add})
        self.model = {k: norm(v) for k, v in content.items()}
        self.version = new_version
        self.history = []

    @rule()
    def reset(self) -> None:
        self.m.reset()
        self.model = {}
        self.version = 0
        self.history = []
        self.epoch += 1

    @rule()
    def keep_snapshot(self) -> None:
        self.snapshots.append((self.m.ref(read_only=True), dict(self.model), self.version))
        del self.snapshots[:-6]

    # -- invariants ----------------------------------------------------------

    @invariant()
    def map_matches_model(self) -> None:
        assert self.m.version == self.version
        ref = self.m.ref()
        assert ref.to_dict() == self.model
        assert len(ref) == len(self.model)
        assert _trie_invariants(ref) == len(self.model)
        for key, value in self.model.items():
            assert ref.get(key) == value
            assert ref[key] == value
        assert ref.get("absent-key", 1) == 1

    @invariant()
    def open_ref_matches_its_model(self) -> None:
        if self.ref is not None:
            assert self.ref.to_dict() == self.ref_model
            assert _trie_invariants(self.ref) == len(self.ref_model)
            assert self.ref.version == self.ref_base

    @invariant()
    def snapshots_are_isolated(self) -> None:
        for ref, model, version in self.snapshots:
            assert ref.version == version
            assert ref.to_dict() == model
            assert all(ref.get(k) == v for k, v in model.items())

    @invariant()
    def history_matches(self) -> None:
        ref = self.m.ref(read_only=True)
        for first in {0, 1, self.version - 2, self.version - 1, self.version, self.version + 1}:
            assert ref.updates_slice(first) == expected_slice(self.history, self.version, first)


class ReplicationMachine(RuleBasedStateMachine):
    """A primary and two replicas fed its change sets out of order."""

    @initialize(bits=HASH_BITS)
    def start(self, bits: int) -> None:
        self.bits = bits
        self.primary = SharedMap(max_updates=5)
        self.replicas = [_map_with_hash_bits(bits), _map_with_hash_bits(bits)]
        self.log: list[Any] = []
        self.dumps: list[Any] = [self.primary.ref().dump()]
        self.contents: dict[int, dict[str, Any]] = {0: {}}
        self.seen = [0, 0]

    def resync(self, i: int) -> None:
        self.replicas[i].apply_changes(self.primary.ref(read_only=True).dump())

    def check(self, i: int) -> None:
        replica = self.replicas[i]
        assert replica.version >= self.seen[i], "a replica rolled back"
        self.seen[i] = replica.version
        assert replica.ref().to_dict() == self.contents[replica.version]

    @rule(edits=st.lists(st.tuples(KEYS, st.none() | VALUES), min_size=1, max_size=4))
    def primary_commits(self, edits: list[tuple[str, Any]]) -> None:
        ref = self.primary.ref()
        for key, value in edits:
            if value is None:
                ref.delete(key)
            else:
                ref.set(key, value)
        self.log.append(ref.prepare())
        self.primary.commit(ref)
        self.contents[self.primary.version] = self.primary.ref().to_dict()

    @rule()
    def primary_dumps(self) -> None:
        self.dumps.append(self.primary.ref(read_only=True).dump())

    @precondition(lambda self: self.log)
    @rule(i=st.integers(0, 1), data=st.data(), wire=st.booleans())
    def deliver(self, i: int, data: st.DataObject, wire: bool) -> None:
        changes = data.draw(st.sampled_from(self.log))
        if wire:
            changes = orjson.loads(orjson.dumps(changes))
        try:
            self.replicas[i].apply_changes(changes)
        except MissedUpdateError:
            self.resync(i)
        self.check(i)

    @rule(i=st.integers(0, 1), data=st.data())
    def deliver_dump(self, i: int, data: st.DataObject) -> None:
        self.replicas[i].apply_changes(data.draw(st.sampled_from(self.dumps)))
        self.check(i)

    @rule(i=st.integers(0, 1))
    def catch_up(self, i: int) -> None:
        replica = self.replicas[i]
        updates = self.primary.ref(read_only=True).updates_slice(replica.version)
        if updates is None:
            self.resync(i)
        else:
            replica.apply_changes(updates)
        assert replica.version == self.primary.version
        self.check(i)

    @invariant()
    def replicas_are_consistent(self) -> None:
        for i in range(2):
            self.check(i)

    def teardown(self) -> None:
        for i in range(2):
            self.catch_up(i)
            assert self.replicas[i].ref().to_dict() == self.primary.ref().to_dict()


MapMachine.TestCase.settings = SETTINGS
ReplicationMachine.TestCase.settings = SETTINGS
TestMapMachine = MapMachine.TestCase
TestReplicationMachine = ReplicationMachine.TestCase
