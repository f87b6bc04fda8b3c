"""A throwaway ``redis-server`` for tests and benchmarks.

:class:`RedisServer` runs the ``redis-server`` found on PATH on a free
loopback port, in a temporary directory, without persistence (``--save ""
--appendonly no``): a restart brings it back empty, on the same port. It never
touches a server the machine may run on 6379.

    server = RedisServer()
    server.start()              # waits until PING answers
    server.url                  # redis://127.0.0.1:<port>/0
    server.kill_pubsub_clients()
    server.restart()            # same port, no data
    server.stop()

``password=`` sets ``--requirepass``; ``unix_socket=True`` also listens on
``server.unix_path``; ``tls=(cert, key)`` also serves TLS on
``server.tls_port``; other ``redis-server`` arguments (ACL ``--user``
lines...) go in ``extra_args``. ``freeze()``/``thaw()`` (SIGSTOP/SIGCONT)
make a server that keeps its connections but answers nothing.

Data loss, as a Redis without AOF meets it:

    old = server.snapshot()     # SAVE, then a copy of dump.rdb kept aside
    ...                         # more writes
    server.restart_from(old)    # same port, back to the snapshot's data
    server.crash()              # SIGKILL: no shutdown, nothing saved
    server.start()              # empty again
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import redis

__all__ = ["RedisServer", "RedisServerError", "find_redis_server", "free_port"]


class RedisServerError(RuntimeError):
    """redis-server is missing, would not start, or died."""


def find_redis_server() -> str | None:
    """The path of the redis-server binary on PATH, if any."""
    return shutil.which("redis-server")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    #: The file the server loads at start and writes on SAVE (``--dbfilename``).
    DBFILENAME = "dump.rdb"

    def __init__(self, extra_args: Sequence[str] = (), *, password: str | None = None,
                 unix_socket: bool = False, tls: tuple[str, str] | None = None,
                 binary: str | None = None, startup_timeout: float = 10.0) -> None:
        found = binary or find_redis_server()
        if found is None:
            raise RedisServerError("redis-server is not on PATH")
        self.binary = found
        self.port = free_port()
        self.password = password
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.dir = Path(tempfile.mkdtemp(prefix="caf-redis-"))
        self.log_path = self.dir / "redis.log"
        #: The server's Unix socket, when ``unix_socket`` is set.
        self.unix_path = self.dir / "redis.sock" if unix_socket else None
        #: (certificate, key) PEM files: also serve TLS on ``tls_port``.
        self.tls = tls
        self.tls_port = free_port() if tls else None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def dump_path(self) -> Path:
        return self.dir / self.DBFILENAME

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RedisServerError("redis-server is not running")
        return self._proc.pid

    def start(self) -> None:
        """Start an empty server (a dump left by ``snapshot`` is not loaded)."""
        if self.running:
            return
        self.dump_path.unlink(missing_ok=True)
        self._launch()

    def _launch(self) -> None:
        """Start the server on whatever ``dump_path`` holds (nothing: empty)."""
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.dir),
                "--dbfilename", self.DBFILENAME,
                "--logfile", str(self.log_path), "--daemonize", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        if self.unix_path:
            args += ["--unixsocket", str(self.unix_path), "--unixsocketperm", "700"]
        if self.tls:
            cert, key = self.tls
            args += ["--tls-port", str(self.tls_port), "--tls-cert-file", cert,
                     "--tls-key-file", key, "--tls-ca-cert-file", cert,
                     "--tls-auth-clients", "no"]
        args += self.extra_args
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._proc.poll() is not None:
                stderr = self._proc.stderr.read().decode(errors="replace") \
                    if self._proc.stderr else ""
                raise RedisServerError(
                    f"redis-server exited with {self._proc.returncode}: {stderr.strip()} "
                    f"{self._log_tail()}")
            if self._ping():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RedisServerError(
                    f"redis-server did not answer PING on port {self.port} within "
                    f"{self.startup_timeout}s {self._log_tail()}")
            time.sleep(0.02)

    def _log_tail(self) -> str:
        try:
            return "; log: " + self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                if self.password:
                    sock.sendall(f"AUTH {self.password}\r\n".encode())
                    if not sock.recv(64).startswith(b"+OK"):
                        return False
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server (its data is gone: nothing is persisted)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)  # in case it was frozen
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr:
            proc.stderr.close()

    def restart(self) -> None:
        """Stop and start again on the same port: an empty server."""
        self.stop()
        self.start()

    def snapshot(self) -> Path:
        """``SAVE`` the data set now and keep a copy of the dump aside; pass
        the returned path to ``restart_from``. ``--save ""`` only turns off
        automatic snapshots: an explicit ``SAVE`` still writes ``dump_path``."""
        with self.client() as client:
            client.save()
        kept = self.dir / f"snapshot-{uuid.uuid4().hex[:12]}.rdb"
        shutil.copyfile(self.dump_path, kept)
        return kept

    def restart_from(self, snapshot: Path) -> None:
        """Stop, then start on the same port with the data of ``snapshot``
        (from ``snapshot()``): a server that came back behind what it had
        acknowledged, as after a crash without AOF."""
        if not snapshot.is_file():
            raise RedisServerError(f"no snapshot file at {snapshot}")
        self.stop()
        shutil.copyfile(snapshot, self.dump_path)
        self._launch()

    def crash(self) -> None:
        """SIGKILL the server: no shutdown, nothing saved. ``start()`` brings
        it back empty, ``restart_from`` with older data."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()

    def freeze(self) -> None:
        """SIGSTOP the server: connections stay open, nothing is answered."""
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def client(self) -> redis.Redis:
        """A plain synchronous redis-py client of this server."""
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password)

    def kill_pubsub_clients(self) -> int:
        """``CLIENT KILL TYPE pubsub``; returns how many were killed."""
        with self.client() as client:
            killed: int = client.client_kill_filter(_type="pubsub")
            return killed

    def cleanup(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()
