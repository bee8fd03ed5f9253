"""Races between lifecycle paths that overlap in time (found by the second reliability pass).

Each test pins one interleaving that the model cannot reach because its storage
answers without delay: an idle deadline or a self-stop retry that falls due while
another hibernate of the same incarnation is under way, and a write that lands in
storage but whose reply is lost. All run on virtual time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

import keyhive
from keyhive.testing import EventRecorder, FaultyStorage

pytestmark = pytest.mark.looptime


async def test_idle_deadline_that_falls_during_a_failed_stop_still_idles_out_later(
    make_manager: Callable[..., keyhive.InstanceManager],
) -> None:
    """An idle deadline passing while ``stop()`` is saving is not forgotten when the save fails.

    The wheel found the agent due while it was STOPPING (busy saving for ``stop``) and
    dropped it; the save then failed, the agent went back to RUNNING with a deadline in
    the past and no timer, and it never idled out again, even after storage recovered.
    """
    storage = FaultyStorage()
    storage.save_delay = 5.0
    async with make_manager(storage=storage, idle_timeout=10, retry_backoff=(1.0, 1.0)) as m:
        events = EventRecorder(m)
        await m.call("k", "incr")
        await asyncio.sleep(8)
        storage.fail_save = 1  # the stop's write fails, after 5 s of latency
        with pytest.raises(keyhive.StorageError):
            await m.stop("k")  # t = 8 .. 13: the idle deadline (t = 10) passes meanwhile
        ref = await m.lookup("k")
        assert ref is not None and ref.alive
        storage.save_delay = 0.0
        reason = await asyncio.wait_for(ref.wait_stopped(), 30)
        assert reason is keyhive.StopReason.IDLE_TIMEOUT
        assert events.count("hibernated", "k") == 1
        assert await m.call("k", "get") == 1


async def test_self_stop_retry_that_falls_during_a_failed_stop_is_not_forgotten(
    make_manager: Callable[..., keyhive.InstanceManager],
) -> None:
    """A self-stop retry due while ``stop()`` is saving survives that save failing.

    The retry found the agent STOPPING (not RUNNING) and did nothing; when the
    ``stop()`` write failed the agent went back to RUNNING and its own ``self.stop()``
    was never retried.
    """
    storage = FaultyStorage()
    async with make_manager(storage=storage, retry_backoff=(1.0, 1.0)) as m:
        await m.call("k", "incr")
        storage.fail_save = 1
        ref = await m.get("k")
        events = EventRecorder(m)
        await m.call("k", "stop")  # self-stop: its write fails, retried in 1 s
        await events.wait_for("hibernate_failed", "k")
        assert ref.alive
        storage.save_delay = 3.0
        storage.fail_save = 1
        with pytest.raises(keyhive.StorageError):
            await m.stop("k")  # t = 0 .. 3: the self-stop retry (t = 1) is due meanwhile
        storage.save_delay = 0.0
        assert await asyncio.wait_for(ref.wait_stopped(), 30) is keyhive.StopReason.NORMAL
        assert await m.call("k", "get") == 1


@pytest.mark.parametrize("how", ["idle", "stop", "close"])
async def test_a_write_whose_reply_was_lost_does_not_cost_later_acknowledged_state(
    make_manager: Callable[..., keyhive.InstanceManager], how: str,
) -> None:
    """A save that lands but raises (lost reply) is recognised on the next write, not a conflict.

    The agent stayed alive (the save "failed") with the old expected version, so its next
    write conflicted with its own checkpoint: on idle it stopped with CONFLICT and dropped
    every call acknowledged since; ``stop()`` raised ConflictError forever; close gave up.
    """
    storage = FaultyStorage()
    m = make_manager(storage=storage, idle_timeout=10, retry_backoff=(1.0, 1.0), close_timeout=5)
    async with m:
        events = EventRecorder(m)
        await m.call("k", "incr")
        ref = await m.get("k")
        storage.lost_replies = 1
        if how == "stop":
            with pytest.raises(keyhive.StorageError):
                await m.stop("k")
        else:
            await events.wait_for("hibernate_failed", "k")
        assert ref.alive and storage.faults["lost_reply"] == 1
        await ref.attach()
        assert await m.call("k", "incr") == 2  # acknowledged
        await ref.detach()
        if how == "stop":
            await m.stop("k")
        elif how == "idle":
            assert await asyncio.wait_for(ref.wait_stopped(), 60) is keyhive.StopReason.IDLE_TIMEOUT
    assert ref.stop_reason in (keyhive.StopReason.STOPPED, keyhive.StopReason.IDLE_TIMEOUT,
                               keyhive.StopReason.SHUTDOWN)
    async with m:
        assert await m.call("k", "get") == 2


async def test_an_unencodable_state_is_logged_even_after_an_earlier_storage_failure(
    make_manager: Callable[..., keyhive.InstanceManager], caplog: pytest.LogCaptureFixture,
) -> None:
    """The CodecError of a retry is logged (once) even when a storage error came first.

    Only the first failure of an incarnation was logged at WARNING, later CodecErrors at
    DEBUG: after a storage outage, an agent whose state became unencodable kept failing
    its hibernate forever without a word about why.
    """
    storage = FaultyStorage()
    async with make_manager(storage=storage, idle_timeout=10, retry_backoff=(1.0, 1.0)) as m:
        events = EventRecorder(m)
        storage.fail_save = 1
        await m.call("k", "incr")
        await events.wait_for("hibernate_failed", "k")  # a storage error: logged
        await m.call("k", ("set", "tags", {"a", "b"}))  # a set: JSON cannot encode it
        await events.wait_count("hibernate_failed", 5, "k")
        codec = [r for r in caplog.records if r.levelname == "ERROR" and "cannot be encoded" in r.getMessage()]
        assert len(codec) == 1, [r.getMessage() for r in caplog.records]
        assert "'k'" in codec[0].getMessage() and "list" in codec[0].getMessage()  # the key, and a hint
        assert (await m.lookup("k")) is not None  # kept alive
        await m.call("k", ("set", "tags", ["a", "b"]))
        await events.wait_for("hibernated", "k")


class Quitter(keyhive.Agent):
    """Stops itself with whatever reason it is told."""

    def initial_state(self, params: dict[str, object]) -> dict[str, int]:
        return {"n": 0}

    async def handle(self, message: object) -> int:
        if isinstance(message, str) and message.startswith("quit:"):
            self.stop(message.removeprefix("quit:"))
        else:
            self.state["n"] += 1
        return self.state["n"]


@pytest.mark.parametrize("reason", list(keyhive.StopReason))
async def test_a_failed_self_stop_with_any_reason_is_retried_and_never_wedges_the_agent(
    make_manager: Callable[..., keyhive.InstanceManager], reason: keyhive.StopReason,
) -> None:
    """``self.stop(reason)`` behaves like ``self.stop()`` whatever the reason it reports.

    A self-stop with a reason other than NORMAL took the failure path of that reason:
    "shutdown" kept the turn for a drain that was not coming (every later call hung),
    "stopped"/"unsaved"/"conflict" were never retried, "conflict"... stopped unsaved.
    """
    storage = FaultyStorage()
    async with make_manager(Quitter, storage=storage, retry_backoff=(1.0, 1.0)) as m:
        ref = await m.get("k")
        await ref.call("incr")
        storage.fail_save = 1
        events = EventRecorder(m)
        await ref.call(f"quit:{reason}")
        await events.wait_for("hibernate_failed", "k")
        assert await asyncio.wait_for(ref.call("incr"), 5) == 2  # not wedged
        assert await asyncio.wait_for(ref.wait_stopped(), 30) is reason  # retried, reported as asked
        assert await m.call("k", "incr") == 3  # nothing lost


async def test_an_idle_stop_waiting_for_a_busy_agent_leaves_it_to_close(
    make_manager: Callable[..., keyhive.InstanceManager],
) -> None:
    """An idle stop queued behind a long call, when close begins meanwhile, yields to the drain.

    It went on as if the manager were open: it hibernated the agent as IDLE_TIMEOUT in
    the middle of the drain, or (not due any more) armed a timer on the closed wheel
    that outlived the manager.
    """
    async with make_manager(idle_timeout=1) as m:
        ref = await m.get("k")
        call = asyncio.ensure_future(ref.call(("sleep", 5), timeout=None))
        await asyncio.sleep(4.5)  # idle fired at t=1 while busy: the stop waits for the turn
        ref.touch()  # not due any more at t=5
        closing = asyncio.ensure_future(m.close())
        await asyncio.sleep(0.1)
        assert await call == 1
        await closing
    assert ref.stop_reason is keyhive.StopReason.SHUTDOWN
    assert not m._core.wheel._handles, m._core.wheel._handles
