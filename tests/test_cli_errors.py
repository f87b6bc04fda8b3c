"""Every backend error reaches a CLI user as one line naming the cause and the
fix, never a traceback, and never after a long hang."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from caf_sharing.cli import main
from conftest import require_redis_server
from redisserver import RedisServer

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def locked() -> Iterator[RedisServer]:
    require_redis_server()
    with RedisServer(password="s3cret") as server:
        yield server


def one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[str, float]:
    started = time.monotonic()
    assert main(argv) == 2
    took = time.monotonic() - started
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err
    return captured.err, took


def test_a_database_index_out_of_range(redis_server: RedisServer,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    url = redis_server.url.rsplit("/", 1)[0] + "/99"
    err, _ = one_line(["ls", "--backend", url], capsys)
    assert "DB index is out of range" in err and "'databases' setting" in err


def test_tls_against_a_plaintext_server_fails_within_the_connect_time(
        redis_server: RedisServer, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"rediss://127.0.0.1:{redis_server.port}/0?ssl_cert_reqs=none"
    err, took = one_line(["ls", "--backend", url], capsys)
    assert "the server did not answer TLS" in err and "use redis://" in err
    assert took < 2.0  # one attempt of socket_timeout (1 s), no retries


@pytest.mark.parametrize(("userinfo", "words"), [
    (":wrong@", "invalid username-password pair"),
    ("", "Authentication required"),
])
def test_auth_failures_name_the_fix(locked: RedisServer, userinfo: str, words: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    url = f"redis://{userinfo}127.0.0.1:{locked.port}/0"
    err, _ = one_line(["ls", "--backend", url], capsys)
    assert words in err and "check the user name and password" in err
    assert "wrong" not in err.replace("wrong@", "")  # the password is never shown


def test_a_memory_url_with_one_slash(capsys: pytest.CaptureFixture[str]) -> None:
    err, _ = one_line(["inspect", "alice-admin-m", "--backend", "memory:/x"], capsys)
    assert "write memory://NAME, with two slashes" in err
