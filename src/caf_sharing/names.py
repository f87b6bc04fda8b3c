"""Actor and map names, and the ownership rule read from them.

An actor is ``owner-local``; a map is ``owner-local-map``. Each part is one or
more of ``A-Z a-z 0-9 _ .`` (no ``-``, which separates parts), and a full name
is at most :data:`MAX_NAME_LENGTH` characters. Because a map name starts with
its owner's actor name, ownership is checked from the name alone.
"""

from __future__ import annotations

import re

from .errors import InvalidNameError

__all__ = [
    "MAX_NAME_LENGTH",
    "SEPARATOR",
    "check_actor_name",
    "check_map_name",
    "check_part",
    "join_name",
    "map_owner",
]

SEPARATOR = "-"
MAX_NAME_LENGTH = 200
_PART = re.compile(r"[A-Za-z0-9_.]+")


def check_part(part: object, what: str = "name part") -> str:
    if not isinstance(part, str):
        raise InvalidNameError(f"{what} must be a str, got {type(part).__name__}")
    if not _PART.fullmatch(part):
        raise InvalidNameError(
            f"invalid {what} {part!r}: use one or more of A-Z a-z 0-9 _ .")
    return part


def _split(name: object, parts: int, what: str) -> list[str]:
    if not isinstance(name, str):
        raise InvalidNameError(f"{what} name must be a str, got {type(name).__name__}")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidNameError(
            f"{what} name {name[:40]!r}... is longer than {MAX_NAME_LENGTH} characters")
    split = name.split(SEPARATOR)
    if len(split) != parts or not all(_PART.fullmatch(p) for p in split):
        shape = "owner-local" if parts == 2 else "owner-local-map"
        raise InvalidNameError(
            f"invalid {what} name {name!r}: expected {shape}, "
            "each part one or more of A-Z a-z 0-9 _ .")
    return split


def check_actor_name(name: object) -> str:
    """Return ``name`` if it is a valid ``owner-local`` actor name."""
    _split(name, 2, "actor")
    return name  # type: ignore[return-value]


def check_map_name(name: object) -> str:
    """Return ``name`` if it is a valid ``owner-local-map`` map name."""
    _split(name, 3, "map")
    return name  # type: ignore[return-value]


def map_owner(name: str) -> str:
    """The actor that owns map ``name`` (its first two parts)."""
    owner, local, _ = _split(name, 3, "map")
    return owner + SEPARATOR + local


def join_name(*parts: str) -> str:
    return SEPARATOR.join(parts)
