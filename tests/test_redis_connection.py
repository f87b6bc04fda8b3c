"""The Redis command and pub/sub connection (backends/redis/connection.py):
round trips in order, time-outs, callers that stop waiting, hostile replies,
push mode."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis import exceptions as rexc

from caf_sharing.backends.redis.codec import pack
from caf_sharing.backends.redis.connection import Connection, open_connection
from caf_sharing.backends.redis.options import Endpoint
from redisserver import RedisServer

pytestmark = pytest.mark.redis


def endpoint(port: int, *, password: str | None = None, db: int = 0) -> Endpoint:
    return Endpoint(address=("127.0.0.1", port), tls=None, server_hostname=None,
                    username=None, password=password, db=db)


@pytest.fixture
async def conn(redis_server: RedisServer) -> AsyncIterator[Connection]:
    connection = await open_connection(endpoint(redis_server.port), 5.0)
    yield connection
    connection.close()


async def test_replies_come_back_in_order_with_errors_as_replies(conn: Connection) -> None:
    replies = await conn.exchange(
        pack([("SET", "conn:k", "v"), ("GET", "conn:k"), ("LPUSH", "conn:k", "x"),
              ("EVALSHA", "0" * 40, 0)]), 4, 5.0)
    assert replies[:2] == [b"OK", b"v"]
    assert isinstance(replies[2], rexc.ResponseError) and "WRONGTYPE" in str(replies[2])
    assert isinstance(replies[3], rexc.NoScriptError)


async def test_a_caller_that_stops_waiting_leaves_the_connection_usable(
        conn: Connection) -> None:
    slow = asyncio.create_task(conn.exchange(pack([("BLPOP", "conn:empty", 0.3)]), 1, 5.0))
    await asyncio.sleep(0.05)
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow
    # The BLPOP's reply (nil) arrives first and is dropped: PING gets PONG.
    assert await conn.exchange(pack([("PING",)]), 1, 5.0) == [b"PONG"]
    assert not conn.closed


async def test_a_round_trip_past_its_timeout_fails_and_closes_the_connection(
        conn: Connection) -> None:
    with pytest.raises(rexc.TimeoutError, match=r"no reply within 0\.1s"):
        await conn.exchange(pack([("BLPOP", "conn:empty", 2)]), 1, 0.1)
    assert conn.closed and conn.lost.done()
    with pytest.raises(rexc.ConnectionError, match="closed"):
        await conn.exchange(pack([("PING",)]), 1, 5.0)


async def test_the_timer_of_an_earlier_round_trip_does_not_cut_a_later_one(
        conn: Connection) -> None:
    # The connection's one timer was armed for the first round trip's
    # deadline; when it fires it must watch the second, not fail it.
    assert await conn.exchange(pack([("PING",)]), 1, 0.2) == [b"PONG"]
    await asyncio.sleep(0.1)
    assert await conn.exchange(pack([("BLPOP", "conn:empty", 0.2)]), 1, 1.0) == [None]
    assert not conn.closed


async def test_a_server_that_goes_away_fails_what_waits(redis_server: RedisServer) -> None:
    victim = await open_connection(endpoint(redis_server.port), 5.0)
    killer = await open_connection(endpoint(redis_server.port), 5.0)
    try:
        [client_id] = await victim.exchange(pack([("CLIENT", "ID")]), 1, 5.0)
        waiting = asyncio.create_task(
            victim.exchange(pack([("BLPOP", "conn:empty", 5)]), 1, 10.0))
        await asyncio.sleep(0.05)
        await killer.exchange(pack([("CLIENT", "KILL", "ID", client_id)]), 1, 5.0)
        with pytest.raises(rexc.ConnectionError):
            await waiting
        assert victim.closed
    finally:
        victim.close()
        killer.close()


async def serve_once(reply: bytes) -> tuple[asyncio.Server, int]:
    """A peer that answers whatever it is sent with ``reply``."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.write(reply)
        await writer.drain()
        await asyncio.sleep(1)
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_a_malformed_reply_closes_the_connection_with_a_clear_error() -> None:
    server, port = await serve_once(b"?not RESP at all\r\n")
    try:
        conn = await open_connection(endpoint(port), 5.0)
        with pytest.raises(rexc.ConnectionError, match="malformed reply"):
            await conn.exchange(pack([("PING",)]), 1, 5.0)
        assert conn.closed
    finally:
        server.close()


async def test_a_refused_authentication_raises_the_redis_error(
        redis_server: RedisServer) -> None:
    with pytest.raises(rexc.AuthenticationError):
        await open_connection(endpoint(redis_server.port, password="wrong"), 5.0)


async def test_a_select_refused_raises_its_response_error(redis_server: RedisServer) -> None:
    with pytest.raises(rexc.ResponseError, match="DB index is out of range"):
        await open_connection(endpoint(redis_server.port, db=100_000), 5.0)


async def test_push_mode_hands_every_reply_on_and_survives_a_failing_handler(
        redis_server: RedisServer, conn: Connection,
        caplog: pytest.LogCaptureFixture) -> None:
    sub = await open_connection(endpoint(redis_server.port), 5.0)
    got: list[Any] = []

    def on_push(reply: Any) -> None:
        got.append(reply)
        if reply[0] == b"message" and reply[2] == b"boom":
            raise RuntimeError("handler bug")

    sub.on_push = on_push
    try:
        sub.send(pack([("SUBSCRIBE", "conn:chan")]))
        while not got:
            await asyncio.sleep(0.01)
        with caplog.at_level(logging.ERROR, logger="caf_sharing.backends.redis"):
            for payload in ("boom", "after"):
                await conn.exchange(pack([("PUBLISH", "conn:chan", payload)]), 1, 5.0)
            while len(got) < 3:
                await asyncio.sleep(0.01)
        assert got == [[b"subscribe", b"conn:chan", 1], [b"message", b"conn:chan", b"boom"],
                       [b"message", b"conn:chan", b"after"]]
        assert "handling a pushed reply failed" in caplog.text and not sub.closed
    finally:
        sub.close()
