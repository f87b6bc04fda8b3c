"""The lineage rules on their own: how a node tells its own commits from
another node's, and how a replica tells a fork."""

from __future__ import annotations

import os
import time

import pytest

from caf_sharing.errors import InvalidChangeSetError
from caf_sharing.lineage import (
    ADOPT_MARGIN,
    LINEAGE_MEMORY,
    ReplicaLineage,
    Stays,
    adopted_version,
    dump_version,
    renumbered,
    txid_of,
)


def test_a_node_tells_its_own_commits_by_epoch() -> None:
    stays = Stays()
    stays.host("ann-w", "e1", None)
    assert stays.own("ann-w", txid_of("e1", 3))
    assert not stays.own("ann-w", txid_of("e2", 3))
    assert not stays.own("bob-w", txid_of("e1", 3))
    assert not stays.own("ann-w", "e1") and not stays.own("ann-w", None)
    stays.forget("ann-w")
    assert not stays.own("ann-w", txid_of("e1", 3))


def test_a_txid_ends_with_a_tail_nobody_can_guess() -> None:
    txids = [txid_of("e1", 7) for _ in range(2000)]  # more than one draw of tails
    assert len(set(txids)) == 2000
    for txid in txids:
        stem, _, tail = txid.partition(".")
        assert stem == "e1-7" and len(tail) == 8 and int(tail, 16) >= 0
    assert len({txid[-8:] for txid in txids}) == 2000


def test_a_forked_process_draws_tails_of_its_own() -> None:
    txid_of("e1", 1)  # tails drawn in this process, some left for the child
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next tail, then out
        os.write(write, txid_of("e1", 2).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    assert child != txid_of("e1", 2)  # the parent's next tail is not the child's


@pytest.mark.parametrize(("stored", "held", "relation"), [
    ("e1-5", "e1-5", "same"),
    ("e1-6.a1b2c3d4", "e1-5.00ff00ff", "ahead"),  # tails do not count
    ("e1-4.a1b2c3d4", "e1-5", "behind"),
    (None, None, "same"),
    ("e1-6", "e1-5", "ahead"),      # its commit landed, the reply was lost
    ("e1-1", None, "ahead"),        # the first commit of the stay landed
    ("e1-4", "e1-5", "behind"),     # the store went back on this stay's commits
    (None, "e1-5", "behind"),       # the store lost the checkpoint
    ("r-9", "e1-5", "behind"),      # back to where the stay resumed from
    ("r-3", "e1-5", "behind"),      # ... or before it, on the node it came from
    ("r-10", "e1-5", "foreign"),    # that node went on after this one resumed
    ("x-1", "e1-5", "foreign"),     # another node
    ("t1", "e1-5", "foreign"),      # txids of another kind
])
def test_relation_of_the_stored_commit(stored: str | None, held: str | None,
                                       relation: str) -> None:
    stays = Stays()
    stays.host("ann-w", "e1", "r-9")
    assert stays.relation("ann-w", stored, held) == relation


def test_an_adopted_map_continues_above_any_version_made_before() -> None:
    before = time.time_ns() // 1000
    assert adopted_version(5) >= before
    assert adopted_version(before * 2) == before * 2 + ADOPT_MARGIN
    dump = {"version": 0, "remove": [], "add": ["a", 1, "__ca_version__", 7], "txid": "t"}
    assert dump_version(dump) == 7
    assert renumbered(dump, 99) == {"version": 0, "remove": [],
                                    "add": ["a", 1, "__ca_version__", 99]}
    assert dump["add"][-1] == 7  # a copy
    assert dump_version({"version": 0, "remove": [], "add": []}) == 0


def changes(base: int, txid: str | None, base_txid: str | None) -> dict[str, object]:
    return {"version": base, "remove": [], "add": [], "txid": txid, "base_txid": base_txid}


def test_a_replica_tells_a_fork_from_a_duplicate() -> None:
    lineage = ReplicaLineage()
    assert lineage.conflict(3, [changes(3, "t4", "whatever")]) is None  # nothing known yet
    lineage.record(3, "t3")
    lineage.record(4, "t4")
    assert lineage.conflict(4, [changes(4, "t5", "t4")]) is None
    assert lineage.conflict(4, [changes(3, "t4", "t3")]) is None        # a duplicate
    fork = lineage.conflict(4, [changes(4, "t5", "x4")])
    assert fork is not None and "'x4'" in fork and "'t4'" in fork
    reissued = lineage.conflict(4, [changes(3, "y4", "t3")])
    assert reissued is not None and "version 4" in reissued
    # A list chains: the second element must build on the first.
    assert lineage.conflict(4, [changes(4, "t5", "t4"), changes(5, "t6", "t5")]) is None
    assert lineage.conflict(4, [changes(4, "t5", "t4"), changes(5, "t6", "zz")]) is not None
    # A dump on the channel is refused once there is a lineage; shapes are
    # left to the core.
    with pytest.raises(InvalidChangeSetError, match="a dump arrived"):
        lineage.conflict(4, [{"version": 0, "remove": [], "add": [], "txid": "t99",
                              "base_txid": None}])
    assert ReplicaLineage().conflict(4, [{"version": 0, "remove": [], "add": []}]) is None
    assert lineage.conflict(4, ["junk"]) is None
    with pytest.raises(InvalidChangeSetError, match="no lineage"):
        lineage.conflict(4, [{"version": 4, "remove": [], "add": []}])


def test_a_replica_remembers_a_bounded_number_of_versions() -> None:
    lineage = ReplicaLineage()
    for v in range(1, LINEAGE_MEMORY + 11):
        lineage.record(v, f"t{v}")
    assert len(lineage.seen) == LINEAGE_MEMORY
    assert 1 not in lineage.seen and lineage.seen[LINEAGE_MEMORY + 10] == lineage.txid
    lineage.record(LINEAGE_MEMORY + 11, None)  # unknown lineage: nothing to remember
    assert lineage.txid is None and len(lineage.seen) == LINEAGE_MEMORY
