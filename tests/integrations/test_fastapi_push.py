"""attach_websocket(..., events=True): an agent's published events reach its sockets, over real uvicorn."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="needs keyhive[fastapi]")

from fastapi import FastAPI, WebSocket
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

import keyhive
from keyhive.integrations.fastapi import attach_websocket, keyhive_lifespan
from keyhive.testing import EventRecorder

from .conftest import serve

_names = itertools.count()


class Room(keyhive.Agent):
    """Counts what it is told and publishes each message it gets."""

    def initial_state(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"said": 0}

    async def handle(self, message: Any) -> Any:
        if message.get("burst"):
            for i in range(message["burst"]):
                self.publish({"n": i})
        elif message.get("bad"):
            self.publish({"when": object()})  # not JSON
        else:
            self.state["said"] += 1
            self.publish({"said": message["say"], "count": self.state["said"]})
        return self.state["said"]


def make_app(manager: keyhive.InstanceManager) -> FastAPI:
    app = FastAPI(lifespan=keyhive_lifespan(manager))

    @app.websocket("/events/{key}")
    async def events(websocket: WebSocket, key: str) -> None:
        async with attach_websocket(websocket, manager, key, events=True) as ref:
            while True:
                await ref.call(json.loads(await websocket.receive_text()))

    @app.websocket("/snapshot/{key}")
    async def snapshot(websocket: WebSocket, key: str) -> None:
        async with attach_websocket(websocket, manager, key, events=True, snapshot=True,
                                    snapshot_message=lambda s: {"type": "hello", "said": s["said"]}) as ref:
            while True:
                await ref.call(json.loads(await websocket.receive_text()))

    return app


def make_manager(**kwargs: Any) -> keyhive.InstanceManager:
    return keyhive.InstanceManager(f"push-{next(_names)}", Room, storage=keyhive.MemoryStorage(), **kwargs)


async def _recv(ws: Any) -> Any:
    return json.loads(await asyncio.wait_for(ws.recv(), 5))


async def test_events_reach_every_socket_in_order_one_message_each() -> None:
    """Two sockets of one key each get every published event as one JSON message, in publish order."""
    manager = make_manager()
    async with serve(make_app(manager)) as host, connect(f"ws://{host}/events/room") as one, \
            connect(f"ws://{host}/events/room") as two:
        ref = await manager.lookup("room")
        assert ref is not None
        while ref.attachments < 2:  # the second socket subscribes as it connects
            await asyncio.sleep(0.01)
        for i in range(5):
            await (one if i % 2 else two).send(json.dumps({"say": f"m{i}"}))
        seen = [[await _recv(ws) for _ in range(5)] for ws in (one, two)]
        assert seen[0] == seen[1]  # one publish order for every socket
        assert [g["count"] for g in seen[0]] == [1, 2, 3, 4, 5]
        assert sorted(g["said"] for g in seen[0]) == [f"m{i}" for i in range(5)]
        assert ref.attachments == 2  # a subscribed socket is one owner, not two


async def test_snapshot_comes_first_then_only_later_events() -> None:
    """With snapshot=True the socket's first message is the state, then the events published after it."""
    manager = make_manager()
    async with serve(make_app(manager)) as host:
        await manager.call("room", {"say": "before"})
        async with connect(f"ws://{host}/snapshot/room") as ws:
            assert await _recv(ws) == {"type": "hello", "said": 1}
            await ws.send(json.dumps({"say": "after"}))
            assert await _recv(ws) == {"said": "after", "count": 2}


async def test_a_stop_says_why_and_closes_with_1012() -> None:
    """When the agent stops, the socket gets {"type": "stopped", "reason"} and is closed with 1012."""
    manager = make_manager()
    recorder = EventRecorder(manager)
    async with serve(make_app(manager)) as host:
        async with connect(f"ws://{host}/events/room") as ws:
            await ws.send(json.dumps({"say": "hi"}))
            assert (await _recv(ws))["said"] == "hi"
            await manager.stop("room")
            assert await _recv(ws) == {"type": "stopped", "reason": "stopped"}
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 1012
        assert recorder.kinds("room").count("stopped") == 1


async def test_a_socket_that_falls_behind_is_closed_with_1013() -> None:
    """A burst bigger than subscriber_buffer drops the socket's subscription: closed with 1013, detached."""
    manager = make_manager(subscriber_buffer=3)
    recorder = EventRecorder(manager)
    async with serve(make_app(manager)) as host:
        async with connect(f"ws://{host}/events/room") as ws:
            await ws.send(json.dumps({"burst": 10}))
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 1013
        await recorder.wait_for("detached", "room", timeout=5)
        ref = await manager.lookup("room")
        assert ref is not None and ref.attachments == 0


async def test_an_event_that_is_not_json_closes_with_1011(caplog: pytest.LogCaptureFixture) -> None:
    """An event the socket cannot send as JSON closes it with 1011 and is logged; the agent runs on."""
    manager = make_manager()
    async with serve(make_app(manager)) as host:
        async with connect(f"ws://{host}/events/room") as ws:
            await ws.send(json.dumps({"bad": True}))
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 1011
        assert "not JSON" in caplog.text
        assert await manager.call("room", {"say": "still here"}) == 1


async def test_snapshot_without_events_is_refused() -> None:
    """snapshot=True without events=True is a ValueError saying to pass events=True."""
    with pytest.raises(ValueError, match="events=True"):
        async with attach_websocket(object(), make_manager(), "k", snapshot=True):  # type: ignore[arg-type]
            pass  # pragma: no cover
