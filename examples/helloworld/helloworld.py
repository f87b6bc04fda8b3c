"""Hello world of Sharing Actors: an admin writes a counter, readers replicate it.

The seed's scenario in Python. ``alice-admin`` owns the map
``alice-admin-primarySharedMap`` and increments its ``counter``; every actor of
``alice`` (the admin too) reads it through a read-only replica. Writes become
visible when the admin's message commits, never half-way.

Run it with no server (``memory://``) or on Redis::

    python examples/helloworld/helloworld.py
    python examples/helloworld/helloworld.py redis://localhost:6379/0

On Redis the actors resume from their checkpoints: each run adds 5 to the
counter the previous runs left.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from caf_sharing import Actor, Node

ADMIN = "admin"
ADMIN_MAP = "primarySharedMap"


def is_admin(actor: Actor) -> bool:
    return actor.name.split("-")[1] == ADMIN


def primary_map(actor: Actor) -> str:
    return f"{actor.name.split('-')[0]}-{ADMIN}-{ADMIN_MAP}"


class Hello(Actor):
    async def init(self) -> None:
        if is_admin(self):
            self.sharing.add_writable_map("primary", ADMIN_MAP)
        self.sharing.add_read_only_map("replica", primary_map(self))

    async def increment(self) -> int:
        if not is_admin(self):
            raise PermissionError(f"{self.name} cannot write to {primary_map(self)}")
        primary = self.sharing.maps.primary
        counter = primary.get("counter", 0)
        primary.set("counter", counter + 1)
        return counter

    async def get_counter(self) -> int | None:
        return self.sharing.maps.replica.get("counter")


async def main(url: str = "memory://helloworld", app: str = "helloworld",
               **node_options: Any) -> list[int | None]:
    async with Node(url, app=app, **node_options) as node:
        admin = await node.start(Hello, "alice-admin")
        readers = [await node.start(Hello, f"alice-reader{i}") for i in range(3)]
        for _ in range(5):
            # increment returns the counter before its write: the last one's + 1
            # is where this run leaves it (a run on Redis resumes the last run's).
            last = await admin.call(Hello.increment) + 1
        try:
            await readers[0].call(Hello.increment)
        except PermissionError as exc:
            print("as expected:", exc)
        # Replicas are updated asynchronously: wait until every reader sees it.
        async with asyncio.timeout(30):
            while True:
                seen = [await r.call(Hello.get_counter) for r in readers]
                if all(value == last for value in seen):
                    break
                await asyncio.sleep(0.01)
        print("readers see counter =", seen)
        return seen


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:2]))
