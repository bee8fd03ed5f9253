"""W4 in a fresh process: ``python -m bench.memory IMPL N [--trace]`` prints one JSON line.

Builds N live idle agents (``get`` + a first call, idle timer armed, empty-dict state)
and reports the RSS growth (or, with ``--trace``, the tracemalloc growth). The keys are
made before the first reading, so they are not counted.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import tracemalloc
from typing import Any

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


async def build(impl: str, keys: list[str], name: str) -> Any:
    """Start ``impl``, ``get`` every key; return something holding them alive."""
    if impl == "keyhive":
        import keyhive

        from .workloads import Counter

        m = keyhive.InstanceManager(name, Counter, idle_timeout=3600, storage=None)
        await m.start()
        for k in keys:
            await m.get(k)
        return m
    if impl == "floor":
        from .floor import FloorRegistry

        floor = FloorRegistry(idle_timeout=3600)
        for k in keys:
            await floor.get(k)
        return floor
    from . import peers

    rt = peers.runtime(peers.counter_grain())
    await rt.__aenter__()
    for k in keys:
        await rt.call(peers.GrainId("counter", k), "noop")  # its only way to activate
    return rt


async def first_call(impl: str, holder: Any, keys: list[str]) -> None:
    """A first call on every agent, one that leaves the state an empty dict."""
    if impl == "keyhive":
        for k in keys:
            await (await holder.get(k)).call("noop")
    elif impl == "floor":
        for k in keys:
            await holder.call(await holder.get(k), "noop")


async def main(impl: str, n: int, trace: bool) -> dict[str, Any]:
    keys = [f"m{i}" for i in range(n)]
    if impl == "keyhive":
        import keyhive  # noqa: F401  # imports are not the agents' cost
    elif impl == "nigrains":
        import nigrains  # noqa: F401
    warm = await build(impl, ["warm-up"], "warm-up")  # first-use allocations
    await first_call(impl, warm, ["warm-up"])
    gc.collect()
    if trace:
        tracemalloc.start()

    def used() -> int:
        gc.collect()
        return tracemalloc.get_traced_memory()[0] if trace else rss()

    before = used()
    holder = await build(impl, keys, "memory")
    after_get = used()
    await first_call(impl, holder, keys)
    after_call = used()
    return {"impl": impl, "n": n, "traced": trace, "get": after_get - before,
            "get_call": after_call - before, "rss_total": rss()}


if __name__ == "__main__":
    args = sys.argv[1:]
    result = asyncio.run(main(args[0], int(args[1]), "--trace" in args))
    print(json.dumps(result))
