"""The processes of a history run: one writer node or one reader node.

``python history_worker.py writer|reader URL APP LOG --proc NAME ...`` runs a
:class:`~caf_sharing.Node` on ``URL`` and logs, as JSON lines in ``LOG``, every
message its actors process (the records :mod:`history` judges):

* ``writer``: actor ``w-writer`` commits, per message, one counter and one
  token into maps ``m`` and ``m2``, ``self.state`` and map ``log`` (counter ->
  token, so the final store shows which commits it holds); every
  ``PAD_EVERY``-th message also a value of ``PAD`` bytes into ``m`` and
  ``m2``, so that its change sets reach readers in pieces; a read-only
  ``peek`` after each acknowledged commit records the maps it left. It exits
  with status 3 when its node loses the actor (another incarnation took over).
* ``reader``: ``--actors`` actors ``<proc>-a``, ``<proc>-b``... read ``m`` and
  ``m2`` before and after an ``await``, and checkpoint a count, so each
  message commits too. A reader that loses its actor starts it again on the
  same node; SIGUSR1 makes it stop and restart ``<proc>-a``.

SIGTERM finishes the current messages, closes the node and exits 0. Each
record is one ``write`` of one line, so a SIGKILL never leaves half a record.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from typing import Any

import orjson

from caf_sharing import Actor, ActorHandle, MapRef, Node
from caf_sharing.errors import ActorStoppedError, LeaseHeldError, LeaseLostError, SharingError
from history import digest

__all__ = ["WRITER", "FinalReader", "HistoryReader", "HistoryWriter", "map_view",
           "reader_name"]

WRITER = "w-writer"
#: How many recent tokens each map keeps (keys c0..c7): a replica that
#: applied a change set on the wrong base differs in content for that long.
WINDOW = 8
#: Exit status of a writer whose node lost the actor.
LOST = 3
#: Every PAD_EVERY-th commit writes PAD bytes into each of m and m2: more
#: than Redis writes to a client at once (64 KB), so a reader is handed the
#: commit in pieces, and runs other work between them.
PAD_EVERY = 4
PAD = 96 * 1024
#: Backend options of every node of a run: fail fast, so faults show up as
#: failed messages within a run rather than as minutes of retries.
NODE_OPTIONS: dict[str, Any] = {"max_retries": 3, "retry_delay": 0.05, "socket_timeout": 2.0}


def reader_name(proc: str, index: int) -> str:
    """The name of reader actor ``index`` (from 0) of process ``proc``."""
    return f"{proc}-{chr(ord('a') + index)}"


def map_view(ref: MapRef) -> dict[str, Any]:
    """What an observer records of a map snapshot."""
    return {"v": ref.version, "d": digest(ref.to_dict()), "n": ref.get("n"),
            "tok": ref.get("tok")}


class HistoryWriter(Actor):
    async def init(self) -> None:
        for alias in ("m", "m2"):
            self.sharing.add_writable_map(alias, alias, initial_value={"n": 0})
        self.sharing.add_writable_map("log", "log", initial_value={})
        self.state["n"] = 0

    async def bump(self) -> dict[str, Any]:
        m, m2, log = (self.sharing.maps[alias] for alias in ("m", "m2", "log"))
        begin = {"state_n": self.state.get("n"), "m_n": m.get("n"), "m2_n": m2.get("n")}
        n = self.state["n"] + 1
        tok = uuid.uuid4().hex[:12]
        for ref in (m, m2):
            ref.set("n", n).set("tok", tok).set(f"c{n % WINDOW}", tok)
            if n % PAD_EVERY == 0:
                ref.set("pad", tok * (PAD // len(tok)))
        log.set(str(n), tok)
        self.state["n"] = n
        return {"n": n, "tok": tok, "begin": begin}

    async def peek(self) -> dict[str, Any]:
        """The maps as the last commit left them (this message writes nothing,
        so it commits nothing): their versions come from the runtime, not
        from a rule the checker would take on trust."""
        return {alias: map_view(self.sharing.maps[alias]) for alias in ("m", "m2")}


class HistoryReader(Actor):
    async def init(self) -> None:
        for alias in ("m", "m2"):
            self.sharing.add_read_only_map(alias, f"{WRITER}-{alias}")
        self.state["seen"] = 0

    def _views(self) -> dict[str, Any]:
        return {alias: map_view(self.sharing.maps[alias]) for alias in ("m", "m2")}

    async def observe(self) -> dict[str, Any]:
        tb = time.time()
        before = self._views()
        await asyncio.sleep(0.001)  # other messages and replica updates run here
        after = self._views()
        self.state["seen"] = self.state.get("seen", 0) + 1
        return {"tb": tb, "before": before, "after": after}


class FinalReader(Actor):
    """Reads the store's final state: both maps and the commit log."""

    async def init(self) -> None:
        for alias in ("m", "m2", "log"):
            self.sharing.add_read_only_map(alias, f"{WRITER}-{alias}")

    async def read(self) -> dict[str, Any]:
        return {"maps": {alias: map_view(self.sharing.maps[alias]) for alias in ("m", "m2")},
                "log": self.sharing.maps.log.to_dict()}


class _Log:
    def __init__(self, path: str, proc: str) -> None:
        self.proc = proc
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, kind: str, **fields: Any) -> None:
        os.write(self._fd, orjson.dumps({"kind": kind, "proc": self.proc, **fields}) + b"\n")

    def error(self, actor: str, seq: int, exc: BaseException, during: str) -> None:
        self.write("error", actor=actor, seq=seq, t=time.time(), during=during,
                   error=type(exc).__name__, message=str(exc)[:300])


class _Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.log = _Log(args.log, args.proc)
        self.stop = asyncio.Event()
        self.restart = asyncio.Event()
        self.seq: dict[str, int] = {}

    def next_seq(self, actor: str) -> int:
        self.seq[actor] = self.seq.get(actor, 0) + 1
        return self.seq[actor]

    async def start(self, node: Node, cls: type[Actor], name: str) -> ActorHandle | None:
        """Start ``name`` on ``node``, waiting out other holders; None once stopping."""
        while not self.stop.is_set():
            try:
                return await node.start(cls, name)
            except LeaseHeldError:
                pass  # the previous holder's lease has not expired yet
            except Exception as exc:
                self.log.error(name, self.next_seq(name), exc, "start")
            await asyncio.sleep(0.1)
        return None

    async def writer(self, node: Node) -> int:
        handle = await self.start(node, HistoryWriter, WRITER)
        while handle is not None and not self.stop.is_set():
            seq = self.next_seq(WRITER)
            t0 = time.time()
            try:
                reply = await handle.call("bump")
            except (LeaseLostError, ActorStoppedError) as exc:
                self.log.error(WRITER, seq, exc, "message")
                return LOST
            except Exception as exc:
                self.log.error(WRITER, seq, exc, "message")
                await asyncio.sleep(0.05)
                continue
            t1 = time.time()
            try:
                maps = await handle.call("peek")
            except SharingError:
                maps = {}  # the actor is gone: the commit stands, the next bump tells why
            self.log.write("commit", actor=WRITER, seq=seq, t0=t0, t1=t1, maps=maps, **reply)
            await asyncio.sleep(self.args.pause)
        return 0

    async def reader(self, node: Node, name: str, *, restartable: bool) -> None:
        handle = await self.start(node, HistoryReader, name)
        while handle is not None and not self.stop.is_set():
            if restartable and self.restart.is_set():
                self.restart.clear()
                with contextlib.suppress(SharingError):  # it may have just lost the actor
                    await node.stop(name)
                handle = await self.start(node, HistoryReader, name)
                self.log.write("restart", actor=name, t=time.time())
                continue
            seq = self.next_seq(name)
            tc = time.time()
            try:
                reply = await handle.call("observe")
            except (LeaseLostError, ActorStoppedError) as exc:
                self.log.error(name, seq, exc, "message")
                handle = await self.start(node, HistoryReader, name)
                continue
            except Exception as exc:
                self.log.error(name, seq, exc, "message")
                await asyncio.sleep(0.05)
                continue
            self.log.write("observe", actor=name, seq=seq, tc=tc, te=time.time(), **reply)
            await asyncio.sleep(self.args.pause)

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop.set)
        loop.add_signal_handler(signal.SIGUSR1, self.restart.set)
        args = self.args
        async with Node(args.url, app=args.app, node_id=args.proc, lease_ttl=args.lease_ttl,
                        **NODE_OPTIONS) as node:
            if args.role == "writer":
                return await self.writer(node)
            await asyncio.gather(*(self.reader(node, reader_name(args.proc, i),
                                               restartable=i == 0)
                                   for i in range(args.actors)))
            return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["writer", "reader"])
    parser.add_argument("url")
    parser.add_argument("app")
    parser.add_argument("log", help="JSON-lines file the records are appended to")
    parser.add_argument("--proc", required=True,
                        help="process name: node id, record 'proc', reader actor owner")
    parser.add_argument("--lease-ttl", type=float, default=1.0)
    parser.add_argument("--pause", type=float, default=0.01,
                        help="seconds between two messages of one actor")
    parser.add_argument("--actors", type=int, choices=range(1, 27), default=1,
                        help="reader actors on the node")
    return asyncio.run(_Worker(parser.parse_args(argv)).main())


if __name__ == "__main__":
    sys.exit(main())
