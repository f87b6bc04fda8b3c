"""A TCP relay for fault tests: clients keep one address while the tests
break, silence or move what is behind it.

The relay listens on a free loopback port and forwards each connection to
``127.0.0.1:<target port>``, in a thread of its own (its own event loop), so
it keeps working whatever the test's loop is doing. Its mode applies to every
connection, open or new:

* ``forward()`` — bytes flow both ways (the default);
* ``blackhole()`` — connections are accepted, what clients send is read and
  thrown away, nothing reaches the server and nothing comes back: a server
  behind a dead link, as seen by a client (connections accepted meanwhile
  stay silent for good);
* ``drop_replies()`` — requests reach the server, its replies are thrown
  away: a commit lands but its reply is lost.

``trickle(chunk, pause)`` slows what comes back, in any mode that lets it
through: ``chunk`` bytes at a time, ``pause`` seconds apart (a slow link,
on which a server's reply or push arrives in pieces); ``trickle(None)``
ends it.

``cut()`` resets every open connection; ``switch(port)`` makes new
connections go to another server and cuts the open ones (a failover behind a
stable address). A connection the target refuses is closed at once, as a
refused connection would be.

    with Relay(server.port) as relay:
        relay.url              # redis://127.0.0.1:<relay port>/0
        relay.blackhole()
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

__all__ = ["Relay"]

Mode = Literal["forward", "blackhole", "drop_replies"]
T = TypeVar("T")
_CHUNK = 65536


class Relay:
    def __init__(self, target_port: int, *, host: str = "127.0.0.1") -> None:
        self.host = host
        self.target_port = target_port
        self.mode: Mode = "forward"
        #: (chunk, pause) of what comes back, or None: all at once.
        self.slow: tuple[int, float] | None = None
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test relay",
                                        daemon=True)
        self._server: asyncio.Server | None = None
        #: Both ends of every open connection (client, server or None).
        self._open: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter | None]] = set()

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def _run(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        return asyncio.run_coroutine_threadsafe(make(), self._loop).result(timeout=10)

    def start(self) -> None:
        self._thread.start()

        async def listen() -> int:
            self._server = await asyncio.start_server(self._accept, self.host, 0,
                                                      family=socket.AF_INET)
            port: int = self._server.sockets[0].getsockname()[1]
            return port

        self.port = self._run(listen)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            self._reset_all()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        self._run(shutdown)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> Relay:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- faults ----------------------------------------------------------------

    def _set_mode(self, mode: Mode) -> None:
        async def change() -> None:
            self.mode = mode

        self._run(change)

    def forward(self) -> None:
        self._set_mode("forward")

    def blackhole(self) -> None:
        self._set_mode("blackhole")

    def drop_replies(self) -> None:
        self._set_mode("drop_replies")

    def trickle(self, chunk: int | None, pause: float = 0.0) -> None:
        async def change() -> None:
            self.slow = None if chunk is None else (chunk, pause)

        self._run(change)

    def cut(self) -> None:
        """Reset every open connection (new ones are accepted as usual)."""
        async def reset() -> None:
            self._reset_all()

        self._run(reset)

    def switch(self, target_port: int) -> None:
        """Send new connections to ``target_port`` and cut the open ones."""
        async def move() -> None:
            self.target_port = target_port
            self._reset_all()

        self._run(move)

    @property
    def connections(self) -> int:
        """How many client connections are open through the relay."""
        async def count() -> int:
            return len(self._open)

        return self._run(count)

    # -- the relay's loop ----------------------------------------------------------

    def _reset_all(self) -> None:
        for client, server in list(self._open):
            client.transport.abort()
            if server is not None:
                server.transport.abort()
        self._open.clear()

    async def _accept(self, client_r: asyncio.StreamReader,
                      client_w: asyncio.StreamWriter) -> None:
        server_r: asyncio.StreamReader | None = None
        server_w: asyncio.StreamWriter | None = None
        if self.mode != "blackhole":
            try:
                server_r, server_w = await asyncio.open_connection(self.host, self.target_port)
            except OSError:
                client_w.transport.abort()
                return
        pair = (client_w, server_w)
        self._open.add(pair)
        pumps = [asyncio.create_task(self._pump(client_r, server_w, upstream=True))]
        if server_r is not None:
            pumps.append(asyncio.create_task(self._pump(server_r, client_w, upstream=False)))
        try:
            # Either side closing ends the connection.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._open.discard(pair)
            client_w.transport.abort()
            if server_w is not None:
                server_w.transport.abort()

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter | None,
                    *, upstream: bool) -> None:
        """Copy ``source`` to ``sink`` while the mode lets this direction
        through, until ``source`` closes or fails."""
        try:
            while data := await source.read(_CHUNK):
                passes = self.mode == "forward" or (upstream and self.mode == "drop_replies")
                if not passes or sink is None:
                    continue
                slow = None if upstream else self.slow
                if slow is None:
                    sink.write(data)
                    await sink.drain()
                    continue
                chunk, pause = slow
                for at in range(0, len(data), chunk):
                    sink.write(data[at:at + chunk])
                    await sink.drain()
                    await asyncio.sleep(pause)
        except OSError:
            pass
