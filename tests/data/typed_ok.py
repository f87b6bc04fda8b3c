"""Typed calls that mypy --strict accepts (tests/test_lifecycle.py checks it)."""

from __future__ import annotations

from typing import Any, assert_type

from caf_sharing import Actor, ActorHandle, Node


class Hello(Actor):
    async def increment(self, by: int, *, note: str = "") -> int:
        counter: int = self.state.get("counter", 0) + by
        self.state["counter"] = counter
        return counter

    async def greet(self) -> str:
        return f"hello from {self.name}"


class Loud(Hello):
    async def shout(self) -> str:
        return (await self.greet()).upper()


async def main() -> None:
    async with Node() as node:
        hello = await node.start(Hello, "alice-hello")
        assert_type(hello, ActorHandle[Hello])
        # The return type is inferred from the method.
        value = assert_type(await hello.call(Hello.increment, 3), int)
        value = await hello.call(Hello.increment, 4, note="four")
        text = assert_type(await hello.call(Hello.greet), str)
        me = assert_type(hello.actor, Hello)
        loud = await node.start(Loud, "alice-loud")
        shout: str = await loud.call(Loud.shout)
        # A method of a base class is a message of its subclasses too, and a
        # handle of a subclass is a handle of its base class.
        more: int = await loud.call(Hello.increment, 1)
        base: ActorHandle[Hello] = loud
        anything = assert_type(await hello.call("increment", 1), Any)  # the string form
        print(value, text, me.name, shout, more, base.name, anything)
