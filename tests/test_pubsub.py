"""Publish/subscribe per incarnation (SPEC §12): order, ownership, overflow, snapshot, end of stream."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

import keyhive

pytestmark = pytest.mark.looptime

TIMEOUT = 300.0


class Room(keyhive.Agent):
    """Publishes what it is told; a turn may suspend between its publishes."""

    def initial_state(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"log": [], "count": 0, **params}

    async def handle(self, message: Any) -> Any:
        op = message[0]
        if op == "say":  # publish, suspend (the turn is handed off), publish again
            _, who, i = message
            self._say(f"{who}:{i}:a")
            await asyncio.sleep(0)
            self._say(f"{who}:{i}:b")
        elif op == "burst":
            for i in range(message[1]):
                self._say(i)
        elif op == "incr":  # suspends before it counts: concurrent incr turns interleave with reads
            await asyncio.sleep(0)
            self.state["count"] += 1
            self.publish(self.state["count"])
        elif op == "slow":
            await asyncio.sleep(message[1])
        elif op == "stop":
            self._say("bye")
            self.stop()
        return len(self.state["log"])

    def _say(self, event: Any) -> None:
        self.state["log"].append(event)
        self.publish(event)


def _subscribers(ref: keyhive.AgentRef) -> list[Any]:
    x = ref._x
    return list((x.subscribers if x is not None else None) or ())


async def _take(events: Any, n: int) -> list[Any]:
    return [await anext(events) for _ in range(n)]


async def test_every_subscriber_gets_every_event_in_publish_order(make_manager: Any) -> None:
    """Interleaved turns of many publishers reach every subscriber in the one order they were published."""
    async with make_manager(Room) as m:
        ref = await m.get("room")
        async with contextlib.AsyncExitStack() as stack:
            subs = [await stack.enter_async_context(ref.subscribe()) for _ in range(3)]
            publishers, rounds = 8, 10
            readers = [asyncio.create_task(_take(s, publishers * rounds * 2)) for s in subs]

            async def publisher(who: int) -> None:
                for i in range(rounds):
                    await ref.call(("say", who, i))

            await asyncio.gather(*(publisher(w) for w in range(publishers)))
            got = await asyncio.gather(*readers)
        log = (await ref.state())["log"]
        assert len(log) == publishers * rounds * 2
        assert log != sorted(log)  # the turns really interleaved with their callers
        for seen in got:
            assert seen == log


async def test_publish_starts_no_task_per_subscriber(make_manager: Any) -> None:
    """Subscribing and publishing to 200 subscribers leaves the number of tasks unchanged."""
    async with make_manager(Room) as m:
        ref = await m.get("room")
        await ref.call(("burst", 1))  # warm up: whatever a first call starts is not counted
        before = len(asyncio.all_tasks())
        async with contextlib.AsyncExitStack() as stack:
            subs = [await stack.enter_async_context(ref.subscribe()) for _ in range(200)]
            await ref.call(("burst", 5))
            assert len(asyncio.all_tasks()) == before
            for s in subs:
                assert await _take(s, 5) == [0, 1, 2, 3, 4]
        assert len(asyncio.all_tasks()) == before


async def test_a_subscription_is_an_owner_until_it_closes(make_manager: Any) -> None:
    """While subscribed the agent never idles out; it idles out a full timeout after the subscription closes."""
    loop = asyncio.get_running_loop()
    async with make_manager(Room, idle_timeout=TIMEOUT) as m:
        ref = await m.get("room")
        async with ref.subscribe() as events:
            assert ref.attachments == 1
            await asyncio.sleep(TIMEOUT * 5)
            assert ref.alive
            await ref.call(("burst", 1))
            assert await anext(events) == 0
        assert ref.attachments == 0
        closed = loop.time()
        assert await ref.wait_stopped() is keyhive.StopReason.IDLE_TIMEOUT
        assert TIMEOUT <= loop.time() - closed <= TIMEOUT + 0.05


async def test_a_slow_subscriber_overflows_alone(make_manager: Any) -> None:
    """A subscriber more than subscriber_buffer behind is dropped with SubscriberOverflow; the others go on."""
    async with make_manager(Room, subscriber_buffer=5) as m:
        ref = await m.get("room")
        async with ref.subscribe() as slow, ref.subscribe() as fast:
            await ref.call(("burst", 5))  # exactly the buffer: nobody is dropped
            assert await _take(fast, 5) == [0, 1, 2, 3, 4]
            assert len(_subscribers(ref)) == 2
            async with asyncio.timeout(1):  # the agent never waits for the slow one
                await ref.call(("burst", 1))
            assert slow.ended and not fast.ended
            assert _subscribers(ref) == [fast]
            with pytest.raises(keyhive.SubscriberOverflow, match="subscriber_buffer"):
                await anext(slow)
            with pytest.raises(keyhive.SubscriberOverflow):  # and it stays dropped
                await anext(slow)
            await ref.call(("burst", 2))
            assert await _take(fast, 3) == [0, 0, 1]
        assert ref.attachments == 0 and _subscribers(ref) == []


async def test_snapshot_then_stream_has_no_gap_and_no_duplicate(make_manager: Any) -> None:
    """subscribe(snapshot=True) while turns publish concurrently: the snapshot plus the stream is every count once."""
    async with make_manager(Room) as m:
        ref = await m.get("room")
        writers, rounds = 10, 20
        total = writers * rounds

        async def writer() -> None:
            for _ in range(rounds):
                await ref.call(("incr",))

        calls = [asyncio.create_task(writer()) for _ in range(writers)]
        for _ in range(30):  # let some of them run first
            await asyncio.sleep(0)
        async with ref.subscribe(snapshot=True) as events:
            start = events.snapshot["count"]
            assert 0 < start < total  # taken while the publishing turns were going on
            rest = await _take(events, total - start)
            await asyncio.gather(*calls)
        assert rest == list(range(start + 1, total + 1))
        events.snapshot["count"] = -1  # a copy: the agent's state is untouched
        assert (await ref.state())["count"] == total


async def test_snapshot_is_none_without_asking_for_one(make_manager: Any) -> None:
    """A plain subscribe() has no snapshot."""
    async with make_manager(Room) as m:
        ref = await m.get("room")
        async with ref.subscribe() as events:
            assert events.snapshot is None


async def test_stream_ends_with_the_stop_reason_for_a_waiting_subscriber(make_manager: Any) -> None:
    """A subscriber blocked in __anext__ gets what was buffered, then the end of the stream and the StopReason."""
    async with make_manager(Room) as m:
        ref = await m.get("room")

        async def read_all() -> tuple[list[Any], Any]:
            async with ref.subscribe() as events:
                return [e async for e in events], events.stop_reason

        reader = asyncio.create_task(read_all())
        while not _subscribers(ref):
            await asyncio.sleep(0)
        await ref.call(("burst", 3))
        await m.stop("room")
        seen, reason = await asyncio.wait_for(reader, 1)
        assert seen == [0, 1, 2]
        assert reason is keyhive.StopReason.STOPPED


async def test_stream_ends_when_the_agent_stops_itself(make_manager: Any) -> None:
    """self.stop(): what the last turn published arrives, then the stream ends with NORMAL."""
    async with make_manager(Room) as m:
        ref = await m.get("room")
        async with ref.subscribe() as events:
            await ref.call(("stop",))
            assert [e async for e in events] == ["bye"]
            assert events.stop_reason is keyhive.StopReason.NORMAL
            assert events.ended


@pytest.mark.parametrize("snapshot", [False, True])
async def test_subscribe_to_a_stopped_ref_raises(make_manager: Any, snapshot: bool) -> None:
    """Subscribing to an incarnation that has stopped raises AgentStopped and leaves nothing behind."""
    async with make_manager(Room) as m:
        ref = await m.get("room")
        await m.stop("room")
        with pytest.raises(keyhive.AgentStopped):
            async with ref.subscribe(snapshot=snapshot):
                pass  # pragma: no cover
        assert _subscribers(ref) == []


async def test_cancelled_reader_leaves_nothing_behind(make_manager: Any) -> None:
    """A subscriber cancelled in __anext__ is unsubscribed and detached; the idle timer runs again."""
    loop = asyncio.get_running_loop()
    async with make_manager(Room, idle_timeout=TIMEOUT) as m:
        ref = await m.get("room")

        async def read() -> None:
            async with ref.subscribe() as events:
                async for _ in events:
                    pass

        reader = asyncio.create_task(read())
        while not _subscribers(ref):
            await asyncio.sleep(0)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        assert _subscribers(ref) == [] and ref.attachments == 0
        await ref.call(("burst", 1))  # publishing to nobody is fine
        gone = loop.time()
        assert await ref.wait_stopped() is keyhive.StopReason.IDLE_TIMEOUT
        assert loop.time() - gone <= TIMEOUT + 0.05


async def test_cancelled_snapshot_subscribe_leaves_nothing_behind(make_manager: Any) -> None:
    """A subscribe(snapshot=True) cancelled while it waits for a busy turn leaves no owner and no subscriber."""
    async with make_manager(Room, idle_timeout=TIMEOUT) as m:
        ref = await m.get("room")
        busy = asyncio.create_task(ref.call(("slow", 10.0), timeout=None))
        await asyncio.sleep(0)

        async def enter() -> None:
            async with ref.subscribe(snapshot=True):
                pass  # pragma: no cover

        entering = asyncio.create_task(enter())
        await asyncio.sleep(1)
        assert ref.attachments == 1  # attached while it waits for the turn
        entering.cancel()
        with pytest.raises(asyncio.CancelledError):
            await entering
        assert ref.attachments == 0 and _subscribers(ref) == []
        await busy
        assert await ref.wait_stopped() is keyhive.StopReason.IDLE_TIMEOUT


async def test_snapshot_subscribe_when_the_agent_stops_while_waiting(make_manager: Any) -> None:
    """A subscribe(snapshot=True) queued behind a turn that stops the agent raises AgentStopped."""
    async with make_manager(Room) as m:
        ref = await m.get("room")
        busy = asyncio.create_task(ref.call(("slow", 1.0)))
        await asyncio.sleep(0)
        stopping = asyncio.create_task(m.stop("room"))
        await asyncio.sleep(0)
        with pytest.raises(keyhive.AgentStopped):
            async with ref.subscribe(snapshot=True):
                pass  # pragma: no cover
        await busy
        await stopping
        assert ref.attachments == 0 and _subscribers(ref) == []


def test_the_push_docs_room_example_prints_what_the_docs_say(tmp_path: Any) -> None:
    """docs/push-and-timers.md's broadcasting room runs as written and prints each listener's lines as shown."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "push-and-timers.md").read_text()
    push = text.split("## Push", 1)[1].split("## Timers", 1)[0]
    code, shown = re.findall(r"```(?:python)?\n(.*?)```", push, re.S)[:2]
    (tmp_path / "room.py").write_text(code)
    out = subprocess.run([sys.executable, "room.py"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    for name in ("bob", "cy"):  # the two listeners' lines may interleave, each in its order
        mine = [line for line in out.splitlines() if line.startswith(name)]
        assert mine == [line for line in shown.splitlines() if line.startswith(name)]
