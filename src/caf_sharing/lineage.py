"""Lineage: what ties every map version to the commit that made it.

DESIGN.md section 9. Every commit has a txid; the store keeps, for each map,
the txid of the commit that made its version, and each published change set
carries ``txid`` (its commit) and ``base_txid`` (the commit of its base
version). The sharing service uses the rules here to keep the guarantees
when the store loses data (a restart from an older snapshot, an empty
restart, a failover to a lagging replica):

* *A replica never goes back.* It remembers the txids of its recent versions
  (:class:`ReplicaLineage`). A change set whose base txid is not the
  replica's, or that re-issues a version the replica holds with another txid,
  means the replica holds history the store lost (or a forged message): it
  is counted, logged with both lineages, and the replica resyncs. A store at
  a higher version is loaded; at the same version with another txid the
  store's content replaces the replica's (the replica's was never durable);
  behind the replica, the replica keeps its version, readable, until the
  writer moves past it.
* *Writers continue above every version a reader may have seen.* A writer
  that takes a map's state from the store instead of its own commits (a
  restart, a move, another node's commits) renumbers it at its first write to
  :func:`adopted_version`, ``max(stored version + 2**20, microseconds since
  the epoch)``: previous writers advanced one version per commit from a lower
  such number, so a version they made and the store lost is never made again
  with other content (unless clocks were skewed by more than the time in
  between).
* *Writers whose store went back heal it.* A node's txids for an actor are
  ``<epoch>-<n>.<random tail>``, one epoch per stay of the actor on the
  node, n counting up (:func:`txid_of`), so the node tells any earlier
  commit of its own from another node's (:meth:`Stays.relation`); the tail
  keeps forgers from using a txid before its commit. When the store holds
  an earlier one, or none, the node re-asserts: it puts back the checkpoint
  and every map of the actor as it holds them.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Literal

from .backends.base import ChangeSet
from .errors import InvalidChangeSetError

__all__ = [
    "ADOPT_MARGIN",
    "LINEAGE_MEMORY",
    "Relation",
    "ReplicaLineage",
    "Stays",
    "adopted_version",
    "dump_version",
    "renumbered",
    "txid_of",
]

#: Smallest renumbering of a map a writer adopts from the store.
ADOPT_MARGIN = 2**20
#: Versions whose txid a replica remembers, to recognise a version re-issued
#: with other content.
LINEAGE_MEMORY = 256

#: How a stored checkpoint relates to what a node holds of an actor.
Relation = Literal["same", "ahead", "behind", "foreign"]


#: Random tails of txids to come (see txid_of), eight hex digits each.
_nonces: list[str] = []
# A forked process draws its own: it must not repeat its parent's.
os.register_at_fork(after_in_child=_nonces.clear)


def txid_of(epoch: str, seq: int) -> str:
    """The txid of commit ``seq`` of an actor's stay on a node (``epoch``):
    ``<epoch>-<seq>.<random tail>``. The store compares txids only for
    equality; a node reads its own back (epoch and seq, see :class:`Stays`).

    The tail is what no peer can guess. A forger that reads a map's channel
    learns the epoch and how far it counted: a change set it sent under the
    next commit's txid, ahead of the real one, would have replicas take the
    real one for a copy of it and keep the forged content for good. With a
    txid it cannot guess, the real change set contradicts the forged one and
    the replica takes the store's content."""
    if not _nonces:  # one system random draw serves 512 commits
        _nonces.extend(os.urandom(2048).hex(" ", 4).split())
    return f"{epoch}-{seq}.{_nonces.pop()}"


def _parse_txid(txid: str | None) -> tuple[str, int] | None:
    """Epoch and seq of a txid of ours (with or without its random tail)."""
    epoch, _, rest = (txid or "").rpartition("-")
    seq = rest.partition(".")[0]
    return (epoch, int(seq)) if epoch and seq.isdigit() else None


def adopted_version(stored: int) -> int:
    """The version a writer continues from when it adopts a map stored at
    ``stored`` (see the module docs)."""
    return max(stored + ADOPT_MARGIN, time.time_ns() // 1000)


def dump_version(dump: ChangeSet) -> int:
    """The version a dump holds (its ``__ca_version__`` pair, last by our backends)."""
    add = dump["add"]
    for i in range(len(add) - 2, -1, -2):
        if add[i] == "__ca_version__":
            version: int = add[i + 1]
            return version
    return 0


def renumbered(dump: ChangeSet, version: int) -> ChangeSet:
    """``dump`` with its version replaced by ``version``."""
    add = list(dump["add"])
    for i in range(len(add) - 2, -1, -2):
        if add[i] == "__ca_version__":
            add[i + 1] = version
    return {"version": 0, "remove": [], "add": add}


class Stays:
    """The actors a node hosts, as lineage sees them: the epoch of each stay
    and the stored commit it started from."""

    def __init__(self) -> None:
        self._epochs: dict[str, str] = {}
        self._resumed: dict[str, str] = {}

    def host(self, actor: str, epoch: str, resumed_txid: str | None) -> None:
        """The node hosts ``actor``, committing as ``epoch``, from the stored
        commit ``resumed_txid`` (``None``: none)."""
        self._epochs[actor] = epoch
        if resumed_txid is None:
            self._resumed.pop(actor, None)
        else:
            self._resumed[actor] = resumed_txid

    def forget(self, actor: str) -> None:
        self._epochs.pop(actor, None)
        self._resumed.pop(actor, None)

    def own(self, actor: str, txid: str | None) -> bool:
        """Whether this node made commit ``txid`` of ``actor`` during its stay."""
        parsed = _parse_txid(txid)
        return parsed is not None and parsed[0] == self._epochs.get(actor)

    def relation(self, actor: str, stored_txid: str | None, held_txid: str | None) -> Relation:
        """How the store's checkpoint ``stored_txid`` of ``actor`` relates to
        ``held_txid``, the last commit this node knows of: the same, a later
        commit this node sent (its reply was lost), an earlier one or none
        (the store went back), or another node's."""
        if stored_txid == held_txid:
            return "same"
        if stored_txid is None:
            return "behind"
        stored = _parse_txid(stored_txid)
        if self.own(actor, stored_txid):
            held = _parse_txid(held_txid) if self.own(actor, held_txid) else None
            assert stored is not None
            return "behind" if held is not None and stored[1] < held[1] else "ahead"
        resumed_txid = self._resumed.get(actor)
        if stored_txid == resumed_txid:
            return "behind"
        resumed = _parse_txid(resumed_txid)
        if stored is not None and resumed is not None and stored[0] == resumed[0] \
                and stored[1] < resumed[1]:  # made before it, on the node it came from
            return "behind"
        return "foreign"


class ReplicaLineage:
    """What a replica knows of the commits behind its versions."""

    __slots__ = ("forked", "seen", "txid")

    def __init__(self) -> None:
        #: Txid of the version the replica holds (None: unknown).
        self.txid: str | None = None
        #: Txids of recent versions, oldest first.
        self.seen: OrderedDict[int, str] = OrderedDict()
        #: Set when the replica holds versions the store lost.
        self.forked = False

    def record(self, version: int, txid: str | None) -> None:
        self.txid = txid
        if txid is not None:
            seen = self.seen
            if version in seen:  # else a new key goes last anyway
                seen.move_to_end(version)
            seen[version] = txid
            if len(seen) > LINEAGE_MEMORY:
                seen.popitem(last=False)

    def conflict(self, version: int, sets: Sequence[Any]) -> str | None:
        """Why change sets ``sets`` contradict a replica at ``version``, or
        None. Shapes are left to the core; this only compares lineage, and
        refuses, on a map that has a lineage, a change set without one and a
        dump (writers publish change sets only: a dump on the channel is
        forged, and would move the replica to any version it names)."""
        txid = self.txid
        for changes in sets:
            if not isinstance(changes, dict) or type(changes.get("version")) is not int:
                return None
            base, made = changes["version"], changes.get("txid")
            if base == 0 and version > 0:  # the core takes it for a dump
                if txid is not None:
                    raise InvalidChangeSetError(
                        "a dump arrived on the channel of a map that has a lineage")
                return None
            if made is None and txid is not None:
                raise InvalidChangeSetError(
                    f"change set of version {base} has no lineage, and the map has one")
            if base == version:
                based_on = changes.get("base_txid")
                if txid is not None and based_on is not None and based_on != txid:
                    return (f"the writer made version {base + 1} on version {base} of commit "
                            f"{based_on!r}, the replica holds it from commit {txid!r}")
                version, txid = base + 1, made
            elif base < version:
                held = self.seen.get(base + 1)
                if held is not None and made is not None and held != made:
                    return (f"version {base + 1} arrived from commit {made!r}, the replica "
                            f"holds it from commit {held!r}")
        return None
