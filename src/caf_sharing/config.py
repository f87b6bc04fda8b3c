"""Caf.js-style configuration: ``framework.json`` and ``ca.json``.

The seed's examples load as they are — a bare, comma-separated list of
components included — with module names ``caf_redis#plug``,
``caf_sharing#plug``, ``caf_sharing#plug_ca`` and ``caf_sharing#proxy``.
String values ``"$._.env.X"`` resolve against the parent description's
``env`` and ``"process.env.X||default"`` against the process environment,
as in Caf.js: the value is read as JSON when it parses, so that numbers stay
numbers — except in the fields that are text (``redis.password``,
``redis.host``, ``nodeId``, ``persistService``, ``routeService``), which keep
the variable's text as it is (a default of ``null`` there means unset). A
component with ``"module": null`` is disabled; one with only
a ``name`` keeps the platform default (for the checkpoint service ``cp``:
Redis on localhost:6379).

A ``caf_redis#plug`` component may also carry ``env.durability``:
``{"waitReplicas": N, "waitTimeoutMs": T}`` (the backend options
``wait_replicas``/``wait_timeout_ms``: a commit is acknowledged only once N
replicas hold it, else it raises
:class:`~caf_sharing.errors.DurabilityError`). Only the component named by
``persistService`` matters: commits go there.

The result is a :class:`SharingConfig`, whose ``node()`` builds a
:class:`~caf_sharing.node.Node`. Python users can skip all this and pass a
backend URL and keyword arguments to ``Node`` directly.

No error names a secret: errors name the component and the field, and show a
value only when it is a number or a name (a module, a component, a variable).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from .errors import ConfigError

if TYPE_CHECKING:
    from .node import Node

__all__ = ["SharingConfig", "load_ca", "load_config", "load_framework"]

REDIS_PLUG = "caf_redis#plug"
SHARING_PLUG = "caf_sharing#plug"
SHARING_PLUG_CA = "caf_sharing#plug_ca"
SHARING_PROXY = "caf_sharing#proxy"
_KNOWN_MODULES = {REDIS_PLUG, SHARING_PLUG, SHARING_PLUG_CA, SHARING_PROXY}

#: What a name-only ``cp`` component stands for (Caf.js platform default).
_DEFAULT_REDIS_ENV: dict[str, Any] = {
    "nodeId": None,
    "redis": {"host": "localhost", "port": 6379, "password": None},
    "coalescing": {"interval": 10, "maxPendingUpdates": 20},
}
#: Caf.js CA defaults for the ``$._.env`` references of the seed's ca.json.
DEFAULT_CA_ENV: dict[str, Any] = {"maxRetries": 10, "retryDelay": 1000}
#: Fields (paths inside a component's env) whose ``process.env`` value stays text:
#: a password of digits is still a password.
_TEXT_FIELDS = {("redis", "password"), ("redis", "host"), ("nodeId",), ("persistService",),
                ("routeService",)}


@dataclass(frozen=True, slots=True)
class SharingConfig:
    """Everything needed to build a Node from Caf.js configuration."""

    url: str
    node_id: str | None = None
    #: Keyword arguments for the backend (password kept out of ``url``).
    options: dict[str, Any] = field(default_factory=dict)

    def node(self, **overrides: Any) -> Node:
        from .node import Node

        kwargs: dict[str, Any] = {"node_id": self.node_id, **self.options, **overrides}
        return Node(self.url, **kwargs)

    def __repr__(self) -> str:  # never show the password
        shown = {k: ("***" if k == "password" and v else v) for k, v in self.options.items()}
        return f"SharingConfig(url={self.url!r}, node_id={self.node_id!r}, options={shown!r})"


def load_config(framework: Any, ca: Any = None, *,
                parent_env: Mapping[str, Any] | None = None) -> SharingConfig:
    """Read a framework description and, optionally, a CA description."""
    config = load_framework(framework)
    if ca is None:
        return config
    retries = load_ca(ca, parent_env=parent_env)
    return SharingConfig(config.url, config.node_id, {**config.options, **retries})


def load_framework(source: Any) -> SharingConfig:
    """The backend a ``framework.json`` describes (its ``caf_sharing#plug``)."""
    desc = _load(source, "framework")
    components, env = _components(desc, "framework")
    by_name: dict[str, dict[str, Any]] = {}
    for comp in components:
        by_name[comp["name"]] = comp
    sharing = [c for c in components if c.get("module") == SHARING_PLUG]
    if len(sharing) != 1:
        raise ConfigError(
            f"framework: expected one component with module {SHARING_PLUG!r}, "
            f"found {len(sharing)}")
    senv = _resolve(sharing[0].get("env", {}), env, f"component {sharing[0]['name']!r}")
    services = {}
    for key in ("persistService", "routeService"):
        ref = senv.get(key)
        if not isinstance(ref, str):
            raise ConfigError(
                f"component {sharing[0]['name']!r}: env.{key} is missing or not a string")
        if ref not in by_name:
            raise ConfigError(
                f"component {sharing[0]['name']!r}: env.{key} names {ref!r}, "
                "which is not a component")
        services[key] = _redis_settings(by_name[ref], env)
    persist, route = services["persistService"], services["routeService"]
    if (persist["host"], persist["port"]) != (route["host"], route["port"]):
        raise ConfigError(
            "persistService and routeService must name the same Redis server "
            f"({persist['host']}:{persist['port']} vs {route['host']}:{route['port']}); "
            "caf-sharing opens the separate pub/sub connection itself")
    options: dict[str, Any] = {
        "coalescing_interval": persist["interval"] / 1000.0,
        "max_pending_updates": persist["max_pending"],
    }
    if persist["password"]:
        options["password"] = persist["password"]
    options.update(persist["durability"])
    url = f"redis://{persist['host']}:{persist['port']}/0"
    return SharingConfig(url, persist["node_id"] or route["node_id"], options)


def load_ca(source: Any, *, parent_env: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Retry settings of a ``ca.json``'s ``caf_sharing#plug_ca`` component, as
    backend options (``max_retries``, ``retry_delay`` in seconds)."""
    desc = _load(source, "ca")
    env = dict(DEFAULT_CA_ENV if parent_env is None else parent_env)
    plug = _find_module(desc, SHARING_PLUG_CA)
    if plug is None:
        raise ConfigError(f"ca: no component with module {SHARING_PLUG_CA!r}")
    where = f"component {plug.get('name')!r}"
    penv = _resolve(plug.get("env", {}), env, where)
    retries = _number(penv, "maxRetries", where, integer=True)
    delay = _number(penv, "retryDelay", where)
    for index, child in enumerate(plug.get("components", []) or []):
        _check_component(child, f"ca: {where}", index)
        if child.get("module") not in (SHARING_PROXY, None):
            raise ConfigError(
                f"{where}: sub-component {child['name']!r} has module {child.get('module')!r}; "
                f"only {SHARING_PROXY!r} belongs there")
    return {"max_retries": int(retries), "retry_delay": delay / 1000.0}


# -- helpers -------------------------------------------------------------------


def _load(source: Any, what: str) -> Any:
    if isinstance(source, dict | list):
        return source
    if isinstance(source, Path) or (isinstance(source, str) and not _looks_like_json(source)):
        try:
            text = Path(source).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{what}: cannot read {source}: {exc.strerror}") from None
    elif isinstance(source, str):
        text = source
    else:
        raise ConfigError(f"{what}: expected a path, JSON text, dict or list, "
                          f"got {type(source).__name__}")
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as first:
        # The seed's snippets are bare, comma-separated components.
        try:
            return orjson.loads("[" + text + "]")
        except orjson.JSONDecodeError:
            raise ConfigError(f"{what}: not valid JSON: {first}") from None


def _looks_like_json(text: str) -> bool:
    """Whether a str source is JSON text rather than a path. Generous on
    purpose: a text taken for a path would land, secrets and all, in the
    "cannot read" message."""
    return text.lstrip().startswith(("{", "[")) or "\n" in text or "{" in text


def _components(desc: Any, what: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    if isinstance(desc, list):
        components, env = desc, {}
    elif isinstance(desc, dict):
        components, env = desc.get("components", []), desc.get("env", {})
    else:
        raise ConfigError(f"{what}: expected a description object or a list of components")
    if not isinstance(components, list):
        raise ConfigError(f"{what}: 'components' must be a list")
    if not isinstance(env, dict):
        raise ConfigError(f"{what}: 'env' must be an object")
    for index, comp in enumerate(components):
        _check_component(comp, what, index)
    return [c for c in components if not ("module" in c and c["module"] is None)], env


def _check_component(comp: Any, what: str, index: int) -> None:
    # Never the component itself in the message: its env may hold a password.
    if not isinstance(comp, dict):
        raise ConfigError(f"{what}: component #{index} must be an object, "
                          f"got {_kind(comp)}")
    if not isinstance(comp.get("name"), str):
        got = "none" if "name" not in comp else _kind(comp["name"])
        module = comp.get("module")
        known = f" (module {module!r})" if isinstance(module, str) and \
            module in _KNOWN_MODULES else ""
        raise ConfigError(f"{what}: every component needs a string 'name'; component "
                          f"#{index}{known} has {got}")
    module = comp.get("module")
    if module is not None and not (isinstance(module, str) and module in _KNOWN_MODULES):
        shown = repr(module) if isinstance(module, str) else _kind(module)
        raise ConfigError(
            f"{what}: component {comp['name']!r} has unknown module {shown} "
            f"(known: {', '.join(sorted(_KNOWN_MODULES))})")
    if "env" in comp and not isinstance(comp["env"], dict):
        raise ConfigError(f"component {comp['name']!r}: 'env' must be an object")


def _find_module(desc: Any, module: str) -> dict[str, Any] | None:
    if isinstance(desc, dict):
        if desc.get("module") == module:
            return desc
        desc = desc.get("components", [])
    if isinstance(desc, list):
        for index, comp in enumerate(desc):
            _check_component(comp, "ca", index)
            found = _find_module(comp, module)
            if found is not None:
                return found
    return None


def _redis_settings(comp: dict[str, Any], parent_env: dict[str, Any]) -> dict[str, Any]:
    where = f"component {comp['name']!r}"
    if "module" not in comp:
        if comp["name"] != "cp":
            raise ConfigError(f"{where} has no module and no platform default")
        env = _DEFAULT_REDIS_ENV
    elif comp["module"] != REDIS_PLUG:
        raise ConfigError(f"{where} has module {comp['module']!r}, expected {REDIS_PLUG!r}")
    else:
        env = _resolve(comp.get("env", {}), parent_env, where)
    redis = env.get("redis")
    if not isinstance(redis, dict):
        raise ConfigError(f"{where}: env.redis is missing or not an object")
    host = redis.get("host")
    if not isinstance(host, str) or not host:
        raise ConfigError(f"{where}: env.redis.host is missing or not a string")
    port = _number(redis, "port", f"{where} env.redis", integer=True)
    if not 0 < port < 65536:
        raise ConfigError(f"{where}: env.redis.port {port} is out of range")
    password = redis.get("password")
    if password is not None and not isinstance(password, str):
        raise ConfigError(f"{where}: env.redis.password must be a string or null")
    coalescing = env.get("coalescing", _DEFAULT_REDIS_ENV["coalescing"])
    if not isinstance(coalescing, dict):
        raise ConfigError(f"{where}: env.coalescing must be an object")
    interval = _number(coalescing, "interval", f"{where} env.coalescing")
    max_pending = _number(coalescing, "maxPendingUpdates", f"{where} env.coalescing",
                          integer=True)
    if max_pending < 1:
        raise ConfigError(f"{where}: env.coalescing.maxPendingUpdates must be >= 1")
    node_id = env.get("nodeId")
    if node_id is not None and not isinstance(node_id, str):
        raise ConfigError(f"{where}: env.nodeId must be a string")
    return {"host": host, "port": int(port), "password": password, "interval": interval,
            "max_pending": int(max_pending), "node_id": node_id,
            "durability": _durability(env.get("durability", {}), where)}


#: ``env.durability`` fields of a ``caf_redis#plug`` -> backend options.
_DURABILITY = {"waitReplicas": "wait_replicas", "waitTimeoutMs": "wait_timeout_ms"}


def _durability(durability: Any, where: str) -> dict[str, int]:
    if not isinstance(durability, dict):
        raise ConfigError(f"{where}: env.durability must be an object")
    unknown = sorted(set(durability) - set(_DURABILITY))
    if unknown:
        raise ConfigError(f"{where}: env.durability has unknown field(s) {', '.join(unknown)} "
                          f"(known: {', '.join(_DURABILITY)})")
    options: dict[str, int] = {}
    for key, option in _DURABILITY.items():
        if key in durability:
            value = int(_number(durability, key, f"{where} env.durability", integer=True))
            if key == "waitTimeoutMs" and value < 1:
                raise ConfigError(f"{where}: env.durability.waitTimeoutMs must be >= 1 "
                                  "(WAIT 0 would wait for ever)")
            options[option] = value
    return options


def _number(env: Mapping[str, Any], key: str, where: str, *, integer: bool = False) -> float:
    value = env.get(key)
    if value is None:
        raise ConfigError(f"{where}: {key} is missing")
    if isinstance(value, bool) or not isinstance(value, int | float) or (
            integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        got = repr(value) if isinstance(value, float) else _kind(value)
        raise ConfigError(f"{where}: {key} must be {kind}, got {got}")
    if value < 0:
        raise ConfigError(f"{where}: {key} must be >= 0, got {value!r}")
    return value


def _kind(value: Any) -> str:
    """What a value is, for an error message that must not show it."""
    if value is None:
        return "null"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _resolve(value: Any, parent_env: Mapping[str, Any], where: str,
             path: tuple[str, ...] = ()) -> Any:
    """Replace ``$._.env.X`` and ``process.env.X||default`` strings, recursively;
    ``path`` is where ``value`` sits in the component's env (see _TEXT_FIELDS)."""
    if isinstance(value, dict):
        return {k: _resolve(v, parent_env, where, (*path, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, parent_env, where, path) for v in value]
    if isinstance(value, str) and value.startswith("$._.env."):
        key = value[len("$._.env."):]
        if key not in parent_env:
            raise ConfigError(f"{where}: {value!r} refers to {key!r}, "
                              "which the parent env does not define")
        found = parent_env[key]
        if isinstance(found, str) and found.startswith("process.env."):
            return _resolve(found, parent_env, where, path)
        return found
    if isinstance(value, str) and value.startswith("process.env."):
        name, _, default = value[len("process.env."):].partition("||")
        raw = os.environ.get(name)
        text = path in _TEXT_FIELDS
        if raw is not None and text:
            return raw
        if raw is None:
            if not default:
                raise ConfigError(f"{where}: environment variable {name} is not set")
            raw = default
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return raw
        return raw if text and parsed is not None else parsed
    return value
