"""caf-sharing: Sharing Actors for Python.

Actors keep the actor model's one-message-at-a-time semantics while sharing
slowly changing data through replicated, versioned, single-writer maps.

The compiled core (:class:`SharedMap`, :class:`MapRef`) needs no I/O; a
:class:`Node` hosts :class:`Actor` subclasses on a backend chosen by URL
(``memory://`` in-process by default, ``redis://`` across processes).
"""

from . import errors
from ._fastmap import FIRST_VERSION, FUNCTION_MARKER, FrozenDict, FrozenList, MapRef, SharedMap
from ._version import __version__ as __version__
from .aggregate import AggregateMap, AggregateSnapshot
from .node import Actor, ActorHandle, Node
from .proxy import SharingProxy
from .view import ReplicaView

__all__ = [
    "FIRST_VERSION",
    "FUNCTION_MARKER",
    "Actor",
    "ActorHandle",
    "AggregateMap",
    "AggregateSnapshot",
    "FrozenDict",
    "FrozenList",
    "MapRef",
    "Node",
    "ReplicaView",
    "SharedMap",
    "SharingProxy",
    "errors",
]
