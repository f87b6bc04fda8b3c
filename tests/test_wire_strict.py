"""Strict decoding on the wire (issue 7, section 2).

What comes back from a store or a channel is decoded as strictly as the Lua
scripts wrote it: versions are plain decimals below 2**53, integers in
values fit in 64 bits (orjson would turn longer ones into inexact floats),
and a change set makes exactly its base version + 1. The last tests forge
the data in a real Redis.
"""

from __future__ import annotations

import json
import math
import time
import tracemalloc
import uuid
from typing import Any

import orjson
import pytest

from caf_sharing import Actor, FrozenDict, FrozenList, Node, SharedMap
from caf_sharing._fastmap import MAX_DEPTH, load_fields
from caf_sharing.backends import MapWrite, make_backend
from caf_sharing.backends.redis.backend import _Scan
from caf_sharing.backends.redis.codec import commit_outcome
from caf_sharing.backends.wire import (
    MAX_VERSION,
    MORE,
    EncodedTransaction,
    check_dump,
    decode_changes,
    decode_fields,
    decode_flat,
    decode_value,
    decode_version,
    encode_dump,
    encode_transaction,
)
from caf_sharing.errors import BackendError, InvalidChangeSetError, SharingError
from conftest import until_version
from redisserver import RedisServer
from test_backend_contract import ACTOR, MAP, NODE, V, changes, dump, tx
from test_fuzz_wire import nested

# -- versions ------------------------------------------------------------------

GOOD_VERSIONS: list[tuple[Any, int]] = [
    (b"0", 0), (b"7", 7), ("7", 7), (b"10", 10), (b"9007199254740991", 2 ** 53 - 1),
    (7, 7), (0, 0),
]
BAD_VERSIONS: list[Any] = [
    b" 7 ", " 7 ", b"7 ", b" 7", b"1_0", "1_0", b"+5", "+5", b"-1", b"-0", b"07", b"00",
    b"7\n", "7\n", b"", "", b"\t7", b"1e3", b"0x10", b"7.0", b"\xd9\xa3", "\u0663", "\uff17",
    b"9007199254740992", b"99999999999999999999", b"1" * 5000, -1, 2 ** 53, 2 ** 63, True,
    False, 7.0, None, b"\x00", [7],
]


@pytest.mark.parametrize(("raw", "expected"), GOOD_VERSIONS)
def test_plain_decimal_versions_decode(raw: Any, expected: int) -> None:
    assert decode_version("alice-admin-x", raw) == expected


@pytest.mark.parametrize("raw", BAD_VERSIONS)
def test_anything_else_is_not_a_version(raw: Any) -> None:
    with pytest.raises(BackendError, match=r"alice-admin-x.*(version|__ca_version__)") as info:
        decode_version("alice-admin-x", raw)
    assert len(str(info.value)) < 200  # a huge field is not echoed whole


# -- values --------------------------------------------------------------------

GOOD_VALUES: list[bytes] = [
    b"1", b"-9223372036854775808", b"9223372036854775807", b"[9223372036854775807]",
    b'"99999999999999999999999"', b'{"99999999999999999999": 1}', b'"\\"123456789012345678901"',
    b'"a\\\\"', b'["\\\\", 12345678901234567890.5]', b"1.0000000000000000000001", b"1e30",
    b"[1.5e300, -0.0]", b'{"a": "b\\u0022 99999999999999999999 \\""}', b"12345678901234567e3",
    b"null", b"true", b'"x"', b"0.12345678901234567890123",
]
BAD_VALUES: list[tuple[bytes, str]] = [
    (b"9223372036854775808", "9223372036854775808"),
    (b"-9223372036854775809", "-9223372036854775809"),
    (b"18446744073709551615", "18446744073709551615"),   # orjson: an int
    (b"18446744073709551616", "18446744073709551616"),   # orjson: a float
    (b"100000000000000000000000000", "100000000000000000000000000"),
    (b"[1, 99999999999999999999]", "99999999999999999999"),
    (b'{"a": {"b": [0, -100000000000000000000000]}}', "-100000000000000000000000"),
    (b'["99999999999999999999", 99999999999999999999]', "99999999999999999999"),
    (b'{"s": "\\\\", "n": 9223372036854775808}', "9223372036854775808"),
    (b"[" + b"9" * 300 + b"]", "999999999"),
]


@pytest.mark.parametrize("raw", GOOD_VALUES)
def test_values_within_64_bits_decode_as_orjson_does(raw: bytes) -> None:
    assert decode_value("alice-admin-x", "k", raw) == orjson.loads(raw)


@pytest.mark.parametrize(("raw", "literal"), BAD_VALUES)
def test_integers_past_64_bits_are_refused_not_turned_into_floats(raw: bytes,
                                                                   literal: str) -> None:
    with pytest.raises(BackendError, match=r"'alice-admin-x': field 'k' holds the integer") as info:
        decode_value("alice-admin-x", "k", raw)
    assert literal[:50] in str(info.value)
    assert len(str(info.value)) < 200


def test_undecodable_values_are_refused() -> None:
    for raw in (b"{nope", b"NaN", b"Infinity", b"1e400", b'"\xff"', b"", b"9" * 5000):
        with pytest.raises(BackendError, match="undecodable"):
            decode_value("alice-admin-x", "k", raw)


# -- published messages ---------------------------------------------------------


def test_a_message_with_a_huge_integer_is_refused() -> None:
    ok = {"version": 1, "remove": [], "add": ["a", 2 ** 63 - 1, V, 2]}
    assert decode_changes("alice-admin-x", orjson.dumps(ok)) == ok
    assert decode_changes("alice-admin-x", orjson.dumps([ok, ok])) == [ok, ok]
    for data in (b'{"version": 1, "remove": [], "add": ["a", 18446744073709551616]}',
                 b'[{"version": 99999999999999999999999, "remove": [], "add": []}]'):
        with pytest.raises(InvalidChangeSetError, match="outside the 64-bit range"):
            decode_changes("alice-admin-x", data)
    with pytest.raises(InvalidChangeSetError, match="not JSON"):
        decode_changes("alice-admin-x", b"{garbage")


def test_decoded_messages_apply_or_fail_as_a_whole() -> None:
    primary, replica = SharedMap(), SharedMap()
    sets = []
    for i in range(3):
        ref = primary.ref().set("a", i)
        sets.append(dict(ref.prepare()))
        primary.commit(ref)
    forged = {"version": 3, "remove": [], "add": ["a", 9, V, 2 ** 63 - 1]}
    message = orjson.dumps([*sets, forged])
    with pytest.raises(InvalidChangeSetError):
        replica.apply_changes(decode_changes("alice-admin-x", message))
    assert replica.version == 0
    replica.apply_changes(decode_changes("alice-admin-x", orjson.dumps(sets)))
    assert replica.version == 3


# -- encoding: the same rules before anything is stored -------------------------


def test_a_dump_with_removes_is_refused() -> None:
    with pytest.raises(InvalidChangeSetError, match="no removes"):
        encode_dump("alice-admin-x", {"version": 0, "remove": ["a"], "add": [V, 3]})
    assert encode_dump("alice-admin-x", dump(3, {"a": 1})) == (3, [("a", b"1")])


@pytest.mark.parametrize(("write", "match"), [
    ({"version": 3, "remove": [], "add": [V, 5]}, "is not its base version 3 [+] 1"),
    ({"version": 3, "remove": [], "add": [V, 2 ** 63 - 1]}, r"must be an int in \[0, 2\*\*53\)"),
    ({"version": MAX_VERSION - 1, "remove": [], "add": []}, "below 2[*][*]53"),
    ({"version": 3, "remove": [], "add": [V, 4, V, 4]}, "twice"),
    ({"version": MAX_VERSION, "remove": [], "add": []}, r"\[0, 2\*\*53\)"),
])
def test_a_write_that_is_not_exactly_one_version_on_is_refused(write: dict[str, Any],
                                                               match: str) -> None:
    with pytest.raises(InvalidChangeSetError, match=match):
        encode_transaction(tx("t", writes=[MapWrite(MAP, write)]))
    encode_transaction(tx("t", writes=[MapWrite(MAP, changes(3, {"a": 1}))]))


def test_encoded_values_hold_no_more_memory_than_their_bytes() -> None:
    """orjson's result keeps a 4 kB buffer however short the JSON: a write's
    values are copied to their exact size, the store holds them for good."""
    items = {f"k{i}": i for i in range(2000)}
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        encoded = encode_transaction(tx("t", writes=[MapWrite(MAP, changes(3, items))]))
        encoded.writes[0].payload = b""  # sent once, not kept
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert dict(encoded.writes[0].add) == {key: orjson.dumps(v) for key, v in items.items()}
    assert held < 200 * len(items)


def test_a_list_whose_iterator_runs_out_mid_pair_is_refused() -> None:
    class Odd(list):  # type: ignore[type-arg]
        """Says it holds two items, yields one."""

        def __iter__(self) -> Any:
            return iter(["a"])

    with pytest.raises(InvalidChangeSetError, match="'add' must be a list of key, value pairs"):
        encode_transaction(tx("t", writes=[MapWrite(MAP, {"version": 3, "remove": [],
                                                          "add": Odd(["a", 1])})]))


def test_a_whole_map_is_checked_whole_before_anything_is_encoded_for_good() -> None:
    """check_dump refuses a bad value anywhere in a big dump, naming its key,
    and its fields encode to what encode_dump gives, with their exact size."""
    items: dict[str, Any] = {f"k{i}": {"n": i, "s": "é" * (i % 7)} for i in range(10_000)}
    # orjson refuses this one inside a list, not alone: it is a good value.
    items["deep"] = nested(254)
    version, fields = check_dump(MAP, dump(4, items))
    pairs = [(key, orjson.dumps(value)) for key, value in items.items()]
    assert version == 4 and len(fields) == len(items) and list(fields) == pairs
    assert fields.size == sum(len(key) + len(raw) for key, raw in pairs)
    assert encode_dump(MAP, dump(4, items)) == (4, pairs)
    assert [pair for chunk in fields.chunks(3000, 1 << 20) for pair in chunk] == pairs
    assert max(len(chunk) for chunk in fields.chunks(3000, 1 << 20)) == 3000
    for bad in (object(), nested(300), 2 ** 64):
        with pytest.raises(InvalidChangeSetError, match="value of key 'k9000' is not JSON data"):
            check_dump(MAP, dump(4, {**items, "k9000": {"a": [1, bad]}}))
    with pytest.raises(InvalidChangeSetError, match="non-str key 7"):
        check_dump(MAP, {"version": 0, "remove": [], "add": [*dump(4, items)["add"], 7, 1]})


# -- forged data in a real Redis ------------------------------------------------


@pytest.mark.redis
@pytest.mark.parametrize("chunk", [1000, 1])  # one HGETALL, or HSCAN chunks
async def test_forged_store_content_is_refused_on_read(redis_server: RedisServer,
                                                      chunk: int) -> None:
    app = f"w{uuid.uuid4().hex[:12]}"
    backend = make_backend(redis_server.url, app=app, read_chunk_size=chunk)
    await backend.start()
    key = f"caf:{app}:{{alice-admin}}:map:{MAP}"
    try:
        await backend.acquire_lease(ACTOR, NODE, 30.0)
        await backend.create_map(MAP, dump(4, {"a": 1, "b": [1, 2]}))
        assert (await backend.read_map(MAP) or {})["add"][-1] == 4
        with redis_server.client() as client:
            for forged in (b" 7 ", b"1_0", b"+5", b"07", b"9007199254740992",
                           b"9223372036854775807"):
                client.hset(key, V, forged)
                with pytest.raises(BackendError, match=r"alice-admin-x.*version"):
                    await backend.read_map(MAP)
            client.hset(key, V, b"4")
            for value in (b"9223372036854775808", b"[1, 100000000000000000000000]"):
                client.hset(key, "b", value)
                with pytest.raises(BackendError, match="'b' holds the integer"):
                    await backend.read_map(MAP)
            client.hset(key, "b", b"[1, 9223372036854775807]")
        got = await backend.read_map(MAP)
        assert got is not None and sorted(map(str, got["add"])) == sorted(
            ["a", "1", "b", str([1, 2 ** 63 - 1]), V, "4"])
    finally:
        await backend.close()


def test_a_store_s_fields_decode_together_and_a_bad_one_is_named() -> None:
    raws = [orjson.dumps({"i": i, "big": 2 ** 63 - 1, "s": "9" * 30}) for i in range(500)]

    def fields(values: list[bytes]) -> list[tuple[bytes, bytes]]:
        return [(V.encode(), b"3"), *((f"k{i}".encode(), raw) for i, raw in enumerate(values))]

    got = decode_fields("alice-admin-x", iter(fields(raws)))
    assert got == {"version": 0, "remove": [], "add": [
        *(x for i, raw in enumerate(raws) for x in (f"k{i}", orjson.loads(raw))), V, 3],
        "txid": None}
    # A digit run across two values is not an integer: values are kept apart.
    assert decode_fields("alice-admin-x", [(b"a", b"1234567890"), (b"b", b"1234567890"),
                                           (V.encode(), b"1")])["add"] == [
        "a", 1234567890, "b", 1234567890, V, 1]
    for bad, error in ((b"[1, 99999999999999999999]", "holds the integer"),
                       (b"{nope", "holds undecodable")):
        with pytest.raises(BackendError, match=f"field 'k7' {error}"):
            decode_fields("alice-admin-x", fields([*raws[:7], bad, *raws[8:]]))
    with pytest.raises(BackendError, match="no '__ca_version__' field"):
        decode_fields("alice-admin-x", fields(raws)[1:])
    with pytest.raises(BackendError, match="version"):
        decode_fields("alice-admin-x", [(V.encode(), b"+5")])


def test_loaded_fields_are_frozen_once_and_a_refused_value_is_left_to_the_core() -> None:
    deep: Any = 0
    for _ in range(MAX_DEPTH + 1):
        deep = [deep]
    flat = [b"a", b'{"x": [1, {"y": 2}]}', "b", b"3", V.encode(), b"7", b"deep",
            orjson.dumps(deep)]
    out: list[Any] = ["kept"]
    assert load_fields(flat, orjson.loads, out) == b"7"
    assert out[:5] == ["kept", "a", {"x": [1, {"y": 2}]}, "b", 3]
    assert type(out[2]) is FrozenDict and type(out[2]["x"]) is FrozenList
    # Too deep for the core: left as decoded, for apply_changes to refuse.
    assert out[5] == "deep" and type(out[6]) is list and out[6] == deep
    with pytest.raises(InvalidChangeSetError, match="deeper"):
        SharedMap().apply_changes({"version": 0, "remove": [], "add": [*out[1:], V, 7]})
    # A map loading the dump keeps the frozen values themselves.
    dumped = decode_flat("alice-admin-x", flat[:6])
    m = SharedMap()
    m.apply_changes(dumped)
    assert m.ref()["a"] is dumped["add"][1]
    with pytest.raises(UnicodeDecodeError):
        load_fields([b"\xff", b"1"], orjson.loads, [])
    with pytest.raises(orjson.JSONDecodeError):
        load_fields([b"a", b"{nope"], orjson.loads, [])
    with pytest.raises(ValueError, match="pairs"):
        load_fields([b"a"], orjson.loads, [])
    with pytest.raises(TypeError, match="bytes or str"):
        load_fields([1, b"1"], orjson.loads, [])
    with pytest.raises(BackendError, match="field '\\ufffd' holds undecodable"):
        decode_flat("alice-admin-x", [b"\xff", b"1", V.encode(), b"1"])


def test_chunks_read_twice_or_bad_make_one_dump_or_one_error() -> None:
    scan = _Scan()
    scan.add(MAP, [b"a", b"1", b"b", b"[2]"])
    scan.add(MAP, [b"b", b"[2]", V.encode(), b"3"])  # HSCAN may return a field twice
    assert scan.dump(MAP, "t1", 3) == {"version": 0, "remove": [], "add": ["a", 1, "b", [2], V, 3],
                                       "txid": "t1"}
    bad = _Scan()
    bad.add(MAP, [b"a", b"1"])
    bad.add(MAP, [b"b", b"99999999999999999999", V.encode(), b"3"])
    bad.add(MAP, [b"c", b"{nope"])
    # Raised only by dump(): a read that a commit overlapped is made again instead.
    with pytest.raises(BackendError, match="field 'b' holds the integer '9999"):
        bad.dump(MAP, None, 4)


class Writer(Actor):
    async def init(self) -> None:
        self.sharing.add_writable_map("m", "data", initial_value={"a": 0})

    async def bump(self) -> int:
        ref = self.sharing.maps.m
        ref.set("a", ref.get("a") + 1)
        return int(ref.version) + 1


class Reader(Actor):
    async def init(self) -> None:
        self.sharing.add_read_only_map("m", "alice-writer-data")

    async def read(self) -> tuple[int, Any]:
        ref = self.sharing.maps.m
        return int(ref.version), ref.get("a")


@pytest.mark.redis
async def test_forged_publishes_do_not_pin_a_replica(redis_server: RedisServer) -> None:
    # One PUBLISH with __ca_version__ 2**63 - 1 used to move every replica
    # there for good; a list with a bad third element left two applied.
    app = f"w{uuid.uuid4().hex[:12]}"
    channel = f"caf:{app}:{{alice-writer}}:chan:alice-writer-data"
    async with Node(redis_server.url, app=app) as wnode, \
            Node(redis_server.url, app=app) as rnode:
        writer = await wnode.start(Writer, "alice-writer")
        reader = await rnode.start(Reader, "alice-reader")
        v = await writer.call("bump")
        await until_version(reader, v)
        forged = [
            {"version": v, "remove": [], "add": ["a", 666, V, 2 ** 63 - 1]},
            {"version": v, "remove": [], "add": ["a", 666, V, v + 5]},
            {"version": 0, "remove": [], "add": ["a", 666, V, 2 ** 53]},
            [{"version": v, "remove": [], "add": ["a", 666, V, v + 1]},
             {"version": v + 1, "remove": [], "add": ["a", 667, V, v + 2]},
             {"version": v + 2, "remove": [], "add": ["a", float("inf"), V, v + 3]}],
        ]
        with redis_server.client() as client:
            for message in forged:
                client.spublish(channel, json.dumps(message).encode())
        for _ in range(3):
            v = await writer.call("bump")
            seen = await until_version(reader, v)
            assert seen[0] == v, f"replica at {seen[0]}, writer at {v}"
        assert seen == (v, v - 1)


def test_txids_are_checked_once_and_the_memory_of_them_stays_bounded() -> None:
    from caf_sharing.backends import wire

    for i in range(wire._CHECKED_TXIDS_MAX + 10):
        assert wire._check_txid("txid", f"ep-{i}") == f"ep-{i}"
    assert 0 < len(wire._CHECKED_TXIDS) <= wire._CHECKED_TXIDS_MAX
    assert wire._check_txid("txid", "ep-5") == "ep-5"  # checked again after the clear
    for bad in ("", "has space", "x" * 65, "é", None, 7):
        with pytest.raises(ValueError, match="txid must be 1-64"):
            wire._check_txid("txid", bad)

    class Sly(str):
        """Equal to a checked txid, but not one itself."""

        def __eq__(self, other: object) -> bool:
            return True

        def __hash__(self) -> int:
            return hash("ep-5")

    with pytest.raises(ValueError, match="txid must be 1-64"):
        wire._check_txid("txid", Sly("bad txid"))


def test_lease_ttls_convert_the_same_when_remembered_and_bad_ones_never_are() -> None:
    from caf_sharing.backends import wire

    for _ in range(2):  # converted, then found
        assert [wire.ttl_to_ms(t) for t in (10.0, 0.0004, 1.0, 2.5e-3, 1e-9)] == [
            10000, 1, 1000, 2, 1]
        assert wire.ttl_to_ms(3) == 3000
        for bad in (True, 0.0, -0.0, -1.0, math.nan, math.inf, "1", None, 0):
            with pytest.raises(ValueError, match="lease ttl must be a finite number"):
                wire.ttl_to_ms(bad)
    for i in range(1, 2 * wire._TTL_MS_MAX):
        assert wire.ttl_to_ms(i / 8) == round(i * 125)
    assert len(wire._TTL_MS) <= wire._TTL_MS_MAX


def test_every_change_set_of_a_commit_carries_the_commit_s_one_time() -> None:
    writes = [MapWrite(f"{ACTOR}-m{i}", changes(3, {"a": i})) for i in range(16)]
    before = time.time_ns() // 1000
    encoded = encode_transaction(tx("t", writes=writes))
    stamps = {orjson.loads(w.payload)["ts"] for w in encoded.writes}
    assert len(stamps) == 1 and before <= stamps.pop() <= time.time_ns() // 1000


def test_each_change_set_of_a_commit_names_the_maps_published_after_it() -> None:
    names = ["m", "b_2", "a"]  # publish order is the writes' order, not sorted
    writes = [MapWrite(f"{ACTOR}-{name}", changes(3, {"x": 1})) for name in names]
    payloads = [orjson.loads(w.payload) for w in encode_transaction(tx("t", writes=writes)).writes]
    assert [p.get(MORE) for p in payloads] == [["b_2", "a"], ["a"], None]
    # One map: nothing follows. A "more" handed in is never what is published.
    forged = MapWrite(f"{ACTOR}-m", {**changes(3, {"x": 1}), MORE: ["b_2"]})
    assert MORE not in orjson.loads(encode_transaction(tx("t", writes=[forged])).writes[0]
                                    .payload)
    first = orjson.loads(encode_transaction(tx("t", writes=[forged, writes[2]])).writes[0]
                         .payload)
    assert first[MORE] == ["a"]
    last = orjson.loads(encode_transaction(tx("t", writes=[writes[2], forged])).writes[1]
                        .payload)
    assert MORE not in last


def test_a_change_set_value_orjson_refuses_is_named_and_so_is_a_bad_key() -> None:
    for bad in (object(), nested(300), 2 ** 64, "\ud800"):
        with pytest.raises(InvalidChangeSetError,
                           match=f"map '{MAP}': value of key 'k1' is not JSON data"):
            encode_transaction(tx("t", writes=[MapWrite(MAP, changes(3, {"k0": 0, "k1": bad}))]))
    # A key is encoded only in the published change set.
    with pytest.raises(InvalidChangeSetError, match=f"map '{MAP}': change set is not JSON data"):
        encode_transaction(tx("t", writes=[MapWrite(MAP, changes(3, {"\ud800": 1}))]))


def test_a_commit_s_reply_reads_the_same_once_its_writes_are_dropped() -> None:
    """A Redis commit in flight keeps only what its reply needs (drop_writes):
    every refusal still names the write it is about."""
    writes = [MapWrite(f"{ACTOR}-m{i}", {**changes(3 + i, {"a": i}), "base_txid": f"b{i}"})
              for i in range(3)]
    writes.append(MapWrite(f"{ACTOR}-m3", changes(0, {"a": 3})))  # no lineage
    replies = [[b"version", b"2", b"9"], [b"lineage", b"1", b"3", b"other"],
               [b"lineage", b"4", b"0", b"other"], [b"missing", b"1", b"3"],
               [b"chain", b"t0"], [b"lease", b"n2"], [b"ok"], [b"dup"]]

    def outcomes(encoded: EncodedTransaction) -> list[Any]:
        seen: list[Any] = []
        for reply in replies:
            try:
                seen.append(commit_outcome("redis://x", encoded, reply))
            except SharingError as exc:
                seen.append((type(exc), str(exc),
                             *(getattr(exc, a, None) for a in ("name", "expected", "current",
                                                                "names", "stored_txid"))))
        return seen

    kept = encode_transaction(tx("t", prev="t0", writes=writes))
    dropped = encode_transaction(tx("t", prev="t0", writes=writes))
    dropped.drop_writes()
    assert dropped.writes == [] and kept.writes
    assert [dropped.written(i) for i in range(4)] == [kept.written(i) for i in range(4)] == [
        (f"{ACTOR}-m{i}", 3 + i, f"b{i}") for i in range(3)] + [(f"{ACTOR}-m3", 0, None)]
    assert outcomes(dropped) == outcomes(kept)
    assert outcomes(kept)[0][2:5] == (f"{ACTOR}-m1", 4, 9)
    assert outcomes(kept)[3][5] == [f"{ACTOR}-m0", f"{ACTOR}-m2"]
