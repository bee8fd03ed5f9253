"""keyhive for FastAPI and plain Starlette.

The Python shape of the seed's Phoenix ``mount/3``: a WebSocket gets its session's agent
and attaches for as long as it is open, so the agent lives exactly as long as someone is
looking at it and hibernates after they leave::

    from fastapi import FastAPI, WebSocket
    from keyhive.integrations.fastapi import attach_websocket, keyhive_lifespan

    sessions = keyhive.InstanceManager("sessions", Session, idle_timeout=600,
                                       storage="sqlite:///sessions.db")
    app = FastAPI(lifespan=keyhive_lifespan(sessions))

    @app.websocket("/ws/{key}")
    async def ws(websocket: WebSocket, key: str) -> None:
        async with attach_websocket(websocket, sessions, key) as ref:
            while True:
                await websocket.send_json(await ref.call(await websocket.receive_json()))

Errors reach clients as status codes, never as stack traces: a bad key is 400 (close
code 1008 on a WebSocket), a checkpoint that cannot be thawed, a closed manager or a
stopped agent is 503 (close code 1011 / 1001 / 1012), a call timeout is 504.

Only Starlette is imported (FastAPI is built on it); FastAPI resolves the ``Request`` and
``WebSocket`` parameters of the helpers' dependencies like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

try:
    from starlette.exceptions import HTTPException, WebSocketException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "keyhive.integrations.fastapi needs Starlette (and FastAPI to use it with FastAPI): "
        "pip install 'keyhive[fastapi]'"
    ) from exc

from .._errors import AgentStopped, KeyhiveError, ManagerClosed, SubscriberOverflow, ThawError
from .._events import StopReason
from .._keys import check_key
from .._manager import InstanceManager
from .._ref import AgentRef
from .dashboard import keyhive_dashboard

__all__ = [
    "KeyhiveHTTPException",
    "add_exception_handlers",
    "agent_call",
    "agent_dependency",
    "attach_websocket",
    "get_agent",
    "keyhive_dashboard",
    "keyhive_lifespan",
]

logger = logging.getLogger("keyhive")

Lifespan = Callable[[Any], contextlib.AbstractAsyncContextManager[Any]]

# WebSocket close codes (RFC 6455 §7.4.1 and the IANA registry)
WS_GOING_AWAY = 1001
WS_POLICY_VIOLATION = 1008
WS_INTERNAL_ERROR = 1011
WS_SERVICE_RESTART = 1012
WS_TRY_AGAIN_LATER = 1013


# -- lifespan -----------------------------------------------------------------------------


def keyhive_lifespan(*managers: InstanceManager, lifespan: Lifespan | None = None) -> Lifespan:
    """A lifespan that starts ``managers`` with the app and closes them on shutdown.

    Use it as ``FastAPI(lifespan=keyhive_lifespan(sessions, carts))`` (or Starlette's
    ``lifespan=``). The managers start in order before ``lifespan`` (the app's own, if
    any) enters, and close in reverse order after it exits, so the app's own start-up and
    shutdown code can use them. Closing a manager hibernates every live agent. Whatever
    ``lifespan`` yields (a state mapping) is passed on to the server.

    Raises:
        TypeError: something other than an ``InstanceManager`` was passed.
    """
    for manager in managers:
        if not isinstance(manager, InstanceManager):
            raise TypeError(f"keyhive_lifespan() takes InstanceManagers, not {type(manager).__name__}")
    if lifespan is not None and not callable(lifespan):
        raise TypeError("lifespan must be the app's lifespan function (app -> async context manager)")

    @contextlib.asynccontextmanager
    async def keyhive_app_lifespan(app: Any) -> AsyncIterator[Any]:
        async with contextlib.AsyncExitStack() as stack:
            for manager in managers:
                await stack.enter_async_context(manager)
            if lifespan is None:
                yield None
            else:
                async with lifespan(app) as state:
                    yield state

    return keyhive_app_lifespan


# -- errors ---------------------------------------------------------------------------------


class KeyhiveHTTPException(HTTPException):
    """An HTTP error raised by the helpers; ``error`` is a short machine-readable code.

    It is a Starlette ``HTTPException``, so FastAPI renders it as JSON ``{"detail": ...}``
    out of the box; :func:`add_exception_handlers` makes plain Starlette do the same and
    adds the ``error`` code.
    """

    def __init__(self, status_code: int, detail: str, error: str,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(status_code, detail, dict(headers) if headers else None)
        self.error = error


def _http_error(exc: BaseException) -> KeyhiveHTTPException:
    """The HTTP outcome of a keyhive error (or a call timeout)."""
    if isinstance(exc, ThawError):
        return KeyhiveHTTPException(
            503, "The stored state of this session cannot be restored right now; "
                 "it was left untouched. Try again later.", "thaw_failed", {"Retry-After": "5"})
    if isinstance(exc, ManagerClosed):
        return KeyhiveHTTPException(503, "The service is starting or shutting down; try again shortly.",
                                    "unavailable", {"Retry-After": "1"})
    if isinstance(exc, AgentStopped):
        return KeyhiveHTTPException(503, "The session stopped while handling the request; retry it.",
                                    "agent_stopped", {"Retry-After": "1"})
    if isinstance(exc, TimeoutError):
        return KeyhiveHTTPException(504, "The session did not answer in time.", "timeout")
    return KeyhiveHTTPException(503, "The session is unavailable; try again later.", "unavailable")


def _bad_key(exc: Exception) -> KeyhiveHTTPException:
    return KeyhiveHTTPException(400, f"Invalid key: {exc}", "invalid_key")


def _log(exc: BaseException, manager: InstanceManager, key: Any) -> None:
    level = logging.ERROR if isinstance(exc, ThawError) else logging.INFO
    logger.log(level, "keyhive: %s: key %r: %r answered as an error status", manager.name, key, exc,
               exc_info=exc if level == logging.ERROR else None)


async def get_agent(manager: InstanceManager, key: Any, *, partition: Any = None,
                    initial_state: Mapping[str, Any] | None = None) -> AgentRef:
    """``manager.get(key)`` for an HTTP handler, its errors raised as HTTP errors.

    Raises:
        KeyhiveHTTPException: 400 for a bad key, 503 when the state cannot be thawed or the
            manager is not running.
    """
    try:
        check_key(key)
        if partition is not None:
            check_key(partition, "partition")
    except (TypeError, ValueError) as exc:
        raise _bad_key(exc) from None
    try:
        return await manager.get(key, partition=partition, initial_state=initial_state)
    except KeyhiveError as exc:
        _log(exc, manager, key)
        raise _http_error(exc) from None


async def agent_call(manager: InstanceManager, key: Any, message: Any, *, partition: Any = None,
                     timeout: float | None = 5.0) -> Any:
    """``manager.call(key, message)`` for an HTTP handler: get, call, no attach.

    The agent's idle timer is not affected (as in the core: only attachments and
    ``touch`` are). Exceptions raised by the agent's ``handle`` pass through unchanged.

    Raises:
        KeyhiveHTTPException: 400 bad key; 503 thaw failed, manager closed or agent stopped
            twice; 504 the call timed out.
    """
    ref = await get_agent(manager, key, partition=partition)
    for attempt in (1, 2):
        try:
            return await ref.call(message, timeout=timeout)
        except AgentStopped as exc:
            if attempt == 2:
                _log(exc, manager, key)
                raise _http_error(exc) from None
            ref = await get_agent(manager, key, partition=partition)  # it stopped meanwhile
        except TimeoutError as exc:
            _log(exc, manager, key)
            raise _http_error(exc) from None
    raise AssertionError("unreachable")  # pragma: no cover


def agent_dependency(manager: InstanceManager,
                     key: Callable[[Request], Any | Awaitable[Any]],
                     *, partition: Any = None) -> Callable[[Request], Awaitable[AgentRef]]:
    """A FastAPI dependency giving the request's agent: ``ref: AgentRef = Depends(dep)``.

    ``key(request)`` (sync or async) picks the key, e.g. ``lambda r: r.cookies["session"]``;
    a missing cookie or header (``KeyError``) or a bad key is a 400.
    """

    async def keyhive_agent(request: Request) -> AgentRef:
        try:
            value = key(request)
            if isinstance(value, Awaitable):
                value = await value
        except KeyError as exc:
            raise KeyhiveHTTPException(400, f"Missing session key: {exc}", "missing_key") from None
        return await get_agent(manager, value, partition=partition)

    return keyhive_agent


async def _keyhive_error_response(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, KeyhiveHTTPException):
        exc = _http_error(exc)
    return JSONResponse({"detail": exc.detail, "error": exc.error}, exc.status_code, exc.headers)


def add_exception_handlers(app: Any) -> None:
    """Answer keyhive errors with JSON ``{"detail", "error"}`` and the right status.

    Covers :class:`KeyhiveHTTPException` and keyhive errors that escape a handler
    (``ThawError``, ``ManagerClosed``, ``AgentStopped`` → 503). Works on FastAPI and Starlette.
    """
    for exc_type in (KeyhiveHTTPException, ThawError, ManagerClosed, AgentStopped):
        app.add_exception_handler(exc_type, _keyhive_error_response)


# -- WebSockets -----------------------------------------------------------------------------


def _ws_close(exc: BaseException) -> WebSocketException:
    if isinstance(exc, ThawError):
        return WebSocketException(WS_INTERNAL_ERROR, "session state cannot be restored; try later")
    if isinstance(exc, ManagerClosed):
        return WebSocketException(WS_GOING_AWAY, "server is shutting down")
    if isinstance(exc, AgentStopped):
        return WebSocketException(WS_SERVICE_RESTART, "session stopped; reconnect")
    return WebSocketException(WS_TRY_AGAIN_LATER, "session unavailable; try later")


@contextlib.asynccontextmanager
async def attach_websocket(websocket: WebSocket, manager: InstanceManager, key: Any, *,
                           partition: Any = None, accept: bool = True,
                           subprotocol: str | None = None, events: bool = False,
                           snapshot: bool = False,
                           snapshot_message: Callable[[Any], Any] | None = None,
                           stop_message: Callable[[StopReason | None], Any] | None = None,
                           ) -> AsyncIterator[AgentRef]:
    """``async with attach_websocket(ws, manager, key) as ref``: attached while the socket is open.

    Accepts the socket (unless ``accept=False``), gets the agent and attaches the socket
    to it; on leaving the block (disconnect, error or cancellation) it detaches, and the
    agent's idle timer starts when the last socket has gone. A client disconnect
    (``WebSocketDisconnect``) inside the block ends it quietly.

    With ``events=True`` the socket subscribes to the agent instead (``ref.subscribe()``,
    which is its attachment) and every event the agent publishes (``self.publish``) is
    sent to the socket as one JSON message, in publish order, while the block goes on
    (one task per socket, next to the block's own receive loop). With ``snapshot=True`` as
    well, the first message is ``{"type": "snapshot", "state": <the state>}``, taken in the
    agent's turn: the events that follow are exactly those published after it. When the
    agent stops, the socket gets ``{"type": "stopped", "reason": "<StopReason>"}`` and is
    closed with 1012 (reconnect: it thaws); a socket that fell more than
    ``subscriber_buffer`` events behind is closed with 1013 (reconnect for a fresh
    snapshot). An event that is not JSON-encodable closes the socket with 1011 (logged).
    ``snapshot_message(state)`` and ``stop_message(reason)`` shape those two messages
    (e.g. as the page's own ``{"type": "state", ...}``).

    Failures close the socket with a code instead of a stack trace: a bad key → 1008; a
    checkpoint that cannot be thawed → 1011; manager closed → 1001; the agent stopped
    under the socket (``manager.stop``) → 1012, so the client reconnects and thaws it.
    These are raised as Starlette's ``WebSocketException``, which the app closes with. Any
    other exception in the block closes the socket with 1011 and propagates (to be logged).

    Raises:
        ValueError: ``snapshot=True`` without ``events=True``.
    """
    if snapshot and not events:
        raise ValueError("snapshot=True sends the state before the agent's events: "
                         "pass events=True as well")
    try:
        check_key(key)
        if partition is not None:
            check_key(partition, "partition")
    except (TypeError, ValueError) as exc:
        if accept and websocket.application_state is WebSocketState.CONNECTING:
            await websocket.accept(subprotocol)
        raise WebSocketException(WS_POLICY_VIOLATION, f"invalid key: {exc}"[:120]) from None
    if accept and websocket.application_state is WebSocketState.CONNECTING:
        await websocket.accept(subprotocol)
    subscription: Any = None
    try:
        ref = await manager.get(key, partition=partition)
        if events:
            subscription = ref.subscribe(snapshot=snapshot)
            await subscription.__aenter__()
        else:
            await ref.attach(websocket)
    except KeyhiveError as exc:
        _log(exc, manager, key)
        raise _ws_close(exc) from None
    forwarder: asyncio.Task[None] | None = None
    if subscription is not None:
        try:
            if snapshot:  # before the block runs, so it is the socket's first message
                state = subscription.snapshot
                await websocket.send_json(snapshot_message(state) if snapshot_message is not None
                                          else {"type": "snapshot", "state": state})
        except BaseException:
            await subscription.__aexit__(None, None, None)  # no owner left behind
            raise
        forwarder = asyncio.get_running_loop().create_task(
            _forward_events(websocket, subscription, manager, key, stop_message))
    try:
        yield ref
    except WebSocketDisconnect:
        pass
    except KeyhiveError as exc:
        if websocket.client_state is WebSocketState.DISCONNECTED:
            raise
        if websocket.application_state is WebSocketState.DISCONNECTED:
            return  # the forwarder closed it already (the agent stopped)
        _log(exc, manager, key)
        raise _ws_close(exc) from None
    except WebSocketException:
        raise  # the app chose its close code
    except Exception:
        # A bug in the handler: close cleanly with 1011 (not a dropped connection), then let
        # the server log the error as usual.
        if (websocket.application_state is WebSocketState.CONNECTED
                and websocket.client_state is WebSocketState.CONNECTED):
            with contextlib.suppress(Exception):
                await websocket.close(WS_INTERNAL_ERROR, "internal error")
        raise
    finally:
        if forwarder is not None:
            forwarder.cancel()
            await asyncio.wait([forwarder])  # not `await forwarder`: a cancel of ours goes on up
        if subscription is not None:
            await subscription.__aexit__(None, None, None)
        else:
            await ref.detach(websocket)


async def _forward_events(websocket: WebSocket, subscription: Any, manager: InstanceManager,
                          key: Any, stop_message: Callable[[StopReason | None], Any] | None) -> None:
    """Send the agent's events to the socket until the stream or the socket ends."""
    code, reason = WS_SERVICE_RESTART, "session stopped; reconnect"
    try:
        async for event in subscription:
            await websocket.send_json(event)
        reason_ = subscription.stop_reason
        await websocket.send_json(stop_message(reason_) if stop_message is not None
                                  else {"type": "stopped", "reason": str(reason_)})
    except SubscriberOverflow:
        code, reason = WS_TRY_AGAIN_LATER, "fell behind the session's events; reconnect"
    except (WebSocketDisconnect, OSError, RuntimeError):
        return  # the socket went away (Starlette raises RuntimeError once it is closed)
    except (TypeError, ValueError) as exc:
        logger.error("keyhive: %s: key %r published an event that is not JSON: %r; socket closed",
                     manager.name, key, exc)
        code, reason = WS_INTERNAL_ERROR, "internal error"
    if (websocket.application_state is WebSocketState.CONNECTED
            and websocket.client_state is WebSocketState.CONNECTED):
        with contextlib.suppress(Exception):
            await websocket.close(code, reason)
