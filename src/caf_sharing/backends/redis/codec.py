# cython: language_level=3, annotation_typing=False, binding=True
# Plain Python, also compiled by Cython when built (setup.py): see COMPILED there.
"""What the Redis backend sends and reads back: key and channel names, RESP
packing, the commit script's arguments and replies, and the read script's
replies decoded into dumps.

Layout (``app`` namespaces everything; the actor name in braces is the Redis
Cluster hash tag, so all keys of one actor, its maps and their channels
included, share a slot and one script call can touch them all)::

    caf:<app>:{<actor>}:cp            hash: "txid", "blob" (the checkpoint JSON)
    caf:<app>:{<actor>}:recent        list: earlier txids, newest first (retried commits)
    caf:<app>:{<actor>}:lease         string: node id, with a TTL
    caf:<app>:{<actor>}:wait          string: written before a WAIT, expires with it
    caf:<app>:{<owner>}:lineage       hash: map name -> txid that made its version
    caf:<app>:{<owner>}:map:<name>    hash: "__ca_version__" -> int, key -> JSON value
    caf:<app>:{<owner>}:chan:<name>   (sharded) pub/sub channel of the map's change sets
    caf:<app>:node:{<node_id>}        string: the nonce of the live node using node_id, with a TTL
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from redis import exceptions as rexc
from redis.crc import key_slot

from ...errors import (
    BackendError,
    ConcurrentUpdateError,
    LeaseLostError,
    MapMissingError,
)
from ...names import map_owner
from ..base import RECENT_TXIDS, ChangeSet, Known
from ..wire import EncodedTransaction, Fields, chain_broken, decode_flat, decode_version
from ._resp import pack_command
from .scripts import COMMIT

__all__ = ["SAME", "Command", "Keys", "commit_outcome", "decode_all", "decode_txid", "flatten",
           "held_args", "pack", "slot_of"]

Command = tuple[Any, ...]


def slot_of(owner: str) -> int:
    """The cluster slot of every key of actor ``owner`` (its hash tag)."""
    return key_slot(owner.encode())


class Keys:
    """The key and channel names of one ``app``."""

    __slots__ = ("app",)

    def __init__(self, app: str) -> None:
        self.app = app

    def actor(self, actor: str, what: str) -> str:
        return f"caf:{self.app}:{{{actor}}}:{what}"

    def map(self, name: str) -> str:
        return f"caf:{self.app}:{{{map_owner(name)}}}:map:{name}"

    def channel(self, name: str) -> str:
        return f"caf:{self.app}:{{{map_owner(name)}}}:chan:{name}"

    def node(self, node_id: str) -> str:
        return f"caf:{self.app}:node:{{{node_id}}}"

    def stage(self, tx: EncodedTransaction, item: str) -> str:
        """Where the client stages the content of one big map of ``tx``."""
        return self.actor(tx.actor, f"stage:{tx.txid}:{item}")

    def commit(self, tx: EncodedTransaction, publish: str,
               staged: Mapping[str, str] | None = None) -> Command:
        """The EVALSHA of ``tx`` (see ``lua/commit.lua`` for the arguments);
        its change sets go out with ``publish`` (SPUBLISH or PUBLISH).
        ``staged`` maps items (``c<i>``, ``w<i>``, ``r<i>``: the full content
        of create, write or restore i) to the hash holding it already."""
        # Every map of a transaction is owned by its actor (checked when encoded).
        prefix = f"caf:{self.app}:{{{tx.actor}}}:"
        keys = [prefix + "cp", prefix + "lease", prefix + "lineage", prefix + "recent"]
        # The order of KEYS the script reads; most commits only write.
        if tx.creates:
            keys += [f"{prefix}map:{c.name}" for c in tx.creates]
        keys += [f"{prefix}map:{w.name}" for w in tx.writes]
        if tx.restores:
            keys += [f"{prefix}map:{r.name}" for r in tx.restores]
        if tx.deletes:
            keys += [f"{prefix}map:{name}" for name in tx.deletes]
        staged = staged or {}

        def items(item: str, pairs: Fields) -> list[Any]:
            stage = staged.get(item)
            if stage is None:
                return [2 * len(pairs), *flatten(pairs)]
            keys.append(stage)
            return [-2, len(keys)]  # its index in KEYS, from 1
        argv: list[Any] = [
            tx.node_id, tx.txid, tx.prev_txid or "", 0 if tx.prev_txid is None else 1,
            tx.lease_ttl_ms, tx.checkpoint, len(tx.creates), len(tx.writes),
            len(tx.restores), 1 if tx.reassert else 0, RECENT_TXIDS, publish,
            len(tx.deletes), tx.deleted_payload]
        create_index: dict[str, int] = {}
        for i, create in enumerate(tx.creates, 1):
            create_index[create.name] = i
            argv.extend((create.name, create.version))
            argv.extend(items(f"c{i - 1}", create.fields))
        channel = prefix + "chan:"
        for i, write in enumerate(tx.writes):
            full = None if write.full is None else items(f"w{i}", write.full)
            argv += (write.name, write.base, write.new_version,
                     create_index.get(write.name, 0) if create_index else 0,
                     -1 if write.rebase_from is None else write.rebase_from,
                     write.base_txid or "", channel + write.name, write.payload,
                     len(write.remove), 2 * len(write.add), -1 if full is None else full[0])
            argv += write.remove
            for pair in write.add:
                argv += pair
            if full is not None:
                argv += full[1:]
        for i, restore in enumerate(tx.restores):
            argv.extend((restore.name, restore.version, restore.txid or ""))
            argv.extend(items(f"r{i}", restore.fields))
        for name in tx.deletes:
            argv.extend((name, f"{prefix}chan:{name}"))
        return ("EVALSHA", COMMIT.sha, len(keys), *keys, *argv)


class StageLostError(BackendError):
    """The staged content of a big map was gone when its commit ran."""


def flatten(pairs: Iterable[tuple[str, bytes]]) -> list[str | bytes]:
    flat: list[str | bytes] = []
    for key, value in pairs:
        flat.append(key)
        flat.append(value)
    return flat


def pack(commands: Sequence[Command]) -> bytes:
    """RESP-encode ``commands`` (args: bytes, str or int) with our compiled
    packer (:mod:`._resp`): redis-py's generic one was the largest client
    cost of a commit, whose EVALSHA has ~35 arguments, and hiredis's took
    2.4 us of it."""
    return b"".join(map(pack_command, commands))


def commit_outcome(url: str, tx: EncodedTransaction, reply: Any) -> bool:
    """The commit script's reply: ``True`` (committed), ``False`` (``tx.txid``
    was committed before), or the error it stands for, raised."""
    if isinstance(reply, rexc.ResponseError):
        raise BackendError(f"Redis at {url}: commit of {tx.actor} failed: {reply}")
    status = reply[0]
    if status == b"ok":
        return True
    if status == b"dup":
        return False
    if status == b"lease":
        holder = reply[1].decode(errors="replace") if len(reply) > 1 else None
        raise LeaseLostError(tx.actor, tx.node_id, holder)
    if status == b"chain":
        raise chain_broken(tx, reply[1].decode(errors="replace") or None)
    if status == b"lineage":
        name, base, base_txid = tx.written(int(reply[1]) - 1)
        current = decode_version(name, reply[2])
        raise ConcurrentUpdateError(
            f"map {name!r} holds version {current} of commit "
            f"{reply[3].decode(errors='replace')!r}, the change set's base is of "
            f"{base_txid!r}", name=name, expected=base, current=current)
    if status == b"version":
        name, base, _ = tx.written(int(reply[1]) - 1)
        current = decode_version(name, reply[2])
        raise ConcurrentUpdateError(
            f"map {name!r} is at version {current}, the change set expects "
            f"{base}", name=name, expected=base, current=current)
    if status == b"missing":
        raise MapMissingError([tx.written(int(i) - 1)[0] for i in reply[1:]])
    if status == b"staged":
        raise StageLostError(f"Redis at {url}: commit {tx.txid} of {tx.actor}: a staged map "
                             "vanished before the commit (the server lost data?)")
    raise BackendError(f"Redis at {url}: unexpected commit reply {reply!r}")


#: What the read script returns for a map its reader holds as stored.
SAME = b"same"


def held_args(names: Sequence[str], known: Known | None) -> list[str | int]:
    """The read script's arguments saying which version and txid of each of
    ``names`` its reader holds (none: no argument at all)."""
    if not known:
        return []
    args: list[str | int] = []
    for name in names:
        version, txid = known.get(name, ("", ""))
        args += (version, txid or "")
    return args


def decode_all(names: Sequence[str], reply: Sequence[Any]) -> dict[str, ChangeSet | None]:
    """The dumps of an "all" reply of the read script (none for a map that
    came back the same)."""
    out: dict[str, ChangeSet | None] = {}
    for name, entry in zip(names, reply[1:], strict=True):
        if entry == SAME:
            continue
        txid, flat = entry
        out[name] = decode_flat(name, flat, decode_txid(name, txid)) if flat else None
    return out


def decode_txid(name: str, txid: bytes) -> str | None:
    """The lineage txid of map ``name`` as the read script returns it."""
    try:
        return txid.decode() if txid else None
    except UnicodeDecodeError:
        raise BackendError(f"map {name!r}: its lineage txid is undecodable") from None
