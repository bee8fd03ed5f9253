"""AgentRef: the handle callers hold, and the per-incarnation runtime behind it.

One ``AgentRef`` object exists per incarnation, so ``get`` of a live key allocates
nothing. It carries the turn (one message at a time, FIFO hand-off, no task and no
queue while idle) and the lifecycle slots. Callers never see the ``Agent`` object;
everything goes through these methods, which is what lets a later runtime serve the
same handle from another process.

A ``call`` runs the handler in the caller's task: the fast path starts the handler
coroutine by hand and, when it finishes without suspending (a counter, a dict
update), returns with no timer armed and no await on the loop. A handler that does
suspend gets its timeout from that point on. A timeout or a cancellation of the
caller interrupts the handler at its current await, as in any asyncio code.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import types
from collections import deque
from collections.abc import Coroutine, Generator
from typing import TYPE_CHECKING, Any

from ._errors import AgentStopped
from ._events import EventKind, StopReason
from ._lifecycle import Lifecycle

if TYPE_CHECKING:
    from ._agent import Agent
    from ._manager import InstanceManager

__all__ = ["AgentRef"]

logger = logging.getLogger("keyhive")

# Status of an incarnation. Plain ints compared with `is` (small ints are cached).
STARTING = 0
RUNNING = 1
STOPPING = 2
STOPPED = 3


class _Cast:
    __slots__ = ("message",)

    def __init__(self, message: Any) -> None:
        self.message = message


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], yielded: Any) -> Generator[Any, Any, Any]:
    """Go on running a coroutine that was started by hand and suspended on ``yielded``."""
    while True:
        try:
            sent = yield yielded
        except BaseException as exc:
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as stop:
                return stop.value


class AgentRef(Lifecycle):
    """A handle on one incarnation of one key's agent.

    Two refs are equal only when they name the same incarnation: after the agent stops
    and starts again, ``get`` returns a ref that is not equal to the old one.
    """

    __slots__ = (
        "__weakref__",
        "_agent",
        "_busy",
        "_change",
        "_codec_logged",
        "_failures",
        "_key",
        "_mgr",
        "_partition",
        "_status",
        "_stop_reason",
        "_stop_req",
        "_unsure",
        "_version",
        "_waiters",
    )

    def __init__(self, manager: InstanceManager, key: Any, partition: Any) -> None:
        self._owners = self._deadline = self._armed = None  # Lifecycle.__init__, inlined (hot)
        self._mgr = manager
        self._key = key
        self._partition = partition
        self._agent: Agent | None = None
        self._status = STARTING
        self._busy = False
        self._waiters: deque[asyncio.Future[None] | _Cast] | None = None
        self._version: int | None = None
        self._stop_reason: StopReason | None = None
        self._stop_req: StopReason | None = None
        self._change: asyncio.Future[None] | None = None
        self._failures = 0
        self._codec_logged = False  # an unencodable state is logged once per incarnation
        self._unsure: set[bytes] | None = None  # digests of failed writes that may have landed

    # -- identity -------------------------------------------------------------------

    @property
    def key(self) -> Any:
        """The key this incarnation serves."""
        return self._key

    @property
    def partition(self) -> Any:
        """The key's partition (``None`` when none)."""
        return self._partition

    @property
    def manager(self) -> str:
        """The name of the manager that runs it."""
        return self._mgr.name

    @property
    def alive(self) -> bool:
        """True until this incarnation has stopped."""
        return self._status is not STOPPED

    @property
    def stop_reason(self) -> StopReason | None:
        """``None`` while alive, else why it stopped."""
        return self._stop_reason

    def __repr__(self) -> str:
        state = {STARTING: "starting", RUNNING: "running", STOPPING: "stopping"}.get(
            self._status, f"stopped:{self._stop_reason}"
        )
        part = "" if self._partition is None else f" partition={self._partition!r}"
        return f"<AgentRef {self._mgr.name}:{self._key!r}{part} {state} at {id(self):#x}>"

    # -- messages -------------------------------------------------------------------

    async def call(self, message: Any, *, timeout: float | None = 5.0) -> Any:
        """Run ``handle(message)`` in the agent's turn and return its result.

        Raises:
            AgentStopped: this incarnation has stopped (also while the call was queued).
            TimeoutError: no result within ``timeout`` seconds (``None``: wait forever).
            Exception: whatever ``handle`` raised; the agent keeps running.
        """
        if self._busy or self._status is not RUNNING:
            return await self._call_queued(message, timeout)
        self._busy = True
        try:
            if self._mgr._calls_touch:
                self.touch()
            coro = self._agent.handle(message)  # type: ignore[union-attr]
            try:
                yielded = coro.send(None)
            except StopIteration as done:
                return done.value
            if timeout is None:
                return await _resume(coro, yielded)
            async with asyncio.timeout(timeout):
                return await _resume(coro, yielded)
        finally:
            self._release()

    async def _call_queued(self, message: Any, timeout: float | None) -> Any:
        if self._status is STOPPED:
            raise AgentStopped(f"{self!r} has stopped")
        async with asyncio.timeout(timeout):
            await self._acquire()
            try:
                if self._mgr._calls_touch:
                    self.touch()
                return await self._agent.handle(message)  # type: ignore[union-attr]
            finally:
                self._release()

    async def cast(self, message: Any) -> None:
        """Queue ``message`` for ``handle`` and return at once.

        An exception raised by ``handle`` is logged with the key.

        Raises:
            AgentStopped: this incarnation has stopped.
        """
        if self._status is STOPPED:
            raise AgentStopped(f"{self!r} has stopped")
        if self._mgr._calls_touch:
            self.touch()
        if self._busy:
            self._queue().append(_Cast(message))
        else:
            self._busy = True
            self._mgr._spawn(self._run_cast(message))

    async def _run_cast(self, message: Any) -> None:
        try:
            await self._agent.handle(message)  # type: ignore[union-attr]
        except Exception:
            logger.exception("keyhive: %s: cast to key %r failed", self._mgr.name, self._key)
        finally:
            self._release()

    async def state(self) -> Any:
        """A deep copy of the agent's state, taken in the agent's turn.

        Raises:
            AgentStopped: this incarnation has stopped.
        """
        if self._status is STOPPED:
            raise AgentStopped(f"{self!r} has stopped")
        await self._acquire()
        try:
            return copy.deepcopy(self._agent.state)  # type: ignore[union-attr]
        finally:
            self._release()

    # -- the turn ---------------------------------------------------------------------

    def _queue(self) -> deque[asyncio.Future[None] | _Cast]:
        waiters = self._waiters
        if waiters is None:
            waiters = self._waiters = deque()
        return waiters

    async def _acquire(self) -> None:
        """Wait for the turn (FIFO). Raises AgentStopped when the agent stops meanwhile."""
        if not self._busy:
            if self._status is STOPPED:
                raise AgentStopped(f"{self!r} has stopped")
            self._busy = True
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue().append(fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._release()  # the turn was handed to us as we left: pass it on
            raise

    def _release(self) -> None:
        """End the current turn: hand it to the next waiter, or free it."""
        if (self._stop_req is not None and self._status is RUNNING
                and self._mgr._begin_self_stop(self)):
            return  # the turn is kept for the hibernate
        waiters = self._waiters
        while waiters:
            item = waiters.popleft()
            if type(item) is _Cast:
                self._mgr._spawn(self._run_cast(item.message))
                return
            if not item.done():  # type: ignore[union-attr]
                item.set_result(None)  # type: ignore[union-attr]
                return
        self._waiters = None
        self._busy = False

    def _fail_waiters(self) -> None:
        waiters = self._waiters
        self._waiters = None
        if not waiters:
            return
        dropped = 0
        for item in waiters:
            if type(item) is _Cast:
                dropped += 1
            elif not item.done():  # type: ignore[union-attr]
                item.set_exception(AgentStopped(f"{self!r} has stopped"))  # type: ignore[union-attr]
        if dropped:
            logger.warning("keyhive: %s: key %r stopped with %d queued casts unhandled",
                           self._mgr.name, self._key, dropped)

    # -- changes of status --------------------------------------------------------------

    async def _changed(self) -> None:
        """Wait for the next change of status (raises the error of a failed start)."""
        fut = self._change
        if fut is None:
            fut = self._change = asyncio.get_running_loop().create_future()
        await asyncio.shield(fut)

    def _notify(self, error: BaseException | None = None) -> None:
        fut = self._change
        if fut is not None:
            self._change = None
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)
                fut.exception()  # waiters may all have been cancelled: not a lost error

    async def wait_stopped(self) -> StopReason:
        """Wait until this incarnation has stopped; return why."""
        while self._status is not STOPPED:
            with contextlib.suppress(Exception):  # a failed start also ends the incarnation
                await self._changed()
        assert self._stop_reason is not None
        return self._stop_reason

    def _request_stop(self, reason: StopReason) -> None:
        if self._status is STARTING:  # from on_start: acted on once the agent is running
            self._stop_req = reason
        elif self._status is RUNNING:
            self._stop_req = reason
            if not self._busy:  # asked from outside a turn: start now
                self._busy = True
                self._release()

    # -- attachments and idle ------------------------------------------------------------

    async def attach(self, owner: object = None) -> None:
        """Attach ``owner`` (default: the current task) and cancel the idle timer.

        Idempotent per owner. A task owner is detached automatically when it finishes.

        Raises:
            AgentStopped: this incarnation has stopped.
        """
        if self._status is STOPPED:
            raise AgentStopped(f"{self!r} has stopped")
        if owner is None:
            owner = _current_task("attach")
        if self.attached(owner):
            if isinstance(owner, asyncio.Task):
                owner.add_done_callback(self._owner_done)
            mgr = self._mgr
            if mgr._listeners:
                mgr._emit(EventKind.ATTACHED, self)

    async def detach(self, owner: object = None) -> None:
        """Detach ``owner`` (default: the current task); not attached: nothing happens.

        When the last owner leaves, a fresh full idle timer starts.
        """
        if owner is None:
            owner = _current_task("detach")
        if self._detach(owner) and isinstance(owner, asyncio.Task):
            owner.remove_done_callback(self._owner_done)

    def _owner_done(self, task: asyncio.Task[Any]) -> None:
        self._detach(task)

    def _detach(self, owner: object) -> bool:
        if self._status is STOPPED:
            return False
        mgr = self._mgr
        wheel = mgr._wheel
        if not self.detached(owner, wheel.now(), mgr._idle_timeout):
            return False
        deadline = self._deadline
        if deadline is not None:
            wheel.arm(self, deadline)
        if mgr._listeners:
            mgr._emit(EventKind.DETACHED, self)
        return True

    def touch(self) -> None:
        """Restart the idle timer when nothing is attached; otherwise do nothing."""
        if self._status is not RUNNING:
            return
        mgr = self._mgr
        wheel = mgr._wheel
        if self.touched(wheel.now(), mgr._idle_timeout):
            wheel.arm(self, self._deadline)  # type: ignore[arg-type]


def _current_task(what: str) -> asyncio.Task[Any]:
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError(f"{what}() without an owner must run inside an asyncio task")
    return task
