"""A checker of recorded multi-process histories against the contract.

Writer and reader processes (``history_worker.py``) log what they saw as JSON
lines; the harness (``history_harness.py``) adds the faults it injected and the
store's final state. :func:`check_history` judges the whole history against
the guarantees of DESIGN.md section 1 and reports counts and examples.

Records (every one has ``kind``; ``t*`` are ``time.time()`` seconds):

* ``commit`` — a writer message that was acknowledged: ``proc``, ``actor``,
  ``seq``, ``n`` (the counter it wrote), ``tok`` (a token unique to the
  message), ``t0``/``t1`` (call sent / reply received), ``begin`` (``state_n``,
  ``m_n``, ``m2_n``: the counter in ``self.state`` and in both maps when the
  message began) and ``maps`` (alias -> view of the map as the writer holds it
  after the commit; empty when the writer could not tell).
* ``observe`` — one reader message: ``proc``, ``actor``, ``seq``, ``tc``
  (call sent), ``tb`` (inside the method, before reading), ``before`` and
  ``after`` (alias -> view, read before and after an ``await``).
* ``error`` — a message (or an actor start) that failed: ``proc``, ``actor``,
  ``seq``, ``t``, ``error`` (exception class), ``message``.
* ``fault`` — one fault the harness injected: ``fault``, ``t``.
* ``restart`` — a reader actor stopped and started again on its process
  (``proc``, ``actor``, ``t``), as a ``restart_reader`` fault asks.
* ``final`` — the store after the run: ``maps`` (alias -> view or null),
  ``log`` (counter as a string -> token of every commit the store holds) and
  ``state_n`` (the counter in the writer's checkpoint, or null).

A view is ``{"v": version, "d": digest of the content, "n": counter, "tok":
token}``, plus ``"txid"`` when the observer knows it. The maps are ``m`` and
``m2``: one writer message writes the same ``n`` and ``tok`` into both.

Violation kinds, by guarantee:

* ``commit_order`` (1, single writer): a commit acknowledged before another
  was sent has a counter that is not lower — the later commit did not build on
  it (a second writer, or a store that went back);
* ``one_content`` (1): one (map, version) seen with two contents (or txids)
  anywhere: a fork;
* ``isolation`` (2): a view changed within one message;
* ``fairness`` (3): a message started on a process after another actor of the
  same process had seen a newer version of the map, and saw an older one;
* ``atomicity`` (4): one snapshot shows ``m`` and ``m2`` from different
  messages, or the writer began a message with ``self.state`` and its maps
  from different messages (the final state is held to the same rule);
* ``monotonic`` (5): a (process, actor, map) saw a version lower than one it
  had seen before;
* ``lost_commit``: an acknowledged commit is not in the final store state.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

__all__ = ["MAPS", "VIOLATION_KINDS", "HistoryError", "HistoryReport", "check_history",
           "digest", "load_history"]

#: The aliases of the two maps one writer message writes together.
MAPS = ("m", "m2")

VIOLATION_KINDS = ("commit_order", "one_content", "isolation", "fairness", "atomicity",
                   "monotonic", "lost_commit")

#: Examples kept per violation kind (all of them are counted), one per incident.
EXAMPLES = 5

Record = Mapping[str, Any]


class HistoryError(ValueError):
    """A history that cannot be judged: a malformed record, or no final state."""


def digest(content: Mapping[str, Any]) -> str:
    """A short fingerprint of a map's content, equal for equal content."""
    return hashlib.sha1(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def load_history(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Every record of the given JSON-lines files, in file order."""
    records = []
    for path in paths:
        with path.open("rb") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    raise HistoryError(f"{path}:{number}: not JSON: {exc}") from None
                if not isinstance(record, dict) or not isinstance(record.get("kind"), str):
                    raise HistoryError(f"{path}:{number}: a record needs a 'kind': {line!r}")
                records.append(record)
    return records


@dataclass
class HistoryReport:
    """What a history holds and every violation found in it."""

    commits: int = 0
    observations: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    #: Reader actors restarted in place (``restart`` records).
    restarts: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    #: Longest run of consecutive failed messages of one (process, actor).
    max_error_streak: int = 0
    violation_counts: Counter[str] = field(default_factory=Counter)
    #: Per kind, the distinct incidents: violations with one cause (a replica
    #: that went back once and stayed behind for 100 messages is 1 incident).
    incidents: dict[str, set[Any]] = field(default_factory=lambda: defaultdict(set))
    examples: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))

    @property
    def ok(self) -> bool:
        return not self.violation_counts

    def violation(self, kind: str, example: Any, incident: Any = None) -> None:
        """Count one violation; ``incident`` (hashable, default: the example
        itself) groups those of one cause, and only an incident's first
        violation is kept as an example."""
        if kind not in VIOLATION_KINDS:
            raise ValueError(f"unknown violation kind {kind!r}")
        self.violation_counts[kind] += 1
        key = json.dumps(example, sort_keys=True, default=str) if incident is None else incident
        if key in self.incidents[kind]:
            return
        self.incidents[kind].add(key)
        if len(self.examples[kind]) < EXAMPLES:
            self.examples[kind].append(example)

    def to_json(self) -> dict[str, Any]:
        return {"commits": self.commits, "observations": self.observations,
                "faults": dict(self.faults), "restarts": self.restarts,
                "errors": dict(self.errors),
                "max_error_streak": self.max_error_streak,
                "violations": {kind: self.violation_counts[kind] for kind in VIOLATION_KINDS},
                "incidents": {kind: len(self.incidents[kind]) for kind in VIOLATION_KINDS},
                "examples": {kind: list(found) for kind, found in self.examples.items()}}

    def summary(self) -> str:
        faults = ", ".join(f"{name} {count}" for name, count in sorted(self.faults.items()))
        errors = ", ".join(f"{name} {count}" for name, count in self.errors.most_common())
        lines = [f"commits acknowledged: {self.commits}",
                 f"observations: {self.observations}",
                 f"faults injected: {sum(self.faults.values())} ({faults or 'none'}), "
                 f"reader actors restarted: {self.restarts}",
                 f"failed messages: {sum(self.errors.values())} ({errors or 'none'}), "
                 f"longest streak {self.max_error_streak}",
                 "violations (incidents): " + ", ".join(
                     f"{kind} {self.violation_counts[kind]} ({len(self.incidents[kind])})"
                     for kind in VIOLATION_KINDS)]
        for kind in VIOLATION_KINDS:
            for example in self.examples.get(kind, ()):
                lines.append(f"  {kind}: {json.dumps(example, default=str)[:400]}")
        return "\n".join(lines)


def _field(record: Record, name: str, kind: type | tuple[type, ...]) -> Any:
    value = record.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise HistoryError(f"{record.get('kind')} record needs '{name}' "
                           f"({getattr(kind, '__name__', kind)}): {dict(record)!r}")
    return value


def _views(record: Record, name: str) -> dict[str, Any]:
    views: dict[str, Any] = _field(record, name, dict)
    for alias, view in views.items():
        if view is not None and not (isinstance(view, dict) and isinstance(view.get("v"), int)
                                     and isinstance(view.get("d"), str)):
            raise HistoryError(f"{record['kind']} record: view {name}.{alias} needs an "
                               f"int 'v' and a str 'd': {view!r}")
    return views


class _Checker:
    def __init__(self, records: Iterable[Record]) -> None:
        self.report = HistoryReport()
        self.commits: list[Record] = []
        self.observations: list[Record] = []
        self.errors: list[Record] = []
        self.final: Record | None = None
        for record in records:
            self._sort(record)

    def _sort(self, record: Record) -> None:
        kind = record.get("kind")
        if kind == "commit":
            for name, typ in (("proc", str), ("actor", str), ("seq", int), ("n", int),
                              ("tok", str), ("t0", (int, float)), ("t1", (int, float)),
                              ("begin", dict)):
                _field(record, name, typ)
            _views(record, "maps")
            self.commits.append(record)
        elif kind == "observe":
            for name, typ in (("proc", str), ("actor", str), ("seq", int),
                              ("tc", (int, float)), ("tb", (int, float))):
                _field(record, name, typ)
            _views(record, "before")
            _views(record, "after")
            self.observations.append(record)
        elif kind == "error":
            for name, typ in (("proc", str), ("actor", str), ("seq", int), ("error", str)):
                _field(record, name, typ)
            self.errors.append(record)
        elif kind == "fault":
            self.report.faults[_field(record, "fault", str)] += 1
        elif kind == "restart":
            _field(record, "actor", str)
            self.report.restarts += 1
        elif kind == "final":
            if self.final is not None:
                raise HistoryError("a history has one final record, this one has two")
            _views(record, "maps")
            _field(record, "log", dict)
            self.final = record
        else:
            raise HistoryError(f"unknown record kind {kind!r}: {dict(record)!r}")

    def run(self) -> HistoryReport:
        if self.final is None:
            raise HistoryError("the history has no final record: lost commits cannot be judged")
        report = self.report
        report.commits = len(self.commits)
        report.observations = len(self.observations)
        self._errors()
        self._commit_order()
        self._one_content()
        self._isolation_and_atomicity()
        self._fairness()
        self._monotonic()
        self._lost_commits()
        return report

    # -- the checks ------------------------------------------------------------

    def _errors(self) -> None:
        for record in self.errors:
            self.report.errors[record["error"]] += 1
        # A streak: failed messages of one (process, actor) with no success between.
        outcomes: dict[tuple[str, str], list[tuple[int, bool]]] = defaultdict(list)
        for record in self.errors:
            outcomes[record["proc"], record["actor"]].append((record["seq"], False))
        for record in (*self.commits, *self.observations):
            outcomes[record["proc"], record["actor"]].append((record["seq"], True))
        for runs in outcomes.values():
            streak = 0
            for _seq, success in sorted(runs):
                streak = 0 if success else streak + 1
                self.report.max_error_streak = max(self.report.max_error_streak, streak)

    def _commit_order(self) -> None:
        # Sound on a linearizable store: a commit acknowledged at t1 is in the
        # store before any call sent after t1, so that call builds on it.
        by_ack = sorted(self.commits, key=lambda c: c["t1"])
        acks = [c["t1"] for c in by_ack]
        highest: list[Record] = []  # highest[i]: the highest counter among by_ack[:i + 1]
        for commit in by_ack:
            highest.append(commit if not highest or commit["n"] > highest[-1]["n"]
                           else highest[-1])
        for commit in self.commits:
            done = bisect.bisect_left(acks, commit["t0"])
            if done and highest[done - 1]["n"] >= commit["n"]:
                earlier = highest[done - 1]
                self.report.violation("commit_order", {
                    "acked_first": _brief(earlier, "n", "tok", "t1"),
                    "sent_later": _brief(commit, "proc", "n", "tok", "t0")},
                    incident=(earlier["tok"], commit["proc"]))

    def _all_views(self) -> Iterator[tuple[str, dict[str, Any], str]]:
        """(alias, view, who saw it) for every view in the history."""
        for commit in self.commits:
            for alias, view in commit["maps"].items():
                if view is not None:
                    yield alias, view, f"{commit['proc']}/{commit['actor']}#{commit['seq']}"
        for obs in self.observations:
            for when in ("before", "after"):
                for alias, view in obs[when].items():
                    if view is not None:
                        yield alias, view, f"{obs['proc']}/{obs['actor']}#{obs['seq']}"
        assert self.final is not None
        for alias, view in self.final["maps"].items():
            if view is not None:
                yield alias, view, "final"

    def _one_content(self) -> None:
        contents: dict[tuple[str, int], dict[str, str]] = defaultdict(dict)
        txids: dict[tuple[str, int], dict[str, str]] = defaultdict(dict)
        for alias, view, who in self._all_views():
            contents[alias, view["v"]].setdefault(view["d"], who)
            if isinstance(view.get("txid"), str):
                txids[alias, view["v"]].setdefault(view["txid"], who)
        for (alias, version), seen in sorted(contents.items()):
            found = txids.get((alias, version), {})
            if len(seen) > 1 or len(found) > 1:
                self.report.violation("one_content", {
                    "map": alias, "version": version, "count": len(seen),
                    "contents": dict(list(seen.items())[:EXAMPLES]),
                    **({"txids": found} if len(found) > 1 else {})})

    def _isolation_and_atomicity(self) -> None:
        report = self.report
        for obs in self.observations:
            who = _brief(obs, "proc", "actor", "seq")
            before, after = obs["before"], obs["after"]
            for alias in sorted(set(before) | set(after)):
                if before.get(alias) != after.get(alias):
                    report.violation("isolation", {**who, "map": alias,
                                                   "before": before.get(alias),
                                                   "after": after.get(alias)})
            # An isolation violation aside, before and after are one snapshot.
            for when in ("before", "after") if before != after else ("before",):
                torn = _torn(obs[when])
                if torn:  # one incident per stale map content a process shows
                    stale = min(torn.items(), key=lambda item: item[1]["v"])
                    report.violation("atomicity", {**who, "snapshot": torn}, incident=(
                        obs["proc"], stale[0], stale[1]["v"], stale[1]["tok"]))
        for commit in self.commits:
            begin = commit["begin"]
            if len({begin.get("state_n"), begin.get("m_n"), begin.get("m2_n")}) > 1:
                report.violation("atomicity", {**_brief(commit, "proc", "actor", "seq"),
                                               "writer_began_with": begin},
                                 incident=(commit["proc"], begin.get("state_n")))
        assert self.final is not None
        torn = _torn(self.final["maps"])
        state_n = self.final.get("state_n")
        final_m = self.final["maps"].get("m")
        if torn or (final_m is not None and state_n is not None and final_m.get("n") != state_n):
            report.violation("atomicity", {"final": self.final["maps"], "state_n": state_n})

    def _fairness(self) -> None:
        # A message's snapshot is taken after its call was sent (tc) and a
        # view seen at tb was available on that process from tb on: a message
        # of another actor sent after tb must see at least that version.
        seen: dict[tuple[str, str], list[tuple[float, int, Record]]] = defaultdict(list)
        for obs in self.observations:
            for alias, view in obs["before"].items():
                if view is not None:
                    seen[obs["proc"], alias].append((obs["tb"], view["v"], obs))
        for (_proc, alias), views in seen.items():
            views.sort(key=lambda item: item[0])
            times = [item[0] for item in views]
            best: list[tuple[int, Record]] = []  # highest version seen up to each time
            for _tb, version, obs in views:
                best.append((version, obs) if not best or version > best[-1][0] else best[-1])
            for _tb, version, obs in views:
                known = bisect.bisect_left(times, obs["tc"])
                if not known:
                    continue
                newest, by = best[known - 1]
                if newest > version and by["actor"] != obs["actor"]:
                    self.report.violation("fairness", {
                        "map": alias, "seen": {**_brief(by, "proc", "actor", "seq", "tb"),
                                               "version": newest},
                        "then": {**_brief(obs, "actor", "seq", "tc"), "version": version}},
                        incident=(obs["proc"], obs["actor"], alias, newest))

    def _monotonic(self) -> None:
        # (seq, 0 before / 1 after, version) per (process, actor, map)
        series: dict[tuple[str, str, str], list[tuple[int, int, int]]] = defaultdict(list)
        for commit in self.commits:
            for alias, view in commit["maps"].items():
                if view is not None:
                    series[commit["proc"], commit["actor"], alias].append(
                        (commit["seq"], 0, view["v"]))
        for obs in self.observations:
            before, after = obs["before"], obs["after"]
            for alias, view in before.items():
                if view is not None:
                    series[obs["proc"], obs["actor"], alias].append((obs["seq"], 0, view["v"]))
            for alias, view in after.items():
                if view is not None and view != before.get(alias):  # isolation broke
                    series[obs["proc"], obs["actor"], alias].append((obs["seq"], 1, view["v"]))
        for (proc, actor, alias), views in series.items():
            highest: tuple[int, int] | None = None  # (version, seq)
            for seq, _rank, version in sorted(views):
                if highest is not None and version < highest[0]:
                    self.report.violation("monotonic", {
                        "proc": proc, "actor": actor, "map": alias,
                        "had": {"version": highest[0], "seq": highest[1]},
                        "then": {"version": version, "seq": seq}},
                        incident=(proc, actor, alias, highest[0]))
                if highest is None or version > highest[0]:
                    highest = (version, seq)

    def _lost_commits(self) -> None:
        assert self.final is not None
        log = self.final["log"]
        for commit in self.commits:
            stored = log.get(str(commit["n"]))
            if stored != commit["tok"]:
                self.report.violation("lost_commit", {
                    **_brief(commit, "proc", "seq", "n", "tok", "t1"), "store_has": stored})


def _torn(views: Mapping[str, Any]) -> dict[str, Any] | None:
    """The (n, tok) of each map when the maps of one snapshot disagree."""
    present: list[dict[str, Any]] = [views[alias] for alias in MAPS
                                      if views.get(alias) is not None]
    if len(present) < len(MAPS):
        return None
    if len({(view.get("n"), view.get("tok")) for view in present}) > 1:
        return {alias: {"v": view["v"], "n": view.get("n"), "tok": view.get("tok")}
                for alias, view in zip(MAPS, present, strict=True)}
    return None


def _brief(record: Record, *names: str) -> dict[str, Any]:
    return {name: record.get(name) for name in names}


def check_history(records: Iterable[Record]) -> HistoryReport:
    """Judge a history (records in any order); raise :class:`HistoryError` if
    it is malformed or has no final record."""
    return _Checker(records).run()
