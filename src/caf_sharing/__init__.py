"""caf-sharing: Sharing Actors for Python.

Actors keep the actor model's one-message-at-a-time semantics while sharing
slowly changing data through replicated, versioned, single-writer maps.
"""

from . import errors
from ._fastmap import FIRST_VERSION, FUNCTION_MARKER, FrozenDict, FrozenList, MapRef, SharedMap

__all__ = [
    "FIRST_VERSION",
    "FUNCTION_MARKER",
    "FrozenDict",
    "FrozenList",
    "MapRef",
    "SharedMap",
    "errors",
]

__version__ = "0.1.0"
