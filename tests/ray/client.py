"""A client process of the Ray tests: ``python -m tests.ray.client <address> <mode> <args>``.

Modes (each prints JSON lines on stdout):

* ``hammer <manager> <key> <callers> <calls>``: ``callers`` tasks each send ``calls``
  increments to one key; prints ``{"replies": [...]}``.
* ``attach <manager> <key> <owner_ttl>``: attaches to the key, prints ``{"attached": true}``
  and waits (to be SIGKILLed).
* ``serve <manager> <nkeys>``: one call per key; prints ``{"key": ..., "pid": ..., "inc": ...}``.
"""

from __future__ import annotations

import asyncio
import json
import sys

import keyhive
from keyhive.ray import RayRuntime

from .agents import Counter


async def main(address: str, mode: str, name: str, *args: str) -> None:
    ttl = float(args[1]) if mode == "attach" else 10.0
    manager = keyhive.InstanceManager(name, Counter, storage=None,
                                      runtime=RayRuntime(address, shards=2, owner_ttl=ttl))
    async with manager:
        if mode == "hammer":
            key, callers, calls = args[0], int(args[1]), int(args[2])

            async def caller() -> list[int]:
                return [await manager.call(key, "incr", timeout=60) for _ in range(calls)]

            results = await asyncio.gather(*(caller() for _ in range(callers)))
            print(json.dumps({"replies": [r for rs in results for r in rs]}), flush=True)
        elif mode == "attach":
            async with manager.attach(args[0]):
                print(json.dumps({"attached": True}), flush=True)
                await asyncio.sleep(600)
        elif mode == "serve":
            for i in range(int(args[0])):
                ref = await manager.get(f"k{i}")
                pid = await ref.call("pid")
                print(json.dumps({"key": f"k{i}", "pid": pid, "inc": [ref._shard, ref._inst, ref._n]}),
                      flush=True)
        else:
            raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
