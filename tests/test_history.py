"""The history checker on hand-made histories, and multi-process runs on Redis.

Each violation kind is caught on a history that breaks only that guarantee,
and a clean history passes. The runs drive a writer process and reader
processes through the faults today's code handles, on one server and on a
Redis Cluster (slot migration, failover), and must break nothing.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import require_redis_cli, require_redis_server
from history import EXAMPLES, HistoryError, check_history, digest, load_history
from history_harness import ALL_FAULTS, CLUSTER_ALL_FAULTS, HistoryRun, run_history
from redisserver import RedisServer, RedisServerError

Record = dict[str, Any]
History = list[Record]

N = 6  # commits in the clean history


def tok(n: int) -> str:
    return f"tok{n}"


def view(n: int, token: str | None = None, *, version: int | None = None,
         extra: str = "") -> dict[str, Any]:
    """A map as the writer leaves it after commit ``n`` (version n + 1)."""
    token = tok(n) if token is None else token
    content = {"n": n, "tok": token, **({"extra": extra} if extra else {})}
    return {"v": n + 1 if version is None else version, "d": digest(content), "n": n,
            "tok": token}


def both(n: int, **options: Any) -> dict[str, Any]:
    return {"m": view(n, **options), "m2": view(n, **options)}


def commit(n: int, *, proc: str = "w1", seq: int | None = None, t0: float | None = None,
           token: str | None = None) -> Record:
    t0 = float(n) if t0 is None else t0
    token = tok(n) if token is None else token
    return {"kind": "commit", "proc": proc, "actor": "w-writer", "seq": n if seq is None else seq,
            "n": n, "tok": token, "t0": t0, "t1": t0 + 0.5,
            "begin": {"state_n": n - 1, "m_n": n - 1, "m2_n": n - 1},
            "maps": both(n, token=token)}


def observe(actor: str, seq: int, n: int, *, tc: float, proc: str = "r0") -> Record:
    snapshot = both(n)
    return {"kind": "observe", "proc": proc, "actor": actor, "seq": seq, "tc": tc,
            "tb": tc + 0.1, "te": tc + 0.2, "before": snapshot,
            "after": copy.deepcopy(snapshot)}


def final(n: int = N) -> Record:
    return {"kind": "final", "maps": both(n), "state_n": n,
            "log": {str(i): tok(i) for i in range(1, n + 1)}}


def clean() -> History:
    """Commit n at t = n; two actors of r0 see commit n shortly after, as do r1's."""
    history: History = [commit(n) for n in range(1, N + 1)]
    for n in range(1, N + 1):
        history.append(observe("r0-a", n, n, tc=n + 0.6))
        history.append(observe("r0-b", n, n, tc=n + 0.7))
        history.append(observe("r1-a", n, n, tc=n + 0.65, proc="r1"))
    history.append({"kind": "fault", "fault": "kill_writer", "t": 2.2})
    history.append({"kind": "fault", "fault": "kill_pubsub", "t": 3.2})
    history.append({"kind": "restart", "proc": "r1", "actor": "r1-a", "t": 3.3})
    history.append(final())
    return history


def find(history: History, kind: str, **match: Any) -> Record:
    for record in history:
        if record["kind"] == kind and all(record.get(k) == v for k, v in match.items()):
            return record
    raise LookupError(f"no {kind} record with {match}")


# -- one way to break each guarantee, and only it ------------------------------------

def goes_back(history: History) -> None:
    """r1-a (alone on its process) sees commit 5, then commit 3."""
    find(history, "observe", actor="r1-a", seq=6).update(
        {"before": both(3), "after": both(3)})


def changes_within_message(history: History) -> None:
    find(history, "observe", actor="r0-b", seq=3)["after"] = both(4)
    find(history, "observe", actor="r0-b", seq=4).update({"tc": 4.71})


def unfair(history: History) -> None:
    """r0-b's message 4 is sent after r0-a saw version 6 (commit 5), yet shows commit 3."""
    find(history, "observe", actor="r0-a", seq=5).update({"tc": 5.0, "tb": 5.1})
    find(history, "observe", actor="r0-b", seq=4).update({"tc": 5.2, "tb": 5.3,
                                                           "before": both(3), "after": both(3)})


def torn_pair(history: History) -> None:
    snapshot = {"m": view(4), "m2": view(3)}
    find(history, "observe", actor="r1-a", seq=4).update(
        {"before": snapshot, "after": copy.deepcopy(snapshot)})


def torn_writer(history: History) -> None:
    find(history, "commit", n=4)["begin"] = {"state_n": 2, "m_n": 3, "m2_n": 3}


def torn_final(history: History) -> None:
    find(history, "final")["state_n"] = N - 1


def forked(history: History) -> None:
    """r1-a holds a content for version 5 that nobody else had."""
    find(history, "observe", actor="r1-a", seq=4).update(
        {"before": both(4, extra="stale"), "after": both(4, extra="stale")})


def two_txids(history: History) -> None:
    find(history, "commit", n=3)["maps"]["m"]["txid"] = "aaa"
    find(history, "observe", actor="r0-a", seq=3)["before"]["m"]["txid"] = "bbb"
    find(history, "observe", actor="r0-a", seq=3)["after"]["m"]["txid"] = "bbb"


def stale_writer(history: History) -> None:
    """w2 commits counter 5 after w1's commit 6 was acknowledged (commit 5 was never
    acknowledged to anyone, so nothing acknowledged is lost)."""
    history.remove(find(history, "commit", n=5))
    history.append(commit(5, proc="w2", seq=1, t0=6.6))


def lost(history: History) -> None:
    find(history, "final")["log"]["3"] = "other"


def lost_tail(history: History) -> None:
    record = find(history, "final")
    del record["log"][str(N)]


#: kind -> (breaker, violations it makes: the map-level checks count m and m2 apart)
BREAKERS: dict[str, tuple[Callable[[History], None], int]] = {
    "monotonic": (goes_back, 2),
    "isolation": (changes_within_message, 2),
    "fairness": (unfair, 2),
    "atomicity": (torn_pair, 1),
    "one_content": (forked, 2),
    "commit_order": (stale_writer, 1),
    "lost_commit": (lost, 1),
}


def test_a_clean_history_passes() -> None:
    report = check_history(clean())
    assert report.ok, report.summary()
    assert report.commits == N
    assert report.observations == 3 * N
    assert report.faults == Counter({"kill_writer": 1, "kill_pubsub": 1})
    assert report.restarts == 1
    assert report.max_error_streak == 0
    assert "violations (incidents): commit_order 0 (0)" in report.summary()


@pytest.mark.parametrize("kind", sorted(BREAKERS))
def test_each_violation_kind_is_caught_alone(kind: str) -> None:
    breaker, count = BREAKERS[kind]
    history = clean()
    breaker(history)
    report = check_history(history)
    assert report.violation_counts == Counter({kind: count}), report.summary()
    assert len(report.examples[kind]) == count
    assert {example.get("map") for example in report.examples[kind]} <= {"m", "m2", None}
    assert not report.ok
    assert report.to_json()["violations"][kind] == count


@pytest.mark.parametrize("breaker", [torn_writer, torn_final], ids=lambda f: f.__name__)
def test_atomicity_of_the_writer_and_the_final_state(breaker: Callable[[History], None]) -> None:
    history = clean()
    breaker(history)
    assert check_history(history).violation_counts == Counter({"atomicity": 1})


def test_two_txids_for_one_version_are_a_fork() -> None:
    history = clean()
    two_txids(history)
    report = check_history(history)
    assert report.violation_counts == Counter({"one_content": 1})
    assert report.examples["one_content"][0]["txids"] == {"aaa": "w1/w-writer#3",
                                                          "bbb": "r0/r0-a#3"}


def test_a_commit_missing_from_the_final_log_is_lost() -> None:
    history = clean()
    lost_tail(history)
    report = check_history(history)
    assert report.violation_counts == Counter({"lost_commit": 1})
    assert report.examples["lost_commit"][0]["n"] == N


def test_concurrent_messages_are_not_unfair() -> None:
    """A message sent before another actor's snapshot was taken may see older data."""
    history = clean()
    find(history, "observe", actor="r0-a", seq=5).update({"tc": 5.0, "tb": 5.3})
    find(history, "observe", actor="r0-b", seq=4).update({"tc": 5.2, "tb": 5.4})
    assert check_history(history).ok


def test_the_same_actor_on_two_processes_is_two_replicas() -> None:
    """Monotonic reads hold per process: another process may lag behind."""
    history = clean()
    history.append(observe("r0-a", 1, 2, tc=9.0, proc="r2"))
    assert check_history(history).ok


def test_a_writer_restarted_from_its_checkpoint_keeps_order() -> None:
    history = clean()
    history.remove(find(history, "commit", n=N))
    history.append(commit(N, proc="w2", seq=1, t0=N + 0.1))
    assert check_history(history).ok


def test_a_replica_that_stays_behind_is_one_incident() -> None:
    """r1-a goes back to commit 2 and stays there for its last three messages."""
    history = clean()
    for seq in (4, 5, 6):
        find(history, "observe", actor="r1-a", seq=seq).update(
            {"before": both(2), "after": both(2)})
    report = check_history(history)
    assert report.violation_counts == Counter({"monotonic": 6})
    assert report.to_json()["incidents"]["monotonic"] == 2  # m and m2
    assert [example["then"]["seq"] for example in report.examples["monotonic"]] == [4, 4]
    assert "monotonic 6 (2)" in report.summary()


def test_every_violation_counts_but_few_examples_are_kept() -> None:
    history = clean()
    find(history, "final")["log"] = {}
    report = check_history(history)
    assert report.violation_counts == Counter({"lost_commit": N})
    assert len(report.examples["lost_commit"]) == EXAMPLES < N


def test_errors_and_the_longest_streak() -> None:
    history = clean()
    for seq in (7, 8, 9):
        history.append({"kind": "error", "proc": "w1", "actor": "w-writer", "seq": seq,
                        "t": 9.0, "error": "ConcurrentUpdateError", "message": "x"})
    history.append(commit(N + 1, seq=10))
    history.append({"kind": "error", "proc": "r0", "actor": "r0-a", "seq": 99, "t": 9.0,
                    "error": "MapNotFoundError", "message": "y"})
    find(history, "final").update(final(N + 1))
    report = check_history(history)
    assert report.ok, report.summary()
    assert report.errors == Counter({"ConcurrentUpdateError": 3, "MapNotFoundError": 1})
    assert report.max_error_streak == 3


@pytest.mark.parametrize(("change", "message"), [
    (lambda h: h.remove(find(h, "final")), "no final record"),
    (lambda h: h.append(final()), "two"),
    (lambda h: h.append({"kind": "gossip"}), "unknown record kind 'gossip'"),
    (lambda h: find(h, "commit", n=2).pop("tok"), "needs 'tok'"),
    (lambda h: find(h, "commit", n=2).update(n=True), "needs 'n'"),
    (lambda h: find(h, "observe", seq=2).update(before={"m": {"v": "2"}}), "before.m"),
])
def test_malformed_histories_are_refused(change: Callable[[History], None],
                                         message: str) -> None:
    history = clean()
    change(history)
    with pytest.raises(HistoryError, match=message):
        check_history(history)


def test_load_history_reads_json_lines_and_names_a_bad_line(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_bytes(b"".join(orjson.dumps(record) + b"\n" for record in clean()) + b"\n")
    assert check_history(load_history([good])).ok
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(orjson.dumps(commit(1)) + b'\n{"kind": "commit", "n"\n')
    with pytest.raises(HistoryError, match=r"bad.jsonl:2: not JSON"):
        load_history([bad])
    bad.write_bytes(b"[1, 2]\n")
    with pytest.raises(HistoryError, match=r"bad.jsonl:1: a record needs a 'kind'"):
        load_history([bad])


#: Fault sets the suite runs, each a short run; ``scripts/history_run.py``
#: runs them for as long as asked.
SUITE_FAULTS = {"all": ALL_FAULTS}


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.parametrize("faults", list(SUITE_FAULTS.values()), ids=list(SUITE_FAULTS))
async def test_a_multi_process_run_under_faults_breaks_nothing(
        tmp_path: Path, faults: tuple[str, ...]) -> None:
    require_redis_server()
    # Long enough for every fault to come at least once.
    report = await run_history(HistoryRun(workdir=tmp_path, seconds=3.0 * len(faults),
                                          faults=faults))
    assert report.ok, report.summary()
    assert report.commits > 50, report.summary()
    assert report.observations > 50, report.summary()
    assert set(report.faults) == set(faults), report.summary()
    if "pause_writer" in faults:  # a paused writer came back and was fenced off
        assert report.errors["LeaseLostError"] + report.errors["ActorStoppedError"] >= 1, \
            report.summary()
    if "restart_reader" in faults:
        assert report.restarts >= 1, report.summary()


@pytest.mark.redis
@pytest.mark.slow
async def test_a_multi_process_run_on_a_cluster_under_its_faults_breaks_nothing(
        tmp_path: Path) -> None:
    require_redis_server()
    require_redis_cli()
    faults = CLUSTER_ALL_FAULTS
    # Every fault once; the cluster starts in about 3 s.
    report = await run_history(HistoryRun(workdir=tmp_path, cluster=True,
                                          seconds=2.0 * len(faults) + 1.0, faults=faults))
    assert report.ok, report.summary()
    assert report.commits > 50, report.summary()
    assert report.observations > 50, report.summary()
    assert set(report.faults) == set(faults), report.summary()
    assert report.restarts >= 1, report.summary()
    placement = orjson.loads((tmp_path / "placement.json").read_bytes())
    assert len(set(placement.values())) >= 2, placement
    # The migrations met commits: the source refused them while the slot was half moved.
    replies = orjson.loads((tmp_path / "redis_errors.json").read_bytes())
    assert replies.get("TRYAGAIN", 0) + replies.get("ASK", 0) >= 1, replies
    moved = [orjson.loads(line) for line in (tmp_path / "faults.jsonl").read_bytes().splitlines()]
    for record in moved:
        if record["fault"] in ("migrate_writer_slot", "failover_writer_shard"):
            assert record["target"] != record["source"], record
        if record["fault"] == "kill_pubsub":  # the readers' subscriptions at least
            assert record["killed"] >= 2, record


def test_a_run_refuses_unknown_faults(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown faults \['kill_everything'\]"):
        HistoryRun(workdir=tmp_path, faults=["kill_everything"])
    with pytest.raises(ValueError, match=r"unknown faults \['redis_empty'\] on a cluster"):
        HistoryRun(workdir=tmp_path, faults=["redis_empty"], cluster=True)
    with pytest.raises(ValueError, match=r"\['migrate_writer_slot'\] on one server"):
        HistoryRun(workdir=tmp_path, faults=["migrate_writer_slot"])


@pytest.mark.redis
def test_redis_server_comes_back_older_or_empty() -> None:
    """The fault helpers: a snapshot restores older data; a crash or restart loses all."""
    require_redis_server()
    with RedisServer() as server:
        with server.client() as client:
            client.set("a", 1)
            older = server.snapshot()
            client.set("a", 2)
            client.set("b", 3)
        port = server.port
        server.restart_from(older)
        assert server.port == port
        with server.client() as client:
            assert (client.get("a"), client.get("b")) == (b"1", None)
            client.set("c", 4)
        server.crash()
        assert not server.running
        server.start()  # the dump restart_from installed is not loaded again
        with server.client() as client:
            assert client.dbsize() == 0
            client.set("d", 5)
        server.restart()
        with server.client() as client:
            assert client.dbsize() == 0
        with pytest.raises(RedisServerError, match="no snapshot file"):
            server.restart_from(server.dir / "missing.rdb")
        assert server.running  # a refused restore leaves the server as it was
