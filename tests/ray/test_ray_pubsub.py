"""Publish/subscribe across the Ray runtime (SPEC §11, §12): a shard host's events reach a client."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import keyhive
from keyhive.ray import RayManager

pytestmark = pytest.mark.timeout(180)


class Room(keyhive.Agent):
    """Publishes what it is told (importable by the shard hosts: tests/ is on their path)."""

    def initial_state(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"count": 0}

    async def handle(self, message: Any) -> Any:
        if message == "incr":
            await asyncio.sleep(0)  # concurrent turns interleave with a snapshot's turn
            self.state["count"] += 1
            self.publish({"count": self.state["count"]})
        elif isinstance(message, dict) and "burst" in message:
            for i in range(message["burst"]):
                self.publish(i)
        elif message == "bad":
            self.publish(1)
            self.publish({1, 2})  # not encodable by the JSON codec
        elif message == "stop":
            self.publish("bye")
            self.stop()
        return self.state["count"]


async def _take(events: Any, n: int) -> list[Any]:
    async with asyncio.timeout(20):
        return [await anext(events) for _ in range(n)]


@pytest.fixture
async def rooms(make_ray_manager: Any) -> Any:
    manager = make_ray_manager(Room, subscriber_buffer=50)
    await manager.start()
    try:
        yield manager
    finally:
        await manager.shutdown_hosts()


async def test_events_stream_to_every_client_subscriber_in_order(rooms: RayManager) -> None:
    """Two subscribers on a client get every event of a shard-host agent, in publish order, decoded."""
    ref = await rooms.get("room")
    async with ref.subscribe() as one, ref.subscribe() as two:
        await asyncio.gather(*(ref.call("incr") for _ in range(20)))
        expected = [{"count": i} for i in range(1, 21)]
        assert await _take(one, 20) == expected
        assert await _take(two, 20) == expected


async def test_a_subscription_is_an_owner_on_the_host(rooms: RayManager) -> None:
    """While subscribed the agent counts one attachment on its shard host; none after the block."""
    ref = await rooms.get("room")
    async with ref.subscribe():
        (seen,) = [r for r in await rooms.agents() if r.key == "room"]
        assert seen.attachments == 1
    (seen,) = [r for r in await rooms.agents() if r.key == "room"]
    assert seen.attachments == 0


async def test_snapshot_then_stream_has_no_gap_across_processes(rooms: RayManager) -> None:
    """subscribe(snapshot=True) during concurrent turns: the snapshot and the stream hold every count once."""
    ref = await rooms.get("room")
    total = 60
    calls = [asyncio.create_task(ref.call("incr")) for _ in range(total)]
    await asyncio.sleep(0)
    async with ref.subscribe(snapshot=True) as events:
        start = events.snapshot["count"]
        rest = await _take(events, total - start)
        await asyncio.gather(*calls)
    assert [e["count"] for e in rest] == list(range(start + 1, total + 1))


async def test_the_stream_ends_with_the_stop_reason(rooms: RayManager) -> None:
    """When the agent stops on its host, the client's stream ends after its last events, with the reason."""
    ref = await rooms.get("room")

    async def read_all() -> tuple[list[Any], Any]:
        async with ref.subscribe() as events:
            started.set()
            return [e async for e in events], events.stop_reason

    started = asyncio.Event()
    reader = asyncio.create_task(read_all())
    await started.wait()
    await ref.call({"burst": 3})
    await ref.call("stop")
    seen, reason = await asyncio.wait_for(reader, 20)
    assert seen == [0, 1, 2, "bye"]
    assert reason is keyhive.StopReason.NORMAL
    assert not ref.alive


async def test_overflow_on_the_host_reaches_the_client(rooms: RayManager) -> None:
    """A burst over subscriber_buffer drops the subscriber on the host: the client raises SubscriberOverflow."""
    ref = await rooms.get("room")
    async with ref.subscribe() as events:
        await ref.call({"burst": 51})
        with pytest.raises(keyhive.SubscriberOverflow, match="subscriber_buffer"):
            await _take(events, 1)
        assert events.overflowed
    (seen,) = [r for r in await rooms.agents() if r.key == "room"]
    assert seen.attachments == 0


async def test_overflow_of_a_slow_client_reader(rooms: RayManager) -> None:
    """A client-side reader more than subscriber_buffer behind is dropped too, and unsubscribed on the host."""
    ref = await rooms.get("room")
    async with ref.subscribe() as events:
        for _ in range(3):  # 90 events waiting here, each pull within the host's buffer
            await ref.call({"burst": 30})
            await asyncio.sleep(0.3)
        async with asyncio.timeout(20):
            while not events.ended:
                await asyncio.sleep(0.05)
        with pytest.raises(keyhive.SubscriberOverflow):
            await anext(events)
    (seen,) = [r for r in await rooms.agents() if r.key == "room"]
    assert seen.attachments == 0


async def test_an_unencodable_event_ends_the_stream_with_codec_error(rooms: RayManager) -> None:
    """The events before an unencodable one arrive; then iteration raises CodecError."""
    ref = await rooms.get("room")
    async with ref.subscribe() as events:
        await ref.call("bad")
        assert await _take(events, 1) == [1]
        with pytest.raises(keyhive.CodecError):
            await _take(events, 1)
    assert await ref.call("incr") == 1  # the agent runs on


async def test_subscribe_to_a_stopped_remote_ref_raises(rooms: RayManager) -> None:
    """Subscribing through a ref to an incarnation that stopped raises AgentStopped."""
    ref = await rooms.get("room")
    await rooms.stop("room")
    with pytest.raises(keyhive.AgentStopped):
        async with ref.subscribe():
            pass  # pragma: no cover
