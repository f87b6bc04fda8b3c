"""Backend URLs and options: parsing, redaction, and real connections with a
password, an ACL user, a Unix socket and TLS."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from caf_sharing import Actor, Node
from caf_sharing.backends import (
    BackendURL,
    MemoryBackend,
    MemoryStore,
    make_backend,
    parse_url,
    redact_url,
)
from caf_sharing.backends.redis import RedisBackend
from caf_sharing.errors import BackendError, BackendUnavailableError, ConfigError
from conftest import require_redis_server
from redisserver import RedisServer, free_port
from test_backend_contract import MAP, as_dict, dump

SECRET = "s3cr€t:/@x"
QUOTED = "s3cr%E2%82%ACt%3A%2F%40x"


@pytest.mark.parametrize(("url", "expected"), [
    ("memory://", BackendURL("memory", redacted="memory://")),
    ("memory://shared.store-1", BackendURL("memory", name="shared.store-1",
                                           redacted="memory://shared.store-1")),
    ("redis://localhost", BackendURL("redis", host="localhost", port=6379,
                                     redacted="redis://localhost")),
    ("REDIS://h:7000/3", BackendURL("redis", host="h", port=7000, db=3,
                                    redacted="REDIS://h:7000/3")),
    (f"redis://:{QUOTED}@h/2", BackendURL("redis", host="h", port=6379, db=2,
                                           password=SECRET, redacted="redis://:***@h/2")),
    ("redis://ann:pw@[::1]:6390/0", BackendURL("redis", host="::1", port=6390, username="ann",
                                                password="pw",
                                                redacted="redis://ann:***@[::1]:6390/0")),
    ("rediss://h:6380/1?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem",
     BackendURL("rediss", host="h", port=6380, db=1,
                options={"ssl_cert_reqs": "required", "ssl_ca_certs": "/ca.pem"},
                redacted="rediss://h:6380/1?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem")),
    ("unix:///run/redis.sock?db=4&password=pw&username=ann",
     BackendURL("unix", path="/run/redis.sock", db=4, username="ann", password="pw",
                redacted="unix:///run/redis.sock?db=4&password=***&username=ann")),
    ("redis+cluster://10.0.0.1:7000,10.0.0.2:7001,[::1]",
     BackendURL("redis+cluster", host="10.0.0.1", port=7000,
                hosts=(("10.0.0.1", 7000), ("10.0.0.2", 7001), ("::1", 6379)),
                redacted="redis+cluster://10.0.0.1:7000,10.0.0.2:7001,[::1]")),
    (f"rediss+cluster://ann:{QUOTED}@h1:7000,h2:7000/0?wait_replicas=1&ssl_cert_reqs=none",
     BackendURL("rediss+cluster", host="h1", port=7000, hosts=(("h1", 7000), ("h2", 7000)),
                username="ann", password=SECRET,
                options={"wait_replicas": "1", "ssl_cert_reqs": "none"},
                redacted="rediss+cluster://ann:***@h1:7000,h2:7000/0?wait_replicas=1"
                         "&ssl_cert_reqs=none")),
])
def test_parse_url(url: str, expected: BackendURL) -> None:
    parsed = parse_url(url)
    assert parsed == expected
    if parsed.password:
        assert parsed.password not in str(parsed) and parsed.password not in repr(parsed)


@pytest.mark.parametrize(("url", "match"), [
    ("http://h", "unknown scheme 'http'"),
    ("redis:///0", "missing the host"),
    ("redis://h/zero", "database must be a number"),
    ("redis://h:99999", "port must be a number from 0 to 65535"),
    ("redis://h/0?db=1", "unknown query option 'db'"),
    ("rediss://h?ssl_cert_reqs=none&ssl_cert_reqs=none", "given twice"),
    ("memory://a/b/c d", "store name"),
    ("memory://name?x=1", r"unknown query option 'x' \(allowed: none\)"),
    ("memory://u:p@name", "takes only a store name"),
    ("unix://host/sock", "socket path"),
    ("unix://", "missing the socket path"),
    ("unix:///s?db=-1", "database must be a number"),
    ("redis://h#frag", "fragment"),
    ("redis+cluster://h:7000/1", "a Redis Cluster has only database 0; drop the /1"),
    ("redis+cluster://h:7000/x", "the path must be empty or /0"),
    ("redis+cluster://h:7000,h:port", "each node must be host:port"),
    ("redis+cluster://h:7000,,h2:7000", "missing a host"),
    ("redis+cluster://h:7000?ssl_cert_reqs=none", "unknown query option 'ssl_cert_reqs'"),
    ("redis+cluster://h:7000#x", "fragment"),
])
def test_bad_urls_are_refused_clearly(url: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_url(url)


def test_errors_about_a_url_never_show_its_password() -> None:
    with pytest.raises(ConfigError) as info:
        parse_url(f"redis://u:{QUOTED}@h/notadb")
    assert QUOTED not in str(info.value) and "***" in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse_url("unix:///s?password=hunter2&what=1")
    assert "hunter2" not in str(info.value)
    with pytest.raises(ConfigError, match=r"not a valid name or \[IPv6\] address") as info:
        parse_url("redis://:hunter2@[::1")
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(("url", "redacted"), [
    ("redis://user:pw@h:1/0", "redis://user:***@h:1/0"),
    ("redis://:pw@h", "redis://:***@h"),
    ("redis://h:1", "redis://h:1"),
    ("unix:///s?password=pw&db=1", "unix:///s?password=***&db=1"),
    ("not a url", "not a url"),
    ("redis+cluster://u:pw@h1:1,h2:2", "redis+cluster://u:***@h1:1,h2:2"),
    ("redis://ann:pw@[::1/0?password=x&db=1", "redis://ann:***@[::1/0?password=***&db=1"),
])
def test_redact_url(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


def test_make_backend_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="memory:// takes no options"):
        make_backend("memory://", max_retries=3)
    with pytest.raises(ConfigError, match=r"unknown option.*max_retry"):
        make_backend("redis://h", max_retry=3)
    with pytest.raises(ConfigError, match="invalid app"):
        make_backend("memory://", app="a{b}")
    with pytest.raises(ConfigError, match="max_retries"):
        make_backend("redis://h", max_retries=-1)
    with pytest.raises(ConfigError, match="max_pending_updates"):
        make_backend("redis://h", max_pending_updates=0)
    with pytest.raises(ConfigError, match="coalescing_interval"):
        make_backend("redis://h", coalescing_interval=float("nan"))
    with pytest.raises(ConfigError, match="need a rediss:// URL"):
        make_backend("redis://h", ssl_ca_certs="/ca.pem")
    with pytest.raises(ConfigError, match="ssl_cert_reqs"):
        make_backend("rediss://h?ssl_cert_reqs=maybe")
    backend = make_backend(f"redis://u:{QUOTED}@h:7/1", app="x")
    assert isinstance(backend, RedisBackend)
    assert backend.url == "redis://u:***@h:7/1" and QUOTED not in repr(backend)


async def test_memory_stores_are_shared_by_name_and_private_without() -> None:
    name = f"urls-{uuid.uuid4().hex[:8]}"
    a, b = make_backend(f"memory://{name}"), make_backend(f"memory://{name}")
    private1, private2 = make_backend("memory://"), make_backend("memory://")
    other_app = make_backend(f"memory://{name}", app="other")
    for backend in (a, b, private1, private2, other_app):
        await backend.start()
    try:
        assert isinstance(a, MemoryBackend) and isinstance(b, MemoryBackend)
        assert a.store is b.store
        await a.create_map(MAP)
        assert await b.read_map(MAP) is not None
        assert await other_app.read_map(MAP) is None  # app namespaces a store
        await private1.create_map(MAP)
        assert await private2.read_map(MAP) is None
        assert MemoryStore.drop(name) is True and MemoryStore.drop(name) is False
        fresh = make_backend(f"memory://{name}")
        await fresh.start()
        assert await fresh.read_map(MAP) is None
        assert await a.read_map(MAP) is not None  # open backends keep their store
        await fresh.close()
    finally:
        for backend in (a, b, private1, private2, other_app):
            await backend.close()
        MemoryStore.drop(name)


async def test_unreachable_server_reports_the_redacted_url() -> None:
    url = f"redis://ann:{QUOTED}@127.0.0.1:{free_port()}/0"
    backend = make_backend(url, max_retries=1, retry_delay=0.01, connect_timeout=0.5)
    with pytest.raises(BackendUnavailableError) as info:
        await backend.start()
    message = str(info.value)
    assert "redis://ann:***@127.0.0.1" in message and "2 attempts" in message
    assert QUOTED not in message and SECRET not in message
    await backend.close()


# -- real servers with authentication, a Unix socket, TLS ---------------------------


@pytest.fixture(scope="module")
def secured_server() -> Iterator[RedisServer]:
    require_redis_server()
    server = RedisServer(["--user", "default", "on", ">adminpw", "~*", "&*", "+@all",
                          "--user", "ann", "on", f">{SECRET}", "~caf:*", "&*", "+@all",
                          "--user", "mute", "on", ">mutepw", "~caf:*", "resetchannels",
                          "+@all",
                          # A node that only reads: it may not publish (see the README).
                          "--user", "reader", "on", ">readerpw", "~caf:*", "&*", "+@all",
                          "-publish", "-spublish"],
                         unix_socket=True)
    server.password = "adminpw"
    server.start()
    yield server
    server.cleanup()


async def roundtrip(url: str, **options: Any) -> None:
    backend = make_backend(url, app=f"u{uuid.uuid4().hex[:8]}", **options)
    await backend.start()
    try:
        await backend.create_map(MAP, dump(0, {"a": 1}))
        assert as_dict(await backend.read_map(MAP)) == {"a": 1, "__ca_version__": 0}
        got: list[bytes] = []
        await backend.subscribe(MAP, got.append)
        await backend.unsubscribe(MAP, got.append)
    finally:
        await backend.close()


@pytest.mark.redis
async def test_password_and_acl_user(secured_server: RedisServer) -> None:
    port = secured_server.port
    await roundtrip(f"redis://:adminpw@127.0.0.1:{port}/0")
    await roundtrip(f"redis://ann:{QUOTED}@127.0.0.1:{port}/0")
    await roundtrip(f"redis://127.0.0.1:{port}/0", username="ann", password=SECRET)
    wrong = make_backend(f"redis://ann:{QUOTED}x@127.0.0.1:{port}/0", max_retries=5)
    with pytest.raises(BackendUnavailableError, match="refused") as info:
        await wrong.start()  # at once: retrying a wrong password cannot help
    assert "x@" not in str(info.value) and SECRET not in str(info.value)
    await wrong.close()


@pytest.mark.redis
async def test_a_refused_subscription_fails_instead_of_hanging(
        secured_server: RedisServer) -> None:
    backend = make_backend(f"redis://mute:mutepw@127.0.0.1:{secured_server.port}/0",
                           app=f"u{uuid.uuid4().hex[:8]}")
    await backend.start()
    try:
        await backend.create_map(MAP)  # keys are allowed, channels are not
        with pytest.raises(BackendError, match=r"refused to subscribe: .*no permissions"):
            await backend.subscribe(MAP, print)
        with pytest.raises(BackendError, match="no permissions"):
            await backend.subscribe(MAP, print)
    finally:
        await backend.close()


class Publisher(Actor):
    async def init(self) -> None:
        self.sharing.add_writable_map("m", "m", initial_value={"n": 0})

    async def put(self, n: int) -> None:
        self.sharing.maps.m.set("n", n)


class Reader(Actor):
    async def init(self) -> None:
        self.sharing.add_read_only_map("m", "ann-pub-m")

    async def get(self) -> int:
        return self.sharing.maps.m.get("n")


@pytest.mark.redis
async def test_a_node_that_only_reads_needs_no_right_to_publish(
        secured_server: RedisServer) -> None:
    app, port = f"u{uuid.uuid4().hex[:8]}", secured_server.port
    async with Node(f"redis://:adminpw@127.0.0.1:{port}/0", app=app,
                    restart_grace=False) as writing, \
            Node(f"redis://reader:readerpw@127.0.0.1:{port}/0", app=app,
                 restart_grace=False) as reading:
        publisher = await writing.start(Publisher, "ann-pub")
        reader = await reading.start(Reader, "bob-reader")
        for n in (1, 2):
            await publisher.call("put", n)
            async with asyncio.timeout(5):
                while await reader.call("get") != n:
                    await asyncio.sleep(0.01)
        # What a forger on that node would send is refused, straight or by script.
        with redis.Redis(port=port, username="reader", password="readerpw") as client:
            channel = f"caf:{app}:{{ann-pub}}:chan:ann-pub-m"
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.spublish(channel, b"{}")
            with pytest.raises(redis.exceptions.ResponseError, match="can't run this command"):
                client.eval("return redis.call('SPUBLISH', KEYS[1], 'x')", 1, channel)


@pytest.mark.redis
async def test_unix_socket_with_a_database(secured_server: RedisServer) -> None:
    assert secured_server.unix_path is not None
    url = f"unix://{secured_server.unix_path}?db=3&password=adminpw"
    await roundtrip(url)
    app = f"u{uuid.uuid4().hex[:8]}"
    backend = make_backend(url, app=app)
    await backend.start()
    await backend.create_map(MAP)
    await backend.close()
    with secured_server.client() as client:
        client.select(3)
        assert client.keys(f"caf:{app}:*") == [f"caf:{app}:{{alice-admin}}:map:{MAP}".encode()]


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A self-signed server certificate and its key, and an unrelated one."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not on PATH: cannot make a test certificate")
    out = tmp_path_factory.mktemp("tls")
    files: dict[str, str] = {}
    for name in ("server", "stranger"):
        cert, key = out / f"{name}.pem", out / f"{name}.key"
        subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                       check=True, capture_output=True)
        files[name], files[f"{name}_key"] = str(cert), str(key)
    return files


@pytest.mark.redis
async def test_tls(tls_files: dict[str, str]) -> None:
    require_redis_server()
    cert = tls_files["server"]
    with RedisServer(tls=(cert, tls_files["server_key"])) as server:
        base = f"rediss://127.0.0.1:{server.tls_port}/0"
        await roundtrip(f"{base}?ssl_cert_reqs=required&ssl_ca_certs={cert}")
        await roundtrip(base, ssl_cert_reqs="required", ssl_ca_certs=cert)
        await roundtrip(f"{base}?ssl_cert_reqs=none")
        untrusted = make_backend(f"{base}?ssl_cert_reqs=required", max_retries=0,
                                 ssl_ca_certs=tls_files["stranger"])
        with pytest.raises(BackendUnavailableError, match="certificate verify failed"):
            await untrusted.start()
        await untrusted.close()
        plain = make_backend(f"redis://127.0.0.1:{server.tls_port}/0", max_retries=0,
                             socket_timeout=1.0, connect_timeout=1.0)
        with pytest.raises(BackendUnavailableError):
            await plain.start()
        await plain.close()
