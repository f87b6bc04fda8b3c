"""The caf-sharing command, the demo and the examples, run for real."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import caf_sharing
from caf_sharing import Actor, Node
from caf_sharing.cli import main
from caf_sharing.demo import DemoResult, ReaderReport, run_demo

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("caf-sharing")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "caf_sharing.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "error::RuntimeWarning"})


def test_demo_on_the_embedded_default() -> None:
    done = cli("demo", "--commits", "40", "--readers", "3")
    assert done.returncode == 0, done.stderr
    assert "all guarantees held" in done.stdout
    assert "commits          40" in done.stdout
    assert "p50" in done.stdout and "p99" in done.stdout
    assert "Traceback" not in done.stderr


def test_help_everywhere() -> None:
    for args in (["--help"], ["demo", "--help"], ["inspect", "--help"], ["watch", "--help"]):
        done = cli(*args)
        assert done.returncode == 0 and "usage: caf-sharing" in done.stdout


def test_version(capsys) -> None:
    # A PEP 440 public version: what the sdist and wheel file names carry.
    assert re.fullmatch(r"\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?",
                        caf_sharing.__version__)
    done = cli("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"caf-sharing {caf_sharing.__version__}\n"
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"caf-sharing {caf_sharing.__version__}\n"


def test_errors_are_one_line(capsys) -> None:
    assert main(["inspect", "alice-admin-nothing", "--backend", "memory://empty"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("caf-sharing inspect: error: map 'alice-admin-nothing' does not "
                           "exist; no app holds a map of that name")
    assert main(["inspect", "x-y-z", "--backend", "ftp://nowhere"]) == 2
    assert "error:" in capsys.readouterr().err
    done = cli("demo", "--processes", "2")
    assert done.returncode == 2 and "needs a backend" in done.stderr
    assert "Traceback" not in done.stderr


def test_demo_checker_catches_violations() -> None:
    result = DemoResult("memory://", 3, 1.0, {1: 0.0, 2: 0.0, 3: 0.0}, {1: 1, 2: 2, 3: 3}, [
        ReaderReport("r1", [(1, 1, 0.1), (3, 3, 0.2), (2, 2, 0.3), (3, 3, 0.4)]),
        ReaderReport("r2", [(1, 1, 0.1), (2, 7, 0.2), (3, 3, 0.3)]),
        ReaderReport("r3", [(1, 1, 0.1)], isolation_violations=2),
    ])
    result.check()
    assert not result.ok
    text = " | ".join(result.problems)
    assert "r1: saw version 2 after 3" in text
    assert "r2: version 2 has counter 7" in text
    assert "r3: 2 messages saw their snapshot change" in text
    assert "r3: ended on version 1, not 3" in text
    assert "VIOLATIONS" in result.table()


async def test_run_demo_in_process() -> None:
    result = await run_demo(readers=2, commits=25)
    assert result.ok, result.problems
    assert len(result.latencies()) >= 2


def load_example(name: str):
    path = ROOT / "examples" / name / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_example_helloworld(capsys) -> None:
    module = load_example("helloworld")
    assert await module.main("memory://ex-helloworld") == [5, 5, 5]
    assert "cannot write" in capsys.readouterr().out


async def test_example_helloworld_resumes_where_the_last_run_left(redis_server) -> None:
    # A second run resumes the counter at 5 from the checkpoint and must not
    # wait for readers to see 5 again.
    module = load_example("helloworld")
    app = f"ex{uuid.uuid4().hex[:8]}"
    assert await module.main("memory://ex-helloworld-twice") == [5, 5, 5]
    assert await module.main("memory://ex-helloworld-twice") == [10, 10, 10]
    # restart_grace off: a young test server would delay the first leases.
    assert await module.main(redis_server.url, app, restart_grace=False) == [5, 5, 5]
    assert await module.main(redis_server.url, app, restart_grace=False) == [10, 10, 10]


async def test_example_helloadaptive() -> None:
    module = load_example("helloadaptive")
    assert await module.main("memory://ex-helloadaptive") == ["abc13", "abc21"]


@pytest.mark.parametrize("name", ["helloworld", "helloadaptive"])
def test_examples_run_as_scripts(name: str) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / name / f"{name}.py")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


async def test_inspect_and_watch_on_redis(redis_server, capsys) -> None:
    class Owner(Actor):
        async def init(self) -> None:
            self.sharing.add_writable_map("m", "m", initial_value={"a": 1})

        async def put(self, key: str, value: int) -> None:
            self.sharing.maps.m.set(key, value)

    url = redis_server.url
    async with Node(url, app="clitest") as node:
        owner = await node.start(Owner, "carol-owner")
        watch = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "caf_sharing.cli", "watch", "carol-owner-m", "--backend", url,
            "--app", "clitest", "--count", "2", "--timeout", "30",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert watch.stdout is not None
        first = json.loads(await asyncio.wait_for(watch.stdout.readline(), 30))
        assert first == {"name": "carol-owner-m", "version": 1}
        await owner.call("put", "b", 2)
        await owner.call("put", "c", 3)
        out, err = await asyncio.wait_for(watch.communicate(), 30)
        assert watch.returncode == 0, err
        lines = [json.loads(line) for line in out.decode().splitlines()]
        assert [c["version"] for c in lines] == [1, 2]
        assert lines[0]["add"] == ["b", 2, "__ca_version__", 2]
    assert await asyncio.to_thread(
        main, ["inspect", "carol-owner-m", "--backend", url, "--app", "clitest"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == {"name": "carol-owner-m", "version": 3,
                     "contents": {"a": 1, "b": 2, "c": 3}}


def test_unreachable_redis_is_one_line(capsys) -> None:
    from redisserver import free_port

    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    assert main(["inspect", "alice-admin-m", "--backend", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unavailable" in err
    assert "hunter2" not in err  # secrets never printed


def test_demo_across_processes_on_redis(redis_server) -> None:
    done = cli("demo", "--backend", redis_server.url, "--processes", "2", "--readers", "4",
               "--commits", "60")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all guarantees held" in done.stdout
    assert done.stdout.count("yes        yes") == 4
