"""Bounds (SPEC §13): ``python -m bench.bounds [--quick] [--json out.json] [--only B1,B2,B3]``.

* **B1** ``max_live=100,000``, 1,000,000 ``get`` cycling over 200,000 keys (memory storage):
  every get past the first 100,000 is a miss that evicts one agent. Target: at least
  100,000 activations + evictions per second.
* **B2** W2's hot ``get`` of a live key, with and without ``max_live``, in one run.
  Target: with ``max_live`` at most 20 ns slower.
* **B3** ``manager.stored_keys()`` over 1,000,000 SQLite checkpoints (the database built
  with one ``executemany``). Target: at least 200,000 keys/s, in constant memory (the
  RSS growth while streaming is reported).

Rates are given by wall time and by process CPU time (the machine may be shared).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import keyhive
from keyhive._keys import storage_key
from keyhive.codecs import pack
from keyhive.storage.sqlite import SQLiteStorage

from .memory import rss
from .workloads import Counter


def _row(name: str, value: float, unit: str, n: int, **extra: Any) -> dict[str, Any]:
    return {"workload": name, "value": value, "unit": unit, "n": n, **extra}


async def b1(quick: bool) -> list[dict[str, Any]]:
    cap, nkeys, n = (10_000, 20_000, 100_000) if quick else (100_000, 200_000, 1_000_000)
    keys = [f"k{i}" for i in range(nkeys)]
    async with keyhive.InstanceManager("bench-b1", Counter, storage=keyhive.MemoryStorage(),
                                       idle_timeout=3600, max_live=cap) as m:
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(n):
            await m.get(keys[i % nkeys])
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        stats = await m.stats()
    started, evicted = stats.counters["started"], stats.counters["evicted"]
    both = started + evicted
    return [
        _row("B1 max_live: activations + evictions", both / wall, "per s", n, cpu_rate=both / cpu,
             activations=started, evictions=evicted, live_at_end=stats.total, target=">= 100,000"),
        _row("B1 max_live: gets (all but the first cap are misses)", n / wall, "gets/s", n, cpu_rate=n / cpu),
    ]


async def b2(quick: bool) -> list[dict[str, Any]]:
    nkeys, rounds = (10_000, 10) if quick else (100_000, 10)
    keys = [f"h{i}" for i in range(nkeys)]
    cycle = keys * rounds
    same = ["h0"] * len(cycle)
    results: dict[tuple[str, str], float] = {}
    for label, cap in (("without max_live", None), ("max_live=200,000", 200_000),
                       ("without max_live", None), ("max_live=200,000", 200_000)):
        async with keyhive.InstanceManager(f"bench-b2-{label}", Counter, storage=None, idle_timeout=3600,
                                           max_live=cap) as m:
            for k in keys:
                await m.get(k)
            for what, seq in (("same key", same), ("cycling keys", cycle)):
                gc.collect()
                t0 = time.process_time()
                for k in seq:
                    await m.get(k)  # looked up each time, as callers do
                ns = (time.process_time() - t0) / len(seq) * 1e9
                results[what, label] = min(ns, results.get((what, label), ns))
    rows = []
    for what in ("same key", "cycling keys"):
        base, capped = results[what, "without max_live"], results[what, "max_live=200,000"]
        rows.append(_row(f"B2 hot get ({what}), without max_live", base, "ns/op", len(cycle)))
        rows.append(_row(f"B2 hot get ({what}), max_live=200,000", capped, "ns/op", len(cycle),
                         delta_ns=capped - base, target="<= +20 ns"))
    return rows


def _build_db(path: Path, name: str, n: int) -> None:
    """``n`` checkpoints in one executemany (the table exists: one save made it)."""
    data = pack(1, b'{"count":0}')
    now = time.time()
    with sqlite3.connect(path) as conn:
        conn.executemany(
            "INSERT INTO keyhive_checkpoints (key, data, version, updated_at) VALUES (?, ?, 1, ?)",
            ((storage_key(name, None, f"user-{i:07}"), data, now) for i in range(n)))


async def b3(quick: bool) -> list[dict[str, Any]]:
    n = 100_000 if quick else 1_000_000
    name = "bench-b3"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "b3.db"
        storage = SQLiteStorage(path)
        await storage.save(storage_key(name, None, "user-seed"), pack(1, b"{}"), expected_version=None)
        await storage.aclose()
        await asyncio.to_thread(_build_db, path, name, n)
        async with keyhive.InstanceManager(name, Counter, storage=f"sqlite:///{path}") as m:
            gc.collect()
            base = rss()
            peak = 0
            count = 0
            t0, c0 = time.perf_counter(), time.process_time()
            async for _record in m.stored_keys():
                count += 1
                if count % 50_000 == 0:
                    peak = max(peak, rss() - base)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return [_row("B3 stored_keys over SQLite", count / wall, "keys/s", count, cpu_rate=count / cpu,
                 rss_growth_bytes=peak, target=">= 200,000 keys/s, constant memory")]


BENCHES = {"B1": b1, "B2": b2, "B3": b3}


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| workload | value | unit | by CPU time | notes |", "|---|---:|---|---:|---|"]
    for r in rows:
        notes = ", ".join(f"{k}={v:,.0f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                          if k not in ("workload", "value", "unit", "n", "cpu_rate"))
        cpu = f"{r['cpu_rate']:,.0f}" if "cpu_rate" in r else ""
        lines.append(f"| {r['workload']} | {r['value']:,.1f} | {r['unit']} | {cpu} | {notes} |")
    return "\n".join(lines)


async def run(only: set[str], quick: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name, bench in BENCHES.items():
        if not only or name in only:
            t0 = time.perf_counter()
            rows.extend(await bench(quick))
            print(f"[{name} done in {time.perf_counter() - t0:.1f}s]", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bounds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small N, for CI")
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    parser.add_argument("--only", metavar="B1,B3", default="", help="run only these")
    args = parser.parse_args(argv)
    only = {w.strip().upper() for w in args.only.split(",") if w.strip()}
    if only - set(BENCHES):
        parser.error(f"unknown: {', '.join(sorted(only - set(BENCHES)))}")
    rows = asyncio.run(run(only, args.quick))
    print(_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
