# cython: language_level=3, annotation_typing=False, binding=True
# Plain Python, also compiled by Cython when built (setup.py): see COMPILED there.
"""Validation and encoding shared by the backends.

Both backends store a map as ``field -> orjson bytes`` plus an integer version
(field ``__ca_version__``), and both check transactions the same way before
touching their store. This module turns the plain-dict change sets, dumps and
:class:`~caf_sharing.backends.base.Transaction` objects handed in by the
sharing service into validated, pre-encoded pieces, so that a bad argument is
refused with a clear error before anything is stored, and decodes what comes
back out of a store into dumps.

Decoding is as strict as the Lua scripts that write the store: a version is
a plain decimal below 2**53 (``" 7 "``, ``"+5"``, ``"1_0"`` and ``"07"`` are
refused, not read as 7, 5, 10), and an integer in a value must fit in 64
bits (orjson turns a longer one into an inexact float, which is refused
rather than stored).
"""

from __future__ import annotations

import functools
import math
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

import orjson

from .._fastmap import load_fields
from ..errors import (
    BackendError,
    BackendUnavailableError,
    ChainError,
    ConfigError,
    InvalidChangeSetError,
    InvalidNameError,
)
from ..names import check_actor_name, check_map_name, map_owner
from .base import DELETED, ChangeSet, Known, MapCreate, MapRestore, MapWrite, Transaction

__all__ = [
    "MAX_VERSION",
    "MORE",
    "VERSION_FIELD",
    "EncodedCreate",
    "EncodedRestore",
    "EncodedTransaction",
    "EncodedWrite",
    "Fields",
    "chain_broken",
    "check_app",
    "check_dump",
    "check_known",
    "check_one_owner",
    "decode_changes",
    "decode_checkpoint",
    "decode_fields",
    "decode_flat",
    "decode_value",
    "decode_version",
    "deleted_marker",
    "encode_dump",
    "encode_transaction",
    "finish_dump",
    "load_chunk",
    "make_dump",
    "ttl_to_ms",
]

VERSION_FIELD = "__ca_version__"
_VERSION_BYTES = VERSION_FIELD.encode()

Pairs = list[tuple[str, bytes]]

#: The field of a published change set holding its commit's time, in
#: microseconds since the epoch (the writer's clock).
TIMESTAMP = "ts"
#: The field of a published change set naming the maps (relative to their
#: owner, in order) whose change sets of the same commit follow it: a reader
#: holding several of them applies them together (writer atomicity), even
#: when the stream splits between two. Absent from a commit's last one.
MORE = "more"

_APP = re.compile(r"[A-Za-z0-9_.\-]{1,100}")


def check_app(app: object) -> str:
    """Return ``app`` if it is a valid application namespace (it prefixes
    every key, so braces and separators that could break a Redis hash tag
    are refused)."""
    if not isinstance(app, str) or not _APP.fullmatch(app):
        raise ConfigError(f"invalid app {app!r}: use 1-100 of A-Z a-z 0-9 _ . -")
    return app


class Fields:
    """The user fields of a checked whole map (a create's initial value, a
    full dump, a restore), each value orjson-encoded when iterated.

    Every key and value was checked when it was made (a bad value is refused
    before anything is stored, as ever), but nothing encoded is kept: a big
    map is sent in chunks (:meth:`chunks`), each encoded just before it goes,
    and all its encoded values held at once took more memory than the map.
    Iterating again encodes again (a retry)."""

    __slots__ = ("_flat", "map_name", "size")

    def __init__(self, map_name: str, flat: list[Any], size: int) -> None:
        self.map_name = map_name
        # User keys and values, alternating (the version pair taken out).
        self._flat = flat
        #: Bytes of the encoded fields: keys (in characters) plus values.
        self.size = size

    def __len__(self) -> int:
        return len(self._flat) // 2

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        flat, name = self._flat, self.map_name
        for i in range(0, len(flat), 2):
            key = flat[i]
            yield key, _encode(name, key, flat[i + 1])

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Fields):
            other = list(other)
        return isinstance(other, list) and list(self) == other

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<Fields of map {self.map_name!r}: {len(self)} fields, {self.size} bytes>"

    def chunks(self, fields: int, size: int) -> Iterator[Pairs]:
        """The fields in runs of at most ``fields`` fields and about ``size``
        bytes, each encoded as it is made."""
        chunk: Pairs = []
        held = 0
        for pair in self:
            chunk.append(pair)
            held += len(pair[0]) + len(pair[1])
            if len(chunk) >= fields or held >= size:
                yield chunk
                chunk, held = [], 0
        if chunk:
            yield chunk


#: Values checked by one orjson call: encoding a run at once is much cheaper
#: than one call each, and the run is dropped at once.
_CHECK_RUN = 4096


def _checked_fields(map_name: str, flat: list[Any]) -> Fields:
    """``flat`` (str keys and values, alternating) as :class:`Fields`, once
    every value is known to encode (else the error naming the first bad one)."""
    size = 0
    step = 2 * _CHECK_RUN
    for start in range(0, len(flat), step):
        keys = flat[start:start + step:2]
        values = flat[start + 1:start + step:2]
        size += sum(map(len, keys))
        try:
            # "[v1,v2,...]": the values, a comma between two, two brackets.
            size += len(orjson.dumps(values)) - len(values) - 1
        except TypeError:
            # Find the bad value (a run may also be refused for its own
            # depth, one level more than any value's: then none is bad).
            size += sum(len(_encode(map_name, key, value))
                        for key, value in zip(keys, values, strict=True))
    return Fields(map_name, flat, size)


@dataclass(slots=True)
class EncodedCreate:
    """A map to create when absent: its version and user fields."""

    name: str
    version: int
    fields: Fields


@dataclass(slots=True)
class EncodedRestore:
    """A map a re-assert puts back: its version, lineage and user fields."""

    name: str
    version: int
    txid: str | None
    fields: Fields


@dataclass(slots=True)
class EncodedWrite:
    """A validated change set of one map, values already orjson-encoded."""

    name: str
    base: int
    new_version: int
    remove: list[str]
    add: Pairs
    #: User fields of the ``full`` dump (``None`` without one).
    full: Fields | None
    #: What subscribers receive: the change set as given, orjson-encoded, with
    #: the commit's time added (:data:`TIMESTAMP`).
    payload: bytes
    #: Lineage: the txid that made the base version (``None``: unknown).
    base_txid: str | None = None
    #: The stored version this write renumbers to ``base`` (``None``: none).
    rebase_from: int | None = None


@dataclass(slots=True)
class EncodedTransaction:
    actor: str
    node_id: str
    txid: str
    prev_txid: str | None
    checkpoint: bytes
    lease_ttl_ms: int
    creates: list[EncodedCreate]
    writes: list[EncodedWrite]
    restores: list[EncodedRestore]
    reassert: bool
    #: Maps deleted, data included (validated names of the actor's maps).
    deletes: list[str]
    #: What the channel of each deleted map carries (empty without deletes).
    deleted_payload: bytes
    #: Name, base version and base txid of each write, kept by
    #: :meth:`drop_writes` (``None`` while ``writes`` holds them).
    sent: tuple[tuple[str, ...], tuple[int, ...], tuple[str | None, ...]] | None = None

    def drop_writes(self) -> None:
        """Keep of the writes only what reading the commit's reply needs,
        once the command carrying them is built. A commit waiting for its
        reply then holds a few tuples, not an object, two lists and a tuple
        per key for every map it writes: held until the reply, those outlived
        the cyclic collector's young generation, and with 16 maps a message
        its collections came half again as often."""
        writes = self.writes
        self.sent = (tuple([w.name for w in writes]), tuple([w.base for w in writes]),
                     tuple([w.base_txid for w in writes]))
        self.writes = []

    def written(self, i: int) -> tuple[str, int, str | None]:
        """Name, base version and base txid of write ``i`` (from 0)."""
        if self.sent is None:
            write = self.writes[i]
            return write.name, write.base, write.base_txid
        names, bases, base_txids = self.sent
        return names[i], bases[i], base_txids[i]


#: orjson's result holds a buffer of at least this many bytes, however short
#: the JSON (seen with orjson 3.13: 4089 bytes allocated for b'{"n":1}').
_ORJSON_BUFFER = 4096


def _encode(map_name: str, key: str, value: Any) -> bytes:
    try:
        out = orjson.dumps(value)
        # A map's encoded values are all held until its commit: a copy of the
        # exact size frees the buffer (1M keys took 4 GB before, 0.1 GB now).
        # Formatting makes that copy in a third of the time bytes(memoryview())
        # takes (35 ns, not 120, for a short value).
        return b"%b" % out if len(out) < _ORJSON_BUFFER // 2 else out
    except TypeError as exc:  # orjson.JSONEncodeError derives from TypeError
        raise InvalidChangeSetError(
            f"map {map_name!r}: value of key {key!r} is not JSON data: {exc}") from None


#: Versions stay below this: they travel through Lua (and JavaScript), whose
#: numbers are doubles, exact up to 2**53.
MAX_VERSION = 2**53


def _check_version(map_name: str, what: str, field: str, value: object) -> int:
    if type(value) is not int or not 0 <= value < MAX_VERSION:
        raise InvalidChangeSetError(
            f"map {map_name!r}: {what} {field!r} must be an int in [0, 2**53), got {value!r}")
    return value


_SEQUENCE = (list, tuple)


@overload
def _split_changes(map_name: str, changes: object, what: str, whole: Literal[False] = False
                   ) -> tuple[int, list[str], Pairs, int | None]: ...


@overload
def _split_changes(map_name: str, changes: object, what: str, whole: Literal[True]
                   ) -> tuple[int, list[str], Fields, int | None]: ...


def _split_changes(map_name: str, changes: object, what: str, whole: bool = False
                   ) -> tuple[int, list[str], Pairs | Fields, int | None]:
    """Check the shape of a change set; return (version, remove, encoded user
    pairs, value of the ``__ca_version__`` pair or None). Run for every map a
    commit writes: the checks are the same as ever, in as few steps as can be.
    A ``whole`` map's pairs come as :class:`Fields`, encoded when sent."""
    if not isinstance(changes, dict):
        raise InvalidChangeSetError(
            f"map {map_name!r}: {what} must be a dict, got {type(changes).__name__}")
    try:
        version, remove, add = changes["version"], changes["remove"], changes["add"]
    except KeyError as exc:
        raise InvalidChangeSetError(f"map {map_name!r}: {what} has no {exc.args[0]!r}") from None
    if type(version) is not int or not 0 <= version < MAX_VERSION:
        _check_version(map_name, what, "version", version)  # raises
    if not isinstance(remove, _SEQUENCE):
        raise InvalidChangeSetError(f"map {map_name!r}: {what} 'remove' must be a list")
    if not isinstance(add, _SEQUENCE) or len(add) % 2:
        raise InvalidChangeSetError(
            f"map {map_name!r}: {what} 'add' must be a list of key, value pairs")
    removed = list(remove)
    for key in removed:
        if not isinstance(key, str):
            raise InvalidChangeSetError(
                f"map {map_name!r}: {what} removes a non-str key {key!r}")
        if key == VERSION_FIELD:
            raise InvalidChangeSetError(
                f"map {map_name!r}: {what} removes the reserved key {VERSION_FIELD!r}")
    new_version: int | None = None
    pairs_of = iter(add)
    if whole:
        # Kept as they are (checked below): encoded only when sent.
        flat: list[Any] = []
        keep = flat.extend
        for key, value in zip(pairs_of, pairs_of, strict=True):  # len(add) is even
            if not isinstance(key, str):
                raise _non_str_key(map_name, what, key)
            if key == VERSION_FIELD:
                new_version = _version_pair(map_name, what, value, new_version)
            else:
                keep((key, value))
        return version, removed, _checked_fields(map_name, flat), new_version
    # A pair at a time off one iterator: a third cheaper than zip(strict=True)
    # for the few pairs a commit writes. Only a list whose iterator disagrees
    # with its len() can run out mid-pair.
    pairs: Pairs = []
    dumps = orjson.dumps
    try:
        for key in pairs_of:
            value = next(pairs_of)
            if type(key) is not str and not isinstance(key, str):
                raise _non_str_key(map_name, what, key)
            if key == VERSION_FIELD:
                if new_version is None and type(value) is int and 0 <= value < MAX_VERSION:
                    new_version = value
                else:
                    new_version = _version_pair(map_name, what, value, new_version)  # raises
            else:
                # _encode inline (a call per value is a third of its cost);
                # it still makes the error of a value orjson refuses.
                try:
                    out = dumps(value)
                except TypeError:
                    out = _encode(map_name, key, value)  # raises
                pairs.append((key, b"%b" % out if len(out) < _ORJSON_BUFFER // 2 else out))
    except StopIteration:
        raise InvalidChangeSetError(
            f"map {map_name!r}: {what} 'add' must be a list of key, value pairs") from None
    return version, removed, pairs, new_version


def _non_str_key(map_name: str, what: str, key: object) -> InvalidChangeSetError:
    return InvalidChangeSetError(f"map {map_name!r}: {what} adds a non-str key {key!r}")


def _version_pair(map_name: str, what: str, value: object, new_version: int | None) -> int:
    """The value of the version pair, found (again, if ``new_version`` is set)."""
    if new_version is not None:
        raise InvalidChangeSetError(
            f"map {map_name!r}: {what} holds {VERSION_FIELD!r} twice in 'add'")
    return _check_version(map_name, what, VERSION_FIELD, value)


def check_dump(map_name: str, dump: object, what: str = "dump") -> tuple[int, Fields]:
    """Validate a dump (version 0, no removes); return its version and its
    fields, encoded when iterated."""
    version, remove, fields, stored = _split_changes(map_name, dump, what, whole=True)
    if version != 0 or remove:
        raise InvalidChangeSetError(
            f"map {map_name!r}: a {what} must have version 0 and no removes")
    return (stored or 0), fields


def encode_dump(map_name: str, dump: object, what: str = "dump") -> tuple[int, Pairs]:
    """Validate a dump (version 0, no removes); return its version and fields."""
    version, fields = check_dump(map_name, dump, what)
    return version, list(fields)


def _encode_write(actor: str, txid: str, write: object, ts: int,
                  more: list[str] | None) -> EncodedWrite:
    """``write`` checked and encoded; ``ts`` is the commit's time (µs),
    ``more`` the maps whose change sets follow it (see :data:`MORE`)."""
    if not isinstance(write, MapWrite):
        raise TypeError(f"transaction writes must be MapWrite, got {type(write).__name__}")
    name = _owned_map(actor, write.name, "writes")
    changes = write.changes
    base, remove, add, new_version = _split_changes(name, changes, "change set")
    if new_version is None:
        new_version = base + 1
    if new_version != base + 1 or new_version >= MAX_VERSION:
        # The core refuses anything else on every replica (and versions
        # stay below 2**53): storing it would only break them all.
        raise InvalidChangeSetError(
            f"map {name!r}: change set {VERSION_FIELD!r} {new_version} is not its base "
            f"version {base} + 1 below 2**53")
    if changes.get("txid", txid) != txid:
        raise InvalidChangeSetError(
            f"map {name!r}: change set txid {changes['txid']!r} is not the "
            f"transaction's {txid!r}")
    base_txid = changes.get("base_txid")
    if base_txid is not None and (type(base_txid) is not str
                                  or base_txid not in _CHECKED_TXIDS):  # else known good
        _check_txid("base_txid", base_txid)
    rebase_from = write.rebase_from
    if rebase_from is not None:
        _check_version(name, "rebase", "rebase_from", rebase_from)
        if rebase_from >= base:
            raise InvalidChangeSetError(
                f"map {name!r}: a write renumbers a stored version to a higher one, "
                f"not {rebase_from} to {base}")
    full: Fields | None = None
    if write.full is not None:
        full_version, full = check_dump(name, write.full, "full dump")
        if full_version != new_version:
            raise InvalidChangeSetError(
                f"map {name!r}: full dump is at version {full_version}, "
                f"the change set makes version {new_version}")
    try:
        # The commit's time rides along ("ts", µs since the epoch) so that
        # readers can tell their propagation lag; Caf.js ignores the field.
        if more:
            payload = orjson.dumps({**changes, TIMESTAMP: ts, MORE: more})
        elif MORE in changes:  # only the commit says what follows
            payload = orjson.dumps({key: value for key, value in {**changes, TIMESTAMP: ts}
                                    .items() if key != MORE})
        else:
            payload = orjson.dumps({**changes, TIMESTAMP: ts})
    except TypeError as exc:
        raise InvalidChangeSetError(f"map {name!r}: change set is not JSON data: {exc}") from None
    return EncodedWrite(name, base, new_version, remove, add, full, payload, base_txid,
                        rebase_from)


# Actors commit the same few names over and over: check each once.
_owner = functools.lru_cache(maxsize=4096)(map_owner)
_actor = functools.lru_cache(maxsize=4096)(check_actor_name)


def _owned_map(actor: str, name: object, what: str) -> str:
    if not isinstance(name, str):
        raise InvalidNameError(f"map name must be a str, got {type(name).__name__}")
    owner = _owner(name)  # checks the whole name
    if owner != actor:
        raise InvalidChangeSetError(
            f"transaction of actor {actor!r} {what} map {name!r} owned by {owner!r}")
    return name


def _encode_create(actor: str, create: object) -> EncodedCreate:
    if not isinstance(create, MapCreate):
        raise TypeError(f"transaction creates must be MapCreate, got {type(create).__name__}")
    name = _owned_map(actor, create.name, "creates")
    if create.initial is None:
        return EncodedCreate(name, 0, Fields(name, [], 0))
    version, fields = check_dump(name, create.initial, "initial value")
    return EncodedCreate(name, version, fields)


# A node passes the same lease ttl (a float) at every commit: its conversion
# is looked up (70 ns, not 180). Only valid ones are kept, a few at most.
_TTL_MS: dict[float, int] = {}
_TTL_MS_MAX = 64


def ttl_to_ms(ttl: object) -> int:
    """A lease duration in seconds as whole milliseconds (at least 1)."""
    if type(ttl) is float:  # exactly: True == 1.0 would find 1.0's entry
        ms = _TTL_MS.get(ttl)
        if ms is not None:
            return ms
        if 0 < ttl < math.inf:
            ms = max(1, round(ttl * 1000))
            if len(_TTL_MS) < _TTL_MS_MAX:
                _TTL_MS[ttl] = ms
            return ms
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl) \
            or ttl <= 0:
        raise ValueError(f"lease ttl must be a finite number of seconds > 0, got {ttl!r}")
    return max(1, round(ttl * 1000))


def _check_id(what: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty str, got {value!r}")
    return value


# Txids go into every published change set and into log lines: a short, plain
# alphabet keeps them from carrying anything else.
_TXID = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")


# Txids checked already. Most come again: a commit's previous txid and the
# base txid of every map it writes are one earlier commit's txid, checked when
# that commit was (a regular expression each, a tenth of a 16-map commit).
_CHECKED_TXIDS: dict[str, None] = {}
_CHECKED_TXIDS_MAX = 4096


def _check_txid(what: str, value: object) -> str:
    if type(value) is str and value in _CHECKED_TXIDS:
        return value
    if not isinstance(value, str) or not _TXID.fullmatch(value):
        raise ValueError(f"{what} must be 1-64 of A-Z a-z 0-9 _ . : -, got {value!r}")
    if type(value) is str:  # a subclass could compare equal to what it is not
        if len(_CHECKED_TXIDS) >= _CHECKED_TXIDS_MAX:
            _CHECKED_TXIDS.clear()
        _CHECKED_TXIDS[value] = None
    return value


def _encode_restore(actor: str, restore: object) -> EncodedRestore:
    if not isinstance(restore, MapRestore):
        raise TypeError(f"transaction restores must be MapRestore, got {type(restore).__name__}")
    name = _owned_map(actor, restore.name, "restores")
    version, fields = check_dump(name, restore.dump, "restored dump")
    txid = restore.dump.get("txid") if isinstance(restore.dump, dict) else None
    if txid is not None:
        _check_txid("restored dump txid", txid)
    return EncodedRestore(name, version, txid, fields)


def encode_transaction(tx: Transaction) -> EncodedTransaction:
    """Validate ``tx`` completely and encode every piece a store needs."""
    if not isinstance(tx, Transaction):
        raise TypeError(f"commit needs a Transaction, got {type(tx).__name__}")
    actor = tx.actor
    if not isinstance(actor, str):
        raise InvalidNameError(f"actor name must be a str, got {type(actor).__name__}")
    actor = _actor(actor)
    node_id = tx.node_id
    if type(node_id) is not str or not node_id:
        _check_id("node_id", node_id)  # raises unless a str subclass
    txid = _check_txid("txid", tx.txid)
    prev_txid = tx.prev_txid
    if prev_txid is not None and (type(prev_txid) is not str
                                  or prev_txid not in _CHECKED_TXIDS):  # else known good
        _check_txid("prev_txid", prev_txid)
    checkpoint = tx.checkpoint
    if not isinstance(checkpoint, dict):
        raise TypeError(f"checkpoint must be a dict, got {type(checkpoint).__name__}")
    if checkpoint.get("txid", txid) != txid:
        raise ValueError(
            f"checkpoint txid {checkpoint['txid']!r} differs from the transaction's {txid!r}")
    try:
        encoded_checkpoint = orjson.dumps(checkpoint)
    except TypeError as exc:
        raise ValueError(f"checkpoint of actor {actor!r} is not JSON data: {exc}") from None
    # Most commits write one map and nothing else: no loop for the rest, and
    # a plain loop for the writes (a comprehension is a call of its own).
    creates = [_encode_create(actor, c) for c in tx.creates] if tx.creates else []
    ts = time.time_ns() // 1000
    writes: list[EncodedWrite] = []
    if len(tx.writes) == 1:
        writes.append(_encode_write(actor, txid, tx.writes[0], ts, None))
    elif tx.writes:
        # From the last: each change set names the maps published after it
        # (``after`` grows once encoded into the payload: no copy per write).
        after: list[str] = []
        skip = len(actor) + 1
        for write in reversed(tx.writes):
            encoded = _encode_write(actor, txid, write, ts, after)
            writes.append(encoded)
            after.insert(0, encoded.name[skip:])
        writes.reverse()
    restores = [_encode_restore(actor, r) for r in tx.restores] if tx.restores else []
    deletes = [_owned_map(actor, name, "deletes") for name in tx.deletes] if tx.deletes else []
    if len(creates) > 1:
        _no_duplicates("creates", (c.name for c in creates))
    if len(writes) + len(restores) + len(deletes) > 1:
        _no_duplicates("writes, restores or deletes", [w.name for w in writes] +
                       [r.name for r in restores] + deletes)
    if deletes and creates:
        _no_duplicates("creates and deletes", [c.name for c in creates] + deletes)
    return EncodedTransaction(actor, node_id, txid, prev_txid, encoded_checkpoint,
                              ttl_to_ms(tx.lease_ttl), creates, writes, restores,
                              bool(tx.reassert), deletes,
                              deleted_marker(txid) if deletes else b"")


def deleted_marker(txid: str | None) -> bytes:
    """What a deleted map's channel carries (see :data:`~.base.DELETED`)."""
    return orjson.dumps({DELETED: True, "txid": txid})


def check_known(known: object) -> Known:
    """Check ``read_maps``' ``known``: map name -> (version, txid or None)."""
    if known is None:
        return {}
    if not isinstance(known, Mapping):
        raise TypeError("known must map map names to (version, txid), got "
                        f"{type(known).__name__}")
    for name, stamp in known.items():
        if not (type(stamp) is tuple and len(stamp) == 2 and type(stamp[0]) is int
                and 0 <= stamp[0] < MAX_VERSION
                and (stamp[1] is None or type(stamp[1]) is str)):
            raise ValueError(f"known[{name!r}] must be (version, txid or None), "
                             f"got {stamp!r}")
    return known


def check_one_owner(names: Sequence[str]) -> str | None:
    """Check ``names`` for ``read_maps``: map names of one owner; return it
    (``None`` for no names)."""
    owners = {map_owner(check_map_name(name)) for name in names}
    if len(owners) > 1:
        raise ValueError(f"read_maps reads maps of one owner, got {sorted(owners)}")
    return owners.pop() if owners else None


def check_open(url: str, app: str, started: bool, closed: bool) -> None:
    """Refuse use of a backend before ``start()`` or after ``close()``."""
    if closed:
        raise BackendUnavailableError(f"backend {url} (app {app!r}) is closed")
    if not started:
        raise BackendUnavailableError(
            f"backend {url} (app {app!r}) is not started: await start() first")


def chain_broken(tx: EncodedTransaction, stored_txid: str | None) -> ChainError:
    """The error for a commit that does not follow the actor's stored one."""
    return ChainError(
        f"the store does not follow this node's commits of actor {tx.actor!r}: another "
        f"node committed since, or the store went back (stored txid {stored_txid!r}, "
        f"expected {tx.prev_txid!r})", actor=tx.actor, stored_txid=stored_txid)


def _no_duplicates(what: str, names: Iterable[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"transaction {what} map {name!r} more than once")
        seen.add(name)


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# Digits become "1", other bytes "0": a run of 19 ones is a run of 19 digits,
# which an integer past 64 bits needs (2**63 has 19). Two C passes find it
# several times faster than a regular expression, and orjson.loads costs
# about as much: a store's values are scanned in one joined pass.
_DIGIT_MAP = bytes(0x31 if 0x30 <= b <= 0x39 else 0x30 for b in range(256))
_DIGIT_RUN = b"1" * 19


def _has_digit_run(raw: bytes) -> bool:
    return len(raw) >= 19 and _DIGIT_RUN in raw.translate(_DIGIT_MAP)


# The tokens of valid JSON that hold digits: whole strings (so no number is
# found inside one) and numbers.
_JSON_DIGIT_TOKENS = re.compile(
    rb'"[^"\\]*(?:\\.[^"\\]*)*"|-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?')


def _long_int(raw: bytes) -> bytes | None:
    """The first integer literal of the valid JSON text ``raw`` outside the
    64-bit range, or None. Called only when ``raw`` has a long digit run."""
    for match in _JSON_DIGIT_TOKENS.finditer(raw):
        token = match.group()
        if token[:1] == b'"' or b"." in token or b"e" in token or b"E" in token:
            continue
        # Past 20 characters no int fits; int() of a huge one is itself slow.
        if len(token) > 20 or not _INT64_MIN <= int(token) <= _INT64_MAX:
            return token
    return None


def _preview(raw: object) -> str:
    text = repr(raw)
    return text if len(text) <= 60 else text[:57] + "..."


def decode_value(map_name: str, key: str, raw: bytes) -> Any:
    """A stored value: JSON whose integers fit in 64 bits (DESIGN section 3)."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BackendError(
            f"map {map_name!r}: field {key!r} holds undecodable data: {exc}") from None
    kind = type(value)
    if kind is int:
        if _INT64_MIN <= value <= _INT64_MAX:
            return value
    elif kind is str or kind is bool or value is None or not _has_digit_run(raw):
        return value
    else:
        token = _long_int(raw)
        if token is None:
            return value
        value = token.decode()
    raise BackendError(
        f"map {map_name!r}: field {key!r} holds the integer {_preview(value)}, outside the "
        "64-bit range of values")


def decode_fields(map_name: str, pairs: Iterable[tuple[bytes | str, bytes]],
                  txid: str | None = None) -> ChangeSet:
    """The dump of a stored map from its raw fields (name, orjson bytes), the
    version field among them, made by commit ``txid``. Values are decoded as
    :func:`decode_value` does (see :func:`load_chunk`)."""
    flat: list[Any] = []
    for field, raw in pairs:
        flat.append(field)
        flat.append(raw)
    return decode_flat(map_name, flat, txid)


def decode_flat(map_name: str, flat: list[Any], txid: str | None = None) -> ChangeSet:
    """:func:`decode_fields` of ``flat``: field, raw value, field, ... (a
    Redis HGETALL reply)."""
    items: list[Any] = []
    return finish_dump(map_name, items, load_chunk(map_name, flat, items), txid)


def load_chunk(map_name: str, flat: list[Any], items: list[Any]) -> bytes | None:
    """Decode ``flat`` (field, raw value, ...: one HSCAN reply, say) onto
    ``items`` (str field, value, ...), and return the raw value of the
    version field, or None when ``flat`` does not hold it.

    Values are decoded as :func:`decode_value` does, and deep-frozen as the
    core stores them (:func:`~caf_sharing._fastmap.load_fields`), so that a
    replica loading the dump keeps them instead of a copy of each. The scan
    for long integers is made once over all of them (a map holds none in the
    common case). A bad field raises :class:`BackendError` naming it, and
    ``items`` is left as it was."""
    mark = len(items)
    try:
        version: bytes | None = load_fields(flat, orjson.loads, items)
    except (orjson.JSONDecodeError, UnicodeDecodeError):
        del items[mark:]
        _undecodable(map_name, flat)
        raise
    # Joined with a comma, so that no digit run spans two values.
    if _has_digit_run(b",".join(flat[1::2])):
        for i in range(1, len(flat), 2):
            raw = flat[i]
            token = _long_int(raw) if _has_digit_run(raw) else None
            if token is not None and _field_name(flat[i - 1]) != VERSION_FIELD:
                del items[mark:]
                raise BackendError(
                    f"map {map_name!r}: field {_field_name(flat[i - 1])!r} holds the integer "
                    f"{_preview(token.decode())}, outside the 64-bit range of values")
    return version


def finish_dump(map_name: str, items: list[Any], version: bytes | int | None,
                txid: str | None = None) -> ChangeSet:
    """The dump of the decoded ``items`` (see :func:`load_chunk`; they are
    taken over, not copied) at ``version``, the raw version field (checked
    by :func:`decode_version`)."""
    if version is None:
        raise BackendError(f"map {map_name!r} has no {VERSION_FIELD!r} field")
    items.append(VERSION_FIELD)
    items.append(decode_version(map_name, version))
    return {"version": 0, "remove": [], "add": items, "txid": txid}


def _field_name(field: bytes | str) -> str:
    return field if isinstance(field, str) else field.decode(errors="replace")


def _undecodable(map_name: str, flat: list[Any]) -> None:
    """Raise the error of the first undecodable field of ``flat``."""
    for i in range(0, len(flat), 2):
        field = flat[i]
        try:
            if not isinstance(field, str):
                field.decode()
            orjson.loads(flat[i + 1])
        except (orjson.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BackendError(f"map {map_name!r}: field {_field_name(field)!r} "
                               f"holds undecodable data: {exc}") from None


_DECIMAL = re.compile(r"0|[1-9][0-9]{0,15}")
_DECIMAL_BYTES = re.compile(rb"0|[1-9][0-9]{0,15}")


def decode_version(map_name: str, raw: bytes | str | int) -> int:
    """A stored version: a plain decimal, as the scripts store it, below
    2**53. Anything else (spaces, signs, underscores, leading zeros, other
    digits) means someone else wrote it, and is refused."""
    if type(raw) is int:  # a RESP integer
        version = raw
    elif ((type(raw) is bytes and _DECIMAL_BYTES.fullmatch(raw))
          or (type(raw) is str and _DECIMAL.fullmatch(raw))):
        version = int(raw)
    else:
        raise BackendError(f"map {map_name!r}: field {VERSION_FIELD!r} holds {_preview(raw)}, "
                           "not a version (a plain decimal)")
    if not 0 <= version < MAX_VERSION:
        raise BackendError(f"map {map_name!r}: version {version} is outside [0, 2**53)")
    return version


def decode_changes(map_name: str, data: bytes) -> Any:
    """A published message (a change set, or a list of them): JSON whose
    integers fit in 64 bits. Its shape is left to ``SharedMap.apply_changes``,
    which refuses a bad one as a whole."""
    try:
        changes = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidChangeSetError(f"map {map_name!r}: message is not JSON: {exc}") from None
    if len(data) >= 19 and _DIGIT_RUN in data.translate(_DIGIT_MAP):  # _has_digit_run, inline
        token = _long_int(data)
        if token is not None:
            raise InvalidChangeSetError(
                f"map {map_name!r}: message holds the integer {_preview(token)}, outside the "
                "64-bit range")
    return changes


def make_dump(version: int, items: Sequence[Any], txid: str | None = None) -> ChangeSet:
    """A dump from flat decoded user pairs ``[k1, v1, ...]``, a version and the
    txid that made that version."""
    add = list(items)
    add.append(VERSION_FIELD)
    add.append(version)
    return {"version": 0, "remove": [], "add": add, "txid": txid}


def decode_checkpoint(actor: str, raw: bytes) -> dict[str, Any]:
    try:
        checkpoint = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BackendError(f"checkpoint of actor {actor!r} is undecodable: {exc}") from None
    if not isinstance(checkpoint, dict):
        raise BackendError(f"checkpoint of actor {actor!r} is not an object")
    return checkpoint
