"""keyhive.integrations.fastapi and the dashboard, against a real uvicorn and real WebSockets."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import itertools
import json
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="needs keyhive[fastapi]")

import httpx
from fastapi import Depends, FastAPI, WebSocket
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

import keyhive
from keyhive._keys import storage_key
from keyhive.integrations.fastapi import (
    add_exception_handlers,
    agent_call,
    agent_dependency,
    attach_websocket,
    keyhive_dashboard,
    keyhive_lifespan,
)
from keyhive.testing import EventRecorder

from .conftest import serve

_names = itertools.count()


class Counter(keyhive.Agent):
    def initial_state(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"count": 0}

    async def on_start(self, thawed: bool) -> None:
        self.thawed = thawed

    async def handle(self, message: Any) -> Any:
        if message == "incr":
            self.state["count"] += 1
        return {"count": self.state["count"], "thawed": self.thawed}


def make_manager(**kwargs: Any) -> keyhive.InstanceManager:
    kwargs.setdefault("storage", keyhive.MemoryStorage())
    return keyhive.InstanceManager(f"web-{next(_names)}", Counter, **kwargs)


def make_app(manager: keyhive.InstanceManager, *, allow_stop: bool = False,
             handlers: bool = True) -> FastAPI:
    app = FastAPI(lifespan=keyhive_lifespan(manager))
    if handlers:
        add_exception_handlers(app)

    @app.websocket("/ws/{key}")
    async def live(websocket: WebSocket, key: str) -> None:
        async with attach_websocket(websocket, manager, key) as ref:
            while True:
                message = await websocket.receive_text()
                await websocket.send_json(await ref.call(message))

    @app.post("/incr/{key}")
    async def incr(key: str) -> Any:
        return await agent_call(manager, key, "incr")

    session = agent_dependency(manager, lambda request: request.headers["x-session"])

    @app.get("/mine")
    async def mine(ref: keyhive.AgentRef = Depends(session)) -> Any:  # noqa: B008
        return await ref.call("get")

    app.mount("/keyhive", keyhive_dashboard([manager], allow_stop=allow_stop))
    return app


@pytest.fixture
async def recorder_app() -> AsyncIterator[tuple[keyhive.InstanceManager, EventRecorder, str]]:
    """A running app around a manager with a 0.3 s idle timeout, and its event recorder."""
    manager = make_manager(idle_timeout=0.3)
    recorder = EventRecorder(manager)
    async with serve(make_app(manager)) as host:
        yield manager, recorder, host
    assert not manager.running


async def test_websocket_attaches_while_open_and_detaches_on_close(
        recorder_app: tuple[keyhive.InstanceManager, EventRecorder, str]) -> None:
    """A WebSocket gets and attaches its key's agent while open; closing it detaches."""
    manager, recorder, host = recorder_app
    async with connect(f"ws://{host}/ws/alice") as ws:
        await ws.send("incr")
        assert json.loads(await ws.recv()) == {"count": 1, "thawed": False}
        ref = await manager.lookup("alice")
        assert ref is not None
        assert ref.attachments == 1
        assert ref.idle_deadline is None
        await asyncio.sleep(0.5)  # longer than the idle timeout: attached, so still alive
        assert ref.alive
    await recorder.wait_for("detached", "alice", timeout=5)
    assert ref.attachments == 0
    assert ref.idle_deadline is not None


async def test_two_connections_share_one_agent(
        recorder_app: tuple[keyhive.InstanceManager, EventRecorder, str]) -> None:
    """Two sockets of one key talk to the same agent; it stays until both have closed."""
    manager, recorder, host = recorder_app
    async with connect(f"ws://{host}/ws/shared") as one, connect(f"ws://{host}/ws/shared") as two:
        await one.send("incr")
        assert json.loads(await one.recv())["count"] == 1
        await two.send("incr")
        assert json.loads(await two.recv())["count"] == 2
        ref = await manager.lookup("shared")
        assert ref is not None
        assert ref.attachments == 2
        await one.close()
        await recorder.wait_for("detached", "shared", timeout=5)
        assert ref.attachments == 1
        await asyncio.sleep(0.5)
        assert ref.alive
        await two.send("get")
        assert json.loads(await two.recv())["count"] == 2
    assert recorder.kinds("shared").count("started") == 1


async def test_disconnect_idle_hibernate_reconnect_thaws(
        recorder_app: tuple[keyhive.InstanceManager, EventRecorder, str]) -> None:
    """After the last socket closes the agent idles out and hibernates; a new socket thaws it."""
    manager, recorder, host = recorder_app
    async with connect(f"ws://{host}/ws/bob") as ws:
        for _ in range(3):
            await ws.send("incr")
            await ws.recv()
    hibernated = await recorder.wait_for("hibernated", "bob", timeout=5)
    assert hibernated.reason is keyhive.StopReason.IDLE_TIMEOUT
    assert await manager.lookup("bob") is None
    async with connect(f"ws://{host}/ws/bob") as ws:
        await ws.send("get")
        assert json.loads(await ws.recv()) == {"count": 3, "thawed": True}
    assert recorder.kinds("bob")[:1] == ["started"]
    assert "thawed" in recorder.kinds("bob")


async def test_lifespan_closes_managers_and_hibernates_attached_agents() -> None:
    """The lifespan starts the manager with the app; shutdown hibernates agents still attached."""
    storage = keyhive.MemoryStorage()
    manager = make_manager(storage=storage)
    recorder = EventRecorder(manager)
    assert not manager.running
    async with serve(make_app(manager)) as host:
        assert manager.running
        ws = await connect(f"ws://{host}/ws/carol")
        await ws.send("incr")
        await ws.recv()
        # the server shuts down with the socket still open
    with pytest.raises(ConnectionClosed):
        await ws.recv()
    await ws.close()
    assert not manager.running
    stopped = await recorder.wait_for("hibernated", "carol", timeout=1)
    assert stopped.reason is keyhive.StopReason.SHUTDOWN
    assert await storage.load(storage_key(manager.name, None, "carol")) is not None


async def test_lifespan_composes_with_the_apps_own() -> None:
    """The app's own lifespan runs inside, with the managers running, and its state passes on."""
    manager = make_manager()
    seen: list[bool] = []

    async def own(app: Any) -> AsyncIterator[dict[str, Any]]:
        seen.append(manager.running)
        yield {"greeting": "hi"}
        seen.append(manager.running)

    async def hello(request: Request) -> JSONResponse:
        return JSONResponse({"greeting": request.state.greeting})

    app = Starlette(routes=[Route("/", hello)],
                    lifespan=keyhive_lifespan(manager, lifespan=contextlib.asynccontextmanager(own)))
    async with serve(app) as host, httpx.AsyncClient() as client:
        assert (await client.get(f"http://{host}/")).json() == {"greeting": "hi"}
    assert seen == [True, True]
    assert not manager.running


def test_lifespan_rejects_non_managers() -> None:
    """keyhive_lifespan() takes managers only."""
    with pytest.raises(TypeError, match="InstanceManager"):
        keyhive_lifespan("sessions")  # type: ignore[arg-type]


async def test_http_call_and_dependency(
        recorder_app: tuple[keyhive.InstanceManager, EventRecorder, str]) -> None:
    """agent_call gets and calls without attaching; the dependency gives the request's ref."""
    manager, _, host = recorder_app
    async with httpx.AsyncClient() as client:
        assert (await client.post(f"http://{host}/incr/dave")).json() == {"count": 1, "thawed": False}
        ref = await manager.lookup("dave")
        assert ref is not None
        assert ref.attachments == 0
        response = await client.get(f"http://{host}/mine", headers={"x-session": "dave"})
        assert response.json() == {"count": 1, "thawed": False}
        missing = await client.get(f"http://{host}/mine")
        assert missing.status_code == 400
        assert missing.json()["error"] == "missing_key"


async def test_http_error_mapping() -> None:
    """Bad key → 400, unthawable checkpoint → 503, closed manager → 503; JSON, no traceback."""
    storage = keyhive.MemoryStorage()
    manager = make_manager(storage=storage)
    await storage.save(storage_key(manager.name, None, "broken"), b"not a checkpoint", expected_version=None)
    app = make_app(manager)
    closed = make_manager()

    @app.get("/closed/{key}")
    async def on_closed(key: str) -> Any:
        return await agent_call(closed, key, "get")

    async with serve(app) as host, httpx.AsyncClient() as client:
        bad = await client.post(f"http://{host}/incr/" + "x" * 1100)
        assert bad.status_code == 400
        assert bad.json()["error"] == "invalid_key"
        thaw = await client.post(f"http://{host}/incr/broken")
        assert thaw.status_code == 503
        assert thaw.json()["error"] == "thaw_failed"
        assert "cannot be restored" in thaw.json()["detail"]
        assert thaw.headers["retry-after"] == "5"
        down = await client.get(f"http://{host}/closed/x")
        assert down.status_code == 503
        assert down.json()["error"] == "unavailable"
        for response in (bad, thaw, down):
            assert "Traceback" not in response.text
            assert "File \"" not in response.text
    stored = await storage.load(storage_key(manager.name, None, "broken"))
    assert stored is not None
    assert stored.data == b"not a checkpoint"  # fail closed: left untouched


async def test_plain_starlette_gets_json_errors() -> None:
    """On plain Starlette, add_exception_handlers answers keyhive errors with JSON too."""
    storage = keyhive.MemoryStorage()
    manager = make_manager(storage=storage)
    await storage.save(storage_key(manager.name, None, "broken"), b"junk", expected_version=None)

    async def call(request: Request) -> JSONResponse:
        return JSONResponse(await agent_call(manager, request.path_params["key"], "get"))

    async def raw(request: Request) -> JSONResponse:
        return JSONResponse(await manager.call("broken", "get"))  # a ThawError escapes

    app = Starlette(routes=[Route("/c/{key}", call), Route("/raw", raw)], lifespan=keyhive_lifespan(manager))
    add_exception_handlers(app)
    async with serve(app) as host, httpx.AsyncClient() as client:
        assert (await client.get(f"http://{host}/c/ok")).json() == {"count": 0, "thawed": False}
        for path in ("/c/broken", "/raw"):
            response = await client.get(f"http://{host}{path}")
            assert response.status_code == 503
            assert response.headers["content-type"] == "application/json"
            assert response.json()["error"] == "thaw_failed"


async def test_websocket_error_close_codes() -> None:
    """Bad key → close 1008; unthawable → 1011; the agent stopped under the socket → 1012."""
    storage = keyhive.MemoryStorage()
    manager = make_manager(storage=storage)
    await storage.save(storage_key(manager.name, None, "broken"), b"junk", expected_version=None)
    async with serve(make_app(manager)) as host:
        async with connect(f"ws://{host}/ws/" + "x" * 1100) as ws:
            with pytest.raises(ConnectionClosed):
                await ws.recv()
        assert ws.close_code == 1008
        assert "invalid key" in (ws.close_reason or "")
        async with connect(f"ws://{host}/ws/broken") as ws:
            with pytest.raises(ConnectionClosed):
                await ws.recv()
        assert ws.close_code == 1011
        async with connect(f"ws://{host}/ws/erin") as ws:
            await ws.send("incr")
            await ws.recv()
            await manager.stop("erin")
            await ws.send("incr")
            with pytest.raises(ConnectionClosed):
                await ws.recv()
        assert ws.close_code == 1012
        async with connect(f"ws://{host}/ws/erin") as ws:  # reconnecting thaws it
            await ws.send("get")
            assert json.loads(await ws.recv()) == {"count": 1, "thawed": True}


async def test_dashboard_snapshot_live_updates_and_read_only() -> None:
    """The dashboard lists agents, pushes snapshots on events, refuses stop and other origins."""
    manager = make_manager(idle_timeout=0.3)
    recorder = EventRecorder(manager)
    async with serve(make_app(manager)) as host, httpx.AsyncClient() as client:
        page = await client.get(f"http://{host}/keyhive", follow_redirects=True)
        assert page.status_code == 200
        assert "static/dashboard.js" in page.text
        for asset in ("dashboard.js", "dashboard.css"):
            assert (await client.get(f"http://{host}/keyhive/static/{asset}")).status_code == 200
        async with connect(f"ws://{host}/keyhive/ws") as live:
            first = json.loads(await live.recv())
            assert first["allow_stop"] is False
            assert first["managers"][0]["name"] == manager.name
            assert first["managers"][0]["count"] == 0
            async with connect(f"ws://{host}/ws/frank") as ws:
                await ws.send("incr")
                await ws.recv()
                snap = (await client.get(f"http://{host}/keyhive/api/snapshot")).json()
                (agent,) = snap["managers"][0]["agents"]
                assert agent["key"] == "frank"
                assert agent["attachments"] == 1
                assert agent["idle_in"] is None
                assert agent["last_activity_ago"] < 5
                refused = await client.post(f"http://{host}/keyhive/api/stop", json={"id": agent["id"]},
                                            headers={"x-keyhive-dashboard": "1"})
                assert refused.status_code == 403
            await recorder.wait_for("hibernated", "frank", timeout=5)
            async with asyncio.timeout(5):
                while True:  # the live feed shows the hibernation
                    snap = json.loads(await live.recv())
                    stopped = snap["managers"][0]["stopped"]
                    if stopped and not snap["managers"][0]["agents"]:
                        break
            assert stopped[0]["key"] == "frank"
            assert stopped[0]["reason"] == "idle_timeout"
            assert stopped[0]["saved"] is True
            assert sum(snap["managers"][0]["history"]["hibernated"]) == 1
            assert sum(snap["managers"][0]["history"]["started"]) == 1
            assert [e["kind"] for e in snap["events"]][:2] == ["stopped", "hibernated"]
        async with connect(f"ws://{host}/keyhive/ws", origin=f"http://{host}") as same:
            assert json.loads(await same.recv())["managers"]
        async with connect(f"ws://{host}/keyhive/ws", origin="http://evil.example") as other:
            with pytest.raises(ConnectionClosed):
                await other.recv()
        assert other.close_code == 1008


async def test_dashboard_stop_button_when_allowed() -> None:
    """With allow_stop=True the stop endpoint stops an agent gracefully (needs the header)."""
    manager = make_manager()
    recorder = EventRecorder(manager)
    async with serve(make_app(manager, allow_stop=True)) as host, httpx.AsyncClient() as client:
        await client.post(f"http://{host}/incr/gina")
        snap = (await client.get(f"http://{host}/keyhive/api/snapshot")).json()
        ident = snap["managers"][0]["agents"][0]["id"]
        url = f"http://{host}/keyhive/api/stop"
        assert (await client.post(url, json={"id": ident})).status_code == 403
        assert (await client.post(url, content=b"{", headers={"x-keyhive-dashboard": "1"})).status_code == 400
        stopped = await client.post(url, json={"id": ident}, headers={"x-keyhive-dashboard": "1"})
        assert stopped.status_code == 200
        assert (await recorder.wait_for("stopped", "gina", timeout=1)).reason is keyhive.StopReason.STOPPED
        again = await client.post(url, json={"id": ident}, headers={"x-keyhive-dashboard": "1"})
        assert again.status_code == 404


def test_dashboard_rejects_bad_arguments() -> None:
    """keyhive_dashboard() takes managers (one or a list) with distinct names."""
    manager = make_manager()
    assert keyhive_dashboard(manager).managers == [manager]
    with pytest.raises(TypeError, match="InstanceManager"):
        keyhive_dashboard(["sessions"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="same name"):
        keyhive_dashboard([manager, manager])


def test_missing_starlette_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without Starlette the import fails with the pip command that fixes it."""
    for name in [n for n in sys.modules if n.startswith("keyhive.integrations")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "starlette.exceptions", None)
    with pytest.raises(ImportError, match=r"pip install 'keyhive\[fastapi\]'"):
        importlib.import_module("keyhive.integrations.fastapi")


class _FakeSocket:
    """Just enough of a Starlette WebSocket for attach_websocket."""

    def __init__(self) -> None:
        from starlette.websockets import WebSocketState

        self.application_state = WebSocketState.CONNECTING
        self.client_state = WebSocketState.CONNECTED
        self.accepted = False
        self.closed_with: int | None = None

    async def accept(self, subprotocol: str | None = None) -> None:
        from starlette.websockets import WebSocketState

        self.accepted = True
        self.application_state = WebSocketState.CONNECTED

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.closed_with = code


async def test_attach_websocket_detaches_on_error_and_cancellation() -> None:
    """Leaving the block by an exception or a cancellation detaches the socket."""
    async with make_manager() as manager:
        socket = _FakeSocket()
        seen: list[keyhive.AgentRef] = []

        async def buggy() -> None:
            async with attach_websocket(socket, manager, "hank") as ref:  # type: ignore[arg-type]
                seen.append(ref)
                assert ref.attachments == 1
                raise RuntimeError("handler bug")

        with pytest.raises(RuntimeError, match="handler bug"):
            await buggy()
        (ref,) = seen
        assert socket.accepted
        assert socket.closed_with == 1011
        assert ref.attachments == 0

        inside = asyncio.Event()

        async def handler() -> None:
            async with attach_websocket(_FakeSocket(), manager, "hank"):  # type: ignore[arg-type]
                inside.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(handler())
        await inside.wait()
        assert ref.attachments == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert ref.attachments == 0
        assert ref.idle_deadline is None  # no idle timeout configured: never idles out


async def test_server_error_in_a_handler_detaches() -> None:
    """A handler that crashes inside the block closes the socket (1011) and detaches it."""
    manager = make_manager()
    recorder = EventRecorder(manager)
    app = make_app(manager)

    @app.websocket("/crash/{key}")
    async def crash(websocket: WebSocket, key: str) -> None:
        async with attach_websocket(websocket, manager, key):
            await websocket.receive_text()
            raise RuntimeError("bug in the app")

    async with serve(app) as host:
        async with connect(f"ws://{host}/crash/ivan") as ws:
            await ws.send("x")
            with pytest.raises(ConnectionClosed):
                await ws.recv()
        assert ws.close_code == 1011
        await recorder.wait_for("detached", "ivan", timeout=5)
        ref = await manager.lookup("ivan")
        assert ref is not None
        assert ref.attachments == 0


def test_dashboard_assets_ship_in_the_package() -> None:
    """The dashboard's HTML/JS/CSS are package data (the wheel includes them)."""
    from importlib import resources

    static = resources.files("keyhive.integrations.dashboard") / "static"
    for name in ("index.html", "dashboard.js", "dashboard.css"):
        assert (static / name).is_file()


def _load_demo() -> Any:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "webapp.py"
    spec = importlib.util.spec_from_file_location("keyhive_webapp_demo", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_demo_tabs_of_one_session_see_each_other(tmp_path: Any) -> None:
    """The web demo: two sockets with one session cookie share the agent and its updates."""
    demo = _load_demo()
    app = demo.create_app(idle=0.3, storage=f"file://{tmp_path}/cp", name=f"demo-{next(_names)}")
    sessions: keyhive.InstanceManager = app.state.sessions
    recorder = EventRecorder(sessions)
    async with serve(app) as host, httpx.AsyncClient() as client:
        page = await client.get(f"http://{host}/")
        cookie = page.cookies[demo.COOKIE]
        headers = {"Cookie": f"{demo.COOKIE}={cookie}"}
        async with connect(f"ws://{host}/ws", additional_headers=headers) as one, \
                connect(f"ws://{host}/ws", additional_headers=headers) as two:
            assert json.loads(await one.recv())["state"]["count"] == 0
            assert json.loads(await two.recv())["agent"] == "started fresh"
            await one.send(json.dumps({"op": "incr"}))
            await one.send(json.dumps({"op": "note", "text": "hi"}))
            for ws in (one, two):
                assert json.loads(await ws.recv())["state"]["count"] == 1
                assert json.loads(await ws.recv())["state"]["notes"][0]["text"] == "hi"
            await two.send("not json")
            assert json.loads(await two.recv())["type"] == "error"
        await recorder.wait_for("hibernated", cookie, timeout=5)
        state = (await client.get(f"http://{host}/api/state", headers=headers)).json()
        assert state["state"]["count"] == 1
        assert state["agent"] == "thawed from storage"
        client.cookies.clear()
        assert (await client.get(f"http://{host}/api/state")).status_code == 400
        with pytest.raises(InvalidStatus):  # no cookie, no session
            await connect(f"ws://{host}/ws")


async def test_dashboard_shows_every_manager_partitions_and_key_types() -> None:
    """Each manager gets its own entry; partitions and non-str keys are shown readably."""
    first, second = make_manager(), make_manager(idle_timeout=60)
    dashboard = keyhive_dashboard([first, second])
    try:
        async with first, second:
            await first.get(("user", 7), partition="tenant-a")
            await second.get(42)
            snap = await dashboard.snapshot()
            one, two = snap["managers"]
            assert [one["name"], two["name"]] == [first.name, second.name]
            assert one["agents"][0]["key"] == "('user', 7)"
            assert one["agents"][0]["partition"] == "tenant-a"
            assert one["agents"][0]["idle_in"] is None  # no idle timeout
            assert two["agents"][0]["key"] == "42"
            assert 59 < two["agents"][0]["idle_in"] <= 60.01  # deadlines round up to timer_resolution
            assert two["idle_timeout"] == 60
    finally:
        dashboard.close()


def test_demo_says_a_busy_port_is_busy(tmp_path: Any) -> None:
    """The web demo on a port in use exits 1 with 'port N is in use; pass --port N+1' and no 'open' line."""
    import socket
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, str(root / "examples" / "webapp.py"), "--port", str(port)],
                                cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"port {port} is in use; pass --port {port + 1}" in result.stderr
    assert "open http" not in result.stdout
    assert "Traceback" not in result.stderr


async def test_demo_treats_an_empty_cookie_as_none(tmp_path: Any) -> None:
    """An empty session cookie gets a fresh session from the page and is refused by the API and socket."""
    demo = _load_demo()
    app = demo.create_app(idle=5, storage=f"file://{tmp_path}/cp", name=f"demo-{next(_names)}")
    sessions: keyhive.InstanceManager = app.state.sessions
    empty = {"Cookie": f"{demo.COOKIE}="}
    async with serve(app) as host, httpx.AsyncClient() as client:
        page = await client.get(f"http://{host}/", headers=empty)
        assert len(page.cookies[demo.COOKIE]) > 8
        assert (await client.get(f"http://{host}/api/state", headers=empty)).status_code == 400
        with pytest.raises(InvalidStatus):
            await connect(f"ws://{host}/ws", additional_headers=empty)
        assert (await sessions.stats()).total == 0
        assert await sessions.lookup("") is None


async def test_demo_tells_the_page_why_its_agent_stopped(tmp_path: Any) -> None:
    """A stop reaches the page as one sentence naming the cause, and every StopReason has one."""
    demo = _load_demo()
    assert set(demo.STOP_MESSAGES) == set(keyhive.StopReason)
    assert all(m.startswith("The ") and m.endswith(".") for m in demo.STOP_MESSAGES.values())
    app = demo.create_app(idle=5, storage=f"file://{tmp_path}/cp", name=f"demo-{next(_names)}")
    sessions: keyhive.InstanceManager = app.state.sessions
    async with serve(app) as host, httpx.AsyncClient() as client:
        cookie = (await client.get(f"http://{host}/")).cookies[demo.COOKIE]
        async with connect(f"ws://{host}/ws", additional_headers={"Cookie": f"{demo.COOKIE}={cookie}"}) as ws:
            assert json.loads(await ws.recv())["type"] == "state"
            await sessions.stop(cookie)
            message = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert message["type"] == "stopped"
    assert message["message"] == "The agent was stopped by manager.stop() (the dashboard's stop button)."
