"""One owner per manager across real processes (SPEC §10), at the manager level.

A child process (``tests/procs/child.py serve``) runs the manager on a shared SQLite,
Redis or PostgreSQL storage with ``checkpoint="turn"`` and ``lease_ttl=1.5``; this test
process is the second process. The children are stopped (SIGSTOP), resumed (SIGCONT) and
killed (SIGKILL) for real. In every run: every acknowledged call is in the stored state,
and no write of a process that lost the lease lands (the new holder's writes never meet
a conflict).
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

import keyhive
from tests.procs.child import Log
from tests.procs.harness import Child, items_of, shared_url

TTL = 1.5
NAME = "leased"


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """One storage that the child processes and this test share."""
    return shared_url(request.param, tmp_path, request)


def _manager(url: str, **options: Any) -> keyhive.InstanceManager:
    return keyhive.InstanceManager(NAME, Log, storage=url, checkpoint="turn", lease_ttl=TTL, **options)


async def _holder(url: str, tmp_path: Path) -> Child:
    child = await Child.spawn("child", "serve", url, NAME, json.dumps({"lease_ttl": TTL}),
                              log=tmp_path / "holder.log")
    await child.expect("started")
    return child


async def _call(child: Child, key: str, value: int) -> str:
    """Send one call to the child and return its answer line (``ack ...`` or ``err ...``)."""
    mark = len(child.lines)
    child.send(f"call {key} {value}")
    return await _answer(child, key, value, mark)


async def _answer(child: Child, key: str, value: int, mark: int) -> str:
    """The child's answer to call ``key value``, among the lines from ``mark`` on."""
    return await child.expect((f"ack {key} {value} ", f"err {key} {value} "), after=mark)


@pytest.mark.timeout(60)
async def test_second_process_is_refused_then_takes_over_at_once_on_close(url: str, tmp_path: Path) -> None:
    """A second process's start() raises OwnedElsewhere naming host and pid; with lease_wait it takes over as soon as the first closes."""
    child = await _holder(url, tmp_path)
    try:
        assert (await _call(child, "k", 1)).startswith("ack")
        assert (await _call(child, "k", 2)).startswith("ack")
        second = _manager(url)
        with pytest.raises(keyhive.OwnedElsewhere) as info:
            await second.start()
        message = str(info.value)
        assert f"pid {child.pid}" in message and f"host {socket.gethostname()}" in message
        assert "RayRuntime" in message and "lease_wait" in message  # what to do instead
        assert not second.running

        rolling = _manager(url, lease_wait=10 * TTL)
        starting = asyncio.ensure_future(rolling.start())
        await asyncio.sleep(TTL)  # well past a renewal: the live holder keeps it
        assert not starting.done()
        child.send("close")
        await child.expect("closed")
        closed_at = time.monotonic()
        await asyncio.wait_for(starting, 10)
        took = time.monotonic() - closed_at
        print(f"LEASE rolling restart: the waiting process took over {took:.3f}s after the holder closed")
        assert took < TTL / 2 + 0.3  # released: at its next poll, not after the TTL
        try:
            assert await rolling.call("k", "items") == [1, 2]
            assert await rolling.call("k", ("add", 3)) == 3
        finally:
            await rolling.close()
        assert await child.finished() and child.proc.returncode == 0
    finally:
        await child.reap()
    assert await items_of(url, NAME) == [1, 2, 3]


@pytest.mark.timeout(60)
async def test_killed_holder_is_taken_over_after_its_lease_ttl(url: str, tmp_path: Path) -> None:
    """After a SIGKILL of the holder, a waiting process takes over once lease_ttl has run out, with every acknowledged call."""
    child = await _holder(url, tmp_path)
    try:
        acked = [v for v in range(1, 6) if (await _call(child, "k", v)).startswith("ack")]
        assert acked == [1, 2, 3, 4, 5]
        await child.kill()
        killed_at = time.monotonic()
    finally:
        await child.reap()
    successor = _manager(url, lease_wait=10 * TTL)
    await successor.start()
    took = time.monotonic() - killed_at
    try:
        print(f"LEASE SIGKILL takeover: {took:.3f}s after the kill (lease_ttl={TTL})")
        # renewed every TTL/3, so it expired between 2/3 TTL and TTL after the kill; polled every TTL/3
        assert TTL * 2 / 3 - 0.1 <= took <= TTL + TTL / 3 + 0.5
        assert await successor.call("k", "items") == acked
    finally:
        await successor.close()


@pytest.mark.timeout(60)
async def test_stopped_holder_resumed_after_takeover_writes_nothing(url: str, tmp_path: Path) -> None:
    """A SIGSTOPped holder resumed after a takeover has every write refused, stops its agents with LEASE_LOST, and the new holder's state stands."""
    child = await _holder(url, tmp_path)
    successor = _manager(url, lease_wait=10 * TTL)
    try:
        assert (await _call(child, "a", 1)).startswith("ack")
        assert (await _call(child, "b", 1)).startswith("ack")
        mark = len(child.lines)
        child.send("slow a 2 3.0")  # a turn that sleeps 3 s, then appends and writes at once
        await child.expect("sleeping a", after=mark)
        slept_at = time.monotonic()
        child.signal(signal.SIGSTOP)

        await successor.start()  # after the zombie's lease ran out
        assert await successor.call("a", "items") == [1]  # thawed, not written: same version
        assert await successor.call("b", ("add", 100)) == 2
        await asyncio.sleep(max(0.0, slept_at + 3.3 - time.monotonic()))
        child.signal(signal.SIGCONT)  # its lease watch and its sleeping turn both wake up

        answer = await _answer(child, "a", 2, mark)
        assert answer.split()[0] == "err", f"the zombie's write landed: {answer}"
        await child.expect("stop a lease_lost", after=mark)
        await child.expect("stop b lease_lost", after=mark)
        for key, value in (("a", 3), ("b", 4)):  # it cannot serve again while the lease is elsewhere
            assert (await _call(child, key, value)).split()[-1] == "OwnedElsewhere"
        print(f"LEASE zombie: {answer!r}; then " + "; ".join(
            line for line in child.lines[mark:] if line.startswith(("stop", "err"))))

        # the new holder writes on top of its own versions: nothing came in between
        assert await successor.call("a", ("add", 200)) == 2
        assert await successor.call("b", ("add", 101)) == 3
        child.send("close")
        await child.expect("closed")
    finally:
        await successor.close()
        await child.reap()
    assert await items_of(url, NAME, "a") == [1, 200]
    assert await items_of(url, NAME, "b") == [1, 100, 101]


class _SlowToHibernate(Log):
    """A Log whose on_hibernate outlasts a short lease_ttl."""

    async def on_hibernate(self) -> None:
        await asyncio.sleep(0.6)


@pytest.mark.timeout(30)
async def test_a_close_longer_than_lease_ttl_keeps_renewing_and_saves_everything(tmp_path: Path) -> None:
    """A close whose hibernates outlast lease_ttl keeps the lease renewed and saves every agent."""
    url = f"sqlite:///{tmp_path}/slow.db"
    manager = keyhive.InstanceManager("slow", _SlowToHibernate, storage=url, lease_ttl=0.3)
    async with manager:
        await manager.call("a", ("add", 1))
    assert manager._core.counters["lease_lost"] == 0
    assert manager._core.counters["hibernated"] == 1
    assert await items_of(url, "slow", "a") == [1]


@pytest.mark.timeout(30)
async def test_write_behind_close_writes_dirty_agents_at_once(tmp_path: Path) -> None:
    """close() of a write-behind manager writes its changed agents at once (no wait for the deadline)."""
    url = f"sqlite:///{tmp_path}/behind.db"
    manager = keyhive.InstanceManager("behind", Log, storage=url, checkpoint=30.0)
    await manager.start()
    for key in ("a", "b", "c"):
        await manager.call(key, ("add", 1))
    started = time.monotonic()
    await asyncio.wait_for(manager.close(), 5)
    assert time.monotonic() - started < 2
    assert manager._core.counters["lease_lost"] == 0
    for key in ("a", "b", "c"):
        assert await items_of(url, "behind", key) == [1]
