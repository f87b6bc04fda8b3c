"""Hello adaptive: data and the code that reads it change together.

The admin installs a ``base`` value and a serialized method ``computeLabel``
in the same message, so they commit as one version: no reader can ever run the
new method against old data, or the old method against new data. Readers run
the method on their replica; it is compiled under RestrictedPython (no
imports, no dunder access) and ``self`` is the reader's snapshot.

Run it with no server (``memory://``) or on Redis::

    python examples/helloadaptive/helloadaptive.py
    python examples/helloadaptive/helloadaptive.py redis://localhost:6379/0
"""

from __future__ import annotations

import asyncio
import sys

from caf_sharing import Actor, Node

ADMIN = "admin"
ADMIN_MAP = "primarySharedMap"


def primary_map(actor: Actor) -> str:
    return f"{actor.name.split('-')[0]}-{ADMIN}-{ADMIN_MAP}"


class Adaptive(Actor):
    async def init(self) -> None:
        if self.name.split("-")[1] == ADMIN:
            self.sharing.add_writable_map("primary", ADMIN_MAP)
        self.sharing.add_read_only_map("replica", primary_map(self))

    async def install(self, base: int, style: str) -> int:
        primary = self.sharing.maps.primary
        primary.set("base", base)
        if style == "sum":
            body = "return prefix + str(self.get('base') + len(prefix))"
        else:
            body = "return prefix + str(self.get('base') * len(prefix))"
        primary.set_fun("computeLabel", ["prefix"], body)
        return base

    async def get_label(self, prefix: str) -> tuple[int, str | None]:
        replica = self.sharing.maps.replica
        if "computeLabel" not in replica:  # the first install has not arrived yet
            return replica.version, None
        return replica.version, replica.apply_method("computeLabel", [prefix])


async def main(url: str = "memory://helloadaptive") -> list[str]:
    async with Node(url, app="helloadaptive") as node:
        admin = await node.start(Adaptive, "alice-admin")
        reader = await node.start(Adaptive, "alice-reader")
        labels: list[str] = []
        for base, style in [(10, "sum"), (7, "product")]:
            await admin.call("install", base, style)
            expected = (base + 3) if style == "sum" else base * 3
            while True:
                version, label = await reader.call("get_label", "abc")
                if label == f"abc{expected}":
                    break
                await asyncio.sleep(0.01)
            print(f"version {version}: computeLabel('abc') = {label}")
            labels.append(f"abc{expected}")
        return labels


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:2]))
