"""Turns run to completion and re-entrancy is an error, not a deadlock (SPEC §8).

A caller's timeout or cancellation stops only the caller; the turn goes on and its effect
stands. A call that would wait for a turn held up its own call chain raises
ReentrancyError at once, naming the chain. A handler that never suspends still runs in
the caller's task with no task made for it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

import keyhive

pytestmark = pytest.mark.looptime

GUARD = 10.0  # loop seconds: a deadlock fails the test instead of hanging it


class Chat(keyhive.Agent):
    """A three-step handler: append the user message, await, the reply, await, "done"."""

    def initial_state(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"log": []}

    async def handle(self, message: Any) -> Any:
        if message == "get":
            return list(self.state["log"])
        if message == "boom-later":
            await asyncio.sleep(1)
            raise RuntimeError("orphaned boom")
        if isinstance(message, tuple) and message[0] == "slow":  # runs over turn_timeout
            self.state["log"].append("began")
            await asyncio.sleep(message[1])
            self.state["log"].append("never")
            return None
        self.state["log"].append(f"user:{message}")
        await asyncio.sleep(1)
        self.state["log"].append(f"reply:{message}")
        await asyncio.sleep(1)
        self.state["log"].append(f"done:{message}")
        return len(self.state["log"])


FINISHED = ["user:m", "reply:m", "done:m"]


# -- a turn runs to completion -----------------------------------------------------------------


@pytest.mark.parametrize("how", ["cancel", "timeout"])
@pytest.mark.parametrize("at", [0.0, 0.5, 1.0, 1.5, 1.999], ids=lambda t: f"t{t}")
async def test_a_caller_leaving_at_any_await_leaves_a_finished_turn(make_manager: Any, how: str,
                                                                    at: float) -> None:
    """Cancelling or timing out the caller at each await of a multi-step handler never leaves
    half a turn: afterwards the state holds all three steps."""
    async with make_manager(Chat) as m:
        ref = await m.get("k")
        if how == "cancel":
            caller = asyncio.create_task(ref.call("m", timeout=None))
            await asyncio.sleep(at)
            caller.cancel()
            with pytest.raises(asyncio.CancelledError):
                await caller
        else:
            with pytest.raises(TimeoutError):
                await ref.call("m", timeout=at)
        async with asyncio.timeout(GUARD):
            assert await ref.call("get") == FINISHED  # queued behind the turn, which finished
        assert (await ref.state())["log"] == FINISHED
        assert ref.alive and not ref._busy


async def test_a_queued_call_whose_caller_timed_out_is_still_handled(make_manager: Any,
                                                                     caplog: Any) -> None:
    """A call queued behind a busy turn whose caller timed out is still handled in its turn
    (it was sent); its reply is dropped quietly, and an orphaned turn's exception is logged
    with the key."""
    caplog.set_level(logging.WARNING, logger="keyhive")
    async with make_manager(Chat) as m:
        ref = await m.get("k")
        first = asyncio.create_task(ref.call("a", timeout=None))
        await asyncio.sleep(0)
        with pytest.raises(TimeoutError):
            await ref.call("b", timeout=0.5)  # queued: gave up before its turn came
        with pytest.raises(TimeoutError):
            await ref.call("boom-later", timeout=0.5)
        assert await first == 3
        assert await ref.call("get", timeout=GUARD) == [
            "user:a", "reply:a", "done:a", "user:b", "reply:b", "done:b"]
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, [r.getMessage() for r in errors]  # b's reply: dropped quietly
        assert "'k'" in errors[0].getMessage() and "orphaned boom" in errors[0].getMessage()


async def test_turn_timeout_cancels_the_handler_and_keeps_the_agent(make_manager: Any,
                                                                    caplog: Any) -> None:
    """A handler running past turn_timeout is cancelled: its caller gets TimeoutError, the
    error is logged with the key, and the agent keeps the state the handler left."""
    caplog.set_level(logging.ERROR, logger="keyhive")
    async with make_manager(Chat, turn_timeout=3) as m:
        ref = await m.get("k")
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(TimeoutError):
            await ref.call(("slow", 100), timeout=None)
        assert 3 <= loop.time() - began < 4
        assert any("'k'" in r.getMessage() and "turn_timeout" in r.getMessage() for r in caplog.records)
        assert ref.alive
        assert await ref.call("get") == ["began"]  # as the handler left it
        assert await ref.call("m") == 4  # 2 s of steps: within turn_timeout


# -- the fast path --------------------------------------------------------------------------------


class Where(keyhive.Agent):
    """Reports which task runs its handler, before and after an optional suspension."""

    async def handle(self, message: Any) -> Any:
        before = asyncio.current_task()
        tasks = len(asyncio.all_tasks())
        if message == "suspend":
            await asyncio.sleep(0.1)
        return before, asyncio.current_task(), tasks


async def test_a_handler_that_never_suspends_runs_in_the_callers_task(make_manager: Any) -> None:
    """A non-suspending handler runs in the caller's task and creates no task; one that
    suspends finishes in another task."""
    async with make_manager(Where) as m:
        ref = await m.get("k")
        for _ in range(5):  # let the manager's own start-up work (the first timer poll) finish
            await asyncio.sleep(0)
        me = asyncio.current_task()
        count = len(asyncio.all_tasks())
        before, after, inside = await ref.call("plain")
        assert before is me and after is me
        assert inside == count == len(asyncio.all_tasks())
        before, after, _ = await ref.call("suspend")
        assert before is me  # started by hand in the caller's task
        assert after is not me  # the rest of the turn was handed to a task of the manager's
        await asyncio.sleep(0)
        assert len(asyncio.all_tasks()) == count


class Order(keyhive.Agent):
    """Logs messages in handling order; odd ones suspend."""

    def initial_state(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"seen": []}

    async def handle(self, message: Any) -> Any:
        if message == "get":
            return list(self.state["seen"])
        if message % 2:
            await asyncio.sleep(0.01 * (message % 5))
        self.state["seen"].append(message)
        return message


async def test_fifo_order_of_mixed_calls_and_casts(make_manager: Any) -> None:
    """Calls and casts are handled one at a time in arrival order, whether their handlers
    suspend or not."""
    async with make_manager(Order) as m:
        ref = await m.get("k")
        calls = []
        for i in range(60):
            if i % 3 == 0:
                await ref.cast(i)
            else:
                calls.append((i, asyncio.create_task(ref.call(i, timeout=None))))
                await asyncio.sleep(0)  # the call enters the queue now, in order
        for i, task in calls:
            assert await task == i
        assert await ref.call("get", timeout=None) == list(range(60))


# -- re-entrancy ----------------------------------------------------------------------------------


class Hop(keyhive.Agent):
    """Calls along a path of keys; optionally suspends first; can stop or read itself."""

    async def handle(self, message: Any) -> Any:
        kind = message[0]
        manager = keyhive.get_manager(self.manager)
        if message[-1] == "slow":
            await asyncio.sleep(0.1)
        if kind == "hop":
            path, timeout = message[1], message[2]
            if not path:
                return [self.key]
            rest = await manager.call(path[0], ("hop", path[1:], timeout, message[-1]), timeout=timeout)
            return [self.key, *rest]
        if kind == "stop-me":
            await manager.stop(self.key)
        elif kind == "my-state":
            ref = await manager.get(self.key)
            return await ref.state()
        elif kind == "busy":
            await asyncio.sleep(1)
            return self.key
        elif kind == "via":
            return await manager.call(message[1], ("busy", "fast"), timeout=None)
        return None


@pytest.mark.parametrize("mode", ["fast", "slow"])
@pytest.mark.parametrize("timeout", [5.0, None])
@pytest.mark.parametrize(("path", "chain"), [
    (["a"], ["a", "a"]),
    (["b", "a"], ["a", "b", "a"]),
    (["b", "c", "b"], ["b", "c", "b"]),
])
async def test_a_call_cycle_raises_reentrancy_error_at_once(make_manager: Any, mode: str,
                                                            timeout: float | None, path: list[str],
                                                            chain: list[str]) -> None:
    """An agent calling itself, A -> B -> A, and a cycle further down raise ReentrancyError at
    once (timeout=None too), naming the chain, whether the handlers suspend or not."""
    async with make_manager(Hop) as m:
        loop = asyncio.get_running_loop()
        began = loop.time()
        async with asyncio.timeout(GUARD):
            with pytest.raises(keyhive.ReentrancyError) as info:
                await m.call("a", ("hop", path, timeout, mode), timeout=timeout)
        slept = 0.1 * (len(path) + 1) if mode == "slow" else 0.0
        assert loop.time() - began <= slept + 0.01  # at once: no wait for any timeout
        assert info.value.chain == chain
        assert " -> ".join(repr(k) for k in chain) in str(info.value)
        for key in {"a", *path}:  # every turn of the chain was given back
            assert await m.call(key, ("hop", [], None, "fast")) == [key]


@pytest.mark.parametrize("mode", ["fast", "slow"])
async def test_stop_and_state_of_its_own_key_from_a_handler_raise_reentrancy_error(
        make_manager: Any, mode: str) -> None:
    """manager.stop(own key) and ref.state() of itself from its own handler raise
    ReentrancyError at once instead of deadlocking; the agent keeps running."""
    async with make_manager(Hop) as m:
        async with asyncio.timeout(GUARD):
            with pytest.raises(keyhive.ReentrancyError, match="'a' -> 'a'"):
                await m.call("a", ("stop-me", mode), timeout=None)
            with pytest.raises(keyhive.ReentrancyError, match="'a' -> 'a'"):
                await m.call("a", ("my-state", mode), timeout=None)
        ref = await m.lookup("a")
        assert ref is not None and ref.alive
        await m.stop("a")  # from outside: fine


@pytest.mark.parametrize("mode", ["fast", "slow"])
async def test_a_chain_without_a_cycle_works(make_manager: Any, mode: str) -> None:
    """A -> B -> C (no cycle) answers, suspending or not."""
    async with make_manager(Hop) as m, asyncio.timeout(GUARD):
        assert await m.call("a", ("hop", ["b", "c"], None, mode), timeout=None) == ["a", "b", "c"]


async def test_unrelated_callers_waiting_for_a_busy_agent_never_get_reentrancy_error(
        make_manager: Any) -> None:
    """Plain tasks and other agents' turns that wait for one busy agent all get their answer
    in turn: waiting for a turn nobody up the chain holds is not re-entrancy."""
    async with make_manager(Hop) as m:
        x = await m.get("x")
        async with asyncio.timeout(3 * GUARD):  # ten turns of 1 s, one after the other
            plain = [asyncio.create_task(x.call(("busy", "fast"), timeout=None)) for _ in range(5)]
            agents = [asyncio.create_task(m.call(f"y{i}", ("via", "x", "fast"), timeout=None))
                      for i in range(5)]
            results = await asyncio.gather(*plain, *agents)
        assert results == ["x"] * 10
