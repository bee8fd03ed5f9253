"""D1-D3: what run-to-completion turns and durable turns cost (issue "turns that finish").

``python -m bench.durability [--quick] [--only D1,D2,D3] [--backends sqlite,redis,postgres]``
prints a table and ``--json PATH`` writes the rows. Each baseline is measured in the same run:

- **D1 call whose handler suspends once** (``await asyncio.sleep(0)``): ns per call through a
  held ref, beside the same handler that does not suspend, and beside the plain-asyncio floor
  (an ``asyncio.Lock`` around the same coroutine). Uses only the public API, so it runs against
  any keyhive version (``PYTHONPATH=<old checkout>/src``) for a before/after comparison.
- **D2 durable turns/s** with ``checkpoint="turn"``: 1,000 concurrent callers over 1,000 keys,
  each call returning only once its state is durable; beside the backend's raw batched write
  rate (``save_many`` in batches of 512, as S1's floor) in the same run. Target >= 0.4x.
- **D3 write-behind CPU per written agent** (``checkpoint=1.0``, 100,000 agents changing, SQLite),
  beside the CPU per agent of a hibernate storm of the same agents in the same run. Target <= 1.5x.
  CPU is ``time.process_time()`` (every thread, SQLite's worker included).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import keyhive

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import storage as storms  # noqa: E402

TARGETS = [
    ("D2 durable turns >= 0.4x the raw batched write rate", "D2 durable turns", 0.4),
    ("D3 write-behind CPU <= 1.5x a hibernate storm's, per agent", "D3 write-behind CPU", 1.5),
]


class Suspender(keyhive.Agent):
    """Counts; "yield" suspends once before it counts."""

    async def handle(self, message: Any) -> Any:
        if message == "yield":
            await asyncio.sleep(0)
        self.state["n"] = self.state.get("n", 0) + 1
        return self.state["n"]


def _row(workload: str, impl: str, value: float | None, unit: str, n: int, **extra: Any) -> dict[str, Any]:
    return {"workload": workload, "impl": impl, "value": value, "unit": unit, "n": n, **extra}


async def d1(quick: bool) -> list[dict[str, Any]]:
    n = 20_000 if quick else 200_000
    rows = []
    async with keyhive.InstanceManager(f"d1-{time.monotonic_ns()}", Suspender, storage=None) as m:
        ref = await m.get("k")
        for message, label in (("yield", "suspends once"), ("plain", "never suspends")):
            best = float("inf")
            for _ in range(3):  # the best of three
                gc.collect()
                t0 = time.perf_counter()
                for _ in range(n):
                    await ref.call(message)
                best = min(best, (time.perf_counter() - t0) / n * 1e9)
            rows.append(_row(f"D1 call, handler {label}", "keyhive", best, "ns/call", n))
    lock = asyncio.Lock()
    state = {"n": 0}

    async def handler(message: str) -> int:
        if message == "yield":
            await asyncio.sleep(0)
        state["n"] += 1
        return state["n"]

    for message, label in (("yield", "suspends once"), ("plain", "never suspends")):
        best = float("inf")
        for _ in range(3):
            gc.collect()
            t0 = time.perf_counter()
            for _ in range(n):
                async with lock:
                    await handler(message)
            best = min(best, (time.perf_counter() - t0) / n * 1e9)
        rows.append(_row(f"D1 call, handler {label}", "floor", best, "ns/call", n,
                         note="asyncio.Lock around the same coroutine"))
    return rows


async def _durable_turns(make: Any, n_calls: int) -> float:
    keys = [f"t{i}" for i in range(1000)]
    async with storms._opened(make) as storage, keyhive.InstanceManager(
            f"d2-{time.monotonic_ns()}", Suspender, storage=storage, checkpoint="turn") as m:
            refs = [await m.get(k) for k in keys]
            for r in refs:  # warm-up: every key written once
                await r.call("plain")
            per = n_calls // len(refs)

            async def caller(ref: Any) -> None:
                for _ in range(per):
                    await ref.call("plain")

            gc.collect()
            t0 = time.perf_counter()
            await asyncio.gather(*(caller(r) for r in refs))
            elapsed = time.perf_counter() - t0
            stored = await storage.load(keyhive._keys.storage_key(m.name, None, keys[0]))
            if stored is None:
                raise RuntimeError("D2: nothing was written")
            return per * len(refs) / elapsed


async def d2(quick: bool, backends: tuple[str, ...]) -> list[dict[str, Any]]:
    n_calls = 20_000 if quick else 100_000
    rows = []
    for backend in backends:
        label = f"D2 durable turns ({backend})"
        try:
            server = storms._server(backend)
            url = server.__enter__()
        except storms._skip_types() as exc:
            rows.append(_row(label, "keyhive", None, "turns/s", n_calls, note=f"not run: {exc}"))
            continue
        try:
            with tempfile.TemporaryDirectory(prefix="keyhive-bench-") as tmp:
                make = storms._storage_factory(backend, url, tmp)
                rows.append(_row(label, "keyhive", await _durable_turns(make, n_calls), "turns/s", n_calls,
                                 note="checkpoint='turn', 1,000 callers over 1,000 keys"))
                make = storms._storage_factory(backend, url, tmp)
                rows.append(_row(label, "floor", await storms.s1_floor(make, n_calls), "turns/s", n_calls,
                                 note="raw save_many, batches of 512"))
        finally:
            server.__exit__(None, None, None)
    return rows


async def d3(quick: bool) -> list[dict[str, Any]]:
    n = 10_000 if quick else 100_000
    rows = []
    with tempfile.TemporaryDirectory(prefix="keyhive-bench-") as tmp:
        make = storms._storage_factory("sqlite", None, tmp)
        async with storms._opened(make) as storage:
            name = f"d3-{time.monotonic_ns()}"
            async with keyhive.InstanceManager(name, Suspender, storage=storage, checkpoint=1.0) as m:
                refs = [await m.get(i, initial_state=storms.STATE) for i in range(n)]
                best = float("inf")
                for round_ in range(3):  # every agent changes; the first round also creates the rows
                    before = m._core.counters["writes"]
                    for r in refs:
                        await r.call("plain")
                    gc.collect()
                    c0 = time.process_time()
                    while m._core.counters["writes"] - before < n:  # noqa: ASYNC110  # polls a counter
                        await asyncio.sleep(0.05)
                    if round_:
                        best = min(best, time.process_time() - c0)
            rows.append(_row("D3 write-behind CPU", "keyhive", best / n * 1e6, "us CPU/agent", n,
                             note="checkpoint=1.0 on SQLite, every agent changed, batched flush"))
            # the baseline: the same agents, changed, hibernating together (close's drain)
            storm = keyhive.InstanceManager(name, Suspender, storage=storage)
            await storm.start()
            for i in range(n):
                await (await storm.get(i)).call("plain")
            gc.collect()
            c0 = time.process_time()
            await storm.close()
            cpu = time.process_time() - c0
        rows.append(_row("D3 write-behind CPU", "hibernate storm", cpu / n * 1e6, "us CPU/agent", n,
                         note="the same agents, changed, hibernating at close in batches of 512"))
    return rows


async def run(quick: bool, only: set[str], backends: tuple[str, ...]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if not only or "D1" in only:
        rows += await d1(quick)
    if not only or "D2" in only:
        rows += await d2(quick, backends)
    if not only or "D3" in only:
        rows += await d3(quick)
    return rows


def print_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Print rows with keyhive/baseline ratios; return the target checks."""
    by: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["workload"], {})[r["impl"]] = r
    print(f"{'workload':<40} {'impl':<16} {'value':>12}  unit")
    for workload, impls in by.items():
        for impl, r in impls.items():
            v = r["value"]
            print(f"{workload:<40} {impl:<16} {'-' if v is None else f'{v:,.1f}':>12}  {r['unit']}"
                  + (f"  ({r['note']})" if r.get("note") else ""))
    checks = []
    for label, prefix, limit in TARGETS:
        for workload, impls in by.items():
            if not workload.startswith(prefix):
                continue
            k = impls.get("keyhive", {}).get("value")
            base = next((r["value"] for i, r in impls.items() if i != "keyhive"), None)
            if k is None or not base:
                continue
            ratio = k / base
            ok = ratio >= limit if prefix.startswith("D2") else ratio <= limit
            checks.append({"target": f"{label} [{workload}]", "ratio": round(ratio, 3), "met": ok})
            print(f"{'MET ' if ok else 'MISS'} {label} [{workload}]: {ratio:.2f}x")
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.durability", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="", help="D1,D2,D3")
    parser.add_argument("--backends", default=",".join(storms.BACKENDS))
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    only = {w.strip().upper() for w in args.only.split(",") if w.strip()}
    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    rows = asyncio.run(run(args.quick, only, backends))
    checks = print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "checks": checks}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
