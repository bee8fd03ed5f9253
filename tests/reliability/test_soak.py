"""Chaos soak: thousands of keys, hundreds of clients, random cancellations, a storage that lies.

Bounded in time and count; stops by itself. In CI it runs ~25 s; standalone, longer::

    python -m tests.reliability.test_soak --seconds 300 [--keys 5000 --clients 500 --seed 7 --sqlite]

The storage (:class:`keyhive.testing.FaultyStorage`, seeded) adds latency, fails loads
and saves at random, tears writes (stores a prefix and reports success) and serves stale
reads (the checkpoint before the last write). Agents raise in handlers, stop themselves,
sleep in handlers. Clients get, call, cast, attach, touch, stop, and cancel their own
operations at random points.

Invariants, checked while running and at the end:

1. never two live incarnations of a key (every ``started``/``thawed`` event is matched by
   a ``stopped`` before the next one);
2. every stored write of a key has a higher version and a counter at least as high as the
   write before (older state never overwrites newer);
3. a torn write is always detected on thaw (``ThawError``, never a wrong state) and the
   torn bytes are never overwritten;
4. a ``ConflictError`` / ``CONFLICT`` stop only happens to a key that got a stale read (or
   a torn write whose reply was lost); a write that landed with its reply lost is not a
   conflict;
5. a ``ThawError`` only happens on a failed load or a torn checkpoint;
6. no acknowledged state is lost: for every key without a torn write or stale read, the
   final stored counter is at least the highest value any ``call`` acknowledged;
7. an exception in a handler reaches the caller and the agent keeps running;
8. every error a client sees is one the API documents;
9. after close: no task left, memory back to its baseline (tracemalloc, with tolerance).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import random
import tempfile
import time
import tracemalloc
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

import keyhive
from keyhive._events import Event, EventKind
from keyhive._keys import storage_key
from keyhive.codecs import unpack
from keyhive.testing import FaultyStorage

NAME = "soak"


class Chaotic(keyhive.Agent):
    """A counter that also raises, sleeps and stops itself on request."""

    def initial_state(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"n": 0}

    async def handle(self, message: Any) -> Any:
        if message == "incr":
            self.state["n"] += 1
        elif message == "slow":
            await asyncio.sleep(random.random() * 0.005)
            self.state["n"] += 1
        elif message == "boom":
            raise RuntimeError("boom")
        elif message == "stop":
            self.stop()
        return self.state["n"]


class WatchedStorage(FaultyStorage):
    """FaultyStorage that checks every write that reaches the inner backend (invariant 2)."""

    def __init__(self, inner: Any, seed: int, report: Report) -> None:
        super().__init__(inner, seed=seed)
        self.report = report
        self.last: dict[str, tuple[int, int | None]] = {}

    async def _save_one(self, key: str, data: bytes, expected_version: int | None) -> int:
        version = await super()._save_one(key, data, expected_version)
        torn = key in self.faulted_keys.get("torn", ())
        n: int | None = None
        if not torn:
            n = orjson.loads(unpack(data)[1])["n"]
        prev = self.last.get(key)
        self.report.check()
        if prev is not None:
            if version <= prev[0]:
                self.report.violation(f"{key}: version went from {prev[0]} to {version}")
            if n is not None and prev[1] is not None and n < prev[1]:
                self.report.violation(f"{key}: stored counter went back from {prev[1]} to {n}")
        self.last[key] = (version, n if n is not None else (prev[1] if prev else None))
        return version


@dataclass
class Report:
    ops: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    cancels: int = 0
    checks: int = 0
    violations: list[str] = field(default_factory=list)

    def check(self, ok: bool = True, message: str = "") -> None:
        self.checks += 1
        if not ok:
            self.violation(message)

    def violation(self, message: str) -> None:
        self.violations.append(message)


class Soak:
    def __init__(self, *, seconds: float, keys: int, clients: int, seed: int, sqlite: bool) -> None:
        self.seconds = seconds
        self.keys = [f"k{i}" if i % 3 else (i, "tuple") for i in range(keys)]
        self.n_clients = clients
        self.rng = random.Random(seed)
        self.report = Report()
        self.tmp = tempfile.TemporaryDirectory(prefix="keyhive-soak-") if sqlite else None
        inner: Any
        if self.tmp is not None:
            from keyhive.storage.sqlite import SQLiteStorage

            inner = SQLiteStorage(f"{self.tmp.name}/soak.db")
        else:
            inner = keyhive.MemoryStorage()
        self.storage = WatchedStorage(inner, seed, self.report)
        self.acked: dict[Any, int] = {}
        self.live: Counter[Any] = Counter()
        self.conflict_keys: set[Any] = set()
        self.thaw_errors: list[tuple[Any, str]] = []  # text only: tracebacks would pin frames
        self.log_records: Counter[str] = Counter()

    def skey(self, key: Any) -> str:
        return storage_key(NAME, None, key)

    def manager(self) -> keyhive.InstanceManager:
        return keyhive.InstanceManager(
            NAME, Chaotic, idle_timeout=0.05, storage=self.storage, retry_backoff=(0.01, 0.05),
            close_timeout=30, hibernate_batch=64,
        )

    def on_event(self, event: Event) -> None:
        key = event.key
        if event.kind in (EventKind.STARTED, EventKind.THAWED):
            self.live[key] += 1
            self.report.check(self.live[key] == 1, f"{key!r}: two live incarnations")
        elif event.kind is EventKind.STOPPED:
            self.live[key] -= 1
            self.report.check(self.live[key] == 0, f"{key!r}: stopped twice")
            if event.reason is keyhive.StopReason.CONFLICT:
                self.conflict_keys.add(key)

    def pick(self) -> Any:
        # a skewed choice: a hot tenth of the keys gets half of the traffic
        keys = self.keys
        if self.rng.random() < 0.5:
            return keys[self.rng.randrange(max(1, len(keys) // 10))]
        return keys[self.rng.randrange(len(keys))]

    async def op(self, m: keyhive.InstanceManager, kind: str, key: Any) -> None:
        rng = self.rng
        if kind == "call":
            n = await m.call(key, rng.choice(["incr", "incr", "slow"]))
            self.acked[key] = max(self.acked.get(key, 0), n)
        elif kind == "cast":
            await (await m.get(key)).cast("incr")
        elif kind == "get":
            ref = await m.get(key)
            state = await ref.state()
            self.report.check(isinstance(state, dict) and isinstance(state.get("n"), int),
                              f"{key!r}: odd state {state!r}")
        elif kind == "lookup":
            await m.lookup(key)
        elif kind == "touch":
            ref = await m.lookup(key)
            if ref is not None:
                ref.touch()
        elif kind == "attach":
            async with m.attach(key) as ref:
                await asyncio.sleep(rng.random() * 0.02)
                ref.touch()
        elif kind == "stop":
            await m.stop(key)
        elif kind == "boom":
            ref = await m.get(key)
            try:
                await ref.call("boom")
            except RuntimeError as exc:
                self.report.check(str(exc) == "boom", f"{key!r}: {exc!r}")
            else:
                self.report.violation(f"{key!r}: a raising handler did not raise in the caller")
        elif kind == "self_stop":
            await m.call(key, "stop")

    OPS = (["call"] * 30 + ["cast"] * 10 + ["get"] * 15 + ["lookup"] * 5 + ["touch"] * 5
           + ["attach"] * 8 + ["stop"] * 5 + ["boom"] * 5 + ["self_stop"] * 3)
    EXPECTED = (keyhive.ThawError, keyhive.StorageError, keyhive.NotFound, keyhive.AgentStopped,
                keyhive.ManagerClosed, TimeoutError)

    async def client(self, m: keyhive.InstanceManager, deadline: float) -> None:
        rng = self.rng
        loop = asyncio.get_running_loop()
        while loop.time() < deadline:
            kind = rng.choice(self.OPS)
            key = self.pick()
            self.report.ops[kind] += 1
            task = loop.create_task(self.op(m, kind, key))
            if rng.random() < 0.1:
                await asyncio.sleep(rng.random() * 0.003)
                if task.cancel():
                    self.report.cancels += 1
            try:
                await task
            except asyncio.CancelledError:
                if not task.cancelled():
                    raise
            except keyhive.ThawError as exc:
                self.errors("ThawError")
                self.thaw_errors.append((key, f"{exc!r} from {exc.__cause__!r}"))
            except keyhive.ConflictError:
                self.errors("ConflictError")
                self.conflict_keys.add(key)
            except self.EXPECTED as exc:
                self.errors(type(exc).__name__)
            except Exception as exc:
                self.report.violation(f"{key!r} {kind}: unexpected {exc!r}")
            await asyncio.sleep(0)

    def errors(self, name: str) -> None:
        self.report.errors[name] += 1

    def chaos_on(self) -> None:
        s, rng = self.storage, self.rng
        s.load_error_rate, s.save_error_rate, s.torn_rate, s.stale_rate = 0.02, 0.03, 0.003, 0.01
        s.lost_reply_rate = 0.01
        s.load_delay = lambda: rng.random() * 0.002
        s.save_delay = lambda: rng.random() * 0.003

    async def run(self) -> Report:
        handler = _CountingHandler(self.log_records)
        log = logging.getLogger("keyhive")
        old = (log.propagate, log.level)
        log.addHandler(handler)
        log.propagate, log.level = False, logging.WARNING
        try:
            return await self._run()
        finally:
            log.removeHandler(handler)
            log.propagate, log.level = old

    async def _run(self) -> Report:
        loop = asyncio.get_running_loop()
        report = self.report
        # warm-up: every key written once, then the memory baseline
        async with self.manager() as m:
            for start in range(0, len(self.keys), 500):
                await asyncio.gather(*(m.call(k, "incr") for k in self.keys[start:start + 500]))
        self.acked = dict.fromkeys(self.keys, 1)
        gc.collect()
        baseline = tracemalloc.get_traced_memory()[0]

        m = self.manager()
        unsubscribe = m.subscribe(self.on_event)
        await m.start()
        self.chaos_on()
        deadline = loop.time() + self.seconds
        clients = [loop.create_task(self.client(m, deadline)) for _ in range(self.n_clients)]
        await asyncio.gather(*clients)
        self.storage.heal()
        self.storage.load_delay = self.storage.save_delay = 0.0
        try:
            await m.close()
        except keyhive.UnsavedAgentsError as exc:
            for (_, key), error in zip(exc.keys, exc.errors, strict=True):
                report.check(isinstance(error, keyhive.ConflictError), f"{key!r} unsaved: {error!r}")
                self.conflict_keys.add(key)
        unsubscribe()

        # invariant 1 at rest: nothing live
        report.check(all(v == 0 for v in self.live.values()), "live incarnations after close")
        # invariants 3-6 against the final stored bytes
        torn = self.storage.faulted_keys.get("torn", set())
        stale = self.storage.faulted_keys.get("stale", set())
        loaded = self.storage.faulted_keys.get("load", set())
        for key in self.conflict_keys:
            # a torn write whose reply was also lost cannot be told from another incarnation's
            report.check(self.skey(key) in stale or self.skey(key) in torn,
                         f"{key!r}: conflict without a stale read")
        for key, exc in self.thaw_errors:
            report.check(
                self.skey(key) in torn or self.skey(key) in loaded,
                f"{key!r}: ThawError without a failed load or torn write: {exc}",
            )
        for key in self.keys:
            sk = self.skey(key)
            cp = await self.storage.inner.load(sk)
            report.check(cp is not None, f"{key!r}: checkpoint vanished")
            if cp is None:
                continue
            try:
                n = orjson.loads(unpack(cp.data)[1])["n"]
            except keyhive.CodecError:
                report.check(sk in torn, f"{key!r}: unreadable checkpoint without a torn write")
                continue
            if sk in torn or sk in stale:
                continue
            report.check(n >= self.acked.get(key, 0),
                         f"{key!r}: acknowledged {self.acked.get(key)} but stored {n}")
        # torn checkpoints fail closed on a fresh manager, and stay as they are
        async with self.manager() as m2:
            for sk in list(torn)[:50]:
                cp = await self.storage.inner.load(sk)
                try:
                    unpack(cp.data)
                except keyhive.CodecError:
                    from keyhive._keys import decode_storage_key

                    key = decode_storage_key(sk)[2]
                    try:
                        await m2.get(key)
                    except keyhive.ThawError:
                        report.check()
                    else:
                        report.violation(f"{key!r}: torn checkpoint thawed")
                    after = await self.storage.inner.load(sk)
                    report.check(after == cp, f"{key!r}: torn checkpoint overwritten")
        # invariant 9: no task left, memory back to the baseline
        await asyncio.sleep(0)
        leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        report.check(not leftover, f"leaked tasks: {leftover[:5]}")
        del m, m2, clients
        gc.collect()
        await asyncio.sleep(0)  # let collected futures report to the exception handler
        grown = tracemalloc.get_traced_memory()[0] - baseline
        self.memory_growth = grown
        # the storage keeps one previous checkpoint per key for stale reads: allow for it
        report.check(grown < 8_000_000, f"memory grew by {grown} bytes after close")
        if self.tmp is not None:
            await self.storage.aclose()
            self.tmp.cleanup()
        return report

    def summary(self, elapsed: float) -> str:
        r = self.report
        f = self.storage.faults
        return (
            f"soak: {sum(r.ops.values())} operations in {elapsed:.1f}s "
            f"({len(self.keys)} keys, {self.n_clients} clients, {r.cancels} cancelled), "
            f"faults injected {sum(f.values())} (load {f['load']}, save {f['save']}, torn {f['torn']}, "
            f"stale {f['stale']}, lost reply {f['lost_reply']}), errors seen {sum(r.errors.values())}, "
            f"invariants checked {r.checks}, violations {len(r.violations)}, "
            f"memory after close +{self.memory_growth / 1e6:.1f} MB"
        )


class _CountingHandler(logging.Handler):
    def __init__(self, counts: Counter[str]) -> None:
        super().__init__(logging.WARNING)
        self.counts = counts

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[record.levelname] += 1


def soak(*, seconds: float, keys: int, clients: int, seed: int, sqlite: bool = False) -> tuple[Soak, str]:
    """Run one soak on a fresh event loop; return it and its summary line."""
    s = Soak(seconds=seconds, keys=keys, clients=clients, seed=seed, sqlite=sqlite)
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    loop = asyncio.new_event_loop()
    # anything asyncio would report (a lost task exception, a never-retrieved future) is a violation
    loop.set_exception_handler(lambda _loop, ctx: s.report.violation(f"asyncio: {ctx.get('message')} {ctx}"))
    started = time.monotonic()
    try:
        loop.run_until_complete(s.run())
    finally:
        with contextlib.suppress(Exception):
            loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        if not tracing:
            tracemalloc.stop()
    return s, s.summary(time.monotonic() - started)


def test_soak(capsys: pytest.CaptureFixture[str]) -> None:
    """A bounded chaos soak on memory storage: every invariant holds, zero violations, no leak."""
    s, line = soak(seconds=20, keys=3000, clients=300, seed=20261123)
    with capsys.disabled():
        print(f"\n{line}")
    assert s.report.violations == [], s.report.violations[:20]
    assert sum(s.report.ops.values()) > 10_000
    assert s.storage.faults["torn"] and s.storage.faults["stale"] and s.storage.faults["save"]
    assert s.storage.faults["lost_reply"]


def test_soak_on_sqlite(capsys: pytest.CaptureFixture[str]) -> None:
    """The same soak, shorter, with SQLite under the faults."""
    s, line = soak(seconds=8, keys=1000, clients=100, seed=7, sqlite=True)
    with capsys.disabled():
        print(f"\n{line} [sqlite]")
    assert s.report.violations == [], s.report.violations[:20]
    assert sum(s.report.ops.values()) > 2_000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="keyhive chaos soak")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--keys", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=300)
    parser.add_argument("--seed", type=int, default=random.randrange(2**32))
    parser.add_argument("--sqlite", action="store_true", help="SQLite under the faults instead of memory")
    args = parser.parse_args(argv)
    print(f"seed {args.seed}")
    s, line = soak(seconds=args.seconds, keys=args.keys, clients=args.clients, seed=args.seed,
                   sqlite=args.sqlite)
    print(line)
    for v in s.report.violations[:50]:
        print("VIOLATION", v)
    return 1 if s.report.violations else 0


if __name__ == "__main__":
    raise SystemExit(main())
