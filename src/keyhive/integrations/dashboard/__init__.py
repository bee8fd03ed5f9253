"""A live dashboard of InstanceManagers, as an ASGI app to mount.

::

    app.mount("/keyhive", keyhive_dashboard([sessions]))

It shows every manager with its live agents (key, partition, attachments, time until
the idle timeout, last activity), the agents that stopped recently and why, and a chart
of starts, thaws, hibernations and failures over the last minutes. The page is plain
HTML/JS/CSS shipped in the package (no build step, no CDN) and is kept live over a
WebSocket fed by ``manager.subscribe``.

It is read-only unless ``allow_stop=True``, which adds a stop button per agent (a
graceful ``manager.stop``). The dashboard shows keys: mount it behind your app's auth.

"Last activity" is the last lifecycle change that counts for the idle timer: start or
thaw, attach, detach, ``touch`` (and calls, with ``calls_touch=True``).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

try:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Mount, Route, WebSocketRoute
    from starlette.staticfiles import StaticFiles
    from starlette.types import Receive, Scope, Send
    from starlette.websockets import WebSocket, WebSocketDisconnect
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "keyhive's dashboard needs Starlette: pip install 'keyhive[fastapi]'"
    ) from exc

from ..._errors import KeyhiveError, NotFound
from ..._events import Event, EventKind
from ..._manager import InstanceManager
from ..._ref import AgentRef

__all__ = ["Dashboard", "keyhive_dashboard"]

_FAILED = (EventKind.THAW_FAILED, EventKind.HIBERNATE_FAILED)
_SERIES = ("started", "thawed", "hibernated", "failed")


def _show(value: Any) -> str:
    """How a key or partition is shown: strings as they are, anything else as its repr."""
    if value is None:
        return ""
    return value if isinstance(value, str) else repr(value)


class Dashboard:
    """The dashboard ASGI app (see the module docstring); build it with :func:`keyhive_dashboard`."""

    def __init__(self, managers: Sequence[InstanceManager], *, allow_stop: bool = False,
                 bucket_seconds: float = 5.0, buckets: int = 60, max_agents: int = 500) -> None:
        self.managers = list(managers)
        self.allow_stop = bool(allow_stop)
        self._bucket = float(bucket_seconds)
        self._nbuckets = int(buckets)
        self._max_agents = int(max_agents)
        # what the events tell us, per manager name
        self._history: dict[str, dict[int, list[int]]] = {m.name: {} for m in self.managers}
        self._active: dict[tuple[str, Any, Any], float] = {}
        self._saved: set[tuple[str, Any, Any]] = set()
        self._stopped: dict[str, deque[tuple[float, str, str, str, bool]]] = {
            m.name: deque(maxlen=20) for m in self.managers}
        self._events: deque[tuple[float, Event]] = deque(maxlen=60)
        self._clients: set[asyncio.Event] = set()
        # the refs the last snapshot showed, by id (the stop button names one); held only until
        # the next snapshot, so that an id (from id(ref)) cannot be reused while it is shown
        self._refs: dict[str, AgentRef] = {}
        self._unsubscribe = [m.subscribe(self._on_event) for m in self.managers]
        static = resources.files(__package__) / "static"
        self._index = (static / "index.html").read_text("utf-8")
        routes: list[Any] = [
            Route("/", self._page),
            Route("/api/snapshot", self._snapshot_json),
            Route("/api/stop", self._stop, methods=["POST"]),
            WebSocketRoute("/ws", self._live),
            Mount("/static", StaticFiles(directory=str(static)), name="static"),
        ]
        self._app = Starlette(routes=routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)

    def close(self) -> None:
        """Stop listening to the managers' events."""
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []

    # -- what the events say ----------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        kind = event.kind
        ident = (event.manager, event.partition, event.key)
        if kind is EventKind.STOPPED:
            self._active.pop(ident, None)
            saved = ident in self._saved
            self._saved.discard(ident)
            stopped = self._stopped.get(event.manager)
            if stopped is not None:
                stopped.append((event.time, _show(event.key), _show(event.partition),
                                str(event.reason or ""), saved))
        elif kind is EventKind.HIBERNATED:
            self._saved.add(ident)  # the STOPPED event follows at once
        elif kind is not EventKind.THAW_FAILED:
            self._active[ident] = event.time
        series = ("started" if kind is EventKind.STARTED else "thawed" if kind is EventKind.THAWED
                  else "hibernated" if kind is EventKind.HIBERNATED else "failed" if kind in _FAILED
                  else None)
        if series is not None:
            history = self._history.get(event.manager)
            if history is not None:
                index = int(event.time // self._bucket)
                counts = history.get(index)
                if counts is None:
                    counts = history[index] = [0, 0, 0, 0]
                    for old in [i for i in history if i <= index - self._nbuckets]:
                        del history[old]
                counts[_SERIES.index(series)] += 1
        self._events.append((event.time, event))
        for client in self._clients:
            client.set()

    # -- the snapshot --------------------------------------------------------------------------

    def _ref_id(self, ref: AgentRef, shown: dict[str, AgentRef]) -> str:
        ident = f"a{id(ref):x}"
        shown[ident] = ref
        return ident

    async def snapshot(self) -> dict[str, Any]:
        """Everything the page shows, as JSON-ready data; times are seconds relative to now."""
        now = asyncio.get_running_loop().time()
        shown: dict[str, AgentRef] = {}
        current = int(now // self._bucket)
        managers = []
        for manager in self.managers:
            stats = await manager.stats()
            timeout = manager.idle_timeout
            refs = await manager.agents()
            agents = []
            for ref in itertools.islice(refs, self._max_agents):
                deadline = ref.idle_deadline
                last = self._active.get((manager.name, ref.partition, ref.key))
                if deadline is not None and timeout is not None:
                    since = deadline - timeout  # the idle timer's last (re)start
                    last = since if last is None else max(last, since)
                agents.append({
                    "id": self._ref_id(ref, shown),
                    "key": _show(ref.key),
                    "partition": _show(ref.partition),
                    "attachments": ref.attachments,
                    "idle_in": None if deadline is None else max(0.0, deadline - now),
                    "last_activity_ago": None if last is None else max(0.0, now - last),
                    "status": "running" if ref.alive else "stopped",
                })
            agents.sort(key=lambda a: (a["partition"], a["key"]))
            history = self._history.get(manager.name, {})
            series = {name: [history.get(i, [0, 0, 0, 0])[n]
                             for i in range(current - self._nbuckets + 1, current + 1)]
                      for n, name in enumerate(_SERIES)}
            managers.append({
                "name": manager.name,
                "agent": manager.agent.__name__,
                "running": manager.running,
                "idle_timeout": timeout,
                "storage": type(manager.storage).__name__ if manager.storage is not None else None,
                "count": stats.total,
                "attached": stats.attached,
                "counters": stats.counters,
                "agents": agents,
                "truncated": max(0, len(refs) - len(agents)),
                "history": series,
                "stopped": [{"ago": now - t, "key": k, "partition": p, "reason": r, "saved": s}
                            for t, k, p, r, s in reversed(self._stopped.get(manager.name, ()))],
            })
        events = [{
            "ago": max(0.0, now - t), "manager": e.manager, "kind": str(e.kind), "key": _show(e.key),
            "partition": _show(e.partition), "reason": str(e.reason or ""),
            "error": "" if e.error is None else type(e.error).__name__,
        } for t, e in reversed(self._events)]
        self._refs = shown
        return {
            "now": time.time(), "allow_stop": self.allow_stop, "bucket_seconds": self._bucket,
            "managers": managers, "events": events,
        }

    # -- endpoints -----------------------------------------------------------------------------

    async def _page(self, request: Request) -> Response:
        return HTMLResponse(self._index, headers={"Cache-Control": "no-store"})

    async def _snapshot_json(self, request: Request) -> Response:
        return JSONResponse(await self.snapshot(), headers={"Cache-Control": "no-store"})

    async def _stop(self, request: Request) -> Response:
        if not self.allow_stop:
            return JSONResponse({"detail": "This dashboard is read-only (allow_stop=False)."}, 403)
        # A custom header cannot be sent cross-site without a CORS preflight we never allow.
        if request.headers.get("x-keyhive-dashboard") != "1":
            return JSONResponse({"detail": "Missing X-Keyhive-Dashboard header."}, 403)
        try:
            body = await request.json()
            ident = body["id"]
        except Exception:  # noqa: BLE001  # any malformed request body is a 400
            return JSONResponse({"detail": 'Send JSON {"id": "<agent id>"}.'}, 400)
        ref = self._refs.get(ident) if isinstance(ident, str) else None
        if ref is None or not ref.alive:
            return JSONResponse({"detail": "That agent is not live any more."}, 404)
        manager = next((m for m in self.managers if m.name == ref.manager), None)
        if manager is None:  # pragma: no cover - refs only come from our managers
            return JSONResponse({"detail": "Unknown manager."}, 404)
        try:
            await manager.stop(ref.key, partition=ref.partition)
        except NotFound:
            return JSONResponse({"detail": "That agent is not live any more."}, 404)
        except KeyhiveError as exc:
            return JSONResponse({"detail": f"Could not stop it: {type(exc).__name__}"}, 503)
        return JSONResponse({"stopped": ident})

    async def _live(self, websocket: WebSocket) -> None:
        """Send a snapshot now, after every burst of events, and every 2 s."""
        await websocket.accept()
        origin = websocket.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != websocket.headers.get("host"):
            # Browsers let any site open a WebSocket here; only our own page may read the keys.
            await websocket.close(1008, "cross-origin dashboard connections are refused")
            return
        dirty = asyncio.Event()
        self._clients.add(dirty)
        receiver: asyncio.Future[Any] = asyncio.ensure_future(websocket.receive())
        waiter: asyncio.Future[Any] | None = None
        try:
            while True:
                dirty.clear()
                await websocket.send_json(await self.snapshot())
                waiter = asyncio.ensure_future(dirty.wait())
                done, _ = await asyncio.wait({receiver, waiter}, timeout=2.0,
                                             return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if receiver in done:
                    if receiver.result()["type"] == "websocket.disconnect":
                        return
                    receiver = asyncio.ensure_future(websocket.receive())  # ignore what it says
                elif waiter in done:
                    await asyncio.sleep(0.1)  # one snapshot per burst of events
        except (WebSocketDisconnect, OSError, RuntimeError):
            return  # the page went away while we were sending
        finally:
            self._clients.discard(dirty)
            for fut in (receiver, waiter):
                if fut is not None:
                    fut.cancel()


def keyhive_dashboard(managers: InstanceManager | Iterable[InstanceManager], *,
                      allow_stop: bool = False) -> Dashboard:
    """The live dashboard of ``managers`` as an ASGI app: ``app.mount("/keyhive", ...)``.

    Read-only unless ``allow_stop=True`` (a stop button per agent).

    Raises:
        TypeError: something other than ``InstanceManager`` objects was passed.
    """
    found = [managers] if isinstance(managers, InstanceManager) else list(managers)
    for manager in found:
        if not isinstance(manager, InstanceManager):
            raise TypeError(f"keyhive_dashboard() takes InstanceManagers, not {type(manager).__name__}")
    names = [m.name for m in found]
    if len(set(names)) != len(names):
        raise ValueError(f"keyhive_dashboard() got two managers with the same name: {names}")
    return Dashboard(found, allow_stop=allow_stop)
