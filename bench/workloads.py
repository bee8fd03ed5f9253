"""W1-W7 (issue 4), each run for keyhive, the floor and nigrains in the same process.

Every function returns rows ``{"workload", "impl", "value", "unit", "n", ...}``. The
timed loops call each implementation's own API directly (no adapter layer), so an
extra coroutine per operation never blurs a ratio.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import os
import subprocess
import sys
import time
from typing import Any

import keyhive

from . import peers
from .floor import FloorAgent, FloorRegistry

_names = itertools.count()
# Throughputs and latencies are taken in process CPU time: on a shared machine the wall
# clock also counts the time other processes hold the core. (W6 lateness is wall time.)
perf = time.process_time


def _name() -> str:
    return f"bench-{next(_names)}"


def row(workload: str, impl: str, value: float | None, unit: str, n: int, **extra: Any) -> dict[str, Any]:
    return {"workload": workload, "impl": impl, "value": value, "unit": unit, "n": n, **extra}


class Counter(keyhive.Agent):
    """The keyhive agent of every workload: an empty-dict state, a counter message."""

    async def handle(self, message: Any) -> Any:
        if message != "incr":
            return None
        state = self.state
        state["count"] = count = state.get("count", 0) + 1
        return count


def _keys(n: int, prefix: str = "k") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def _split(keys: list[str], tasks: int) -> list[list[str]]:
    return [keys[i::tasks] for i in range(tasks)]


async def _run(work: Any, keys: list[str], tasks: int) -> float:
    t0 = perf()
    if tasks == 1:
        await work(keys)
    else:
        await asyncio.gather(*(work(part) for part in _split(keys, tasks)))
    return perf() - t0


# -- W1 cold activation ----------------------------------------------------------------------

async def w1(quick: bool) -> list[dict[str, Any]]:
    n = 10_000 if quick else 100_000
    rows = []
    for tasks in (1, 1000):
        label = f"W1 cold get+call ({tasks} task{'s' if tasks > 1 else ''})"
        keys = _keys(n, f"c{tasks}-")

        async with keyhive.InstanceManager(_name(), Counter, idle_timeout=3600, storage=None) as m:
            get = m.get

            async def kh(ks: list[str], get: Any = get) -> None:
                for k in ks:
                    ref = await get(k)
                    await ref.call("incr")

            dt = await _run(kh, keys, tasks)
        rows.append(row(label, "keyhive", n / dt, "activations/s", n))

        floor = FloorRegistry(idle_timeout=3600)
        fget, fcall = floor.get, floor.call

        async def fl(ks: list[str], fget: Any = fget, fcall: Any = fcall) -> None:
            for k in ks:
                await fcall(await fget(k), "incr")

        dt = await _run(fl, keys, tasks)
        floor.close()
        rows.append(row(label, "floor", n / dt, "activations/s", n))

        async with peers.runtime(peers.counter_grain()) as rt:
            call, gid = rt.call, peers.GrainId

            async def ng(ks: list[str], call: Any = call, gid: Any = gid) -> None:
                for k in ks:
                    await call(gid("counter", k), "incr")

            dt = await _run(ng, keys, tasks)
        rows.append(row(label, "nigrains", n / dt, "activations/s", n))
    return rows


# -- W2 hot get ------------------------------------------------------------------------------

async def w2(quick: bool) -> list[dict[str, Any]]:
    n = 100_000 if quick else 1_000_000
    nkeys = 10_000 if quick else 100_000
    keys = _keys(nkeys, "h")
    cycle = keys * (n // nkeys)
    rows = []

    async def timed(fn: Any, seq: list[str]) -> float:
        t0 = perf()
        for k in seq:
            await fn(k)
        return (perf() - t0) / len(seq) * 1e9

    same = ["h0"] * n
    async with keyhive.InstanceManager(_name(), Counter, idle_timeout=3600, storage=None) as m:
        for k in keys:
            await m.get(k)
        rows.append(row("W2 hot get (same key)", "keyhive", await timed(m.get, same), "ns/op", n))
        rows.append(row("W2 hot get (cycling keys)", "keyhive", await timed(m.get, cycle), "ns/op", n))
        rows.append(row("W2 lookup (same key)", "keyhive", await timed(m.lookup, same), "ns/op", n))

    floor = FloorRegistry(idle_timeout=3600)
    for k in keys:
        await floor.get(k)
    rows.append(row("W2 hot get (same key)", "floor", await timed(floor.get, same), "ns/op", n))
    rows.append(row("W2 hot get (cycling keys)", "floor", await timed(floor.get, cycle), "ns/op", n))
    rows.append(row("W2 lookup (same key)", "floor", await timed(floor.lookup, same), "ns/op", n))
    floor.close()

    # nigrains has no get: activation is implicit in a call. Its cheapest way to reach a
    # live grain is a call of a method that does nothing.
    async with peers.runtime(peers.counter_grain()) as rt:
        gid = peers.GrainId
        ids = {k: gid("counter", k) for k in keys}
        for k in keys:
            await rt.call(ids[k], "noop")
        call = rt.call

        async def ng(k: str) -> None:
            await call(ids[k], "noop")

        note = "no get in nigrains: a call of a no-op method"
        rows.append(row("W2 hot get (same key)", "nigrains", await timed(ng, same), "ns/op", n, note=note))
        rows.append(row("W2 hot get (cycling keys)", "nigrains", await timed(ng, cycle), "ns/op", n,
                        note=note))
    return rows


# -- W3 calls --------------------------------------------------------------------------------

async def w3(quick: bool) -> list[dict[str, Any]]:
    n = 20_000 if quick else 100_000
    callers, nkeys = 1000, 1000
    per = n // callers
    rows = []
    keys = _keys(nkeys, "w")

    async def seq(fn: Any, arg: Any) -> float:
        t0 = perf()
        for _ in range(n):
            await fn(arg)
        return n / (perf() - t0)

    async def conc(call_one: Any) -> float:
        async def caller(i: int) -> None:
            for j in range(per):
                await call_one(keys[(i + j) % nkeys])
                await asyncio.sleep(0)  # let the other callers in: they interleave

        t0 = perf()
        await asyncio.gather(*(caller(i) for i in range(callers)))
        return callers * per / (perf() - t0)

    async with keyhive.InstanceManager(_name(), Counter, idle_timeout=3600, storage=None) as m:
        refs = {k: await m.get(k) for k in keys}
        ref = refs["w0"]
        rows.append(row("W3 call, held ref (sequential)", "keyhive", await seq(ref.call, "incr"),
                        "calls/s", n))

        async def kh_one(k: str) -> None:
            await refs[k].call("incr")

        rows.append(row("W3 call, 1000 concurrent callers", "keyhive", await conc(kh_one), "calls/s", n))
        mcall = m.call

        async def kh_m(k: str) -> None:
            await mcall(k, "incr")

        rows.append(row("W3 manager.call(key) (sequential)", "keyhive", await seq(kh_m, "w1"), "calls/s", n))

    floor = FloorRegistry(idle_timeout=3600)
    agents = {k: await floor.get(k) for k in keys}
    fcall = floor.call

    async def fl_ref(_: Any, a: FloorAgent = agents["w0"]) -> None:
        await fcall(a, "incr")

    async def fl_one(k: str) -> None:
        await fcall(agents[k], "incr")

    async def fl_m(k: str) -> None:
        await floor.call_key(k, "incr")

    rows.append(row("W3 call, held ref (sequential)", "floor", await seq(fl_ref, None), "calls/s", n))
    rows.append(row("W3 call, 1000 concurrent callers", "floor", await conc(fl_one), "calls/s", n))
    rows.append(row("W3 manager.call(key) (sequential)", "floor", await seq(fl_m, "w1"), "calls/s", n))
    floor.close()

    async with peers.runtime(peers.counter_grain()) as rt:
        ids = {k: peers.GrainId("counter", k) for k in keys}
        call = rt.call
        for k in keys:
            await call(ids[k], "incr")
        gref = rt.reference(peers.counter_grain(), "w0")  # typed reference: same grain_type
        incr = gref.incr

        async def ng_ref(_: Any) -> None:
            await incr()

        async def ng_one(k: str) -> None:
            await call(ids[k], "incr")

        rows.append(row("W3 call, held ref (sequential)", "nigrains", await seq(ng_ref, None), "calls/s", n,
                        note="runtime.reference(...).incr()"))
        rows.append(row("W3 call, 1000 concurrent callers", "nigrains", await conc(ng_one), "calls/s", n))
        rows.append(row("W3 manager.call(key) (sequential)", "nigrains", await seq(ng_one, "w1"),
                        "calls/s", n, note="runtime.call(GrainId, 'incr')"))
    return rows


# -- W4 memory (a fresh subprocess per implementation) ---------------------------------------

def _memory(impl: str, n: int, trace: bool) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.memory", impl, str(n)] + (["--trace"] if trace else [])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=root)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


async def w4(quick: bool) -> list[dict[str, Any]]:
    n = 20_000 if quick else 100_000
    rows = []
    for impl in ("keyhive", "floor", "nigrains"):
        for trace, how in ((False, "RSS"), (True, "tracemalloc")):
            r = _memory(impl, n, trace)
            rows.append(row(f"W4 memory per idle agent after get ({how})", impl, r["get"] / n, "B/agent", n))
            rows.append(row(f"W4 memory per idle agent after get+call ({how})", impl, r["get_call"] / n,
                            "B/agent", n))
    if not quick:
        for impl in ("keyhive", "floor", "nigrains"):
            big = _memory(impl, 1_000_000, trace=False)
            rows.append(row("W4 1,000,000 live agents (total RSS)", impl, big["rss_total"] / 2**20, "MiB",
                            1_000_000))
    return rows


# -- W5 race ---------------------------------------------------------------------------------

async def w5(quick: bool) -> list[dict[str, Any]]:
    n = 1_000 if quick else 10_000
    rows = []
    started = 0

    class Slow(Counter):
        async def on_start(self, thawed: bool) -> None:
            nonlocal started
            started += 1
            await asyncio.sleep(0.001)  # the activation suspends: the other gets arrive meanwhile

    async with keyhive.InstanceManager(_name(), Slow, storage=None) as m:
        t0 = perf()
        refs = await asyncio.gather(*(m.get("race") for _ in range(n)))
        dt = perf() - t0
        same = all(r == refs[0] for r in refs)
    rows.append(row("W5 concurrent gets of one new key: activations", "keyhive", started, "activations", n,
                    all_equal=same, seconds=dt))

    async def floor_start(agent: FloorAgent) -> None:
        await asyncio.sleep(0.001)

    floor = FloorRegistry(on_start=floor_start)
    t0 = perf()
    agents = await asyncio.gather(*(floor.get("race") for _ in range(n)))
    dt = perf() - t0
    rows.append(row("W5 concurrent gets of one new key: activations", "floor", floor.activations,
                    "activations", n, all_equal=all(a is agents[0] for a in agents), seconds=dt))
    floor.close()

    activated = 0

    def on_activate() -> None:
        nonlocal activated
        activated += 1

    async with peers.runtime(peers.counter_grain(on_activate, activate_sleep=0.001)) as rt:
        t0 = perf()
        await asyncio.gather(*(rt.call(peers.GrainId("counter", "race"), "noop") for _ in range(n)))
        dt = perf() - t0
    rows.append(row("W5 concurrent gets of one new key: activations", "nigrains", activated, "activations",
                    n, seconds=dt))
    return rows


# -- W6 idle churn ---------------------------------------------------------------------------

async def w6(quick: bool) -> list[dict[str, Any]]:
    n = 5_000 if quick else 100_000
    timeout = 1.0
    loop = asyncio.get_running_loop()
    rows = []
    label = "W6 idle churn: all stopped after last deadline"
    cpu_label = "W6 idle churn: CPU per agent"

    # keyhive: memory storage; each agent's on_stop counts, the last one ends the wait
    done: asyncio.Future[float] = loop.create_future()
    stopped = 0

    class Idle(Counter):
        async def on_stop(self, reason: keyhive.StopReason) -> None:
            nonlocal stopped
            stopped += 1
            if stopped == n:
                done.set_result(loop.time())

    async with keyhive.InstanceManager(_name(), Idle, idle_timeout=timeout,
                                       storage=keyhive.MemoryStorage()) as m:
        last = 0.0
        for k in _keys(n, "idle"):
            ref = await m.get(k)
            last = max(last, ref.idle_deadline or 0.0)
        gc.collect()  # the creation burst's GC debt is not the expiry's
        cpu0 = time.process_time()
        end = await done
        cpu = time.process_time() - cpu0
    rows.append(row(label, "keyhive", (end - last) * 1e3, "ms", n))
    rows.append(row(cpu_label, "keyhive", cpu / n * 1e6, "µs/agent", n))

    fdone: asyncio.Future[float] = loop.create_future()
    fstopped = 0

    def floor_stop(agent: FloorAgent) -> None:
        nonlocal fstopped
        fstopped += 1
        if fstopped == n:
            fdone.set_result(loop.time())

    floor = FloorRegistry(idle_timeout=timeout, on_stop=floor_stop)
    last = 0.0
    for k in _keys(n, "idle"):
        agent = await floor.get(k)
        last = max(last, agent.deadline or 0.0)
    gc.collect()  # the creation burst's GC debt is not the expiry's
    cpu0 = time.process_time()
    end = await fdone
    cpu = time.process_time() - cpu0
    floor.close()
    rows.append(row(label, "floor", (end - last) * 1e3, "ms", n))
    rows.append(row(cpu_label, "floor", cpu / n * 1e6, "µs/agent", n))

    ndone: asyncio.Future[float] = loop.create_future()
    nstopped = 0

    def grain_stop() -> None:
        nonlocal nstopped
        nstopped += 1
        if nstopped == n:
            ndone.set_result(loop.time())

    sweep = 0.05
    async with peers.runtime(peers.counter_grain(on_deactivate=grain_stop), idle_seconds=timeout,
                             sweep_seconds=sweep) as rt:
        for k in _keys(n, "idle"):
            await rt.call(peers.GrainId("counter", k), "noop")
        last = loop.time() + timeout  # idleness counts from the end of the last call
        gc.collect()  # the creation burst's GC debt is not the expiry's
        cpu0 = time.process_time()
        end = await ndone
        cpu = time.process_time() - cpu0
    note = f"sweep_seconds={sweep}; idle counted from each grain's last call"
    rows.append(row(label, "nigrains", (end - last) * 1e3, "ms", n, note=note))
    rows.append(row(cpu_label, "nigrains", cpu / n * 1e6, "µs/agent", n, note=note))
    return rows


# -- W7 attach/detach ------------------------------------------------------------------------

async def w7(quick: bool) -> list[dict[str, Any]]:
    n = 20_000 if quick else 200_000
    rows = []
    owner = object()
    async with keyhive.InstanceManager(_name(), Counter, idle_timeout=3600, storage=None) as m:
        ref = await m.get("a")
        attach, detach = ref.attach, ref.detach
        t0 = perf()
        for _ in range(n):
            await attach(owner)
            await detach(owner)
        rows.append(row("W7 attach+detach pair", "keyhive", (perf() - t0) / n * 1e9, "ns/pair", n))
        t0 = perf()
        for _ in range(n):
            await attach()
            await detach()
        rows.append(row("W7 attach+detach pair (task owner)", "keyhive", (perf() - t0) / n * 1e9,
                        "ns/pair", n))

    floor = FloorRegistry(idle_timeout=3600)
    agent = await floor.get("a")
    fattach, fdetach = floor.attach, floor.detach
    t0 = perf()
    for _ in range(n):
        await fattach(agent, owner)
        await fdetach(agent, owner)
    rows.append(row("W7 attach+detach pair", "floor", (perf() - t0) / n * 1e9, "ns/pair", n))
    floor.close()
    rows.append(row("W7 attach+detach pair", "nigrains", None, "ns/pair", 0,
                    note="nigrains has no attachments: idleness counts from the last call"))
    return rows


WORKLOADS = {"W1": w1, "W2": w2, "W3": w3, "W4": w4, "W5": w5, "W6": w6, "W7": w7}
