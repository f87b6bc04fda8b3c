"""Storage backends, chosen by URL.

``make_backend(url, app=..., **options)`` returns an unstarted backend:

* ``memory://`` (a private in-process store) or ``memory://NAME`` (the
  process-wide store NAME, shared by every backend opened on it) — see
  :mod:`caf_sharing.backends.memory`;
* ``redis://[user:password@]host[:port][/db]``, ``rediss://...`` (TLS; query
  options ``ssl_cert_reqs``, ``ssl_ca_certs``, ``ssl_certfile``,
  ``ssl_keyfile``, ``ssl_check_hostname``) and
  ``unix:///path/to/socket?db=N`` (``password``/``username`` in the query) —
  see :mod:`caf_sharing.backends.redis`;
* ``redis+cluster://[user:password@]host:port[,host:port...]`` and
  ``rediss+cluster://...`` (TLS, same query options as ``rediss://``): a
  Redis Cluster reached through any of the listed nodes; database 0 only.

All the Redis forms also take the query options ``wait_replicas=N`` and
``wait_timeout_ms=T`` (acknowledge a commit only once N replicas hold it, see
``RedisBackend``).

``app`` namespaces everything a backend stores, so several applications can
share one store or server. URLs are parsed strictly: anything unknown or
malformed is a :class:`~caf_sharing.errors.ConfigError` naming it, with the
password redacted (:func:`redact_url`). A user name or password must
percent-encode ``/ ? # @ & %``: a URL where an ``@`` follows the host part is
refused rather than guessed at, and neither its error nor any message shows
the part before that ``@``. Values are percent-decoded; a ``+`` stays a ``+``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

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
    "DEFAULT_URL",
    "URL_VARIABLE",
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
    "default_url",
    "make_backend",
    "parse_url",
    "redact_url",
]

#: The environment variable that names the backend when no URL is given
#: (``Node()``, the CLI's ``--backend``): it keeps passwords out of code and
#: command lines.
URL_VARIABLE = "CAF_SHARING_URL"
#: The backend when no URL is given and ``CAF_SHARING_URL`` is unset or empty.
DEFAULT_URL = "memory://"


def default_url() -> str:
    """``$CAF_SHARING_URL``, or :data:`DEFAULT_URL` when it is unset or empty."""
    return os.environ.get(URL_VARIABLE) or DEFAULT_URL


SCHEMES = ("memory", "redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
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
    "redis+cluster": _WAIT_OPTIONS,
    "rediss+cluster": _SSL_OPTIONS + _WAIT_OPTIONS,
}
_SECRET_QUERY = ("password",)
_STORE_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,200}")
#: What a masked user info may be shown with: a host, a port and a database.
_PLAIN_HOSTPART = re.compile(r"[A-Za-z0-9._~\-\[\]:%]*(?:/[0-9]*)?")
_ENCODE_HINT = ("percent-encode '/', '?', '#', '@', '&' and '%' in a user name or password "
                "(%2F, %3F, %23, %40, %26, %25)")


@dataclass(frozen=True, slots=True)
class BackendURL:
    """A parsed backend URL. ``str()`` and ``repr()`` never show the password."""

    scheme: str
    #: The store name of ``memory://NAME`` ("" for a private store).
    name: str = ""
    host: str | None = None
    port: int | None = None
    #: The (host, port) of each seed node of a cluster URL (empty otherwise).
    hosts: tuple[tuple[str, int], ...] = ()
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


def _split(url: str) -> tuple[str, str, str]:
    """``url`` as (scheme and ``://``, authority, the rest), cut as RFC 3986 does:
    the authority ends at the first ``/``, ``?`` or ``#``. Without ``://`` the
    whole text counts as the authority, so that a stray ``user:pw@`` is masked."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    end = next((i for i, ch in enumerate(rest) if ch in "/?#"), len(rest))
    return scheme + sep, rest[:end], rest[end:]


def _ambiguous_userinfo(url: str) -> bool:
    """Whether an ``@`` comes after the authority: then a user name or password
    holds an unencoded ``/``, ``?`` or ``#``, and where it ends is a guess."""
    head, authority, tail = _split(url)
    # unix:///path?password=a@b has an empty authority: its '@' is in the path or query.
    return "@" in tail and bool(authority or not head.lower().startswith("unix"))


def _redact_query(query: str) -> tuple[str, bool]:
    """``query`` with password values masked, and whether it holds a password.

    Anything after a password that is not a known option may be a piece of a
    password holding an unencoded ``&``: it is masked too."""
    known = {k for options in _QUERY_OPTIONS.values() for k in options}
    shown: list[str] = []
    secret = False
    for pair in query.split("&"):
        key = unquote(pair.partition("=")[0])
        if key in _SECRET_QUERY:
            secret = True
            shown.append(f"{pair.partition('=')[0]}={REDACTED}")
        elif secret and key not in known:
            break
        else:
            shown.append(pair)
    return "&".join(shown), secret


def redact_url(url: str) -> str:
    """``url`` with any password (in the user info or the query) replaced by
    ``***``; safe to log, whatever the text is.

    When a user info holds an unencoded ``/``, ``?`` or ``#`` (so that an ``@``
    follows the host part), everything up to the last ``@`` is masked, user
    name included. A port that is not a number (a password without ``@``?) and
    a fragment are masked, and so is whatever follows a query password but is
    no known option (a password holding ``&`` or ``#``)."""
    head, authority, tail = _split(url)
    if _ambiguous_userinfo(url):
        host = url.rpartition("@")[2]
        return f"{head}{REDACTED}@{host}" if _PLAIN_HOSTPART.fullmatch(host) \
            else f"{head}{REDACTED}"
    userinfo, at, hostport = authority.rpartition("@")
    if at and ":" in userinfo:
        userinfo = f"{userinfo.partition(':')[0]}:{REDACTED}"
    host, colon, port = hostport.rpartition(":")
    if colon and not port.isdigit() and not hostport.endswith("]"):
        hostport = f"{host}:{REDACTED}"
    rest, hash_, fragment = tail.partition("#")
    path, question, query = rest.partition("?")
    query, secret = _redact_query(query) if question else ("", False)
    # A fragment means nothing here, but may be the tail of a password that holds
    # an unencoded '#' (redis://:pa#ss, or a query password): never shown.
    if hash_ and not secret:
        query += f"#{REDACTED}" if fragment else "#"
    return f"{head}{userinfo}{at}{hostport}{path}{question}{query}"


def _fail(redacted: str, why: str) -> ConfigError:
    return ConfigError(f"invalid backend URL {redacted!r}: {why}")


def _parse_db(redacted: str, text: str) -> int:
    if not text.isdigit():
        raise _fail(redacted, "the database must be a number >= 0")
    return int(text)


def _parse_query(redacted: str, scheme: str, query: str) -> dict[str, str]:
    """The query's options, percent-decoded (a ``+`` stays a ``+``: passwords
    and file names mean it)."""
    options: dict[str, str] = {}
    after_secret = False
    for pair in query.split("&"):
        if not pair:
            continue
        raw_key, _, raw_value = pair.partition("=")
        key, value = unquote(raw_key), unquote(raw_value)
        if key not in _QUERY_OPTIONS[scheme]:
            if key in _WAIT_OPTIONS:  # only memory:// lacks them
                raise _fail(redacted, f"{key} needs a Redis backend: memory:// has no replicas")
            allowed = ", ".join(_QUERY_OPTIONS[scheme]) or "none"
            if after_secret:  # the key may be a piece of the password: never show it
                raise _fail(redacted, "an unknown query option follows the password (not "
                                      f"shown: it may be a piece of it; allowed: {allowed}); "
                                      + _ENCODE_HINT)
            raise _fail(redacted, f"unknown query option {key!r} (allowed: {allowed})")
        if key in options:
            raise _fail(redacted, f"query option {key!r} given twice")
        after_secret = after_secret or key in _SECRET_QUERY
        options[key] = value
    return options


def parse_url(url: str) -> BackendURL:
    """Parse and check a backend URL (see the module docstring for the forms).

    No error message shows a password: each gives the URL as
    :func:`redact_url` masks it, and never quotes a part of it that could
    hold a piece of a password."""
    if not isinstance(url, str):
        raise ConfigError(f"backend URL must be a str, got {type(url).__name__}")
    redacted = redact_url(url)
    if _ambiguous_userinfo(url):
        raise _fail(redacted, f"an '@' follows the host part; {_ENCODE_HINT}")
    try:
        parts = urlsplit(url)
    except ValueError:
        # urllib's message quotes the host, which may hold a password.
        raise _fail(redacted, "the host is not a valid name or [IPv6] address") from None
    scheme = parts.scheme.lower()
    if scheme.endswith("+cluster") and scheme in SCHEMES:
        return _parse_cluster(parts, scheme, redacted)
    try:
        port = parts.port
    except ValueError:
        # Not urllib's message: it quotes the port, which may be a password.
        raise _fail(redacted, "the port must be a number from 0 to 65535") from None
    if scheme not in SCHEMES:
        raise _fail(redacted, f"unknown scheme {parts.scheme!r}; use one of "
                              + ", ".join(f"{s}://" for s in SCHEMES))
    query = _parse_query(redacted, scheme, parts.query)
    if parts.fragment or url.endswith("#"):
        raise _fail(redacted, f"a fragment (#...) means nothing here; {_ENCODE_HINT}")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None

    if scheme == "memory":
        if "://" not in url:
            raise _fail(redacted, "write memory://NAME, with two slashes")
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


def _parse_cluster(parts: SplitResult, scheme: str, redacted: str) -> BackendURL:
    """A ``redis+cluster://`` URL: one or more comma-separated seed nodes."""
    query = _parse_query(redacted, scheme, parts.query)
    if parts.fragment or parts.geturl().endswith("#"):
        raise _fail(redacted, f"a fragment (#...) means nothing here; {_ENCODE_HINT}")
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    hosts: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        try:
            seed = urlsplit(f"redis://{item}")
            host, port = seed.hostname, seed.port
        except ValueError:
            raise _fail(redacted, "each node must be host:port, the port a number from 0 "
                                  "to 65535 (nodes separated by ',')") from None
        if not host:
            raise _fail(redacted, "missing a host (nodes are host:port, separated by ',')")
        hosts.append((host, port if port is not None else DEFAULT_PORT))
    path = parts.path.strip("/")
    if path and path != "0":
        raise _fail(redacted, "a Redis Cluster has only database 0; drop the /" + path
                    if path.isdigit() else "the path must be empty or /0")
    host, port = hosts[0]
    return BackendURL(scheme, host=host, port=port, hosts=tuple(hosts), username=username,
                      password=password, options=query, redacted=redacted)


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

    # It refuses the options it does not know.
    return RedisBackend(target, app=app, **options)
