"""The Redis backend's settings: its keyword arguments and URL query options,
checked once, and how to reach one of its servers (:class:`Endpoint`)."""

from __future__ import annotations

import math
import random
import ssl
from dataclasses import dataclass
from typing import Any

from redis.asyncio.connection import SSLConnection

from ...errors import ConfigError
from .. import BackendURL

__all__ = ["Address", "Endpoint", "Settings"]

#: A server: (host, port), or the path of a unix socket.
Address = tuple[str, int] | str

_CERT_REQS = ("none", "optional", "required")
SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")


def _number(name: str, value: object, *, zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise ConfigError(f"option {name} must be a number {'>=' if zero else '>'} 0, "
                          f"got {value!r}")
    return float(value)


def _query_int(name: str, given: int | None, query: dict[str, str], default: int) -> object:
    """Option ``name``: the keyword argument if given, else the URL query's
    (checked by the caller like any other value), else ``default``."""
    if given is not None:
        return given
    text = query.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"URL option {name} must be an int, got {text!r}") from None


def _count(name: str, value: object, *, zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero else 1):
        raise ConfigError(f"option {name} must be an int {'>=' if zero else '>'} 0, "
                          f"got {value!r}")
    return value


def _longest(first: object, longest: object) -> float:
    if longest is None:  # 1 s, or retry_delay if that is longer
        return max(1.0, _number("retry_delay", first, zero=True))
    value = _number("max_retry_delay", longest, zero=True)
    if isinstance(first, int | float) and value < first:
        raise ConfigError(f"option max_retry_delay ({longest!r}) must be >= retry_delay "
                          f"({first!r})")
    return value


def _tls_options(options: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    reqs = options.get("ssl_cert_reqs")
    if reqs is not None:
        if reqs not in _CERT_REQS:
            raise ConfigError(f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}, "
                              f"got {reqs!r}")
        out["ssl_cert_reqs"] = reqs
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if options.get(name) is not None:
            out[name] = str(options[name])
    check = options.get("ssl_check_hostname")
    if isinstance(check, str):
        if check.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"ssl_check_hostname must be true or false, got {check!r}")
        check = check.lower() in ("true", "1")
    if check is not None:
        out["ssl_check_hostname"] = bool(check)
    elif reqs == "none":
        # Checking the name of a certificate nobody verifies cannot work.
        out["ssl_check_hostname"] = False
    return out


@dataclass(frozen=True, slots=True)
class Endpoint:
    """How command connections reach and open one server (see
    :mod:`.connection`): address, TLS, credentials, database."""

    address: Address
    tls: ssl.SSLContext | None
    server_hostname: str | None
    username: str | None
    password: str | None
    db: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Every option of a :class:`~caf_sharing.backends.redis.RedisBackend`,
    checked (see its docstring for what each means)."""

    url: str
    cluster: bool
    seeds: tuple[Address, ...]
    coalescing_interval: float
    max_pending_updates: int
    max_retries: int
    retry_delay: float
    max_retry_delay: float
    call_timeout: float | None
    socket_timeout: float | None
    wait_replicas: int
    wait_timeout_ms: int
    max_connections: int
    read_chunk_size: int
    health_check_interval: float
    restart_grace: bool
    connect_timeout: float
    username: str | None
    password: str | None
    db: int
    #: The ``ssl_*`` options of a TLS URL (None: plaintext).
    tls_options: dict[str, Any] | None

    @classmethod
    def make(cls, target: BackendURL, *,
             coalescing_interval: float = 0.01, max_pending_updates: int = 20,
             max_retries: int = 10, retry_delay: float = 0.1,
             max_retry_delay: float | None = None,
             call_timeout: float | None = 3.0, socket_timeout: float | None = 1.0,
             connect_timeout: float = 1.0,
             wait_replicas: int | None = None, wait_timeout_ms: int | None = None,
             max_connections: int = 16, read_chunk_size: int = 1000,
             health_check_interval: float = 5.0, restart_grace: bool = True,
             username: str | None = None, password: str | None = None,
             ssl_cert_reqs: str | None = None, ssl_ca_certs: str | None = None,
             ssl_certfile: str | None = None, ssl_keyfile: str | None = None,
             ssl_check_hostname: bool | None = None) -> Settings:
        if target.scheme not in SCHEMES:
            raise ConfigError(f"RedisBackend cannot use {target.redacted!r}")
        if not isinstance(restart_grace, bool):
            raise ConfigError(f"option restart_grace must be true or false, got {restart_grace!r}")
        _number("connect_timeout", connect_timeout)
        for name, value in (("username", username), ("password", password)):
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"option {name} must be a str")
        tls = target.scheme.startswith("rediss")
        given_tls = {k: v for k, v in (
            ("ssl_cert_reqs", ssl_cert_reqs), ("ssl_ca_certs", ssl_ca_certs),
            ("ssl_certfile", ssl_certfile), ("ssl_keyfile", ssl_keyfile),
            ("ssl_check_hostname", ssl_check_hostname)) if v is not None}
        tls_options = None
        if tls:
            tls_options = _tls_options({**target.options, **given_tls})
        elif given_tls:
            raise ConfigError(f"TLS options {', '.join(sorted(given_tls))} need a rediss:// "
                              f"URL, not {target.redacted!r}")
        seeds: tuple[Address, ...]
        if target.scheme == "unix":
            assert target.path is not None
            seeds = (target.path,)
        else:
            assert target.host is not None and target.port is not None
            seeds = target.hosts or ((target.host, target.port),)
        return cls(
            url=target.redacted,
            cluster=target.scheme.endswith("+cluster"),
            seeds=seeds,
            coalescing_interval=_number("coalescing_interval", coalescing_interval, zero=True),
            max_pending_updates=_count("max_pending_updates", max_pending_updates),
            max_retries=_count("max_retries", max_retries, zero=True),
            retry_delay=_number("retry_delay", retry_delay, zero=True),
            max_retry_delay=_longest(retry_delay, max_retry_delay),
            call_timeout=None if call_timeout is None
            else _number("call_timeout", call_timeout),
            socket_timeout=None if socket_timeout is None
            else _number("socket_timeout", socket_timeout),
            wait_replicas=_count("wait_replicas", _query_int(
                "wait_replicas", wait_replicas, target.options, 0), zero=True),
            wait_timeout_ms=_count("wait_timeout_ms", _query_int(
                "wait_timeout_ms", wait_timeout_ms, target.options, 1000)),
            max_connections=_count("max_connections", max_connections),
            read_chunk_size=_count("read_chunk_size", read_chunk_size),
            health_check_interval=_number("health_check_interval", health_check_interval,
                                          zero=True),
            restart_grace=restart_grace,
            connect_timeout=connect_timeout,
            username=username if username is not None else target.username,
            password=password if password is not None else target.password,
            db=target.db,
            tls_options=tls_options)

    def backoff(self, attempt: int, longest: float | None = None) -> float:
        """The pause before retry ``attempt`` (1, 2, ...): ``retry_delay``,
        doubling up to ``max_retry_delay`` (or ``longest``), of which a random
        half is taken off, so that the clients a failure hit together do not
        all come back at the same moment."""
        cap = self.max_retry_delay if longest is None else longest
        pause = min(cap, self.retry_delay * 2.0 ** min(attempt - 1, 30))
        return pause * (0.5 + random.random() / 2)

    def endpoint(self, address: Address) -> Endpoint:
        """How connections reach ``address`` (see :mod:`.connection`)."""
        tls = None
        if self.tls_options is not None:
            # redis-py's own TLS context, its defaults included (its
            # connection is made only to build it; it never connects).
            assert isinstance(address, tuple)  # a TLS URL names host:port
            tls = SSLConnection(host=address[0], port=address[1],
                                **self.tls_options).ssl_context.get()
        return Endpoint(address=address, tls=tls,
                        server_hostname=address[0] if isinstance(address, tuple) else None,
                        username=self.username, password=self.password, db=self.db)
