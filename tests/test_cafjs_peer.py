"""The wire stays Caf.js-compatible with lineage: change sets and dumps made
here, ``txid``/``base_txid`` included, apply unchanged in the published Caf.js
SharedMap (npm ``caf_sharing``), and Caf.js change sets apply here.

The suite installs the npm package in a temporary directory; without node and
npm the tests are skipped (and fail under CI, which must run them).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from caf_sharing import SharedMap
from caf_sharing.backends import MemoryBackend, MemoryStore
from caf_sharing.service import SharingService

CAFJS_VERSION = "0.4.3"

# Reads a JSON list of change sets on stdin, applies them in order to one
# Caf.js SharedMap, prints its dump.
APPLY = """
const SM = require('caf_sharing/lib/SharedMap.js');
let input = '';
process.stdin.on('data', (d) => { input += d; });
process.stdin.on('end', () => {
  const m = new SM.SharedMap(null, false, 100);
  for (const changes of JSON.parse(input)) { m.applyChanges(changes); }
  process.stdout.write(JSON.stringify(m.ref().dump()));
});
"""

# Makes a few change sets with the Caf.js SharedMap and prints them.
MAKE = """
const SM = require('caf_sharing/lib/SharedMap.js');
const m = new SM.SharedMap(null, false, 100);
const out = [];
for (let i = 1; i <= 3; i++) {
  const ref = m.ref();
  ref.set('k' + i, {n: i, l: [i, 'x']});
  if (i === 3) { ref.delete('k1'); }
  out.push(ref.prepare());
  m.commit(ref);
}
process.stdout.write(JSON.stringify(out));
"""


@pytest.fixture(scope="module")
def cafjs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        reason = "node and npm are needed to run the Caf.js peer"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI must run these tests")
        pytest.skip(reason)
    where = tmp_path_factory.mktemp("cafjs")
    done = subprocess.run([npm, "install", "--silent", "--no-audit", "--no-fund",
                           f"caf_sharing@{CAFJS_VERSION}"], cwd=where, capture_output=True,
                          text=True, timeout=300)
    if done.returncode != 0:
        pytest.fail(f"npm install caf_sharing failed: {done.stderr[-2000:]}")
    return where


def run_node(where: Path, script: str, stdin: str = "") -> Any:
    done = subprocess.run(["node", "-e", script], cwd=where, input=stdin, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def as_dict(dump: dict[str, Any]) -> dict[str, Any]:
    add = dump["add"]
    return dict(zip(add[::2], add[1::2], strict=True))


async def test_our_change_sets_with_lineage_apply_in_cafjs(cafjs: Path) -> None:
    store = f"peer-{uuid.uuid4().hex[:8]}"
    backend = MemoryBackend(store)
    await backend.start()
    service = SharingService(backend)
    sent: list[bytes] = []
    try:
        await backend.acquire_lease("ann-writer", "n", 30)
        name = "ann-writer-m"
        await backend.create_map(name)
        await backend.subscribe(name, sent.append)
        primary = await service.primary(name)
        start = dict(primary.ref(read_only=True).dump())  # adopted: renumbered
        prev = None
        for i in range(1, 5):
            ref = primary.ref()
            ref.set(f"k{i}", {"n": i, "f": 1.5, "s": "é"})
            if i == 3:
                ref.delete("k1")
            ref.prepare()
            txid = uuid.uuid4().hex
            await service.commit(actor="ann-writer", node_id="n", txid=txid, prev_txid=prev,
                                 checkpoint={"txid": txid, "state": {}}, lease_ttl=30,
                                 refs={name: ref})
            prev = txid
        await asyncio.sleep(0)
        changes = [orjson.loads(raw) for raw in sent]
        assert all("txid" in c and "base_txid" in c and "ts" in c for c in changes)
        dump = await backend.read_map(name)
        assert dump is not None and dump["txid"] == prev
    finally:
        await service.close()
        await backend.close()
        MemoryStore.drop(store)
    ours = as_dict(dump)
    # Incremental change sets from the writer's first version on, then the dump alone.
    assert as_dict(run_node(cafjs, APPLY, json.dumps([start, *changes]))) == ours
    assert as_dict(run_node(cafjs, APPLY, json.dumps([dump]))) == ours


def test_cafjs_change_sets_apply_here(cafjs: Path) -> None:
    made = run_node(cafjs, MAKE)
    ours = SharedMap()
    ours.apply_changes(made)
    assert ours.version == 3
    assert ours.ref().to_dict() == {"k2": {"n": 2, "l": [2, "x"]}, "k3": {"n": 3, "l": [3, "x"]}}
    # And back: our dump of it is what Caf.js holds.
    assert as_dict(run_node(cafjs, APPLY, json.dumps(made))) == \
        as_dict(dict(ours.ref().dump()))
