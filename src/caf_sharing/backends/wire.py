"""Validation and encoding shared by the backends.

Both backends store a map as ``field -> orjson bytes`` plus an integer version
(field ``__ca_version__``), and both check transactions the same way before
touching their store. This module turns the plain-dict change sets, dumps and
:class:`~caf_sharing.backends.base.Transaction` objects handed in by the
sharing service into validated, pre-encoded pieces, so that a bad argument is
refused with a clear error before anything is stored, and decodes what comes
back out of a store into dumps.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from ..errors import (
    BackendError,
    BackendUnavailableError,
    ChainError,
    ConfigError,
    InvalidChangeSetError,
    InvalidNameError,
)
from ..names import check_actor_name, map_owner
from .base import ChangeSet, MapCreate, MapRestore, MapWrite, Transaction

__all__ = [
    "MAX_VERSION",
    "VERSION_FIELD",
    "EncodedCreate",
    "EncodedRestore",
    "EncodedTransaction",
    "EncodedWrite",
    "chain_broken",
    "check_app",
    "decode_checkpoint",
    "decode_value",
    "decode_version",
    "encode_dump",
    "encode_transaction",
    "make_dump",
    "ttl_to_ms",
]

VERSION_FIELD = "__ca_version__"

Pairs = list[tuple[str, bytes]]

_APP = re.compile(r"[A-Za-z0-9_.\-]{1,100}")


def check_app(app: object) -> str:
    """Return ``app`` if it is a valid application namespace (it prefixes
    every key, so braces and separators that could break a Redis hash tag
    are refused)."""
    if not isinstance(app, str) or not _APP.fullmatch(app):
        raise ConfigError(f"invalid app {app!r}: use 1-100 of A-Z a-z 0-9 _ . -")
    return app


@dataclass(frozen=True, slots=True)
class EncodedCreate:
    """A map to create when absent: its version and encoded user fields."""

    name: str
    version: int
    fields: Pairs


@dataclass(frozen=True, slots=True)
class EncodedRestore:
    """A map a re-assert puts back: its version, lineage and encoded fields."""

    name: str
    version: int
    txid: str | None
    fields: Pairs


@dataclass(frozen=True, slots=True)
class EncodedWrite:
    """A validated change set of one map, values already orjson-encoded."""

    name: str
    base: int
    new_version: int
    remove: list[str]
    add: Pairs
    #: Encoded user fields of the ``full`` dump (``None`` without one).
    full: Pairs | None
    #: What subscribers receive: the change set exactly as given, orjson-encoded.
    payload: bytes
    #: Lineage: the txid that made the base version (``None``: unknown).
    base_txid: str | None = None
    #: The stored version this write renumbers to ``base`` (``None``: none).
    rebase_from: int | None = None


@dataclass(frozen=True, slots=True)
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


def _encode(map_name: str, key: str, value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError as exc:  # orjson.JSONEncodeError derives from TypeError
        raise InvalidChangeSetError(
            f"map {map_name!r}: value of key {key!r} is not JSON data: {exc}") from None


#: Versions travel through Lua, whose numbers are doubles: exact up to 2**53.
MAX_VERSION = 2**53


def _check_version(map_name: str, what: str, field: str, value: object) -> int:
    if type(value) is not int or not 0 <= value <= MAX_VERSION:
        raise InvalidChangeSetError(
            f"map {map_name!r}: {what} {field!r} must be an int in [0, 2**53], got {value!r}")
    return value


def _split_changes(map_name: str, changes: object, what: str
                   ) -> tuple[int, list[str], Pairs, int | None]:
    """Check the shape of a change set; return (version, remove, encoded user
    pairs, value of the ``__ca_version__`` pair or None)."""
    if not isinstance(changes, dict):
        raise InvalidChangeSetError(
            f"map {map_name!r}: {what} must be a dict, got {type(changes).__name__}")
    for field in ("version", "remove", "add"):
        if field not in changes:
            raise InvalidChangeSetError(f"map {map_name!r}: {what} has no {field!r}")
    version = _check_version(map_name, what, "version", changes["version"])
    remove = changes["remove"]
    add = changes["add"]
    if not isinstance(remove, list | tuple):
        raise InvalidChangeSetError(f"map {map_name!r}: {what} 'remove' must be a list")
    if not isinstance(add, list | tuple) or len(add) % 2:
        raise InvalidChangeSetError(
            f"map {map_name!r}: {what} 'add' must be a list of key, value pairs")
    removed: list[str] = []
    for key in remove:
        if not isinstance(key, str):
            raise InvalidChangeSetError(
                f"map {map_name!r}: {what} removes a non-str key {key!r}")
        if key == VERSION_FIELD:
            raise InvalidChangeSetError(
                f"map {map_name!r}: {what} removes the reserved key {VERSION_FIELD!r}")
        removed.append(key)
    pairs: Pairs = []
    new_version: int | None = None
    for i in range(0, len(add), 2):
        key = add[i]
        if not isinstance(key, str):
            raise InvalidChangeSetError(f"map {map_name!r}: {what} adds a non-str key {key!r}")
        if key == VERSION_FIELD:
            new_version = _check_version(map_name, what, VERSION_FIELD, add[i + 1])
        else:
            pairs.append((key, _encode(map_name, key, add[i + 1])))
    return version, removed, pairs, new_version


def encode_dump(map_name: str, dump: object, what: str = "dump") -> tuple[int, Pairs]:
    """Validate a dump (version 0, no removes); return its version and fields."""
    version, remove, pairs, stored = _split_changes(map_name, dump, what)
    if version != 0 or remove:
        raise InvalidChangeSetError(
            f"map {map_name!r}: a {what} must have version 0 and no removes")
    return (stored or 0), pairs


def _encode_write(actor: str, txid: str, write: object) -> EncodedWrite:
    if not isinstance(write, MapWrite):
        raise TypeError(f"transaction writes must be MapWrite, got {type(write).__name__}")
    name = _owned_map(actor, write.name, "writes")
    base, remove, add, new_version = _split_changes(name, write.changes, "change set")
    if new_version is None:
        new_version = base + 1
    elif new_version <= base:
        raise InvalidChangeSetError(
            f"map {name!r}: change set {VERSION_FIELD!r} {new_version} is not past "
            f"its base version {base}")
    if write.changes.get("txid", txid) != txid:
        raise InvalidChangeSetError(
            f"map {name!r}: change set txid {write.changes['txid']!r} is not the "
            f"transaction's {txid!r}")
    base_txid = write.changes.get("base_txid")
    if base_txid is not None:
        _check_txid("base_txid", base_txid)
    rebase_from = write.rebase_from
    if rebase_from is not None:
        _check_version(name, "rebase", "rebase_from", rebase_from)
        if rebase_from >= base:
            raise InvalidChangeSetError(
                f"map {name!r}: a write renumbers a stored version to a higher one, "
                f"not {rebase_from} to {base}")
    full: Pairs | None = None
    if write.full is not None:
        full_version, full = encode_dump(name, write.full, "full dump")
        if full_version != new_version:
            raise InvalidChangeSetError(
                f"map {name!r}: full dump is at version {full_version}, "
                f"the change set makes version {new_version}")
    try:
        payload = orjson.dumps(write.changes)
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
        return EncodedCreate(name, 0, [])
    version, fields = encode_dump(name, create.initial, "initial value")
    return EncodedCreate(name, version, fields)


def ttl_to_ms(ttl: object) -> int:
    """A lease duration in seconds as whole milliseconds (at least 1)."""
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl) \
            or ttl <= 0:
        raise ValueError(f"lease ttl must be a finite number of seconds > 0, got {ttl!r}")
    return max(1, round(ttl * 1000))


def _check_id(what: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty str, got {value!r}")
    return value


# Txids are kept space-separated in the store's window of recent commits.
_TXID = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")


def _check_txid(what: str, value: object) -> str:
    if not isinstance(value, str) or not _TXID.fullmatch(value):
        raise ValueError(f"{what} must be 1-64 of A-Z a-z 0-9 _ . : -, got {value!r}")
    return value


def _encode_restore(actor: str, restore: object) -> EncodedRestore:
    if not isinstance(restore, MapRestore):
        raise TypeError(f"transaction restores must be MapRestore, got {type(restore).__name__}")
    name = _owned_map(actor, restore.name, "restores")
    version, fields = encode_dump(name, restore.dump, "restored dump")
    txid = restore.dump.get("txid") if isinstance(restore.dump, dict) else None
    if txid is not None:
        _check_txid("restored dump txid", txid)
    return EncodedRestore(name, version, txid, fields)


def encode_transaction(tx: Transaction) -> EncodedTransaction:
    """Validate ``tx`` completely and encode every piece a store needs."""
    if not isinstance(tx, Transaction):
        raise TypeError(f"commit needs a Transaction, got {type(tx).__name__}")
    if not isinstance(tx.actor, str):
        raise InvalidNameError(f"actor name must be a str, got {type(tx.actor).__name__}")
    actor = _actor(tx.actor)
    node_id = _check_id("node_id", tx.node_id)
    txid = _check_txid("txid", tx.txid)
    if tx.prev_txid is not None:
        _check_txid("prev_txid", tx.prev_txid)
    if not isinstance(tx.checkpoint, dict):
        raise TypeError(f"checkpoint must be a dict, got {type(tx.checkpoint).__name__}")
    if tx.checkpoint.get("txid", txid) != txid:
        raise ValueError(
            f"checkpoint txid {tx.checkpoint['txid']!r} differs from the transaction's {txid!r}")
    try:
        checkpoint = orjson.dumps(tx.checkpoint)
    except TypeError as exc:
        raise ValueError(f"checkpoint of actor {actor!r} is not JSON data: {exc}") from None
    creates = [_encode_create(actor, c) for c in tx.creates]
    writes = [_encode_write(actor, txid, w) for w in tx.writes]
    restores = [_encode_restore(actor, r) for r in tx.restores]
    if len(creates) > 1:
        _no_duplicates("creates", (c.name for c in creates))
    if len(writes) + len(restores) > 1:
        _no_duplicates("writes or restores", [w.name for w in writes] +
                       [r.name for r in restores])
    return EncodedTransaction(actor, node_id, txid, tx.prev_txid, checkpoint,
                              ttl_to_ms(tx.lease_ttl), creates, writes, restores,
                              bool(tx.reassert))


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


def decode_value(map_name: str, key: str, raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BackendError(
            f"map {map_name!r}: field {key!r} holds undecodable data: {exc}") from None


def decode_version(map_name: str, raw: bytes | str | int) -> int:
    try:
        version = int(raw)
    except (TypeError, ValueError):
        raise BackendError(
            f"map {map_name!r}: field {VERSION_FIELD!r} holds {raw!r}, not an int") from None
    if version < 0:
        raise BackendError(f"map {map_name!r}: negative version {version}")
    return version


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
