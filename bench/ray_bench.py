"""The Ray runtime bench: ``python -m bench.ray_bench [--quick] [--json out.json]``.

On a private local Ray cluster (127.0.0.1), in one run, side by side:

* R1 calls/s in total: 1,000 concurrent callers (one key each) from 2 client processes,
  through 2 shard hosts (target >= 20,000/s);
* R2 one caller, sequential calls: p50 (<= 2 ms) and p99 (<= 10 ms);
* R3 activation of 10,000 new keys from 2 processes (>= 5,000/s);
* R4 shard host kill to the first successful call (<= 3 s);
* the plain Ray baseline beside R1 and R2: one named async actor, one unbatched
  ``.remote()`` per call, the same callers.

Prints a table and JSON (``--json`` writes it to a file too).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

from tests.ray.cluster import REPO, Cluster, local_cluster

TARGETS = {
    "R1": (">=", 20_000.0), "R2p50": ("<=", 2.0), "R2p99": ("<=", 10.0),
    "R3": (">=", 5_000.0), "R4": ("<=", 3.0),
}


class PlainCounter:
    """The baseline: one plain async Ray actor holding a dict of counters."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    async def incr(self, key: str) -> int:
        self.counts[key] = self.counts.get(key, 0) + 1
        return self.counts[key]


def _manager(address: str, name: str, shards: int = 2) -> Any:
    from tests.ray.agents import Counter

    import keyhive
    from keyhive.ray import RayRuntime

    return keyhive.InstanceManager(name, Counter, storage=None,
                                   runtime=RayRuntime(address, shards=shards))


async def _worker(address: str, mode: str, name: str, callers: int, seconds: float, tag: str) -> None:
    """One client process: set up, print ``ready``, wait for ``go`` on stdin, run, print the result."""
    import ray

    ray.init(address=address, namespace="keyhive", log_to_driver=False, configure_logging=False)
    loop = asyncio.get_running_loop()
    if mode == "plain":
        actor = ray.get_actor(name, namespace="keyhive")
        await actor.incr.remote("warm")

        async def one(key: str) -> None:
            await actor.incr.remote(key)
        manager = None
    else:
        manager = _manager(address, name)
        await manager.start()
        await manager.call("warm", "incr")

        async def one(key: str) -> None:
            await manager.call(key, "incr", timeout=30)

    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    count = 0
    start = time.perf_counter()
    if mode == "activate":
        keys = [f"{tag}-new-{i}" for i in range(callers)]
        for i in range(0, len(keys), 1000):
            await asyncio.gather(*(manager.get(k) for k in keys[i:i + 1000]))  # type: ignore[union-attr]
        count = len(keys)
    else:
        stop_at = start + seconds

        async def caller(i: int) -> int:
            n = 0
            key = f"{tag}-{i}"
            while time.perf_counter() < stop_at:
                await one(key)
                n += 1
            return n

        count = sum(await asyncio.gather(*(caller(i) for i in range(callers))))
    elapsed = time.perf_counter() - start
    print(json.dumps({"count": count, "elapsed": elapsed}), flush=True)
    if manager is not None:
        await manager.close()


def _spawn(cluster: Cluster, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "bench.ray_bench", "--worker", cluster.address, *args],
                            cwd=REPO, env=cluster.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)


def _together(cluster: Cluster, procs_args: list[list[str]]) -> list[dict[str, Any]]:
    """Start the workers, let them all set up, start them at once, collect their results."""
    procs = [_spawn(cluster, *args) for args in procs_args]
    try:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"bench worker failed to start: {line!r}")
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for p in procs:
            assert p.stdout is not None
            results.append(json.loads(p.stdout.readline()))
        return results
    finally:
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _rate(results: list[dict[str, Any]]) -> float:
    return sum(r["count"] for r in results) / max(r["elapsed"] for r in results)


async def _latencies(call: Any, n: int) -> tuple[float, float]:
    for _ in range(50):
        await call()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        await call()
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1]


async def _main(quick: bool) -> list[dict[str, Any]]:
    import ray

    seconds = 2.0 if quick else 5.0
    rows: list[dict[str, Any]] = []

    def row(rid: str, what: str, value: float, unit: str, baseline: float | None = None) -> None:
        op, target = TARGETS.get(rid, ("", None))
        ok = None if target is None else (value >= target if op == ">=" else value <= target)
        rows.append({"id": rid, "what": what, "value": round(value, 3), "unit": unit,
                     "target": None if target is None else f"{op} {target:g}", "met": ok,
                     "plain_ray": None if baseline is None else round(baseline, 3)})

    with local_cluster() as cluster:
        ray.init(address=cluster.address, namespace="keyhive", log_to_driver=False,
                 configure_logging=False)
        name = f"bench-{uuid.uuid4().hex[:6]}"
        plain_name = f"plain-{name}"
        plain = ray.remote(PlainCounter).options(
            name=plain_name, namespace="keyhive", lifetime="detached", max_concurrency=4096,
            num_cpus=0).remote()
        await plain.incr.remote("warm")
        manager = _manager(cluster.address, name)
        await manager.start()
        try:
            # R1 and its baseline: 1,000 callers from 2 processes
            kh = _rate(_together(cluster, [["calls", name, "500", str(seconds), f"p{i}"] for i in range(2)]))
            base = _rate(_together(cluster, [["plain", plain_name, "500", str(seconds), f"p{i}"]
                                             for i in range(2)]))
            row("R1", "calls/s, 1,000 callers in 2 processes, 2 shard hosts", kh, "calls/s", base)
            # R2: one caller
            n = 1000 if quick else 3000
            p50, p99 = await _latencies(lambda: manager.call("solo", "incr"), n)
            b50, b99 = await _latencies(lambda: plain.incr.remote("solo"), n)
            row("R2p50", "one caller, call latency p50", p50, "ms", b50)
            row("R2p99", "one caller, call latency p99", p99, "ms", b99)
            # R3: activation of 10,000 new keys from 2 processes
            per = 2500 if quick else 5000
            act = _rate(_together(cluster, [["activate", name, str(per), "0", f"a{i}"] for i in range(2)]))
            row("R3", f"activations/s, {2 * per:,} new keys from 2 processes", act, "keys/s")
            # R4: kill a shard host, time to the first successful call on it
            from keyhive.ray import shard_of

            key = next(f"kill-{i}" for i in range(100) if shard_of(name, None, f"kill-{i}", 2) == 0)
            await manager.call(key, "incr")
            shard = manager._shards[0]
            old = shard.instance
            killed = time.perf_counter()
            ray.kill(shard.handle, no_restart=False)
            deadline = killed + 30
            while True:  # until a call succeeds on the restarted host (a new instance)
                try:
                    await manager.call(key, "incr", timeout=5)
                    if shard.instance not in (old, None):
                        break
                except Exception:
                    if time.perf_counter() > deadline:
                        raise
                await asyncio.sleep(0.005)
            row("R4", "shard host kill to first successful call", time.perf_counter() - killed, "s")
        finally:
            await manager.shutdown_hosts()
            ray.kill(plain, no_restart=True)
            ray.shutdown()
    return rows


def _print(rows: list[dict[str, Any]]) -> None:
    print(f"{'id':6} {'what':58} {'keyhive':>10} {'plain Ray':>10} {'unit':8} {'target':>10} met")
    for r in rows:
        base = "" if r["plain_ray"] is None else f"{r['plain_ray']:,.3f}"
        met = {True: "yes", False: "NO", None: ""}[r["met"]]
        print(f"{r['id']:6} {r['what']:58} {r['value']:>10,.3f} {base:>10} {r['unit']:8} "
              f"{r['target'] or '':>10} {met}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        address, mode, name, callers, seconds, tag = argv[1:7]
        asyncio.run(_worker(address, mode, name, int(callers), float(seconds), tag))
        return
    parser = argparse.ArgumentParser(prog="python -m bench.ray_bench")
    parser.add_argument("--quick", action="store_true", help="shorter runs (2 s, 5,000 keys)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    rows = asyncio.run(_main(args.quick))
    _print(rows)
    out = {"rows": rows, "cpus": os.cpu_count(), "argv": sys.argv}
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
