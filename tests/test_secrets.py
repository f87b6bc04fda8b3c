"""No password in anything caf-sharing prints or shows to other users: the
CLI's stdout and stderr for every command (working and failing, against a real
redis-server started with ``--requirepass``), the command lines and
environments of the demo's ``--processes`` children, URL and config errors.

The password is distinctive and holds ``/``, ``#`` and ``?``; a leak is any of
its alphanumeric pieces, or its percent-encoded form, showing up.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from caf_sharing import Actor, Node
from caf_sharing.backends import parse_url, redact_url
from caf_sharing.cli import main
from caf_sharing.config import load_framework
from caf_sharing.errors import ConfigError
from conftest import require_redis_server
from redisserver import RedisServer, free_port

PASSWORD = "Zq7Kx/Vb9Wm#Tj4Lp?Rr8Nd"
ENCODED = quote(PASSWORD, safe="")
PIECES = [p for p in re.split(r"[^A-Za-z0-9]", PASSWORD) if p]
DATA = Path(__file__).parent / "data"


def leaks(text: str) -> list[str]:
    """The pieces of the password (or its encoded form) found in ``text``."""
    return [p for p in [*PIECES, ENCODED] if p in text]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "caf_sharing.cli", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    require_redis_server()
    with RedisServer(password=PASSWORD) as started:
        yield started


def good_url(server: RedisServer) -> str:
    return f"redis://:{ENCODED}@127.0.0.1:{server.port}/0"


def test_the_password_is_distinctive_and_the_check_can_fail() -> None:
    assert len(PIECES) == 4 and all(len(p) == 5 for p in PIECES)
    assert leaks(f"x {PIECES[2]} y") == [PIECES[2]] and leaks(ENCODED)
    assert not leaks("redis://:***@127.0.0.1:6379/0")


# -- URLs: every error path of parsing ---------------------------------------------

PORT = 6390
BAD_URLS = [
    # Unencoded '/', '#', '?' in the user info: an '@' follows the host part.
    f"redis://:{PASSWORD}@127.0.0.1:{PORT}/0",
    f"redis://ann:{PASSWORD}@127.0.0.1:{PORT}/0",
    f"rediss://:{PASSWORD}@h/0?ssl_cert_reqs=none",
    f"redis://:{PIECES[0]}/{PIECES[1]}@h/0?db={PIECES[2]}",
    f"memory://:{PASSWORD}@store",
    f"unix://:{PASSWORD}@/tmp/redis.sock",
    f"ftp://:{PASSWORD}@h",
    f"redis:{ENCODED}@h",
    # A password without '@' reads as a port.
    f"redis://:{PIECES[0]}",
    f"redis://h:{PIECES[0]}/0",
    # Encoded, but the URL is wrong elsewhere.
    f"redis://:{ENCODED}@[::1/0",
    f"redis://:{ENCODED}@h/notadb",
    f"redis://:{ENCODED}@h:99999/0",
    f"redis://u:{ENCODED}@h/0?password={ENCODED}",
    f"redis://:{ENCODED}@h/0#{PIECES[3]}",
    f"memory://:{ENCODED}@store",
    f"unix://:{ENCODED}@/tmp/redis.sock",
    # Query passwords of unix://, holding '#' or '&' unencoded, or encoded.
    f"unix:///tmp/redis.sock?password={PASSWORD}",
    f"unix:///tmp/redis.sock?password={PIECES[0]}&{PIECES[1]}&db=1",
    f"unix:///tmp/redis.sock?password={PIECES[0]}&{PIECES[1]}=x",
    f"unix:///tmp/redis.sock?db=1&password={PIECES[0]}#{PIECES[1]}",
    f"unix:///tmp/redis.sock?password={ENCODED}&db=x",
    f"unix:///tmp/redis.sock?password={ENCODED}&password={ENCODED}",
    f"unix:///tmp/redis.sock?password={ENCODED}&bogus=1",
]


@pytest.mark.parametrize("url", BAD_URLS)
def test_url_errors_never_show_the_password(url: str) -> None:
    assert leaks(url)  # the case holds the password somewhere
    assert not leaks(redact_url(url))
    with pytest.raises(ConfigError) as info:
        parse_url(url)
    assert not leaks(str(info.value)), str(info.value)


@pytest.mark.parametrize("url", [
    f"redis://:{PASSWORD}@127.0.0.1:{PORT}/0",
    f"redis://ann:{PIECES[0]}?{PIECES[1]}@h",
    f"redis://ann:{PIECES[0]}#{PIECES[1]}@h",
    f"rediss://:{PIECES[0]}/{PIECES[1]}@h/0?ssl_cert_reqs=none",
])
def test_unencoded_user_info_is_refused_with_the_remedy(url: str) -> None:
    with pytest.raises(ConfigError, match=r"an '@' follows the host part; percent-encode "
                                          r"'/', '\?', '#'.*\(%2F, %3F, %23") as info:
        parse_url(url)
    assert "***" in str(info.value)


def test_encoded_passwords_parse_exactly() -> None:
    parsed = parse_url(f"redis://ann:{ENCODED}@127.0.0.1:{PORT}/2")
    assert parsed.password == PASSWORD and parsed.username == "ann"
    assert str(parsed) == f"redis://ann:***@127.0.0.1:{PORT}/2"
    plus = parse_url(f"unix:///tmp/redis.sock?password=a+{ENCODED}&db=1")
    assert plus.password == f"a+{PASSWORD}" and plus.db == 1  # '+' is no space
    assert str(plus) == "unix:///tmp/redis.sock?password=***&db=1"


def test_unknown_options_after_a_query_password_are_not_quoted() -> None:
    with pytest.raises(ConfigError, match="unknown query option 'bogus'"):
        parse_url("unix:///s?bogus=1&password=x")  # before the password: named
    with pytest.raises(ConfigError, match=r"unknown query option follows the password "
                                          r"\(not shown") as info:
        parse_url(f"unix:///s?password=x&{PIECES[0]}=1")
    assert not leaks(str(info.value))


# -- the CLI -------------------------------------------------------------------------


def child_processes(parent: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == parent:
            found.append(int(stat.parent.name))
    return found


def run_recording_children(args: list[str], timeout: float = 120) -> tuple[
        subprocess.CompletedProcess[str], dict[int, set[tuple[str, str]]]]:
    """Run the CLI and read, while they run, the command lines and environments
    of its child processes (every distinct one: between fork and exec a child
    still shows its parent's)."""
    proc = subprocess.Popen([sys.executable, "-m", "caf_sharing.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict[int, set[tuple[str, str]]] = {}
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        for pid in child_processes(proc.pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            seen.setdefault(pid, set()).add(
                (cmdline.replace(b"\0", b" ").decode(errors="replace"),
                 environ.replace(b"\0", b" ").decode(errors="replace")))
        time.sleep(0.005)
    out, err = proc.communicate(timeout=30)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), seen


def reader_children(children: dict[int, set[tuple[str, str]]]) -> dict[int, list[tuple[str, str]]]:
    """What the demo's reader children showed once they were running as such."""
    found = {pid: [s for s in shown if "_demo-reader" in s[0]] for pid, shown in children.items()}
    return {pid: shown for pid, shown in found.items() if shown}


@pytest.mark.redis
def test_demo_on_a_password_server_shows_no_password(server: RedisServer) -> None:
    done, children = run_recording_children(
        ["demo", "--backend", good_url(server), "--processes", "2", "--readers", "4",
         "--commits", "60"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all guarantees held" in done.stdout
    assert f"backend          redis://:***@127.0.0.1:{server.port}/0" in done.stdout
    assert not leaks(done.stdout) and not leaks(done.stderr)
    readers = reader_children(children)
    assert len(readers) == 2, children
    for shown in readers.values():
        for cmdline, environ in shown:
            assert not leaks(cmdline) and "redis://" not in cmdline, cmdline
            assert not leaks(environ)


@pytest.mark.redis
@pytest.mark.parametrize("case", ["wrong password", "unreachable", "unencoded"])
def test_failing_demo_shows_no_password(server: RedisServer, case: str) -> None:
    url = {"wrong password": f"redis://:{ENCODED}x@127.0.0.1:{server.port}/0",
           "unreachable": f"redis://:{ENCODED}@127.0.0.1:{free_port()}/0",
           "unencoded": server.url}[case]
    done, children = run_recording_children(
        ["demo", "--backend", url, "--processes", "2", "--commits", "5", "--timeout", "20"])
    assert done.returncode == 2, done.stdout + done.stderr
    assert "caf-sharing demo: error:" in done.stderr and "Traceback" not in done.stderr
    assert not leaks(done.stdout) and not leaks(done.stderr), done.stderr
    for shown in reader_children(children).values():
        assert all(not leaks(cmdline) for cmdline, _ in shown)


class Owner(Actor):
    async def init(self) -> None:
        self.sharing.add_writable_map("m", "m", initial_value={"a": 1})

    async def put(self, key: str, value: int) -> None:
        self.sharing.maps.m.set(key, value)


@pytest.mark.redis
async def test_inspect_and_watch_show_no_password(server: RedisServer) -> None:
    url = good_url(server)
    async with Node(url, app="secrets") as node:
        owner = await node.start(Owner, "carol-owner")
        watch = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "caf_sharing.cli", "watch", "carol-owner-m", "--backend", url,
            "--app", "secrets", "--count", "1", "--timeout", "30",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert watch.stdout is not None
        first = await asyncio.wait_for(watch.stdout.readline(), 30)
        assert json.loads(first) == {"name": "carol-owner-m", "version": 1}
        await owner.call("put", "b", 2)
        out, err = await asyncio.wait_for(watch.communicate(), 30)
        assert watch.returncode == 0, err
        assert not leaks(first.decode() + out.decode() + err.decode())
    done = await asyncio.to_thread(cli, "inspect", "carol-owner-m", "--backend", url,
                                   "--app", "secrets")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["contents"] == {"a": 1, "b": 2}
    assert not leaks(done.stdout + done.stderr)
    # The URL can stay off the command line altogether: CAF_SHARING_URL.
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "caf_sharing.cli", "inspect", "carol-owner-m",
                         "--app", "secrets"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "CAF_SHARING_URL": url})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["contents"] == {"a": 1, "b": 2}
    assert not leaks(done.stdout + done.stderr)


@pytest.mark.redis
@pytest.mark.parametrize("command", ["inspect", "watch"])
def test_failing_inspect_and_watch_show_no_password(server: RedisServer,
                                                    command: str) -> None:
    for url in (server.url,  # unencoded: refused
                f"redis://:{ENCODED}x@127.0.0.1:{server.port}/0",  # wrong password
                f"redis://:{ENCODED}@127.0.0.1:{server.port}/0"):  # no such map
        more = ["--timeout", "5"] if command == "watch" else []
        done = cli(command, "alice-admin-none", "--backend", url, *more)
        assert done.returncode == 2, done.stdout + done.stderr
        # watch says first that it waits for the map; then one error line.
        *notice, error = done.stderr.splitlines()
        assert error.startswith(f"caf-sharing {command}: error:")
        assert len(notice) == (command == "watch" and "waited" in error)
        assert not leaks(done.stdout + done.stderr), done.stderr


@pytest.mark.parametrize("url", BAD_URLS)
def test_every_command_refuses_bad_urls_quietly(url: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["demo", "--backend", url], ["inspect", "a-b-c", "--backend", url],
                 ["watch", "a-b-c", "--backend", url, "--timeout", "1"]):
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert "error: invalid backend URL" in captured.err
        assert not leaks(captured.out + captured.err), captured.err


# -- configuration ------------------------------------------------------------------


def framework() -> list[dict[str, Any]]:
    comps: list[dict[str, Any]] = json.loads(
        "[" + (DATA / "seed-framework.json").read_text() + "]")
    comps[1]["env"]["redis"]["password"] = PASSWORD
    return comps


def set_redis(key: str, value: Any) -> Callable[[list[dict[str, Any]]], None]:
    return lambda comps: comps[1]["env"]["redis"].update({key: value})


@pytest.mark.parametrize("mutate", [
    lambda c: c.append({"module": "caf_redis#plug", "env": copy.deepcopy(c[1]["env"])}),
    lambda c: c.append({"name": 7, "env": copy.deepcopy(c[1]["env"])}),
    lambda c: c.append({"name": None, "password": PASSWORD}),
    lambda c: c.append(PASSWORD),
    lambda c: c.append([PASSWORD]),
    lambda c: c[1].update(module={"password": PASSWORD}),
    set_redis("password", [PASSWORD]),
    set_redis("password", {"value": PASSWORD}),
    set_redis("port", PASSWORD),
    set_redis("host", [PASSWORD]),
    lambda c: c[1]["env"].update(nodeId=[PASSWORD]),
    lambda c: c[1]["env"]["coalescing"].update(interval=PASSWORD),
    lambda c: c[1]["env"].update(coalescing=PASSWORD),
    lambda c: c[1]["env"].update(redis=PASSWORD),
    lambda c: c[2]["env"].update(persistService=[PASSWORD]),
    # Names host:port, not the password.
    lambda c: c[1]["env"]["redis"].update(port=6380) or c[2]["env"].update(persistService="cp"),
])
def test_config_errors_name_the_field_never_the_password(mutate: Any) -> None:
    comps = framework()
    comps[2]["env"]["persistService"] = "cp2"
    mutate(comps)
    with pytest.raises(ConfigError) as info:
        load_framework(comps)
    assert not leaks(str(info.value)), str(info.value)


def test_a_component_without_a_name_is_named_by_position() -> None:
    comps = framework()
    comps.append({"module": "caf_redis#plug", "env": copy.deepcopy(comps[1]["env"])})
    with pytest.raises(ConfigError, match=r"needs a string 'name'; component #3 "
                                          r"\(module 'caf_redis#plug'\) has none"):
        load_framework(comps)
    comps[3] = PASSWORD
    with pytest.raises(ConfigError, match="component #3 must be an object, got a str"):
        load_framework(comps)


def test_config_text_that_is_not_json_is_not_echoed() -> None:
    for text in (f'"password": "{PASSWORD}"\n', f'{{"password": "{PASSWORD}" ',
                 f'[{{"name": "cp", "env": {{"redis": {{"password": "{PASSWORD}"}}}}]'):
        with pytest.raises(ConfigError) as info:
            load_framework(text)
        assert not leaks(str(info.value)), str(info.value)


def test_process_env_passwords_stay_text(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAF_TEST_PASSWORD", "0123456789")
    monkeypatch.setenv("CAF_TEST_NODE", "42")
    comps = framework()
    comps[1]["env"]["redis"]["password"] = "process.env.CAF_TEST_PASSWORD"
    comps[1]["env"]["nodeId"] = "process.env.CAF_TEST_NODE"
    comps[2]["env"]["persistService"] = "cp2"
    config = load_framework(comps)
    assert config.options["password"] == "0123456789" and config.node_id == "42"
    assert "0123456789" not in repr(config)
    # Through the parent env too, and from a default; "null" means no password.
    desc = {"env": {"pw": "process.env.CAF_TEST_PASSWORD"}, "components": comps}
    comps[1]["env"]["redis"]["password"] = "$._.env.pw"
    assert load_framework(desc).options["password"] == "0123456789"
    comps[1]["env"]["redis"]["password"] = "process.env.CAF_TEST_UNSET_PW||4242"
    assert load_framework(comps).options["password"] == "4242"
    comps[1]["env"]["redis"]["password"] = "process.env.CAF_TEST_UNSET_PW||null"
    assert "password" not in load_framework(comps).options
    # Numbers elsewhere are still numbers.
    monkeypatch.setenv("CAF_TEST_PORT", "6380")
    comps[1]["env"]["redis"]["port"] = "process.env.CAF_TEST_PORT"
    comps[0] = copy.deepcopy(comps[1]) | {"name": "cp"}
    assert load_framework(comps).url == "redis://localhost:6380/0"


@pytest.mark.redis
async def test_a_numeric_process_env_password_connects(
        monkeypatch: pytest.MonkeyPatch) -> None:
    require_redis_server()
    digits = "8675309000"
    with RedisServer(password=digits) as numeric:
        monkeypatch.setenv("CAF_TEST_PASSWORD", digits)
        monkeypatch.setenv("CAF_TEST_PORT", str(numeric.port))
        comps = framework()
        for comp in comps[:2]:
            comp["module"] = "caf_redis#plug"
            comp["env"] = copy.deepcopy(comps[1]["env"])
            comp["env"]["redis"].update(host="127.0.0.1", port="process.env.CAF_TEST_PORT",
                                        password="process.env.CAF_TEST_PASSWORD")
        config = load_framework(comps)
        async with config.node(app="numeric") as node:
            await node.start(Owner, "dave-owner")
        with numeric.client() as client:
            assert client.keys("caf:numeric:*")
