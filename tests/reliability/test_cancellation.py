"""Cancellation at every await point: nothing half-registered, no stranded waiter, no lost state.

Every test cancels one operation in the middle of one await (a slow load, a slow
``on_start``, a wait for a stopping incarnation, a queued or running call, a slow save
under ``stop`` or ``close``), then checks the same things: the registry holds only
running agents, every turn is free with nobody queued, the manager owns no task, the
stored state is the last acknowledged one, and the next ``get`` works.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

import keyhive
from keyhive._keys import storage_key
from keyhive.testing import EventRecorder, FaultyStorage

pytestmark = pytest.mark.looptime


class Slow(keyhive.Agent):
    """A counter whose start can be slowed and whose handler can sleep."""

    start_delay = 0.0
    starts = 0

    def initial_state(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"n": 0}

    async def on_start(self, thawed: bool) -> None:
        type(self).starts += 1
        if self.start_delay:
            await asyncio.sleep(self.start_delay)

    async def handle(self, message: Any) -> Any:
        if message == "incr":
            self.state["n"] += 1
        elif isinstance(message, tuple) and message[0] == "wait":
            await message[1].wait()
            self.state["n"] += 1
        elif isinstance(message, tuple) and message[0] == "sleep":
            await asyncio.sleep(message[1])
            self.state["n"] += 1
        return self.state["n"]


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def assert_clean(m: keyhive.InstanceManager) -> None:
    """Nothing half-registered, no turn held, nobody queued, no task left behind."""
    await settle()
    for reg in m._core.regs.values():
        for key, ref in reg.items():
            assert ref.alive and ref._status == 1, (key, ref)  # RUNNING
            assert not ref._busy, ref
            assert ref._x is None or not ref._x.waiters, ref
    assert not [t for t in m._core.tasks if not t.done()], m._core.tasks
    assert m._core.reaper.task is None


async def stored_n(storage: Any, name: str, key: Any) -> int | None:
    cp = await storage.load(storage_key(name, None, key))
    if cp is None:
        return None
    import orjson

    from keyhive.codecs import unpack

    n: int = orjson.loads(unpack(cp.data)[1])["n"]
    return n


async def test_get_cancelled_during_thaw(make_manager: Any) -> None:
    """A get cancelled in a slow load registers nothing; the next get thaws the stored state."""
    storage = FaultyStorage()
    async with make_manager(Slow, storage=storage) as m:
        await m.call("k", "incr")
        await m.stop("k")
        before = await storage.inner.load(storage_key(m.name, None, "k"))
        storage.load_delay = 5.0
        task = asyncio.create_task(m.get("k"))
        await asyncio.sleep(1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await m.lookup("k") is None
        assert (await m.stats()).total == 0
        await assert_clean(m)
        assert await storage.inner.load(storage_key(m.name, None, "k")) == before
        storage.load_delay = 0
        assert await m.call("k", "incr") == 2


async def test_get_cancelled_during_thaw_hands_over_to_the_waiting_get(make_manager: Any) -> None:
    """When the get doing the thaw is cancelled, a get waiting on it starts its own and succeeds."""
    storage = FaultyStorage()
    async with make_manager(Slow, storage=storage) as m:
        storage.load_delay = 5.0
        first = asyncio.create_task(m.get("k"))
        await asyncio.sleep(1)
        second = asyncio.create_task(m.get("k"))
        await asyncio.sleep(1)
        first.cancel()
        ref = await second
        assert ref.alive
        with pytest.raises(asyncio.CancelledError):
            await first
        await assert_clean(m)
        assert (await m.stats()).keys == ["k"]


async def test_get_cancelled_during_start(make_manager: Any) -> None:
    """A get cancelled in a slow on_start registers nothing; the next get starts (thaws) again."""
    storage = FaultyStorage()

    class SlowStart(Slow):
        start_delay = 0.0

    async with make_manager(SlowStart, storage=storage) as m:
        await m.call("k", "incr")
        await m.stop("k")
        SlowStart.start_delay = 5.0
        task = asyncio.create_task(m.get("k"))
        await asyncio.sleep(1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await m.lookup("k") is None
        await assert_clean(m)
        SlowStart.start_delay = 0.0
        assert await m.call("k", "incr") == 2
        assert await stored_n(storage.inner, m.name, "k") == 1


async def test_get_cancelled_while_waiting_for_a_stopping_incarnation(make_manager: Any) -> None:
    """A get waiting for a hibernate is cancelled; the hibernate finishes; the next get thaws it."""
    storage = FaultyStorage()
    async with make_manager(Slow, storage=storage) as m:
        ref = await m.get("k")
        await ref.call("incr")
        storage.save_delay = 5.0
        stopping = asyncio.create_task(m.stop("k"))
        await asyncio.sleep(1)
        waiter = asyncio.create_task(m.get("k"))
        await asyncio.sleep(1)
        assert not waiter.done()
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await stopping
        assert not ref.alive
        assert ref._x is None or ref._x.change is None or ref._x.change.done()
        await assert_clean(m)
        storage.save_delay = 0
        assert await m.call("k", "incr") == 2


async def test_call_cancelled_while_queued(make_manager: Any) -> None:
    """A queued call whose caller is cancelled is still handled in its turn (it was sent, SPEC §8),
    and the turn goes on to the next in line."""
    async with make_manager(Slow) as m:
        ref = await m.get("k")
        running = asyncio.create_task(ref.call(("sleep", 5), timeout=None))
        await asyncio.sleep(0)
        queued = asyncio.create_task(ref.call("incr"))
        behind = asyncio.create_task(ref.call("incr", timeout=None))
        await asyncio.sleep(1)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert await running == 1
        assert await behind == 3  # the cancelled caller's increment ran in its turn
        await assert_clean(m)
        assert await ref.call("get") == 3


async def test_call_cancelled_just_as_the_turn_is_handed_to_it(make_manager: Any) -> None:
    """A queued call cancelled after the turn was handed to it, before it ran, is handled all the
    same (SPEC §8: it was sent), and the turn goes on."""
    async with make_manager(Slow) as m:
        ref = await m.get("k")
        gate = asyncio.Event()
        running = asyncio.create_task(ref.call(("wait", gate)))
        await asyncio.sleep(0)
        queued = asyncio.create_task(ref.call("incr"))
        await asyncio.sleep(0)
        fut = ref._x.waiters[0].fut
        gate.set()
        # spin, not wait: we must act in the window between the hand-over and the waiter running
        while not fut.done():
            await asyncio.sleep(0)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert await running == 1
        assert await ref.call("incr") == 3  # behind the cancelled caller's increment
        await assert_clean(m)


async def test_call_cancelled_while_running(make_manager: Any) -> None:
    """A call cancelled inside a suspended handler stops only the caller: the turn runs to
    completion (SPEC §8), then the next call runs; the agent keeps serving."""
    async with make_manager(Slow) as m:
        ref = await m.get("k")
        running = asyncio.create_task(ref.call(("sleep", 5), timeout=None))
        await asyncio.sleep(0)
        queued = asyncio.create_task(ref.call("incr", timeout=None))
        await asyncio.sleep(1)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        assert await queued == 2  # the cancelled caller's turn finished its increment first
        assert ref.alive
        await assert_clean(m)


async def test_call_timing_out_while_running(make_manager: Any) -> None:
    """A call that times out in its handler raises TimeoutError; its turn finishes, then frees."""
    async with make_manager(Slow) as m:
        ref = await m.get("k")
        with pytest.raises(TimeoutError):
            await ref.call(("sleep", 10), timeout=1)
        assert await ref.call("incr", timeout=None) == 2  # behind the finished turn
        await assert_clean(m)


async def test_stop_cancelled_during_hibernate(make_manager: Any) -> None:
    """A stop cancelled in a slow save still finishes the hibernate: the state is saved and stopped."""
    storage = FaultyStorage()
    async with make_manager(Slow, storage=storage) as m:
        events = EventRecorder(m)
        ref = await m.get("k")
        await ref.call("incr")
        storage.save_delay = 5.0
        stop = asyncio.create_task(m.stop("k"))
        await asyncio.sleep(1)
        queued = asyncio.create_task(ref.call("incr"))  # waits behind the hibernate
        await asyncio.sleep(0)
        stop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stop
        await events.wait_for("stopped", "k")
        with pytest.raises(keyhive.AgentStopped):
            await queued  # never stranded
        assert not ref.alive
        assert await stored_n(storage.inner, m.name, "k") == 1
        await assert_clean(m)
        storage.save_delay = 0
        assert await m.call("k", "incr") == 2


async def test_stop_cancelled_while_waiting_for_the_turn(make_manager: Any) -> None:
    """A stop cancelled while it waits behind a running call leaves the agent running and the turn free."""
    async with make_manager(Slow) as m:
        ref = await m.get("k")
        running = asyncio.create_task(ref.call(("sleep", 5), timeout=None))
        await asyncio.sleep(0)
        stop = asyncio.create_task(m.stop("k"))
        await asyncio.sleep(1)
        stop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stop
        assert await running == 1
        assert ref.alive
        await assert_clean(m)
        await m.stop("k")
        assert not ref.alive


async def test_close_cancelled_keeps_closing_and_saves_everything(make_manager: Any) -> None:
    """Cancelling close does not stop the drain: every agent is saved, the manager closes, reopens."""
    storage = FaultyStorage()
    m = make_manager(Slow, storage=storage, name="closing")
    await m.start()
    for i in range(10):
        await m.call(i, "incr")
    storage.save_delay = 5.0
    closer = asyncio.create_task(m.close())
    await asyncio.sleep(1)
    closer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closer
    assert not m.running
    await m.close()  # waits for the drain under way
    assert not m.running
    assert (await m.stats()).total == 0
    for i in range(10):
        assert await stored_n(storage.inner, "closing", i) == 1
    storage.save_delay = 0
    async with m:
        assert await m.call(3, "incr") == 2


async def test_owner_task_cancelled_detaches(make_manager: Any) -> None:
    """An attached owner task that is cancelled is detached, and the idle timer starts again."""
    async with make_manager(Slow, idle_timeout=60) as m:
        ref = await m.get("k")
        attached = asyncio.Event()

        async def owner() -> None:
            async with m.attach("k"):
                attached.set()
                await asyncio.sleep(3600)

        task = asyncio.create_task(owner())
        await attached.wait()
        assert ref.attachments == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert ref.attachments == 0
        assert await ref.wait_stopped() is keyhive.StopReason.IDLE_TIMEOUT
        await assert_clean(m)


@pytest.mark.parametrize("delay_at", [0.5, 1.0, 1.5, 2.0, 2.5])
async def test_cancel_a_get_at_every_point_of_a_thaw_and_start(make_manager: Any, delay_at: float) -> None:
    """Sweep the cancel point through load (0-1 s) and on_start (1-2 s) and past it: always clean."""
    storage = FaultyStorage()

    class SlowStart(Slow):
        start_delay = 1.0

    async with make_manager(SlowStart, storage=storage) as m:
        await m.call("k", "incr")
        await m.stop("k")
        storage.load_delay = 1.0
        task = asyncio.create_task(m.get("k"))
        await asyncio.sleep(delay_at)
        task.cancel()
        try:
            ref = await task
        except asyncio.CancelledError:
            assert await m.lookup("k") is None
        else:
            assert ref.alive
        await assert_clean(m)
        assert await m.call("k", "incr") == 2


async def test_waiter_cancelled_before_a_failed_thaw_leaves_no_unretrieved_error(
    make_manager: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A get waiting on a thaw is cancelled, then the thaw fails: asyncio logs no lost exception.

    Found by the soak: the failed activation set its error on the shared change future
    that only the cancelled waiter had been awaiting, and asyncio reported "Future
    exception was never retrieved" when the future was collected.
    """
    import gc

    storage = FaultyStorage()
    async with make_manager(Slow, storage=storage) as m:
        storage.load_delay = 2.0
        storage.fail_load = True
        first = asyncio.create_task(m.get("k"))
        await asyncio.sleep(0.5)
        waiter = asyncio.create_task(m.get("k"))
        await asyncio.sleep(0.5)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        with pytest.raises(keyhive.ThawError):
            await first
        del first, waiter
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            gc.collect()
            await asyncio.sleep(0)
        assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text
        await assert_clean(m)


async def test_stop_racing_a_close_that_gives_up_gets_an_error_not_a_cancellation(make_manager: Any) -> None:
    """A stop whose slow save is abandoned by close at its deadline raises ManagerClosed, not CancelledError.

    Found while probing close: close cancels the manager's own tasks after its deadline,
    and the stop awaiting its hibernate task received that CancelledError although
    nobody had cancelled the stop's caller (which would tear down a TaskGroup or server).
    """
    storage = FaultyStorage()
    m = make_manager(Slow, storage=storage, close_timeout=1)
    await m.start()
    await m.call("k", "incr")
    storage.save_delay = 10.0
    stop = asyncio.create_task(m.stop("k"))
    await asyncio.sleep(0.1)
    with pytest.raises(keyhive.UnsavedAgentsError) as info:
        await m.close()
    assert info.value.keys == [(None, "k")]
    with pytest.raises(keyhive.ManagerClosed, match="before the checkpoint"):
        await stop
    assert not stop.cancelled()


async def test_a_new_manager_of_the_same_name_cannot_start_while_the_old_one_drains(make_manager: Any) -> None:
    """A close that was cancelled keeps draining; a same-named manager refuses to start until it is done.

    Found while probing close: the closing manager left the process registry at once, so
    a new manager with the same name and storage could start and thaw a key whose
    newer state the old one was still writing: two live incarnations of one key, and
    the new one's acknowledged calls lost to a ConflictError.
    """
    storage = FaultyStorage()
    old = make_manager(Slow, storage=storage, name="restart")
    await old.start()
    await old.call("k", "incr")
    storage.save_delay = 5.0
    closer = asyncio.create_task(old.close())
    await asyncio.sleep(1)
    closer.cancel()  # e.g. Ctrl-C during shutdown, then a quick restart
    with pytest.raises(asyncio.CancelledError):
        await closer
    new = make_manager(Slow, storage=storage, name="restart")
    with pytest.raises(ValueError, match="still closing"):
        await new.start()
    await old.close()
    storage.save_delay = 0
    async with new:
        assert await new.call("k", "incr") == 2
