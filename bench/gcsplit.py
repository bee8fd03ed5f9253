"""W1 with the cyclic GC on and off: ``python -m bench.gcsplit [N]`` (the RESULTS analysis).

Best process-CPU time of 3 runs of ``get`` + first ``call`` on N new keys, per implementation.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time
from typing import Any

import keyhive

from . import peers
from .floor import FloorRegistry
from .workloads import Counter


async def _keyhive(keys: list[str]) -> float:
    async with keyhive.InstanceManager(f"gcsplit-{keys[0]}", Counter, idle_timeout=3600, storage=None) as m:
        get = m.get
        t0 = time.process_time()
        for k in keys:
            await (await get(k)).call("incr")
        return time.process_time() - t0


async def _floor(keys: list[str]) -> float:
    floor = FloorRegistry(idle_timeout=3600)
    get, call = floor.get, floor.call
    t0 = time.process_time()
    for k in keys:
        await call(await get(k), "incr")
    floor.close()
    return time.process_time() - t0


async def _nigrains(keys: list[str]) -> float:
    async with peers.runtime(peers.counter_grain()) as rt:
        call, gid = rt.call, peers.GrainId
        t0 = time.process_time()
        for k in keys:
            await call(gid("counter", k), "incr")
        return time.process_time() - t0


async def main(n: int) -> None:
    impls: dict[str, Any] = {"keyhive": _keyhive, "floor": _floor, "nigrains": _nigrains}
    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        for name, fn in impls.items():
            best = min([await fn([f"{name}{r}-{i}" for i in range(n)]) for r in range(3)])
            gc.collect()
            print(f"GC {'on ' if enabled else 'off'} {name:9s} {best / n * 1e6:5.2f} us/activation "
                  f"{n / best:>9,.0f}/s")
    gc.enable()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000))
