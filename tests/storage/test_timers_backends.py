"""Durable timers on real backends: restarts, a SIGKILLed process, and 100,000 timers in one index."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from bench import timers as bench_timers

import keyhive
from keyhive import EventKind
from keyhive.storage.sqlite import SQLiteStorage
from keyhive.testing import EventRecorder

ROOT = Path(__file__).resolve().parents[2]


class Alarm(keyhive.Agent):
    """Schedules on request and counts the messages its timers bring."""

    async def handle(self, message: Any) -> Any:
        if message[0] == "schedule":
            self.schedule("t", message[1], ["ring"])
        elif message[0] == "ring":
            self.state["rings"] = self.state.get("rings", 0) + 1
        return self.state.get("rings", 0)


@pytest.mark.timeout(60)
async def test_timer_survives_a_manager_restart(storage: Any) -> None:
    """A timer scheduled before close fires after the next start on every backend, once."""
    first = keyhive.InstanceManager("restart", Alarm, storage=storage, timer_poll=0.1)
    async with first:
        await first.call("k", ["schedule", 0.8])
    assert await storage.due_keys("", time.time() + 60)  # in the index, written by the close
    second = keyhive.InstanceManager("restart", Alarm, storage=storage, timer_poll=0.1)
    async with second:
        with EventRecorder(second) as rec:
            await rec.wait_for(EventKind.TIMER_FIRED, "k", timeout=10)
            assert rec.count(EventKind.THAWED, "k") == 1
            assert await second.call("k", ["get"]) == 1
    assert await storage.due_keys("", time.time() + 60) == []  # fired: out of the index


_CHILD = textwrap.dedent("""
    import asyncio, sys
    import keyhive

    class Alarm(keyhive.Agent):
        async def handle(self, message):
            if message[0] == "schedule":
                self.schedule("t", float(message[1]), ["ring"])
            elif message[0] == "ring":
                self.state["rings"] = self.state.get("rings", 0) + 1
            return self.state.get("rings", 0)

    async def main():
        mode, url = sys.argv[1], sys.argv[2]
        m = keyhive.InstanceManager("killed", Alarm, storage=url, checkpoint="turn", timer_poll=0.1,
                                    lease_ttl=1.0, lease_wait=10.0)
        fired = asyncio.get_running_loop().create_future()
        m.subscribe(lambda e: e.kind == "timer_fired" and not fired.done() and fired.set_result(None))
        async with m:
            if mode == "schedule":
                await m.call("k", ["schedule", 1.5])  # durable when the call returns
                print("scheduled", flush=True)
                await asyncio.sleep(3600)
            await asyncio.wait_for(fired, 30)
            print("rings", await m.call("k", ["get"]), flush=True)

    asyncio.run(main())
""")


def _spawn(mode: str, url: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", _CHILD, mode, url], stdout=subprocess.PIPE, env=env)


async def _line(child: subprocess.Popen[bytes]) -> str:
    assert child.stdout is not None
    return (await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 60)).decode().strip()


@pytest.mark.timeout(120)
async def test_timer_survives_sigkill_and_fires_after_restart(tmp_path: Path) -> None:
    """A timer made durable by checkpoint='turn' survives SIGKILL of its process and fires once after restart."""
    url = f"sqlite:///{tmp_path}/killed.db"
    child = _spawn("schedule", url)
    try:
        assert await _line(child) == "scheduled"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate(timeout=10)
    restarted = _spawn("serve", url)
    try:
        assert await _line(restarted) == "rings 1"
        assert restarted.wait(timeout=30) == 0
    finally:
        if restarted.poll() is None:
            restarted.kill()
        restarted.communicate(timeout=10)
    storage = SQLiteStorage(tmp_path / "killed.db")
    try:
        assert await storage.due_keys("", time.time() + 3600) == []
    finally:
        await storage.aclose()


@pytest.mark.timeout(180)
async def test_hundred_thousand_timers_all_found_and_fired(tmp_path: Path) -> None:
    """100,000 hibernated agents due at once in one SQLite index are all found in batches and fired once."""
    n = 100_000
    storage = SQLiteStorage(tmp_path / "many.db")
    due = time.time() - 1.0  # overdue already: the first poll after start finds them all
    try:
        await bench_timers.fill(storage, "many", n, due)
        assert len(await storage.due_keys("", time.time(), limit=n + 1)) == n
        fired: dict[Any, int] = {}
        m = keyhive.InstanceManager("many", bench_timers.Ping, storage=storage)
        m.subscribe(lambda e: e.kind is EventKind.TIMER_FIRED and fired.__setitem__(e.key, fired.get(e.key, 0) + 1))
        async with m:
            async with asyncio.timeout(120):
                while len(fired) < n:
                    await asyncio.sleep(0.05)
            assert (await m.stats()).total == n
        assert set(fired.values()) == {1}
        assert await storage.due_keys("", time.time() + 3600) == []  # close wrote every fired timer away
    finally:
        await storage.aclose()
