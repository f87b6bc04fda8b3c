"""The Redis backend: ``redis://``, ``rediss://`` (TLS), ``unix://``, and
Redis Cluster with ``redis+cluster://`` and ``rediss+cluster://``.

Its parts, each doing one thing; one server and a cluster differ only in
routing:

* :mod:`.backend` — :class:`RedisBackend`, the backend protocol on top;
* :mod:`.options` — its settings, checked, and how to open a connection;
* :mod:`.routing` — the connections to each server, which server each
  command goes to, and the retries (MOVED, ASK, TRYAGAIN, NOSCRIPT, lost
  connections);
* :mod:`.group_commit` — commits bound for one server sharing round trips;
* :mod:`.pubsub` — (sharded) pub/sub, one connection per server;
* :mod:`.scripts` and ``lua/`` — the scripts every update runs in;
* :mod:`.codec` — key names, the commit script's arguments, reply decoding.
"""

from .backend import RedisBackend, RedisStats

__all__ = ["RedisBackend", "RedisStats"]
