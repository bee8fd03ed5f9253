"""Idle timeout, attachments and touch on virtual time (SPEC §4; Jido's lifecycle tests)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import keyhive
from keyhive.testing import EventRecorder, FaultyStorage

pytestmark = pytest.mark.looptime

TIMEOUT = 300.0


async def test_unattached_agent_idles_out_after_idle_timeout(make_manager: Any) -> None:
    """A new agent with no attachment hibernates and stops idle_timeout after its start."""
    loop = asyncio.get_running_loop()
    async with make_manager(idle_timeout=TIMEOUT) as m:
        ref = await m.get("k")
        await ref.call("incr")
        start = loop.time()
        assert await ref.wait_stopped() is keyhive.StopReason.IDLE_TIMEOUT
        assert TIMEOUT <= loop.time() - start <= TIMEOUT + 0.05
        assert await m.lookup("k") is None
        assert await m.call("k", "get") == 1  # thawed


async def test_calls_do_not_count_as_activity(make_manager: Any) -> None:
    """Calls don't move the idle deadline: a used but unattached agent still idles out on time."""
    loop = asyncio.get_running_loop()
    async with make_manager(idle_timeout=TIMEOUT) as m:
        ref = await m.get("k")
        start = loop.time()
        for _ in range(5):
            await asyncio.sleep(50)
            await ref.call("incr")
        assert await ref.wait_stopped() is keyhive.StopReason.IDLE_TIMEOUT
        assert loop.time() - start <= TIMEOUT + 0.05


async def test_calls_touch_option_counts_calls_as_activity(make_manager: Any) -> None:
    """With calls_touch=True every call restarts the idle timer."""
    loop = asyncio.get_running_loop()
    async with make_manager(idle_timeout=TIMEOUT, calls_touch=True) as m:
        ref = await m.get("k")
        for _ in range(5):
            await asyncio.sleep(200)
            await ref.call("incr")
        last = loop.time()
        await ref.wait_stopped()
        assert TIMEOUT <= loop.time() - last <= TIMEOUT + 0.05


async def test_attach_keeps_alive_and_detach_starts_a_full_timer(make_manager: Any) -> None:
    """While attached the agent never idles; after the last detach a fresh full timer runs."""
    loop = asyncio.get_running_loop()
    async with make_manager(idle_timeout=TIMEOUT) as m:
        ref = await m.get("k")
        await ref.attach("a")
        await ref.attach("b")
        await asyncio.sleep(TIMEOUT * 10)
        assert ref.alive
        await ref.detach("a")
        await asyncio.sleep(TIMEOUT * 2)
        assert ref.alive
        await ref.detach("b")
        detached = loop.time()
        await asyncio.sleep(TIMEOUT - 1)
        assert ref.alive
        await ref.wait_stopped()
        assert TIMEOUT <= loop.time() - detached <= TIMEOUT + 0.05


async def test_attach_is_idempotent_per_owner(make_manager: Any) -> None:
    """Attaching the same owner twice needs one detach."""
    async with make_manager(idle_timeout=TIMEOUT) as m:
        ref = await m.get("k")
        await ref.attach("o")
        await ref.attach("o")
        assert ref.attachments == 1
        await ref.detach("o")
        assert ref.attachments == 0
        await ref.detach("o")  # not attached: no-op
        await ref.wait_stopped()


async def test_owner_task_finishing_detaches_it(make_manager: Any) -> None:
    """attach() defaults to the current task, which is detached when it finishes (also on error)."""
    loop = asyncio.get_running_loop()
    async with make_manager(idle_timeout=TIMEOUT) as m:
        ref = await m.get("k")

        async def owner(fail: bool) -> None:
            await ref.attach()
            await asyncio.sleep(1000)
            if fail:
                raise RuntimeError("owner died")

        tasks = [asyncio.create_task(owner(False)), asyncio.create_task(owner(True))]
        await asyncio.sleep(1)
        assert ref.attachments == 2
        await asyncio.gather(*tasks, return_exceptions=True)
        assert ref.attachments == 0
        gone = loop.time()
        await ref.wait_stopped()
        assert TIMEOUT <= loop.time() - gone <= TIMEOUT + 0.05


async def test_cancelled_owner_task_is_detached(make_manager: Any) -> None:
    """A cancelled owner task is detached like a finished one."""
    async with make_manager(idle_timeout=TIMEOUT) as m:
        ref = await m.get("k")
        ready = asyncio.Event()

        async def owner() -> None:
            await ref.attach()
            ready.set()
            await asyncio.sleep(1e9)

        task = asyncio.create_task(owner())
        await ready.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert ref.attachments == 0
        assert await ref.wait_stopped() is keyhive.StopReason.IDLE_TIMEOUT


async def test_touch_restarts_the_timer_only_when_unattached(make_manager: Any) -> None:
    """touch() pushes the deadline out when nothing is attached, and does nothing when attached."""
    loop = asyncio.get_running_loop()
    async with make_manager(idle_timeout=TIMEOUT) as m:
        ref = await m.get("k")
        await asyncio.sleep(200)
        ref.touch()
        touched = loop.time()
        await asyncio.sleep(200)
        assert ref.alive  # 400 s after start, 200 after touch
        await ref.attach("o")
        ref.touch()
        assert ref.idle_deadline is None
        await ref.detach("o")
        detached = loop.time()
        await ref.wait_stopped()
        assert loop.time() - touched > TIMEOUT
        assert TIMEOUT <= loop.time() - detached <= TIMEOUT + 0.05


async def test_no_idle_timeout_never_idles(make_manager: Any) -> None:
    """Without idle_timeout an agent lives until stopped."""
    async with make_manager(idle_timeout=None) as m:
        ref = await m.get("k")
        await asyncio.sleep(1e6)
        assert ref.alive
        assert ref.idle_deadline is None


async def test_many_agents_idle_out_together_in_batches(make_manager: Any) -> None:
    """Thousands of agents idling out at once are all hibernated, written in batches."""
    storage = FaultyStorage()
    async with make_manager(idle_timeout=TIMEOUT, storage=storage, hibernate_batch=256) as m:
        refs = [await m.get(i) for i in range(2000)]
        for r in refs:
            await r.call("incr")  # changed: each has a checkpoint to write
        await asyncio.gather(*(r.wait_stopped() for r in refs))
        assert storage.saves == 2000
        assert storage.save_batches <= 2000 // 256 + 2
        assert (await m.stats()).count == 0


async def test_get_while_hibernating_waits_and_thaws_the_new_state(make_manager: Any) -> None:
    """A get that arrives during a slow hibernate waits for the write and thaws what was written."""
    storage = FaultyStorage()
    async with make_manager(idle_timeout=TIMEOUT, storage=storage) as m:
        events = EventRecorder(m)
        ref = await m.get("k")
        await ref.call("incr")
        storage.save_delay = 20  # slow, and within storage_timeout
        await events.wait_for("idle", "k")
        await asyncio.sleep(1)
        assert await m.lookup("k") == ref  # still registered while the write runs
        new = await m.get("k")
        assert new != ref
        assert ref.stop_reason is keyhive.StopReason.IDLE_TIMEOUT
        assert await new.call("get") == 1
        assert storage.loads == 2


async def test_failed_idle_hibernate_keeps_the_agent_and_retries(make_manager: Any,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Storage down at idle time: the agent stays alive, the failure is logged, it retries with backoff."""
    storage = FaultyStorage()
    async with make_manager(idle_timeout=TIMEOUT, storage=storage, retry_backoff=(1, 8)) as m:
        events = EventRecorder(m)
        ref = await m.get("k")
        await ref.call("incr")
        storage.fail_save = True
        await events.wait_for("hibernate_failed", "k")
        assert ref.alive
        assert await ref.call("incr") == 2  # still serving
        await asyncio.sleep(30)
        failures = [e for e in events.events if e.kind == "hibernate_failed"]
        assert 3 <= len(failures) <= 7  # 1, 2, 4, 8, 8 ... seconds apart
        assert ref.alive
        storage.fail_save = False
        assert await ref.wait_stopped() is keyhive.StopReason.IDLE_TIMEOUT
        assert "hibernate of key 'k' failed" in caplog.text
        assert await m.call("k", "get") == 2


async def test_attach_during_retry_backoff_cancels_the_retry(make_manager: Any) -> None:
    """An agent attached while waiting to retry a failed hibernate stays alive until detached."""
    storage = FaultyStorage()
    async with make_manager(idle_timeout=TIMEOUT, storage=storage, retry_backoff=(1, 8)) as m:
        events = EventRecorder(m)
        ref = await m.get("k")
        await ref.call("incr")
        storage.fail_save = 1
        await events.wait_for("hibernate_failed", "k")
        await ref.attach("o")
        await asyncio.sleep(TIMEOUT * 3)
        assert ref.alive
        await ref.detach("o")
        await ref.wait_stopped()
