"""Caf.js configuration files: the seed's examples load as they are."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from caf_sharing import Node
from caf_sharing.backends.redis import RedisBackend
from caf_sharing.config import load_ca, load_config, load_framework
from caf_sharing.errors import ConfigError

DATA = Path(__file__).parent / "data"
FRAMEWORK = DATA / "seed-framework.json"
CA = DATA / "seed-ca.json"


def framework_components() -> list[dict]:
    return json.loads("[" + FRAMEWORK.read_text() + "]")


def test_seed_framework_loads_as_is() -> None:
    config = load_framework(FRAMEWORK)
    assert config.url == "redis://localhost:6379/0"
    assert config.node_id == "default"
    assert config.options == {"coalescing_interval": 0.01, "max_pending_updates": 20}


def test_seed_ca_resolves_parent_env() -> None:
    assert load_ca(CA) == {"max_retries": 10, "retry_delay": 1.0}
    assert load_ca(CA, parent_env={"maxRetries": 3, "retryDelay": 250}) == {
        "max_retries": 3, "retry_delay": 0.25}


def test_full_config_builds_a_node() -> None:
    config = load_config(FRAMEWORK, CA, parent_env={"maxRetries": 2, "retryDelay": 50})
    node = config.node(node_id="n1")
    assert isinstance(node, Node)
    assert node.node_id == "n1"
    assert node.backend.url == "redis://localhost:6379/0"


def test_password_never_shown() -> None:
    comps = framework_components()
    comps[1]["env"]["redis"]["password"] = "s3cret"
    comps[2]["env"]["persistService"] = "cp2"
    config = load_framework(comps)
    assert config.options["password"] == "s3cret"
    assert "s3cret" not in repr(config) and "s3cret" not in config.url


def test_accepts_a_full_description_and_text() -> None:
    desc = {"name": "top", "env": {"port": 7000},
            "components": framework_components()}
    desc["components"][1]["env"]["redis"]["port"] = "$._.env.port"
    desc["components"][0] = {"name": "cp", "module": "caf_redis#plug",
                             "env": copy.deepcopy(desc["components"][1]["env"])}
    assert load_framework(desc).url == "redis://localhost:7000/0"
    assert load_framework(json.dumps(desc)).url == "redis://localhost:7000/0"


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda c: c[1].update(module="caf_redis#nope"), "unknown module 'caf_redis#nope'"),
    (lambda c: c[2]["env"].pop("routeService"), "env.routeService is missing"),
    (lambda c: c[2]["env"].update(routeService="cp9"), "names 'cp9'"),
    (lambda c: c[1]["env"]["redis"].pop("host"), "env.redis.host is missing"),
    (lambda c: c[1]["env"]["redis"].update(port="6379"), "port must be an integer"),
    (lambda c: c[1]["env"]["redis"].update(port=70000), "out of range"),
    (lambda c: c[1]["env"]["coalescing"].update(interval=-1), "interval must be >= 0"),
    (lambda c: c[1]["env"]["coalescing"].pop("maxPendingUpdates"), "maxPendingUpdates"),
    (lambda c: c[1]["env"]["redis"].update(port=6380), "same Redis server"),
    (lambda c: c.pop(2), "expected one component"),
    (lambda c: c.append({"module": "caf_sharing#plug"}), "string 'name'"),
])
def test_framework_errors_name_the_problem(mutate, message) -> None:
    comps = framework_components()
    mutate(comps)
    with pytest.raises(ConfigError, match=message):
        load_framework(comps)


def test_ca_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(ConfigError, match="'maxRetries', which the parent env"):
        load_ca(CA, parent_env={"retryDelay": 1})
    bad = json.loads(CA.read_text())
    bad["components"][0]["module"] = "caf_sharing#other"
    with pytest.raises(ConfigError, match="unknown module 'caf_sharing#other'"):
        load_ca(bad)
    bad = json.loads(CA.read_text())
    bad["env"]["maxRetries"] = 1.5
    with pytest.raises(ConfigError, match="maxRetries must be an integer"):
        load_ca(bad)
    with pytest.raises(ConfigError, match="no component with module"):
        load_ca([{"name": "x", "module": "caf_sharing#proxy"}])
    with pytest.raises(ConfigError, match="cannot read"):
        load_ca(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_ca(tmp_path / "broken.json")


def test_process_env_references(monkeypatch) -> None:
    comps = framework_components()
    comps[1]["env"]["redis"]["host"] = "process.env.CAF_TEST_HOST||localhost"
    assert load_framework(comps).url == "redis://localhost:6379/0"
    monkeypatch.setenv("CAF_TEST_HOST", "localhost")
    comps[1]["env"]["redis"]["port"] = "process.env.CAF_TEST_PORT"
    with pytest.raises(ConfigError, match="CAF_TEST_PORT is not set"):
        load_framework(comps)
    monkeypatch.setenv("CAF_TEST_PORT", "6379")
    assert load_framework(comps).url == "redis://localhost:6379/0"


def test_durability_of_the_persist_service_becomes_backend_options() -> None:
    comps = framework_components()
    comps[1]["env"]["durability"] = {"waitReplicas": 1, "waitTimeoutMs": 500}
    # On the routeService only, it means nothing: commits go to persistService.
    assert "wait_replicas" not in load_framework(comps).options
    comps[2]["env"]["persistService"] = "cp2"
    config = load_framework(comps)
    assert config.options["wait_replicas"] == 1 and config.options["wait_timeout_ms"] == 500
    backend = config.node(node_id="n1").backend
    assert isinstance(backend, RedisBackend)
    assert (backend.settings.wait_replicas, backend.settings.wait_timeout_ms) == (1, 500)


@pytest.mark.parametrize(("durability", "message"), [
    ([1], "env.durability must be an object"),
    ({"replicas": 1}, "unknown field.*replicas.*known: waitReplicas, waitTimeoutMs"),
    ({"waitReplicas": "1"}, "waitReplicas must be an integer"),
    ({"waitReplicas": -1}, "waitReplicas must be >= 0"),
    ({"waitReplicas": 1, "waitTimeoutMs": 0}, "waitTimeoutMs must be >= 1"),
    ({"waitReplicas": 1, "waitTimeoutMs": 2.5}, "waitTimeoutMs must be an integer"),
])
def test_durability_errors_name_the_problem(durability, message) -> None:
    comps = framework_components()
    comps[1]["env"]["durability"] = durability
    comps[2]["env"]["persistService"] = "cp2"
    with pytest.raises(ConfigError, match=message):
        load_framework(comps)
