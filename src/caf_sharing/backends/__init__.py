"""Storage backends, chosen by URL.

``make_backend(url, app=..., **options)`` returns an unstarted backend:

* ``memory://`` (a private in-process store) or ``memory://NAME`` (the
  process-wide store NAME, shared by every backend opened on it) — see
  :mod:`caf_sharing.backends.memory`;
* ``redis://[user:password@]host[:port][/db]``, ``rediss://...`` (TLS; query
  options ``ssl_cert_reqs``, ``ssl_ca_certs``, ``ssl_certfile``,
  ``ssl_keyfile``, ``ssl_check_hostname``) and
  ``unix:///path/to/socket?db=N`` (``password``/``username`` in the query) —
  see :mod:`caf_sharing.backends.redis`. All three also take the query
  options ``wait_replicas=N`` and ``wait_timeout_ms=T`` (acknowledge a
  commit only once N replicas hold it, see ``RedisBackend``).

``app`` namespaces everything a backend stores, so several applications can
share one store or server. URLs are parsed strictly: anything unknown or
malformed is a :class:`~caf_sharing.errors.ConfigError` naming it, with the
password redacted (:func:`redact_url`).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from ..errors import ConfigError
from .base import (
    Backend,
    ChangeSet,
    Checkpoint,
    MapCreate,
    MapWrite,
    MessageHandler,
    ReconnectListener,
    Transaction,
)
from .memory import MemoryBackend, MemoryStore
from .wire import check_app

__all__ = [
    "Backend",
    "BackendURL",
    "ChangeSet",
    "Checkpoint",
    "MapCreate",
    "MapWrite",
    "MemoryBackend",
    "MemoryStore",
    "MessageHandler",
    "ReconnectListener",
    "Transaction",
    "check_app",
    "make_backend",
    "parse_url",
    "redact_url",
]

SCHEMES = ("memory", "redis", "rediss", "unix")
DEFAULT_PORT = 6379
REDACTED = "***"
_SSL_OPTIONS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile",
                "ssl_check_hostname")
_WAIT_OPTIONS = ("wait_replicas", "wait_timeout_ms")
_QUERY_OPTIONS = {
    "memory": (),
    "redis": _WAIT_OPTIONS,
    "rediss": _SSL_OPTIONS + _WAIT_OPTIONS,
    "unix": ("db", "password", "username", *_WAIT_OPTIONS),
}
_SECRET_QUERY = ("password",)
_STORE_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,200}")


@dataclass(frozen=True, slots=True)
class BackendURL:
    """A parsed backend URL. ``str()`` and ``repr()`` never show the password."""

    scheme: str
    #: The store name of ``memory://NAME`` ("" for a private store).
    name: str = ""
    host: str | None = None
    port: int | None = None
    #: The socket path of ``unix://``.
    path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    #: Further query options (TLS settings, wait_replicas...), as given.
    options: dict[str, str] = field(default_factory=dict)
    #: The URL as given, with the password replaced by ``***``.
    redacted: str = ""

    def __str__(self) -> str:
        return self.redacted


_USERINFO_SECRET = re.compile(r"(://[^/@:]*:)[^/@]*@")
_QUERY_SECRET = re.compile(r"(\bpassword=)[^&#]*")


def redact_url(url: str) -> str:
    """``url`` with any password (in the authority or the query) replaced by
    ``***``; safe to log."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        # Not parseable (a broken IPv6 address, say): mask what looks secret.
        return _QUERY_SECRET.sub(rf"\1{REDACTED}",
                                 _USERINFO_SECRET.sub(rf"\1{REDACTED}@", url))
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    secret_query = any(k in _SECRET_QUERY for k, _ in pairs)
    if password is None and not secret_query:
        return url
    netloc = parts.netloc
    if password is not None:
        userinfo, _, hostinfo = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:{REDACTED}@{hostinfo}"
    query = parts.query
    if secret_query:
        query = "&".join(
            f"{quote(k)}={REDACTED if k in _SECRET_QUERY else quote(v, safe='/')}"
            for k, v in pairs)
    # Not urlunsplit: it drops the "//" of schemes it does not know (unix:///).
    redacted = f"{parts.scheme}://{netloc}{parts.path}"
    if query:
        redacted += f"?{query}"
    if parts.fragment:
        redacted += f"#{parts.fragment}"
    return redacted


def _fail(redacted: str, why: str) -> ConfigError:
    return ConfigError(f"invalid backend URL {redacted!r}: {why}")


def _parse_db(redacted: str, text: str) -> int:
    if not text.isdigit():
        raise _fail(redacted, f"database must be a number >= 0, got {text!r}")
    return int(text)


def parse_url(url: str) -> BackendURL:
    """Parse and check a backend URL (see the module docstring for the forms)."""
    if not isinstance(url, str):
        raise ConfigError(f"backend URL must be a str, got {type(url).__name__}")
    redacted = redact_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _fail(redacted, str(exc)) from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise _fail(redacted, f"unknown scheme {parts.scheme!r}; use one of "
                              + ", ".join(f"{s}://" for s in SCHEMES))
    if parts.fragment:
        raise _fail(redacted, "a fragment (#...) means nothing here")
    query: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if key not in _QUERY_OPTIONS[scheme]:
            if key in _WAIT_OPTIONS:  # only memory:// lacks them
                raise _fail(redacted, f"{key} needs a Redis backend: memory:// has no replicas")
            allowed = ", ".join(_QUERY_OPTIONS[scheme]) or "none"
            raise _fail(redacted, f"unknown query option {key!r} (allowed: {allowed})")
        if key in query:
            raise _fail(redacted, f"query option {key!r} given twice")
        query[key] = value
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None

    if scheme == "memory":
        name = parts.netloc + parts.path
        if username or password or port is not None or parts.query:
            raise _fail(redacted, "memory:// takes only a store name")
        if name and not _STORE_NAME.fullmatch(name):
            raise _fail(redacted, "store name must be 1-200 of A-Z a-z 0-9 _ . -")
        return BackendURL("memory", name=name, redacted=redacted)

    if scheme == "unix":
        if parts.hostname or port is not None or username or password:
            raise _fail(redacted, "unix:// takes a socket path (unix:///path/to/sock); "
                                  "give username/password in the query")
        if not parts.path:
            raise _fail(redacted, "missing the socket path")
        db = _parse_db(redacted, query.pop("db", "0"))
        return BackendURL("unix", path=unquote(parts.path), db=db,
                          username=query.pop("username", None),
                          password=query.pop("password", None), options=query,
                          redacted=redacted)

    host = parts.hostname
    if not host:
        raise _fail(redacted, "missing the host")
    path = parts.path.strip("/")
    db = _parse_db(redacted, path) if path else 0
    return BackendURL(scheme, host=host, port=port if port is not None else DEFAULT_PORT,
                      db=db, username=username, password=password, options=query,
                      redacted=redacted)


def make_backend(url: str = "memory://", *, app: str = "default", **options: Any) -> Backend:
    """An unstarted backend for ``url``; ``await backend.start()`` before use.

    ``options`` are the backend's keyword arguments (for Redis:
    ``coalescing_interval``, ``max_pending_updates``, ``max_retries``,
    ``retry_delay``, ``call_timeout``, ``socket_timeout``, ``connect_timeout``,
    ``wait_replicas``, ``wait_timeout_ms``, ``password``, ``username``, ...);
    an option the backend does not know is a :class:`ConfigError`.
    """
    target = parse_url(url)
    check_app(app)
    if target.scheme == "memory":
        if set(options) & set(_WAIT_OPTIONS):
            raise ConfigError("wait_replicas/wait_timeout_ms need a Redis backend: "
                              f"{target.redacted} has no replicas")
        if options:
            raise ConfigError(f"memory:// takes no options, got {', '.join(sorted(options))}")
        return MemoryBackend(target.name, app=app)
    # Imported here so that memory-only users never load redis-py.
    from .redis import RedisBackend

    unknown = sorted(set(options) - set(inspect.signature(RedisBackend).parameters) - {"url"})
    if unknown:
        raise ConfigError(f"unknown option(s) for {target.redacted}: {', '.join(unknown)}")
    return RedisBackend(target, app=app, **options)
