"""Forged and malformed messages mixed with a writer's real commits, at random.

A reader service holds replicas of three maps of one writer; Hypothesis
interleaves the writer's commits (one, two or three maps each, so that
change sets promise their siblings with ``more``) with messages a hostile or
broken peer puts on the maps' channels: bytes, JSON of any shape, change sets
that look real (near the replica's version, with or without its lineage,
promising siblings or garbage), deletion markers and lists, and with resyncs.

Whatever came, the service must never raise from a message, never show a
replica going back, never take a forged deletion marker for a deletion,
never stay stuck (no read, group or buffer left once things settle), and
once the writer has moved past every version a forgery reached, every
replica must hold exactly the writer's maps, all at its last commit. The
same runs over Redis, with fewer examples.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from caf_sharing import service as service_module
from caf_sharing.backends import make_backend
from caf_sharing.backends.base import DELETED
from caf_sharing.backends.memory import MemoryStore
from caf_sharing.backends.redis.codec import Keys
from caf_sharing.backends.wire import MORE
from caf_sharing.service import SharingService
from redisserver import RedisServer
from test_fuzz_wire import SEEN, SUITE_EXAMPLES
from test_service import Writer, guessed_txid, until

OWNER = "alice-admin"
LOCAL = ("m1", "m2", "m3")
NAMES = tuple(f"{OWNER}-{local}" for local in LOCAL)
#: A forged promise of more change sets holds its change set this long (s)
#: before the reader reads the store instead (GROUP_WAIT is 5 s).
GROUP_WAIT = 0.05

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                  max_size=3),
    max_leaves=6)

promises = st.none() | st.lists(st.sampled_from([*LOCAL, "m9", ""]), max_size=3) \
    | json_values

# A forged change set, built against the replica's state when it is sent:
# (version offset, lineage kind, key, value, promise, with a version pair).
plausible = st.tuples(st.integers(-2, 2), st.sampled_from(["real", "guess", "none", "other"]),
                      st.sampled_from(["a", "b", "__ca_version__"]), json_values, promises,
                      st.booleans())

steps = st.one_of(
    st.tuples(st.just("commit"), st.sets(st.sampled_from(NAMES), min_size=1),
              st.integers(0, 9)),
    st.tuples(st.just("bytes"), st.sampled_from(NAMES), st.binary(max_size=24)),
    st.tuples(st.just("json"), st.sampled_from(NAMES), json_values),
    st.tuples(st.just("forge"), st.sampled_from(NAMES), plausible),
    st.tuples(st.just("list"), st.sampled_from(NAMES), st.lists(plausible, min_size=1,
                                                                max_size=3)),
    st.tuples(st.just("deleted"), st.sampled_from(NAMES), st.sampled_from([None, "forged"])),
    st.tuples(st.just("settle"), st.integers(0, 3)),
    st.tuples(st.just("resync"), st.sampled_from(NAMES)),
    st.tuples(st.just("reopen"), st.sampled_from(NAMES)),
)


def _wire(message: object) -> bytes:
    """JSON as a peer may send it: integers of any size included."""
    return json.dumps(message).encode()


class _Errors(logging.Handler):
    """Records what a subscription handler raised (the memory backend logs it)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _forged(replica: Any, lineage: Any, spec: tuple[Any, ...]) -> dict[str, Any]:
    """One change set near ``replica``'s version, as ``spec`` says."""
    offset, kind, key, value, promise, versioned = spec
    base = max(replica.version + offset, 0)
    changes: dict[str, Any] = {"version": base, "remove": [], "add": [key, value]}
    if versioned:
        changes["add"] += ["__ca_version__", base + 1]
    if kind == "real":  # a forger can read the channel: the real lineage
        changes["txid"], changes["base_txid"] = f"forged-{uuid.uuid4().hex[:6]}", lineage.txid
    elif kind == "guess":  # ... and guess the next commit's txid from it
        changes["txid"], changes["base_txid"] = guessed_txid(lineage.txid), lineage.txid
    elif kind == "other":
        changes["txid"], changes["base_txid"] = "forged", "elsewhere"
    if promise is not None:
        changes[MORE] = promise
    return changes


async def _run(steps_: list[tuple[Any, ...]], server: RedisServer | None = None) -> None:
    """Play ``steps_`` on ``memory://``, or on ``server``."""
    unique = uuid.uuid4().hex[:12]
    store, app = f"hostile-{unique}", f"hostile{unique}"
    if server is None:
        url, options = f"memory://{store}", {}
    else:  # a new server: no lease to leave its previous holder
        url, options = server.url, {"restart_grace": False}
    wb = make_backend(url, app=app, **options)
    rb = make_backend(url, app=app, **options)
    await wb.start()
    await rb.start()
    raw = None if server is None else aioredis.Redis(port=server.port)

    async def publish(name: str, payload: bytes) -> None:
        """What a hostile peer puts on the channel of map ``name``."""
        if raw is None:
            rb._publish(name, payload)  # type: ignore[attr-defined]
        else:  # Redis 7 carries change sets on sharded channels
            await raw.spublish(Keys(app).channel(name), payload)

    # A read of the store that lets the loop run before and after it, as a
    # round trip to Redis would: messages land in the buffers of a resync,
    # published before its read and after it.
    read_maps = rb.read_maps

    async def read_meanwhile(names: Any, known: Any = None) -> Any:
        await asyncio.sleep(0)
        got = await read_maps(names, known)
        await asyncio.sleep(0)
        return got

    rb.read_maps = read_meanwhile  # type: ignore[method-assign]
    wsvc, rsvc = SharingService(wb), SharingService(rb)
    errors = _Errors()
    logging.getLogger("caf_sharing").addHandler(errors)
    try:
        await wb.acquire_lease(OWNER, "writer-node", 30)
        first = Writer(wsvc, OWNER, NAMES[0])
        for name in NAMES:
            await Writer(wsvc, OWNER, name, stay=first.stay).create(a=0)
        replicas = {name: await rsvc.replica_of(name) for name in NAMES}
        # A no_exec twin of the first map takes the same change sets.
        twin = await rsvc.replica_of(NAMES[0], no_exec=True)
        entries = {name: rsvc._replicas[(name, False)] for name in NAMES}
        shown = {name: replica.version for name, replica in replicas.items()}

        async def commit(names: set[str] | tuple[str, ...], value: int) -> None:
            refs = {}
            for name in sorted(names):
                ref = (await wsvc.primary(name)).ref()
                ref.set("a", value)
                ref.prepare()
                refs[name] = ref
            await first.commit_refs(refs)

        for step in steps_:
            kind = step[0]
            if kind == "commit":
                await commit(step[1], step[2])
            elif kind == "settle":
                for _ in range(step[1]):
                    await asyncio.sleep(0)
            elif kind == "resync":
                rsvc._on_reconnect([step[1]])
            elif kind == "reopen":  # let go of a replica, then read it again
                name = step[1]
                await rsvc.release_replica(name, replicas[name])
                replicas[name] = await rsvc.replica_of(name)
                entries[name] = rsvc._replicas[(name, False)]
            else:
                name = step[1]
                entry = entries[name]
                if kind == "bytes":
                    payload = step[2]
                elif kind == "json":
                    payload = _wire(step[2])
                elif kind == "forge":
                    payload = _wire(_forged(replicas[name], entry.lineage, step[2]))
                elif kind == "list":
                    payload = _wire([_forged(replicas[name], entry.lineage, spec)
                                     for spec in step[2]])
                else:
                    payload = _wire({DELETED: True, "txid": step[2]})
                await publish(name, payload)
            await asyncio.sleep(0)
            for name, replica in replicas.items():
                assert replica.version >= shown[name], f"{name} went back"
                shown[name] = replica.version

        # The writer moves past every version a forgery reached: then every
        # replica holds the writer's maps, all at its last commit.
        top = max(replica.version for replica in replicas.values())
        last = 100
        await commit(NAMES, last)
        while min(wsvc._primaries[name].map.version for name in NAMES) <= top:
            last += 1
            await commit(NAMES, last)

        def settled() -> bool:
            return not rsvc._resyncs and not rsvc._groups and all(
                entry.buffer is None for entry in entries.values()) and all(
                replicas[name].version == wsvc._primaries[name].map.version
                for name in NAMES)

        await until(settled, timeout=5 * GROUP_WAIT + 5)
        for name in NAMES:
            held = replicas[name].ref().to_dict()
            assert held == wsvc._primaries[name].map.ref().to_dict() == {"a": last}, name
        await until(lambda: twin.version == replicas[NAMES[0]].version, timeout=5)
        assert twin.ref().to_dict() == {"a": last}
        assert not errors.records, [r.getMessage() for r in errors.records]
        assert rsvc.stats.deletions == 0, "a forged deletion marker emptied a replica"
        SEEN["service: examples"] += 1
        stats = rsvc.stats
        for what in ("malformed", "gaps", "forks", "resyncs", "applied"):
            SEEN[f"service: {what}"] += getattr(stats, what)
    finally:
        logging.getLogger("caf_sharing").removeHandler(errors)
        await wsvc.close()
        await rsvc.close()
        await wb.close()
        await rb.close()
        if raw is not None:
            await raw.aclose()
        MemoryStore.drop(store)


@contextmanager
def _short_group_wait() -> Iterator[None]:
    saved, service_module.GROUP_WAIT = service_module.GROUP_WAIT, GROUP_WAIT
    try:
        yield
    finally:
        service_module.GROUP_WAIT = saved


@settings(max_examples=SUITE_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(steps_=st.lists(steps, max_size=20))
def test_forged_messages_among_real_commits_never_stick_a_reader(steps_) -> None:
    with _short_group_wait():
        asyncio.run(_run(steps_))


@pytest.mark.redis
def test_forged_messages_among_real_commits_on_redis(redis_server: RedisServer) -> None:
    """The same over Redis: its pub/sub connection, pushes and round trips."""

    @settings(max_examples=max(SUITE_EXAMPLES // 4, 1), deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(steps_=st.lists(steps, max_size=20))
    def played(steps_: list[tuple[Any, ...]]) -> None:
        with _short_group_wait():
            asyncio.run(_run(steps_, redis_server))

    played()
