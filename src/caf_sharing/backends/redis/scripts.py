"""The Lua scripts every update runs in, shipped in ``lua/`` and loaded with
:mod:`importlib.resources`; called with EVALSHA, loaded again on NOSCRIPT."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

__all__ = ["ACQUIRE", "CLAIM", "COMMIT", "CREATE", "DESTROY", "READ", "RELEASE", "RENEW",
           "SCRIPTS", "Script"]


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: bytes
    sha: str


def _load(name: str) -> Script:
    source = resources.files(__package__).joinpath("lua", f"{name}.lua").read_bytes()
    return Script(name, source, hashlib.sha1(source, usedforsecurity=False).hexdigest())


COMMIT = _load("commit")
CREATE = _load("create_map")
READ = _load("read_maps")
ACQUIRE = _load("lease_acquire")
RENEW = _load("lease_renew")
RELEASE = _load("lease_release")
DESTROY = _load("destroy_actor")
CLAIM = _load("node_claim")
SCRIPTS = (COMMIT, CREATE, READ, ACQUIRE, RENEW, RELEASE, DESTROY, CLAIM)
