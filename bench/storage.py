"""S1/S2 storage storms (issue 3) on SQLite, Redis and PostgreSQL, with the raw backend floor.

``python -m bench.storage [--quick] [--only sqlite,redis,postgres]``, or through
``python -m bench`` (which calls :func:`run`).

- **S1 hibernate storm**: N agents with 500-byte states (``--quick``: 5,000; else 100,000)
  idle out at once; hibernations/s from the first idle-out until the last agent has stopped
  (its checkpoint durable in the backend). The ``floor`` row is the backend alone:
  ``storage.save_many`` of the same N checkpoints in batches of the manager's
  ``hibernate_batch``.
- **S2 thaw storm**: N cold ``get``s of those hibernated keys from 1,000 concurrent tasks
  through a fresh manager; thaws/s. The ``floor`` row is ``storage.load`` of the same keys
  from 1,000 tasks.

Rows follow ``bench/report.py``: ``impl`` is ``keyhive`` or ``floor``, the backend is in the
workload name (and in ``backend``), so the table shows keyhive/floor. Everything is wall
time: the backend's work happens in other processes (Redis, PostgreSQL) or in SQLite's
worker thread. The servers are private ones started here (``tests/storage/servers.py``)
with their durable settings: PostgreSQL with fsync and ``synchronous_commit=on``, Redis
with ``appendonly yes`` / ``appendfsync everysec``; SQLite in WAL with
``synchronous=normal`` (the defaults of ``SQLiteStorage``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import keyhive
from keyhive import SaveItem
from keyhive._keys import storage_key
from keyhive.codecs import pack

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the server helpers live with the tests
    sys.path.insert(0, str(ROOT))

from tests.storage import servers  # noqa: E402

BACKENDS = ("sqlite", "redis", "postgres")
BATCH = 512  # the manager's default hibernate_batch
CONCURRENCY = 1000
IDLE = 1.0  # seconds; every agent's timer starts within a few ms of the others
STATE = {"pad": "x" * 470}  # + {"i": n} -> about 500 bytes of JSON

_names = itertools.count()

# Issue 3's targets, in bench/report.py's TARGETS form: (label, workload, compared with, test).
TARGETS: list[tuple[str, str, str | None, Callable[[float, float], bool]]] = [
    ("S1 SQLite >= 60,000 hibernations/s", "S1 hibernate storm (sqlite)", None, lambda k, _: k >= 60_000),
    ("S1 Redis >= 30,000 hibernations/s", "S1 hibernate storm (redis)", None, lambda k, _: k >= 30_000),
    ("S1 PostgreSQL >= 25,000 hibernations/s", "S1 hibernate storm (postgres)", None,
     lambda k, _: k >= 25_000),
    ("S2 SQLite >= 30,000 thaws/s", "S2 thaw storm (sqlite)", None, lambda k, _: k >= 30_000),
]


class StormAgent(keyhive.Agent):
    """An agent whose state is about 500 bytes of JSON."""

    async def handle(self, message: Any) -> Any:
        if message == "touch":  # a change, so that the hibernate has something to write
            self.state["n"] = self.state.get("n", 0) + 1
        return self.state.get("i")


def row(workload: str, impl: str, backend: str, value: float | None, unit: str, n: int,
        **extra: Any) -> dict[str, Any]:
    return {"workload": workload, "impl": impl, "backend": backend, "value": value, "unit": unit,
            "n": n, **extra}


def _skip_types() -> tuple[type[BaseException], ...]:
    try:
        import pytest
    except ImportError:  # pragma: no cover - the dev extra has it
        return (RuntimeError,)
    return (RuntimeError, pytest.skip.Exception)


@contextlib.contextmanager
def _server(backend: str) -> Iterator[str | None]:
    """The URL of a private durable server for ``backend`` (None for SQLite)."""
    if backend == "sqlite":
        yield None
    elif backend == "redis":
        with servers.redis_server("--appendonly", "yes", "--appendfsync", "everysec") as server:
            yield server.url
    else:
        with servers.postgres_server(durable=True) as server:
            yield server.url


def _storage_factory(backend: str, url: str | None, tmp: str) -> Callable[[], Any]:
    """A function that opens a new handle on one fresh, private namespace of the backend."""
    tag = uuid.uuid4().hex[:12]
    if backend == "sqlite":
        from keyhive.storage.sqlite import SQLiteStorage

        path = Path(tmp) / f"storm-{tag}.db"
        return lambda: SQLiteStorage(path)
    if backend == "redis":
        from keyhive.storage.redis import RedisStorage

        assert url is not None
        return lambda: RedisStorage.from_url(url, key_prefix=f"bench-{tag}:")
    from keyhive.storage.postgres import PostgresStorage

    assert url is not None
    return lambda: PostgresStorage.from_url(url, table=f"bench_{tag}", pool_max=20)


@contextlib.asynccontextmanager
async def _opened(make: Callable[[], Any]) -> AsyncIterator[Any]:
    storage = make()
    try:
        yield storage
    finally:
        await storage.aclose()


async def _gather_split(n: int, work: Callable[[int], Any]) -> None:
    """Run ``work(i)`` for i in range(n) from CONCURRENCY tasks."""

    async def worker(start: int) -> None:
        for i in range(start, n, CONCURRENCY):
            await work(i)

    await asyncio.gather(*(worker(s) for s in range(min(CONCURRENCY, n))))


async def s1_keyhive(make: Callable[[], Any], name: str, n: int) -> float:
    """N agents idle out at once; hibernations/s from the first idle-out to the last stop."""
    first_idle: list[float] = []
    last_stop = 0.0
    stopped = 0
    all_stopped = asyncio.Event()

    def on_event(event: keyhive.Event) -> None:
        nonlocal stopped, last_stop
        if event.kind == "idle" and not first_idle:
            first_idle.append(time.perf_counter())
        elif event.kind == "stopped":
            stopped += 1
            if stopped == n:
                last_stop = time.perf_counter()
                all_stopped.set()

    async with _opened(make) as storage:
        manager = keyhive.InstanceManager(name, StormAgent, storage=storage, idle_timeout=IDLE,
                                          hibernate_batch=BATCH)
        async with manager:
            owner = object()
            refs = []
            for i in range(n):  # attached, so none idles out while the others start
                ref = await manager.get(i, initial_state={**STATE, "i": i})
                await ref.attach(owner)
                await ref.call("touch")
                refs.append(ref)
            manager.subscribe(on_event)
            gc.collect()
            for ref in refs:  # every idle timer starts now, within a few ms
                await ref.detach(owner)
            del refs
            await asyncio.wait_for(all_stopped.wait(), 60 + n / 1000)
            if (await manager.stats()).count:
                raise RuntimeError("S1: agents left after the storm")
    return n / (last_stop - first_idle[0])


async def s2_keyhive(make: Callable[[], Any], name: str, n: int) -> float:
    """N cold gets of hibernated keys from CONCURRENCY tasks; thaws/s."""
    async with _opened(make) as storage:
        manager = keyhive.InstanceManager(name, StormAgent, storage=storage, idle_timeout=None,
                                          close_timeout=120 + n / 1000)
        async with manager:
            thawed = 0

            def on_event(event: keyhive.Event) -> None:
                nonlocal thawed
                thawed += event.kind == "thawed"

            manager.subscribe(on_event)
            gc.collect()
            t0 = time.perf_counter()
            await _gather_split(n, manager.get)
            elapsed = time.perf_counter() - t0
            if thawed != n:
                raise RuntimeError(f"S2: {thawed} of {n} gets thawed a checkpoint")
            probe = await manager.get(n // 2)
            if await probe.call("i") != n // 2:
                raise RuntimeError("S2: a thawed state is wrong")
    return n / elapsed


async def s1_floor(make: Callable[[], Any], n: int) -> float:
    """The backend alone: save_many of N new 500-byte checkpoints in batches of BATCH."""
    import orjson

    items = [SaveItem(storage_key("floor", None, i), pack(1, orjson.dumps({**STATE, "i": i})), None)
             for i in range(n)]
    async with _opened(make) as storage:
        await storage.save_many([SaveItem("warm-up", b"", None)])  # connect, create the table, load scripts
        gc.collect()
        t0 = time.perf_counter()
        for start in range(0, n, BATCH):
            results = await storage.save_many(items[start:start + BATCH])
            if any(not isinstance(r, int) for r in results):
                raise RuntimeError(f"S1 floor: a save failed: {results[:3]}")
        return n / (time.perf_counter() - t0)


async def s2_floor(make: Callable[[], Any], n: int) -> float:
    """The backend alone: load of those N checkpoints from CONCURRENCY tasks."""
    keys = [storage_key("floor", None, i) for i in range(n)]
    async with _opened(make) as storage:
        await storage.load("warm-up")
        missing = 0

        async def load(i: int) -> None:
            nonlocal missing
            missing += await storage.load(keys[i]) is None

        gc.collect()
        t0 = time.perf_counter()
        await _gather_split(n, load)
        elapsed = time.perf_counter() - t0
        if missing:
            raise RuntimeError(f"S2 floor: {missing} keys missing")
        return n / elapsed


async def run_backend(backend: str, quick: bool, n: int | None = None) -> list[dict[str, Any]]:
    """S1 and S2 on one backend: keyhive and floor rows (value None and a note when skipped)."""
    n = n or (5_000 if quick else 100_000)
    s1, s2 = f"S1 hibernate storm ({backend})", f"S2 thaw storm ({backend})"
    try:
        server = _server(backend)
        url = server.__enter__()
    except _skip_types() as exc:
        note = f"not run: {exc}"
        return [row(s1, "keyhive", backend, None, "ops/s", n, note=note),
                row(s2, "keyhive", backend, None, "ops/s", n, note=note)]
    try:
        with tempfile.TemporaryDirectory(prefix="keyhive-bench-") as tmp:
            make = _storage_factory(backend, url, tmp)
            name = f"storm-{next(_names)}"
            rows = [row(s1, "keyhive", backend, await s1_keyhive(make, name, n), "ops/s", n,
                        note="hibernations/s: idle-out to durable checkpoint, 500-byte states")]
            rows.append(row(s1, "floor", backend, await s1_floor(make, n), "ops/s", n,
                            note=f"storage.save_many alone, batches of {BATCH}"))
            rows.append(row(s2, "keyhive", backend, await s2_keyhive(make, name, n), "ops/s", n,
                            note=f"thaws/s: cold gets, {CONCURRENCY} concurrent"))
            rows.append(row(s2, "floor", backend, await s2_floor(make, n), "ops/s", n,
                            note=f"storage.load alone, {CONCURRENCY} concurrent"))
            return rows
    finally:
        server.__exit__(None, None, None)


async def run(quick: bool, backends: tuple[str, ...] = BACKENDS) -> list[dict[str, Any]]:
    """S1 and S2 on every backend, keyhive and the raw backend floor (rows for bench/report.py)."""
    rows: list[dict[str, Any]] = []
    for backend in backends:
        t0 = time.perf_counter()
        rows.extend(await run_backend(backend, quick))
        print(f"[S1/S2 {backend} done in {time.perf_counter() - t0:.1f}s]", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.storage", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5,000 agents instead of 100,000")
    parser.add_argument("--only", default=",".join(BACKENDS), help="backends, e.g. sqlite,redis")
    args = parser.parse_args(argv)
    backends = tuple(b.strip() for b in args.only.split(",") if b.strip())
    if set(backends) - set(BACKENDS):
        parser.error(f"unknown backends: {', '.join(sorted(set(backends) - set(BACKENDS)))}")
    rows = asyncio.run(run(args.quick, backends))
    by: dict[str, dict[str, Any]] = {}
    for r in rows:
        by.setdefault(r["workload"], {})[r["impl"]] = r
    print(f"{'workload':<32} {'keyhive':>10} {'floor':>10} {'k/floor':>8}  unit")
    for workload, impls in by.items():
        k, f = impls.get("keyhive", {}).get("value"), impls.get("floor", {}).get("value")
        ratio = f"{k / f:.2f}x" if k and f else ""
        print(f"{workload:<32} {k or 0:>10,.0f} {f or 0:>10,.0f} {ratio:>8}  ops/s"
              + ("" if k else f"  ({impls['keyhive'].get('note')})"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
