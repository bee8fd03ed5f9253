"""``python -m bench.pubsub [--quick] [--json out.json]``: one agent publishing to 1,000 subscribers.

P1 measures event deliveries per second (events published x subscribers that received them)
in one process: an agent whose turns each publish a burst of events (``self.publish``) to
1,000 subscribers, each one an ``async for`` over ``ref.subscribe()`` in its own consumer
task. The baseline in the same run is the hand-rolled hub it replaces: a loop of
``put_nowait`` over 1,000 ``asyncio.Queue`` objects, each drained by ``await queue.get()``.
Both publishers yield to the loop after each burst, so every consumer drains what the burst
left (a burst stays below ``subscriber_buffer``: nobody overflows). Rows at bursts of 1 (every
event wakes every consumer) and 100 show what the wake-ups cost. Target: >= 1,000,000
deliveries/s at a burst of 100.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import keyhive

SUBSCRIBERS = 1000
TARGET = 1_000_000  # deliveries/s, keyhive at a burst of 100


class Publisher(keyhive.Agent):
    """Publishes ``n`` events in one turn."""

    async def handle(self, message: Any) -> Any:
        publish = self.publish
        for i in range(message):
            publish(i)
        return message


async def keyhive_run(subscribers: int, events: int, burst: int) -> float:
    """Deliveries/s of ``events`` events, ``burst`` per turn, to ``subscribers`` subscriptions."""
    name = f"bench-pubsub-{time.monotonic_ns()}"
    async with keyhive.InstanceManager(name, Publisher, storage=None) as manager:
        ref = await manager.get("room")
        got = [0] * subscribers

        async def consume(i: int, subscription: Any) -> None:
            n = 0
            async for _ in subscription:
                n += 1
                if n == events:
                    break
            got[i] = n

        async with contextlib.AsyncExitStack() as stack:
            subs = [await stack.enter_async_context(ref.subscribe()) for _ in range(subscribers)]
            consumers = [asyncio.create_task(consume(i, s)) for i, s in enumerate(subs)]
            await asyncio.sleep(0)  # every consumer waits in __anext__
            gc.collect()
            t0 = time.perf_counter()
            for _ in range(events // burst):
                await ref.call(burst)
                await asyncio.sleep(0)
            await asyncio.gather(*consumers)
            elapsed = time.perf_counter() - t0
    assert got == [events] * subscribers, "a subscriber missed events"
    return subscribers * events / elapsed


async def queues_run(subscribers: int, events: int, burst: int) -> float:
    """The baseline: ``put_nowait`` over ``subscribers`` asyncio.Queues, each drained by ``get()``."""
    queues: list[asyncio.Queue[int]] = [asyncio.Queue(maxsize=1000) for _ in range(subscribers)]
    got = [0] * subscribers

    async def consume(i: int, queue: asyncio.Queue[int]) -> None:
        n = 0
        get = queue.get
        while n < events:
            await get()
            n += 1
        got[i] = n

    consumers = [asyncio.create_task(consume(i, q)) for i, q in enumerate(queues)]
    await asyncio.sleep(0)
    gc.collect()
    t0 = time.perf_counter()
    for _ in range(events // burst):
        for i in range(burst):
            for queue in queues:
                queue.put_nowait(i)
        await asyncio.sleep(0)
    await asyncio.gather(*consumers)
    elapsed = time.perf_counter() - t0
    assert got == [events] * subscribers
    return subscribers * events / elapsed


async def run(quick: bool = False, subscribers: int = SUBSCRIBERS) -> list[dict[str, Any]]:
    """Rows ``{workload, impl, value, unit, n, burst}``: the median of 3 runs each."""
    events = 2_000 if quick else 10_000
    rows = []
    for burst in (1, 100):
        n_events = events // 10 if burst == 1 else events
        for impl, fn in (("keyhive", keyhive_run), ("asyncio.Queue loop", queues_run)):
            values = sorted([await fn(subscribers, n_events, burst) for _ in range(3)])
            rows.append({"workload": f"P1 publish to {subscribers:,} subscribers, burst {burst}",
                         "impl": impl, "value": values[1], "runs": values, "unit": "deliveries/s",
                         "n": n_events * subscribers, "burst": burst})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a text table with keyhive / baseline ratios and the target's verdict."""
    out = [f"{'workload':<44} {'keyhive':>12} {'Queue loop':>12} {'ratio':>7}  unit"]
    by: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["workload"], {})[r["impl"]] = r
    for workload, impls in by.items():
        k, q = impls["keyhive"]["value"], impls["asyncio.Queue loop"]["value"]
        out.append(f"{workload:<44} {k:>12,.0f} {q:>12,.0f} {k / q:>6.2f}x  deliveries/s")
    best = max(r["value"] for r in rows if r["impl"] == "keyhive" and r["burst"] == 100)
    verdict = "met" if best >= TARGET else "NOT met"
    out.append(f"target >= {TARGET:,} deliveries/s at burst 100: {verdict} ({best:,.0f})")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pubsub", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer events per run")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    rows = asyncio.run(run(args.quick))
    print(table(rows))
    if args.json is not None:
        meta = {"python": sys.version.split()[0], "machine": platform.machine(),
                "keyhive": keyhive.__version__ if hasattr(keyhive, "__version__") else None}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
