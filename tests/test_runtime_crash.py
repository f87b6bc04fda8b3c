"""A node process killed with SIGKILL mid-stream loses no acknowledged commit."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap

import pytest

from caf_sharing import Actor, Node
from caf_sharing.errors import LeaseHeldError
from caf_sharing.lineage import ADOPT_MARGIN

pytestmark = pytest.mark.redis

CHILD = textwrap.dedent("""
    import asyncio, sys
    from caf_sharing import Actor, Node

    class Counter(Actor):
        async def init(self):
            self.sharing.add_writable_map("m", "m", initial_value={"n": 0})
            self.state["n"] = 0

        async def bump(self):
            ref = self.sharing.maps.m
            n = ref.get("n") + 1
            ref.set("n", n).set(f"k{n}", n)
            self.state["n"] = n
            return n

    async def main(url, app):
        async with Node(url, app=app, node_id="victim", lease_ttl=1.0) as node:
            actor = await node.start(Counter, "dora-counter")
            while True:
                n = await actor.call("bump")
                print(n, flush=True)

    asyncio.run(main(sys.argv[1], sys.argv[2]))
""")


class Counter(Actor):
    async def read(self) -> tuple[int, int, int, bool]:
        ref = self.sharing.maps.m
        n = ref.get("n")
        return ref.version, n, self.state["n"], all(f"k{i}" in ref for i in range(1, n + 1))


async def test_sigkill_mid_stream(redis_server, tmp_path) -> None:
    script = tmp_path / "victim.py"
    script.write_text(CHILD)
    app = "crash"
    child = await asyncio.create_subprocess_exec(
        sys.executable, str(script), redis_server.url, app,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert child.stdout is not None
    acked = 0
    try:
        async with asyncio.timeout(60):
            while acked < 150:
                line = await child.stdout.readline()
                assert line, (await child.stderr.read()).decode()  # type: ignore[union-attr]
                acked = int(line)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        await child.wait()
    async with Node(redis_server.url, app=app, node_id="rescuer", lease_ttl=5) as node:
        async with asyncio.timeout(10):
            while True:  # the victim's lease has to expire first
                try:
                    handle = await node.start(Counter, "dora-counter")
                    break
                except LeaseHeldError:
                    await asyncio.sleep(0.2)
        version, in_map, in_state, complete = await handle.call("read")
    assert in_map >= acked, "an acknowledged commit was lost"
    assert in_map == in_state, "map and checkpoint come from different transactions"
    assert complete, "a partial transaction is visible"
    # Version 1 is the initial value, then one per bump; the rescuer adopted
    # the map and renumbered it above every version the victim could have made.
    assert version >= in_map + 1 + ADOPT_MARGIN
