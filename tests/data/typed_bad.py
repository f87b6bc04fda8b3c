"""Typed calls that mypy --strict refuses (tests/test_lifecycle.py checks
that each line marked "error" fails, and nothing else)."""

from __future__ import annotations

from caf_sharing import Actor, Node


class Hello(Actor):
    async def increment(self, by: int) -> int:
        return by


class Other(Actor):
    async def reset(self) -> None:
        return None


async def main() -> None:
    async with Node() as node:
        hello = await node.start(Hello, "alice-hello")
        await hello.call(Hello.increment, "three")  # error: a str for an int
        text: str = await hello.call(Hello.increment, 3)  # error: it returns an int
        await hello.call(Other.reset)  # error: a method of another actor class
        await hello.call(Hello.increment)  # error: an argument is missing
        await hello.call(Hello.increment, 3)
        print(text)
