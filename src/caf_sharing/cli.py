"""The ``caf-sharing`` command: ``demo``, ``ls``, ``inspect`` and ``watch`` (and ``--version``).

Every command takes any backend URL, a Redis Cluster's
(``redis+cluster://host:port,...``) included; on a cluster the demo spreads
its actors over the shards and says where each landed.

Errors the user can act on (an unreachable backend, a map that does not
exist, a bad option) print as one line on stderr with exit status 2; a demo
that observed a violated guarantee exits with status 1.

Nothing printed shows a backend password: URLs appear as
:func:`~caf_sharing.backends.redact_url` masks them, and the demo's
``--processes`` children get the URL on stdin, never on their command line
(which ``ps`` shows to every user). ``--backend`` defaults to the
environment variable ``CAF_SHARING_URL``, so that a password need not be on
the command line of the ``caf-sharing`` process itself either.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import orjson

from ._version import __version__
from .backends import DEFAULT_URL, URL_VARIABLE, Backend, default_url, make_backend
from .errors import MapNotFoundError, SharingError

__all__ = ["main"]

#: What ``--backend`` of ``demo`` is without it and without ``$CAF_SHARING_URL``.
DEFAULT_BACKEND = DEFAULT_URL
#: Seconds between two looks for a map ``watch`` waits for.
WATCH_POLL = 0.2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="caf-sharing",
        description="Sharing Actors: replicated, versioned, single-writer maps.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="run the hello-world scenario and check the guarantees",
        description="An admin actor increments a counter in its map; reader actors on "
                    "another node replicate it. Prints propagation latency and checks "
                    "monotonic reads, readers isolation and convergence. On a Redis "
                    "Cluster the actors spread over the shards.")
    demo.add_argument("--backend", default=default_url(),
                      help=f"backend URL, e.g. redis://host:6379/0 or "
                           f"redis+cluster://host1:port1,host2:port2 (default: ${URL_VARIABLE}, "
                           f"else {DEFAULT_BACKEND}, in-process, no server)")
    demo.add_argument("--readers", type=_positive, default=4, help="reader actors (default 4)")
    demo.add_argument("--commits", type=_positive, default=200,
                      help="counter increments (default 200)")
    demo.add_argument("--processes", type=_non_negative, default=0,
                      help="run the readers in K child processes (needs a Redis backend)")
    demo.add_argument("--interval", type=float, default=1.0,
                      help="milliseconds between commits (default 1)")
    demo.add_argument("--app", default=None, help="application namespace (default: random)")
    demo.add_argument("--metrics", action="store_true",
                      help="print the Prometheus exposition of the demo's nodes at the end "
                           "(needs caf-sharing[prometheus])")
    demo.add_argument("--keep", action="store_true",
                      help="leave the demo's data in the store for an hour (default: delete "
                           "it at the end)")
    demo.add_argument("--timeout", type=float, default=60.0,
                      help="seconds before giving up (default 60)")

    inspect = sub.add_parser("inspect", help="print a map's version and contents",
                             description="Print a map's version and contents as JSON.")
    inspect.add_argument("name", help="full map name, owner-local-map")
    _backend_args(inspect)

    ls = sub.add_parser("ls", help="list the maps and actors an app holds",
                        description="List the maps (name, version, keys, bytes) and the "
                                    "actors (checkpoint txid, lease holder, lease time left) "
                                    "the store holds, for one app or, without --app, for "
                                    "every app. Reads in small steps (SCAN, never KEYS).")
    _backend_args(ls, app_default=None)
    ls.add_argument("--json", action="store_true", help="one JSON object a line")

    watch = sub.add_parser("watch", help="stream a map's change sets as they arrive",
                           description="Print the map's version, then each change set "
                                       "published for it, one JSON object a line. A map "
                                       "that does not exist yet is waited for.")
    watch.add_argument("name", help="full map name, owner-local-map")
    _backend_args(watch)
    watch.add_argument("--count", type=_positive, default=None,
                       help="stop after N change sets")
    watch.add_argument("--timeout", type=float, default=None, help="stop after S seconds")

    # Internal: a --processes child. It reads the backend URL from stdin.
    reader = sub.add_parser("_demo-reader")
    reader.add_argument("--app", required=True)
    reader.add_argument("--last-version", type=int, required=True)
    reader.add_argument("--timeout", type=float, required=True)
    reader.add_argument("names", nargs="+")
    return parser


def _backend_args(parser: argparse.ArgumentParser, app_default: str | None = "default") -> None:
    from_env = os.environ.get(URL_VARIABLE)
    parser.add_argument("--backend", required=not from_env, default=from_env,
                        help="backend URL, e.g. redis://host:6379/0 or "
                             "redis+cluster://host1:port1,host2:port2 (default: "
                             f"${URL_VARIABLE}; it keeps a password off the command line)")
    parser.add_argument("--app", default=app_default,
                        help="application namespace (default: "
                             + (f"{app_default})" if app_default else "every app)"))


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _progress(done: int, total: int) -> None:
    if sys.stderr.isatty():
        width = 30
        filled = width * done // total
        sys.stderr.write(f"\rcommits [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done == total:
            sys.stderr.write("\n")
    elif done == total or done % max(1, total // 4) == 0:
        sys.stderr.write(f"commits {done}/{total}\n")
    sys.stderr.flush()


async def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    print(f"caf-sharing demo: 1 admin, {args.readers} readers, {args.commits} commits on "
          f"{make_backend(args.backend).url}"
          + (f", readers in {args.processes} processes" if args.processes else ""),
          file=sys.stderr)
    result = await run_demo(args.backend, readers=args.readers, commits=args.commits,
                            processes=args.processes, app=args.app, timeout=args.timeout,
                            interval=args.interval / 1000.0, keep=args.keep,
                            metrics=args.metrics,
                            progress=_progress)
    print(result.table())
    if result.metrics:
        print("\n" + result.metrics, end="")
    return 0 if result.ok else 1


async def _inspect(args: argparse.Namespace) -> int:
    backend = make_backend(args.backend, app=args.app)
    await backend.start()
    try:
        dump = await backend.read_map(args.name)
        if dump is None:
            raise MapNotFoundError(args.name, await _apps_holding(backend, args.name))
    finally:
        await backend.close()
    add = dump["add"]
    contents = {add[i]: add[i + 1] for i in range(0, len(add), 2)}
    version = contents.pop("__ca_version__", 0)
    print(json.dumps({"name": args.name, "version": version, "contents": contents},
                     indent=2, sort_keys=True))
    return 0


async def _watch(args: argparse.Namespace) -> int:
    backend = make_backend(args.backend, app=args.app)
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    await backend.start()
    try:
        await backend.subscribe(args.name, queue.put_nowait)
        dump = await backend.read_map(args.name)
        if dump is None:
            print(f"caf-sharing watch: map {args.name!r} does not exist yet in app "
                  f"{args.app!r}; waiting for it", file=sys.stderr, flush=True)
            try:
                async with asyncio.timeout(args.timeout):
                    while dump is None:
                        # Change sets published meanwhile stay queued for below.
                        await asyncio.sleep(WATCH_POLL)
                        dump = await backend.read_map(args.name)
            except TimeoutError:
                raise MapNotFoundError(args.name, f"waited {args.timeout:g}s for it") from None
        add = dump["add"]
        version = next((add[i + 1] for i in range(0, len(add), 2)
                        if add[i] == "__ca_version__"), 0)
        print(json.dumps({"name": args.name, "version": version}), flush=True)
        seen = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(args.timeout):
                while args.count is None or seen < args.count:
                    data = await queue.get()
                    try:
                        changes: Any = orjson.loads(data)
                    except orjson.JSONDecodeError:
                        changes = {"malformed": data.decode("utf-8", "replace")}
                    print(orjson.dumps(changes).decode(), flush=True)
                    seen += 1
    finally:
        await backend.close()
    return 0


async def _apps_holding(backend: Backend, name: str) -> str:
    """Where else a map called ``name`` exists, as a hint for a missing one."""
    maps, _ = await backend.survey(every_app=True)
    apps = sorted({m.app for m in maps if m.name == name})
    if not apps:
        return "no app holds a map of that name"
    return f"it exists in app(s) {', '.join(apps)}: add --app {apps[0]}"


async def _ls(args: argparse.Namespace) -> int:
    backend = make_backend(args.backend, app=args.app or "default")
    await backend.start()
    try:
        maps, actors = await backend.survey(every_app=args.app is None)
    finally:
        await backend.close()
    if args.json:
        for item in maps:
            print(json.dumps({"map": item.name, "app": item.app, "version": item.version,
                              "keys": item.keys, "bytes": item.bytes}))
        for actor in actors:
            print(json.dumps({"actor": actor.name, "app": actor.app, "txid": actor.txid,
                              "holder": actor.holder, "ttl": actor.ttl}))
        return 0
    for app in sorted({m.app for m in maps} | {a.app for a in actors}):
        print(f"app {app}")
        app_maps = [m for m in maps if m.app == app]
        if app_maps:
            print(f"  {'map':<40}{'version':>18}{'keys':>10}{'bytes':>12}")
            for m in app_maps:
                print(f"  {m.name:<40}{m.version:>18}{m.keys:>10}{m.bytes:>12}")
        app_actors = [a for a in actors if a.app == app]
        if app_actors:
            print(f"  {'actor':<40}{'checkpoint txid':<24}{'lease holder':<24}{'ttl left':>9}")
            for a in app_actors:
                ttl = f"{a.ttl:.1f}s" if a.ttl is not None else "-"
                print(f"  {a.name:<40}{a.txid or '-':<24}{a.holder or '-':<24}{ttl:>9}")
    if not maps and not actors:
        print("nothing stored" + (f" in app {args.app}" if args.app else ""))
    return 0


async def _reader(args: argparse.Namespace) -> int:
    from .demo import run_reader_process

    backend = sys.stdin.readline().rstrip("\n")
    await run_reader_process(backend, args.app, args.names, args.last_version, args.timeout,
                             sys.stdout)
    return 0


_COMMANDS = {"demo": _demo, "ls": _ls, "inspect": _inspect, "watch": _watch,
             "_demo-reader": _reader}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(_COMMANDS[args.command](args))
    except KeyboardInterrupt:
        return 130
    except (SharingError, ValueError, OSError) as exc:
        print(f"caf-sharing {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
