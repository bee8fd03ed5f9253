"""AgentRef: calls, casts, snapshots, the one-message-at-a-time turn, stopped refs (SPEC §1, §3)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

import keyhive


async def test_handler_exception_reaches_the_caller_and_the_agent_keeps_running(
    manager: keyhive.InstanceManager,
) -> None:
    """An exception raised by handle is re-raised in the caller; the agent goes on."""
    ref = await manager.get("k")
    with pytest.raises(RuntimeError, match="boom"):
        await ref.call("boom")
    assert ref.alive
    assert await ref.call("incr") == 1


@pytest.mark.looptime
async def test_call_timeout_raises_builtin_timeout_error(manager: keyhive.InstanceManager) -> None:
    """A call whose handler outlasts timeout raises TimeoutError; the turn still finishes (SPEC §8)
    and the agent serves the next call after it."""
    ref = await manager.get("k")
    with pytest.raises(TimeoutError):
        await ref.call(("sleep", 10), timeout=1)
    assert await ref.call("incr", timeout=20) == 2  # the timed-out turn's increment stands


@pytest.mark.looptime
async def test_queued_call_timeout_counts_the_wait(manager: keyhive.InstanceManager) -> None:
    """Time spent waiting for the turn counts against the caller's timeout."""
    ref = await manager.get("k")
    slow = asyncio.create_task(ref.call(("sleep", 10), timeout=None))
    await asyncio.sleep(0)
    with pytest.raises(TimeoutError):
        await ref.call("incr", timeout=1)
    assert await slow == 1
    # the timed-out call's message was sent: it is handled in its turn all the same
    assert await ref.call("incr") == 3


async def test_calls_are_handled_one_at_a_time_in_arrival_order(manager: keyhive.InstanceManager) -> None:
    """500 concurrent calls never overlap in handle and run in the order they were sent."""
    order: list[int] = []
    active = 0
    overlap = 0

    class Serial(keyhive.Agent):
        async def handle(self, message: Any) -> Any:
            nonlocal active, overlap
            active += 1
            overlap = max(overlap, active)
            if message % 3 == 0:
                await asyncio.sleep(0)
            order.append(message)
            active -= 1
            return message

    async with keyhive.InstanceManager("serial", Serial, storage=None) as m:
        ref = await m.get("k")
        results = await asyncio.gather(*(ref.call(i) for i in range(500)))
    assert results == list(range(500))
    assert order == list(range(500))
    assert overlap == 1


async def test_casts_and_calls_keep_arrival_order(manager: keyhive.InstanceManager) -> None:
    """Casts are handled in order with calls sent after them."""
    ref = await manager.get("k")
    for _ in range(10):
        await ref.cast("incr")
    assert await ref.call("get") == 10
    await ref.cast(("sleep", 0))
    await ref.cast("incr")
    assert await ref.call("get") == 12


async def test_cast_exception_is_logged_with_the_key(manager: keyhive.InstanceManager,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """An exception in a cast's handler is logged with the key, and the agent keeps running."""
    ref = await manager.get("the-key")
    with caplog.at_level(logging.ERROR, logger="keyhive"):
        await ref.cast("boom")
        assert await ref.call("incr") == 1
    assert "the-key" in caplog.text
    assert "boom" in caplog.text


async def test_state_is_a_snapshot(manager: keyhive.InstanceManager) -> None:
    """state() returns a copy: mutating it changes nothing in the agent."""
    ref = await manager.get("k", initial_state={"items": [1]})
    snap = await ref.state()
    snap["items"].append(2)
    snap["count"] = 99
    assert await ref.state() == {"count": 0, "items": [1]}


async def test_stopped_ref_raises_agent_stopped(manager: keyhive.InstanceManager) -> None:
    """call, cast, state and attach on a stopped incarnation raise AgentStopped; touch/detach do nothing."""
    ref = await manager.get("k")
    await manager.stop("k")
    assert not ref.alive
    for op in (ref.call("incr"), ref.cast("incr"), ref.state(), ref.attach("o")):
        with pytest.raises(keyhive.AgentStopped):
            await op
    ref.touch()
    await ref.detach("o")
    assert await ref.wait_stopped() is keyhive.StopReason.STOPPED


async def test_queued_callers_get_agent_stopped_when_the_agent_stops(manager: keyhive.InstanceManager) -> None:
    """Every call queued behind a stop gets AgentStopped; none is stranded."""
    ref = await manager.get("k")
    slow = asyncio.create_task(ref.call(("sleep", 0.01)))
    await asyncio.sleep(0)
    stopper = asyncio.create_task(manager.stop("k"))
    await asyncio.sleep(0)
    queued = [asyncio.create_task(ref.call("incr")) for _ in range(5)]
    assert await slow == 1
    await stopper
    for task in queued:
        with pytest.raises(keyhive.AgentStopped):
            await task


async def test_self_stop_hibernates_then_stops(make_manager: Any) -> None:
    """self.stop() stops the agent after the current message with reason NORMAL, checkpoint written."""
    async with make_manager() as m:
        ref = await m.get("k")
        await ref.call("incr")
        assert await ref.call("stop") == 1
        assert await ref.wait_stopped() is keyhive.StopReason.NORMAL
        assert await m.lookup("k") is None
        assert await m.call("k", "get") == 1


async def test_refs_of_different_incarnations_differ(manager: keyhive.InstanceManager) -> None:
    """After a stop and a new start, the new ref is not equal to the old one."""
    old = await manager.get("k")
    await manager.stop("k")
    new = await manager.get("k")
    assert old != new
    assert old.key == new.key
    assert "stopped" in repr(old)
    assert "running" in repr(new)


async def test_hooks_run_in_order(make_manager: Any) -> None:
    """on_start, on_hibernate and on_stop run in that order, with thawed and the reason."""
    calls: list[Any] = []

    class Hooked(keyhive.Agent):
        async def handle(self, message: Any) -> Any:
            return None

        async def on_start(self, thawed: bool) -> None:
            calls.append(("start", thawed))

        async def on_hibernate(self) -> None:
            calls.append("hibernate")

        async def on_stop(self, reason: keyhive.StopReason) -> None:
            calls.append(("stop", reason))

    async with make_manager(Hooked) as m:
        await m.get("k")
        await m.stop("k")
        await m.get("k")
    assert calls == [("start", False), "hibernate", ("stop", "stopped"), ("start", True), "hibernate",
                     ("stop", "shutdown")]


async def test_self_stop_in_on_start_stops_after_the_start(make_manager: Any) -> None:
    """self.stop() called from on_start takes effect once the agent is running: it hibernates and stops."""

    class OneShot(keyhive.Agent):
        async def on_start(self, thawed: bool) -> None:
            self.state["starts"] = self.state.get("starts", 0) + 1
            if self.state["starts"] == 1:
                self.stop()

        async def handle(self, message: Any) -> Any:
            return self.state["starts"]

    async with make_manager(OneShot) as m:
        ref = await m.get("k")
        assert await ref.wait_stopped() is keyhive.StopReason.NORMAL
        assert await m.call("k", "x") == 2  # thawed: the first start's state was saved
