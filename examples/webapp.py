"""keyhive web demo: one agent per browser session, live in every tab, hibernated when idle.

Run: bash scripts/demo.sh   (or: python examples/webapp.py [--port 8000] [--idle 10])

Open http://127.0.0.1:8000 in two tabs: both show the same session (a counter and
notes) and update each other live. Close them both: after ``--idle`` seconds the agent
hibernates to ``.keyhive-demo/sessions.db`` (watch it on the dashboard at /keyhive/). Open
the page again, or restart the server: the agent thaws with its state. Look at what is
stored with ``keyhive ls sqlite:///.keyhive-demo/sessions.db`` (see docs/cli.md).

How it fits together: each WebSocket subscribes to its session's agent for as long as it
is open (``attach_websocket(..., events=True, snapshot=True)``, which is its attachment): it
gets the state first, then every change the agent publishes with ``self.publish``, and
a message saying why when the agent stops.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import secrets
import socket
import sys
import time
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, WebSocket, WebSocketException
from fastapi.responses import HTMLResponse, JSONResponse

import keyhive
from keyhive.integrations.fastapi import (
    add_exception_handlers,
    agent_call,
    attach_websocket,
    keyhive_dashboard,
    keyhive_lifespan,
)

COOKIE = "keyhive_demo_session"

# What the page says when the agent behind it stops, one sentence per StopReason.
STOP_MESSAGES: dict[keyhive.StopReason, str] = {
    keyhive.StopReason.IDLE_TIMEOUT: "The agent hibernated: nobody was attached for the idle timeout.",
    keyhive.StopReason.STOPPED: "The agent was stopped by manager.stop() (the dashboard's stop button).",
    keyhive.StopReason.NORMAL: "The agent stopped itself with self.stop().",
    keyhive.StopReason.SHUTDOWN: "The server is shutting down; the agent hibernated.",
    keyhive.StopReason.CONFLICT: "The agent stopped: another process had written newer state.",
    keyhive.StopReason.UNSAVED: "The agent stopped before its state could be saved.",
    keyhive.StopReason.EVICTED: "The agent hibernated to make room for others (max_live).",
    keyhive.StopReason.LEASE_LOST: "The agent stopped: another process took this manager over.",
}


def stop_message(reason: keyhive.StopReason | None) -> str:
    """The sentence the page shows for ``reason``."""
    if reason is None:
        return "The agent stopped."
    return STOP_MESSAGES.get(reason, f"The agent stopped ({reason}).")


def session_key(cookies: dict[str, str]) -> str | None:
    """The session key from the cookie; an empty or missing cookie is no session."""
    return cookies.get(COOKIE) or None


class Session(keyhive.Agent):
    """A browser session: a counter and a list of notes, shared by all its tabs."""

    def initial_state(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"count": 0, "notes": [], "thaws": 0, **params}

    async def on_start(self, thawed: bool) -> None:
        self.state["thaws"] += thawed
        self.state["agent"] = "thawed from storage" if thawed else "started fresh"

    async def handle(self, message: Any) -> Any:
        op = message.get("op") if isinstance(message, dict) else None
        if op == "incr":
            self.state["count"] += 1
        elif op == "note":
            text = str(message.get("text", "")).strip()[:200]
            if text:
                self.state["notes"] = [*self.state["notes"], {"text": text, "at": time.time()}][-20:]
        elif op == "clear":
            self.state["notes"] = []
        elif op != "get":
            raise ValueError(f"unknown op {op!r}")
        if op != "get":
            self.publish(view(dict(self.state)))  # to every open tab, in order (a copy: sent later)
        return view(self.state)


def view(state: dict[str, Any]) -> dict[str, Any]:
    """What the page shows: the state, and whether this incarnation was thawed."""
    return {"type": "state", "state": state, "agent": state.get("agent", "started fresh")}


def stopped(reason: keyhive.StopReason | None) -> dict[str, Any]:
    """The message a tab gets when its agent stops (then its socket closes and it reconnects)."""
    return {"type": "stopped", "reason": str(reason), "message": stop_message(reason)}


def create_app(*, idle: float = 10.0, storage: str | None = None, allow_stop: bool = True,
               name: str = "sessions") -> FastAPI:
    """The demo app; ``storage`` defaults to SQLite (or files) under ``.keyhive-demo/``."""
    if storage is None:
        storage = default_storage(Path(".keyhive-demo"))
    sessions = keyhive.InstanceManager(name, Session, idle_timeout=idle, storage=storage)
    app = FastAPI(title="keyhive demo", lifespan=keyhive_lifespan(sessions))
    add_exception_handlers(app)
    app.state.sessions = sessions

    @app.get("/", response_class=HTMLResponse)
    async def page(request: Request) -> HTMLResponse:
        response = HTMLResponse(PAGE.replace("{{IDLE}}", f"{idle:g}"))
        if session_key(request.cookies) is None:  # none, or an empty one: a new session
            response.set_cookie(COOKIE, "s-" + secrets.token_urlsafe(9), httponly=True, samesite="lax",
                                max_age=30 * 24 * 3600)
        return response

    @app.get("/api/state")
    async def state(request: Request) -> JSONResponse:
        """Plain HTTP: get + call, no attach (the idle timer is not touched)."""
        key = session_key(request.cookies)
        if key is None:
            return JSONResponse({"detail": "no session cookie; open / first"}, 400)
        return JSONResponse(await agent_call(sessions, key, {"op": "get"}))

    @app.websocket("/ws")
    async def live(websocket: WebSocket) -> None:
        key = session_key(websocket.cookies)
        if key is None:  # refused at the handshake (HTTP 403)
            raise WebSocketException(1008, "no session cookie: open the page first")
        # the state first, then what the agent publishes; a stop says why and closes (1012)
        async with attach_websocket(websocket, sessions, key, events=True, snapshot=True,
                                    snapshot_message=view, stop_message=stopped) as ref:
            while True:
                text = await websocket.receive_text()
                try:
                    await ref.call(json.loads(text))  # the change reaches every tab as an event
                except ValueError as exc:  # bad JSON or an unknown op
                    await websocket.send_json({"type": "error", "detail": str(exc)})

    app.mount("/keyhive", keyhive_dashboard([sessions], allow_stop=allow_stop))
    return app


def default_storage(directory: Path) -> str:
    """SQLite when this keyhive has it, else one file per checkpoint."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import keyhive.storage.sqlite  # noqa: F401
    except ImportError:
        return f"file://{(directory / 'checkpoints').resolve()}"
    return f"sqlite:///{(directory / 'sessions.db').resolve()}"  # sqlite:////abs/dir/sessions.db


PAGE = (Path(__file__).parent / "webapp.html").read_text("utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description="keyhive web demo (FastAPI)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--idle", type=float, default=10.0, help="idle timeout in seconds (default 10)")
    parser.add_argument("--storage", default=None,
                        help="storage URL (default: SQLite or files under .keyhive-demo/)")
    parser.add_argument("--read-only-dashboard", action="store_true", help="no stop buttons")
    args = parser.parse_args()
    sock = listen_socket(args.host, args.port)  # before any "open …" line: a busy port says so
    app = create_app(idle=args.idle, storage=args.storage, allow_stop=not args.read_only_dashboard)
    storage = app.state.sessions.storage
    url = f"http://{args.host}:{args.port}"
    print(f"keyhive web demo: open {url}  (dashboard: {url}/keyhive/)", flush=True)
    where = getattr(storage, "path", None) or getattr(storage, "directory", None)
    print(f"  idle timeout {args.idle:g} s, storage {type(storage).__name__}"
          f"{f' at {where}' if where else ''}; Ctrl-C to stop", flush=True)
    config = uvicorn.Config(app, ws="websockets-sansio", timeout_graceful_shutdown=5,
                            log_level="warning")
    # uvicorn re-raises Ctrl-C after its graceful shutdown (every agent hibernated by then).
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(config).run(sockets=[sock])
    sock.close()


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` for uvicorn; a busy port exits with what to pass instead."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            sys.exit(f"keyhive web demo: port {port} is in use; pass --port {port + 1}")
        sys.exit(f"keyhive web demo: cannot listen on {host}:{port}: {exc.strerror or exc}")
    return sock


if __name__ == "__main__":
    main()
